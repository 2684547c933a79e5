"""Our trainer against build-nanogpt's model and optimizer: from the same weights, on the same batches, the same
losses step after step. The reference below is written the way build-nanogpt writes GPT-2 and its loop (nn.Linear
layers, the head tied to wte, full logits into F.cross_entropy, AdamW with decay on tensors of dim >= 2, betas
(0.9, 0.95), eps 1e-8, the gradient norm clipped at 1.0, its warmup-then-cosine learning rate, gradient accumulation
by dividing each micro step's loss), and it imports nothing from model.py, loss.py or optim.py."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt2
from data.shards import write_shard
from model import GPT, GPTConfig

SHAPE = dict(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32)
B, T, ACCUM, STEPS = 4, 32, 2, 8
MAX_LR, MIN_LR, WARMUP, DECAY = 1e-2, 1e-3, 3, 0.1


class RefBlock(nn.Module):
    def __init__(self, C, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C), c_proj=nn.Linear(C, C)))
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C), c_proj=nn.Linear(4 * C, C)))

    def forward(self, x):  # x (B, T, C)
        Bx, Tx, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(Bx, Tx, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bx, Tx, C)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, block_size, vocab_size, n_layer, n_head, n_embd):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([RefBlock(n_embd, n_head) for _ in range(n_layer)]), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2

    def forward(self, idx, targets):  # idx, targets (B, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1)))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def ref_lr(it, max_steps):
    if it < WARMUP:
        return MAX_LR * (it + 1) / WARMUP
    ratio = (it - WARMUP) / (max_steps - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (MAX_LR - MIN_LR)


def reference_losses(weights_dir, tokens):
    """build-nanogpt's loop over the shard's tokens in order: each optimizer step's mean micro-step loss."""
    model = RefGPT(**SHAPE)
    ours = GPT.from_pretrained(weights_dir).state_dict()
    model.load_state_dict({k: v for k, v in ours.items() if k in model.state_dict()}, strict=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": DECAY},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=MAX_LR, betas=(0.9, 0.95), eps=1e-8)
    tokens, pos, losses = torch.from_numpy(tokens.astype(np.int64)), 0, []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_accum = 0.0
        for _ in range(ACCUM):
            buf = tokens[pos:pos + B * T + 1]
            pos += B * T
            loss = model(buf[:-1].view(B, T), buf[1:].view(B, T)) / ACCUM
            loss_accum += loss.item()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = ref_lr(step, STEPS)
        optimizer.step()
        losses.append(loss_accum)
    return losses


@pytest.mark.parametrize("loss", ["plain", "fused"])
def test_trainer_gives_build_nanogpts_losses_from_the_same_weights(tmp_path, loss):
    """Eight steps of 2 micro batches from one saved random GPT-2: the trainer (its model, its loss path, fused
    AdamW, its schedule and loader) and the reference agree to float32 rounding at every step, so they agree on
    what was learned, not just on step 0."""
    torch.manual_seed(0)
    GPT(GPTConfig(**SHAPE)).save_pretrained(str(tmp_path / "init"))
    rng = np.random.default_rng(0)  # a learnable stream: each id is the last one's successor, 20% noise
    tokens = np.where(rng.random(6000) < 0.2, rng.integers(0, 256, 6000), (np.arange(6000) * 7) % 256)
    data = tmp_path / "data"
    data.mkdir()
    write_shard(str(data / "syn_train_000001.npy"), tokens)
    write_shard(str(data / "syn_val_000000.npy"), tokens[:2000])
    out = tmp_path / "out"
    train_gpt2.main(["--init_from", str(tmp_path / "init"), "--data_dir", str(data), "--out_dir", str(out),
                     "--device", "cpu", "--dtype", "float32", "--compile", "false", "--loss", loss,
                     "--batch_size", str(B), "--seq_len", str(T), "--total_batch_size", str(B * T * ACCUM),
                     "--max_steps", str(STEPS), "--max_lr", str(MAX_LR), "--min_lr", str(MIN_LR),
                     "--warmup_steps", str(WARMUP), "--weight_decay", str(DECAY), "--grad_clip", "1.0",
                     "--eval_interval", "100", "--val_steps", "1", "--hellaswag_interval", "0",
                     "--sample_interval", "0", "--ckpt_interval", "0"])
    with open(out / "metrics.jsonl") as f:
        ours = [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]
    ref = reference_losses(str(tmp_path / "init"), np.load(os.path.join(data, "syn_train_000001.npy")))
    assert len(ours) == STEPS
    assert ours[-1] < ours[0] - 0.05  # it learned something: the comparison is not of eight equal numbers
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=2e-5, atol=2e-5)
