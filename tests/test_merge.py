"""``tunelab merge``: soups, task arithmetic, TIES and DARE over tiny runs of one base, checked
against the definitions (and peft's reference functions) on the merged weights themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft.utils import merge_utils

from tests.train_helpers import train, write_chat_data
from tunelab.cli import cli
from tunelab.merge.soup import greedy_soup
from tunelab.methods.peft_adapters import merge_adapters
from tunelab.models import load_model

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 3]])


def _train(root: Path, name: str, method: str, lr: float, data_seed: int) -> Path:
    folder = root / name
    folder.mkdir()
    data = write_chat_data(folder / "d.jsonl", n=48, seed=data_seed)
    train(folder, f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {method}\n"
                  f"train: {{lr: {lr}, max_steps: 6, batch_size: 4, precision: fp32, threads: 1, eval_before: false}}\n")
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-runs")
    return {
        "lora_a": _train(root, "lora_a", "{lora: {r: 4}}", 0.01, 1),
        "lora_b": _train(root, "lora_b", "{lora: {r: 4}}", 0.02, 2),
        "full_a": _train(root, "full_a", "{}", 0.001, 1),
        "full_b": _train(root, "full_b", "{}", 0.002, 2),
    }


def merge(*args: str) -> None:
    result = CliRunner().invoke(cli, ["merge", *args])
    assert result.exit_code == 0, result.output


def plain_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """A run's (or base's) weights with any adapter folded in."""
    model = merge_adapters(load_model(str(path)).model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(path: Path | str) -> torch.Tensor:
    with torch.no_grad():
        return load_model(str(path)).model(input_ids=IDS).logits


def test_a_lora_run_merged_with_itself_at_half_weights_is_that_run(runs, tmp_path):
    merge(str(runs["lora_a"]), str(runs["lora_a"]), "--method", "linear", "--weights", "0.5,0.5", "--out", str(tmp_path / "m"))
    assert torch.allclose(logits(tmp_path / "m"), logits(runs["lora_a"]), atol=1e-5)
    report = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert report["kind"] == "lora" and report["weights"] == [0.5, 0.5]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_uniform_soup_is_the_mean_of_its_members(runs, tmp_path, kind):
    a, b = runs[f"{kind}_a"], runs[f"{kind}_b"]
    merge(str(a), str(b), "--method", "uniform", "--out", str(tmp_path / "soup"))
    wa, wb, soup = plain_weights(a), plain_weights(b), plain_weights(tmp_path / "soup")
    assert soup.keys() == wa.keys()
    for name in soup:
        assert torch.allclose(soup[name], (wa[name] + wb[name]) / 2, atol=1e-5), name


def test_a_merged_classifier_keeps_its_label_names_and_heads_average(tmp_path):
    from tests.train_helpers import write_label_data

    folders = []
    for i, lr in enumerate((0.001, 0.003)):
        folder = tmp_path / f"cls{i}"
        folder.mkdir()
        data = write_label_data(folder / "d.jsonl", n=48, seed=i)
        train(folder, f"model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0.2}}\n"
                      "method: {head: {type: classification}, freeze: {base: false}}\n"
                      f"train: {{lr: {lr}, max_steps: 4, batch_size: 4, precision: fp32, threads: 1, eval_before: false}}\n")
        folders.append(folder / "run")
    merge(*map(str, folders), "--method", "uniform", "--out", str(tmp_path / "soup"))
    soup = load_model(str(tmp_path / "soup"), "sequence-classification").model
    assert soup.config.id2label == {0: "neg", 1: "pos"}
    members = [load_model(str(f), "sequence-classification").model for f in folders]
    assert torch.allclose(soup.classifier.weight, (members[0].classifier.weight + members[1].classifier.weight) / 2, atol=1e-6)


def test_task_arithmetic_adds_and_subtracts_task_vectors(runs, tmp_path):
    base, a = plain_weights("tiny-llama"), plain_weights(runs["full_a"])
    merge(str(runs["full_a"]), "--method", "task_arithmetic", "--weights", "-1", "--scale", "0.5", "--out", str(tmp_path / "neg"))
    negated = plain_weights(tmp_path / "neg")
    for name in base:
        assert torch.allclose(negated[name], base[name] - 0.5 * (a[name] - base[name]), atol=1e-6), name


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_full_merges_equal_peft_reference_functions_on_the_task_vectors(runs, tmp_path, method):
    base, a, b = plain_weights("tiny-llama"), plain_weights(runs["full_a"]), plain_weights(runs["full_b"])
    merge(str(runs["full_a"]), str(runs["full_b"]), "--method", method, "--density", "0.4", "--seed", "3", "--out", str(tmp_path / "m"))
    merged = plain_weights(tmp_path / "m")
    reference = {"ties": lambda v, w: merge_utils.ties(v, w, 0.4, "total"), "dare_linear": lambda v, w: merge_utils.dare_linear(v, w, 0.4),
                 "dare_ties": lambda v, w: merge_utils.dare_ties(v, w, 0.4, "total")}[method]
    torch.manual_seed(3)
    for name in base:
        expected = base[name] + reference([a[name] - base[name], b[name] - base[name]], torch.tensor([1.0, 1.0]))
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    changed = [n for n in base if not torch.equal(merged[n], base[n])]
    assert changed, "the merge moved no weight"


def test_lora_ties_at_full_rank_equals_peft_ties_of_the_adapters_deltas(runs, tmp_path):
    """peft's add_weighted_adapter(ties_svd) at the layer's full rank factors the TIES delta exactly."""
    merge(str(runs["lora_a"]), str(runs["lora_b"]), "--method", "ties", "--density", "0.5", "--rank", "64", "--out", str(tmp_path / "m"))
    base, a, b, merged = (plain_weights(p) for p in ("tiny-llama", runs["lora_a"], runs["lora_b"], tmp_path / "m"))
    moved = 0
    for name in base:
        expected = base[name] + merge_utils.ties([a[name] - base[name], b[name] - base[name]], torch.tensor([1.0, 1.0]), 0.5, "total")
        assert torch.allclose(merged[name], expected, atol=1e-5), name
        moved += not torch.equal(a[name], base[name])
    assert moved > 0


def test_greedy_soup_keeps_a_member_only_when_the_held_out_score_holds():
    scores = {(0,): 0.5, (1,): 0.8, (2,): 0.6, (1, 2): 0.79, (1, 0): 0.81}
    chosen, trace = greedy_soup(3, lambda idx: scores[tuple(idx)])
    assert chosen == [1, 0]  # best first; 2 lowered the score and was left out; 0 raised it
    assert [t.get("kept") for t in trace[3:]] == [False, True]


def test_greedy_soup_from_the_cli_scores_candidates_and_a_soup_of_one_model_is_that_model(runs, tmp_path):
    rows = [{"question": f"say {w}", "answer": w.upper()} for w in ("yes", "no", "yes", "no")]
    held_out = tmp_path / "val.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "greedy"
    a = str(runs["lora_a"])
    merge(a, a, "--method", "greedy", "--data", str(held_out), "--task", "choice",
          "--choice", "YES", "--choice", "NO", "--prompt-template", "{question}", "--out", str(out))
    report = json.loads((out / "merge.json").read_text())
    assert [t["members"] for t in report["greedy_trace"]] == [[0], [1], [0, 1]]
    assert report["greedy_trace"][2]["score"] == report["greedy_trace"][0]["score"] and report["greedy_trace"][2]["kept"]
    assert torch.allclose(logits(out), logits(a), atol=1e-5)
    merge(a, "--method", "uniform", "--out", str(tmp_path / "one"))
    assert torch.allclose(logits(tmp_path / "one"), logits(a), atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["lora_a", "full_a", "--method", "uniform"], "runs differ in kind"),
    (["lora_a", "lora_b", "--method", "linear", "--weights", "1"], "1 weights for 2 runs"),
    (["lora_a", "lora_b", "--method", "greedy"], "a greedy soup needs held-out data"),
    (["lora_a", "lora_b", "--method", "ties", "--density", "0"], "density 0.0 is not in (0, 1]"),
])
def test_bad_merges_are_one_line_errors(runs, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["merge", *[str(runs.get(a, a)) for a in args], "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output and result.output.strip().count("\n") == 0, result.output
