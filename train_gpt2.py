"""Train GPT-2 from scratch (or continue from its weights) on token shards.

    python train_gpt2.py --preset shakespeare              # a small GPT on a laptop CPU, a few minutes
    python train_gpt2.py                                   # GPT-2 124M, build-nanogpt's recipe, one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py # the same on 8 GPUs

Every TrainConfig field is a flag (`--max_steps 100` or `--max_steps=100`); `--preset` picks the
defaults the other flags override; `--help` lists them all. Reference numbers for the 124M recipe
(build-nanogpt, 10B tokens of FineWeb-Edu): val loss about 3.07 vs OpenAI GPT-2 124M's 3.2924;
HellaSwag acc_norm about 0.30 vs GPT-2's 0.2955.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (REAL_VOCAB, MetricsLog, list_checkpoints, load_checkpoint, load_model, missing_files,
                        save_checkpoint, start_run)
from cli import ConfigError, OneLineParser, check_out_dir, check_seed, parse_bool, run_main
from data import hellaswag
from data.shards import DataError, ShardLoader, shard_paths, shard_problem
from data.tokenizer import get_encoding
from loggers import check_loggers, open_loggers
from model import GPT, MODEL_SHAPES, GPTConfig, configure_optimizers, format_report, gpu_peak_flops, storage_report
from runtime import check_compile, compiled_graphs, make_autocast, pick_dtype, resolve_device, setup_dist


@dataclass
class TrainConfig:
    preset: str = "gpt2-124m"
    data_dir: str = "data/shards/edufineweb"
    out_dir: str = "out"
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # autocast dtype: auto | bfloat16 | float32 (auto: see pick_dtype)
    compile: bool = True
    seed: int = 1337
    max_steps: int = 19073  # 10B tokens at 524,288 tokens/step
    total_batch_size: int = 524288  # tokens per optimizer step, across ranks and micro steps
    batch_size: int = 64  # sequences per rank per micro step
    seq_len: int = 1024
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    val_steps: int = 20  # val batches per eval
    hellaswag_interval: int = 250  # HellaSwag eval every this many steps (0 disables)
    hellaswag_path: str = ""  # a HellaSwag jsonl; "": the val set, downloaded to data/cache/hellaswag/
    sample_interval: int = 250  # 0 disables sampling
    sample_prompt: str = "Hello, I'm a language model,"
    sample_tokens: int = 32
    shuffle: bool = False  # shuffle the train shards each epoch
    init_from: str = "scratch"  # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | an HF-format dir
    ckpt_interval: int = 1000  # write out_dir/ckpt_<step>/ every this many steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept (the newest)
    resume: str = ""  # "" (start fresh) | auto (newest checkpoint in out_dir, else fresh) | a ckpt dir
    overwrite: bool = False  # a fresh run may delete the run already in out_dir (else it is refused)
    run_steps: int = 0  # stop after this many steps in this invocation, checkpointed (0: run to max_steps)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304  # 50257 padded to a multiple of 64 for faster matmuls
    dropout: float = 0.0
    wandb_project: str = ""  # also log to this wandb project ("": off; WANDB_MODE=offline works without an account)
    tensorboard: str = ""  # also log to TensorBoard event files in this directory ("": off)


def shape(name):
    n_layer, n_head, n_embd = MODEL_SHAPES[name]
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


# Named sets of defaults. gpt2-124m is build-nanogpt's recipe; the larger ones take GPT-3's learning rates.
PRESETS = {
    "gpt2-124m": {},
    "gpt2-medium": dict(**shape("gpt2-medium"), batch_size=32, max_lr=3e-4, min_lr=3e-5),
    "gpt2-large": dict(**shape("gpt2-large"), batch_size=16, max_lr=2.5e-4, min_lr=2.5e-5),
    "gpt2-xl": dict(**shape("gpt2-xl"), batch_size=8, max_lr=2e-4, min_lr=2e-5),
    "shakespeare": dict(
        **shape("shakespeare"), data_dir="data/shards/shakespeare", out_dir="out-shakespeare",
        block_size=256, seq_len=256, batch_size=16, total_batch_size=4096, max_steps=60,
        max_lr=2e-3, min_lr=2e-4, warmup_steps=30, weight_decay=0.1, eval_interval=20, val_steps=10,
        hellaswag_interval=0, sample_interval=30, sample_prompt="ROMEO:\n", sample_tokens=48, shuffle=True,
        compile=False),  # 2-core AVX2 CPU, float32: tens of seconds of compiling for a gain that varied by run
    # Continue from GPT-2's weights on your own shards (nanoGPT's finetune_shakespeare: 32 x 1024 tokens per
    # step, constant lr 3e-5): a small constant lr after a short warmup, eval, samples and checkpoints often.
    "finetune": dict(
        init_from="gpt2", data_dir="data/shards/shakespeare", out_dir="out-ft", seq_len=1024, batch_size=8,
        total_batch_size=32768, max_steps=200, max_lr=3e-5, min_lr=3e-5, warmup_steps=10, dropout=0.1,
        eval_interval=20, val_steps=10, hellaswag_interval=0, sample_interval=50, sample_prompt="ROMEO:\n",
        sample_tokens=64, ckpt_interval=50, keep_last=4, shuffle=True),  # keep all 4: pick the best val loss
}
PREPARE_HINT = {"shakespeare": "python data/shakespeare.py",
                "finetune": "python data/fineweb.py --input YOUR_TEXT --out_dir {data_dir}"}


def parse_args(argv=None):
    """argv -> TrainConfig: TrainConfig defaults, then the preset's, then the flags given."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        kind = parse_bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        parser.add_argument(f"--{f.name}", type=kind, default=None, metavar=f.name.upper(),
                            help=f"default: {f.default!r}" + (f"; presets: {', '.join(PRESETS)}" if f.name == "preset" else ""))
    args = parser.parse_args(argv)
    preset = args.preset or TrainConfig.preset
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    given = {k: v for k, v in vars(args).items() if v is not None}
    if given.get("resume", "") not in ("", "auto") and "out_dir" not in given:  # a resumed run writes where it lives
        given["out_dir"] = os.path.dirname(os.path.normpath(given["resume"])) or "."
    cfg = TrainConfig(**{**PRESETS[preset], **given, "preset": preset})
    cfg.given = set(given)  # which flags the user set: a resume keeps the checkpoint's measured choices otherwise
    return cfg


def validate(cfg, world_size):
    """Raise ConfigError naming the flag for any value that cannot work."""
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    resolve_device(cfg.device)
    need(cfg.dtype in ("auto", "bfloat16", "float32"), f"--dtype: expected auto, bfloat16 or float32, got {cfg.dtype!r}")
    for name in ("max_steps", "total_batch_size", "batch_size", "seq_len", "eval_interval", "val_steps",
                 "n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        need(getattr(cfg, name) > 0, f"--{name}: must be positive, got {getattr(cfg, name)}")
    for name in ("max_lr", "min_lr", "weight_decay", "grad_clip", "dropout"):
        need(math.isfinite(getattr(cfg, name)), f"--{name}: must be a finite number, got {getattr(cfg, name)}")
    for name in ("max_lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps", "sample_interval", "sample_tokens",
                 "ckpt_interval", "run_steps", "hellaswag_interval"):
        need(getattr(cfg, name) >= 0, f"--{name}: must not be negative, got {getattr(cfg, name)}")
    need(not cfg.sample_interval or cfg.sample_prompt, "--sample_prompt: empty (give some text, or --sample_interval 0)")
    check_seed(cfg.seed)
    check_out_dir(cfg.out_dir)
    need(cfg.min_lr <= cfg.max_lr, f"--min_lr {cfg.min_lr} is larger than --max_lr {cfg.max_lr}")
    need(0 <= cfg.dropout < 1, f"--dropout: must be in [0, 1), got {cfg.dropout}")
    need(cfg.n_embd % cfg.n_head == 0, f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    need(cfg.seq_len <= cfg.block_size, f"--seq_len {cfg.seq_len} is longer than --block_size {cfg.block_size}")
    per_step = cfg.batch_size * cfg.seq_len * world_size
    need(cfg.total_batch_size % per_step == 0,
         f"--total_batch_size {cfg.total_batch_size} is not divisible by batch_size*seq_len*world_size = "
         f"{cfg.batch_size}*{cfg.seq_len}*{world_size} = {per_step}")
    need(cfg.keep_last >= 2, f"--keep_last: must be at least 2, got {cfg.keep_last}")
    need(cfg.resume in ("", "auto") or os.path.isdir(cfg.resume), f"--resume: {cfg.resume!r} is not auto or a directory")
    missing = missing_files(cfg.resume) if cfg.resume not in ("", "auto") else []
    if missing:  # checked now, before anything is written next to it
        newest = list_checkpoints(cfg.resume)  # a run's out_dir given for one of its checkpoints?
        hint = f"; to continue that run: --out_dir {cfg.resume} --resume auto (newest: {newest[-1]})" if newest else ""
        raise ConfigError(f"--resume {cfg.resume}: not a complete checkpoint (missing {', '.join(missing)}){hint}")
    need(cfg.init_from == "scratch" or os.path.isdir(cfg.init_from) or cfg.init_from in MODEL_SHAPES,
         f"--init_from: {cfg.init_from!r} is not scratch, a GPT-2 name or a directory")


def get_lr(step, cfg):
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.max_lr - cfg.min_lr)


def build_model(cfg):
    """A fresh GPT of the configured shape, or pretrained weights (init_from)."""
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    return load_model(cfg.init_from, dropout=cfg.dropout)


def find_shards(cfg, split, d):
    """The split's shard paths. The shakespeare corpus is prepared on first use, only at its default path
    (rank 0 prepares, the others wait): a mistyped --data_dir is an error, not a new copy."""
    hint = PREPARE_HINT.get(cfg.preset, "python data/fineweb.py --out_dir {data_dir}").format(data_dir=cfg.data_dir)
    if os.path.normpath(cfg.data_dir) == os.path.normpath(PRESETS["shakespeare"]["data_dir"]):
        from data.shakespeare import prepare
        d.rank0_first(lambda: prepare(cfg.data_dir))
    return shard_paths(cfg.data_dir, split, hint=f"; prepare them with: {hint}")


@torch.no_grad()
def evaluate(model, loader, steps, d, autocast):
    """Mean loss over `steps` batches of the loader from its start, averaged across ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=d.device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(d.device), y.to(d.device))
        total += loss.detach().float()
    model.train()
    return d.mean(total / steps).item()


def sample_text(model, enc, cfg, d, step, num=2):
    """Decode `num` continuations of the fixed prompt with the model's generate (its own RNG, so
    sampling never changes the training run)."""
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed + step)
    idx = torch.tensor([enc.encode(cfg.sample_prompt)] * num, device=d.device)
    model.eval()
    out = model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=gen)
    model.train()
    return [enc.decode([t for t in row.tolist() if t < enc.n_vocab]) for row in out]


def hellaswag_eval(model, items, cfg, d, autocast):
    """HellaSwag (acc, acc_norm): rank r scores examples r, r + W, ...; the counts are summed over ranks.

    batch_size // 4 examples per forward keeps the rows (4 per example) within a training micro batch.
    """
    counts = hellaswag.evaluate(model, items[d.rank::d.world_size], max(1, cfg.batch_size // 4), autocast)
    if d.world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, correct_norm, total = counts.tolist()
    return correct / total, correct_norm / total


def train(cfg):
    t_run = time.time()
    d = setup_dist(cfg.device)
    validate(cfg, d.world_size)
    check_loggers(cfg)  # a missing package stops the run now, before data and model load
    device_type = "cuda" if d.device.startswith("cuda") else d.device
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    B, T, W = cfg.batch_size, cfg.seq_len, d.world_size
    grad_accum = cfg.total_batch_size // (B * T * W)

    train_paths, val_paths = find_shards(cfg, "train", d), find_shards(cfg, "val", d)
    # read once, now: a missing or malformed file stops the run before training, not hours into it;
    # the val set is downloaded by rank 0 alone, the other ranks wait for it
    hs_examples = d.rank0_first(lambda: hellaswag.load_examples(cfg.hellaswag_path or hellaswag.download())) \
        if cfg.hellaswag_interval else []
    model = build_model(cfg).to(d.device)
    vocab = model.config.vocab_size
    # checks that need the model: pretrained weights bring their own context length and vocabulary
    if cfg.seq_len > model.config.block_size:
        raise ConfigError(f"--seq_len {cfg.seq_len} is longer than the model's context ({model.config.block_size}"
                          f" tokens, {cfg.init_from})")
    if cfg.hellaswag_interval and vocab < REAL_VOCAB:
        raise ConfigError(f"--hellaswag_interval needs GPT-2's {REAL_VOCAB} tokens, but the model has {vocab} "
                          f"(--hellaswag_interval 0 turns it off)")
    for paths in (train_paths, val_paths):  # each rank scans its share of the shards; all ranks share the verdict
        problem = d.first(shard_problem(paths, min(vocab, REAL_VOCAB), rank=d.rank, world_size=W, min_tokens=B * T * W + 1))
        if problem:
            raise DataError(problem)
    lock, ckpt = start_run(cfg, d)  # nothing is written before every input has been checked
    loggers = open_loggers(cfg, resumed=ckpt is not None) if d.master else []
    if cfg.compile:
        check_compile(d.device)
    graphs_before = compiled_graphs()  # the check's own graph is not the model's
    cfg.dtype = pick_dtype(cfg.dtype, d.device)
    train_loader = ShardLoader(train_paths, B, T, d.rank, W, shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = ShardLoader(val_paths, B, T, d.rank, W)

    d.print0(f"device {d.device} x{W} | dtype {cfg.dtype} | compile {cfg.compile} | grad accum {grad_accum} | "
             f"{len(train_paths)} train / {len(val_paths)} val shards in {cfg.data_dir}")
    c = model.config
    d.print0(format_report({f"{c.n_layer}L/{c.n_head}H/{c.n_embd}": storage_report(c)}))
    # static shapes: every use pads to one shape, and automatic dynamic shapes crash DDP's graph splitting
    compiled = torch.compile(model, dynamic=False) if cfg.compile else model
    ddp_model = DDP(compiled, device_ids=[d.local_rank] if device_type == "cuda" else None) if W > 1 else compiled
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.max_lr, device_type=device_type)
    autocast = make_autocast(cfg.dtype, d.device)
    enc = get_encoding()
    hs_items = hellaswag.prepare(hs_examples, enc)  # tokenized once, scored at every HellaSwag eval

    if d.master:
        with open(os.path.join(cfg.out_dir, "train_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), d.master, loggers)
    peak = gpu_peak_flops(torch.cuda.get_device_name(d.device)) if device_type == "cuda" else None
    if device_type == "cuda" and not peak:
        d.print0(f"MFU: unknown GPU ({torch.cuda.get_device_name(d.device)})")
    flops_per_token = model.flops_per_token(T)
    step_times = []

    start = load_checkpoint(ckpt, model, optimizer, train_loader, d) if ckpt else 0
    if ckpt:
        d.print0(f"resumed from {ckpt} at step {start}")
    end = min(cfg.max_steps, start + cfg.run_steps) if cfg.run_steps else cfg.max_steps
    gc.collect()
    gc.freeze()  # setup's objects are never collected again: no GC pauses over them in the loop (nanochat)

    for step in range(start, end):
        last = step == cfg.max_steps - 1
        if step % cfg.eval_interval == 0 or last:
            val_loss = evaluate(compiled, val_loader, cfg.val_steps, d, autocast)
            d.print0(f"step {step:5d} | val loss {val_loss:.4f}")
            log.write(step=step, val_loss=val_loss)
        if cfg.hellaswag_interval and (step % cfg.hellaswag_interval == 0 or last):
            acc, acc_norm = hellaswag_eval(compiled, hs_items, cfg, d, autocast)
            d.print0(f"step {step:5d} | hellaswag acc {acc:.4f} | acc_norm {acc_norm:.4f}")
            log.write(step=step, hellaswag_acc_norm=acc_norm, hellaswag_acc=acc)
        if cfg.sample_interval and d.master and ((step > 0 and step % cfg.sample_interval == 0) or last):
            samples = sample_text(model, enc, cfg, d, step)
            for text in samples:
                d.print0(f"sample: {text!r}")
            log.text(step, "samples", samples)

        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(grad_accum):
            x, y = train_loader.next_batch()
            if device_type == "cuda":  # page-locked, so the copy overlaps the previous micro step's kernels
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            # under DDP, gradients are all-reduced only on the last micro step
            sync = contextlib.nullcontext() if W == 1 or micro == grad_accum - 1 else ddp_model.no_sync()
            with sync:
                with autocast:
                    _, loss = ddp_model(x, y)
                loss = loss / grad_accum
                loss_sum += loss.detach().float()
                loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        # read back only now: an .item() before optimizer.step() would stall the GPU queue every step
        train_loss, norm = d.mean(loss_sum).item(), norm.item()
        dt = time.time() - t0
        if not (math.isfinite(train_loss) and math.isfinite(norm)):
            newest = (list_checkpoints(cfg.out_dir) or ["none"])[-1]
            raise TrainingError(f"step {step}: loss {train_loss}, grad norm {norm}: training diverged; stopped without "
                                f"saving (newest checkpoint: {newest}); try a lower --max_lr")
        step_times.append(dt)
        tok_per_sec = cfg.total_batch_size / dt
        mfu = flops_per_token * tok_per_sec / (peak * W) if peak else None
        eta = sum(step_times[-20:]) / len(step_times[-20:]) * (cfg.max_steps - step - 1)
        d.print0(f"step {step:5d} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | {dt * 1000:.0f} ms | "
                 f"{tok_per_sec:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else "") + f" | eta {eta / 60:.1f} min")
        log.write(step=step, train_loss=train_loss, lr=lr, norm=norm, dt_ms=dt * 1000, tokens_per_sec=tok_per_sec,
                  **({"mfu": mfu} if mfu else {}))
        if (cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0) or step + 1 == end:
            save_checkpoint(cfg, step + 1, model, optimizer, train_loader, d)

    if step_times:
        med = statistics.median(step_times)
        d.print0(f"done: steps {start}-{end - 1} in {time.time() - t_run:.0f} s wall (setup and compile included) | "
                 f"median step {med * 1000:.0f} ms, {cfg.total_batch_size / med:,.0f} tok/s")
    if d.master and end == cfg.max_steps:
        model.save_pretrained(cfg.out_dir, vocab_size=min(vocab, REAL_VOCAB))
        d.print0(f"saved {cfg.out_dir}/model.safetensors (load with GPT.from_pretrained({cfg.out_dir!r}))")
    if cfg.compile:
        d.print0(f"compiled graphs: {compiled_graphs() - graphs_before}")
    log.close()
    if W > 1:
        # DDP holds the group: free it, so that destroy_process_group drops the last reference and joins gloo's
        # threads. One still releasing a collective's tensors when Python exits aborts the rank (SIGABRT).
        del ddp_model
        dist.destroy_process_group()


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): one line, exit code 2, the last good checkpoint kept."""


def resume_command(argv, out_dir):
    """The command line that continues this run: the same flags, without --resume/--overwrite, plus
    --out_dir and --resume auto."""
    keep, skip = [], False
    for a in argv:
        if skip or a.split("=")[0] in ("--resume", "--overwrite"):
            skip = not skip and "=" not in a
            continue
        keep.append(a)
    if "--out_dir" not in {a.split("=")[0] for a in keep}:
        keep += ["--out_dir", out_dir]
    return " ".join(["python train_gpt2.py", *map(shlex.quote, keep), "--resume", "auto"])


def main(argv=None):
    argv, cfg = sys.argv[1:] if argv is None else argv, None

    def run():
        nonlocal cfg
        cfg = parse_args(argv)
        train(cfg)
    try:
        run_main(run)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        newest = list_checkpoints(cfg.out_dir)[-1:] if cfg else []
        how = f"; newest checkpoint {newest[0]}; continue with: {resume_command(argv, cfg.out_dir)}" if newest \
            else f"; no checkpoint was written yet (--ckpt_interval {cfg.ckpt_interval}); start over with --overwrite true"
        print(f"\ninterrupted{how}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
