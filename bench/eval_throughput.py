"""Multiple-choice scoring speed: tunelab vs the naive loop vs lm-evaluation-harness, one run.

    .venv/bin/python bench/eval_throughput.py                   # SmolLM2-135M, both sets, lm-eval too
    .venv/bin/python bench/eval_throughput.py --limit 40 --no-lm-eval

Same model (the packaged SmolLM2-135M-Instruct, fp32), same items, same chat prompt, same batch
size and thread count on every side:
- tunelab: ``evaluate_loaded`` (each prompt runs once; its key/value cache scores every option);
- naive: one left-padded row per (prompt, option), the whole prompt every time, the last
  len(option) positions scored -- what scoring looks like without prompt sharing;
- lm-eval: lm-evaluation-harness 0.4.13 (``HFLM``, ``simple_evaluate`` with the chat template) in
  its own virtual environment (``--lm-eval-python``; made by ``--setup-lm-eval``), on the model
  tunelab loaded, saved as a Hugging Face directory, through a local task YAML over the same JSONL.
Sets: Reuters topics (examples/data/reuters: 4 label options of 1-2 tokens, and all 8 R8 topics),
and WordNet definitions (examples/data/wordnet, 2 options of ~10 tokens: which definition fits the
words). Prompt sharing saves at most a factor of the option count (the prompt is the bulk of the
tokens): the sets show how the gain grows from 2 to 8 options.
Seconds count scoring only: model loading and one warm-up batch are excluded on every
side. The script checks that the three sides pick the same options (accuracy equal; tunelab vs
naive log-likelihoods within 1e-4) and writes bench/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
LM_EVAL_VENV = ROOT / "bench-results" / "lmeval-venv"
TOPICS = ["earnings", "acquisition", "oil", "trade"]
TOPICS8 = [*TOPICS, "currency", "interest", "shipping", "grain"]


def _topic_spec(name: str, data: str, topics: list[str], limit: int) -> dict[str, Any]:
    prompt = f"Article: {{text}}\nIs this article about {', '.join(topics[:-1])} or {topics[-1]}?"
    return {"name": name, "data": str(ROOT / data),
            "eval": {"task": "choice", "choices": topics, "answer_field": "label", "prompt_template": prompt, "max_examples": limit},
            "lm_eval": {"doc_to_text": prompt.replace("{text}", "{{text}}"), "doc_to_choice": topics,
                        "doc_to_target": "{{" + repr(topics) + ".index(label)}}"}}


def topic_set(limit: int, _: Path) -> dict[str, Any]:
    return _topic_spec("reuters topics (4 options)", "examples/data/reuters/reuters_topic_test.jsonl", TOPICS, limit)


def topic8_set(limit: int, _: Path) -> dict[str, Any]:
    return _topic_spec("reuters topics (8 options)", "examples/data/reuters/reuters8_topic_test.jsonl", TOPICS8, limit)


def definition_set(limit: int, work: Path) -> dict[str, Any]:
    """WordNet pairs as 2-option items; which side holds the right definition is drawn with seed 0."""
    rng = random.Random(0)
    rows = []
    for line in (ROOT / "examples/data/wordnet/wordnet_pairs_test.jsonl").read_text().splitlines()[:limit]:
        pair = json.loads(line)
        answer = rng.randrange(2)
        options = [pair["negative"], pair["positive"]] if answer else [pair["positive"], pair["negative"]]
        rows.append({"words": pair["anchor"], "options": options, "answer": answer})
    path = work / "definitions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt = "Which definition fits these words: {words}?"
    return {"name": "wordnet definitions (2 long options)", "data": str(path),
            "eval": {"task": "choice", "choices_field": "options", "answer_field": "answer", "prompt_template": prompt},
            "lm_eval": {"doc_to_text": prompt.replace("{words}", "{{words}}"), "doc_to_choice": "{{options}}",
                        "doc_to_target": "{{answer}}"}}


def naive_scores(model: torch.nn.Module, tokenizer: Any, requests: list[tuple[str, str]], batch_size: int) -> list[float]:
    """One row per option with its whole prompt, left-padded, the option's positions scored."""
    from tunelab.evaluate.likelihood import split_tokens

    split = [split_tokens(tokenizer, ctx, cont, False) for ctx, cont in requests]
    pad = tokenizer.pad_token_id or 0
    totals = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            chunk = split[start : start + batch_size]
            seqs = [head + tail for head, tail in chunk]
            width, keep = max(map(len, seqs)), max(len(tail) for _, tail in chunk) + 1
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits.float(), -1)
            for row, (_, tail) in enumerate(chunk):
                # Position -1-len(tail)+j predicts tail[j]; the last position predicts nothing.
                totals.append(sum(logprobs[row, -1 - len(tail) + j, t].item() for j, t in enumerate(tail)))
    return totals


def run_tunelab_and_naive(spec: dict[str, Any], loaded: Any, batch_size: int) -> dict[str, Any]:
    from tunelab.evaluate import items as item_fields
    from tunelab.evaluate.items import read_items
    from tunelab.evaluate.runner import evaluate_loaded, prompt_builder
    from tunelab.evaluate.setup import resolve_setup

    setup = resolve_setup(None, {**spec["eval"], "data": spec["data"], "batch_size": batch_size, "metrics": ["accuracy"]})
    items = read_items(setup.data, setup.cfg.max_examples)
    evaluate_loaded(setup, items[:batch_size], loaded.model, loaded.tokenizer)  # warm-up
    output = evaluate_loaded(setup, items, loaded.model, loaded.tokenizer)
    builder = prompt_builder(setup, loaded.tokenizer)
    cfg = setup.cfg
    requests, gold, sizes = [], [], []
    for row in items:
        opts = item_fields.options(row, cfg.choices, cfg.choices_field)
        gold.append(item_fields.correct_option(row, opts, cfg.answer_field))
        sizes.append(len(opts))
        requests += [(builder.context(row), builder.continuation(o)) for o in opts]
    start = time.perf_counter()
    naive = naive_scores(loaded.model, loaded.tokenizer, requests, batch_size)
    naive_seconds = time.perf_counter() - start
    picks, offset = [], 0
    for size in sizes:
        item = naive[offset : offset + size]
        picks.append(max(range(size), key=item.__getitem__))
        offset += size
    ours = [lp for record in output.records for lp in record["logprobs"]]
    return {"items": len(items), "options": len(requests),
            "tunelab": {"seconds": output.seconds, "accuracy": output.scores["accuracy"]},
            "naive": {"seconds": naive_seconds, "accuracy": sum(p == g for p, g in zip(picks, gold)) / len(gold)},
            "max_logprob_diff": max(abs(a - b) for a, b in zip(ours, naive))}


def run_lm_eval(spec: dict[str, Any], model_dir: Path, work: Path, limit: int, batch_size: int, threads: int, python: str) -> dict[str, Any]:
    task = {"task": "tunelab_bench", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": spec["data"]}},
            "test_split": "test", "output_type": "multiple_choice", "target_delimiter": "",
            "metric_list": [{"metric": "acc"}], **spec["lm_eval"]}
    tasks = work / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "tunelab_bench.yaml").write_text(json.dumps(task))  # JSON is YAML
    out = work / "lm_eval_result.json"
    driver = (
        "import json, sys, time, torch\n"
        "from lm_eval import simple_evaluate\nfrom lm_eval.models.huggingface import HFLM\nfrom lm_eval.tasks import TaskManager\n"
        "model_dir, tasks, limit, batch, threads, out = sys.argv[1:]\n"
        "torch.set_num_threads(int(threads))\n"
        "lm = HFLM(pretrained=model_dir, dtype='float32', batch_size=int(batch), device='cpu')\n"
        "def run(n):\n"
        "    return simple_evaluate(model=lm, tasks=['tunelab_bench'], task_manager=TaskManager(include_path=tasks),\n"
        "                           limit=n, apply_chat_template=True)\n"
        "run(min(int(batch), int(limit)))  # warm-up, as on the other sides\n"
        "start = time.perf_counter()\n"
        "res = run(int(limit))\n"
        "seconds = time.perf_counter() - start\n"
        "json.dump({'seconds': seconds, 'accuracy': res['results']['tunelab_bench']['acc,none']}, open(out, 'w'))\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([python, "-c", driver, str(model_dir), str(tasks), str(limit), str(batch_size), str(threads), str(out)],
                   check=True, env=env)
    return json.loads(out.read_text())


def setup_lm_eval() -> str:
    """A separate venv, so lm-eval's pins never touch tunelab's (see ../shared/FACTS.md)."""
    if not (LM_EVAL_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LM_EVAL_VENV)], check=True)
        subprocess.run([str(LM_EVAL_VENV / "bin" / "pip"), "install", "-q", f"torch=={torch.__version__.split('+')[0]}",
                        "transformers==5.24.0", "lm-eval[hf]==0.4.13"], check=True)
    return str(LM_EVAL_VENV / "bin" / "python")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=160, help="items per set")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-lm-eval", action="store_true")
    parser.add_argument("--setup-lm-eval", action="store_true", help=f"create {LM_EVAL_VENV} if missing")
    parser.add_argument("--lm-eval-python", default=str(LM_EVAL_VENV / "bin" / "python"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_throughput.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from tunelab.hardware import cpu_model_name
    from tunelab.models import load_model

    python = setup_lm_eval() if args.setup_lm_eval else args.lm_eval_python
    use_lm_eval = not args.no_lm_eval and Path(python).exists()
    if not args.no_lm_eval and not use_lm_eval:
        print(f"lm-eval: {python} not found; rerun with --setup-lm-eval (or --no-lm-eval)")
    loaded = load_model("smollm2-135m")
    report: dict[str, Any] = {"cpu": cpu_model_name(), "threads": args.threads, "batch_size": args.batch_size, "sets": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if use_lm_eval:
            loaded.model.save_pretrained(work / "model")
            loaded.tokenizer.save_pretrained(work / "model")
        for make in (topic_set, topic8_set, definition_set):
            spec = make(args.limit, work)
            row = {"set": spec["name"], **run_tunelab_and_naive(spec, loaded, args.batch_size)}
            if use_lm_eval:
                row["lm-eval"] = run_lm_eval(spec, work / "model", work, row["items"], args.batch_size, args.threads, python)
            report["sets"].append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nCPU: {report['cpu']}, {args.threads} thread(s), batch {args.batch_size}")
    print("| set | items | side | items/s | accuracy | tunelab speedup |\n|---|---|---|---|---|---|")
    for row in report["sets"]:
        ours = row["tunelab"]["seconds"]
        for side in ("tunelab", "naive", "lm-eval"):
            if side in row:
                r = row[side]
                print(f"| {row['set']} | {row['items']} | {side} | {row['items'] / r['seconds']:.2f} | {r['accuracy']:.3f} | "
                      f"{r['seconds'] / ours:.2f}x |")
    for row in report["sets"]:
        accs = {row[s]["accuracy"] for s in ("tunelab", "naive", "lm-eval") if s in row}
        verdict = "same accuracy on every side" if len(accs) == 1 else f"ACCURACY DIFFERS: {sorted(accs)}"
        print(f"{row['set']}: {verdict}; tunelab vs naive log-likelihoods within {row['max_logprob_diff']:.1e}")


if __name__ == "__main__":
    main()
