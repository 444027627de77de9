"""tunelab: adapt, compress and evaluate language models from one recipe file."""

__version__ = "0.1.0"
