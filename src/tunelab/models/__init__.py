"""Model loading: packaged aliases, tiny test models, Hugging Face directories and GGUF files."""

from tunelab.models.load import LoadedModel, load_model, load_run, peek_config, resolve_directory

__all__ = ["LoadedModel", "load_model", "load_run", "peek_config", "resolve_directory"]
