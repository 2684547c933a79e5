"""GPT-2 in one file, with Hugging Face's parameter names so its weights load key for key.

    from model import GPT
    model = GPT.from_pretrained("gpt2")            # or a local HF directory / our out_dir
    idx = model.generate(prompt_ids, max_new_tokens=50, top_k=50)

`python model.py` prints parameter counts and memory for the GPT-2 shapes and our presets,
without allocating any weights.
"""
import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

# name: (n_layer, n_head, n_embd). The four OpenAI releases, then our small CPU preset.
MODEL_SHAPES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
    "shakespeare": (4, 4, 96),
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LOGITS_CHUNK = 2**28  # GPT.logits_chunk: logits made at once by the fused loss (1 GiB in float32); `bench.py loss`
# Dense (not 2:4 sparse) bf16 tensor-core FLOP/s from NVIDIA's datasheets and whitepapers (GeForce: with fp32
# accumulate, as training uses), keyed by the model in torch.cuda.get_device_name(); see gpu_peak_flops.
GPU_PEAK_BF16_FLOPS = {
    "B200": 2250e12, "H200": 989e12, "H200 NVL": 835.5e12,
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835.5e12,  # "H100" is the SXM card ("NVIDIA H100 80GB HBM3")
    "A100": 312e12,  # 40GB and 80GB, PCIe and SXM alike
    "L40S": 362.05e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165.2e12, "RTX 3090": 71e12,
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # GPT-2's BPE; pad to 50304 (a multiple of 64) for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    init_std: float = 0.02  # weights start N(0, init_std): GPT-2's 0.02 (HF's initializer_range)


class KVCache:
    """Keys and values of every layer for incremental decoding; `length` tokens are filled."""

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


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets, a chunk of rows at a time.

    With GPT-2's 50304-wide head the float32 logits are the largest tensor of a training step, and
    softmax, its backward and the one-hot scatter are memory-bound passes over them. Here each chunk's
    logits are made, reduced to the loss and, in the same pass, turned into the gradients
    (softmax - onehot) @ weight and its transpose (as Liger-Kernel's fused linear cross-entropy does);
    backward only scales them. Matmuls run in `dtype` (the autocast dtype), softmax in float32.

    (softmax - onehot) enters the matmuls in `dtype` without the 1/n_valid of the mean: its entries lie in
    [-1, 1], and the division comes after, in float32. Divided first, float16 (nothing below 6e-8, and only
    2^-24 steps below 6.1e-5) would flush most of it to zero: (softmax - onehot) / 65,536 for 64 x 1024 tokens
    is ~3e-10 per entry at GPT-2's initial softmax of 1/50304, and the loss scale cannot help, as it only
    multiplies these gradients in backward. The matmul outputs stay in float16's range: |g @ W| <= 2 max|W|
    per entry, |g.T @ x| <= rows * max|x| (rows ~5,300 per chunk at vocab 50304), so float16 overflows only if
    ln_f's output exceeded 12 in one channel across a chunk's rows that all share one target; the gradient is
    then inf, the loss scaler skips the step, and the trainer stops once the scale falls below 1.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, needs_grad, bias=None, chunk=LOGITS_CHUNK):
        # x (N, C), weight (V, C), targets (N,); bias (V,) or None; chunk: the most logits made at once
        valid = targets != -100  # (N,)
        n_valid = valid.sum().clamp(min=1)
        xc, wc = x.to(dtype), weight.to(dtype)
        losses = torch.empty(x.size(0), device=x.device)  # (N,)
        grad_x = torch.empty(x.shape, device=x.device) if needs_grad else None  # (N, C), float32
        grad_w = torch.zeros(weight.shape, device=x.device) if needs_grad else None  # (V, C), float32
        n_chunks = -(-x.size(0) * weight.size(0) // chunk)  # ceil: chunks of at most `chunk` logits
        rows = -(-x.size(0) // n_chunks)
        for i in range(0, x.size(0), rows):
            s, t = slice(i, i + rows), targets[i:i + rows].clamp(min=0)[:, None]  # (n, 1)
            logits = (xc[s] @ wc.t()).float()  # (n, V)
            # the target's logit, before the bias, as its own (n, 1, C) @ (n, C, 1) product rather than a gather
            # from logits: inductor fused such gathers over all chunks with int32 offsets, which overflowed past
            # 2^31 logits (GPT-2 124M at 64 x 1024 on CUDA, torch 2.11: an illegal memory access)
            picked = (wc[t] @ xc[s, :, None]).float().view(-1)  # (n,)
            if bias is not None:
                logits += bias  # (V,), float32 (GPT.set_head_vocab)
            lse = logits.logsumexp(dim=-1)  # (n,)
            losses[s] = lse - picked
            if needs_grad:  # d(mean loss)/d(logits) = (softmax - onehot) / n_valid on valid rows
                g = logits.sub_(lse[:, None]).exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=logits.dtype))
                g = g.mul_(valid[s, None]).to(dtype)  # (n, V), in [-1, 1]: / n_valid comes after the matmuls
                grad_x[s] = g @ wc
                grad_w += g.t() @ xc[s]
        if needs_grad:
            ctx.save_for_backward(grad_x.div_(n_valid).to(x.dtype), grad_w.div_(n_valid).to(weight.dtype))
        return (losses * valid).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None, None


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} must be divisible by n_head {config.n_head}")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale_init = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:  # query i sees every cached key plus the new ones up to itself
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as GPT-2
        self.fused_loss = True  # see head_loss
        self.logits_chunk = LOGITS_CHUNK  # the fused loss's logits per chunk
        self.head_cols = self.head_bias = self.head_col_of = self.head_rest = None  # see set_head_vocab
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """GPT-2 init: N(0, init_std), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_scale_init", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> (logits, loss). Targets are token ids or -100 (ignored), shaped as idx.

        Without targets: logits (B, T, vocab) and loss None; with a cache (generation) only the last
        position's: (B, 1, vocab). With targets: (None, mean loss), computed by LinearCrossEntropy so the
        full (B, T, vocab) logits never exist (they are the largest tensor of a training step).
        Ids may be any integer dtype and strides (idx[:, :-1], idx[:, 1:]). One sequence (T,) gives
        unbatched results, logits (T, vocab), as HF's GPT2Model and torch's layers do for unbatched input
        (transformers 5's GPT2LMHeadModel refuses 1-D input_ids).
        """
        idx = token_ids(idx, "idx")
        if targets is not None:
            if cache is not None:
                raise ValueError("targets and cache do not go together: the loss is for training, the cache for decoding")
            targets = token_ids(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets {tuple(targets.shape)} and idx {tuple(idx.shape)} must have the same shape")
        x = self.hidden_states(idx, cache)  # (B, T, C) or (T, C)
        if targets is not None:
            return None, self.head_loss(x, targets)
        if cache is not None:
            x = x[..., -1:, :]  # (B, 1, C)
        return self.lm_head(x), None  # (B, T, vocab)

    def head_loss(self, x, targets):
        """Mean cross-entropy of lm_head(x) against targets (-100: ignored); x (..., C), targets (...).

        fused_loss (the default): LinearCrossEntropy, which never holds the full logits. Otherwise the plain
        path, lm_head then F.cross_entropy on the float32 logits, which some machines run faster (the trainer
        measures which at start: runtime.pick_loss). In training mode after set_head_vocab, both run on its
        K + 1 columns, which give the full head's loss and gradients."""
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, C), (N,)
        weight, bias = self.lm_head.weight, None  # (V, C)
        if self.training and self.head_cols is not None:
            weight, bias = weight[self.head_cols], self.head_bias  # (K + 1, C), (K + 1,)
            targets = torch.where(targets == -100, targets, self.head_col_of[targets.clamp(min=0)])
        if not self.fused_loss:
            logits = F.linear(x, weight).float()  # (N, V)
            if bias is None:
                return F.cross_entropy(logits, targets, ignore_index=-100)
            valid = targets != -100  # (N,): a rest target's own logit is z, not z + log R: add log R back
            return F.cross_entropy(logits + bias, targets, ignore_index=-100) + \
                (bias[targets.clamp(min=0)] * valid).sum() / valid.sum().clamp(min=1)
        device = x.device.type
        autocast = device in ("cuda", "cpu") and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
        return LinearCrossEntropy.apply(x, weight, targets, dtype, needs_grad, bias, self.logits_chunk)

    @torch.no_grad()
    def set_head_vocab(self, ids):
        """Train the head's softmax on the token ids `ids` (say, those of the training data) plus one column
        that stands for all the others, at the cost of K + 1 columns instead of vocab_size.

        The other ids' rows are made equal (to the first of them, "the rest row"), so their R logits are one
        value z and the full softmax's sum over them is R exp(z): one column, the rest row's, with a bias of
        log R. The loss and gradients are then the full head's, for the rest row summed over its R copies
        (AdamW's update of each copy is the same, up to its eps); tie_rest_ copies it back after each optimizer
        step. Evaluation, generation and export use the full head, so the model stays GPT-2. With the trained
        ids much fewer than the vocabulary (Shakespeare: 19,084 of 50,257), the head is most of a step's FLOPs.
        ids=None: the full head again. Call it after moving the model to its device (the index tensors are
        made there, and are not buffers: DDP would broadcast buffers at every forward)."""
        V, w = self.config.vocab_size, self.lm_head.weight
        keep = torch.zeros(V, dtype=torch.bool, device=w.device)
        if ids is not None:
            keep[torch.as_tensor(ids, device=w.device)] = True
        rest = (~keep).nonzero().squeeze(1)  # (R,)
        if ids is None or len(rest) < 2:
            self.head_cols = self.head_bias = self.head_col_of = self.head_rest = None
            return
        kept = keep.nonzero().squeeze(1)  # (K,)
        self.head_cols = torch.cat([kept, rest[:1]])  # (K + 1,): rows of the head's columns
        self.head_col_of = torch.full((V,), len(kept), device=w.device)  # (V,): token id -> column
        self.head_col_of[kept] = torch.arange(len(kept), device=w.device)
        self.head_bias = torch.zeros(len(kept) + 1, device=w.device)  # (K + 1,)
        self.head_bias[-1] = math.log(len(rest))
        self.head_rest = rest[1:]  # (R - 1,): the copies of the rest row
        self.tie_rest_()

    @torch.no_grad()
    def tie_rest_(self):
        """After set_head_vocab: copy the rest row (trained) onto the other untrained ids' rows."""
        if self.head_rest is not None:
            w = self.lm_head.weight
            w[self.head_rest] = w[self.head_cols[-1]].clone()

    def hidden_states(self, idx, cache=None):
        """idx (B, T) -> the final hidden states ln_f(x) (B, T, C), before the lm_head (heads share this).
        One sequence (T,) gives (T, C), as HF's GPT2Model does."""
        ids = token_ids(idx, "idx")
        if ids.dim() == 1:
            ids = ids[None]  # (1, T)
        B, T = ids.size()
        past = 0 if cache is None else cache.length
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=ids.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(ids) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        return x[0] if idx.dim() == 1 else x

    # ----- sampling -----

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eos_token_id=None, generator=None):
        """Yield the next token (B, 1) for each step, decoding with a key/value cache; (1,) for one sequence (T,).

        temperature 0 is greedy. A prompt longer than block_size keeps its last block_size tokens;
        when the context fills the window, it is re-encoded from its last block_size // 2 tokens
        (positions are absolute in GPT-2, so the cache cannot simply shift). Rows that emitted
        eos_token_id keep emitting it; the stream stops when every row has. Bad arguments raise
        ValueError here, at the call, not at the first next().
        """
        ids = token_ids(idx, "idx")
        if ids.size(-1) == 0:
            raise ValueError("idx is an empty prompt: generation needs at least one token to start from")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        steps = self._decode(ids.reshape(-1, ids.size(-1)), max_new_tokens, temperature, top_k, top_p,
                             eos_token_id, generator)
        return (nxt[0] for nxt in steps) if ids.dim() == 1 else steps

    @torch.no_grad()
    def _decode(self, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator):
        """generate_stream's loop over checked arguments: idx (B, T) int64; yields (B, 1)."""
        block = self.config.block_size
        ctx = idx[:, -block:]  # (B, T)
        cache, done = None, torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is None or cache.length == block:  # (re)fill the cache from the visible context
                ctx = ctx[:, -(block // 2):] if cache is not None else ctx
                cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype)
                logits, _ = self(ctx, cache=cache)
            else:
                logits, _ = self(ctx[:, -1:], cache=cache)
            nxt = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
            if eos_token_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt[:, 0] == eos_token_id
            ctx = torch.cat([ctx, nxt], dim=1)
            yield nxt
            if done.all():
                return

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) -> (B, T + n) int64: the prompt followed by up to max_new_tokens sampled tokens.
        One sequence (T,) gives (T + n,)."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx.long()] + new, dim=-1)

    # ----- Hugging Face interop -----

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """Load 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (hub or cache) or a local HF-format dir."""
        config, sd = read_hf(name_or_path)
        for k, v in overrides.items():
            if k not in {f.name for f in fields(GPTConfig)}:
                raise ValueError(f"unknown GPTConfig field {k!r}")
            setattr(config, k, v)
        return cls.from_hf_state_dict(config, sd, source=name_or_path)

    @classmethod
    def from_hf_state_dict(cls, config, sd, source="state dict"):
        """A GPT of `config` holding the Hugging Face state dict sd (converted by hf_to_ours, checked key by key)."""
        model = cls(config)
        load_checked(model, hf_to_ours(sd), source=source)
        return model

    def save_pretrained(self, path, vocab_size=None, state_dict=None):
        """Write `path/config.json` and `path/model.safetensors` in Hugging Face GPT-2 format.

        vocab_size crops a padded vocabulary (e.g. 50304 -> 50257) so HF's tokenizer and generate work.
        state_dict: the weights to write, by default self.state_dict() (a sharded model passes its gathered one).
        Each file is written under a temporary name and renamed into place.
        """
        if not self.config.bias:
            raise ValueError("Hugging Face GPT-2 has biases: a bias=False model cannot be exported")
        vocab_size = vocab_size or self.config.vocab_size
        sd = ours_to_hf(self.state_dict() if state_dict is None else state_dict)
        sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:vocab_size]
        write_hf_dir(path, sd, config_to_hf(self.config, vocab_size))

    # ----- training helpers -----

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls plus 12*L*H*Q*T for attention (PaLM, nanoGPT)."""
        c = self.config
        n = param_counts(c)["total"] - c.block_size * c.n_embd  # position embeddings do no matmul
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len


def configure_optimizers(module, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu"):
    """AdamW over module's trainable parameters: decay on matrices and embeddings (dim >= 2), not on
    biases and norms. Fused (one kernel for all tensors) on CUDA and CPU: on CPU torch's default is a
    per-tensor loop, which measured 2.8x slower on a 2-core machine."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8, fused=device_type in ("cuda", "cpu"))


def token_ids(ids, name):
    """ids (B, T) or (T,) of any integer dtype -> int64, the index type of embeddings and gather."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a tensor of integer token ids, got {got}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{name} must be (B, T) or one sequence (T,), got shape {tuple(ids.shape)}")
    return ids.long()


def check_sampling(temperature, top_k, top_p):
    """Raise ValueError for sampling settings that have no meaning (None turns top_k / top_p off)."""
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"top_k must be >= 1 or None (off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None (off), got {top_p}")


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
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


def config_from_hf(d):
    """A Hugging Face GPT2Config dict -> GPTConfig."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got a JSON {type(d).__name__}")
    if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation_function {d['activation_function']!r}")
    for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        if type(d[k]) is not int or d[k] < 1:
            raise ValueError(f"{k} must be a positive integer, got {d[k]!r}")
    if d["n_embd"] % d["n_head"]:
        raise ValueError(f"n_embd {d['n_embd']} is not divisible by n_head {d['n_head']}")
    init_std = d.get("initializer_range", 0.02)
    if type(init_std) not in (int, float) or not init_std > 0:
        raise ValueError(f"initializer_range must be a positive number, got {init_std!r}")
    return GPTConfig(block_size=d["n_positions"], vocab_size=d["vocab_size"], n_layer=d["n_layer"],
                     n_head=d["n_head"], n_embd=d["n_embd"], bias=True, init_std=float(init_std))


def config_to_hf(config, vocab_size=None):
    """GPTConfig -> the config.json Hugging Face's GPT2LMHeadModel expects."""
    vocab = vocab_size or config.vocab_size
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": vocab, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": config.init_std, "tie_word_embeddings": True,
        "bos_token_id": 50256 if vocab > 50256 else None, "eos_token_id": 50256 if vocab > 50256 else None,
    }


def hf_to_ours(sd):
    """HF GPT-2 state dict -> ours: drop attention-mask buffers, add the 'transformer.' prefix that
    bare GPT2Model files lack, transpose Conv1D weights to nn.Linear, and tie lm_head to wte."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) and v.dim() != 1:
            continue  # causal-mask buffers of older transformers, not parameters
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        out[k] = v.t() if k.endswith(CONV1D_WEIGHTS) else v
    out.setdefault("lm_head.weight", out.get("transformer.wte.weight"))
    return out


def ours_to_hf(sd):
    """Our state dict -> HF's, without lm_head (tied to wte; safetensors refuses shared tensors)."""
    return {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in sd.items() if k != "lm_head.weight"}


def read_hf_dir(path):
    """(GPTConfig, HF state dict) from a directory with config.json and model.safetensors or pytorch_model.bin."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        with open(cfg_path) as f:
            config = config_from_hf(json.load(f))
    except KeyError as e:
        raise ValueError(f"{cfg_path}: not a GPT-2 config (no {e})") from None
    except ValueError as e:  # bad JSON (JSONDecodeError is a ValueError) or values config_from_hf refuses
        raise ValueError(f"{cfg_path}: not a GPT-2 config ({e})") from None
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file
            return config, load_file(st)
        if os.path.isfile(pt):
            return config, torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: name it
        raise ValueError(f"{st if os.path.isfile(st) else pt}: cannot read weights ({type(e).__name__}: {e})") from None
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")


def read_hf(name_or_path):
    """(GPTConfig, HF state dict) of a local HF-format dir or of OpenAI's 'gpt2*' weights (hub or cache)."""
    if os.path.isdir(name_or_path):
        return read_hf_dir(name_or_path)
    if name_or_path in MODEL_SHAPES and name_or_path.startswith("gpt2"):
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        return config_from_hf(hf.config.to_dict()), hf.state_dict()
    raise ValueError(f"{name_or_path!r} is neither a directory nor one of gpt2, gpt2-medium, gpt2-large, gpt2-xl")


def umask():
    """The process's file-creation mask (reading it means setting it: put it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_hf_dir(path, sd, config):
    """Write an HF state dict and config dict as path/model.safetensors and path/config.json.

    Each file is written under a temporary name and renamed into place, weights first: a config.json
    is the mark of a complete model directory (read_hf_dir needs it).
    """
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()},
              os.path.join(path, "model.safetensors.tmp"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("model.safetensors", "config.json"):
        os.chmod(os.path.join(path, name + ".tmp"), 0o666 & ~umask())  # safetensors writes 0600: others could not read
        os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))


def load_checked(model, sd, source="state dict"):
    """Copy sd into model, raising one error that lists every missing, unexpected or mis-shaped key."""
    check_fits(model, sd, source)
    model.load_state_dict(sd)


def check_fits(model, sd, source="state dict"):
    """Raise one ValueError listing every key of sd that is missing, unexpected or mis-shaped for model
    (a sharded model's state_dict gives each tensor's full shape, so this checks it too)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{name}: {', '.join(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
        raise ValueError(f"{source}: weights do not fit GPT({model.config}): " + "; ".join(parts))


def param_counts(config):
    """Parameter counts: total (tied head counted once), as if untied, and without embeddings."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    b = 1 if config.bias else 0
    per_block = 2 * C * b + 2 * C + (C * 3 * C + 3 * C * b) + (C * C + C * b) + (C * 4 * C + 4 * C * b) + (4 * C * C + C * b)
    emb = V * C + config.block_size * C
    total = emb + L * per_block + C + C * b
    return {"total": total, "untied": total + V * C, "non_embedding": total - emb}


def storage_report(config):
    """Counts and bytes: weights in fp32 and bf16, a full fp32 training state (weights, grads, AdamW m and v), and
    that state's share on each GPU when FSDP shards it over 8 (DDP keeps all of it on every GPU)."""
    n = param_counts(config)
    return {**n, "fp32_bytes": 4 * n["total"], "bf16_bytes": 2 * n["total"], "train_state_bytes": 16 * n["total"],
            "fsdp8_bytes": 16 * n["total"] / 8}


def format_report(rows):
    """rows: {name: storage_report} -> a fixed-width table."""
    head = (f"{'model':<13}{'params':>10}{'untied':>10}{'non-emb':>10}{'fp32':>10}{'bf16':>10}{'train state':>13}"
            f"{'FSDP/GPU x8':>13}")
    lines = [head]
    for name, r in rows.items():
        m, g = (lambda x: f"{x / 1e6:.1f}M"), (lambda x: f"{x / 2**30:.2f}GiB")
        lines.append(f"{name:<13}{m(r['total']):>10}{m(r['untied']):>10}{m(r['non_embedding']):>10}"
                     f"{g(r['fp32_bytes']):>10}{g(r['bf16_bytes']):>10}{g(r['train_state_bytes']):>13}"
                     f"{g(r['fsdp8_bytes']):>13}")
    return "\n".join(lines)


def gpu_peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU named as torch.cuda.get_device_name() names it, else None.

    A model must stand whole in the name, followed by its end, '-' or a memory size ("NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 80GB HBM3"): so "H100 NVL", "RTX 3090 Ti", "A10G" or "GH200" never take another card's figure.
    """
    for model, flops in GPU_PEAK_BF16_FLOPS.items():
        if re.search(rf"\b{re.escape(model)}($|-| \d+GB)", device_name, flags=re.IGNORECASE):
            return flops
    return None


def table_configs():
    """The shapes `python model.py` reports: OpenAI's four releases as published (vocab 50257, 1024 tokens),
    and our CPU preset as train_gpt2.py's shakespeare preset trains it (vocab padded to 50304, 256 tokens)."""
    configs = {name: GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
               for name, (n_layer, n_head, n_embd) in MODEL_SHAPES.items()}
    configs["shakespeare"].block_size, configs["shakespeare"].vocab_size = 256, 50304
    return configs


def main():
    rows = {}
    for name, config in table_configs().items():
        with torch.device("meta"):  # shapes only: no memory is allocated
            model = GPT(config)
        assert sum(p.numel() for p in model.parameters()) == param_counts(config)["total"]
        rows[name] = storage_report(config)
    print(format_report(rows))
    print("train state = fp32 weights + grads + AdamW m and v (16 bytes/param), before activations")
    print("FSDP/GPU x8 = its share on each GPU under --parallel fsdp on 8 GPUs (DDP: all of it on each), plus the\n"
          "unsharded fp32 grads (4 bytes/param) while micro steps accumulate")


if __name__ == "__main__":
    main()
