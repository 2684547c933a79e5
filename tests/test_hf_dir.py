"""A saved model directory is a complete Hugging Face model: AutoTokenizer, pipeline("text-generation") and
GPT2LMHeadModel load it offline, and its tokenizer encodes as tiktoken's GPT-2 encoding does."""
import contextlib
import json
import os
import shutil
import socket
from dataclasses import asdict

import pytest
import torch

import hf
from data.tokenizer import get_encoding
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
PROMPT = "Hello, I'm a language model,"
TEXTS = [
    "   leading spaces, two  and three   inside, trailing   ",
    "tabs\tand\t\ttabs, newlines\n\n\nand\r\nCRLF \n  \n",
    "12345 678 3.14159 -42 $1,000,000 2024-01-01 1e-9",
    "don't, I'll, we've, they're, she'd, it's, I'M, the cat's 's 't ' s ''",
    "naïve café, Straße, 東京, Привет мир, مرحبا, 🙂🚀👩‍👩‍👧 ok \u200b\ufeff\x00\x7f",
    "<|endoftext|>a document<|endoftext|> and <|endoftext|>another <|endoftext",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    " ",
    "",
]


@contextlib.contextmanager
def offline(mp):
    """HF's offline switches on, and any socket connection an error: nothing here may reach the network."""
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)  # read once, at import
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    with offline(monkeypatch):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """(the tiny random GPT with GPT-2's vocabulary, the directory save_pretrained wrote it to)."""
    with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG left as it was
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    path = str(tmp_path_factory.mktemp("hf") / "model")
    model.save_pretrained(path)  # may install GPT-2's vocab into tiktoken's cache first: network allowed here
    return model, path


@pytest.fixture(scope="module")
def auto_tokenizer(model_dir):
    from transformers import AutoTokenizer
    with pytest.MonkeyPatch.context() as mp, offline(mp):
        return AutoTokenizer.from_pretrained(model_dir[1])


def test_dir_holds_a_complete_model(model_dir):
    path = model_dir[1]
    assert sorted(os.listdir(path)) == sorted(["config.json", "model.safetensors", "generation_config.json",
                                               *TOKENIZER_FILES])  # and no .tmp left behind
    tokenizer_config = json.load(open(os.path.join(path, "tokenizer_config.json")))
    assert tokenizer_config["model_max_length"] == 64  # the model's n_positions
    assert json.load(open(os.path.join(path, "special_tokens_map.json"))) == {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    assert json.load(open(os.path.join(path, "generation_config.json"))) == {
        "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256}
    vocab = json.load(open(os.path.join(path, "vocab.json"), encoding="utf-8"))
    merges = open(os.path.join(path, "merges.txt"), encoding="utf-8").read().splitlines()
    assert len(vocab) == 50257 and sorted(vocab.values()) == list(range(50257)) and vocab["<|endoftext|>"] == 50256
    assert merges[0].startswith("#version") and len(merges) == 1 + 50000 and merges[1:3] == ["Ġ t", "Ġ a"]
    alphabet = hf.bytes_to_unicode()
    enc = get_encoding()
    assert all(vocab["".join(alphabet[b] for b in enc.decode_single_token_bytes(i))] == i for i in range(50256))


def test_write_dir_order_and_what_a_classifier_gets(tmp_path, monkeypatch):
    """Weights first, tokenizer files next, config.json last (it marks a complete directory); a classifier
    (GPT2ForSequenceClassification) gets the tokenizer but no generation_config.json."""
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    config = {**hf.config_to_hf(asdict(model.config)), "architectures": ["GPT2ForSequenceClassification"]}
    renamed, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(os.path.basename(dst)), real_replace(src, dst)))
    hf.write_dir(str(tmp_path / "clf"), hf.ours_to_hf(model.state_dict()), config)
    assert renamed[0] == "model.safetensors" and renamed[-1] == "config.json"
    assert sorted(renamed[1:-1]) == TOKENIZER_FILES
    assert sorted(os.listdir(tmp_path / "clf")) == sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
    assert hf.gpt2_bpe_files() is hf.gpt2_bpe_files()  # converted once per process


def test_small_vocab_dir_has_no_tokenizer_files(tmp_path):
    """A model with a vocabulary smaller than GPT-2's (a ckpt_* dir of a byte-level run) gets no tokenizer."""
    model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    path = str(tmp_path / "ckpt_000005")
    hf.write_dir(path, hf.ours_to_hf(model.state_dict()), hf.config_to_hf(asdict(model.config)))
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("text", TEXTS)
def test_auto_tokenizer_encodes_as_tiktoken(auto_tokenizer, text):
    expected = get_encoding().encode(text, allowed_special={"<|endoftext|>"})
    ids = auto_tokenizer.encode(text)
    assert ids == expected
    assert auto_tokenizer.decode(ids) == text


def test_auto_tokenizer_on_a_long_text(auto_tokenizer):
    """The README and this file's source, some 20 KB of prose, code, tables and odd spacing."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read() + open(__file__, encoding="utf-8").read()
    ids = auto_tokenizer.encode(text)
    assert ids == get_encoding().encode(text, allowed_special={"<|endoftext|>"})
    assert auto_tokenizer.decode(ids) == text
    assert auto_tokenizer.eos_token_id == auto_tokenizer.bos_token_id == 50256


def test_every_token_is_its_own_encoding(model_dir):
    """tiktoken takes a pre-tokenized piece that is in the vocabulary as that one token; HF's BPE must get there by
    merges: check it does for all 50256 tokens (tokenizer.json, as the `tokenizers` library reads it)."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(model_dir[1], "tokenizer.json"))
    bpe, vocab = tokenizer.model, tokenizer.get_vocab()
    assert len(vocab) == 50257
    assert [t for t, i in vocab.items() if [tok.id for tok in bpe.tokenize(t)] != [i]] == ["<|endoftext|>"]


def test_vocab_and_merges_alone_encode_the_same(model_dir, tmp_path):
    """Without tokenizer.json, HF builds the tokenizer from vocab.json and merges.txt (the files older tools read)."""
    from transformers import AutoTokenizer
    path = str(tmp_path / "no_tokenizer_json")
    shutil.copytree(model_dir[1], path, ignore=shutil.ignore_patterns("tokenizer.json", "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = get_encoding()
    for text in TEXTS:
        assert tokenizer.encode(text) == enc.encode(text, allowed_special={"<|endoftext|>"}), text


def test_pipeline_generates_as_our_model(model_dir):
    """pipeline("text-generation") takes the dir as it is, offline; greedy, it picks our model's tokens."""
    from transformers import pipeline
    model, path = model_dir
    generator = pipeline("text-generation", model=path, device="cpu")
    assert generator.model.generation_config.pad_token_id == 50256  # no "Setting pad_token_id" for open-ended text
    kwargs = dict(max_new_tokens=5, do_sample=False)
    text = generator(PROMPT, **kwargs)[0]["generated_text"]
    ids = generator(PROMPT, return_tensors=True, **kwargs)[0]["generated_token_ids"]
    prompt = torch.tensor(get_encoding().encode(PROMPT))
    ours = model.generate(prompt, 5, temperature=0)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert list(ids) == ours.tolist()
    assert text == get_encoding().decode(ours.tolist())
