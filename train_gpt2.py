"""Train GPT-2 from scratch (or continue from its weights) on token shards.

    python train_gpt2.py --preset shakespeare              # a small GPT on a laptop CPU, a few minutes
    python train_gpt2.py                                   # GPT-2 124M, build-nanogpt's recipe, one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py # the same on 8 GPUs

Every TrainConfig field is a flag (`--max_steps 100` or `--max_steps=100`); `--preset` picks the
defaults the other flags override; `--help` lists them all. Reference numbers for the 124M recipe
(build-nanogpt, 10B tokens of FineWeb-Edu): val loss about 3.07 vs OpenAI GPT-2 124M's 3.2924;
HellaSwag acc_norm about 0.30 vs GPT-2's 0.2955.
"""
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from checkpoint import (REAL_VOCAB, MetricsLog, full_state, interrupted_line, list_checkpoints, load_checkpoint,
                        load_model, save_checkpoint, start_run)
from cli import ConfigError, run_main
from config import BUDGET_PROBE, PREPARE_HINT, PRESETS, budget_steps, parse_args, validate
from data import hellaswag
from data import DataError
from data.shards import ShardLoader, shard_paths, shard_problem, frequent_ids, token_counts
from data.tokenizer import get_encoding
from loggers import check_loggers, open_loggers
from model import GPT, GPTConfig, configure_optimizers, format_report, gpu_peak_flops, storage_report
from runtime import check_compile, compiled_graphs, make_autocast, make_scaler, pick_dtype, pick_loss, setup_dist, wrap_model


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
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, init_std=cfg.init_std))
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
    """(mean loss over `steps` batches of the loader from its start, averaged across ranks; seconds per batch
    after the first, which compiles on the first eval: what --time_budget counts an eval at)."""
    model.eval()
    loader.reset()
    total, t0 = torch.zeros((), device=d.device), time.time()
    for i in range(steps):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(d.device), y.to(d.device))
        total += loss.detach().float()
        if i == 0 and steps > 1:
            total.item()  # waits for the first batch's kernels (CUDA)
            t0 = time.time()
    val_loss = d.mean(total / steps).item()
    model.train()
    return val_loss, (time.time() - t0) / max(1, steps - 1)


def forward_backward(model, x, y, grad_accum, autocast, scaler):
    """One micro step: backward of the loss on (x, y) / grad_accum, times float16's loss scale (so that small
    gradients survive; 1 otherwise); returns that loss, detached, in float32. (A function of its own, so that
    the autograd graph, which refers to FSDP's units, ends with it.)"""
    with autocast:
        _, loss = model(x, y)
    loss = loss / grad_accum
    scaler.scale(loss).backward()
    return loss.detach().float()


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
    per_batch, most = max(1, cfg.batch_size // 4), -(-len(items) // d.world_size)  # the largest share
    counts = hellaswag.evaluate(model, items[d.rank::d.world_size], per_batch, autocast,
                                batches=-(-most // per_batch))  # as many forwards on every rank: FSDP gathers in each
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
    if cfg.head_vocab != "full":  # the softmax over the ids training sees (GPT.set_head_vocab); after
        # start_run, which keeps a resumed run's value
        counts = token_counts(train_paths, vocab)
        ids = frequent_ids(counts, None if cfg.head_vocab == "train" else int(cfg.head_vocab))
        model.set_head_vocab(ids)  # ties the rows left out (a resumed run's were saved tied: the same ids)
        share = f"{len(ids):,} ids of the train shards ({counts[ids].sum() / counts.sum():.2%} of their tokens)"
        d.print0(f"head vocab: {share} + 1 column for the other {vocab - len(ids):,}" if model.head_cols is not None
                 else f"head vocab: {share} leave fewer than 2 ids out: the full head")
    if cfg.compile:
        check_compile(d.device)
    graphs_before = compiled_graphs()  # the check's own graph is not the model's
    cfg.dtype = d.agree(pick_dtype(cfg.dtype, d.device))  # measured choices: rank 0's timing decides for all
    cfg.loss = d.agree(pick_loss(cfg.loss, model, B * T, cfg.dtype, d.device, cfg.compile))
    model.fused_loss = cfg.loss == "fused"
    train_loader = ShardLoader(train_paths, B, T, d.rank, W, shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = ShardLoader(val_paths, B, T, d.rank, W)

    d.print0(f"device {d.device} x{W} {cfg.parallel} | dtype {cfg.dtype} | compile {cfg.compile} | loss {cfg.loss} | "
             f"grad accum {grad_accum} | {len(train_paths)} train / {len(val_paths)} val shards in {cfg.data_dir}")
    c = model.config
    d.print0(format_report({f"{c.n_layer}L/{c.n_head}H/{c.n_embd}": storage_report(c)}))
    run = wrap_model(model, cfg.parallel, cfg.compile, d)  # under FSDP `model` now holds this rank's shards
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), device_type)
    autocast, scaler = make_autocast(cfg.dtype, d.device), make_scaler(cfg.dtype, d.device)
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

    start = load_checkpoint(ckpt, model, optimizer, train_loader, d, scaler) if ckpt else 0
    scale = scaler.get_scale()  # float16's loss scale (1.0 otherwise)
    if ckpt:
        d.print0(f"resumed from {ckpt} at step {start}")
        for group in optimizer.param_groups:  # the checkpoint's (start_run), or those given with a note
            group["betas"] = (cfg.beta1, cfg.beta2)
    end = min(cfg.max_steps, start + cfg.run_steps) if cfg.run_steps else cfg.max_steps
    gc.collect()
    gc.freeze()  # setup's objects are never collected again: no GC pauses over them in the loop (nanochat)

    step, eval_batch_seconds = start, None
    while step < end:
        last = step == cfg.max_steps - 1
        if step % cfg.eval_interval == 0 or last:
            val_loss, eval_batch_seconds = evaluate(run.eval, val_loader, cfg.val_steps, d, autocast)
            d.print0(f"step {step:5d} | val loss {val_loss:.4f}")
            log.write(step=step, val_loss=val_loss)
        if cfg.hellaswag_interval and (step % cfg.hellaswag_interval == 0 or last):
            acc, acc_norm = hellaswag_eval(run.eval, hs_items, cfg, d, autocast)
            d.print0(f"step {step:5d} | hellaswag acc {acc:.4f} | acc_norm {acc_norm:.4f}")
            log.write(step=step, hellaswag_acc_norm=acc_norm, hellaswag_acc=acc)
        if cfg.sample_interval and ((step > 0 and step % cfg.sample_interval == 0) or last):
            samples = sample_text(model, enc, cfg, d, step)  # on every rank, as FSDP's gathers need; rank 0 prints
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
            run.sync(micro == grad_accum - 1)  # gradients are reduced across ranks on the last micro step only
            loss_sum += forward_backward(run.train, x, y, grad_accum, autocast, scaler)
        scaler.unscale_(optimizer)  # float16: the true gradients, for the norm and clipping
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: the norm over all shards
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)  # float16: skipped if a gradient overflowed (inf/nan), decided on the device
        scaler.update()
        model.tie_rest_()  # --head_vocab: the rows of the ids left out stay copies of the trained rest row
        if device_type == "cuda":
            torch.cuda.synchronize()
        # read back only now: an .item() before optimizer.step() would stall the GPU queue every step
        train_loss, norm = d.mean(loss_sum).item(), norm.item()
        prev_scale, scale = scale, scaler.get_scale()
        skipped = scale < prev_scale  # update() lowers the scale exactly when step() skipped an overflow
        dt = time.time() - t0
        if not (math.isfinite(train_loss) and (math.isfinite(norm) or skipped)) or scale < 1:
            newest = (list_checkpoints(cfg.out_dir) or ["none"])[-1]
            what = f"loss {train_loss}, grad norm {norm}" + (f", loss scale {scale:g}" if scaler.is_enabled() else "")
            hint = "float16 overflows even unscaled: use --dtype bfloat16 or float32" if scale < 1 else "try a lower --max_lr"
            raise TrainingError(f"step {step}: {what}: training diverged; stopped without saving (newest checkpoint: "
                                f"{newest}); {hint}")
        step_times.append(dt)
        if cfg.time_budget and step == BUDGET_PROBE:  # rank 0's clock decides for all ranks
            if eval_batch_seconds is None:  # resumed after step 0's eval: time one now
                eval_batch_seconds = evaluate(run.eval, val_loader, cfg.val_steps, d, autocast)[1]
            step_seconds = statistics.median(step_times[1:] or step_times)
            cfg.max_steps = d.agree(budget_steps(cfg, step, time.time() - t_run, step_seconds, eval_batch_seconds))
            end = min(cfg.max_steps, start + cfg.run_steps) if cfg.run_steps else cfg.max_steps
            d.print0(f"--time_budget {cfg.time_budget:g} s: max_steps {cfg.max_steps} (recorded in checkpoints; "
                     f"timed: a step {step_seconds * 1000:.0f} ms, an eval {cfg.val_steps * eval_batch_seconds:.1f} s)")
            log.write(step=step, max_steps=cfg.max_steps)
        tok_per_sec = cfg.total_batch_size / dt
        mfu = flops_per_token * tok_per_sec / (peak * W) if peak else None
        eta = sum(step_times[-20:]) / len(step_times[-20:]) * (cfg.max_steps - step - 1)
        eta = f"eta after step {BUDGET_PROBE}" if cfg.time_budget and step < BUDGET_PROBE else f"eta {eta / 60:.1f} min"
        d.print0(f"step {step:5d} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | {dt * 1000:.0f} ms | "
                 f"{tok_per_sec:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else "") + f" | {eta}")
        if skipped:
            d.print0(f"step {step:5d} | fp16 overflow: step skipped, loss scale -> {scale:g}")
        log.write(step=step, train_loss=train_loss, lr=lr, **({"skipped": True} if skipped else {"norm": norm}),
                  dt_ms=dt * 1000, tokens_per_sec=tok_per_sec, **({"mfu": mfu} if mfu else {}),
                  **({"loss_scale": scale} if scaler.is_enabled() else {}))
        if (cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0) or step + 1 == end:
            save_checkpoint(cfg, step + 1, model, optimizer, train_loader, d, scaler)
        step += 1

    if step_times:
        med = statistics.median(step_times)
        d.print0(f"done: steps {start}-{end - 1} in {time.time() - t_run:.0f} s wall (setup and compile included) | "
                 f"median step {med * 1000:.0f} ms, {cfg.total_batch_size / med:,.0f} tok/s")
    if end == cfg.max_steps:
        weights = full_state(model)[0]  # every rank: FSDP gathers the shards
        if d.master:
            model.save_pretrained(cfg.out_dir, vocab_size=min(vocab, REAL_VOCAB), state_dict=weights)
        d.print0(f"saved {cfg.out_dir}/model.safetensors (load with GPT.from_pretrained({cfg.out_dir!r}))")
    if cfg.compile:
        d.print0(f"compiled graphs: {compiled_graphs() - graphs_before}")
    log.close()
    if dist.is_initialized():  # also torchrun with one rank, whose NCCL warned at exit that the group was not destroyed
        # DDP holds the group, and so do FSDP's units and its device mesh: free them (FSDP's hooks form reference
        # cycles, which gc.freeze kept), so that destroy_process_group drops the last reference and joins gloo's
        # threads. One still releasing a collective's tensors when Python exits aborts the rank (SIGABRT).
        run.release()
        del run, model, optimizer
        gc.unfreeze()
        gc.collect()
        dist.destroy_process_group()


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): one line, exit code 2, the last good checkpoint kept."""


def main(argv=None):
    argv, cfg = sys.argv[1:] if argv is None else argv, None

    def run():
        nonlocal cfg
        cfg = parse_args(argv, doc=__doc__)
        train(cfg)
    try:
        run_main(run)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{interrupted_line(argv, cfg)}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
