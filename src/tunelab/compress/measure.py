"""Measure a saved (compressed) model: size, parameters, peak RAM, speed and perplexity.

Each model is measured in a fresh process (``python -m tunelab.compress.measure DIR ...``), which
is the only way to get an honest peak RAM: a process's peak resident size never goes down, so
measuring several models in one process would report the largest of them for all. Loading from
disk in that process also proves the saved format reloads.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.hardware import peak_rss_bytes, reset_peak_rss

WEIGHT_FILES = ("*.safetensors", "*.pt", "*.bin")


def measure_directory(
    directory: str | Path,
    texts: list[str],
    *,
    max_length: int = 256,
    prefill_tokens: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
) -> dict[str, Any]:
    """Load ``directory`` and measure it (run this in its own process for a true peak RAM)."""
    from tunelab.compress.calibration import token_chunks
    from tunelab.compress.store import load_compressed
    from tunelab.evaluate.perplexity import perplexity

    directory = Path(directory)
    model, tokenizer, manifest = load_compressed(directory)
    load_peak = peak_rss_bytes()
    gc.collect()
    reset_peak_rss()  # from here on, the peak is what running the model needs, not loading transients
    total, nonzero = count_parameters(model)
    prompt = token_chunks(tokenizer, texts, prefill_tokens, 1)
    speed = measure_speed(model, tokenizer, prompt, decode_tokens, repeats)
    ppl = perplexity(model, tokenizer, texts, max_length=max_length)
    return {
        "params": total,
        "nonzero_params": nonzero,
        "size_bytes": sum(f.stat().st_size for pattern in WEIGHT_FILES for f in directory.glob(pattern)),
        "peak_rss_bytes": peak_rss_bytes(),
        "load_peak_rss_bytes": load_peak,
        **speed,
        "perplexity": ppl["perplexity"],
        "nll": ppl["nll"],
        "tokens_scored": ppl["tokens"],
        "loader": manifest["loader"],
    }


def measure_in_subprocess(directory: Path, texts_file: Path, text_limit: int, settings: dict[str, int]) -> dict[str, Any]:
    """:func:`measure_directory` in a fresh Python process; returns its result."""
    command = [sys.executable, "-m", "tunelab.compress.measure", str(directory), str(texts_file), "--limit", str(text_limit)]
    for key, value in settings.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {directory} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(logical parameter count, nonzero count): quantized layers count as the weights they encode."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from tunelab.compress.int8_dynamic import DynamicInt8Linear
    from tunelab.compress.qlinear import QuantLinear
    from tunelab.compress.sparse_layers import SparseGatedMLP, SparseInputLinear

    total = nonzero = 0
    handled: set[int] = set()
    for module in model.modules():
        weights: list[torch.Tensor] = []
        if isinstance(module, SparseGatedMLP):
            weights = module.linear_weights()
        elif isinstance(module, (QuantLinear, DynamicInt8Linear, SparseInputLinear)):
            weights = [module.dequantized_weight()]
        elif isinstance(module, DynamicLinear):
            weights = [module.weight().dequantize()]
        elif hasattr(getattr(module, "weight", None), "quant_state"):  # bitsandbytes 4-bit
            import bitsandbytes as bnb

            weights = [bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)]
            handled.add(id(module.weight))
        for weight in weights:
            total += weight.numel()
            nonzero += int(weight.count_nonzero())
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in handled or id(param) in seen or param.dtype == torch.uint8:
            continue
        seen.add(id(param))
        total += param.numel()
        nonzero += int(param.count_nonzero())
    return total, nonzero


class _TokenClock:
    """A generation streamer that timestamps each new token (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, _value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


@torch.no_grad()
def measure_speed(model: nn.Module, tokenizer: Any, prompt: torch.Tensor, decode_tokens: int, repeats: int) -> dict[str, float]:
    """Best prefill and decode tokens/s (batch 1, greedy, KV cache) of ``repeats`` runs after a warm-up.

    The best run, not the median: other processes only ever slow a run down, so the fastest one
    is the closest to what the model costs (the reasoning behind ``timeit``'s minimum).
    """
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate = dict(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False, pad_token_id=pad)
    model.generate(prompt[:, :8], **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=prompt)
        prefill.append(prompt.shape[1] / (time.perf_counter() - start))
        clock = _TokenClock()
        model.generate(prompt, streamer=clock, **generate)
        decode.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
    return {"prefill_tokens_per_s": max(prefill), "decode_tokens_per_s": max(decode)}


def interleaved_speed(
    models: dict[str, nn.Module], tokenizer: Any, prompt: torch.Tensor, decode_tokens: int, rounds: int
) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, float]]]:
    """Every model's :func:`measure_speed` for ``rounds`` rounds, the models taking turns, so load
    on a shared machine hits them alike; returns (all runs, the best of each figure per model)."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            runs[name].append(measure_speed(model, tokenizer, prompt, decode_tokens, 1))
    return runs, {name: {key: max(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}


def main(argv: list[str] | None = None) -> None:
    """``python -m tunelab.compress.measure DIR TEXTS``: print the measurements as one JSON line."""
    from tunelab.compress.calibration import read_texts

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("texts")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure_directory(
        args.directory,
        read_texts(args.texts, args.limit),
        max_length=args.max_length,
        prefill_tokens=args.prefill_tokens,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
