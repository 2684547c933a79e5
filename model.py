"""GPT-2 in one file, with Hugging Face's parameter names, so OpenAI's weights load key for key.

    from model import GPT
    model = GPT.from_pretrained("gpt2")                # or a local Hugging Face GPT-2 directory
    logits, loss = model(idx, targets)                 # idx, targets (B, T) token ids -> (B, T, vocab), mean loss
    out = model.generate(idx, max_new_tokens=50, top_k=50)

`python model.py` prints the parameter counts and memory of OpenAI's four GPT-2 shapes without allocating
any weights. Decoding (KV cache, sampling) lives in generate.py and Hugging Face file I/O in hf.py; the
trainer's fused loss, which never builds the full logits, in loss.py.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import generate
import hf

# name: (n_layer, n_head, n_embd) of OpenAI's four releases
GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # GPT-2's BPE; the trainer pads it to 50304 (a multiple of 64) for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    init_std: float = 0.02  # weights start N(0, init_std): GPT-2's 0.02 (HF's initializer_range)


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
        """x (B, T, C); cache: the keys and values of earlier positions (generate.KVCache), or None."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # query i sees every cached key plus the new ones up to itself
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # (T, past + T)
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
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu_new


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


class Transformer(nn.Module):
    """The trunk, Hugging Face's GPT2Model: token and position embeddings, the blocks, the final LayerNorm.
    GPT puts the language-model head on it; a classifier can put another head on the same trunk."""

    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, idx, cache=None):
        """idx (B, T) token ids (int64 or int32) -> hidden states (B, T, C) after ln_f. With a cache, idx continues
        the cached positions, and the cache takes in this call's keys and values."""
        T, past = idx.size(1), 0 if cache is None else cache.length
        if past + T > self.wpe.num_embeddings:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size {self.wpe.num_embeddings}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer)
        if cache is not None:  # every layer wrote at cache.length: advance it once for all of them
            cache.length += T
        return self.ln_f(x)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as GPT-2
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
        """idx (B, T) token ids -> (logits (B, T, vocab), loss): the mean cross-entropy against targets (token ids
        or -100, ignored; shaped as idx), None without targets. With a cache (generation): the last position's
        logits only, (B, 1, vocab). Any integer dtype and strides work (idx[:, :-1], idx[:, 1:]); one sequence
        (T,) gives unbatched results, (T, vocab), as torch's layers do."""
        V = self.config.vocab_size
        idx = token_ids(idx, "idx", V, check_values=cache is None)
        if targets is not None:
            if cache is not None:
                raise ValueError("targets and cache do not go together: "
                                 "the loss is for training, the cache for decoding")
            targets = token_ids(targets, "targets", V, ignore_index=-100)
            if targets.shape != idx.shape:
                raise ValueError(f"targets {tuple(targets.shape)} and idx {tuple(idx.shape)} must have the same shape")
        x = self.transformer(idx.reshape(-1, idx.size(-1)), cache)  # (B, T, C)
        logits = self.lm_head(x[:, -1:] if cache is not None else x)  # (B, T, vocab), or (B, 1, vocab) with a cache
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1), ignore_index=-100)
        return logits.view(*idx.shape[:-1], *logits.shape[-2:]), loss

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                        generator=None):
        """Yield the next token (B, 1) as each is sampled, decoding with a key/value cache (generate.decode); (1,)
        for one sequence (T,). temperature 0 is greedy. Bad arguments raise ValueError here, at the call."""
        ids = token_ids(idx, "idx", self.config.vocab_size)
        if ids.size(-1) == 0:
            raise ValueError("idx is an empty prompt: generation needs at least one token to start from")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        generate.check_sampling(temperature, top_k, top_p)
        steps = generate.decode(self, ids.reshape(-1, ids.size(-1)), max_new_tokens, temperature, top_k, top_p,
                                eos_token_id, generator)
        return (nxt[0] for nxt in steps) if ids.dim() == 1 else steps

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) -> (B, T + n) int64: the prompt and up to max_new_tokens sampled tokens (generate_stream's
        arguments). One sequence (T,) gives (T + n,)."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx.long(), *new], dim=-1)

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """OpenAI's 'gpt2', 'gpt2-medium', 'gpt2-large' or 'gpt2-xl' (the hub, or its cache), or a local Hugging
        Face GPT-2 directory. overrides: GPTConfig fields to change (dropout=0.1). HF keeps c_attn, c_proj and
        c_fc as Conv1D, whose weights are nn.Linear's transposed: hf.hf_to_ours turns them round."""
        config, sd = hf.read(name_or_path, GPT2_SHAPES)
        unknown = set(overrides) - set(asdict(GPTConfig()))
        if unknown:
            raise ValueError(f"unknown GPTConfig field {sorted(unknown)[0]!r}")
        model = cls(GPTConfig(**{**config, **overrides}))
        hf.load_checked(model, hf.hf_to_ours(sd), source=name_or_path)
        return model

    def save_pretrained(self, path, vocab_size=None, state_dict=None):
        """Write path/config.json and path/model.safetensors in Hugging Face GPT-2 format, each under a temporary
        name renamed into place. vocab_size crops a padded vocabulary (50304 -> 50257) so HF's tokenizer fits;
        state_dict: the weights to write, by default this model's (a sharded model passes its gathered one)."""
        if not self.config.bias:
            raise ValueError("Hugging Face GPT-2 has biases: a bias=False model cannot be exported")
        vocab_size = vocab_size or self.config.vocab_size
        sd = hf.ours_to_hf(self.state_dict() if state_dict is None else state_dict)
        sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:vocab_size]
        hf.write_dir(path, sd, hf.config_to_hf(asdict(self.config), vocab_size))


def token_ids(ids, name, vocab_size, check_values=True, ignore_index=None):
    """ids (B, T) or (T,) of any integer dtype -> int64, the index type of embeddings. check_values: every id is
    in [0, vocab_size) or is ignore_index (a host sync, so skipped while compiling and for generation's steps)."""
    if (not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex
            or ids.dtype == torch.bool):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a tensor of integer token ids, got {got}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{name} must be (B, T) or one sequence (T,), got shape {tuple(ids.shape)}")
    ids = ids.long()
    if check_values and ids.numel() and not torch.compiler.is_compiling():
        real = ids if ignore_index is None else ids[ids != ignore_index]
        if real.numel() and not (0 <= real.min().item() and real.max().item() < vocab_size):
            allowed = f"0..{vocab_size - 1}" + (f" or {ignore_index} (ignored)" if ignore_index is not None else "")
            bad = real[(real < 0) | (real >= vocab_size)][0].item()
            raise ValueError(f"{name} holds {bad}, not a token id of this model ({allowed})")
    return ids


def param_counts(config):
    """Parameter counts: total (tied head counted once), as if untied, and without embeddings."""
    C, L, V, b = config.n_embd, config.n_layer, config.vocab_size, 1 if config.bias else 0
    per_block = (2 * (C + C * b) + (3 * C * C + 3 * C * b) + (C * C + C * b) + (4 * C * C + 4 * C * b)
                 + (4 * C * C + C * b))
    emb = V * C + config.block_size * C
    total = emb + L * per_block + C + C * b
    return {"total": total, "untied": total + V * C, "non_embedding": total - emb}


def activation_bytes(config, batch, seq_len, low_precision=True, checkpointing=False):
    """What backward keeps of one micro batch's forward (batch x seq_len tokens), in bytes, as measured with
    torch.autograd's saved-tensor hooks (tests/test_model.py): per token and layer (64 * C in float32 or 36 * C under
    bf16 or float16 autocast) + 4 * n_head, plus autocast's copies of the weights (2 bytes each); with activation
    checkpointing only each block's input (4 * C) and one block recomputed at a time, with its weight copies.
    Beside the blocks: about 8 * C a token and the fused loss's float32 gradient of the head (4 * V * C)."""
    C, L, H, V, N = config.n_embd, config.n_layer, config.n_head, config.vocab_size, batch * seq_len
    layer = N * ((36 if low_precision else 64) * C + 4 * H)  # one block's activations
    blocks = L * N * 4 * C + layer if checkpointing else L * layer
    weights = (1 if checkpointing else L) * 12 * C * C * 2 if low_precision else 0  # autocast's copies of the matrices
    return blocks + weights + N * 8 * C + 4 * V * C


def memory_table(configs):
    """{name: GPTConfig} -> a fixed-width table of parameters and of the bytes a training run holds for them: the
    weights in fp32 and bf16, and the train state (fp32 weights, grads, AdamW's m and v: 16 bytes per parameter),
    whole (one GPU, or each GPU under DDP) and its share per GPU under FSDP on 8."""
    def m(x):
        return f"{x / 1e6:.1f}M"

    def g(x):
        return f"{x / 2**30:.2f}GiB"
    lines = [f"{'model':<13}{'params':>10}{'untied':>10}{'non-emb':>10}{'fp32':>10}{'bf16':>10}{'train state':>13}"
             f"{'FSDP/GPU x8':>13}{'act/seq':>10}{'ckpt':>10}{'+fixed':>10}"]
    for name, config in configs.items():
        n, T = param_counts(config), config.block_size
        one, two = (activation_bytes(config, b, T) for b in (1, 2))
        ckpt = activation_bytes(config, 2, T, checkpointing=True) - activation_bytes(config, 1, T, checkpointing=True)
        lines.append(f"{name:<13}{m(n['total']):>10}{m(n['untied']):>10}{m(n['non_embedding']):>10}"
                     f"{g(4 * n['total']):>10}{g(2 * n['total']):>10}{g(16 * n['total']):>13}{g(2 * n['total']):>13}"
                     f"{g(two - one):>10}{g(ckpt):>10}{g(2 * one - two):>10}")
    return "\n".join(lines)


def main():
    configs = {name: GPTConfig(n_layer=L, n_head=H, n_embd=C) for name, (L, H, C) in GPT2_SHAPES.items()}
    for config in configs.values():
        with torch.device("meta"):  # shapes only: no memory is allocated
            assert sum(p.numel() for p in GPT(config).parameters()) == param_counts(config)["total"]
    print(memory_table(configs))
    print("train state = fp32 weights + grads + AdamW m and v (16 bytes/param), before activations; FSDP/GPU x8 = its\n"
          "share on each of 8 GPUs under --parallel fsdp (DDP keeps all of it on each), plus the unsharded fp32\n"
          "grads (4 bytes/param) while micro steps accumulate. act/seq = the activations backward keeps per\n"
          "1024-token sequence of a micro batch (bf16 autocast, the fused loss); ckpt = the same with\n"
          "--activation_checkpointing true; +fixed = per micro batch whatever its size (autocast's weight copies,\n"
          "the head's gradient). A micro batch needs train state + batch_size * act/seq + fixed.")


if __name__ == "__main__":
    main()
