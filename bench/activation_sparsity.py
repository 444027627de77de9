"""Activation sparsity on SmolLM2-135M: decode speed of TEAL thresholds and ReLU-fication vs dense and int8.

    .venv/bin/python bench/activation_sparsity.py --kernels                 # one-row products and one-token MLPs alone (~3 min)
    .venv/bin/python bench/activation_sparsity.py RUN [RUN ...]             # whole models, decode interleaved

``--kernels``: one-row products at SmolLM2's shapes, the input at several densities, for dense fp32
(``F.linear``), dynamic int8 (tunelab's fbgemm layer) and the sparse product (fp32 and int8 rows);
60 weight copies are cycled so the weights stream from memory as in decoding (one copy would sit
in cache). This is where ``SparseInputLinear.DENSE_ABOVE`` comes from.

``RUN``: run directories that ``tunelab compress`` wrote with ``keep_models: true`` (e.g.
``examples/compress_activation_sparsity.yaml`` on the quickstart run, and its ReLU-fied twin).
Every kept variant of every run is loaded into this one process and they take turns decoding
(batch 1, a 128-token prompt, then 32 greedy tokens, ``--rounds`` rounds, best round kept), so
load on the machine hits all alike; the speed-up is against the first run's ``original``. The
perplexity, task accuracy and activation sparsity come from each run's ``compress.json``.
Writes bench/results/activation_sparsity{,_kernels}.{md,json} (``_Nthreads`` added for ``--threads N`` other than 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tunelab.compress.calibration import read_texts, token_chunks  # noqa: E402
from tunelab.compress.int8_dynamic import DynamicInt8Linear  # noqa: E402
from tunelab.compress.measure import interleaved_speed  # noqa: E402
from tunelab.compress.sparse_kernels import sparse_decode_kernels  # noqa: E402
from tunelab.compress.sparse_layers import SparseGatedMLP, SparseInputLinear  # noqa: E402
from tunelab.compress.store import load_compressed  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHAPES = {"gate/up (576→1536)": (576, 1536), "down (1536→576)": (1536, 576), "q/o (576→576)": (576, 576)}
DENSITIES = (1.0, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1)
COPIES = 60


def kernels(rounds: int) -> None:
    """Microseconds per one-row product, each kernel at each input density."""
    fused = sparse_decode_kernels()
    if fused is None:
        raise SystemExit("the fused kernel could not be built here (see the warning above): nothing to compare")
    rows, lines = [], ["| layer | active inputs | dense fp32 µs | dynamic int8 µs | gather fp32 (x dense) | gather int8 (x dense) "
                       "| fused fp32 (x dense) | fused int8 (x dense) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    generator = torch.Generator().manual_seed(0)
    for label, (fan_in, fan_out) in SHAPES.items():
        linears = [torch.nn.Linear(fan_in, fan_out, bias=False) for _ in range(COPIES)]
        int8 = [DynamicInt8Linear.from_linear(linear) for linear in linears]
        sparse = {w: [SparseInputLinear.from_linear(linear, 0.0, w) for linear in linears] for w in ("fp32", "int8")}
        for density in DENSITIES:
            x = torch.randn(1, fan_in, generator=generator)
            x = x * (torch.rand(1, fan_in, generator=generator) < density)
            # sparse_product: PyTorch's gather at every density (the fallback layer goes dense above DENSE_ABOVE)
            timings = _per_call({"dense_fp32": lambda x, k: F.linear(x, linears[k].weight), "dynamic_int8": lambda x, k: int8[k](x),
                                 "gather_fp32": lambda x, k: sparse["fp32"][k].sparse_product(x[0]),
                                 "gather_int8": lambda x, k: sparse["int8"][k].sparse_product(x[0]),
                                 "fused_fp32": lambda x, k: fused.sparse_input_f32(x[0], sparse["fp32"][k].weight_t, 0.0),
                                 "fused_int8": lambda x, k: fused.sparse_input_u8(x[0], sparse["int8"][k].weight_rows, 0.0)},
                                x, rounds)
            rows.append({"layer": label, "density": density, **timings})
            dense = timings["dense_fp32"]
            lines.append(f"| {label} | {density:.0%} | {dense:.0f} | {timings['dynamic_int8']:.0f} | "
                         + " | ".join(f"{timings[k]:.0f} ({dense / timings[k]:.2f}x)" for k in ("gather_fp32", "gather_int8", "fused_fp32", "fused_int8"))
                         + " |")
            print(lines[-1], flush=True)
    note = (f"One-row products (batch-1 decoding), {COPIES} weight copies cycled so weights come from memory; best of {rounds} "
            f"rounds (the kernels taking turns), {torch.get_num_threads()} thread(s). CPU: {cpu_model_name()}. x dense > 1 means "
            "faster than the dense fp32 product. gather: PyTorch's embedding_bag over the active rows; fused: tunelab's C++ kernel "
            "(threshold, gather and accumulate in one call, compress/sparse_kernels.py).")
    mlp_rows, mlp_lines = gated_mlp_kernels(rounds)
    _write("activation_sparsity_kernels", {"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "rows": rows, "gated_mlp": mlp_rows},
           note + "\n\nThe whole ReLU-fied MLP for one token (576→1536→576: gate, up, down), gates set so the stated fraction of "
           "channels is open; dense: three F.linear (or three dynamic-int8 layers); gated: SparseGatedMLP's kernel.", lines + [""] + mlp_lines)


def gated_mlp_kernels(rounds: int) -> tuple[list[dict], list[str]]:
    """Microseconds per one-token MLP, dense vs ``SparseGatedMLP`` (fp32 and int8 rows), at several open fractions."""
    fused = sparse_decode_kernels()
    hidden, intermediate = SHAPES["gate/up (576→1536)"]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, hidden, generator=generator)
    rows, lines = [], ["| MLP channels open | dense fp32 µs | dynamic int8 µs | gated fp32 (x dense) | gated int8 (x dense) |", "|---:|---:|---:|---:|---:|"]
    for open_fraction in (1.0, 0.5, 0.35, 0.2, 0.1):
        mlps = []
        for _ in range(COPIES):
            mlp = torch.nn.Module()
            mlp.gate_proj, mlp.up_proj = (torch.nn.Linear(hidden, intermediate, bias=False) for _ in range(2))
            mlp.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)
            with torch.no_grad():  # row c's sign makes channel c open (gate > 0) for the first open_fraction of channels
                gate = mlp.gate_proj.weight @ x[0]
                wanted = torch.where(torch.arange(intermediate) < open_fraction * intermediate, 1.0, -1.0)
                mlp.gate_proj.weight.mul_((gate.sign() * wanted)[:, None])
            mlps.append(mlp)
        int8 = [[DynamicInt8Linear.from_linear(getattr(m, p)) for p in ("gate_proj", "up_proj", "down_proj")] for m in mlps]
        gated = {w: [SparseGatedMLP.from_mlp(m, "relu", w) for m in mlps] for w in ("fp32", "int8")}
        timings = _per_call({
            "dense_fp32": lambda x, k: mlps[k].down_proj(F.relu(mlps[k].gate_proj(x)) * mlps[k].up_proj(x)),
            "dynamic_int8": lambda x, k: int8[k][2](F.relu(int8[k][0](x)) * int8[k][1](x)),
            "gated_fp32": lambda x, k: fused.relu_gated_mlp(x[0], gated["fp32"][k].gate_weight, gated["fp32"][k].up_weight, gated["fp32"][k].down_weight_t, False),
            "gated_int8": lambda x, k: fused.relu_gated_mlp_u8(x[0], gated["int8"][k].gate_rows, gated["int8"][k].up_rows, gated["int8"][k].down_rows_t, False),
        }, x, rounds)
        rows.append({"open": open_fraction, **timings})
        dense = timings["dense_fp32"]
        lines.append(f"| {open_fraction:.0%} | {dense:.0f} | {timings['dynamic_int8']:.0f} | "
                     + " | ".join(f"{timings[k]:.0f} ({dense / timings[k]:.2f}x)" for k in ("gated_fp32", "gated_int8")) + " |")
        print(lines[-1], flush=True)
    return rows, lines


@torch.no_grad()
def _per_call(kernels: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Best microseconds per call of each kernel over ``rounds`` rounds, the kernels taking turns."""
    best = dict.fromkeys(kernels, float("inf"))
    for fn in kernels.values():
        fn(x, 0)
    for _ in range(rounds):
        for name, fn in kernels.items():
            start = time.perf_counter()
            for k in range(COPIES):
                fn(x, k)
            best[name] = min(best[name], (time.perf_counter() - start) / COPIES * 1e6)
    return best


def models(runs: list[Path]) -> tuple[dict[str, torch.nn.Module], dict[str, dict], object]:
    """Every kept variant of every run, named ``<run>/<variant>`` (``<run>/<output>/<variant>`` for an
    output directory other than ``compress``), and its compress.json row."""
    loaded, rows, tokenizer = {}, {}, None
    for run in runs:
        table = json.loads((run / "compress.json").read_text())
        for row in table["rows"]:
            directory = run / "compressed" / row["variant"]
            if not directory.exists():
                raise SystemExit(f"{directory} is missing: compress the run with keep_models: true")
            name = f"{run.parent.name if run.name == 'compress' else f'{run.parent.name}/{run.name}'}/{row['variant']}"
            loaded[name], tokenizer, _ = load_compressed(directory)
            rows[name] = row
    return loaded, rows, tokenizer


def decode(runs: list[Path], rounds: int) -> None:
    variants, rows, tokenizer = models(runs)
    prompt = token_chunks(tokenizer, read_texts(ROOT / "examples" / "data" / "heldout" / "fortunes.txt"), 128, 1)
    speed_runs, best = interleaved_speed(variants, tokenizer, prompt, 32, rounds)
    reference = next(iter(best))
    base_ppl, base_acc = rows[reference]["perplexity"], rows[reference].get("task", {}).get("accuracy")
    lines = ["| model | inputs skipped (per step) | decode tok/s | vs dense | prefill tok/s | perplexity | task accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        sparsity = " + ".join(f"{s['activation_sparsity']:.0%}" for s in row["steps"] if "activation_sparsity" in s) or "-"
        accuracy = row.get("task", {}).get("accuracy")
        lines.append(
            f"| {name} | {sparsity} | {best[name]['decode_tokens_per_s']:.1f} | "
            f"{best[name]['decode_tokens_per_s'] / best[reference]['decode_tokens_per_s']:.2f}x | {best[name]['prefill_tokens_per_s']:.0f} | "
            f"{row['perplexity']:.2f} ({100 * (row['perplexity'] / base_ppl - 1):+.1f}%) | "
            + ("-" if accuracy is None else f"{accuracy:.3f} ({accuracy - base_acc:+.3f})" if base_acc is not None else f"{accuracy:.3f}") + " |")
    note = (f"SmolLM2-135M, batch 1, {torch.get_num_threads()} thread(s), 128-token prompt then 32 greedy tokens; all models in one "
            f"process taking turns for {rounds} rounds, best round shown; speed and deltas relative to {reference}. Perplexity "
            f"(held-out fortunes) and task accuracy from each run's compress.json. CPU: {cpu_model_name()}.")
    threads = torch.get_num_threads()
    _write("activation_sparsity" + ("" if threads == 1 else f"_{threads}threads"), {"cpu": cpu_model_name(), "threads": threads, "rounds": rounds,
                                   "runs": [str(r) for r in runs], "best": best, "speed_runs": speed_runs,
                                   "quality": {name: _quality(row) for name, row in rows.items()}}, note, lines)


def _quality(row: dict) -> dict:
    """What the table reads from a compress.json row (the rest stays in the run's own compress.json)."""
    return {"perplexity": row["perplexity"], "task": row.get("task", {}),
            "activation_sparsity": [s["activation_sparsity"] for s in row["steps"] if "activation_sparsity" in s]}


def _write(name: str, data: dict, note: str, lines: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(note + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="tunelab compress output directories (keep_models: true)")
    parser.add_argument("--kernels", action="store_true", help="time the one-row products alone")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        kernels(args.rounds)
    elif args.runs:
        decode(args.runs, args.rounds)
    else:
        parser.error("name compress run directories, or --kernels")


if __name__ == "__main__":
    main()
