"""Load test of ``tunelab serve`` (loopback only, bounded): concurrent chat clients while jobs train,
and the same chat load answered the naive way, one ``transformers`` pipeline per request.

    .venv/bin/python bench/serve_load.py                         # SmolLM2-135M, 20 clients x 2 requests, 3 jobs
    .venv/bin/python bench/serve_load.py --model tiny-llama --requests 1 --jobs 1   # smoke test

tunelab side: one server in this process on 127.0.0.1; ``--clients`` threads each send
``--requests`` chat completions (greedy, ``--max-tokens`` new tokens, a Rotten Tomatoes review
prompt) with the real ``openai`` client, while ``--jobs`` fine-tuning jobs (``--job-steps`` LoRA
steps each on the review data) are submitted at the same moment and must all succeed. Naive side:
the same clients and prompts, each request building ``transformers.pipeline("text-generation")``
from the model's directory and generating with it, which is what serving fine-tuned models looks
like without a server that keeps them loaded. The naive side trains nothing, so tunelab also runs
the chat load alone ("tunelab, chat only"): that row is the like-for-like comparison. Each side
runs in its own process. Reported per
side: errors, p50/p95 latency, requests/s, completion tokens/s, the serving process's peak RSS
(the jobs' training processes not included); results in ``bench/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.serve_helpers: the same in-process server the tests start

REVIEWS = ROOT / "examples" / "data" / "rt_sentiment_test.jsonl"
#: The naive side has no jobs to train, so tunelab runs twice: with the jobs and with chat only.
SIDES = ("tunelab", "tunelab, chat only", "naive")
TRAIN = ROOT / "examples" / "data" / "rt_sentiment_train.jsonl"


def prompts(n: int) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for line in REVIEWS.read_text().splitlines()]
    return [rows[i % len(rows)]["messages"][:-1] for i in range(n)]


def hammer(clients: int, requests: int, ask: Callable[[list[dict[str, str]]], int]) -> dict[str, Any]:
    """``clients`` threads x ``requests`` calls of ``ask(messages) -> completion tokens``."""
    latencies: list[float] = []
    tokens, errors = [0], []
    lock = threading.Lock()
    work = prompts(clients * requests)

    def client(index: int) -> None:
        for r in range(requests):
            started = time.perf_counter()
            try:
                produced = ask(work[index * requests + r])
            except Exception as exc:  # counted, not raised: the load test reports errors
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += produced

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": clients * requests, "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
        "p50_s": statistics.median(ordered) if ordered else None,
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None,
        "requests_per_s": len(ordered) / wall, "completion_tokens_per_s": tokens[0] / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def tunelab_side(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    from openai import OpenAI

    from tests.serve_helpers import running_server, wait_for

    defaults = {"train": {"max_steps": args.job_steps, "batch_size": 4, "save_every": None}}
    with running_server(data_dir, job_defaults=defaults) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        client.chat.completions.create(model=args.model, messages=prompts(1)[0], max_tokens=1)  # load the model once

        def ask(messages: list[dict[str, str]]) -> int:
            reply = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens, temperature=0)
            return reply.usage.completion_tokens

        upload = client.files.create(file=TRAIN.open("rb"), purpose="fine-tune")
        jobs = [client.fine_tuning.jobs.create(model=args.model, training_file=upload.id, suffix=f"load{i}").id for i in range(args.jobs)]
        result = hammer(args.clients, args.requests, ask)
        finished = [wait_for(client, job, timeout=3600) for job in jobs]
        result["jobs"] = {"submitted": len(jobs), "succeeded": sum(j.status == "succeeded" for j in finished),
                          "statuses": [j.status for j in finished]}
    return result


def naive_side(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import pipeline

    from tunelab.models import load_model

    directory = load_model(args.model, "causal-lm").details.get("directory")
    if directory is None:  # a tiny model has no directory: save it once
        loaded = load_model(args.model, "causal-lm")
        directory = tempfile.mkdtemp(prefix="serve-load-")
        loaded.model.save_pretrained(directory)
        loaded.tokenizer.save_pretrained(directory)

    def ask(messages: list[dict[str, str]]) -> int:
        generator = pipeline("text-generation", model=directory, device="cpu")
        out = generator(messages, max_new_tokens=args.max_tokens, do_sample=False)
        reply = out[0]["generated_text"][-1]["content"]
        return len(generator.tokenizer(reply, add_special_tokens=False)["input_ids"])

    return hammer(args.clients, args.requests, ask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2, help="chat requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=3, help="fine-tuning jobs submitted during the chat load")
    parser.add_argument("--job-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_load.json")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, JSON on stdout
    args = parser.parse_args()

    if args.side in ("tunelab", "tunelab, chat only"):
        if args.side == "tunelab, chat only":
            args.jobs = 0
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(tunelab_side(args, Path(tmp))))
        return
    if args.side == "naive":
        print(json.dumps(naive_side(args)))
        return

    import torch

    from tunelab.hardware import cpu_model_name

    sides = {}
    for side in SIDES:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{side} side failed:\n{done.stderr[-3000:]}")
        sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    tunelab, naive = sides["tunelab"], sides["naive"]
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "cpu": cpu_model_name(),
              "threads": torch.get_num_threads(), **sides}
    print(f"{'side':<20} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'req/s':>7} {'tok/s':>7} {'RSS MB':>7}")
    for name, side in sides.items():
        print(f"{name:<20} {side['errors']:>6} {side['p50_s']:>7.2f} {side['p95_s']:>7.2f} {side['requests_per_s']:>7.2f} "
              f"{side['completion_tokens_per_s']:>7.1f} {side['peak_rss_mb']:>7.0f}")
    print(f"jobs: {tunelab['jobs']['succeeded']}/{tunelab['jobs']['submitted']} succeeded during the chat load")
    chat_only = sides["tunelab, chat only"]
    print(f"speedup={chat_only['requests_per_s'] / naive['requests_per_s']:.2f} (chat only; {tunelab['requests_per_s'] / naive['requests_per_s']:.2f} "
          f"with the jobs training) mem_ratio={chat_only['peak_rss_mb'] / naive['peak_rss_mb']:.2f} p95_ratio={chat_only['p95_s'] / naive['p95_s']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
