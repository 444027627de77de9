"""Weight-space combinations of finished runs of one base model: soups, task arithmetic, TIES, DARE.

``tunelab merge RUN... --method M --out DIR`` writes an ordinary run directory (``final/`` plus
``merge.json``), so everything that reads a run (eval, generate, compress, export) reads a merge.
Full fine-tunes combine their weights (task vectors against the base); LoRA runs combine their
adapters through peft's ``add_weighted_adapter`` and stay an adapter.
"""

from tunelab.merge.spec import MERGE_METHODS, MergeSpec

__all__ = ["MERGE_METHODS", "MergeSpec"]
