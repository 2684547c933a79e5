"""Our GPT-2 encoding against two independent ones built from GPT-2's original vocab.json/merges.txt."""
import hashlib
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


@pytest.fixture(scope="session")
def gpt2_files():
    """vocab.json and merges.txt from the openai-whisper 20230124 sdist, fetched once into data/cache/."""
    dest = os.path.join(CACHE, "gpt2-hf")
    paths = [os.path.join(dest, name) for name in ("vocab.json", "merges.txt")]
    if not all(map(os.path.isfile, paths)):
        # `pip download` of this old sdist fails on its metadata, so take the URL from PyPI's JSON API
        with urllib.request.urlopen(WHISPER_JSON, timeout=60) as r:
            (sdist,) = [u for u in json.load(r)["releases"]["20230124"] if u["packagetype"] == "sdist"]
        with urllib.request.urlopen(sdist["url"], timeout=60) as r:
            blob = r.read()
        assert hashlib.sha256(blob).hexdigest() == sdist["digests"]["sha256"]
        os.makedirs(dest, exist_ok=True)
        tar_path = os.path.join(dest, sdist["filename"])
        with open(tar_path, "wb") as f:
            f.write(blob)
        with tarfile.open(tar_path) as tar:
            for path in paths:
                data = tar.extractfile(ASSETS + os.path.basename(path)).read()
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)
        os.remove(tar_path)
    return paths


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


def test_install_from_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert tokenizer.tiktoken_cache_dir() == str(tmp_path)
    path = tokenizer.install(try_openai=False)  # the path a machine without OpenAI's host takes
    assert path == str(tmp_path / hashlib.sha1(tokenizer.VOCAB_URL.encode()).hexdigest())
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tokenizer.VOCAB_SHA256
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temp files left behind
    assert tokenizer.install() == path  # already there: no download


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
