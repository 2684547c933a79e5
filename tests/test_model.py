"""model.py (and hf.py, generate.py behind it) against Hugging Face GPT-2 on random weights: names, logits,
loss, generation, export."""
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_hf
from generate import KVCache, sample_next
from hf import config_from_hf, config_to_hf, hf_to_ours, ours_to_hf
from model import GPT, GPT2_SHAPES, GPTConfig, param_counts
from optim import configure_optimizers


def test_state_dict_keys_are_hf_keys(tiny_hf):
    hf, _ = tiny_hf
    ours = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert list(ours.state_dict()) == list(theirs)
    for k, v in ours.state_dict().items():
        expect = (theirs[k].t().shape if k.endswith(".weight") and ("c_attn" in k or "c_proj" in k or "c_fc" in k)
                  else theirs[k].shape)
        assert v.shape == expect, k
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_logits_and_loss_match_hf(tiny_hf):
    hf, path = tiny_hf
    model = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 128, (3, 40))
    targets = idx.clone()
    targets[:, :5] = -100  # ignored, as in HF
    targets[:, -1] = -100  # HF's shifted loss has no target for the last position
    logits, none = model(idx)
    with_targets, loss = model(idx, targets)  # (logits, loss), as nanoGPT and HF give them
    ref = hf(idx).logits
    assert none is None and with_targets.shape == (3, 40, 128) and torch.equal(with_targets, logits)
    assert torch.equal(with_targets.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    ref_loss = torch.nn.functional.cross_entropy(ref.view(-1, 128), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # HF shifts labels itself: same numbers through its own loss
    hf_loss = hf(idx, labels=torch.cat([idx[:, :1], targets[:, :-1]], dim=1)).loss
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint16, torch.uint8], ids=str)
def test_sliced_integer_and_1d_inputs_match_hf(tiny_hf, dtype):
    """What users pass: idx[:, :-1] and idx[:, 1:] (non-contiguous views), any integer dtype, one sequence (T,)."""
    hf, path = tiny_hf
    model = GPT.from_pretrained(path).eval()
    seq = torch.randint(0, 128, (3, 41))
    idx, targets = seq.to(dtype)[:, :-1], seq.to(dtype)[:, 1:]
    assert not idx.is_contiguous() and not targets.is_contiguous()
    with torch.no_grad():
        ref_logits = hf(seq[:, :-1]).logits  # (3, 40, vocab)
        ref_loss = hf(seq, labels=seq).loss  # HF shifts labels itself: position t predicts seq[t + 1], as our targets
        ref_hidden = hf.transformer(seq[0]).last_hidden_state  # HF's GPT2Model keeps a 1-D input unbatched: (T, C)
        torch.testing.assert_close(model(idx)[0], ref_logits, rtol=1e-5, atol=1e-5)
        logits, loss = model(idx, targets)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.transformer(idx.long()), hf.transformer(seq[:, :-1]).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        # one sequence (T,): unbatched results
        torch.testing.assert_close(model(idx[0])[0], ref_logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(idx[0], targets[0])[1], hf(seq[:1], labels=seq[:1]).loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.transformer(seq[:1])[0], ref_hidden, rtol=1e-5, atol=1e-5)
    loss = model(idx, targets)[1]  # gradients flow through the same checks
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_generate_takes_sliced_int32_and_1d_prompts(tiny_hf):
    hf, path = tiny_hf
    model = GPT.from_pretrained(path).eval()
    seq = torch.randint(0, 128, (2, 8))
    prompt = seq.int()[:, 1:]  # (2, 7) int32, non-contiguous
    ref = hf.generate(seq[:, 1:], attention_mask=torch.ones_like(seq[:, 1:]), max_new_tokens=10, do_sample=False,
                      pad_token_id=0)  # (2, 17) int64
    out = model.generate(prompt, 10, temperature=0)
    assert out.dtype == torch.int64 and torch.equal(out, ref)
    one = model.generate(prompt[1], 10, temperature=0)  # (T,) -> (T + 10,)
    assert one.shape == (17,) and torch.equal(one, ref[1])
    steps = list(model.generate_stream(prompt[1], 10, temperature=0))
    assert [tuple(s.shape) for s in steps] == [(1,)] * 10 and torch.equal(torch.cat(steps), ref[1, 7:])


def test_misused_inputs_are_clear_errors():
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    idx = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets \(2, 7\) and idx \(2, 8\) must have the same shape"):
        model(idx, idx[:, 1:])
    with pytest.raises(ValueError, match=r"targets \(8,\) and idx \(2, 8\)"):
        model(idx, idx[0])
    with pytest.raises(ValueError, match="idx must be a tensor of integer token ids, got torch.float32"):
        model(idx.float())
    with pytest.raises(ValueError, match="targets must be a tensor of integer token ids, got torch.float32"):
        model(idx, idx.float())
    with pytest.raises(ValueError, match="idx must be a tensor of integer token ids, got list"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"idx must be \(B, T\) or one sequence \(T,\), got shape \(1, 2, 8\)"):
        model(idx[None])
    with pytest.raises(ValueError, match="idx must be a tensor of integer token ids, got torch.float32"):
        model.generate(idx.float(), 3)
    with pytest.raises(ValueError, match="n_embd 9 must be divisible by n_head 2"):
        GPT(GPTConfig(n_embd=9, n_head=2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k must be >= 1"), (dict(top_k=-3), "top_k must be >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(idx=torch.zeros(2, 0, dtype=torch.long)), "empty prompt"),
    (dict(idx=torch.zeros(0, dtype=torch.long)), "empty prompt"),
])
def test_bad_generation_arguments_are_clear_errors(kwargs, match):
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    args = {"idx": torch.zeros(2, 3, dtype=torch.long), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(**args)
    with pytest.raises(ValueError, match=match):
        model.generate_stream(**args)  # at the call, before the first token is asked for
    ok = model.generate(torch.zeros(2, 3, dtype=torch.long), 2, temperature=0.5, top_k=None, top_p=1.0)
    assert ok.shape == (2, 5) and model.generate(torch.zeros(2, 3, dtype=torch.long), 0).shape == (2, 3)


def test_full_124m_config_matches_hf(tmp_path):
    hf, path = make_hf(tmp_path, n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    model = GPT.from_pretrained(path).eval()
    assert param_counts(model.config)["total"] == sum(p.numel() for p in model.parameters()) == 124_439_808
    idx = torch.randint(0, 50257, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_causal(tiny_hf):
    model = GPT.from_pretrained(tiny_hf[1]).eval()
    idx = torch.randint(0, 128, (1, 20))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 128
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_initial_loss_is_near_uniform():
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=64))
    idx, targets = torch.randint(0, 50257, (2, 4, 64))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(50304)) < 0.1


def test_too_long_sequence_is_a_clear_error():
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_greedy_generation_matches_hf(tiny_hf):
    hf, path = tiny_hf
    model = GPT.from_pretrained(path).eval()
    prompt = torch.randint(0, 128, (2, 7))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(model.generate(prompt, 30, temperature=0), ref)


def test_kv_cache_equals_recomputing_the_context(tiny_hf):
    model = GPT.from_pretrained(tiny_hf[1]).eval()
    ctx = torch.randint(0, 128, (3, 5))
    fast = model.generate(ctx, 40, temperature=0)
    for _ in range(40):  # reference: the whole context through the model for every token
        ctx = torch.cat([ctx, model(ctx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, ctx)
    # sampled generation: same tokens from the same seed, different from another seed
    gen = lambda seed: model.generate(ctx[:, :5], 20, top_k=20, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(gen(1), gen(1)) and not torch.equal(gen(1), gen(2))


def test_generation_slides_the_window_past_block_size(tiny_hf):
    """Once the context fills block_size, decoding restarts from its last block_size // 2 tokens (docstring)."""
    model = GPT.from_pretrained(tiny_hf[1]).eval()  # block_size 64
    block = model.config.block_size
    long_prompt = torch.randint(0, 128, (2, 100))
    out = model.generate(long_prompt, 40, temperature=0)  # re-encodes before new tokens 2 and 35
    ctx, new = long_prompt[:, -block:], []  # reference: no cache, the visible window recomputed for every token
    with torch.no_grad():
        for _ in range(40):
            if ctx.size(1) > block:
                ctx = ctx[:, -(block // 2):]
            new.append(model(ctx)[0][:, -1].argmax(-1, keepdim=True))  # (B, 1)
            ctx = torch.cat([ctx, new[-1]], dim=1)
    assert torch.equal(out[:, :100], long_prompt) and torch.equal(out[:, 100:], torch.cat(new, dim=1))


def counting_model(vocab=16):
    """A GPT whose greedy next token is (last token + 1) % vocab: one-hot embeddings, blocks that add nothing
    (all weights zero), and an lm_head (untied here) that maps the one-hot of token i to logit i + 1."""
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=1, n_head=1, n_embd=vocab)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.wte.weight = torch.nn.Parameter(torch.eye(vocab))  # token i -> e_i, unique peak after ln_f
        model.lm_head.weight = torch.nn.Parameter(torch.eye(vocab).roll(1, dims=0))  # logit j = h[j - 1]
    return model


def test_generation_stops_at_eos():
    """Rows that emitted EOS keep emitting it; the stream ends once every row has (row 0 at step 2, row 1 at 5)."""
    model, eos = counting_model(), 7
    prompt = torch.tensor([[1, 5], [0, 2]])  # counts on: row 0 reaches 7 at step 2, row 1 at step 5
    free = model.generate(prompt, 10, temperature=0)  # without eos_token_id: counting goes on
    assert free[:, 2:].tolist() == [[6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    new = free[:, 2:].clone()  # reference: the free run, with each row held at EOS from its first one ...
    hit = (new == eos).cumsum(dim=1) > 0  # (B, 10)
    new[hit] = eos
    last = int(hit.all(dim=0).nonzero()[0]) + 1  # ... cut after the first step at which every row is done
    expected = torch.cat([prompt, new[:, :last]], dim=1)
    assert last == 5 < 10 and expected[0, 2:].tolist() == [6, 7, 7, 7, 7]
    assert torch.equal(model.generate(prompt, 10, temperature=0, eos_token_id=eos), expected)
    assert len(list(model.generate_stream(prompt, 10, temperature=0, eos_token_id=eos))) == 5


def test_sample_next_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0), torch.tensor([[0]]))
    picks = {int(sample_next(logits, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {0, 1}
    # softmax mass of the first token is 0.64: top_p 0.5 keeps only it, 0.8 keeps two
    assert {int(sample_next(logits, top_p=0.5, generator=g)) for _ in range(100)} == {0}
    assert {int(sample_next(logits, top_p=0.8, generator=g)) for _ in range(300)} == {0, 1}


def test_hf_round_trip_and_padded_vocab_export(tmp_path):
    from transformers import GPT2LMHeadModel
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    model.save_pretrained(tmp_path / "export", vocab_size=50257)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert hf.config.vocab_size == 50257
    again = GPT.from_pretrained(str(tmp_path / "export")).eval()
    idx = torch.randint(0, 50257, (2, 30))
    ours = model(idx)[0][..., :50257]
    torch.testing.assert_close(hf(idx).logits, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again(idx)[0], ours, rtol=0, atol=0)
    assert not [p for p in os.listdir(tmp_path / "export") if p.endswith(".tmp")]


def test_conversions_are_inverse(tiny_hf):
    hf, _ = tiny_hf
    sd = hf.state_dict()
    back = ours_to_hf(hf_to_ours(sd))
    assert set(back) == set(sd) - {"lm_head.weight"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_bare_gpt2model_keys_load(tmp_path, tiny_hf):
    """The hub's gpt2 files have no 'transformer.' prefix; older ones carry attn.bias mask buffers."""
    from safetensors.torch import save_file
    hf, path = tiny_hf
    bare = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file({k: v.contiguous() for k, v in bare.items()}, os.path.join(path, "model.safetensors"))
    idx = torch.randint(0, 128, (1, 10))
    torch.testing.assert_close(GPT.from_pretrained(path)(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_load_errors_list_the_bad_keys(tmp_path, tiny_hf):
    from safetensors.torch import load_file, save_file
    _, path = tiny_hf
    sd = load_file(os.path.join(path, "model.safetensors"))
    sd.pop("transformer.h.1.mlp.c_fc.bias")
    sd["transformer.h.0.attn.extra"] = torch.zeros(3)
    sd["transformer.ln_f.weight"] = torch.zeros(7)
    save_file(sd, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(path)
    msg = str(e.value)
    assert "missing transformer.h.1.mlp.c_fc.bias" in msg and "unexpected transformer.h.0.attn.extra" in msg
    assert "transformer.ln_f.weight (7,) vs (32,)" in msg and "\n" not in msg
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: cannot read weights"):
        GPT.from_pretrained(path)
    with pytest.raises(ValueError, match="neither a directory nor one of gpt2"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(ValueError, match="no config.json"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("change, match", [
    (lambda d: [d], "a JSON list"), (lambda d: {**d, "n_embd": 33}, "n_embd 33 is not divisible by n_head 2"),
    (lambda d: {**d, "n_head": 0}, "n_head must be a positive integer, got 0"),
    (lambda d: {k: d[k] for k in d if k != "n_layer"}, "no 'n_layer'"),
    (lambda d: {**d, "layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon 1e-06 is not implemented \(GPT-2's is 1e-05\)"),
    (lambda d: {**d, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx True is not"),
    (lambda d: {**d, "tie_word_embeddings": False}, "tie_word_embeddings False is not implemented"),
    (lambda d: {**d, "n_inner": 100}, r"n_inner 100 is not implemented \(GPT-2's is None or 128\)"),
], ids=["list", "n_embd", "n_head", "missing", "eps", "layer_scale", "untied", "n_inner"])
def test_bad_config_json_is_a_clear_error_naming_the_file(tiny_hf, change, match):
    """What is not GPT-2, the HF options that change the logits among it, is refused naming the option."""
    import json
    cfg = os.path.join(tiny_hf[1], "config.json")
    with open(cfg) as f:
        d = json.load(f)
    with open(cfg, "w") as f:
        json.dump(change(d), f)
    with pytest.raises(ValueError, match=match) as e:
        GPT.from_pretrained(tiny_hf[1])
    assert str(e.value).startswith(f"{cfg}: not a GPT-2 config")


@pytest.mark.parametrize("bias", [True, False])
def test_param_counts(bias):
    config = GPTConfig(block_size=32, vocab_size=100, n_layer=3, n_head=2, n_embd=16, bias=bias)
    model = GPT(config)
    counts = param_counts(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["untied"] == counts["total"] + 100 * 16
    assert counts["non_embedding"] == counts["total"] - 100 * 16 - 32 * 16


def test_optimizer_decays_only_matrices():
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    opt = configure_optimizers(model, 0.1, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_model_py_prints_the_storage_table():
    out = subprocess.run([sys.executable, "model.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in GPT2_SHAPES:
        assert name in out
    assert "124.4M" in out and "1557.6M" in out  # gpt2 and gpt2-xl, tied head counted once
    xl = next(line.split() for line in out.splitlines() if line.startswith("gpt2-xl "))
    assert out.splitlines()[0].split()[-6:] == ["state", "FSDP/GPU", "x8", "act/seq", "ckpt", "+fixed"]
    assert xl[-5:-3] == ["23.21GiB", "2.90GiB"]  # DDP: the whole training state on each GPU; FSDP over 8: an eighth
    from model import GPTConfig, activation_bytes
    config = GPTConfig(n_layer=48, n_head=25, n_embd=1600)  # activations of one 1024-token sequence, and with
    per_seq = [activation_bytes(config, 2, 1024, checkpointing=c) - activation_bytes(config, 1, 1024, checkpointing=c)
               for c in (False, True)]  # checkpointing, as python model.py prints them
    assert xl[-3:-1] == [f"{b / 2**30:.2f}GiB" for b in per_seq] and per_seq[1] < per_seq[0] / 4


def test_targets_with_a_cache_is_a_clear_error():
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets and cache do not go together"):
        model(idx, idx, cache=KVCache(model.config, 1, "cpu", torch.float32))


def test_init_std_is_the_weights_spread_and_hf_s_initializer_range(tmp_path):
    """init_std sets every weight's N(0, std) (residual projections / sqrt(2 n_layer)), as HF's initializer_range
    does, and travels through config.json both ways."""
    from dataclasses import asdict
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=2, n_embd=64, init_std=0.05))
    h = model.transformer.h[0]
    for w, std in ((model.transformer.wte.weight, 0.05), (model.transformer.wpe.weight, 0.05),
                   (h.attn.c_attn.weight, 0.05), (h.mlp.c_fc.weight, 0.05), (h.mlp.c_proj.weight, 0.05 / 2)):
        assert w.std().item() == pytest.approx(std, rel=0.05)
    assert config_to_hf(asdict(model.config))["initializer_range"] == 0.05
    assert config_from_hf(config_to_hf(asdict(model.config)))["init_std"] == 0.05
    model.save_pretrained(tmp_path / "m")
    assert GPT.from_pretrained(str(tmp_path / "m")).config.init_std == 0.05
    assert config_from_hf({**config_to_hf(asdict(GPTConfig())), "initializer_range": 0.02})["init_std"] == 0.02
    with pytest.raises(ValueError, match="initializer_range must be a positive number, got 'x'"):
        config_from_hf({**config_to_hf(asdict(GPTConfig())), "initializer_range": "x"})


def test_token_ids_outside_the_vocabulary_are_clear_errors():
    """ids >= vocab or < 0, and negative targets other than -100 (F.cross_entropy's ignore_index), are ValueErrors
    naming the tensor, for model(...) and generate(...) alike."""
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    idx = torch.randint(0, 32, (2, 8))
    for bad, name, value in ((idx.clone().fill_(32), "idx", 32), (idx.clone().fill_(-40), "idx", -40)):
        with pytest.raises(ValueError, match=f"{name} holds {value}, not a token id of this model \\(0..31\\)"):
            model(bad)
        with pytest.raises(ValueError, match=f"{name} holds {value}"):
            model.generate(bad, 3)
    targets = idx.clone()
    targets[0, 0] = -1
    with pytest.raises(ValueError, match=r"targets holds -1, not a token id of this model \(0..31 or -100"):
        model(idx, targets)
    targets[0, 0] = -100  # ignored: fine, and the loss is F.cross_entropy's with ignore_index
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, 32), targets.view(-1)))


def test_the_model_is_gpt2_and_nothing_else():
    """GPT carries no training trick: no loss-path flag, no head-vocab state, nothing but GPT-2's weights."""
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    own = {k for k in vars(model) if not k.startswith("_")} - {"training", "config"}
    assert own == set(), own
    assert [n for n, _ in model.named_buffers()] == []


def saved_bytes(config, batch, seq_len, low_precision, checkpointing):
    """What backward keeps of a training forward (loss.LMLoss, the fused loss), measured: the bytes of the tensors
    autograd saves, weights excluded, each storage once."""
    from loss import LMLoss
    from runtime import checkpoint_activations
    model = GPT(config)
    if checkpointing:
        checkpoint_activations(model)
    seen, total = {p.untyped_storage().data_ptr() for p in model.parameters()}, [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total[0] += t.untyped_storage().nbytes()
        return t
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
        LMLoss(model)(idx, idx)
    return total[0]


@pytest.mark.parametrize("low_precision", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_activation_estimate_is_what_backward_keeps(low_precision, checkpointing):
    """model.activation_bytes (python model.py's act/seq, the out-of-memory advice) against the saved tensors'
    bytes at shapes whose head dimension CPU attention kernels take (a checkpointed block's recompute is held one
    block at a time, which the estimate adds and this measurement, taken in forward, does not see)."""
    from model import activation_bytes
    for C, H, L in ((128, 2, 2), (256, 4, 3)):
        config = GPTConfig(block_size=64, vocab_size=512, n_layer=L, n_head=H, n_embd=C)
        estimate = activation_bytes(config, 2, 64, low_precision, checkpointing)
        if checkpointing:
            estimate -= 2 * 64 * ((36 if low_precision else 64) * C + 4 * H)  # the one block recomputed in backward,
            estimate -= 12 * C * C * 2 if low_precision else 0  # with autocast's copies of its weights
        assert saved_bytes(config, 2, 64, low_precision, checkpointing) == pytest.approx(estimate, rel=0.03), (C, H, L)
