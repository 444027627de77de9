"""WordNet for METEOR, from the copy shipped inside tunelab: no download, no root, no apt.

METEOR counts synonyms through WordNet. nltk normally downloads its ``wordnet`` corpus at run
time, which fails offline, and a missing WordNet must never silently turn METEOR into an
exact-match score. So tunelab ships WordNet 3.0 as one compressed archive (package data, built by
``wordnet_archive.py``) and unpacks it once into its cache, where nltk's own reader opens it.

nltk 3.10 only reads corpus files under one of its data roots, owned by this account (or root)
and not writable by others, and refuses symlinks that lead out of the root; so the archive is
extracted as real files with explicit modes into ``<root>/corpora/wordnet`` (nltk's reader
looks itself up under that name to map sense keys between versions), and ``<root>`` is added to
``nltk.data.path``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tarfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab import atomic
from tunelab.errors import UserError

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

ARCHIVE = Path(__file__).with_name("wordnet") / "wordnet-3.0.tar.gz"

#: The files nltk's ``WordNetCorpusReader`` opens (its ``_FILES``), all shipped in the archive.
DICT_FILES = (
    "lexnames",
    "cntlist.rev",
    "index.sense",
    *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("adj", "adv", "noun", "verb")),
    *(f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")),
)


@functools.lru_cache(maxsize=1)
def load_wordnet() -> WordNetCorpusReader:
    """nltk's WordNet reader over the shipped copy (else nltk's own ``wordnet``, else a UserError)."""
    if ARCHIVE.is_file():
        return _reader(_extracted(ARCHIVE))
    import nltk

    try:
        nltk.corpus.wordnet.ensure_loaded()
    except LookupError:
        raise UserError(
            f"METEOR needs WordNet, and neither tunelab's copy ({ARCHIVE}) nor nltk's 'wordnet' corpus is installed",
            hint="reinstall tunelab with its package data, or run: python -m nltk.downloader wordnet",
        ) from None
    return nltk.corpus.wordnet


def _extracted(archive: Path) -> Path:
    """Unpack ``archive`` once into the cache (keyed by its content) and return that folder."""
    from tunelab.models.cache import cache_root

    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    data_root = cache_root() / f"nltk_data-{digest}"
    target = data_root / "corpora" / "wordnet"
    if not (target / ".complete").exists():
        with atomic.directory(target) as tmp, tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
            (tmp / ".complete").write_text(str(archive))
    _make_unwritable_by_others(data_root)
    _allow_nltk_root(data_root)
    return target


def _make_unwritable_by_others(root: Path) -> None:
    """nltk checks every folder from its data root down and every file in a corpus: whatever the
    umask was when they were created, none may be group- or world-writable."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def _allow_nltk_root(root: Path) -> None:
    import nltk

    if str(root) not in map(str, nltk.data.path):
        nltk.data.path.append(str(root))


def _reader(directory: Path) -> WordNetCorpusReader:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    with warnings.catch_warnings():
        # "multilingual functions are not available": METEOR only needs English WordNet.
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(str(directory), None)
