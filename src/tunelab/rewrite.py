"""Model-backed augmentation: a generative model rewrites training inputs (cached on disk), and a
classifier filters augmented copies.

Each input goes through the prompt chain of ``RewriteConfig`` (``tunelab.data.rewrite``), asked
through the model's own chat template (or as a plain few-shot prompt to a base model). Generation
is batched and appended to a file in the tunelab cache as it goes, keyed by the model's identity,
the prompts and the decoding settings, so a killed run continues where it stopped and every later
run on the same texts reuses it. The first line of each answer is kept (small models like to add commentary after it). The filter
loads a classifier (a run directory with a classification head knows its label names) and
predicts each copy's label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from tunelab import atomic
from tunelab.data.rewrite import RewriteConfig, set_label_predictor, set_rewriter
from tunelab.data.templates import render_chat, resolve_chat_template
from tunelab.evaluate.generation import generate_batch
from tunelab.generate import GenerationSettings
from tunelab.methods.peft_adapters import merge_adapters
from tunelab.models import load_model
from tunelab.models.cache import cache_root, model_fingerprint

#: Where a plain few-shot prompt's answer ends: its line (a base model goes on with the next example).
PLAIN_STOP = ("\n",)


def first_line(answer: str) -> str:
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return lines[0].strip('"') if lines else ""


class Rewriter:
    """Rewrites texts through the prompt chain; results cached per (model, prompts, settings, and the
    seed when sampling)."""

    def __init__(self, cfg: RewriteConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        # greedy decoding writes the same text whatever the seed, so every seed of a benchmark shares one cache entry
        sampling_seed = [seed] if cfg.temperature > 0 else []
        settings = json.dumps([model_fingerprint(cfg.model, seed), cfg.prompts, cfg.temperature, cfg.max_new_tokens, *sampling_seed]
                              + ([cfg.template] if cfg.template != "auto" else []))  # auto keeps the caches written before templates were a setting
        self.path = cache_root() / "rewrites" / f"{hashlib.sha256(settings.encode()).hexdigest()[:20]}.jsonl"
        self._model: tuple[Any, Any] | None = None

    def rewrite(self, texts: Sequence[str]) -> dict[str, list[str]]:
        """Each distinct text's ``copies`` rewrites (generated for what the cache lacks)."""
        cached = self._read()
        missing = [t for t in dict.fromkeys(texts) if len(cached.get(t, [])) < self.cfg.copies]
        for copy in range(self.cfg.copies):
            todo = [t for t in missing if len(cached.get(t, [])) <= copy]
            for start in range(0, len(todo), self.cfg.batch_size):
                chunk = todo[start : start + self.cfg.batch_size]
                for text, written in zip(chunk, self._chain(chunk, copy)):
                    cached.setdefault(text, []).append(written)
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    atomic.append_jsonl(self.path, {"text": text, "copy": copy, "rewrite": written})
                print(f"tunelab: rewriting with {self.cfg.model}: {min(start + len(chunk), len(todo))}/{len(todo)} (copy {copy + 1})", flush=True)
        return {t: cached[t][: self.cfg.copies] for t in dict.fromkeys(texts)}

    def _chain(self, texts: list[str], copy: int) -> list[str]:
        model, tokenizer = self._load()
        plain = self.cfg.template == "none"
        template = None if plain else resolve_chat_template(tokenizer, self.cfg.template)[0]
        settings = GenerationSettings(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, seed=self.seed * 1000 + copy)
        current = list(texts)
        for prompt in self.cfg.prompts:
            # an empty answer stays empty (the input is left as it was) rather than being rewritten from nothing
            alive = [i for i, text in enumerate(current) if text]
            asks = [prompt.replace("{text}", current[i]) for i in alive]
            rendered = asks if template is None else [render_chat(tokenizer, [{"role": "user", "content": a}], template, add_generation_prompt=True) for a in asks]
            # a chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS),
            # and a base model continues the few-shot pattern past its answer, so it stops at the line's end
            answers = generate_batch(model, tokenizer, rendered, settings, stop=PLAIN_STOP if plain else (),
                                     add_special_tokens=plain, batch_size=self.cfg.batch_size)
            current = [""] * len(current)
            for i, answer in zip(alive, answers):
                current[i] = first_line(answer)
        return current

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            loaded = load_model(self.cfg.model, seed=self.seed)
            self._model = (merge_adapters(loaded.model).eval(), loaded.tokenizer)
        return self._model

    def _read(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if self.path.exists():
            for row in sorted(atomic.read_jsonl(self.path), key=lambda r: r["copy"]):
                out.setdefault(row["text"], []).append(row["rewrite"])
        return out


def rewrite(cfg: RewriteConfig, seed: int, texts: Sequence[str]) -> dict[str, list[str]]:
    return Rewriter(cfg, seed).rewrite(texts)


set_rewriter(rewrite)


@torch.no_grad()
def predict_labels(model_name: str, seed: int, texts: Sequence[str], batch_size: int = 32) -> list[str]:
    """The label name ``model_name``'s classification head gives each text."""
    loaded = load_model(model_name, "sequence-classification", seed=seed)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    id2label = getattr(model.config, "id2label", None) or {}
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    labels: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        labels += [str(id2label.get(int(i), int(i))) for i in model(**batch).logits.argmax(-1)]
    return labels


set_label_predictor(predict_labels)
