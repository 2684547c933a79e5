"""Checkpoints and resume: bit-exact continuation, pruning, crash safety, torchrun restarts, bad input.

Every run trains a tiny model (2 layers, 32 wide) on small synthetic shards with a 256-token vocab, so
that bfloat16 (emulated, ~200x slower than float32 on CPUs without native bf16) stays cheap. The train
stream (750 tokens in 3 shards) is shorter than 8 steps of 128 tokens, so runs cross shard boundaries
and wrap into a reshuffled epoch; dropout and shuffling are on where exactness is checked, so the RNG
and loader states really have to come back.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import checkpoint
import train_gpt2
from checkpoint import list_checkpoints, load_checkpoint
from cli import ConfigError
from config import parse_args
from conftest import ROOT, communicate, train_here, write_syn_shards
from data import DataError
from data.shards import ShardLoader, shard_paths
from model import GPT
from optim import configure_optimizers
from runtime import Dist

HELPERS = os.path.join(ROOT, "tests", "helpers")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # runs often go two at a time on the 2 cores
SYN = ["--vocab_size", "256", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
       "--seq_len", "32", "--batch_size", "4", "--total_batch_size", "128", "--max_lr", "1e-2", "--min_lr", "1e-3",
       "--warmup_steps", "2", "--val_steps", "2", "--compile", "false", "--device", "cpu", "--sample_interval", "0",
       "--dtype", "float32", "--hellaswag_interval", "0",
       "--loss", "fused"]  # fixed: runs compared here would each measure (auto) for themselves
EXACT = ["--dropout", "0.1", "--shuffle", "true"]  # exercise the RNG restore and the shuffled loader
TIMEOUT = 240


def flags(*extra, **overrides):
    """SYN with `--name value` pairs overridden (e.g. dtype="bfloat16"), then `extra` appended."""
    args = list(SYN)
    for name, value in overrides.items():
        args[args.index(f"--{name}") + 1] = str(value)
    return args + [str(a) for a in extra]


def start(args, script="train_gpt2.py", torchrun=0, max_restarts=0, env=None):
    """Launch the trainer (or a helper) in the background; torchrun=N runs it on N gloo ranks."""
    args = [str(a) for a in args]
    cmd = [sys.executable, script, *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               f"--max-restarts={max_restarts}", script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(*procs):
    """Wait for background runs; return their CompletedProcess objects (a run past TIMEOUT is killed)."""
    done = []
    for p in procs:
        out, err = communicate(p, TIMEOUT)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def run(args, **kw):
    return finish(start(args, **kw))[0]


def ok(r):
    assert r.returncode == 0, f"{r.args}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def events(out_dir, key):
    """Every logged (step, value) for `key`, in file order (a resumed run appends)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(e["step"], e[key]) for e in map(json.loads, f) if key in e]


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def last(out_dir, key):
    """{step: value} where a step logged twice (re-run after a resume) counts with its later entry."""
    return dict(events(out_dir, key))


def ckpt_dirs(out_dir):
    return sorted(n for n in os.listdir(out_dir) if "ckpt_" in n)


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    """Random ids < 256: 3 train shards of 300 + 200 + 250 tokens, one val shard of 1000."""
    return write_syn_shards(tmp_path_factory.mktemp("syn"), (300, 200, 250), 1000)


@pytest.fixture
def global_rngs():
    """load_checkpoint in this process sets python's, numpy's and torch's RNGs: put them back."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(pt)


def build(cfg):
    """Model, optimizer and train loader as train_gpt2.train builds them (one process, CPU)."""
    model = train_gpt2.build_model(cfg)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.max_lr)
    loader = ShardLoader(shard_paths(cfg.data_dir, "train"), cfg.batch_size, cfg.seq_len,
                         shuffle=cfg.shuffle, seed=cfg.seed)
    return model, optimizer, loader


# ----- 1. resume is bit-exact -----

@pytest.mark.parametrize("dtype, head", [("float32", "full"), ("bfloat16", "full"), ("float32", "train")])
def test_resume_is_bit_exact(tmp_path, syn_dir, dtype, head, capsys):
    common = flags(*EXACT, "--data_dir", syn_dir, "--max_steps", 8, "--eval_interval", 2, "--ckpt_interval", 4,
                   "--head_vocab", head, dtype=dtype)  # train: the tied rows are restored too
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    chunk = common + ["--out_dir", b, "--run_steps", 4, "--resume", "auto"]  # the same command each time
    ok(train_here(common + ["--out_dir", a], capsys))
    rb1 = ok(train_here(chunk, capsys))
    assert "resumed from" not in rb1.stdout  # nothing to resume yet: a fresh start
    assert ckpt_dirs(b) == ["ckpt_000004"]
    assert not os.path.exists(os.path.join(b, "model.safetensors"))  # the final model only at max_steps
    assert [s for s, _ in events(b, "train_loss")] == [0, 1, 2, 3]

    rb2 = ok(train_here(chunk, capsys))
    assert f"resumed from {b}/ckpt_000004 at step 4" in rb2.stdout
    assert os.path.exists(os.path.join(b, "model.safetensors"))
    assert ckpt_dirs(a) == ckpt_dirs(b) == ["ckpt_000004", "ckpt_000008"]

    # no step is logged twice, and every loss matches the uninterrupted run exactly
    assert [s for s, _ in events(b, "train_loss")] == [s for s, _ in events(a, "train_loss")] == list(range(8))
    assert [s for s, _ in events(b, "val_loss")] == [s for s, _ in events(a, "val_loss")] == [0, 2, 4, 6, 7]
    assert events(b, "train_loss") == events(a, "train_loss")
    assert events(b, "val_loss") == events(a, "val_loss")
    assert [lr for _, lr in events(b, "lr")] == [lr for _, lr in events(a, "lr")]

    # and so are the final weights and the trainer state of the last checkpoint
    from safetensors.torch import load_file
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = (read_json(d, "ckpt_000008", "trainer.json") for d in (a, b))
    assert ta["loader"] == tb["loader"] and ta["loader"]["epoch"] == 1  # the stream wrapped into epoch 1
    assert ta["step"] == tb["step"] == 8
    # every RNG is seeded from --seed and restored on resume, so all of them match: torch's (dropout),
    # python's and numpy's (tests/test_train.py checks that load_checkpoint restores the last two)
    pa, pb = (torch.load(os.path.join(d, "ckpt_000008", "trainer.pt"), weights_only=True) for d in (a, b))
    assert torch.equal(pa["rng_torch"][0]["torch"], pb["rng_torch"][0]["torch"])
    assert ta["rng"] == tb["rng"]


def test_resume_keeps_the_head_vocab_and_refuses_to_change_it(tmp_path, syn_dir, capsys):
    """A resume keeps the checkpoint's --head_vocab when the flag is left out; another value is refused in one
    line (the rows it tied were trained as one), before any step runs."""
    from data.shards import token_counts
    out = str(tmp_path / "r")
    common = flags("--data_dir", syn_dir, "--max_steps", 6, "--ckpt_interval", 3, "--eval_interval", 100,
                   "--out_dir", out)
    ids = token_counts(shard_paths(syn_dir, "train"), 256).nonzero()[0]
    assert 200 < len(ids) < 255  # a few of the 256 ids never occur in the 750 train tokens
    first = ok(train_here(common + ["--head_vocab", "train", "--run_steps", 3], capsys))
    assert f"head vocab: the {len(ids)} ids" in first.stdout
    bad = train_here(common + ["--head_vocab", "full", "--resume", "auto"], capsys)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --head_vocab full: {out}/ckpt_000003 was trained with --head_vocab train, which cannot change "
        f"mid-run; leave the flag out, or start a new run from its weights "
        f"(--init_from {out}/ckpt_000003 --out_dir NEW)"]
    assert ckpt_dirs(out) == ["ckpt_000003"] and not os.path.exists(os.path.join(out, "model.safetensors"))
    r = ok(train_here(common + ["--resume", "auto"], capsys))  # the flag left out: the run's train, not full
    assert f"resumed from {out}/ckpt_000003 at step 3" in r.stdout and f"head vocab: the {len(ids)} ids" in r.stdout
    from safetensors.torch import load_file
    w = load_file(os.path.join(out, "model.safetensors"))["transformer.wte.weight"]  # (256, C)
    assert len(torch.unique(w, dim=0)) == len(ids) + 1  # rows of their own, one shared by the ids never seen


# ----- 2. keep_last, the final model, and checkpoints as Hugging Face models -----

def test_keep_last_and_checkpoints_load_as_models(tmp_path, syn_dir, capsys):
    out = str(tmp_path / "out")
    common = flags("--data_dir", syn_dir, "--out_dir", out, "--max_steps", 5, "--eval_interval", 5,
                   "--ckpt_interval", 1, "--keep_last", 2)
    ok(train_here(common, capsys))
    assert ckpt_dirs(out) == ["ckpt_000004", "ckpt_000005"]  # no .tmp_ckpt_* left either
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["ckpt_000004", "ckpt_000005"]
    for name in ("ckpt_000004", "ckpt_000005"):
        assert sorted(os.listdir(os.path.join(out, name))) == sorted(checkpoint.CKPT_FILES)

    from transformers import GPT2LMHeadModel
    final = GPT.from_pretrained(out).eval()
    ckpt = GPT.from_pretrained(os.path.join(out, "ckpt_000005")).eval()
    hf = GPT2LMHeadModel.from_pretrained(os.path.join(out, "ckpt_000005")).eval()
    assert final.config.vocab_size == hf.config.vocab_size == 256
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(final(idx)[0], ckpt(idx)[0], rtol=0, atol=0)  # the last ckpt is the final model
        torch.testing.assert_close(ckpt(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)

    # resuming from the older one would mix two lines: refused, unless the later one is dropped (--overwrite), and
    # then the step is run again as it was; metrics.jsonl holds the resumed line, each step once
    first = last(out, "train_loss")
    bad = train_here(common + ["--resume", os.path.join(out, "ckpt_000004")], capsys)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --resume {out}/ckpt_000004: {out} holds later checkpoints of this run (ckpt_000005); to branch from "
        "it, give --out_dir NEW, or drop the later ones with --overwrite true"]
    r = ok(train_here(common + ["--resume", os.path.join(out, "ckpt_000004"), "--overwrite", "true"], capsys))
    assert (f"--overwrite: deleting {out}/ckpt_000005" in r.stdout
            and f"resumed from {out}/ckpt_000004 at step 4" in r.stdout)
    assert ckpt_dirs(out) == ["ckpt_000004", "ckpt_000005"]
    assert [s for s, _ in events(out, "train_loss")] == [0, 1, 2, 3, 4]
    assert last(out, "train_loss") == first


# ----- 3. a save killed half-way leaves the previous checkpoint usable -----

def test_killed_mid_save_keeps_the_previous_checkpoint(tmp_path, syn_dir, global_rngs):
    out = str(tmp_path / "out")
    common = flags(*EXACT, "--data_dir", syn_dir, "--out_dir", out, "--max_steps", 4, "--eval_interval", 2,
                   "--ckpt_interval", 1)
    ok(run(common + ["--run_steps", 1]))
    assert ckpt_dirs(out) == ["ckpt_000001"]

    child = start(common, script=os.path.join(HELPERS, "hang_in_save.py"))
    watchdog = threading.Timer(TIMEOUT, child.kill)
    watchdog.start()
    try:
        marker = next((line for line in child.stdout if line.startswith("HALF-WRITTEN")), None)
        if marker is None:
            child.wait()
            pytest.fail(f"the helper never reached torch.save:\n{child.stderr.read()[-3000:]}")
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        watchdog.cancel()
        child.stdout.close(), child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    tmp = os.path.join(out, ".tmp_ckpt_000002")
    assert marker.split()[1] == os.path.join(tmp, "trainer.pt")
    assert ckpt_dirs(out) == [".tmp_ckpt_000002", "ckpt_000001"]
    assert {"config.json", "model.safetensors", "trainer.pt"} <= set(os.listdir(tmp))  # half-written

    assert list_checkpoints(out) == [os.path.join(out, "ckpt_000001")]
    cfg, _ = parse_args(common)
    model, optimizer, loader = build(cfg)
    assert load_checkpoint(list_checkpoints(out)[-1], model, optimizer, loader, Dist()) == 1
    assert loader.state_dict()["position"] == 128 and len(optimizer.state) > 0

    r = ok(run(common + ["--resume", "auto"]))
    assert f"resumed from {out}/ckpt_000001 at step 1" in r.stdout
    assert ckpt_dirs(out) == ["ckpt_000003", "ckpt_000004"]  # the stale .tmp_ckpt_000002 was replaced
    assert [s for s, _ in events(out, "train_loss")] == [0, 1, 2, 3]
    assert os.path.exists(os.path.join(out, "model.safetensors"))


# ----- 4. torchrun restarts a failed rank and the run resumes from its last checkpoint -----

def test_torchrun_restart_resumes_exactly(tmp_path, syn_dir):
    common = flags(*EXACT, "--data_dir", syn_dir, "--max_steps", 8, "--eval_interval", 4, "--ckpt_interval", 2,
                   "--resume", "auto", batch_size=2)
    ref, flaky = str(tmp_path / "ref"), str(tmp_path / "flaky")
    marker = str(tmp_path / "crashed")
    r_ref, r_flaky = finish(
        start(common + ["--out_dir", ref], script=os.path.join(HELPERS, "flaky_train.py"), torchrun=2),  # no crash
        start(common + ["--out_dir", flaky], script=os.path.join(HELPERS, "flaky_train.py"), torchrun=2, max_restarts=1,
              # torchrun shares its rendezvous TCPStore with the workers by default, and on a restart
              # gloo's init then reads the previous attempt's addresses and fails or hangs (pytorch#135712)
              env={"FLAKY_MARKER": marker, "FLAKY_STEP": "5", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}))
    # every rank of the last attempt ends with gloo's threads stopped: one still running at interpreter exit
    # can abort the rank with SIGABRT ("terminate called without an active exception"), failing the run
    if os.path.isdir("/proc/self/task"):
        for r in (r_ref, r_flaky):
            report = sorted(re.findall(r"rank (\d): (\d+) gloo threads while training, (\d+) after main", r.stdout))
            assert [rank for rank, _, _ in report] == ["0", "1"], r.stdout[-3000:]
            assert all(int(during) > 0 and after == "0" for _, during, after in report), report
    ok(r_ref), ok(r_flaky)
    assert os.path.exists(marker), "rank 1 never crashed"
    assert "resumed from" not in r_ref.stdout
    assert f"resumed from {flaky}/ckpt_000004 at step 4" in r_flaky.stdout, r_flaky.stdout[-3000:]
    steps = [s for s, _ in events(flaky, "train_loss")]
    assert steps == list(range(8)), steps  # step 4 ran before the crash and again: the resumed line replaced it

    a, b = last(ref, "train_loss"), last(flaky, "train_loss")
    assert sorted(a) == sorted(b) == list(range(8))
    assert a == b, (a, b)  # gloo's 2-rank sum and the restored state make this exact
    assert last(ref, "val_loss") == last(flaky, "val_loss")
    assert ckpt_dirs(ref) == ckpt_dirs(flaky) == ["ckpt_000006", "ckpt_000008"]


# ----- 5. bad checkpoints: one clear line, exit code 2 -----

class NotATensor:
    pass


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, syn_dir):
    """A complete checkpoint (step 2 of 4, one process) and the flags that wrote it."""
    out = str(tmp_path_factory.mktemp("good") / "out")
    common = flags("--data_dir", syn_dir, "--max_steps", 4, "--eval_interval", 4, "--ckpt_interval", 2)
    ok(run(common + ["--out_dir", out, "--run_steps", 2]))
    return os.path.join(out, "ckpt_000002"), common


def corrupt(kind, path):
    if kind == "missing":
        os.remove(os.path.join(path, "trainer.pt"))
    elif kind == "json":
        with open(os.path.join(path, "trainer.json"), "w") as f:
            f.write("{not json at all")
    elif kind == "safetensors":
        with open(os.path.join(path, "model.safetensors"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
    elif kind == "pickle":
        torch.save({"optimizer": NotATensor(), "x": object()}, os.path.join(path, "trainer.pt"))
    elif kind == "moments":  # optimizer moments of another shape than their weight (a hand-edited trainer.pt)
        state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
        state["optimizer"]["state"]["transformer.wpe.weight"]["exp_avg"] = torch.zeros(3, 3)
        torch.save(state, os.path.join(path, "trainer.pt"))
    elif kind == "shape":  # weights that do not match their trainer.json (64 wide where the run is 32)
        from model import GPTConfig
        GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=64)).save_pretrained(path)


@pytest.mark.parametrize("kind, extra, message", [
    ("missing", [], "not a complete checkpoint (missing trainer.pt)"),
    ("json", [], "trainer.json: not a trainer state"),
    ("safetensors", [], "model.safetensors: cannot read weights"),
    ("pickle", [], "trainer.pt: cannot read"),
    (None, ["--batch_size", "3"], "--total_batch_size 128 is not divisible by batch_size*seq_len*world_size"),
    (None, ["--n_layer", "3"], "--n_layer 3: "),  # the shape cannot change mid-run
    ("shape", [], "weights do not fit the model: shapes (file vs model): "
                  "transformer.wte.weight (256, 64) vs (256, 32)"),
    ("moments", [], "trainer.pt: optimizer state does not fit the weights: transformer.wpe.weight exp_avg (3, 3) "
                    "vs (32, 32)"),
])
def test_bad_checkpoint_exits_2_with_one_line(tmp_path, good_ckpt, kind, extra, message, capsys):
    import train_gpt2
    src, common = good_ckpt
    path = str(tmp_path / "ckpt")
    shutil.copytree(src, path)
    corrupt(kind, path)
    with pytest.raises(SystemExit) as e:  # in this process: the refusal comes before any training
        train_gpt2.main([str(a) for a in common + ["--out_dir", str(tmp_path / "out"), "--resume", path] + extra])
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err[-3000:]
    if kind:
        assert path in lines[0]  # names the checkpoint


# ----- regressions: ordering past a million steps, incomplete trainer state, stale swap dirs -----

def fake_checkpoint(out_dir, step):
    path = os.path.join(out_dir, f"ckpt_{step:06d}")
    os.makedirs(path)
    for name in checkpoint.CKPT_FILES:
        open(os.path.join(path, name), "w").close()
    return path


def test_checkpoints_are_ordered_by_step_past_a_million(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        fake_checkpoint(str(tmp_path), step)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == \
        ["ckpt_999998", "ckpt_999999", "ckpt_1000000"]


@pytest.fixture
def small_ckpt(tmp_path, syn_dir, global_rngs):
    """A checkpoint saved in this process (no subprocess), and the model, optimizer and loader to load it."""
    cfg, _ = parse_args(flags("--data_dir", syn_dir, "--out_dir", str(tmp_path / "out")))
    model, optimizer, loader = build(cfg)
    checkpoint.save_checkpoint(cfg.out_dir, cfg.keep_last, 1, model, optimizer, loader, Dist())
    return cfg, os.path.join(cfg.out_dir, "ckpt_000001"), (model, optimizer, loader, Dist())


@pytest.mark.parametrize("key", ["loader", "rng"])
def test_trainer_json_without_loader_or_rng_is_a_clear_error(small_ckpt, key):
    _, path, objs = small_ckpt
    meta = read_json(path, "trainer.json")
    del meta[key]
    with open(os.path.join(path, "trainer.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises((ConfigError, DataError), match="trainer.json"):
        load_checkpoint(path, *objs)


def test_resaving_a_step_survives_a_stale_old_dir(small_ckpt):
    cfg, path, (model, optimizer, loader, d) = small_ckpt
    stale = os.path.join(cfg.out_dir, ".tmp_ckpt_000001.old")
    os.makedirs(stale)
    open(os.path.join(stale, "trainer.pt"), "w").close()
    checkpoint.save_checkpoint(cfg.out_dir, cfg.keep_last, 1, model, optimizer, loader, d)
    assert list_checkpoints(cfg.out_dir) == [path] and not os.path.exists(stale)


def test_interrupted_line_before_and_after_the_first_checkpoint(tmp_path):
    """What a second Ctrl-C prints: with a checkpoint, it and the command that continues; before the first one,
    the command that starts over; before the flags were even parsed, just 'interrupted'."""
    from checkpoint import interrupted_line
    out = tmp_path / "run"
    out.mkdir()
    cfg, _ = parse_args(["--out_dir", str(out), "--ckpt_interval", "50"])
    argv = ["--ckpt_interval", "50", "--overwrite", "true", "--out_dir", str(out)]
    assert interrupted_line(argv, cfg) == ("interrupted before the first checkpoint; start over with: python "
                                           f"train_gpt2.py --ckpt_interval 50 --out_dir {out} --overwrite true")
    for name in ("config.json", "model.safetensors", "trainer.pt", "trainer.json"):
        (out / "ckpt_000050").mkdir(exist_ok=True)
        (out / "ckpt_000050" / name).write_text("x")
    assert interrupted_line(argv, cfg) == (f"interrupted; newest checkpoint {out}/ckpt_000050; continue with: "
                                           f"python train_gpt2.py --resume {out}/ckpt_000050")
    assert interrupted_line(argv, None) == "interrupted"
    (out / "ckpt_000050" / "trainer.pt").unlink()  # no complete checkpoint again; a prompt keeps its two spaces
    assert interrupted_line([], cfg).endswith("start over with: python train_gpt2.py --overwrite true")
    assert interrupted_line(["--sample_prompt", "a  b"], cfg).endswith("train_gpt2.py --sample_prompt 'a  b' "
                                                                      "--overwrite true")
