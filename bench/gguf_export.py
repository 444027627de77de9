"""GGUF export of SmolLM2-135M (or a run): file size, quality kept, and llama.cpp's decode speed
against tunelab's own fp32 and dynamic-int8 decoding on the same prompts (~10 minutes).

    .venv/bin/python bench/gguf_export.py [--model smollm2-135m | RUN_DIR] [--threads 1] [--rounds 3]

For each of f16, q8_0, q4_1 and q4_0 the model is exported with ``tunelab export --gguf`` and then:
- read back by transformers' GGUF loader (dequantized to fp32): perplexity on held-out fortunes
  and greedy agreement with the source model (share of 32 greedy tokens identical, on 16 review
  prompts in the chat template), which isolates what the GGUF type costs;
- run by llama.cpp (``llama-cpp-python``, when installed): the same greedy agreement and batch-1
  prefill / decode tokens/s (128-token prompt, 32 new tokens), taking turns with tunelab's fp32 and
  dynamic-int8 (SmoothQuant α 0.8) models for ``--rounds`` rounds in one process at the same thread
  count; each one's best round is reported.
Writes bench/results/gguf_export.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "examples" / "data" / "heldout"
REVIEWS = ROOT / "examples" / "data" / "rt_cls_test.jsonl"
QUANTS = ("f16", "q8_0", "q4_1", "q4_0")
NEW_TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="alias, HF directory or run directory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    parser.add_argument("--texts", type=int, default=40, help="held-out fortunes scored for perplexity")
    parser.add_argument("--prompts", type=int, default=16, help="review prompts for greedy agreement")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "gguf"), help="where the GGUF files go")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.compress.calibration import read_texts, token_chunks
    from tunelab.compress.quantize import quantize
    from tunelab.evaluate.perplexity import perplexity
    from tunelab.export.gguf_file import export_gguf
    from tunelab.hardware import cpu_model_name
    from tunelab.methods.artifacts import merge_methods
    from tunelab.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    source, tokenizer = merge_methods(loaded.model).eval(), loaded.tokenizer
    texts = read_texts(HELDOUT / "fortunes.txt", args.texts)
    prompts = review_prompts(tokenizer, args.prompts)
    with torch.no_grad():
        reference = [source.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist() for ids in prompts]
    rows: dict[str, dict] = {"fp32 (tunelab)": {"perplexity": perplexity(source, tokenizer, texts, max_length=256)["perplexity"], "agreement": 1.0}}
    out = Path(args.out)
    files = {}
    for quant in QUANTS:
        report = export_gguf(args.model, out / f"model-{quant}.gguf", quant)
        files[quant] = Path(report["path"])
        back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=files[quant].name, dtype=torch.float32).eval()
        with torch.no_grad():
            greedy = [back.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist() for ids in prompts]
        rows[f"GGUF {quant} read back (fp32 compute)"] = {
            "bytes": report["bytes"], "export_seconds": report["seconds"], "tensor_types": report["tensor_types"],
            "perplexity": perplexity(back, tokenizer, texts, max_length=256)["perplexity"], "agreement": agreement(greedy, reference),
        }
        print(quant, rows[f"GGUF {quant} read back (fp32 compute)"], flush=True)
        del back

    chunks = token_chunks(tokenizer, read_texts(HELDOUT / "calibration.txt"), 256, 16)
    int8 = quantize(copy.deepcopy(source), "dynamic-int8", chunks=chunks, smooth=0.8)[0].eval()
    speed_prompt = token_chunks(tokenizer, texts, 128, 1)
    players = {"fp32 (tunelab)": torch_player(source, tokenizer, speed_prompt), "dynamic int8 (tunelab)": torch_player(int8, tokenizer, speed_prompt)}
    with torch.no_grad():
        int8_greedy = [int8.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist() for ids in prompts]
    rows["dynamic int8 (tunelab)"] = {"perplexity": perplexity(int8, tokenizer, texts, max_length=256)["perplexity"], "agreement": agreement(int8_greedy, reference)}
    llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if llama_cpp:
        from llama_cpp import Llama

        for quant, path in files.items():
            llm = Llama(model_path=str(path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            name = f"llama.cpp {quant}"
            rows[name] = {"agreement": agreement([llama_greedy(llm, ids[0].tolist()) for ids in prompts], reference)}
            players[name] = llama_player(llm, speed_prompt[0].tolist())
    runs = {name: [] for name in players}
    for _ in range(args.rounds):
        for name, play in players.items():
            runs[name].append(play())
    for name, measured in runs.items():
        rows[name].update({key: max(r[key] for r in measured) for key in measured[0]})

    write_results(rows, args, cpu_model_name(), llama_cpp)


def review_prompts(tokenizer, count: int) -> list:
    rows = [json.loads(line) for line in REVIEWS.read_text().splitlines()[:count]]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Review: {row['text']}\nIs this review positive or negative? Explain briefly."}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        for row in rows
    ]


def agreement(greedy: list[list[int]], reference: list[list[int]]) -> float:
    """Share of greedy tokens equal to the source model's, counted up to the first difference
    (after a difference the two continuations are answers to different texts)."""
    same = 0
    for got, want in zip(greedy, reference):
        for a, b in zip(got, want):
            if a != b:
                break
            same += 1
    return same / sum(len(w) for w in reference)


def torch_player(model, tokenizer, prompt):
    from tunelab.compress.measure import measure_speed

    return lambda: measure_speed(model, tokenizer, prompt, NEW_TOKENS, 1)


def llama_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos() or len(out) == NEW_TOKENS:
            break
        out.append(token)
    return out


def llama_player(llm, ids: list[int]):
    def play() -> dict[str, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill = len(ids) / (time.perf_counter() - start)
        llm.reset()
        times = []
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) == NEW_TOKENS:
                break
        return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0])}

    return play


def write_results(rows: dict[str, dict], args, cpu: str, llama_cpp: bool) -> None:
    fp32 = rows["fp32 (tunelab)"]
    lines = ["| model | file MiB | perplexity | greedy agreement | prefill tok/s | decode tok/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        size = f"{row['bytes'] / 2**20:.0f}" if "bytes" in row else ""
        ppl = f"{row['perplexity']:.2f} ({100 * (row['perplexity'] / fp32['perplexity'] - 1):+.1f}%)" if "perplexity" in row else ""
        speed = ""
        if "decode_tokens_per_s" in row:
            speed = (f" {row['prefill_tokens_per_s']:.0f} ({row['prefill_tokens_per_s'] / fp32['prefill_tokens_per_s']:.2f}x) |"
                     f" {row['decode_tokens_per_s']:.1f} ({row['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}x) |")
        else:
            speed = " | |"
        lines.append(f"| {name} | {size} | {ppl} | {row['agreement']:.2f} |{speed}")
    note = "" if llama_cpp else " llama-cpp-python was not installed, so llama.cpp rows are missing."
    table = "\n".join(lines) + (
        f"\n\n{args.model} on {cpu}, {args.threads} thread(s). Perplexity: first {args.texts} held-out fortunes, 256-token "
        f"windows. Greedy agreement: share of {NEW_TOKENS} greedy tokens equal to the fp32 model's up to the first difference, "
        f"{args.prompts} review prompts. Speed: batch 1, 128-token prompt then {NEW_TOKENS} greedy tokens, {args.rounds} "
        f"interleaved rounds, best round; ratios against tunelab fp32.{note}\n"
    )
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "gguf_export.md").write_text(table)
    (results / "gguf_export.json").write_text(json.dumps({"model": args.model, "cpu": cpu, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
