"""The shipped WordNet works from a fresh cache with nothing installed, and says so when it is gone."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import nltk
import pytest

from tunelab.errors import UserError
from tunelab.evaluate import wordnet
from tunelab.evaluate.wordnet_archive import build_archive, lexnames_from_manpage

DEBIAN_DICT = Path("/usr/share/wordnet")
DEBIAN_LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    wordnet.load_wordnet.cache_clear()
    yield tmp_path / "cache"
    wordnet.load_wordnet.cache_clear()


def test_archive_holds_every_file_nltk_reader_opens():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    with tarfile.open(wordnet.ARCHIVE) as tar:
        names = set(tar.getnames())
        lexnames = tar.extractfile("lexnames").read().decode().splitlines()
    assert names == set(WordNetCorpusReader._FILES)
    assert len(lexnames) == 45  # "synsets are organized into forty-five lexicographer files" (lexnames(5WN))
    assert lexnames[0].split("\t") == ["00", "adj.all", "3"] and lexnames[-1].split("\t") == ["44", "adj.ppl", "3"]


def test_loads_from_a_fresh_cache_even_with_a_group_writable_umask(fresh_cache):
    # nltk 3.10 refuses corpus files another account could write; a umask of 002 must not matter.
    old = os.umask(0o002)
    try:
        reader = wordnet.load_wordnet()
    finally:
        os.umask(old)
    assert {lemma.name() for lemma in reader.synset("car.n.01").lemmas()} >= {"car", "auto", "automobile"}
    extracted = next(fresh_cache.glob("nltk_data-*/corpora/wordnet"))
    assert all(not (p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)) for p in extracted.iterdir())


def test_missing_wordnet_is_a_clear_error_not_exact_match_scoring(fresh_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(wordnet, "ARCHIVE", tmp_path / "absent.tar.gz")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="METEOR needs WordNet"):
        from tunelab.evaluate.metrics import score

        score(["meteor"], ["he bought an auto"], [["he bought a car"]])


@pytest.mark.skipif(not DEBIAN_DICT.is_dir(), reason="Debian wordnet-base/wordnet-sense-index not installed")
def test_shipped_archive_is_rebuilt_byte_for_byte_from_debian(tmp_path):
    out = tmp_path / "wordnet.tar.gz"
    build_archive(DEBIAN_DICT, DEBIAN_LEXNAMES_MAN, out)
    assert out.read_bytes() == wordnet.ARCHIVE.read_bytes()


@pytest.mark.skipif(not DEBIAN_LEXNAMES_MAN.is_file(), reason="Debian wordnet-base not installed")
def test_lexnames_is_read_from_the_manual_page_table():
    rows = [line.split("\t") for line in lexnames_from_manpage(DEBIAN_LEXNAMES_MAN).splitlines()]
    assert ["18", "noun.person", "1"] in rows and ["29", "verb.body", "2"] in rows and ["02", "adv.all", "4"] in rows
