"""``tunelab merge`` as one call: read the runs, combine them, write a run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunelab import atomic, rundir
from tunelab.errors import UserError
from tunelab.merge.members import read_members
from tunelab.merge.mergers import merger_for
from tunelab.merge.soup import greedy_soup
from tunelab.merge.spec import MergeSpec

MERGE_REPORT = "merge.json"


def run_merge(paths: list[str], spec: MergeSpec, out: Path, setup: Any = None, echo: Any = print) -> dict[str, Any]:
    """Merge the runs at ``paths`` as ``spec`` says into the run directory ``out``; a greedy soup
    scores candidates with ``setup`` (an ``evaluate.runner.EvalSetup``). Returns merge.json's content."""
    start = time.perf_counter()
    spec.check(len(paths))
    if spec.method == "greedy" and setup is None:
        raise UserError("a greedy soup needs held-out data to score candidates", where="--method greedy",
                        hint="pass --data FILE (a validation set, not your test set) and its --task options, or --recipe")
    if rundir.holds_a_run(out):
        raise UserError("the output directory already holds a run", where=str(out), hint="choose a new --out folder")
    members = read_members(paths)
    echo(f"merge: loading {len(members)} {members[0].kind} runs of {members[0].manifest['base']} ...")
    merger = merger_for(members)
    trace: list[dict[str, Any]] = []
    if spec.method == "greedy":
        from tunelab.evaluate.items import read_items

        items = read_items(setup.data, setup.cfg.max_examples)  # once: every candidate soup is scored on them
        chosen, trace = greedy_soup(len(members), lambda idx: _score(merger, idx, spec, setup, items, echo))
        weights = [spec.scale / len(chosen)] * len(chosen)
    else:
        chosen, weights = list(range(len(members))), spec.member_weights(len(members))
    merger.build(chosen, weights, spec)
    manifest = {**members[0].manifest}
    with rundir.writing_final(out, manifest) as tmp:
        files, method = merger.save(tmp)
        merger.tokenizer.save_pretrained(tmp)
        manifest.update(files=files, method=method, merged_from=[str(m.path) for m in members])
    report = {
        "method": spec.method, "members": [str(m.path) for m in members], "kind": members[0].kind, "base": members[0].manifest["base"],
        "chosen": [str(members[i].path) for i in chosen], "weights": weights, "scale": spec.scale, "density": spec.density,
        "majority_sign": spec.majority_sign, "rank": spec.rank, "seed": spec.seed, "greedy_trace": trace,
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic.write_json(out / MERGE_REPORT, report)
    return report


def _score(merger: Any, indices: list[int], spec: MergeSpec, setup: Any, items: list[Any], echo: Any) -> float:
    """The held-out score of the uniform soup of ``indices`` (the task's first metric; lower is
    better only for perplexity)."""
    from tunelab.evaluate.runner import evaluate_loaded

    model = merger.build(indices, [1 / len(indices)] * len(indices), spec)
    output = evaluate_loaded(setup, items, model, merger.tokenizer)
    key = "perplexity" if setup.cfg.task == "perplexity" else next(iter(output.scores))
    value = output.scores[key]
    echo(f"  soup of members {indices}: {key} {value:.4f}")
    return -value if key == "perplexity" else value
