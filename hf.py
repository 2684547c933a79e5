"""Hugging Face interop: GPT-2's config.json and state dict to ours and back, and reading and writing model
directories. The conversions are pure functions over dicts, so the parity tests need no download; model.py's
from_pretrained and save_pretrained wrap them.

A directory written for a model with GPT-2's vocabulary also holds GPT-2's tokenizer files, converted from
tiktoken's encoding without the hub, so AutoTokenizer and pipeline("text-generation") work on it as they are.

HF's GPT-2 keeps c_attn, c_proj and c_fc as Conv1D, whose weight is (in, out), nn.Linear's transposed; its files
also carry causal-mask buffers (attn.bias, attn.masked_bias), which are not parameters.
"""
import functools
import json
import os
import types

import torch

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_VOCAB = 50257  # GPT-2's tokenizer: 50256 BPE tokens and <|endoftext|>
EOT, EOT_TOKEN = 50256, "<|endoftext|>"


def config_from_hf(d):
    """A Hugging Face GPT2Config dict -> GPTConfig's fields (a dict); ValueError for what GPT-2 is not."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got a JSON {type(d).__name__}")
    if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation_function {d['activation_function']!r}")
    for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        if type(d[k]) is not int or d[k] < 1:
            raise ValueError(f"{k} must be a positive integer, got {d[k]!r}")
    if d["n_embd"] % d["n_head"]:
        raise ValueError(f"n_embd {d['n_embd']} is not divisible by n_head {d['n_head']}")
    gpt2 = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "tie_word_embeddings": True, "add_cross_attention": False, "n_inner": None}
    for k, want in gpt2.items():  # options that change the logits, which this GPT-2 does not implement
        ok = (want, 4 * d["n_embd"]) if k == "n_inner" else (want,)  # n_inner None means 4 * n_embd
        if d.get(k, want) not in ok:
            raise ValueError(f"{k} {d[k]!r} is not implemented (GPT-2's is {' or '.join(map(repr, ok))})")
    init_std = d.get("initializer_range", 0.02)
    if type(init_std) not in (int, float) or not init_std > 0:
        raise ValueError(f"initializer_range must be a positive number, got {init_std!r}")
    return dict(block_size=d["n_positions"], vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"],
                n_embd=d["n_embd"], bias=True, init_std=float(init_std))


def config_to_hf(config, vocab_size=None):
    """GPTConfig's fields (a dict) -> the config.json Hugging Face's GPT2LMHeadModel expects."""
    vocab = vocab_size or config["vocab_size"]
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": vocab, "n_positions": config["block_size"], "n_ctx": config["block_size"],
        "n_embd": config["n_embd"], "n_layer": config["n_layer"], "n_head": config["n_head"],
        "resid_pdrop": config["dropout"], "embd_pdrop": config["dropout"], "attn_pdrop": config["dropout"],
        "layer_norm_epsilon": 1e-5, "initializer_range": config["init_std"], "tie_word_embeddings": True,
        "bos_token_id": 50256 if vocab > 50256 else None, "eos_token_id": 50256 if vocab > 50256 else None,
    }


def hf_to_ours(sd):
    """HF GPT-2 state dict -> ours: drop the attention-mask buffers, add the 'transformer.' prefix that bare
    GPT2Model files lack, transpose the Conv1D weights to nn.Linear's, and tie lm_head to wte."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) and v.dim() != 1:
            continue  # causal-mask buffers of older transformers, not parameters
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        out[k] = v.t() if k.endswith(CONV1D_WEIGHTS) else v
    out.setdefault("lm_head.weight", out.get("transformer.wte.weight"))
    return out


def ours_to_hf(sd):
    """Our state dict -> HF's, without lm_head (tied to wte; safetensors refuses tensors that share memory)."""
    return {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in sd.items() if k != "lm_head.weight"}


def read_dir(path):
    """(GPTConfig's fields, HF state dict) of a directory with config.json and model.safetensors or
    pytorch_model.bin; ValueError naming the file for anything else."""
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


def read(name_or_path, names):
    """(GPTConfig's fields, HF state dict) of a local HF-format directory, or of OpenAI's weights for a name in
    `names` (gpt2, gpt2-medium, ...: through transformers, from the hub or its cache)."""
    if os.path.isdir(name_or_path):
        return read_dir(name_or_path)
    if name_or_path in names:
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel.from_pretrained(name_or_path)
        return config_from_hf(model.config.to_dict()), model.state_dict()
    raise ValueError(f"{name_or_path!r} is neither a directory nor one of {', '.join(names)}")


def umask():
    """The process's file-creation mask (reading it means setting it: put it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_dir(path, sd, config):
    """Write an HF state dict and config dict as path/model.safetensors and path/config.json, plus GPT-2's
    tokenizer files when the vocabulary holds GPT-2's (tokenizer_files). Each file is written under a temporary name
    and renamed into place, weights first and config.json last: config.json marks a complete directory."""
    from safetensors.torch import save_file
    extra = tokenizer_files(config) if config["vocab_size"] >= GPT2_VOCAB else {}  # before any write: may fetch
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()},
              os.path.join(path, "model.safetensors.tmp"), metadata={"format": "pt"})
    for name, data in {**extra, "config.json": json.dumps(config, indent=2).encode()}.items():
        with open(os.path.join(path, name + ".tmp"), "wb") as f:
            f.write(data)
    for name in ("model.safetensors", *extra, "config.json"):
        os.chmod(os.path.join(path, name + ".tmp"), 0o666 & ~umask())  # safetensors writes 0600: others could not read
        os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))


def bytes_to_unicode():
    """GPT-2's map of the 256 byte values to printable characters, the alphabet of its vocab.json and merges.txt:
    printable bytes stand for themselves, the others (space, controls, ...) for chr(256), chr(257), ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def bpe_merges(ranks):
    """tiktoken's mergeable ranks ({token bytes: rank}, single bytes first) -> the BPE merges, as byte pairs in
    rank order: the token of rank r is the pair that BPE over the ranks below r leaves of its bytes."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair, as tiktoken does, until two parts remain
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = pair_ranks.index(min(pair_ranks))
            if pair_ranks[i] >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2 or max(ranks.get(p, rank) for p in parts) >= rank:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append(tuple(parts))
    return merges


@functools.lru_cache(maxsize=1)
def gpt2_bpe_files():
    """{name: bytes} of GPT-2's vocab.json, merges.txt and tokenizer.json, converted from tiktoken's GPT-2 encoding
    (data/tokenizer.py: no download from the hub), with the hub's vocabulary and merges. tokenizer.json (the
    `tokenizers` library's file) keeps merges as "a b" strings, which every version of that library reads."""
    from data.tokenizer import get_encoding
    enc = get_encoding()
    assert enc.n_vocab == GPT2_VOCAB and enc._special_tokens == {EOT_TOKEN: EOT}, "not GPT-2's encoding"
    alphabet = bytes_to_unicode()
    text = lambda token: "".join(alphabet[b] for b in token)
    vocab = {**{text(t): r for t, r in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])}, EOT_TOKEN: EOT}
    merges = [f"{text(a)} {text(b)}" for a, b in bpe_merges(enc._mergeable_ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": EOT, "content": EOT_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }
    compact = lambda d: json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode()
    return types.MappingProxyType({"vocab.json": compact(vocab), "tokenizer.json": compact(tokenizer),
                                   "merges.txt": "\n".join(["#version: 0.2", *merges, ""]).encode()})


def tokenizer_files(config):
    """{name: bytes} of the tokenizer files an HF model directory of GPT-2 holds, for its config.json dict:
    gpt2_bpe_files, tokenizer_config.json and special_tokens_map.json (bos, eos and unk are <|endoftext|>, the
    length limit is n_positions, decoding gives back the exact text), and for a GPT2LMHeadModel a
    generation_config.json whose pad_token_id is <|endoftext|>, as open-ended generation needs one."""
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": config["n_positions"], **special,
        "add_bos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False, "errors": "replace",
        "added_tokens_decoder": {str(EOT): {"content": EOT_TOKEN, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": True}},
    }
    files = {**gpt2_bpe_files(), "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}
    if "GPT2LMHeadModel" in config.get("architectures", []):
        files["generation_config.json"] = {"bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT}
    return {name: d if isinstance(d, bytes) else json.dumps(d, indent=2).encode() for name, d in files.items()}


def fit_problem(own, sd):
    """Why state dict sd does not fit a model whose state dict is `own`, in one short line, or None. A model
    sharded by FSDP gives each tensor's full shape in its state dict, so this checks it too."""
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]

    def some(items):
        return ", ".join(items[:2]) + (f" and {len(items) - 2} more" if len(items) > 2 else "")
    parts = [f"{what} {some(items)}" for what, items in
             (("missing", missing), ("unexpected", unexpected), ("shapes (file vs model):", shapes)) if items]
    return "; ".join(parts) or None


def load_checked(model, sd, source="state dict"):
    """Copy sd into model, or raise one short ValueError saying what does not fit."""
    problem = fit_problem(model.state_dict(), sd)
    if problem:
        raise ValueError(f"{source}: weights do not fit the model: {problem}")
    model.load_state_dict(sd)
