"""A training run on disk: checkpoints, the metrics log, and loading a model from any of our directories.

    out_dir/
      metrics.jsonl          one JSON object per event (train step, val loss, HellaSwag)
      train_config.json      the TrainConfig of the run
      config.json, model.safetensors     the final model (Hugging Face GPT-2 format)
      ckpt_000250/           config.json + model.safetensors (HF format), trainer.pt (optimizer, padded
                             vocab rows, torch RNGs, float16's loss scaler), trainer.json (step, loader position,
                             python/numpy RNGs, TrainConfig); written as .tmp_ckpt_000250/ and renamed into place
                             when complete

load_model(init_from) takes a GPT-2 name, an HF dir, a ckpt_* dir or an out_dir (its final model, else its
newest complete checkpoint): the one place any script turns --init_from into a model.
"""
import errno
import json
import os
import random
import re
import shlex
import shutil
import socket

import numpy as np
import torch
import torch.distributed as dist

import hf
from cli import ConfigError
from model import GPT

CKPT_FILES = ("config.json", "model.safetensors", "trainer.json", "trainer.pt")
REAL_VOCAB = 50257  # GPT-2's tokens; rows past it are padding for speed


def rng_state():
    """This process's RNG states: python and numpy as JSON-able lists, torch's as tensors."""
    py, npy = random.getstate(), np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [npy[0], npy[1].tolist(), *npy[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def missing_files(path):
    """The checkpoint files path lacks: none for a complete checkpoint."""
    return [f for f in CKPT_FILES if not os.path.isfile(os.path.join(path, f))]


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first. Half-written ones live under a temporary name."""
    if not os.path.isdir(out_dir):
        return []
    names = sorted((n for n in os.listdir(out_dir) if n.startswith("ckpt_") and n[5:].isdigit()), key=step_of)
    return [os.path.join(out_dir, n) for n in names if not missing_files(os.path.join(out_dir, n))]


def full_state(model, optimizer=None):
    """(model state dict, optimizer state dict or None), whole and on the CPU, on rank 0; empty on the others.

    One format whatever the parallelism: under FSDP every tensor is all-gathered from its shards (so every
    rank must call this), a plain or DDP model's are copied. The optimizer's state is keyed by parameter
    name ('transformer.h.0.attn.c_attn.weight'), not by position.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None)


def set_full_state(model, optimizer, model_sd, optimizer_sd):
    """Load full_state's dicts into model and optimizer; under FSDP each rank keeps its shard of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_sd, options=options)


def save_checkpoint(out_dir, keep_last, step, model, optimizer, loader, d, scaler=None, record=None, guard=None):
    """Write out_dir/ckpt_<step>/ atomically: HF-format weights plus the trainer state (with float16's loss
    scaler: its scale and growth tracker, so a resumed run scales, and skips, as the uninterrupted one would),
    and `record`: the run's TrainConfig and the decisions made at its start ({"config": ..., "run": ...}); guard:
    optim.SpikeGuard, whose window of recent losses and norms decides the next skips.

    Every rank calls this (the weights of a sharded model and the RNG states of all ranks are gathered);
    rank 0 writes into a temporary directory, renames it into place when complete, then prunes to the
    newest keep_last.
    """
    weights, optimizer_sd = full_state(model, optimizer)
    rngs = [rng_state()]
    if d.world_size > 1:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state())
    if not d.master:
        return
    final = os.path.join(out_dir, f"ckpt_{step:06d}")
    tmp = os.path.join(out_dir, f".tmp_ckpt_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(tmp + ".old", ignore_errors=True)  # left by a kill between the two renames below
    vocab = min(model.config.vocab_size, REAL_VOCAB)
    try:
        model.save_pretrained(tmp, vocab_size=vocab, state_dict=weights)
        torch.save({"optimizer": optimizer_sd, "vocab_pad": weights["lm_head.weight"][vocab:].clone(),
                    "rng_torch": [{k: r[k] for k in ("torch", "cuda")} for r in rngs],
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "guard": guard.state_dict() if guard is not None else {}}, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump({"step": step, "world_size": d.world_size, "loader": loader.state_dict(), **(record or {}),
                       "rng": [{k: r[k] for k in ("python", "numpy")} for r in rngs]}, f)
    except Exception as e:  # a full disk surfaces as OSError, safetensors' SafetensorError or torch's RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial directory filling the disk
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e)
                or "os error 28" in str(e))
        raise OSError(errno.ENOSPC if full else errno.EIO, f"checkpoint not written ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); the previous checkpoints are kept", tmp) from e
    if os.path.isdir(final):  # the same step again (a re-run): swap, never leaving no checkpoint
        os.rename(final, tmp + ".old")
    os.rename(tmp, final)
    shutil.rmtree(tmp + ".old", ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old)


def optimizer_problem(optimizer_sd, weights):
    """'' if every moment in the optimizer state has its weight's shape, else the first that does not (a fused
    AdamW step on mismatched moments corrupts memory instead of raising)."""
    for name, moments in optimizer_sd.get("state", {}).items():
        for key, t in moments.items():
            if torch.is_tensor(t) and t.dim() and (name not in weights or t.shape != weights[name].shape):
                want = tuple(weights[name].shape) if name in weights else "no such weight"
                return f"{name} {key} {tuple(t.shape)} vs {want}"
    return ""


def load_checkpoint(path, model, optimizer, loader, d, scaler=None, guard=None):
    """Restore weights, optimizer, loader position, this rank's RNGs, the loss scaler's state (where both the
    checkpoint and this run have one: float16) and the spike guard's window; return the step to start at."""
    missing = missing_files(path)
    if missing:
        raise ConfigError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            meta = json.load(f)
        step, loader_state = int(meta["step"]), meta["loader"]
        rng = meta["rng"][d.rank % len(meta["rng"])]  # on more ranks than wrote it, the ranks' states repeat
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}/trainer.json: not a trainer state ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or pickled objects that weights_only refuses
        raise ConfigError(f"{path}/trainer.pt: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not {"optimizer", "vocab_pad", "rng_torch"} <= state.keys():
        raise ConfigError(f"{path}/trainer.pt: not a trainer state (needs optimizer, vocab_pad, rng_torch)")
    if any(isinstance(k, int) for k in state["optimizer"].get("state", {})):  # optimizer.state_dict()'s numbering
        raise ConfigError(f"{path}/trainer.pt: optimizer state by position, from before checkpoints named it by "
                          f"parameter; it cannot be resumed, but its weights can be trained on: --init_from {path}")
    try:
        sd = hf.hf_to_ours(hf.read_dir(path)[1])
        wte, pad = sd["transformer.wte.weight"], state["vocab_pad"]
        if wte.size(-1) == pad.size(-1):  # the padded rows back (else the line below names the shapes)
            sd["lm_head.weight"] = sd["transformer.wte.weight"] = torch.cat([wte, pad])
        if problem := hf.fit_problem(model.state_dict(), sd):
            raise ValueError(f"{path}: weights do not fit the model: {problem}")
        if problem := optimizer_problem(state["optimizer"], sd):
            raise ValueError(f"{path}/trainer.pt: optimizer state does not fit the weights: {problem}")
        set_full_state(model, optimizer, sd, state["optimizer"])
        if scaler is not None and state.get("scaler"):  # {}: written by a bfloat16/float32 run or before float16
            scaler.load_state_dict(state["scaler"])
        if guard is not None and state.get("guard"):  # {}: written before the guard
            guard.load_state_dict(state["guard"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    loader.load_state_dict(loader_state)
    try:
        set_rng_state({**rng, **state["rng_torch"][d.rank % len(state["rng_torch"])]})
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: bad RNG state in trainer.json/trainer.pt ({type(e).__name__}: {e})") from None
    return step


def recorded(path):
    """(TrainConfig as a dict, the run's decisions: dtype, loss, max_steps) a checkpoint was written with; ({}, {})
    if unreadable (load_checkpoint says why). Checkpoints from before "run" kept the decisions in the config."""
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            meta = json.load(f)
        config = meta.get("config")
        config = config if isinstance(config, dict) else {}
        run = meta.get("run") if isinstance(meta.get("run"), dict) else {k: config[k] for k in
                                                                        ("dtype", "loss", "max_steps") if k in config}
        return config, run
    except (OSError, ValueError, AttributeError):
        return {}, {}


# ----- out_dir: one run per directory -----

RUN_FILES = ("metrics.jsonl", "train_config.json", "config.json", "model.safetensors")


def run_contents(out_dir):
    """The names in out_dir that belong to a training run: its files and its checkpoints, complete or not."""
    if not os.path.isdir(out_dir):
        return []
    ours = re.compile(r"(\.tmp_)?ckpt_\d+(\.old)?")  # ckpt_000250, .tmp_ckpt_000250(.old): not a user's ckpt_best
    return sorted(n for n in os.listdir(out_dir) if n in RUN_FILES or ours.fullmatch(n))


def clear_run(out_dir):
    """--overwrite: delete the previous run's files and checkpoints; nothing else in out_dir is touched."""
    names = run_contents(out_dir)
    if names:
        print(f"--overwrite: deleting the previous run in {out_dir}: {', '.join(names)}", flush=True)
    for name in names:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def lock_run(out_dir):
    """Hold out_dir/.lock while this process lives; ConfigError naming the holder if another process has it.

    flock is released by the OS when its process exits or dies, so a crash or kill never leaves a stale
    lock. (Where fcntl does not exist, on Windows, there is no lock.)"""
    try:
        import fcntl
    except ImportError:
        return None
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"--out_dir {out_dir} is in use by {holder} (lock {f.name}); wait for it, or pick another "
                          f"--out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def step_of(path):
    """The step of a ckpt_<step> directory."""
    return int(os.path.basename(os.path.normpath(path))[5:])


def resume_target(out_dir, resume):
    """The checkpoint --resume names, read-only: PATH if complete, the newest complete one in out_dir for auto,
    else None (find_resume adds the rules a start enforces)."""
    if resume == "auto":
        return (list_checkpoints(out_dir) or [None])[-1]
    return resume if resume and os.path.isdir(resume) and not missing_files(resume) else None


def find_resume(out_dir, resume, overwrite):
    """The checkpoint a run starts from (None: a fresh start), refusing to mix two runs, or two lines of one run,
    in one out_dir.

    resume "": a fresh run, which needs an out_dir without another run's files (or overwrite: they are deleted
    first). resume "auto": the newest complete checkpoint; none, while out_dir holds a run, is refused rather than
    silently starting over. resume PATH: that checkpoint. In its own out_dir it must be the newest: an older one
    would start a second line among the first one's checkpoints (overwrite drops the later ones; --out_dir NEW
    starts the branch in a folder of its own, as any resume into another out_dir does).
    """
    ours, complete, target = run_contents(out_dir), list_checkpoints(out_dir), resume_target(out_dir, resume)
    if resume == "auto" and target:
        return target
    if target and resume != "auto" and os.path.normpath(os.path.dirname(os.path.normpath(resume))) == \
            os.path.normpath(out_dir):
        later = [c for c in complete if step_of(c) > step_of(resume)]
        if later and not overwrite:
            names = ", ".join(os.path.basename(c) for c in later)
            raise ConfigError(f"--resume {resume}: {out_dir} holds later checkpoints of this run ({names}); to branch "
                              f"from it, give --out_dir NEW, or drop the later ones with --overwrite true")
        for c in later:
            print(f"--overwrite: deleting {c}, later than {resume}", flush=True)
            shutil.rmtree(c)
        return target
    if ours and not overwrite:
        what = ", ".join(ours[:4]) + (", ..." if len(ours) > 4 else "")
        if resume == "auto":
            raise ConfigError(f"--resume auto: {out_dir} holds no complete checkpoint, only {what}; start the run "
                              f"over with --overwrite true, or pick a new --out_dir")
        if not complete:
            raise ConfigError(f"--out_dir {out_dir} holds a run that wrote no complete checkpoint ({what}); start it "
                              f"over with --overwrite true, or pick a new --out_dir")
        raise ConfigError(f"--out_dir {out_dir} already holds a run ({what}); continue it with --resume auto, pick a "
                          f"new --out_dir, or replace it with --overwrite true")
    clear_run(out_dir)
    return target


def model_dir(init_from):
    """A directory holding a model, or a GPT-2 name, for from_pretrained: a training out_dir without a final
    model resolves to its newest complete checkpoint."""
    if os.path.isdir(init_from) and not os.path.isfile(os.path.join(init_from, "config.json")):
        ckpts = list_checkpoints(init_from)
        if not ckpts:
            raise ValueError(f"{init_from} holds no model (config.json) and no complete checkpoint")
        return ckpts[-1]
    return init_from


def load_model(init_from, load=GPT.from_pretrained, flag="--init_from", **kwargs):
    """load(model_dir(init_from), **kwargs); any problem (a bad directory, a GPT-2 name with the hub
    unreachable and nothing cached) becomes a one-line ConfigError naming the flag."""
    try:
        return load(model_dir(init_from), **kwargs)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{flag}: {str(e).splitlines()[0]}") from None


class MetricsLog:
    """Appends one JSON object per event to out_dir/metrics.jsonl (rank 0 only), and hands the same event to
    the optional trackers (loggers.py: TensorBoard, wandb), so every view shows the numbers of the file."""

    def __init__(self, path, enabled, loggers=()):
        self.path, self.enabled, self.loggers = path, enabled, list(loggers)

    def _append(self, event):
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def write(self, **event):
        """Numbers at a step: write(step=10, val_loss=3.2)."""
        if self.enabled:
            self._append(event)
            for logger in self.loggers:
                logger.scalars(event["step"], {k: v for k, v in event.items() if k != "step"})

    def text(self, step, name, texts):
        """A list of strings at a step (the periodic samples): {"step": 30, "samples": [...]} in the file,
        text in the trackers. Readers of numbers (plot.py) skip it."""
        if self.enabled:
            self._append({"step": step, name: list(texts)})
            for logger in self.loggers:
                logger.text(step, name, list(texts))

    def truncate(self, step):
        """Drop the events from `step` on: a resumed run logs those steps again, as the line it continues."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = [line for line in lines if json.loads(line).get("step", 0) < step]
        if len(keep) < len(lines):
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)

    def close(self):
        for logger in self.loggers:
            logger.close()


def start_run(cfg, d):
    """Claim out_dir (a lock) and decide where the run starts: (lock, checkpoint path or None, the checkpoint's
    recorded decisions: dtype, loss, max_steps; {} for a fresh run)."""
    lock, ckpt, problem = None, None, None
    if d.master:
        try:
            lock = lock_run(cfg.out_dir)
            ckpt = find_resume(cfg.out_dir, cfg.resume, cfg.overwrite)
        except ConfigError as e:
            problem = str(e)
    problem, ckpt = d.agree((problem, ckpt))
    if problem:
        raise ConfigError(problem)
    return lock, ckpt, recorded(ckpt)[1] if ckpt else {}


def resume_command(ckpt, world_size=1, local_world_size=None):
    """The command that continues a run from checkpoint ckpt: the checkpoint holds the run's settings. On several
    nodes, the job's own launch line (torchrun's flags are not ours to know)."""
    local = local_world_size or world_size
    launch = ("python" if world_size == 1 else f"torchrun --standalone --nproc_per_node={world_size}"
              if local == world_size else "torchrun <your launch flags>")
    return f"{launch} train_gpt2.py --resume {shlex.quote(ckpt)}"


def interrupted_line(argv, cfg, world_size=1):
    """What a second Ctrl-C prints: the newest checkpoint and the command that continues from it, or, before the
    first one, the command that starts over. `cfg` is None when the flags were not parsed yet."""
    newest = list_checkpoints(cfg.out_dir)[-1:] if cfg else []
    if newest:
        return f"interrupted; newest checkpoint {newest[0]}; continue with: {resume_command(newest[0], world_size)}"
    if cfg is None:
        return "interrupted"
    keep = [a for i, a in enumerate(argv)
            if a.split("=")[0] != "--overwrite" and (i == 0 or argv[i - 1] != "--overwrite")]
    again = " ".join(["python", "train_gpt2.py", *map(shlex.quote, keep), "--overwrite", "true"])
    return f"interrupted before the first checkpoint; start over with: {again}"
