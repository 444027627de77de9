"""Augmentation: each operation changes the stated share of words, labels and answers are kept,
validation rows are never touched, and the same seed makes the same rows."""

from __future__ import annotations

import random

import pytest

from tests.train_helpers import write_chat_data, write_label_data
from tunelab.data import build_datasets
from tunelab.data.augment import (
    AugmentConfig,
    augment_records,
    random_deletion,
    random_insertion,
    random_swap,
    synonym_replacement,
    wordnet_synonyms,
)
from tunelab.data.config import DataConfig
from tunelab.data.records import Record
from tunelab.errors import UserError
from tunelab.models import load_model


def every_word_has_one(word: str) -> list[str]:
    return [f"SYN{word}"]


WORDS = [f"word{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(40)]  # alphabetic, no stop words, none alike


@pytest.mark.parametrize(("rate", "changed"), [(0.1, 4), (0.25, 10), (0.01, 1)])
def test_synonym_replacement_changes_the_stated_share_of_words(rate, changed):
    out = synonym_replacement(list(WORDS), rate, random.Random(0), every_word_has_one)
    assert len(out) == len(WORDS)
    assert sum(a != b for a, b in zip(out, WORDS)) == changed
    assert all(b == f"SYN{a}" for a, b in zip(WORDS, out) if a != b)


def test_insertion_swap_and_deletion():
    inserted = random_insertion(list(WORDS), 0.1, random.Random(1), every_word_has_one)
    assert len(inserted) == 44 and sorted(w for w in inserted if w.startswith("SYN"))[0].startswith("SYN")
    swapped = random_swap(list(WORDS), 0.1, random.Random(2), every_word_has_one)
    assert sorted(swapped) == sorted(WORDS) and swapped != WORDS
    many = [str(i) for i in range(4000)]
    kept = random_deletion(many, 0.3, random.Random(3), every_word_has_one)
    assert len(kept) / len(many) == pytest.approx(0.7, abs=0.03) and all(w in set(many) for w in kept)
    assert len(random_deletion(["only"], 1.0, random.Random(0), every_word_has_one)) == 1  # never empty


def test_stop_words_are_not_replaced_and_wordnet_gives_real_synonyms():
    synonyms = wordnet_synonyms()
    assert "film" in synonyms("movie") and "movie" not in synonyms("movie")
    out = synonym_replacement(["the", "movie", "is", "a", "joy"], 1.0, random.Random(0), synonyms)
    assert out[0] == "the" and out[2] == "is" and out[3] == "a" and out[1] != "movie"


def test_labels_and_answers_are_kept_and_copies_are_seeded():
    cfg = AugmentConfig(synonym=0.2, swap=0.2, delete=0.2, mask=0.2, copies=4)
    records = [Record("f:1", text=" ".join(WORDS[:10]), label="pos"), Record("f:2", text=" ".join(WORDS[10:20]), label="neg")]
    out, report = augment_records(records, cfg, seed=7, mask_token="[MASK]", synonyms=every_word_has_one)
    assert out[:2] == records and len(out) == 2 + 8
    assert [r.label for r in out[2:6]] == ["pos"] * 4 and [r.label for r in out[6:]] == ["neg"] * 4
    assert report.added == {"synonym": 2, "swap": 2, "delete": 2, "mask": 2}
    assert "[MASK]" in out[5].text
    again, _ = augment_records(records, cfg, seed=7, mask_token="[MASK]", synonyms=every_word_has_one)
    other, _ = augment_records(records, cfg, seed=8, mask_token="[MASK]", synonyms=every_word_has_one)
    assert again == out and other != out

    chat = Record("f:3", messages=[{"role": "system", "content": "be brief please"}, {"role": "user", "content": " ".join(WORDS[:10])}, {"role": "assistant", "content": "alpha beta gamma delta"}])
    copies, _ = augment_records([chat], AugmentConfig(swap=0.3, copies=2), seed=0, mask_token="_", synonyms=every_word_has_one)
    for copy in copies[1:]:
        assert copy.messages[0] == chat.messages[0] and copy.messages[2] == chat.messages[2]
        assert copy.messages[1]["content"] != chat.messages[1]["content"]


def test_augmentation_never_touches_validation_rows(tmp_path):
    data = write_label_data(tmp_path / "d.jsonl", n=80)
    tokenizer = load_model("tiny-bert").tokenizer
    plain = build_datasets(DataConfig(train=str(data), val_fraction=0.25), tokenizer, shape="classification", seed=0)
    augmented = build_datasets(
        DataConfig(train=str(data), val_fraction=0.25, augment={"swap": 0.2, "delete": 0.1, "copies": 2}), tokenizer, shape="classification", seed=0
    )
    assert augmented.validation == plain.validation
    added = sum(augmented.report.augmented["added"].values())
    assert added + augmented.report.augmented["unchanged"] == 2 * len(plain.train) and added > len(plain.train)
    assert len(augmented.train) == len(plain.train) + added
    assert augmented.train[: len(plain.train)] == plain.train
    assert augmented.report.augmented["samples"] and augmented.report.train_examples == len(augmented.train)


def test_rows_that_cannot_be_augmented_are_refused(tmp_path):
    pairs = Record("f:9", messages=[{"role": "user", "content": "q"}], chosen=[{"role": "assistant", "content": "a"}], rejected=[{"role": "assistant", "content": "b"}])
    with pytest.raises(UserError, match="f:9.*preference pair"):
        augment_records([pairs], AugmentConfig(swap=0.1), seed=0, mask_token="_")
    with pytest.raises(ValueError, match="no augmentation is enabled"):
        AugmentConfig(copies=2)
    data = write_chat_data(tmp_path / "c.jsonl", n=16)
    chat = build_datasets(DataConfig(train=str(data), val_fraction=0.0, augment={"swap": 0.5, "copies": 1}), load_model("tiny-llama").tokenizer, shape="sft", seed=0)
    assert len(chat.train) > 16


def test_model_rewrites_are_cached_resumed_and_keep_the_label(tmp_path, monkeypatch):
    import tunelab.rewrite as rewrite_module
    from tunelab.data.rewrite import RewriteConfig

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    cfg = AugmentConfig(rewrite=RewriteConfig(model="tiny-llama", prompts=["To French: {text}", "To English: {text}"], max_new_tokens=6, batch_size=2))
    records = [Record(f"f:{i}", text=f"text number {i}", label=str(i % 2)) for i in range(3)]
    out, report = augment_records(records, cfg, seed=0, mask_token="_")
    path = rewrite_module.Rewriter(cfg.rewrite, 0).path
    rows = [line for line in path.read_text().splitlines() if line]
    assert len(rows) == 3 and report.added.get("rewrite", 0) + report.unchanged == 3
    assert [r.label for r in out[3:]] == [r.label for r in records if any(o.where == r.where for o in out[3:])]

    path.write_text("\n".join(rows[:2]) + "\n")  # a run killed after two rewrites
    calls = []
    real = rewrite_module.Rewriter._chain
    monkeypatch.setattr(rewrite_module.Rewriter, "_chain", lambda self, texts, copy: calls.append(list(texts)) or real(self, texts, copy))
    again, _ = augment_records(records, cfg, seed=0, mask_token="_")
    assert calls == [["text number 2"]] and again == out  # only the missing one is generated, greedily the same
    augment_records(records, cfg, seed=0, mask_token="_")
    assert calls == [["text number 2"]]  # complete: nothing generated


def test_more_rewrites_than_one_need_sampling():
    from tunelab.data.rewrite import RewriteConfig

    with pytest.raises(ValueError, match="temperature above 0"):
        RewriteConfig(copies=2)
    with pytest.raises(ValueError, match="must contain {text}"):
        RewriteConfig(prompts=["Paraphrase this"])


def test_the_label_filter_drops_copies_the_classifier_relabels(monkeypatch):
    import tunelab.data.augment as augment_module

    seen: list[str] = []

    def by_keyword(model: str, seed: int, texts):  # a stand-in classifier: "great" means pos
        seen.extend(texts)
        return ["pos" if "great" in t.split() else "neg" for t in texts]

    monkeypatch.setattr(augment_module, "predict_labels", by_keyword)
    records = [Record(f"f:{i}", text=f"great film number{'abcdefgh'[i]} great", label="pos") for i in range(8)]
    out, report = augment_records(records, AugmentConfig(mask=0.5, copies=4, keep_if_label="clf"), seed=0, mask_token="[MASK]")
    dropped = report.filtered["mask"]
    assert dropped > 0 and report.added["mask"] + dropped + report.unchanged == 32
    assert all("great" in r.text.split() for r in out[8:]) and len(seen) == 32 - report.unchanged


def test_the_real_label_filter_reads_a_trained_heads_label_names(tmp_path):
    import tunelab.rewrite  # noqa: F401  (installs the predictor)
    from tunelab.data.rewrite import predict_labels
    from tunelab.recipe import recipe_from_dict
    from tunelab.train.run import run_training

    data = write_label_data(tmp_path / "d.jsonl", n=96)
    run_training(recipe_from_dict({
        "model": {"name": "tiny-bert"}, "method": {"head": {"type": "classification"}, "freeze": {"base": False}},
        "data": {"train": str(data), "val_fraction": 0.0}, "output_dir": str(tmp_path / "clf"),
        "train": {"max_steps": 80, "batch_size": 16, "lr": 3e-3, "threads": 1, "precision": "fp32", "eval_before": False},
    }), show_progress=False)
    labels = predict_labels(str(tmp_path / "clf"), 0, ["great 1 the film great", "awful 2 a plot awful"])
    assert labels == ["pos", "neg"]  # label names from the run, and the head learned them


def test_a_base_model_rewrites_from_a_plain_prompt(tmp_path, monkeypatch):
    """template: none hands the few-shot prompt to the model as it is (a base model has no chat
    template to wrap it in), and a different template is a different cache entry."""
    import tunelab.rewrite as rewrite_module
    from tunelab.data.rewrite import RewriteConfig

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    seen: list[list[str]] = []
    monkeypatch.setattr(rewrite_module, "generate_batch", lambda model, tok, prompts, settings, *, stop, add_special_tokens, batch_size: seen.append([*prompts, stop, add_special_tokens]) or ["Bonjour\nmore"] * len(prompts))
    plain = RewriteConfig(model="tiny-llama", prompts=["English: hi\nFrench: salut\n\nEnglish: {text}\nFrench:"], template="none")
    assert rewrite_module.rewrite(plain, 0, ["hello"]) == {"hello": ["Bonjour"]}
    assert seen == [["English: hi\nFrench: salut\n\nEnglish: hello\nFrench:", ("\n",), True]]  # stops where its answer's line ends
    chat = plain.model_copy(update={"template": "auto"})
    rewrite_module.rewrite(chat, 0, ["hello"])
    assert seen[1][-1] is False and seen[1][0] != seen[0][0] and "English: hello" in seen[1][0]
    assert rewrite_module.Rewriter(plain, 0).path != rewrite_module.Rewriter(chat, 0).path


def test_a_chain_leaves_an_empty_answer_empty(tmp_path, monkeypatch):
    """A translation that came back empty is not back-translated from nothing (a base model would
    answer an empty prompt by repeating a few-shot example, a different text with the row's label)."""
    import tunelab.rewrite as rewrite_module
    from tunelab.data.rewrite import RewriteConfig

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    asked: list[list[str]] = []

    def translate(model, tok, prompts, settings, *, stop, add_special_tokens, batch_size):
        asked.append(list(prompts))
        return ["" if "skip" in p else f"{p} done" for p in prompts]

    monkeypatch.setattr(rewrite_module, "generate_batch", translate)
    cfg = RewriteConfig(model="tiny-llama", prompts=["fr: {text}", "en: {text}"], template="none")
    assert rewrite_module.rewrite(cfg, 0, ["keep", "skip"]) == {"keep": ["en: fr: keep done done"], "skip": [""]}
    assert asked == [["fr: keep", "fr: skip"], ["en: fr: keep done"]]


def test_greedy_rewrites_are_shared_across_seeds_and_sampled_ones_are_not():
    """Greedy decoding is the same whatever the seed, so a 3-seed benchmark generates once."""
    from tunelab.data.rewrite import RewriteConfig
    from tunelab.rewrite import Rewriter

    greedy = RewriteConfig(model="smollm2-135m")
    assert Rewriter(greedy, 0).path == Rewriter(greedy, 1).path
    sampled = greedy.model_copy(update={"temperature": 0.7})
    assert Rewriter(sampled, 0).path != Rewriter(sampled, 1).path != Rewriter(greedy, 0).path
