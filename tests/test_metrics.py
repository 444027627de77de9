"""Every metric gives its reference library's number on the same inputs (to 1e-6)."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from tunelab.errors import UserError
from tunelab.evaluate import metrics
from tunelab.evaluate.metrics import normalize_answer, perplexity_from_logprobs, score

# Translation-like outputs with one, two and (for the first item only) three references.
HYPS = [
    "The cat sat on the mat.",
    "There is a dog in the garden",
    "He bought an auto yesterday.",
    "Completely unrelated words here",
]
REFS_ONE = [
    ["The cat is sitting on the mat."],
    ["A dog is in the garden."],
    ["Yesterday he bought a car."],
    ["The weather was nice."],
]
REFS_VARIABLE = [
    ["The cat is sitting on the mat.", "A cat sat on the mat.", "On the mat sat the cat."],
    ["A dog is in the garden.", "There's a dog in the yard."],
    ["Yesterday he bought a car."],
    ["The weather was nice.", "It was sunny."],
]
CASES = [pytest.param(REFS_ONE, id="one-reference"), pytest.param(REFS_VARIABLE, id="variable-references")]


def streams(refs):
    width = max(map(len, refs))
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]


@pytest.mark.parametrize("refs", CASES)
def test_corpus_bleu_equals_sacrebleu(refs):
    assert score(["bleu"], HYPS, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams(refs)).score, abs=1e-6)


@pytest.mark.parametrize("refs", CASES)
def test_sentence_bleu_mean_equals_sacrebleu_sentence_bleu(refs):
    expected = sum(sacrebleu.sentence_bleu(h, r).score for h, r in zip(HYPS, refs)) / len(HYPS)
    result = score(["bleu"], HYPS, refs)
    assert result["bleu_sentence_mean"] == pytest.approx(expected, abs=1e-6)
    # Corpus BLEU pools n-gram counts; it is not the mean of sentence scores.
    assert result["bleu"] != pytest.approx(result["bleu_sentence_mean"], abs=1e-3)


@pytest.mark.parametrize("refs", CASES)
def test_chrf_and_chrfpp_equal_sacrebleu(refs):
    result = score(["chrf", "chrf++"], HYPS, refs)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams(refs)).score, abs=1e-6)
    assert result["chrf++"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams(refs), word_order=2).score, abs=1e-6)


@pytest.mark.parametrize("refs", CASES)
def test_rouge_equals_rouge_score_with_stemming(refs):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per_item = [scorer.score_multi(r, h) for h, r in zip(HYPS, refs)]
    result = score(["rouge"], HYPS, refs)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result[key] == pytest.approx(sum(s[key].fmeasure for s in per_item) / len(HYPS), abs=1e-6)


def test_rouge_stems_words():
    # "sitting" and "sits" share the Porter stem "sit"; without stemming these would not overlap.
    assert score(["rouge"], ["cats sitting"], [["cat sits"]])["rouge1"] == pytest.approx(1.0)


def test_rouge_lsum_splits_sentences_on_newlines():
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    pred, ref = "the cat sat\nthe dog ran", "the dog ran\nthe cat sat"
    expected = scorer.score(ref, pred)["rougeLsum"].fmeasure
    assert score(["rouge"], [pred], [[ref]])["rougeLsum"] == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.0)


LABELS_TRUE = ["pos", "neg", "neu", "pos", "neg", "pos", "neu", "neu"]
LABEL_CASES = [
    pytest.param(["pos", "neg", "neu", "pos", "neg", "pos", "neu", "neu"], id="perfect"),
    pytest.param(["pos", "pos", "neu", "neg", "neg", "pos", "pos", "neu"], id="mixed"),
    pytest.param(["pos", "pos", "pos", "pos", "pos", "pos", "pos", "pos"], id="one-label"),
    pytest.param(["pos", "neg", "other", "pos", "neg", "neg", "neu", "other"], id="unseen-predicted-label"),
]


@pytest.mark.parametrize("preds", LABEL_CASES)
def test_accuracy_and_f1_equal_scikit_learn(preds):
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference for accuracy/F1 (test extra)")
    result = score(["accuracy", "f1"], preds, [[t] for t in LABELS_TRUE])
    assert result["accuracy"] == pytest.approx(sk.accuracy_score(LABELS_TRUE, preds), abs=1e-6)
    assert result["f1_macro"] == pytest.approx(sk.f1_score(LABELS_TRUE, preds, average="macro", zero_division=0), abs=1e-6)
    assert result["f1_micro"] == pytest.approx(sk.f1_score(LABELS_TRUE, preds, average="micro", zero_division=0), abs=1e-6)


def test_f1_refuses_several_reference_labels():
    with pytest.raises(UserError, match="exactly one reference label"):
        score(["f1"], ["a"], [["a", "b"]])


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Eiffel Tower.", "eiffel tower"),
        ("  an   apple,  a pear ", "apple pear"),
        ("Theory of the Atom", "theory of atom"),  # articles are whole words only
        ("U.S.A!", "usa"),
    ],
)
def test_exact_match_normalisation_is_squad(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_counts_any_reference():
    result = score(["exact_match"], ["The Paris", "london", "Rome"], [["paris"], ["Berlin", "London."], ["Madrid"]])
    assert result["exact_match"] == pytest.approx(2 / 3)


def test_meteor_with_shipped_wordnet_reproduces_nltk_documented_value():
    # nltk's own doctest: round(meteor_score([reference1, reference2, reference3], hypothesis1), 4) == 0.6944
    hyp = "It is a guide to action which ensures that the military always obeys the commands of the party"
    refs = [
        "It is a guide to action that ensures that the military will forever heed Party commands",
        "It is the guiding principle which guarantees the military forces always being under the command of the Party",
        "It is the practical guide for the army always to heed the directions of the party",
    ]
    assert round(score(["meteor"], [hyp], [refs])["meteor"], 4) == 0.6944


def test_meteor_counts_wordnet_synonyms():
    hyp = ["he bought an auto"]
    with_synonym = score(["meteor"], hyp, [["he bought a car"]])["meteor"]
    without = score(["meteor"], hyp, [["he bought a tree"]])["meteor"]
    assert with_synonym > without


def test_meteor_keeps_nltk_stem_then_synonym_behaviour():
    # nltk looks synonyms up after Porter stemming: "larg" is not a WordNet lemma, so big/large
    # do not match. That is the reference behaviour and we keep it.
    from nltk.translate.meteor_score import meteor_score

    from tunelab.evaluate.wordnet import load_wordnet

    ours = score(["meteor"], ["a large house"], [["a big house"]])["meteor"]
    reference = meteor_score([["a", "big", "house"]], ["a", "large", "house"], wordnet=load_wordnet())
    assert ours == pytest.approx(reference, abs=1e-6)
    assert ours == pytest.approx(score(["meteor"], ["a tall house"], [["a big house"]])["meteor"], abs=1e-6)


def test_perplexity_from_logprobs_equals_exp_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(17, 50), torch.randint(0, 50, (17,))
    logprobs = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1).tolist()
    loss = F.cross_entropy(logits, targets).item()
    result = perplexity_from_logprobs(logprobs)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert result["bits_per_token"] == pytest.approx(loss / math.log(2), rel=1e-6)
    assert result["tokens"] == 17


@pytest.mark.parametrize(
    ("names", "preds", "refs", "message"),
    [
        (["bleu", "blue"], ["a"], [["a"]], "unknown metric 'blue'.*known metrics: accuracy, f1"),
        ([], ["a"], [["a"]], "no metric given"),
        (["bleu"], [], [], "no predictions"),
        (["bleu"], ["a", "b"], [["a"]], "2 predictions but 1 reference"),
        (["rouge"], ["a", "b"], [["a"], []], "item 2 has no reference"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(names, preds, refs, message):
    with pytest.raises(UserError, match=message) as info:
        score(names, preds, refs)
    assert "\n" not in info.value.one_line()


def test_settings_name_library_versions():
    described = metrics.settings(["bleu", "rouge", "exact_match"])
    assert described["bleu"].startswith(f"sacrebleu {sacrebleu.__version__}")
    assert "use_stemmer=True" in described["rouge"]
    assert "SQuAD" in described["exact_match"]


def test_python_parses_counts_what_ast_accepts_reading_fenced_blocks():
    import ast

    from tunelab.evaluate.metrics import python_parses

    predictions = ["def f(x):\n    return x", "def f(:", "Here it is:\n```python\nx = [1, 2]\n```\nDone.", "```python\ndef g(:\n```",
                   "```\nprint('no language tag')\n```", "x = ("]

    def accepted(text: str) -> bool:
        try:
            ast.parse(text)
            return True
        except SyntaxError:
            return False
    bodies = ["def f(x):\n    return x", "def f(:", "x = [1, 2]\n", "def g(:\n", "print('no language tag')\n", "x = ("]
    assert python_parses(predictions, [[""]] * len(predictions))["python_parses"] == sum(map(accepted, bodies)) / len(bodies) == 0.5
