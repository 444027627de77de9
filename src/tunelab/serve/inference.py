"""The models the server knows and the ones it has loaded.

Base models are tunelab's causal-LM aliases plus the directories the server was started with;
fine-tuned models (and their checkpoints) are registered by the worker under OpenAI-style names
and point at their run directory.

A fine-tuned model whose run saved only a PEFT adapter (LoRA, IA3, ...) is not loaded whole: its
adapter is added by name to the one in-memory copy of its base model, so ten fine-tuned models of
SmolLM2 cost one SmolLM2 plus ten adapters of a few MB each. A request switches the active
adapter (or disables adapters, for the base model itself) under the base's lock; requests waiting
for the same adapter are decoded together as one batch (``tunelab.serve.batching``). Runs that saved more than an adapter (a bottleneck
method, a new head, merged or pruned weights) and checkpoints are loaded whole. At most
``capacity`` bases and whole models stay in memory, the least recently used leaving first.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab import rundir
from tunelab.models.registry import PACKAGED
from tunelab.models.tiny import TINY_MODELS
from tunelab.serve.batching import Batcher
from tunelab.serve.errors import APIError
from tunelab.serve.store import Store, now

KIND = "model"


@dataclass
class LoadedModel:
    """What a request generates with: the model, its tokenizer, the lock to hold while using it,
    the context that puts the model in the requested state (its adapter active), and the batcher
    that decodes the requests waiting for it; requests with the same ``key`` (adapter) batch."""

    model: Any
    tokenizer: Any
    lock: threading.Lock
    batcher: Batcher
    key: str | None = None
    activate: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class SharedBase:
    """One base model in memory and every adapter of that base, each loaded once by name."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer, self.lock = model, tokenizer, threading.Lock()
        self.batcher = Batcher(self.lock)
        self.peft: Any = None  # the PeftModel around ``model`` once an adapter is loaded
        self.adapters: set[str] = set()

    def add(self, name: str, adapter_dir: Path) -> None:
        from peft import PeftModel

        with self.lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name).eval()
            else:
                self.peft.load_adapter(str(adapter_dir), adapter_name=name)
            self.adapters.add(name)

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                return
            self.adapters.discard(name)
            if self.adapters:
                self.peft.delete_adapter(name)
                self.peft.set_adapter(sorted(self.adapters)[0])  # peft keeps pointing at a deleted active adapter
            else:  # the last one: back to the plain base model
                self.model, self.peft = self.peft.unload(), None

    def view(self, adapter: str | None, tokenizer: Any) -> LoadedModel:
        """The base with ``adapter`` active (None: the base model itself, adapters disabled)."""
        if adapter is None:
            if self.peft is None:
                return LoadedModel(self.model, tokenizer, self.lock, self.batcher)
            return LoadedModel(self.peft, tokenizer, self.lock, self.batcher, None, self.peft.disable_adapter)
        peft = self.peft

        @contextlib.contextmanager
        def active() -> Iterator[None]:
            peft.set_adapter(adapter)
            yield

        return LoadedModel(peft, tokenizer, self.lock, self.batcher, adapter, active)


def adapter_only(run_dir: Path) -> Path | None:
    """The PEFT adapter folder of a causal-LM run that saved nothing else, or None."""
    try:
        manifest = rundir.read_manifest(run_dir)
    except Exception:
        return None
    folder = rundir.final_dir(run_dir) / "adapter"
    if manifest.get("model_task") == "causal-lm" and manifest.get("files") == ["adapter/"] and (folder / "adapter_config.json").exists():
        return folder
    return None


class ModelPool:
    def __init__(self, store: Store, extra_models: tuple[str, ...] = (), capacity: int = 2) -> None:
        self.store, self.capacity = store, capacity
        self.bases: dict[str, str] = {alias: alias for alias, spec in PACKAGED.items() if spec.kind == "causal-lm"}
        self.bases.update({alias: alias for alias, spec in TINY_MODELS.items() if not spec.encoder})
        for entry in extra_models:
            path = Path(entry).expanduser().resolve()
            self.bases[path.name if path.exists() else entry] = str(path) if path.exists() else entry
        self._loaded: OrderedDict[str, SharedBase | LoadedModel] = OrderedDict()  # by base source, or by model id
        self._tokenizers: dict[str, Any] = {}  # fine-tuned model id -> its run's tokenizer
        self._lock = threading.Lock()

    def base_source(self, name: str) -> str | None:
        """What ``load_model`` loads for model id ``name`` (a fine-tuned one: its run directory)."""
        if name in self.bases:
            return self.bases[name]
        record = self.store.get(KIND, name)
        return record["_run_dir"] if record is not None and record.get("_checkpoint_step") is None else None

    def register(self, name: str, run_dir: Path, *, owner: str | None, job_id: str, base: str, checkpoint_step: int | None = None) -> None:
        self.store.insert(KIND, {"id": name, "object": "model", "created": now(), "owned_by": owner or "tunelab",
                                 "_run_dir": str(run_dir), "_job_id": job_id, "_base": base, "_checkpoint_step": checkpoint_step}, owner=owner)

    def listing(self, owner: str | None) -> list[dict[str, Any]]:
        bases = [{"id": name, "object": "model", "created": 0, "owned_by": "tunelab"} for name in self.bases]
        return bases + [public(m) for m in self.store.all(KIND, owner=owner, newest_first=False)]

    def record(self, name: str, owner: str | None) -> dict[str, Any]:
        if name in self.bases:
            return {"id": name, "object": "model", "created": 0, "owned_by": "tunelab"}
        record = self.store.get(KIND, name, owner=owner)
        if record is None:
            raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.", param="model", code="model_not_found")
        return record

    def delete(self, name: str, owner: str | None) -> None:
        if name in self.bases:
            raise APIError(400, f"'{name}' is a base model; only fine-tuned models can be deleted.", param="model")
        record = self.record(name, owner)
        self.store.delete(KIND, name)
        with self._lock:
            self._loaded.pop(name, None)
            self._tokenizers.pop(name, None)
            shared = self._loaded.get(self.bases.get(record.get("_base", ""), record.get("_base", "")))
        if isinstance(shared, SharedBase):
            shared.remove(_adapter_name(record))

    def in_memory(self) -> dict[str, list[str]]:
        """What is loaded: each shared base with its adapters, and the models loaded whole."""
        with self._lock:
            entries = list(self._loaded.items())
        return {key: sorted(entry.adapters) if isinstance(entry, SharedBase) else [] for key, entry in entries}

    def load(self, name: str, owner: str | None) -> LoadedModel:
        """``name`` ready to generate: a view of a shared base, or a model loaded whole."""
        record = self.record(name, owner)
        if name in self.bases:
            shared = self._shared(self.bases[name])
            return shared.view(None, shared.tokenizer)
        adapter_dir = adapter_only(Path(record["_run_dir"])) if record.get("_checkpoint_step") is None else None
        base = record.get("_base")
        if adapter_dir is not None and base is not None:
            shared = self._shared(self.bases.get(base, base))
            adapter = _adapter_name(record)
            if adapter not in shared.adapters:
                shared.add(adapter, adapter_dir)
            return shared.view(adapter, self._tokenizer(record, shared))
        return self._entry(name, lambda: self._load_whole(record))  # type: ignore[return-value]

    def _shared(self, source: str) -> SharedBase:
        from tunelab.models.load import load_model

        def build() -> SharedBase:
            loaded = load_model(source, "causal-lm")
            return SharedBase(loaded.model.eval(), loaded.tokenizer)

        return self._entry(source, build)  # type: ignore[return-value]

    def _entry(self, key: str, build: Callable[[], SharedBase | LoadedModel]) -> SharedBase | LoadedModel:
        return least_recently_used(self._loaded, self._lock, key, build, self.capacity)

    def _tokenizer(self, record: dict[str, Any], shared: SharedBase) -> Any:
        """The run's own tokenizer (its chat template), when it has one; read once per model."""
        from transformers import AutoTokenizer

        if record["id"] not in self._tokenizers:
            final = rundir.final_dir(Path(record["_run_dir"]))
            self._tokenizers[record["id"]] = AutoTokenizer.from_pretrained(str(final)) if (final / "tokenizer_config.json").exists() else shared.tokenizer
        return self._tokenizers[record["id"]]

    @staticmethod
    def _load_whole(record: dict[str, Any]) -> LoadedModel:
        from tunelab.models.load import load_model

        loaded = load_model(record["_run_dir"], "causal-lm")
        step = record.get("_checkpoint_step")
        if step is not None:
            _apply_checkpoint(loaded.model, Path(record["_run_dir"]), step)
        lock = threading.Lock()
        return LoadedModel(loaded.model.eval(), loaded.tokenizer, lock, Batcher(lock))


def least_recently_used(cache: OrderedDict[str, Any], lock: threading.Lock, key: str, build: Callable[[], Any], capacity: int) -> Any:
    """``cache[key]``, built under ``lock`` when missing; beyond ``capacity`` entries the least
    recently used leaves (its memory is freed once no request holds it)."""
    with lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        entry = build()
        cache[key] = entry
        while len(cache) > capacity:
            cache.popitem(last=False)
        return entry


def _adapter_name(record: dict[str, Any]) -> str:
    """A module-safe adapter name (peft keys modules by it; model ids hold dots and colons)."""
    return "ft_" + record["_job_id"].removeprefix("ftjob-")


def _apply_checkpoint(model: Any, run_dir: Path, step: int) -> None:
    """The trained weights of checkpoint ``step`` on the run's final model (same modules)."""
    from safetensors.torch import load_file

    weights = load_file(str(rundir.checkpoint_path(run_dir, step) / "trainable.safetensors"))
    missing = set(weights) - set(model.state_dict())
    if missing:
        raise APIError(400, f"checkpoint step {step} does not match its run's model ({len(missing)} tensors unknown)", param="model")
    model.load_state_dict(weights, strict=False)


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record without the server's own fields (run directories stay private)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}
