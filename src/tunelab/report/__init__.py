"""Reports people look at: plots and comparison tables."""
