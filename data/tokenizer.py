"""GPT-2 BPE through tiktoken, working without OpenAI's blob host.

tiktoken's `r50k_base` encodes exactly like `gpt2`, and needs one vocab file, which tiktoken
looks for in its cache dir under sha1(url). install() puts it there: from OpenAI's host if
reachable, else from the `openai-whisper` sdist on PyPI, which ships the byte-identical file.

Usage (the README's install step):
    python data/tokenizer.py
"""
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tiktoken

from data.shards import DataError

EOT = 50256
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"


def tiktoken_cache_dir():
    """The dir tiktoken reads cached files from (same rule as tiktoken.load.read_file_cached)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def vocab_path():
    return os.path.join(tiktoken_cache_dir(), hashlib.sha1(VOCAB_URL.encode()).hexdigest())


def _is_valid(path):
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest() == VOCAB_SHA256


def _from_openai(timeout):
    """The vocab from OpenAI's host; urllib with a timeout, as tiktoken's own fetch has none."""
    with urllib.request.urlopen(VOCAB_URL, timeout=timeout) as r:
        return r.read()


def _from_pypi():
    """The vocab out of the openai-whisper sdist, fetched by pip (no install, no deps)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", WHISPER_SDIST, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            lines = (run.stderr or run.stdout).strip().splitlines()
            raise RuntimeError(f"pip download {WHISPER_SDIST} failed: {lines[-1] if lines else run.returncode}")
        (sdist,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        with tarfile.open(sdist) as tar:
            return tar.extractfile(WHISPER_MEMBER).read()


def install(try_openai=True, timeout=10):
    """Make sure tiktoken's cache holds the r50k_base vocab (checked by sha256); return its path."""
    path = vocab_path()
    if _is_valid(path):
        return path
    if not tiktoken_cache_dir():
        raise DataError("TIKTOKEN_CACHE_DIR is empty, which turns tiktoken's cache off; unset it or name a dir")
    sources = [("OpenAI", lambda: _from_openai(timeout))] if try_openai else []
    errors = []
    for name, fetch in sources + [("PyPI", _from_pypi)]:
        try:
            data = fetch()
        except Exception as e:  # network down, host blocked, pip missing: try the next source
            errors.append(f"{name}: {e}")
            continue
        if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
            errors.append(f"{name}: sha256 mismatch")
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path
    raise DataError(f"could not fetch the GPT-2 vocab ({'; '.join(errors)}); allow access to pypi.org "
                    f"or copy r50k_base.tiktoken (sha256 {VOCAB_SHA256[:12]}...) to {path}")


def get_encoding():
    """tiktoken's GPT-2 encoding (r50k_base), installing the vocab first if it is missing."""
    if not os.path.isfile(vocab_path()):
        install()
    return tiktoken.get_encoding("r50k_base")


def main():
    try:
        path = install()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    enc = get_encoding()
    text = "Hello, I'm a language model,"
    print(f"GPT-2 vocab at {path} (n_vocab {enc.n_vocab})")
    print(f"{text!r} -> {enc.encode_ordinary(text)}")


if __name__ == "__main__":
    main()
