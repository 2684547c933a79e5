"""Train GPT-2 from scratch (or continue from its weights) on token shards.

    python train_gpt2.py --preset shakespeare              # a small GPT on a laptop CPU, a few minutes
    python train_gpt2.py                                   # GPT-2 124M, build-nanogpt's recipe, one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py # the same on 8 GPUs
    python train_gpt2.py --resume out/ckpt_001000          # continue a run, with its own settings

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
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import hf
from checkpoint import (
    REAL_VOCAB,
    MetricsLog,
    full_state,
    interrupted_line,
    list_checkpoints,
    load_checkpoint,
    load_model,
    resume_command,
    resume_target,
    save_checkpoint,
    start_run,
)
from cli import ConfigError, run_main
from config import BUDGET_PROBE, PREPARE_HINT, PRESETS, budget_steps, parse_args, restore, validate
from data import DataError, hellaswag
from data.shards import ShardLoader, shard_paths, shard_problem, token_counts
from data.tokenizer import get_encoding
from loggers import check_loggers, open_loggers
from loss import HeadVocab, LMLoss
from model import GPT, GPTConfig, memory_table
from optim import SpikeGuard, configure_optimizers, get_lr, step_unless
from runtime import (
    Stopper,
    check_compile,
    check_float16,
    compiled_graphs,
    flops_per_token,
    gpu_peak_flops,
    make_autocast,
    make_scaler,
    memory_advice,
    pick_dtype,
    pick_loss,
    set_deterministic,
    setup_dist,
    wrap_model,
)


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): one line, exit code 2, the last good checkpoint kept."""


@dataclass
class Run:
    """A run as it goes. cfg is the TrainConfig as given (or restored); what was decided at start (dtype, loss
    path, max_steps) and what changes as it trains live here, and go into checkpoints beside cfg."""
    cfg: object
    d: object  # runtime.Dist: this process's rank and device
    dtype: str
    loss: str
    max_steps: int
    model: GPT  # under FSDP, this rank's shards
    wrapped: object  # runtime.Wrapped: the model as the loop calls it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    train_loader: ShardLoader
    val_loader: ShardLoader
    hs_items: list  # HellaSwag, tokenized once
    log: MetricsLog
    grad_accum: int
    flops_per_token: int
    peak_flops: float | None  # the GPU's, for MFU; None on CPU or an unknown GPU
    t_start: float
    start: int = 0  # the first step of this invocation
    step_times: list = field(default_factory=list)
    eval_batch_seconds: float | None = None  # a val batch, timed at the first eval: what --time_budget counts
    graphs_before: int = 0
    guard: SpikeGuard | None = None  # skips an update whose loss or norm spikes
    lock: object = None  # out_dir's lock file, held while the process lives

    @property
    def end(self):
        """One past the last step of this invocation."""
        return min(self.max_steps, self.start + self.cfg.run_steps) if self.cfg.run_steps else self.max_steps

    def record(self):
        """What a checkpoint keeps of the run beside its weights: the config and the decisions made at start."""
        return {"config": asdict(self.cfg),
                "run": {"dtype": self.dtype, "loss": self.loss, "max_steps": self.max_steps}}


def build_model(cfg, ckpt=None):
    """A fresh GPT of the configured shape, or pretrained weights (init_from). Resuming a fine-tune from ckpt: a GPT
    of the checkpoint's shape, whose weights load_checkpoint fills (so --init_from's weights need not be at hand
    again); a scratch run's shape is its recorded config, which load_checkpoint checks the weights against."""
    if ckpt and cfg.init_from != "scratch":
        with open(os.path.join(ckpt, "config.json")) as f:
            shape = hf.config_from_hf(json.load(f))  # the fine-tuned model as saved
        return GPT(GPTConfig(**{**shape, "dropout": cfg.dropout}))
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


def check_inputs(cfg, d):
    """Read every input once, now, so that a missing or malformed file stops the run before anything is
    written: (model, train shard paths, val shard paths, HellaSwag examples)."""
    train_paths, val_paths = find_shards(cfg, "train", d), find_shards(cfg, "val", d)
    hs_examples = d.rank0_first(lambda: hellaswag.load_examples(cfg.hellaswag_path or hellaswag.download())) \
        if cfg.hellaswag_interval else []  # rank 0 downloads, the others wait for the file
    model = build_model(cfg, resume_target(cfg.out_dir, cfg.resume)).to(d.device)
    vocab, block = model.config.vocab_size, model.config.block_size  # pretrained weights bring their own
    if cfg.seq_len > block:
        raise ConfigError(f"--seq_len {cfg.seq_len} is longer than the model's context "
                          f"({block} tokens, {cfg.init_from})")
    if cfg.hellaswag_interval and vocab < REAL_VOCAB:
        raise ConfigError(f"--hellaswag_interval needs GPT-2's {REAL_VOCAB} tokens, but the model has {vocab} "
                          f"(--hellaswag_interval 0 turns it off)")
    prompt = get_encoding().encode(cfg.sample_prompt) if cfg.sample_interval else []
    if prompt and max(prompt) >= vocab:  # else the first sample would stop the run mid-way
        raise ConfigError(f"--sample_prompt {cfg.sample_prompt!r} holds token {max(prompt)}, beyond the model's "
                          f"{vocab} ids; give text of smaller ids, or --sample_interval 0")
    if vocab >= hf.GPT2_VOCAB:
        hf.gpt2_bpe_files()  # the tokenizer files every checkpoint carries: a missing BPE file stops the run now
    B, T, W = cfg.batch_size, cfg.seq_len, d.world_size
    for paths in (train_paths, val_paths):  # each rank scans its share of the shards; all ranks share the verdict
        problem = d.first(shard_problem(paths, min(vocab, REAL_VOCAB), rank=d.rank, world_size=W,
                                        min_tokens=B * T * W + 1))
        if problem:
            raise DataError(problem)
    return model, train_paths, val_paths, hs_examples


def head_vocab(cfg, model, train_paths, optimizer, d):
    """--head_vocab train: a loss.HeadVocab over the ids of the train shards (None for full, or when fewer than
    2 ids are left out)."""
    if cfg.head_vocab == "full":
        return None
    vocab = model.config.vocab_size
    counts = token_counts(train_paths, vocab)
    ids = counts.nonzero()[0]
    head = HeadVocab.of(ids, model.lm_head.weight, optimizer)
    d.print0(f"head vocab: the {len(ids):,} ids of the train shards" + (
        f" + 1 column for the other {vocab - len(ids):,}" if head else ": fewer than 2 left out, the full head"))
    return head


def decide(cfg, d, recorded, given):
    """(dtype, loss path, (why, why)): the rules of runtime.pick_dtype and pick_loss for 'auto', or a resumed
    run's own choices (recorded), so that a resume continues in the precision and path it started with."""
    (dtype, dtype_why), (loss, loss_why) = pick_dtype(cfg.dtype, d.device), pick_loss(cfg.loss, d.device, cfg.compile)
    if "dtype" in recorded and "dtype" not in given:
        dtype, dtype_why = recorded["dtype"], "the run's"
    if "loss" in recorded and "loss" not in given:
        loss, loss_why = recorded["loss"], "the run's"
    return dtype, loss, (dtype_why, loss_why)


def setup(cfg, given):
    """Check the inputs, claim out_dir, build the model, optimizer and loaders, and restore a checkpoint (given:
    the names of the flags on the command line, which win over a resumed run's own)."""
    t_start, d = time.time(), setup_dist(cfg.device)
    cfg, notes = restore(cfg, given)  # --resume: the checkpoint's TrainConfig, with the flags given winning
    if cfg.resume and cfg.parallel == "fsdp" and d.world_size == 1 and "parallel" not in given:
        # one process holds the whole model: nothing to shard
        cfg.parallel = "ddp"
        notes.append("the run's --parallel fsdp continues unsharded in one process")
    validate(cfg, d.world_size, given)
    check_loggers(cfg)  # a missing package stops the run now, before data and model load
    deterministic = set_deterministic(cfg.deterministic, d.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if d.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model, train_paths, val_paths, hs_examples = check_inputs(cfg, d)
    lock, ckpt, recorded = start_run(cfg, d)  # nothing is written before every input has been checked
    for note in notes:
        d.print0(f"note: {note}")
    if cfg.compile:
        check_compile(d.device)
    dtype, loss, why = decide(cfg, d, recorded, given)
    if dtype == "float16" and cfg.dtype != "float16":
        check_float16(d.device)  # auto chose it, here or where the run started
    tracked = {**asdict(cfg), "dtype": dtype, "loss": loss}  # the settings as trained, for wandb's config
    loggers = open_loggers(cfg, tracked, resumed=ckpt is not None) if d.master else []
    B, T, W = cfg.batch_size, cfg.seq_len, d.world_size
    c = model.config
    d.print0(f"device {d.device} x{W} {cfg.parallel} | dtype {dtype} ({why[0]}) | compile {cfg.compile} | loss {loss} "
             f"({why[1]}) | deterministic {'on' if deterministic[0] else 'off'} ({deterministic[1]}) | grad accum "
             f"{cfg.total_batch_size // (B * T * W)} | {len(train_paths)} train / {len(val_paths)} val shards in "
             f"{cfg.data_dir}")
    d.print0(memory_table({f"{c.n_layer}L/{c.n_head}H/{c.n_embd}": c}))
    lm = LMLoss(model, fused=loss == "fused")
    graphs_before = compiled_graphs()  # check_compile's graph is not the model's
    wrapped = wrap_model(lm, cfg.parallel, cfg.compile, d, cfg.activation_checkpointing)  # FSDP: `model` holds shards
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2),
                                     d.device.split(":")[0])
    lm.head = head_vocab(cfg, model, train_paths, optimizer, d)
    if d.master:
        with open(os.path.join(cfg.out_dir, "train_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    name = torch.cuda.get_device_name(d.device) if d.device.startswith("cuda") else ""
    if name and not gpu_peak_flops(name):
        d.print0(f"MFU: unknown GPU ({name})")
    max_steps = cfg.max_steps if "max_steps" in given else recorded.get("max_steps", cfg.max_steps)
    run = Run(cfg=cfg, d=d, dtype=dtype, loss=loss, max_steps=max_steps, model=model, wrapped=wrapped,
              optimizer=optimizer, scaler=make_scaler(dtype, d.device), autocast=make_autocast(dtype, d.device),
              train_loader=ShardLoader(train_paths, B, T, d.rank, W, shuffle=cfg.shuffle, seed=cfg.seed),
              val_loader=ShardLoader(val_paths, B, T, d.rank, W),
              hs_items=hellaswag.prepare(hs_examples, get_encoding()),
              log=MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), d.master, loggers),
              grad_accum=cfg.total_batch_size // (B * T * W), flops_per_token=flops_per_token(c, T),
              peak_flops=gpu_peak_flops(name) if name else None, t_start=t_start, graphs_before=graphs_before,
              guard=SpikeGuard(cfg.spike_z, device=d.device), lock=lock)
    if ckpt:
        run.start = load_checkpoint(ckpt, model, optimizer, run.train_loader, d, run.scaler, run.guard)
        run.log.truncate(run.start)  # the steps after the checkpoint are logged again, as this line runs them
        d.print0(f"resumed from {ckpt} at step {run.start}")
        for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):  # the checkpoint's groups hold
            group["betas"], group["weight_decay"] = (cfg.beta1, cfg.beta2), decay  # the run's: a flag given wins
    return run


@torch.no_grad()
def evaluate(run):
    """The val loss: the mean over the first cfg.val_steps batches of the val stream, whatever the world size (rank
    r scores batches r, r + W, ...; every rank runs as many forwards, as FSDP needs). Also times a batch after the
    first round (which compiles): what --time_budget counts an eval at."""
    lm, loader, steps, d = run.wrapped.eval, run.val_loader, run.cfg.val_steps, run.d
    rounds = -(-steps // d.world_size)
    lm.eval()
    loader.reset()
    total, t0 = torch.zeros((), device=d.device), time.time()
    for i in range(rounds):
        x, y = loader.next_batch()  # batch i * W + rank of the stream
        with run.autocast:
            loss = lm(x.to(d.device), y.to(d.device)).detach().float()
        if i * d.world_size + d.rank < steps:
            total += loss
        if i == 0 and rounds > 1:
            total.item()  # waits for the first round's kernels (CUDA)
            t0 = time.time()
    val_loss = d.sum(total).item() / steps
    lm.train()
    run.eval_batch_seconds = run.eval_batch_seconds or (time.time() - t0) / max(1, rounds - 1) / d.world_size
    return val_loss


def hellaswag_eval(run):
    """HellaSwag (acc, acc_norm): rank r scores examples r, r + W, ...; the counts are summed over ranks.
    batch_size // 4 examples per forward keeps the rows (4 per example) within a training micro batch."""
    cfg, d, items = run.cfg, run.d, run.hs_items
    per_batch, most = max(1, cfg.batch_size // 4), -(-len(items) // d.world_size)  # the largest share
    run.model.eval()
    counts = hellaswag.evaluate(run.wrapped.logits, items[d.rank::d.world_size], run.model.config.block_size,
                                d.device, per_batch, run.autocast, batches=-(-most // per_batch))  # FSDP: all join
    run.model.train()
    if d.world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, correct_norm, total = counts.tolist()
    return correct / total, correct_norm / total


def sample_text(run, step, num=2):
    """`num` continuations of the fixed prompt, with a generator of their own (sampling never changes the run's
    RNG), on every rank as FSDP's gathers need."""
    cfg, d, enc = run.cfg, run.d, get_encoding()
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed + step)
    idx = torch.tensor([enc.encode(cfg.sample_prompt)] * num, device=d.device)
    run.model.eval()
    out = run.wrapped.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=gen)
    run.model.train()
    return [enc.decode([t for t in row.tolist() if t < enc.n_vocab]) for row in out]


def periodic_evals(run, step):
    """The val loss, HellaSwag and samples due before this step's update."""
    cfg, d, last = run.cfg, run.d, step == run.max_steps - 1
    if step % cfg.eval_interval == 0 or last:
        val_loss = evaluate(run)
        d.print0(f"step {step:5d} | val loss {val_loss:.4f}")
        run.log.write(step=step, val_loss=val_loss)
    if cfg.hellaswag_interval and (step % cfg.hellaswag_interval == 0 or last):
        acc, acc_norm = hellaswag_eval(run)
        d.print0(f"step {step:5d} | hellaswag acc {acc:.4f} | acc_norm {acc_norm:.4f}")
        run.log.write(step=step, hellaswag_acc_norm=acc_norm, hellaswag_acc=acc)
    if cfg.sample_interval and ((step > 0 and step % cfg.sample_interval == 0) or last):
        samples = sample_text(run, step)
        for text in samples:
            d.print0(f"sample: {text!r}")
        run.log.text(step, "samples", samples)


def forward_backward(lm, x, y, grad_accum, autocast, scaler):
    """One micro step: backward of the loss on (x, y) / grad_accum, times float16's loss scale (so that small
    gradients survive; 1 otherwise); returns that loss, detached, in float32. (A function of its own, so that
    the autograd graph, which refers to FSDP's units, ends with it.)"""
    with autocast:
        loss = lm(x, y) / grad_accum
    scaler.scale(loss).backward()
    return loss.detach().float()


def train_step(run, step):
    """One optimizer step over grad_accum micro batches: (train loss, grad norm, lr, why it was skipped or None,
    seconds). The update is skipped, on the device, for a float16 overflow or a spike (optim.SpikeGuard)."""
    d, cfg, opt, scaler = run.d, run.cfg, run.optimizer, run.scaler
    t0, scale = time.time(), scaler.get_scale()
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=d.device)
    for micro in range(run.grad_accum):
        x, y = run.train_loader.next_batch()
        if d.device.startswith("cuda"):  # page-locked, so the copy overlaps the previous micro step's kernels
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        run.wrapped.sync(micro == run.grad_accum - 1)  # gradients are reduced across ranks on the last micro step
        loss_sum += forward_backward(run.wrapped.train, x, y, run.grad_accum, run.autocast, scaler)
    scaler.unscale_(opt)  # float16: the true gradients, for the norm and clipping
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: the norm over all shards
    loss = d.mean(loss_sum)  # every rank's, so that all decide alike
    spike, z = run.guard(loss, norm)
    lr = get_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, run.max_steps)
    for group in opt.param_groups:
        group["lr"] = lr
    step_unless(opt, scaler, spike)
    scaler.update()
    # read back only now, in one go: an .item() before optimizer.step() would stall the GPU queue every step
    train_loss, norm, spike, z_loss, z_norm = torch.stack([loss, norm.float(), spike, *z.float()]).tolist()
    skipped = f"spike: loss z {z_loss:.1f}, norm z {z_norm:.1f}" if spike else \
        "fp16 overflow" if scaler.get_scale() < scale else None  # update() lowers the scale on an overflow
    if not (math.isfinite(train_loss) and (math.isfinite(norm) or skipped)) or scaler.get_scale() < 1:
        newest = (list_checkpoints(cfg.out_dir) or ["none"])[-1]
        low = scaler.get_scale() < 1
        what = (f"loss {train_loss}, grad norm {norm}"
                + (f", loss scale {scaler.get_scale():g}" if scaler.is_enabled() else ""))
        hint = "float16 overflows even unscaled: use --dtype bfloat16 or float32" if low else "try a lower --max_lr"
        raise TrainingError(f"step {step}: {what}: training diverged; stopped without saving (newest checkpoint: "
                            f"{newest}); {hint}")
    return train_loss, norm, lr, skipped, time.time() - t0


def fix_budget(run, step):
    """--time_budget: after step BUDGET_PROBE, max_steps becomes what fits (rank 0's clock decides for all ranks)."""
    cfg, d = run.cfg, run.d
    if run.eval_batch_seconds is None:  # resumed after step 0's eval: time one now
        evaluate(run)
    step_seconds = statistics.median(run.step_times[1:] or run.step_times)
    run.max_steps = d.agree(budget_steps(cfg, step, time.time() - run.t_start, step_seconds, run.eval_batch_seconds))
    d.print0(f"--time_budget {cfg.time_budget:g} s: max_steps {run.max_steps} (recorded in checkpoints; timed: a "
             f"step {step_seconds * 1000:.0f} ms, an eval {cfg.val_steps * run.eval_batch_seconds:.1f} s)")
    run.log.write(step=step, max_steps=run.max_steps)


def log_step(run, step, train_loss, norm, lr, skipped, dt):
    cfg, d, scaler = run.cfg, run.d, run.scaler
    tok_per_sec = cfg.total_batch_size / dt
    mfu = run.flops_per_token * tok_per_sec / (run.peak_flops * d.world_size) if run.peak_flops else None
    recent = (run.step_times[1:] or run.step_times)[-20:]  # not this invocation's first step, which compiles
    eta = f"eta {statistics.mean(recent) * (run.max_steps - step - 1) / 60:.1f} min"
    if cfg.time_budget and step < BUDGET_PROBE:
        eta = f"eta after step {BUDGET_PROBE}"
    d.print0(f"step {step:5d} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | {dt * 1000:.0f} ms | "
             f"{tok_per_sec:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else "") + f" | {eta}")
    if skipped:
        d.print0(f"step {step:5d} | {skipped}: update skipped" +
                 (f", loss scale -> {scaler.get_scale():g}" if scaler.is_enabled() else ""))
    run.log.write(step=step, train_loss=train_loss, lr=lr, **({"norm": norm} if math.isfinite(norm) else {}),
                  **({"skipped": True, "reason": skipped} if skipped else {}),
                  dt_ms=dt * 1000, tokens_per_sec=tok_per_sec, **({"mfu": mfu} if mfu else {}),
                  **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}))


def finish(run, end):
    """The summary line, the final model (when the run reached max_steps), and a clean exit from torchrun; `end`:
    one past the last step run."""
    cfg, d = run.cfg, run.d
    if run.step_times:
        med = statistics.median(run.step_times)
        d.print0(f"done: steps {run.start}-{end - 1} in {time.time() - run.t_start:.0f} s wall (setup and compile "
                 f"included) | median step {med * 1000:.0f} ms, {cfg.total_batch_size / med:,.0f} tok/s")
    if end == run.max_steps:
        weights = full_state(run.model)[0]  # every rank: FSDP gathers the shards
        if d.master:
            run.model.save_pretrained(cfg.out_dir, vocab_size=min(run.model.config.vocab_size, REAL_VOCAB),
                                      state_dict=weights)
        d.print0(f"saved {cfg.out_dir}/model.safetensors (load with GPT.from_pretrained({cfg.out_dir!r}))")
    if cfg.compile:
        d.print0(f"compiled graphs: {compiled_graphs() - run.graphs_before}")
    run.log.close()
    if dist.is_initialized():  # also torchrun with one rank, whose NCCL warns at exit if the group lives on
        # DDP, FSDP's units and its device mesh hold the group: free them (FSDP's hooks form reference cycles,
        # which gc.freeze kept), so that destroy_process_group drops the last reference and joins gloo's threads
        run.wrapped.release()
        run.wrapped = run.model = run.optimizer = None
        gc.unfreeze()
        gc.collect()
        dist.destroy_process_group()


def out_of_memory_line(run):
    """What an out-of-memory first step says: the flags that model.py's estimate says would fit this GPU."""
    cfg, d, c = run.cfg, run.d, run.model.config
    gpu = torch.cuda.get_device_properties(d.device)
    advice = memory_advice(c, cfg.batch_size, cfg.seq_len, cfg.total_batch_size, d.world_size, gpu.total_memory,
                           cfg.parallel, cfg.activation_checkpointing)
    return (f"out of GPU memory in the first step at --batch_size {cfg.batch_size} ({gpu.name}, "
            f"{gpu.total_memory / 2**30:.0f} GiB); " +
            (f"by the memory estimate (python model.py) this fits: {advice}" if advice else
             "by the memory estimate (python model.py) no batch size fits one GPU: use more GPUs with --parallel fsdp"))


def train(cfg, given=frozenset()):
    """Train as cfg says (given: the names of the flags given, which a resume keeps over its checkpoint's); returns
    the signal that stopped the run early (SIGINT, SIGTERM), or None."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with Stopper() as stopper:
            run = setup(cfg, given)
            gc.collect()
            gc.freeze()  # setup's objects are never collected again: no GC pauses over them in the loop (nanochat)
            step = run.start
            while step < run.end:
                try:
                    periodic_evals(run, step)
                    train_loss, norm, lr, skipped, dt = train_step(run, step)
                except torch.cuda.OutOfMemoryError:
                    if step != run.start:
                        raise
                    raise ConfigError(out_of_memory_line(run)) from None
                run.step_times.append(dt)
                if run.cfg.time_budget and step == BUDGET_PROBE:
                    fix_budget(run, step)
                log_step(run, step, train_loss, norm, lr, skipped, dt)
                stop = run.d.any(stopper.signal is not None)  # every rank stops at the same step
                if stop or (run.cfg.ckpt_interval and (step + 1) % run.cfg.ckpt_interval == 0) or step + 1 == run.end:
                    save_checkpoint(run.cfg.out_dir, run.cfg.keep_last, step + 1, run.model, run.optimizer,
                                    run.train_loader, run.d, run.scaler, run.record(), run.guard)
                step += 1
                if stop and step < run.end:
                    finish(run, step)
                    ckpt = os.path.join(run.cfg.out_dir, f"ckpt_{step:06d}")
                    again = resume_command(ckpt, run.d.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
                    run.d.print0(f"stopped at step {step} ({stopper.signal or 'another rank'}); saved {ckpt}; continue "
                                 f"with: {again}")
                    return stopper.signal or "SIGTERM"
            finish(run, step)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def main(argv=None):
    argv, cfg = sys.argv[1:] if argv is None else argv, None

    def go():
        nonlocal cfg
        cfg, given = parse_args(argv, doc=__doc__)
        return train(cfg, given)
    try:
        stopped = run_main(go)
        if stopped:
            sys.exit(130 if stopped == "SIGINT" else 143)  # the shell's codes for a run ended by that signal
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{interrupted_line(argv, cfg, int(os.environ.get('WORLD_SIZE', 1)))}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
