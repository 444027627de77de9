"""The ``tunelab`` command line: a thin shell over the pipeline's functions.

Subcommands live in ``tunelab/commands/<topic>.py``; each module exposes ``commands``, a list of
click commands, and is picked up here automatically, so adding a capability never means editing
this file. User errors (``UserError``) become one line on stderr and exit code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback

import click

from tunelab import __version__
from tunelab.errors import UserError


def _report(exc: UserError) -> None:
    """The error's one line on stderr; a process that cannot wind down normally ends here."""
    click.echo(f"error: {exc.one_line()}", err=True)
    if exc.ends_process_now:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)


class _Group(click.Group):
    """Lists commands in registration order and turns user errors into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            _report(exc)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunelab")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """tunelab: adapt, compress and evaluate language models from one recipe file."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register_commands() -> None:
    import tunelab.commands as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"tunelab.commands.{info.name}")
        for command in getattr(module, "commands", []):
            cli.add_command(command)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(standalone_mode=True)
    except UserError as exc:  # raised outside a subcommand (e.g. while parsing)
        _report(exc)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
