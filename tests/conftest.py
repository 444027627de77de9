"""Test-wide settings: never touch the network, keep runs deterministic and small."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(autouse=True)
def _private_score_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty base-score cache: a result stored by one test (perhaps with a patched
    model) must not answer another. Subprocesses still use the real cache, keyed by code and files."""
    from tunelab.evaluate import score_cache

    folder = tmp_path_factory.mktemp("eval_scores")
    monkeypatch.setattr(score_cache, "cache_dir", lambda: folder)
