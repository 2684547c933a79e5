"""Side-by-side speed against Hugging Face and build-nanogpt, in one process, on the same weights and data.

    python bench.py                          # everything, default shapes for the device
    python bench.py train --steps 3 --json bench.json
    python bench.py loss                     # the head's loss alone: fused at several chunk sizes, and plain
    python bench.py generate --dtype bfloat16 --new_tokens 32
    python bench.py loader
    python bench.py tokenize
    python bench.py quality                  # our Shakespeare preset, then build-nanogpt's recipe, 280 s each

train: forward + backward + AdamW step, tokens/s and peak memory, of our model as training runs it
(torch.compile on, the loss path --loss auto picks, fused AdamW), of our model eager (fused loss, and
plain), and of Hugging Face GPT2LMHeadModel (attn_implementation="sdpa") eager and compiled: same shapes, weights, batch and precision (--dtype auto
picks what train_gpt2.py would). Goals on CPU of either kind: ours >= 1.05x HF compiled, and ours at >= 90%
of this machine's rate on the step's largest matmul (the head's). On CUDA
also MFU; goal >= 50% on an H100.
loss: forward + backward of the head's loss alone (loss.linear_cross_entropy on random hidden states, vocab 50304), compiled
and eager: the fused loss at loss.LOGITS_CHUNK logits per chunk, at smaller chunks and in one chunk, and the plain
lm_head + F.cross_entropy. It prints how close the default chunk comes to the fastest fused row, and the path
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

Rows are interleaved over --repeats rounds and the median is reported: shared machines are noisy,
so compare the ratios, which are measured side by side.
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from cli import ConfigError, OneLineParser, check_out_file, run_main
from config import PRESETS
from loss import LOGITS_CHUNK, LMLoss, linear_cross_entropy
from model import GPT, GPTConfig
from optim import configure_optimizers
from runtime import flops_per_token, gpu_peak_flops, make_autocast, pick_dtype, pick_loss, resolve_device

WHAT = ("train", "loss", "generate", "loader", "tokenize", "quality")
DEFAULT = WHAT[:5]  # quality takes minutes: only when named
# build-nanogpt's train_gpt2.py hyperparameters at the Shakespeare preset's model shape; its GPT has lm_head, then
# F.cross_entropy on the full logits
BUILD_NANOGPT = dict(batch_size=16, seq_len=256, total_batch_size=4096, max_lr=1e-3, min_lr=1e-4, warmup_steps=10,
                     weight_decay=0.1, beta1=0.9, beta2=0.95, init_std=0.02, grad_clip=1.0, compile="true", loss="plain",
                     n_layer=4, n_head=4, n_embd=256, block_size=256, head_vocab="full")


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


def bench_train(args, device, dtype):
    dtype = pick_dtype(dtype, device)[0]
    device_type = "cuda" if device.startswith("cuda") else device
    config = GPTConfig(block_size=args.seq_len, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    ours = GPT(config)
    hf = same_weights_hf(ours, attn_implementation="sdpa", use_cache=False).to(device).train()
    ours_eager = ours.to(device).train()
    x, y = torch.randint(0, 50257, (2, args.batch, args.seq_len), device=device)
    autocast = make_autocast(dtype, device)
    loss_path = pick_loss("auto", device, compile=True)[0]  # as trained
    other = "plain" if loss_path == "fused" else "fused"  # the path not picked, compiled: the rule's evidence

    def lm(fused):  # a copy of our model with its training loss (loss.LMLoss)
        model = GPT(config).to(device).train()
        model.load_state_dict(ours_eager.state_dict())
        return LMLoss(model, fused=fused)
    trained, not_picked, eager = lm(loss_path == "fused"), lm(other == "fused"), LMLoss(ours_eager, fused=True)
    models = {  # name: (module with parameters, the callable that trains, loss of (model, x, y))
        "ours (as trained: compiled)": (trained, torch.compile(trained, dynamic=False), lambda m: m(x, y)),
        f"ours compiled, {other} loss": (not_picked, torch.compile(not_picked, dynamic=False), lambda m: m(x, y)),
        "ours eager": (eager, eager, lambda m: m(x, y)),
        "ours eager, unfused loss": (ours_eager, ours_eager, lambda m: m(x, y)[1]),  # full logits, F.cross_entropy
        "HF sdpa eager": (hf, hf, lambda m: m(input_ids=x, labels=y).loss),
        "HF sdpa compiled": (hf, torch.compile(hf), lambda m: m(input_ids=x, labels=y).loss),
    }

    def make_step(module, fn, loss_of):
        # the same AdamW for both: decay on matrices, fused where torch has a fused kernel
        opt = configure_optimizers(module, 0.1, 1e-4, device_type=device_type)

        def step():
            opt.zero_grad(set_to_none=True)
            try:
                with autocast:
                    loss = loss_of(fn)
                loss.backward()
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)  # the row is dropped: free its gradients for the others
                raise
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
          f"{device}, {dtype}, fwd+bwd+AdamW, median of {args.repeats}x{args.steps} steps; as trained: {loss_path} loss")
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
             "picked_vs_other_loss_compiled": ("ours (as trained: compiled)", f"ours compiled, {other} loss", "")}
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
                steps = sum("train_loss" in json.loads(line) for line in f)
            model = GPT.from_pretrained(out_dir).eval()
            prompt = torch.tensor([enc.encode("ROMEO:\n")])
            sample = model.generate(prompt, 48, top_k=50, generator=torch.Generator().manual_seed(0))[0].tolist()
            rows[name] = dict(val_loss=val_loss(out_dir, data_dir), wall_s=wall, steps=steps,
                              tokens=steps * cfg["total_batch_size"], budget=budget, done=done, config=cfg,
                              sample=enc.decode([t for t in sample if t < enc.n_vocab]))
    print(f"quality: {args.budget:g} s of wall time each, {device}, dtype {dtype}; float32 val loss on the first "
          f"10 val batches of 16 x 256 of {data_dir}")
    for name, r in rows.items():
        print(f"  {name:<28} val {r['val_loss']:.3f}  {r['steps']} steps, {r['tokens'] / 1e6:.2f}M tokens, "
              f"{r['wall_s']:.0f} s wall")
        print(f"    {r['budget']}\n    {r['done']}")
        print(f"    sample: {r['sample']!r}")
    (ours, base) = (rows[n]["val_loss"] for n in recipes)
    print(f"  ours - build-nanogpt's recipe: {ours - base:+.3f} nats (goal <= -0.3; ours goal <= 5.0)")
    return {"config": {**vars(args), "device": device, "dtype": dtype}, "runs": rows, "difference": ours - base}


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="*", help=f"any of {', '.join(WHAT)} (default: all)")
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
    p.add_argument("--train_args", default="", help="quality: more train_gpt2.py flags for both runs")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    for what in args.what:
        if what not in WHAT:
            p.error(f"unknown benchmark {what!r}: expected any of {', '.join(WHAT)}")
    args.what = args.what or list(DEFAULT)
    for name in ("n_layer", "n_head", "n_embd", "batch", "seq_len", "steps", "gen_batch", "prompt_len", "new_tokens",
                 "loader_batches", "docs", "repeats", "budget"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name}: must be positive, got {getattr(args, name)}")
    if args.json:
        check_out_file(args.json, "--json")
    if args.budget is None:
        args.budget = PRESETS["shakespeare"]["time_budget"]
    return args


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
    bench = {"train": bench_train, "loss": bench_loss, "generate": bench_generate, "loader": bench_loader, "tokenize": bench_tokenize,
             "quality": bench_quality}
    result = {}
    for what, run_args in todo.items():
        torch.manual_seed(0)
        result[what] = bench[what](run_args, device, args.dtype)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
