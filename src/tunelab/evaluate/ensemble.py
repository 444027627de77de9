"""Ensembles at inference: several fine-tuned runs as one system, one more row in the eval table.

The members' own evaluation records already hold what an ensemble needs per item (the options'
log-likelihoods for choice, the class logits for a classification head, the extracted answer for
generation), so the ensemble costs no extra model pass: its time is the sum of its members'.

- ``logits``: average the members' scores (class logits, or option log-likelihoods: a geometric
  mean of the options' probabilities) and take the arg-max;
- ``probs``: average the members' probabilities over the options / classes (softmax of each);
- ``vote``: majority of the members' predictions; a tie goes to the tied answer with the highest
  average probability (for generation, which has none, to the earliest member's answer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from tunelab.errors import UserError
from tunelab.evaluate.config import EvalConfig
from tunelab.evaluate.metrics import score
from tunelab.evaluate.runner import SystemResult


def _answer_scores(record: dict[str, Any]) -> dict[str, float]:
    """One member's score (logit / log-likelihood) for each answer of an item, by answer: members
    whose heads order their labels differently still line up."""
    return dict(record["class_logits"]) if "class_logits" in record else dict(zip(record["options"], record["logprobs"]))


def _combine_item(records: Sequence[dict[str, Any]], how: str) -> str:
    answers = list(_answer_scores(records[0]))
    stacked = torch.tensor([[_answer_scores(r)[a] for a in answers] for r in records], dtype=torch.float64)
    probs = stacked.softmax(-1).mean(0)
    if how == "logits":
        return answers[int(stacked.mean(0).argmax())]
    if how == "probs":
        return answers[int(probs.argmax())]
    votes = Counter(r["prediction"] for r in records)
    top = max(votes.values())
    tied = [a for a in answers if votes.get(a) == top]
    return max(tied, key=lambda a: float(probs[answers.index(a)]))


def _vote_text(records: Sequence[dict[str, Any]]) -> str:
    votes = Counter(r["prediction"] for r in records)
    top = max(votes.values())
    return next(r["prediction"] for r in records if votes[r["prediction"]] == top)


def _references(record: dict[str, Any]) -> list[str]:
    return [record["answer"]] if "answer" in record else list(record["references"])


def check_ensemble(cfg: EvalConfig, runs: int) -> None:
    """Refuse an ensemble that cannot be built, before any model loads."""
    if runs < 2:
        raise UserError(f"an ensemble needs at least two runs, got {runs}", where="--ensemble", hint="pass --run once per member")
    if cfg.task == "perplexity":
        raise UserError("perplexity runs cannot be ensembled here", where="--ensemble", hint="ensemble a choice, classification or generation task")
    if cfg.task == "generation" and cfg.ensemble != "vote":
        raise UserError(f"generated answers carry no scores to average ({cfg.ensemble})", where="--ensemble", hint="use --ensemble vote for generation")


def ensemble(members: Sequence[SystemResult], how: str, cfg: EvalConfig) -> SystemResult:
    """One row combining ``members`` (evaluated on the same items) by ``how`` (logits, probs or vote)."""
    check_ensemble(cfg.model_copy(update={"ensemble": how}), len(members))
    per_item = list(zip(*(m.records for m in members)))
    if cfg.task == "generation":
        predictions = [_vote_text(item) for item in per_item]
    else:
        predictions = [_combine_item(item, how) for item in per_item]
    refs = [_references(item[0]) for item in per_item]
    records = [
        {"where": item[0]["where"], "prediction": p, "references": r, "members": [m["prediction"] for m in item]}
        for item, p, r in zip(per_item, predictions, refs)
    ]
    return SystemResult(
        system=f"ensemble ({how}) of {len(members)} runs", model=" + ".join(m.model for m in members), source="ensemble",
        shots=0, examples=len(records), seconds=sum(m.seconds for m in members),
        scores=score(cfg.metric_names(), predictions, refs), records=records,
    )
