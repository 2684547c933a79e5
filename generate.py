"""Decoding: a key/value cache, sampling (temperature, top-k, top-p), and the loop behind GPT.generate.

    for tok in decode(model, idx, 100, temperature=0.8, top_k=50):   # tok (B, 1), as each is sampled
        ...

GPT.generate and GPT.generate_stream check their arguments and call decode.

With the cache each new token costs one position's forward, not the whole context's.
"""
import math

import torch


class KVCache:
    """Keys and values of every layer for incremental decoding; `length` positions are filled."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, block_size, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer, k, v):
        """Store this step's k, v (B, nh, T, hs) and return all keys and values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)


def check_sampling(temperature, top_k, top_p):
    """Raise ValueError for sampling settings that have no meaning (None turns top_k / top_p off)."""
    if not (math.isfinite(temperature) and temperature >= 0):  # NaN fails every comparison
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"top_k must be >= 1, or off, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], or off, got {top_p}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B, 1). temperature 0 is greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:  # nucleus: keep the smallest set whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def decode(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None, generator=None):
    """Yield model's next token (B, 1) for each step, from the prompt idx (B, T) int64; temperature 0 is greedy.

    A prompt longer than block_size keeps its last block_size tokens; when the context fills the window, it is
    encoded again from its last block_size // 2 tokens (GPT-2's positions are absolute: the cache cannot shift).
    Rows that emitted eos_token_id keep emitting it; the loop stops when every row has."""
    block = model.config.block_size
    ctx = idx[:, -block:]  # (B, T)
    cache, done = None, torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if cache is None or cache.length == block:  # (re)fill the cache from the visible context
            ctx = ctx[:, -(block // 2):] if cache is not None else ctx
            cache = KVCache(model.config, idx.size(0), idx.device, model.lm_head.weight.dtype)
            logits, _ = model(ctx, cache=cache)
        else:
            logits, _ = model(ctx[:, -1:], cache=cache)
        nxt = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
        if eos_token_id is not None:
            nxt = torch.where(done[:, None], torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt[:, 0] == eos_token_id
        ctx = torch.cat([ctx, nxt], dim=1)
        yield nxt
        if done.all():
            return
