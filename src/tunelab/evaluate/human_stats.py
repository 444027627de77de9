"""``tunelab human import``: win rates with 95% intervals and inter-rater agreement.

Ratings files (JSON or CSV, as the review page downloads them) are unblinded with the page's key
file. Each rating picks the best output or a tie; a system's win rate is the share of ratings
that picked it, with a Wilson score interval (sound at small n and near 0 or 1, unlike the
normal approximation). When several raters rated the same items, agreement is Cohen's kappa for
two raters and Fleiss' kappa for any number, over the categories "system picked" and "tie".
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from tunelab.errors import UserError

Z95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class Rating:
    """One rater's verdict on one item, already mapped from letters to system names."""

    rater: str
    item: int
    choice: str  # a system name or "tie"
    scores: dict[str, int] = field(default_factory=dict)  # system name -> 1..5


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels on the same items."""
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_a, count_b = Counter(first), Counter(second)
    expected = sum(count_a[c] * count_b[c] for c in set(first) | set(second)) / (n * n)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from a subjects x categories table of rater counts (same raters per subject)."""
    n_subjects = len(table)
    raters = sum(table[0])
    if raters < 2 or any(sum(row) != raters for row in table):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings for every item")
    totals = [sum(row[j] for row in table) for j in range(len(table[0]))]
    p_j = [t / (n_subjects * raters) for t in totals]
    p_i = [(sum(c * c for c in row) - raters) / (raters * (raters - 1)) for row in table]
    p_bar, p_e = sum(p_i) / n_subjects, sum(p * p for p in p_j)
    return 1.0 if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def read_ratings(paths: Sequence[str | Path], key: dict[str, Any]) -> list[Rating]:
    """Every rating in ``paths``, unblinded with ``key`` (from ``<page>.key.json``)."""
    orders = {entry["id"]: entry["order"] for entry in key["items"]}
    ratings = []
    for path in map(Path, paths):
        for page, rater, item, choice, scores in _raw_ratings(path):
            where = f"{path}: item {item}"
            if page != key["page"]:
                raise UserError(f"ratings are for page {page}, but the key is for page {key['page']}", where=str(path), hint="pass the key file exported with that page")
            if item not in orders:
                raise UserError("unknown item", where=where)
            order = orders[item]
            letters = {chr(ord("A") + i): system for i, system in enumerate(order)}
            if choice != "tie" and choice not in letters:
                raise UserError(f"choice {choice!r} is not one of {', '.join(letters)} or tie", where=where)
            if any(letter not in letters or not 1 <= value <= 5 for letter, value in scores.items()):
                raise UserError("scores must be 1-5 for letters shown on the page", where=where)
            ratings.append(Rating(rater, item, letters.get(choice, "tie"), {letters[k]: v for k, v in scores.items()}))
    if not ratings:
        raise UserError("no ratings in the given files", hint="rate some items and download the ratings again")
    return ratings


def _raw_ratings(path: Path) -> list[tuple[str, str, int, str, dict[str, int]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read ratings ({exc.__class__.__name__})", where=str(path)) from None
    try:
        if path.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            return [
                (r["page"], r["rater"], int(r["item"]), r["choice"],
                 {k.removeprefix("score_"): int(v) for k, v in r.items() if k.startswith("score_") and v})
                for r in rows
            ]
        data = json.loads(text)
        return [(data["page"], data["rater"], int(r["item"]), r["choice"], {k: int(v) for k, v in r.get("scores", {}).items()}) for r in data["ratings"]]
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"not a ratings file from the review page ({exc.__class__.__name__}: {exc})", where=str(path)) from None


def summarize(ratings: Sequence[Rating], systems: Sequence[str]) -> dict[str, Any]:
    """Win rates (with 95% Wilson intervals), mean 1-5 scores, tie rate and rater agreement."""
    n = len(ratings)
    picks = Counter(r.choice for r in ratings)
    result: dict[str, Any] = {"ratings": n, "raters": sorted({r.rater for r in ratings}), "tie_rate": picks["tie"] / n, "systems": {}}
    for system in systems:
        low, high = wilson_interval(picks[system], n)
        scores = [r.scores[system] for r in ratings if system in r.scores]
        result["systems"][system] = {
            "wins": picks[system], "win_rate": picks[system] / n, "ci95": [low, high],
            "mean_score": sum(scores) / len(scores) if scores else None, "scored": len(scores),
        }
    result["agreement"] = agreement(ratings, [*systems, "tie"])
    return result


def agreement(ratings: Sequence[Rating], categories: Sequence[str]) -> dict[str, Any]:
    """Kappas over the items every rater rated (none when fewer than two raters overlap)."""
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    for r in ratings:
        by_item[r.item][r.rater] = r.choice
    raters = sorted({r.rater for r in ratings})
    shared = sorted(item for item, votes in by_item.items() if len(votes) == len(raters))
    if len(raters) < 2 or not shared:
        return {"items": 0, "note": "agreement needs 2+ raters on the same items"}
    out: dict[str, Any] = {"items": len(shared), "raters": len(raters)}
    table = [[list(by_item[item].values()).count(c) for c in categories] for item in shared]
    out["fleiss_kappa"] = fleiss_kappa(table)
    if len(raters) == 2:
        out["cohen_kappa"] = cohen_kappa([by_item[i][raters[0]] for i in shared], [by_item[i][raters[1]] for i in shared])
    return out
