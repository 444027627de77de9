"""Build the WordNet 3.0 archive that tunelab ships, so METEOR works after a plain ``pip install``.

nltk cannot download its ``wordnet`` corpus where there is no network, and an ``apt-get`` step
only helps root on Debian. So the dictionary files travel inside the package, made once by a
developer from Debian's ``wordnet-base`` and ``wordnet-sense-index`` packages (WordNet 3.0; its
licence allows redistribution with its notice, shipped next to the archive). Debian has no
``lexnames`` file, which nltk's reader opens first; it is rebuilt here from the table in
Debian's own ``lexnames(5WN)`` manual page, so no number in it is typed by hand.

Refresh the shipped copy with::

    apt-get install -y wordnet-base wordnet-sense-index
    python -m tunelab.evaluate.wordnet_archive /usr/share/wordnet /usr/share/man/man5/lexnames.5WN.gz
"""

from __future__ import annotations

import gzip
import io
import re
import sys
import tarfile
from pathlib import Path

from tunelab import atomic
from tunelab.evaluate.wordnet import ARCHIVE, DICT_FILES

# lexnames(5WN): "The syntactic category field is encoded as follows: 1 NOUN, 2 VERB, 3 ADJECTIVE, 4 ADVERB".
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_TABLE_ROW = re.compile(r"^(\d\d)\t(\w+\.\w+)\s*\t")


def lexnames_from_manpage(manpage: Path) -> str:
    """The ``lexnames`` file (``NN<TAB>name<TAB>category`` per line) read from the man page's table."""
    text = gzip.decompress(manpage.read_bytes()).decode("utf-8")
    rows = [m.groups() for m in map(_TABLE_ROW.match, text.splitlines()) if m]
    if [int(number) for number, _ in rows] != list(range(len(rows))) or not rows:
        raise ValueError(f"{manpage}: lexicographer file table not found or out of order")
    return "".join(f"{number}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for number, name in rows)


def build_archive(dict_dir: Path, manpage: Path, out: Path = ARCHIVE) -> None:
    """Write ``out``: a reproducible tar.gz of the files nltk's WordNet reader opens."""
    members = {name: (dict_dir / name).read_bytes() for name in DICT_FILES if name != "lexnames"}
    members["lexnames"] = lexnames_from_manpage(manpage).encode("ascii")
    buffer = io.BytesIO()
    # mtime=0 in both the gzip header and the tar entries: the same inputs give the same bytes.
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(members):
                info = tarfile.TarInfo(name)
                info.size = len(members[name])
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(members[name]))
    atomic.write_bytes(out, buffer.getvalue())


if __name__ == "__main__":
    build_archive(Path(sys.argv[1]), Path(sys.argv[2]))
