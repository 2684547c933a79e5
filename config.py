"""The trainer's configuration: TrainConfig (every field is a flag), the named presets, and the checks.

Its own module so that other scripts (bench.py's time-to-quality run) read the presets without importing the
training script.
"""
import argparse
import math
import os
from dataclasses import dataclass, fields

from checkpoint import list_checkpoints, missing_files, recorded, resume_target
from cli import ConfigError, OneLineParser, check_out_dir, check_seed, parse_bool
from model import GPT2_SHAPES
from runtime import DTYPES, check_float16, pick_dtype, resolve_device


@dataclass
class TrainConfig:
    preset: str = "gpt2-124m"
    data_dir: str = "data/shards/edufineweb"
    out_dir: str = "out"
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # autocast dtype: auto | bfloat16 | float16 | float32 (auto: see pick_dtype)
    compile: bool = True
    loss: str = "auto"  # auto | fused | plain: the head's loss path (auto: a rule, see runtime.pick_loss)
    # auto | true | false: bit-for-bit repeatable runs (auto: on CPU; runtime.set_deterministic)
    deterministic: str = "auto"
    # recompute each block's activations in backward: less memory, ~1/3 more compute
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # ddp | fsdp: how torchrun's ranks share the model (FSDP2 shards weights, grads, AdamW)
    # full | train: the softmax over every id, or over the train shards' ids + 1 (loss.HeadVocab)
    head_vocab: str = "full"
    seed: int = 1337
    max_steps: int = 19073  # 10B tokens at 524,288 tokens/step
    total_batch_size: int = 524288  # tokens per optimizer step, across ranks and micro steps
    batch_size: int = 64  # sequences per rank per micro step
    seq_len: int = 1024
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    weight_decay: float = 0.1
    beta1: float = 0.9  # AdamW's betas
    beta2: float = 0.95
    init_std: float = 0.02  # --init_from scratch: weights start N(0, init_std) (GPT-2's 0.02)
    grad_clip: float = 1.0  # 0 disables clipping
    spike_z: float = 5.0  # skip an update whose loss or grad norm is this many std above the last 128 steps' (0: off)
    eval_interval: int = 250
    val_steps: int = 160  # val batches of batch_size per eval, for the whole job (build-nanogpt's 20 on each of 8 GPUs)
    hellaswag_interval: int = 250  # HellaSwag eval every this many steps (0 disables)
    hellaswag_path: str = ""  # a HellaSwag jsonl; "": the val set, downloaded to data/cache/hellaswag/
    sample_interval: int = 250  # 0 disables sampling
    sample_prompt: str = "Hello, I'm a language model,"
    sample_tokens: int = 32
    # false | true | samples: the train shards in order (build-nanogpt's), in a new order each epoch, or that and
    # each shard's seq_len-token samples in a new order each epoch (data.shards.ShardLoader)
    shuffle: str = "false"
    init_from: str = "scratch"  # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | an HF-format dir
    ckpt_interval: int = 1000  # write out_dir/ckpt_<step>/ every this many steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept (the newest)
    resume: str = ""  # "" (start fresh) | auto (newest checkpoint in out_dir, else fresh) | a ckpt dir
    overwrite: bool = False  # a fresh run may delete the run already in out_dir (else it is refused)
    run_steps: int = 0  # stop after this many steps in this invocation, checkpointed (0: run to max_steps)
    time_budget: float = 0  # seconds of wall time: after the first timed steps max_steps becomes what fits (0: off)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304  # 50257 padded to a multiple of 64 for faster matmuls
    dropout: float = 0.0
    wandb_project: str = ""  # also log to this wandb project ("": off; WANDB_MODE=offline works without an account)
    tensorboard: str = ""  # also log to TensorBoard event files in this directory ("": off)


def shape(name):
    n_layer, n_head, n_embd = GPT2_SHAPES[name]
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


# Named sets of defaults. gpt2-124m is build-nanogpt's recipe; the larger ones take GPT-3's learning rates.
PRESETS = {
    "gpt2-124m": {},
    "gpt2-medium": dict(**shape("gpt2-medium"), batch_size=32, max_lr=3e-4, min_lr=3e-5),
    "gpt2-large": dict(**shape("gpt2-large"), batch_size=16, max_lr=2.5e-4, min_lr=2.5e-5),
    "gpt2-xl": dict(**shape("gpt2-xl"), batch_size=8, max_lr=2e-4, min_lr=2e-5),
    # A small GPT in 5 minutes of a laptop CPU: --time_budget fixes the steps that fit (max_steps is a cap; 280 s
    # leaves room for a machine that slows down), and the shape and hyperparameters won sweeps (docs/shakespeare.md)
    "shakespeare": dict(
        n_layer=4, n_head=4, n_embd=96, data_dir="data/shards/shakespeare", out_dir="out-shakespeare",
        block_size=256, seq_len=256, batch_size=16, total_batch_size=4096, max_steps=2000, time_budget=280,
        max_lr=2e-3, min_lr=2e-4, warmup_steps=10, weight_decay=0.1, beta2=0.999, init_std=0.035, eval_interval=250,
        val_steps=10, head_vocab="train",
        hellaswag_interval=0, sample_interval=100, sample_prompt="ROMEO:\n", sample_tokens=48, shuffle="true"),
    # Continue from GPT-2's weights on your own shards (nanoGPT's finetune_shakespeare: 32 x 1024 tokens per
    # step, constant lr 3e-5): a small constant lr after a short warmup, eval, samples and checkpoints often.
    "finetune": dict(
        init_from="gpt2", data_dir="data/shards/shakespeare", out_dir="out-ft", seq_len=1024, batch_size=8,
        total_batch_size=32768, max_steps=200, max_lr=3e-5, min_lr=3e-5, warmup_steps=10, dropout=0.1,
        eval_interval=20, val_steps=10, hellaswag_interval=0, sample_interval=50, sample_prompt="ROMEO:\n",
        sample_tokens=64, ckpt_interval=50, keep_last=4, shuffle="true"),  # keep all 4: pick the best val loss
}
CHOICES = {"preset": f"; presets: {', '.join(PRESETS)}",  # what --help adds to a flag's default
           "dtype": f"; one of {', '.join(DTYPES)} (auto: bfloat16 where the GPU or CPU has it natively, float16 on "
                    "older GPUs such as T4 and V100, else float32)"}
PREPARE_HINT = {"shakespeare": "python data/shakespeare.py",
                "finetune": "python data/fineweb.py --input YOUR_TEXT --out_dir {data_dir}"}


def parse_args(argv=None, doc=None):
    """argv -> (TrainConfig, the names of the flags given): TrainConfig defaults, then the preset's, then the flags
    given (`doc` heads --help). A resume takes the flags not given from its checkpoint."""
    parser = OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        kind = parse_bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        parser.add_argument(f"--{f.name}", type=kind, default=None, metavar=f.name.upper(),
                            help=f"default: {f.default!r}" + CHOICES.get(f.name, ""))
    args = parser.parse_args(argv)
    preset = args.preset or TrainConfig.preset
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    given = {k: v for k, v in vars(args).items() if v is not None}
    if given.get("resume", "") not in ("", "auto") and "out_dir" not in given:  # a resumed run writes where it lives
        given["out_dir"] = os.path.dirname(os.path.normpath(given["resume"])) or "."
    return TrainConfig(**{**PRESETS[preset], **given, "preset": preset}), frozenset(given)


# A resume may change any flag but these, which fix what the run is: its model, data, order and seed.
FROZEN = ("preset", "data_dir", "seed", "seq_len", "shuffle", "n_layer", "n_head", "n_embd", "block_size", "vocab_size",
          "head_vocab", "init_from", "init_std")
THIS_INVOCATION = ("resume", "overwrite", "out_dir", "run_steps")  # never taken from the checkpoint


def restore(cfg, given):
    """--resume: (the run's own TrainConfig from its checkpoint, with the flags given on the command line winning,
    [one note per flag that changed a value]). A flag of FROZEN that differs is a ConfigError naming it; without
    --resume, or with nothing to resume, cfg as it is."""
    ckpt = resume_target(cfg.out_dir, cfg.resume)
    config, decided = recorded(ckpt) if ckpt else ({}, {})
    if not config:
        return cfg, []
    known = {f.name for f in fields(TrainConfig)}  # checkpoints from before --head_vocab and --beta1/2: their values
    run = {"head_vocab": "full", "beta1": 0.9, "beta2": 0.95, **{k: v for k, v in config.items() if k in known}}
    if isinstance(run.get("shuffle"), bool):  # checkpoints from before --shuffle samples
        run["shuffle"] = str(run["shuffle"]).lower()
    notes = []
    for name in sorted(given - set(THIS_INVOCATION)):
        value, was = getattr(cfg, name), decided.get(name, run.get(name))  # dtype auto: what auto picked
        if value == was:
            continue
        if name in FROZEN:
            raise ConfigError(f"--{name} {value}: {ckpt} was trained with --{name} {was}, which cannot change mid-run; "
                              f"leave the flag out, or start a new run from its weights "
                              f"(--init_from {ckpt} --out_dir NEW)")
        notes.append(f"--{name} {value} overrides the run's {was}")
        run[name] = value
    if run["head_vocab"] not in ("full", "train"):
        raise ConfigError(f"--resume: {ckpt} was trained with --head_vocab {run['head_vocab']}, which this version no "
                          f"longer has (it tied the input rows of ids the run trained on); start a new run from its "
                          f"weights: --init_from {ckpt} --out_dir NEW")
    return TrainConfig(**{**run, **{k: getattr(cfg, k) for k in THIS_INVOCATION}}), notes


def validate(cfg, world_size, given=frozenset()):
    """Raise ConfigError naming the flag for any value that cannot work (given: the names of the flags given)."""
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    device = resolve_device(cfg.device)
    need(cfg.dtype in DTYPES, f"--dtype: expected {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {cfg.dtype!r}")
    if cfg.dtype == "float16":
        check_float16(device)
    need(cfg.loss in ("auto", "fused", "plain"), f"--loss: expected auto, fused or plain, got {cfg.loss!r}")
    need(cfg.parallel in ("ddp", "fsdp"), f"--parallel: expected ddp or fsdp, got {cfg.parallel!r}")
    need(cfg.shuffle in ("false", "true", "samples"),
         f"--shuffle: expected false, true or samples, got {cfg.shuffle!r}")
    need(cfg.deterministic in ("auto", "true", "false"),
         f"--deterministic: expected auto, true or false, got {cfg.deterministic!r}")
    need(cfg.head_vocab in ("full", "train"), f"--head_vocab: expected full or train, got {cfg.head_vocab!r}")
    need(cfg.head_vocab == "full" or cfg.init_from == "scratch", f"--head_vocab {cfg.head_vocab} ties the rows of the "
         f"ids the train shards lack into one, which would erase {cfg.init_from}'s: use it with --init_from scratch, "
         f"or --head_vocab full")
    need(cfg.head_vocab == "full" or cfg.parallel == "ddp", f"--head_vocab {cfg.head_vocab}: works with --parallel ddp "
         f"(FSDP shards the rows it ties), or use --head_vocab full")
    need(cfg.parallel == "ddp" or world_size > 1, f"--parallel fsdp: needs torchrun with 2 or more processes (this "
         f"run has {world_size}): torchrun --standalone --nproc_per_node=N train_gpt2.py ...; one process needs no "
         f"wrapping (--parallel ddp)")
    # GradScaler checks for inf in each rank's own gradients: FSDP's are shards, so the ranks could disagree on
    # skipping a step and fall out of step with each other (DDP's are all-reduced, the same on every rank)
    fp16 = cfg.dtype == "float16" or (cfg.dtype == "auto" and device.startswith("cuda") and
                                      pick_dtype("auto", device)[0] == "float16")
    need(not (fp16 and cfg.parallel == "fsdp" and world_size > 1),
         "--parallel fsdp with float16 (--dtype float16, or auto on a GPU without bf16): the loss scaler's overflow "
         "check is per rank and FSDP's gradients are sharded, so ranks could disagree on skipping a step; use "
         "--parallel ddp, or --dtype float32")
    for name in ("max_steps", "total_batch_size", "batch_size", "seq_len", "eval_interval", "val_steps",
                 "n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        need(getattr(cfg, name) > 0, f"--{name}: must be positive, got {getattr(cfg, name)}")
    for name in ("max_lr", "min_lr", "weight_decay", "beta1", "beta2", "init_std", "grad_clip", "dropout",
                 "time_budget", "spike_z"):
        need(math.isfinite(getattr(cfg, name)), f"--{name}: must be a finite number, got {getattr(cfg, name)}")
    for name in ("max_lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps", "sample_interval", "sample_tokens",
                 "ckpt_interval", "run_steps", "hellaswag_interval", "time_budget", "spike_z"):
        need(getattr(cfg, name) >= 0, f"--{name}: must not be negative, got {getattr(cfg, name)}")
    need(not cfg.sample_interval or cfg.sample_prompt,
         "--sample_prompt: empty (give some text, or --sample_interval 0)")
    check_seed(cfg.seed)
    check_out_dir(cfg.out_dir)
    need(cfg.min_lr <= cfg.max_lr, f"--min_lr {cfg.min_lr} is larger than --max_lr {cfg.max_lr}")
    for name in ("dropout", "beta1", "beta2"):
        need(0 <= getattr(cfg, name) < 1, f"--{name}: must be in [0, 1), got {getattr(cfg, name)}")
    need(cfg.init_std > 0, f"--init_std: must be positive, got {cfg.init_std}")
    need("init_std" not in given or cfg.init_from == "scratch", f"--init_std {cfg.init_std} "
         f"sets the weights of a new model, and --init_from {cfg.init_from} loads them: "
         f"use it with --init_from scratch")
    need(cfg.n_embd % cfg.n_head == 0, f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    need(cfg.seq_len <= cfg.block_size, f"--seq_len {cfg.seq_len} is longer than --block_size {cfg.block_size}")
    per_step = cfg.batch_size * cfg.seq_len * world_size
    sizes = [w for w in range(1, 257) if cfg.total_batch_size % (cfg.batch_size * cfg.seq_len * w) == 0]
    need(cfg.total_batch_size % per_step == 0,
         f"--total_batch_size {cfg.total_batch_size} is not divisible by batch_size*seq_len*world_size = "
         f"{cfg.batch_size}*{cfg.seq_len}*{world_size} = {per_step}" +
         (f" (world sizes that work at this batch size: {', '.join(map(str, sizes[:8]))})" if sizes else ""))
    need(cfg.keep_last >= 2, f"--keep_last: must be at least 2, got {cfg.keep_last}")
    need(cfg.resume in ("", "auto") or os.path.isdir(cfg.resume),
         f"--resume: {cfg.resume!r} is not auto or a directory")
    missing = missing_files(cfg.resume) if cfg.resume not in ("", "auto") else []
    if missing:  # checked now, before anything is written next to it
        newest = list_checkpoints(cfg.resume)  # a run's out_dir given for one of its checkpoints?
        hint = f"; to continue that run: --out_dir {cfg.resume} --resume auto (newest: {newest[-1]})" if newest else ""
        raise ConfigError(f"--resume {cfg.resume}: not a complete checkpoint (missing {', '.join(missing)}){hint}")
    need(cfg.init_from == "scratch" or os.path.isdir(cfg.init_from) or cfg.init_from in GPT2_SHAPES or
         resume_target(cfg.out_dir, cfg.resume),  # a resume takes the weights from its checkpoint
         f"--init_from: {cfg.init_from!r} is not scratch, a GPT-2 name or a directory")


BUDGET_PROBE = 5  # --time_budget: steps 1..5 are timed (step 0 compiles), then max_steps is fixed


def budget_steps(cfg, step, elapsed, step_seconds, eval_batch_seconds):
    """The max_steps that --time_budget allows, fixed once after step BUDGET_PROBE: every machine trains for
    the steps its budget fits, and the cosine reaches min_lr at the last of them. (Before then the warmup's lr
    does not depend on max_steps.)

    elapsed: seconds since the run started, step_seconds: a timed training step, eval_batch_seconds: a timed
    val batch (step 0's eval, after its first batch, which compiles). An eval of val_steps batches comes every
    eval_interval steps and one at the end: it is measured, not derived from the step, because eval scores
    the full head, where --head_vocab train trains on fewer columns. 3% is kept back for sampling, checkpoints
    and the final save. Never above --max_steps."""
    eval_seconds = cfg.val_steps * eval_batch_seconds
    left = 0.97 * cfg.time_budget - elapsed - eval_seconds
    fit = int(left / (step_seconds + eval_seconds / cfg.eval_interval))
    return min(cfg.max_steps, step + 1 + max(0, fit))
