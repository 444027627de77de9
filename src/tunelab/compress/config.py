"""The ``compress:`` section: pruning and quantization applied after training."""

from __future__ import annotations

from tunelab.config_base import Section


class CompressConfig(Section):
    """Compression steps (empty: no compression)."""
