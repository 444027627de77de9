"""Human review: the exported page works in a real headless browser, and import computes the stats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.browser import CHROMIUM, PipeBrowser
from tunelab.cli import cli
from tunelab.errors import UserError
from tunelab.evaluate.human_export import export_review, key_path
from tunelab.evaluate.human_stats import (
    Rating,
    agreement,
    cohen_kappa,
    fleiss_kappa,
    wilson_interval,
)

PROMPTS = ["Say hi", "Name a colour", "Count to three", "Give a <b>bold</b> </script> answer"]


@pytest.fixture
def page(tmp_path):
    files = []
    for system, outputs in {"base": ["hello", "red", "1 2", "no"], "tuned": ["Hi there!", "Blue.", "1, 2, 3", "<b>yes</b>"]}.items():
        path = tmp_path / f"predictions-{system}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "output": o}) + "\n" for p, o in zip(PROMPTS, outputs)))
        files.append(path)
    return export_review(files, tmp_path / "review.html", seed=3)


def test_page_is_blinded_and_self_contained(page):
    html = page.read_text()
    key = json.loads(key_path(page).read_text())
    assert "tuned" not in html and "base" not in html  # system names only in the key
    assert "http://" not in html and "https://" not in html and "src=" not in html  # nothing fetched
    assert "</script> answer" not in html  # output text cannot close the data element
    orders = [entry["order"] for entry in key["items"]]
    assert {tuple(o) for o in orders} == {("base", "tuned"), ("tuned", "base")}  # shuffled per item
    assert export_review([Path(s) for s in key["sources"]], page.with_name("again.html"), seed=3).read_text() == html


def wait_for_file(path: Path, timeout: float = 20) -> Path:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} was not downloaded"
        time.sleep(0.1)
    return path


@pytest.mark.skipif(CHROMIUM is None, reason="headless test needs Debian's chromium (apt-get install -y chromium)")
def test_rating_in_headless_chromium_downloads_files_that_import_unblinds(page, tmp_path):
    key = json.loads(key_path(page).read_text())
    letter = {entry["id"]: {system: "AB"[i] for i, system in enumerate(entry["order"])} for entry in key["items"]}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = PipeBrowser(tmp_path / "profile")
    try:
        browser.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}, session=False)
        browser.open(page.as_uri(), ready="document.querySelectorAll('.item').length > 0")
        assert browser.js("document.body.innerText.includes('</script> answer')")  # shown as text, not markup
        # The rater prefers "tuned" on items 0-2, calls item 3 a tie, and scores item 0.
        for item in range(3):
            browser.js(f"document.querySelector('button.choice[data-item=\"{item}\"][data-choice=\"{letter[item]['tuned']}\"]').click()")
        browser.js("document.querySelector('button.choice[data-item=\"3\"][data-choice=\"tie\"]').click()")
        select = f"document.querySelector('select[data-item=\"0\"][data-letter=\"{letter[0]['tuned']}\"]')"
        browser.js(f"{select}.value = '5'; {select}.dispatchEvent(new Event('change'))")
        browser.js("document.getElementById('rater').value = 'ann'")
        assert browser.js("document.getElementById('progress').textContent") == "4 / 4 rated"
        browser.js("document.getElementById('download-json').click()")
        json_file = wait_for_file(downloads / "ratings-ann.json")
        browser.js("document.getElementById('download-csv').click()")
        csv_file = wait_for_file(downloads / "ratings-ann.csv")
    finally:
        browser.close()
    for ratings_file in (json_file, csv_file):
        result = CliRunner().invoke(cli, ["human", "import", str(ratings_file), "--key", str(key_path(page))])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output)
        assert summary["systems"]["tuned"]["wins"] == 3 and summary["systems"]["base"]["wins"] == 0
        assert summary["tie_rate"] == 0.25 and summary["systems"]["tuned"]["mean_score"] == 5
        assert summary["systems"]["tuned"]["ci95"] == pytest.approx(list(wilson_interval(3, 4)))


def test_wilson_interval_matches_the_textbook_value():
    # 8 successes in 10 trials: 95% Wilson interval (0.490, 0.943).
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)


def test_fleiss_kappa_matches_the_worked_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa 0.210.
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    assert round(fleiss_kappa(table), 3) == 0.210


def test_cohen_kappa_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference for Cohen's kappa (test extra)")
    a = ["x", "y", "tie", "x", "x", "y", "y", "tie", "x", "y"]
    b = ["x", "y", "x", "x", "tie", "y", "x", "tie", "x", "y"]
    assert cohen_kappa(a, b) == pytest.approx(sk.cohen_kappa_score(a, b), abs=1e-9)


def test_agreement_uses_items_every_rater_rated():
    ratings = [Rating("ann", i, c) for i, c in enumerate(["x", "y", "x", "tie"])]
    ratings += [Rating("bob", i, c) for i, c in enumerate(["x", "y", "y"])]  # bob skipped item 3
    result = agreement(ratings, ["x", "y", "tie"])
    assert result["items"] == 3 and result["cohen_kappa"] == pytest.approx(cohen_kappa(["x", "y", "x"], ["x", "y", "y"]))
    assert agreement(ratings[:4], ["x", "y", "tie"])["items"] == 0  # one rater: no agreement to report


def test_ratings_for_another_page_are_refused(page, tmp_path):
    wrong = tmp_path / "ratings.json"
    wrong.write_text(json.dumps({"page": "0000", "rater": "ann", "ratings": [{"item": 0, "choice": "A"}]}))
    result = CliRunner().invoke(cli, ["human", "import", str(wrong), "--key", str(key_path(page))])
    assert result.exit_code == 2 and "ratings are for page 0000" in result.output


def test_export_needs_two_systems_with_the_same_prompts(tmp_path):
    one = tmp_path / "a.jsonl"
    one.write_text(json.dumps({"prompt": "p", "output": "o"}) + "\n")
    other = tmp_path / "b.jsonl"
    other.write_text(json.dumps({"prompt": "different", "output": "o"}) + "\n")
    with pytest.raises(UserError, match="at least 2 systems"):
        export_review([one], tmp_path / "x.html")
    with pytest.raises(UserError, match="item 1 has different prompts"):
        export_review([one, other], tmp_path / "x.html")
