"""Save a trained embedding model as a plain transformers model that sentence-transformers also loads.

``RUN_DIR/final/model/`` holds the body as a plain Hugging Face model (any adapters merged, so
``AutoModel.from_pretrained`` needs nothing else) plus the sentence-transformers module files
next to it: ``modules.json``, ``1_Pooling/config.json``, ``2_Dense/`` for a projection and a
``Normalize`` step, exactly the layout of the packaged all-MiniLM-L6-v2. ``final/`` carries the
usual tunelab manifest (task ``base``), so ``load_run``/``load_model(run_dir)`` return the body;
``load_embedder`` rebuilds the whole pooling pipeline from the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab import rundir
from tunelab.methods.config import MethodConfig
from tunelab.methods.peft_adapters import merge_adapters
from tunelab.methods.pooling import Embedder

POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}


def save_embedding_final(run_dir: Path, embedder: Embedder, tokenizer: Any, *, base: str, method: MethodConfig) -> Path:
    """Write ``run_dir/final`` for an embedding run (atomically)."""
    manifest = {"base": base, "model_task": "base", "label_names": None, "method": method.model_dump(mode="json"), "files": ["model/"]}
    with rundir.writing_final(run_dir, manifest) as tmp:
        save_embedder(embedder, tokenizer, tmp / "model")
        tokenizer.save_pretrained(tmp)
    return run_dir / rundir.FINAL


def save_embedder(embedder: Embedder, tokenizer: Any, directory: Path) -> None:
    """The body (adapters merged) and the sentence-transformers modules into ``directory``."""
    body = merge_adapters(embedder.body)
    body.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    hidden = body.config.hidden_size
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    pooling = {"word_embedding_dimension": hidden, **{key: mode == embedder.pooling for mode, key in POOLING_KEYS.items()}}
    _module(directory, modules, "Pooling", pooling)
    if embedder.projection is not None:
        dense = {"in_features": hidden, "out_features": embedder.projection.out_features, "bias": True,
                 "activation_function": "torch.nn.modules.linear.Identity"}
        path = _module(directory, modules, "Dense", dense)
        weights = {f"linear.{k}": v.detach().cpu().contiguous() for k, v in embedder.projection.state_dict().items()}
        save_file(weights, str(path / "model.safetensors"))
    if embedder.normalize:
        _module(directory, modules, "Normalize", None)
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else 512, "do_lower_case": False}))


def _module(directory: Path, modules: list[dict[str, Any]], kind: str, config: dict[str, Any] | None) -> Path:
    idx = len(modules)
    path = directory / f"{idx}_{kind}"
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))
    modules.append({"idx": idx, "name": str(idx), "path": path.name, "type": f"sentence_transformers.models.{kind}"})
    return path


def load_embedder(path: Path, *, dtype: torch.dtype = torch.float32) -> tuple[Embedder, Any]:
    """The embedding pipeline (body, pooling, projection, normalisation) of a saved model directory,
    a run directory, or its ``final/``."""
    from tunelab.models import load_model

    for candidate in (path / "final" / "model", path / "model", path):
        if (candidate / "modules.json").exists():
            break
    else:
        raise FileNotFoundError(f"{path} holds no sentence-transformers modules.json")
    loaded = load_model(str(candidate), "base", dtype=dtype)
    modules = json.loads((candidate / "modules.json").read_text())
    kinds = {m["type"].rsplit(".", 1)[-1]: candidate / m["path"] for m in modules}
    pooling_cfg = json.loads((kinds["Pooling"] / "config.json").read_text())
    pooling = next(mode for mode, key in POOLING_KEYS.items() if pooling_cfg.get(key))
    projection = None
    if "Dense" in kinds:
        projection = json.loads((kinds["Dense"] / "config.json").read_text())["out_features"]
    embedder = Embedder(loaded.model, pooling, projection, normalize="Normalize" in kinds)
    if projection:
        weights = load_file(str(kinds["Dense"] / "model.safetensors"))
        embedder.projection.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    return embedder.eval(), loaded.tokenizer
