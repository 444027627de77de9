"""CLI subcommands, one module per topic; each exposes ``commands`` (a list of click commands)."""
