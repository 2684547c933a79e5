"""Our GPT-2 encoding against two independent ones built from GPT-2's original vocab.json/merges.txt."""
import contextlib
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import tokenizer  # noqa: E402

CACHE = os.path.join(ROOT, "data", "cache")
WHISPER_JSON = "https://pypi.org/pypi/openai-whisper/json"
ASSETS = "openai-whisper-20230124/whisper/assets/gpt2/"

TEXTS = [
    "Hello, I'm a language model,",
    "The quick brown fox jumps over the lazy dog. THE END!!!",
    "naïve café, Straße, 東京, Привет мир, مرحبا, 🙂🚀👩‍👩‍👧 ok",
    "spaces:  two,   three,\t\ttabs,\n\n\nnewlines  \n  trailing   ",
    "   leading spaces and a trailing one ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: pass",
    "Numbers 1234567890 3.14159 -42 1e-9 $1,000,000 100% 2024-01-01",
    "Contractions: don't, I'll, we've, they're, she'd, it's, I'M, 'quoted'",
    "<|endoftext|> is plain text here, and so is <|endoftext|>",
    "",
    "\u0000\u0001\x7f control \ufeff bom \u200b zwsp",
]


def index_reachable(timeout=10):
    """A quick probe: does pypi.org answer at all?"""
    try:
        urllib.request.urlopen(urllib.request.Request("https://pypi.org/simple/pip/", method="HEAD"), timeout=timeout)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def package_index():
    """Around the network part of a `network` test: if it fails while pypi.org is unreachable, fail saying
    so in one line (an outage, not a bug); if pypi.org answers, the error is real and shows as it is."""
    try:
        yield
    except Exception as e:
        if index_reachable():
            raise
        pytest.fail(f"network test: the package index (pypi.org) is unreachable, so this could not be checked "
                    f"({type(e).__name__}: {e}); offline, run pytest -m 'not network'", pytrace=False)


def test_network_failure_says_whether_the_index_was_reachable(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "index_reachable", lambda: False)
    with pytest.raises(pytest.fail.Exception, match=r"the package index \(pypi.org\) is unreachable.*OSError: boom"):
        with package_index():
            raise OSError("boom")
    monkeypatch.setattr(sys.modules[__name__], "index_reachable", lambda: True)
    with pytest.raises(OSError, match="boom"):  # the index answers: a real failure, shown as it is
        with package_index():
            raise OSError("boom")


def fetch_gpt2_files(dest):
    """vocab.json and merges.txt from the openai-whisper 20230124 sdist into dest, unless there already."""
    paths = [os.path.join(dest, name) for name in ("vocab.json", "merges.txt")]
    if not all(map(os.path.isfile, paths)):
        # `pip download` of this old sdist fails on its metadata, so take the URL from PyPI's JSON API
        with urllib.request.urlopen(WHISPER_JSON, timeout=60) as r:
            (sdist,) = [u for u in json.load(r)["releases"]["20230124"] if u["packagetype"] == "sdist"]
        with urllib.request.urlopen(sdist["url"], timeout=60) as r:
            blob = r.read()
        assert hashlib.sha256(blob).hexdigest() == sdist["digests"]["sha256"]
        os.makedirs(dest, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            for path in paths:
                data = tar.extractfile(ASSETS + os.path.basename(path)).read()
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)
    return paths


@pytest.fixture(scope="session")
def gpt2_files():
    """GPT-2's original vocab.json and merges.txt, fetched once into data/cache/gpt2-hf (network)."""
    with package_index():
        return fetch_gpt2_files(os.path.join(CACHE, "gpt2-hf"))


def targz(members):
    """The bytes of a .tar.gz holding {name: bytes}: a stand-in for an sdist from the package index."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="session")
def vocab_bytes():
    """The real r50k_base vocab, from tiktoken's cache (`python data/tokenizer.py` put it there)."""
    with package_index(), open(tokenizer.install(), "rb") as f:
        return f.read()


@pytest.fixture(scope="session")
def references(gpt2_files):
    """(Hugging Face GPT2TokenizerFast, tiktoken's own "gpt2" Encoding), both from the original files."""
    import tiktoken
    import tiktoken_ext.openai_public
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from transformers import GPT2TokenizerFast

    vocab, merges = gpt2_files
    hf = GPT2TokenizerFast.from_pretrained(os.path.dirname(vocab))  # the dir holds just these two files
    assert len(hf) == 50257
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files without copying them into the cache
        ranks = data_gym_to_mergeable_bpe_ranks(merges, vocab)
    tk = tiktoken.Encoding(name="gpt2-from-files", pat_str=tiktoken_ext.openai_public.r50k_pat_str,
                           mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    return hf, tk


@pytest.mark.network
@pytest.mark.parametrize("text", TEXTS)
def test_matches_independent_gpt2(references, text):
    hf, tk = references
    ours = tokenizer.get_encoding().encode_ordinary(text)
    assert ours == tk.encode_ordinary(text)
    assert ours == hf(text, split_special_tokens=True)["input_ids"]  # special text as plain text, like ours
    assert tokenizer.get_encoding().decode(ours) == text


def test_vocab_and_eot():
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == tokenizer.EOT == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT]
    assert tokenizer.EOT not in enc.encode_ordinary("<|endoftext|>")


def fresh_cache(tmp_path, monkeypatch):
    """tiktoken's cache in tmp_path, and no encoding loaded yet, so get_encoding() reads the vocab file."""
    import tiktoken.registry
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    return tokenizer.vocab_path()


def local_fetchers(monkeypatch, vocab, pypi_ok=True):
    """OpenAI's host down; the package index serves a whisper sdist holding `vocab` (or is down). Returns the
    list of sdists asked for."""
    asked = []

    def pip_sdist(spec):
        asked.append(spec)
        if not pypi_ok:
            raise tokenizer.DataError(f"pip download {spec} failed: no route to host")
        return targz({tokenizer.WHISPER_MEMBER: vocab})

    def offline(*args, **kwargs):
        raise OSError("no route to host")
    monkeypatch.setattr(tokenizer, "_from_openai", offline)
    monkeypatch.setattr(tokenizer, "pip_sdist", pip_sdist)
    monkeypatch.setattr("tiktoken.load.read_file", offline)  # tiktoken's own fetch, from OpenAI's host
    return asked


def check_installed(path, tmp_path):
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tokenizer.VOCAB_SHA256
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temp files left behind


def test_install_from_local_index(tmp_path, monkeypatch, vocab_bytes):
    """The path a machine without OpenAI's host takes, with the package index served locally."""
    path = fresh_cache(tmp_path, monkeypatch)
    asked = local_fetchers(monkeypatch, vocab_bytes)
    assert path == str(tmp_path / hashlib.sha1(tokenizer.VOCAB_URL.encode()).hexdigest())
    assert tokenizer.install() == path and asked == [tokenizer.WHISPER_SDIST]
    check_installed(path, tmp_path)
    assert tokenizer.install() == path and len(asked) == 1  # already there: no download


@pytest.mark.network
def test_install_from_pypi(tmp_path, monkeypatch):
    path = fresh_cache(tmp_path, monkeypatch)
    with package_index():
        assert tokenizer.install(try_openai=False) == path  # the real package index
    check_installed(path, tmp_path)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b.replace(b"IQ==", b"IR==")],
                         ids=["truncated", "empty", "edited"])
def test_get_encoding_reinstalls_a_damaged_vocab(tmp_path, monkeypatch, vocab_bytes, damage):
    """A truncated, empty or edited vocab in tiktoken's cache is caught by its sha256 and fetched again."""
    path = fresh_cache(tmp_path, monkeypatch)
    asked = local_fetchers(monkeypatch, vocab_bytes)
    with open(path, "wb") as f:
        f.write(damage(vocab_bytes))
    enc = tokenizer.get_encoding()
    assert enc.encode_ordinary("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert asked == [tokenizer.WHISPER_SDIST]
    check_installed(path, tmp_path)


def test_damaged_vocab_with_no_source_names_the_file(tmp_path, monkeypatch, vocab_bytes):
    path = fresh_cache(tmp_path, monkeypatch)
    local_fetchers(monkeypatch, vocab_bytes, pypi_ok=False)
    with open(path, "wb") as f:
        f.write(vocab_bytes[:1000])
    with pytest.raises(tokenizer.DataError) as e:
        tokenizer.get_encoding()
    message = str(e.value)
    assert f"{path} is damaged (sha256 mismatch)" in message and "OpenAI: no route to host" in message
    assert f"pip download {tokenizer.WHISPER_SDIST} failed" in message and "\n" not in message
    local_fetchers(monkeypatch, vocab_bytes[:-1])  # the index serves a bad copy: refused, never written
    with pytest.raises(tokenizer.DataError, match="PyPI: sha256 mismatch"):
        tokenizer.install()
    assert os.path.getsize(path) == 1000


def test_fetch_gpt2_files_from_local_index(tmp_path, monkeypatch):
    """The reference files' fetcher, with PyPI's JSON API and file host served locally."""
    blob = targz({ASSETS + "vocab.json": b'{"a": 0}', ASSETS + "merges.txt": b"#version: 0.2\n"})
    release = {"packagetype": "sdist", "url": "https://files/whisper.tar.gz",
               "digests": {"sha256": hashlib.sha256(blob).hexdigest()}}
    pages = {WHISPER_JSON: json.dumps({"releases": {"20230124": [release]}}).encode(), release["url"]: blob}
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(pages[url]))
    vocab, merges = fetch_gpt2_files(str(tmp_path / "gpt2-hf"))
    assert open(vocab, "rb").read() == b'{"a": 0}' and open(merges, "rb").read() == b"#version: 0.2\n"
    assert sorted(os.listdir(tmp_path / "gpt2-hf")) == ["merges.txt", "vocab.json"]


@pytest.mark.network
def test_exported_padded_model_works_with_hf_tokenizer_and_pipeline(tmp_path, references):
    """A model trained with vocab 50304 exports to the 50257 real tokens: HF's tokenizer and pipeline run it."""
    import torch
    from transformers import pipeline

    from model import GPT, GPTConfig
    hf_tok, _ = references
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).eval()
    model.save_pretrained(str(tmp_path / "m"), vocab_size=50257)
    gen = pipeline("text-generation", model=str(tmp_path / "m"), tokenizer=hf_tok, device="cpu")
    text = gen("Hello, I'm a language model,", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    prompt = torch.tensor([tokenizer.get_encoding().encode("Hello, I'm a language model,")])
    ours = GPT.from_pretrained(str(tmp_path / "m")).generate(prompt, 8, temperature=0)
    assert text == tokenizer.get_encoding().decode(ours[0].tolist())
