"""Metrics that give the same numbers as their reference libraries, on one calling convention.

Every text metric takes ``predictions`` (one string per item) and ``references`` (one or more
strings per item) and returns corpus-level numbers. The arithmetic is left to the library that
defines each metric (sacrebleu, rouge-score, nltk), so a tunelab number can be compared with a
published one; this module only fixes the conventions around them, which are recorded in
``Metric.settings`` and copied into every report:

- Scales are the libraries' own: BLEU and chrF on 0-100 (sacrebleu), everything else on 0-1.
- Several references per item: sacrebleu and nltk METEOR use all of them natively; ROUGE takes the
  best-scoring reference (``RougeScorer.score_multi``); exact match and accuracy count a hit on any.
- Corpus ROUGE and METEOR are the mean of the per-item scores (as Hugging Face ``evaluate`` does
  without bootstrap); corpus BLEU/chrF pool n-gram statistics, which is what "BLEU" means.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version

from tunelab.errors import UserError

Predictions = Sequence[str]
References = Sequence[Sequence[str]]
Scores = dict[str, float]


@dataclass(frozen=True)
class Metric:
    """A named metric: how to compute it and the settings a reader needs to reproduce it."""

    name: str
    compute: Callable[[Predictions, References], Scores]
    library: str | None
    settings: str

    def describe(self) -> str:
        """Settings plus the library version, as written into reports."""
        if self.library is None:
            return self.settings
        return f"{self.library} {version(self.library)}: {self.settings}"


# ---------------------------------------------------------------------------------------------
# Labels


def accuracy(predictions: Predictions, references: References) -> Scores:
    """Fraction of items whose prediction equals one of its references exactly (no normalisation)."""
    hits = sum(pred in refs for pred, refs in zip(predictions, references))
    return {"accuracy": hits / len(predictions)}


def f1(predictions: Predictions, references: References) -> Scores:
    """Macro and micro F1 over the labels seen in predictions or references (scikit-learn's convention).

    A label never predicted and never true does not exist; one that is only predicted (a wrong
    label) counts in the macro average with F1 0, as ``sklearn.metrics.f1_score`` does.
    """
    truth = _single_references(references, "f1")
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for pred, true in zip(predictions, truth):
        if pred == true:
            tp[pred] += 1
        else:
            fp[pred] += 1
            fn[true] += 1
    labels = set(predictions) | set(truth)
    per_label = [2 * tp[label] / (2 * tp[label] + fp[label] + fn[label]) for label in labels]
    micro_tp, micro_fp, micro_fn = sum(tp.values()), sum(fp.values()), sum(fn.values())
    return {
        "f1_macro": sum(per_label) / len(per_label),
        "f1_micro": 2 * micro_tp / (2 * micro_tp + micro_fp + micro_fn),
    }


def _single_references(references: References, metric: str) -> list[str]:
    if any(len(refs) != 1 for refs in references):
        raise UserError(f"{metric} needs exactly one reference label per item", hint="give one label per line")
    return [refs[0] for refs in references]


# ---------------------------------------------------------------------------------------------
# Short answers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, drop punctuation and articles, squeeze spaces.

    The same steps, in the same order, as ``normalize_answer`` in the official SQuAD v1.1 script,
    so "The Eiffel Tower." and "eiffel tower" are the same answer.
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Predictions, references: References) -> Scores:
    """Fraction of items whose normalised prediction equals a normalised reference."""
    hits = sum(
        normalize_answer(pred) in {normalize_answer(ref) for ref in refs} for pred, refs in zip(predictions, references)
    )
    return {"exact_match": hits / len(predictions)}


# ---------------------------------------------------------------------------------------------
# sacrebleu


def _reference_streams(references: References) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference position; ``None`` pads items with fewer."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def bleu(predictions: Predictions, references: References) -> Scores:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, exp smoothing) and the mean sentence BLEU."""
    from sacrebleu.metrics import BLEU

    corpus = BLEU().corpus_score(list(predictions), _reference_streams(references))
    sentence = BLEU(effective_order=True)
    per_item = [sentence.sentence_score(pred, list(refs)).score for pred, refs in zip(predictions, references)]
    return {"bleu": corpus.score, "bleu_sentence_mean": sum(per_item) / len(per_item)}


def _chrf(word_order: int, key: str) -> Callable[[Predictions, References], Scores]:
    def compute(predictions: Predictions, references: References) -> Scores:
        from sacrebleu.metrics import CHRF

        return {key: CHRF(word_order=word_order).corpus_score(list(predictions), _reference_streams(references)).score}

    compute.__doc__ = f"Corpus {key} (sacrebleu, character 6-grams, word {word_order}-grams, beta 2)."
    return compute


# ---------------------------------------------------------------------------------------------
# rouge-score

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Predictions, references: References) -> Scores:
    """Mean ROUGE-1/2/L/Lsum F-measure with Porter stemming (rouge-score).

    rougeLsum treats each line as a sentence, as rouge-score does; put summary sentences on
    separate lines. rouge-score's tokenizer keeps only ASCII letters and digits.
    """
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, references):
        scores = scorer.score_multi(list(refs), pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}


# ---------------------------------------------------------------------------------------------
# nltk METEOR


def tokenize_words(text: str) -> list[str]:
    """nltk's Treebank-style word tokenizer: ``word_tokenize`` without its punkt sentence splitter.

    ``word_tokenize`` needs nltk's ``punkt_tab`` download, absent offline; on one sentence the two
    give the same tokens.
    """
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize(text)


def meteor(predictions: Predictions, references: References) -> Scores:
    """Mean METEOR (nltk, WordNet synonyms, Porter stems, alpha 0.9, beta 3, gamma 0.5)."""
    from nltk.translate.meteor_score import meteor_score

    from tunelab.evaluate.wordnet import load_wordnet

    wordnet = load_wordnet()
    total = sum(
        meteor_score([tokenize_words(ref) for ref in refs], tokenize_words(pred), wordnet=wordnet)
        for pred, refs in zip(predictions, references)
    )
    return {"meteor": total / len(predictions)}


# ---------------------------------------------------------------------------------------------
# Code

FENCED = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.DOTALL)


def python_parses(predictions: Predictions, references: References) -> Scores:
    """Share of predictions that are syntactically valid Python (``ast.parse``), reading the first
    fenced code block when there is one (models often answer in markdown). Reference-free: it
    says the code is well-formed, not that it is right (that takes the function's tests)."""
    import ast

    def parses(text: str) -> bool:
        fenced = FENCED.search(text)
        try:
            ast.parse(fenced.group(1) if fenced else text)
        except (SyntaxError, ValueError):
            return False
        return True

    return {"python_parses": sum(map(parses, predictions)) / len(predictions)}


# ---------------------------------------------------------------------------------------------
# Perplexity from log-likelihoods


def perplexity_from_logprobs(token_logprobs: Sequence[float]) -> Scores:
    """Perplexity and bits per token from the natural-log probabilities of the scored tokens.

    Perplexity is ``exp`` of the mean negative log-likelihood per token, which is what
    ``exp(torch.nn.functional.cross_entropy(...))`` gives over the same tokens.
    """
    if not token_logprobs:
        raise UserError("perplexity needs at least one scored token", hint="check that the texts are not empty")
    nll = -math.fsum(token_logprobs) / len(token_logprobs)
    return {"nll_per_token": nll, "perplexity": math.exp(nll), "bits_per_token": nll / math.log(2), "tokens": len(token_logprobs)}


# ---------------------------------------------------------------------------------------------
# Registry and validation

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("accuracy", accuracy, None, "exact string match with any reference"),
        Metric("f1", f1, None, "macro and micro F1 over labels, one reference label per item"),
        Metric("exact_match", exact_match, None, "SQuAD v1.1 normalisation (lower, no punctuation/articles), any reference"),
        Metric("bleu", bleu, "sacrebleu", "corpus BLEU tok:13a smooth:exp; sentence mean with effective order"),
        Metric("chrf", _chrf(0, "chrf"), "sacrebleu", "chrF char_order 6, word_order 0, beta 2"),
        Metric("chrf++", _chrf(2, "chrf++"), "sacrebleu", "chrF++ char_order 6, word_order 2, beta 2"),
        Metric("rouge", rouge, "rouge-score", "F-measure, use_stemmer=True, best reference, mean over items"),
        Metric("meteor", meteor, "nltk", "meteor_score, WordNet 3.0, NLTKWordTokenizer, best reference, mean over items"),
        Metric("python_parses", python_parses, None, "ast.parse of the first fenced code block, else the whole prediction"),
    )
}


def get_metrics(names: Sequence[str]) -> list[Metric]:
    """Look up metric names, failing with the list of known ones on a typo."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise UserError(f"unknown metric {', '.join(map(repr, unknown))}", hint=f"known metrics: {', '.join(METRICS)}")
    if not names:
        raise UserError("no metric given", hint=f"known metrics: {', '.join(METRICS)}")
    return [METRICS[name] for name in names]


def check_inputs(predictions: Predictions, references: References) -> None:
    """Refuse inputs no metric can score, with a message that says which item is wrong."""
    if not predictions:
        raise UserError("no predictions to score", hint="the predictions file or data set is empty")
    if len(predictions) != len(references):
        raise UserError(
            f"{len(predictions)} predictions but {len(references)} reference sets",
            hint="give exactly one line/row of references per prediction",
        )
    for i, refs in enumerate(references):
        if not refs:
            raise UserError(f"item {i + 1} has no reference", hint="every prediction needs at least one reference")


def score(names: Sequence[str], predictions: Predictions, references: References) -> Scores:
    """Compute every named metric; keys are the metrics' own (``bleu``, ``rouge1``, ``f1_macro``...)."""
    metrics = get_metrics(names)
    check_inputs(predictions, references)
    result: Scores = {}
    for metric in metrics:
        result.update(metric.compute(predictions, references))
    return result


def settings(names: Sequence[str]) -> dict[str, str]:
    """The exact settings (and library versions) behind each named metric, for reports."""
    return {metric.name: metric.describe() for metric in get_metrics(names)}
