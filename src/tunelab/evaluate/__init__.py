"""Evaluation: reference-exact metrics, zero-/few-shot baselines, fine-tuned runs, human review.

Entry points (imported from their modules, so ``import tunelab`` stays light):

- ``metrics.score(names, predictions, references)`` and ``metrics.METRICS``: accuracy, F1,
  exact match, BLEU, chrF/chrF++, ROUGE, METEOR (WordNet shipped, see ``wordnet``), and
  ``metrics.perplexity_from_logprobs``.
- ``pipeline.run_eval(recipe, overrides, base, runs, out_dir)`` / ``pipeline.eval_after_training``:
  the base model at each k shots and each run, one table (``report``), per-item predictions.
- ``tasks``: generation, choice (option log-likelihood), classification (trained head), perplexity.
- ``human_export.export_review`` and ``human_stats.summarize``: blinded side-by-side review.
"""
