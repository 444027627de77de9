"""One side of the benchmark in a process of its own: ``python -m tunelab.bench.worker SIDE WORKLOAD OUT``.

A fresh process per side keeps the resident-memory high-water marks apart (one process's peak
would otherwise include the other's model and activations) and gives each side a cold start.
With ``--profile-steps N`` it runs N+1 steps under ``torch.profiler`` (the first step's warm-up
excluded) and reports the top operators instead of timings.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from tunelab import atomic
from tunelab.bench.measure import peak_device_mb, peak_rss_mb
from tunelab.bench.sides import SIDES
from tunelab.bench.workload import Workload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("side", choices=sorted(SIDES))
    parser.add_argument("workload", help="Workload as JSON")
    parser.add_argument("out", type=Path)
    parser.add_argument("--profile-steps", type=int, default=0)
    args = parser.parse_args(argv)
    workload = Workload.from_json(args.workload)
    run = SIDES[args.side]
    with tempfile.TemporaryDirectory(prefix=f"tunelab-bench-{args.side}-") as tmp:
        if args.profile_steps:
            from dataclasses import replace

            schedule = torch.profiler.schedule(wait=0, warmup=1, active=args.profile_steps, repeat=1)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule) as prof:
                run(replace(workload, steps=args.profile_steps + 1), Path(tmp), prof)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
            result = {"profile": table}
        else:
            result = run(workload, Path(tmp))
    # the sides report their peaks as training ends; these include the shared parity evaluation
    result["peak_rss_mb_with_parity_eval"] = peak_rss_mb()
    result["peak_device_mb_with_parity_eval"] = peak_device_mb(workload.device)
    atomic.write_json(args.out, result)


if __name__ == "__main__":
    main()
