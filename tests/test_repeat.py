"""Runs you can repeat and resume: the same command gives the same bits (compiled too, beside a busy core);
--resume PATH alone continues bit for bit; Ctrl-C and SIGTERM stop after a step with a checkpoint; a branch never
mixes with its run; a run moves between 1 process and 2 gloo ranks (DDP and FSDP).

A tiny model on synthetic shards of ids < 256, 1,024 tokens a step (many repeated ids: the embedding's backward
sums their rows, which inductor does with atomic adds across threads unless deterministic algorithms are on).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, communicate, train_here, write_syn_shards

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SYN = ["--vocab_size", "256", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64",
       "--seq_len", "64", "--batch_size", "8", "--total_batch_size", "1024", "--max_lr", "1e-2", "--min_lr", "1e-3",
       "--warmup_steps", "2", "--val_steps", "4", "--eval_interval", "3", "--device", "cpu", "--dtype", "float32",
       "--hellaswag_interval", "0", "--sample_interval", "0"]


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    return write_syn_shards(tmp_path_factory.mktemp("syn"), (6000, 5000), 3000)


def run(args, env=ENV, timeout=300):
    r = subprocess.run([sys.executable, "train_gpt2.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=timeout)
    return r


def ok(r):
    assert r.returncode == 0, f"{r.args}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def torchrun(args, nproc=2, timeout=300):
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                          "train_gpt2.py", *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = communicate(p, timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def events(out_dir):
    """The numbers of metrics.jsonl, without the timing fields (dt_ms, tokens_per_sec), in file order."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in e.items() if k not in ("dt_ms", "tokens_per_sec")} for e in map(json.loads, f)]


def busy_core():
    """Another process spinning on a core, as a second job on the machine would."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


@pytest.mark.parametrize("compile", ["true", "false"])
def test_the_same_command_twice_gives_the_same_bits(tmp_path, syn_dir, compile):
    """No --dtype, --loss or --deterministic: the rules pick them (the start line says which and why), and the
    second run, beside a busy core, logs exactly the first one's numbers and samples the same text. Compiled, the
    evals and sampling run under compile too (HellaSwag under compile: test_compile_ddp)."""
    args = [a for a in SYN if a not in ("--dtype", "float32")] + ["--data_dir", syn_dir, "--max_steps", 8,
                                                                   "--compile", compile, "--sample_interval", 4,
                                                                   "--sample_tokens", 8, "--sample_prompt", "a"]
    a = ok(run(args + ["--out_dir", tmp_path / "a"]))
    spin = busy_core()
    try:
        b = ok(run(args + ["--out_dir", tmp_path / "b"]))
    finally:
        spin.kill()
    start = next(line for line in a.stdout.splitlines() if line.startswith("device "))
    assert "deterministic on (CPU)" in start and ("loss plain (compiled on CPU)" if compile == "true" else
                                                 "loss fused (eager on CPU)") in start, start
    assert " bf16" not in start or "native" in start
    assert events(tmp_path / "a") == events(tmp_path / "b")
    assert [e["step"] for e in events(tmp_path / "a") if "val_loss" in e] == [0, 3, 6, 7]
    samples = [line for line in a.stdout.splitlines() if line.startswith("sample: ")]
    assert len(samples) == 4 and samples == [line for line in b.stdout.splitlines() if line.startswith("sample: ")]


def test_deterministic_algorithms_make_a_compiled_embedding_backward_repeat():
    """The cause, reduced: inductor's embedding backward adds repeated ids' gradient rows with atomic adds across
    threads. With torch.use_deterministic_algorithms (what --deterministic auto turns on for CPU) every call gives
    the same bits. (Without it, 20 calls here gave 20 different gradients on a 2-core CPU: docs/cpu.md.)"""
    import torch.nn.functional as F

    from runtime import set_deterministic
    before = torch.are_deterministic_algorithms_enabled()
    try:
        assert set_deterministic("auto", "cpu") == (True, "CPU")
        w = torch.randn(512, 64, requires_grad=True)
        idx, up = torch.randint(0, 512, (64, 256)), torch.randn(64, 256, 64)
        f = torch.compile(lambda w, idx: (F.embedding(idx, w) * up).sum())
        grads = set()
        for _ in range(10):
            w.grad = None
            f(w, idx).backward()
            grads.add(w.grad.numpy().tobytes())
        assert len(grads) == 1
        assert (set_deterministic("false", "cpu") == (False, "given")
                and not torch.are_deterministic_algorithms_enabled())
    finally:
        torch.use_deterministic_algorithms(before)


def signal_args(syn_dir):
    return SYN + ["--data_dir", syn_dir, "--max_steps", 30, "--compile", "false", "--ckpt_interval", 1000,
                  "--dropout", "0.1", "--shuffle", "samples", "--max_lr", "3e-3", "--eval_interval", 10]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, syn_dir):
    """The uninterrupted run the stopped ones are compared with."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert "done:" in ok(run(signal_args(syn_dir) + ["--out_dir", out])).stdout
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_path_alone_continues(tmp_path, syn_dir, sig, code,
                                                                                         whole_run):
    """SIGTERM (a scheduler's notice) or Ctrl-C mid-run: the current step finishes, a checkpoint is written, and the
    command that continues is printed; that command alone (--resume PATH, no other flag) ends the run with the
    numbers of the uninterrupted one, bit for bit (dropout and shuffled samples on: RNG and loader come back)."""
    common = signal_args(syn_dir)
    out = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, "train_gpt2.py", *map(str, common + ["--out_dir", out])], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any("train_loss" in line for line in _lines(out / "metrics.jsonl")[2:]):
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = communicate(p, 120)
    assert p.returncode == code and "Traceback" not in stderr, stderr
    line = next(line for line in stdout.splitlines() if line.startswith("stopped at step"))
    ckpt = line.split("saved ")[1].split(";")[0]
    assert line.endswith(f"continue with: python train_gpt2.py --resume {ckpt}") and os.path.isdir(ckpt), line
    assert signal.Signals(sig).name in line and "stopping after this step" in stderr
    assert not os.path.exists(out / "model.safetensors")  # not finished: no final model
    argv = line.split("continue with: python train_gpt2.py ")[1].split()
    ok(run(argv))
    assert events(out) == events(whole_run)


def _lines(path):
    try:
        with open(path) as f:
            return f.readlines()
    except FileNotFoundError:
        return []


def test_a_second_ctrl_c_stops_at_once(tmp_path, syn_dir):
    """Ctrl-C twice: no wait for the step; exit 130, one line naming what to do, no traceback."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "train_gpt2.py", *map(str, SYN + [
        "--data_dir", syn_dir, "--max_steps", 100000, "--compile", "false", "--out_dir", out])],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not _lines(out / "metrics.jsonl"):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = communicate(p, 120)
    assert p.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted") and ("--resume" in last or "--overwrite true" in last), last


def test_a_branch_never_mixes_with_its_run(tmp_path, syn_dir, capsys):
    """Resuming from an older checkpoint is refused in its own out_dir (naming both ways out); in a new out_dir
    it starts a branch there, and the run it came from is untouched."""
    out, branch = tmp_path / "run", tmp_path / "branch"
    common = SYN + ["--data_dir", syn_dir, "--max_steps", 6, "--compile", "false", "--ckpt_interval", 2]
    ok(train_here(common + ["--out_dir", out], capsys))
    before = {n: sorted(os.listdir(out / n)) for n in os.listdir(out) if n.startswith("ckpt_")}
    bad = train_here(["--resume", out / "ckpt_000004", "--max_lr", "1e-3"], capsys)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "holds later checkpoints of this run (ckpt_000006)" in bad.stderr and "--out_dir NEW" in bad.stderr
    r = ok(train_here(["--resume", out / "ckpt_000004", "--max_lr", "1e-3", "--out_dir", branch], capsys))
    assert "note: --max_lr 0.001 overrides the run's 0.01" in r.stdout
    assert {n: sorted(os.listdir(out / n)) for n in os.listdir(out) if n.startswith("ckpt_")} == before
    assert [e["step"] for e in events(branch) if "train_loss" in e] == [4, 5]  # the branch's own steps
    assert sorted(n for n in os.listdir(branch) if n.startswith("ckpt_")) == ["ckpt_000006"]


def test_frozen_flags_are_refused_and_others_said(tmp_path, syn_dir, capsys):
    """What fixes the run (shape, data, seed, sequence length) cannot change on resume: one line naming the flag.
    Anything else wins with a note."""
    import train_gpt2
    out = tmp_path / "out"
    ok(train_here(SYN + ["--data_dir", syn_dir, "--max_steps", 4, "--run_steps", 2, "--compile", "false", "--out_dir",
                         out], capsys))
    for flag, value in (("--seed", 1), ("--n_embd", 64), ("--seq_len", 32), ("--data_dir", tmp_path)):
        with pytest.raises(SystemExit) as e:  # in this process: refused before anything runs
            train_gpt2.main(["--resume", "auto", "--out_dir", str(out), flag, str(value)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.strip().splitlines() == [err.strip()], err
        assert err.startswith(f"error: {flag} {value}: ") and "cannot change mid-run" in err, err
    r = ok(train_here(["--resume", "auto", "--out_dir", out, "--grad_clip", "0.5", "--weight_decay", "0.05"], capsys))
    assert "note: --grad_clip 0.5 overrides the run's 1.0" in r.stdout and "resumed from" in r.stdout
    groups = torch.load(out / "ckpt_000004" / "trainer.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # the flag reached AdamW, not only the note


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_run_moves_between_world_sizes(tmp_path, syn_dir, parallel, capsys):
    """Checkpointed on 2 gloo ranks, resumed in 1 process, then on 2 ranks again: the data goes on from the same
    global position (the loader's stream is global), and every loss equals the uninterrupted one-process run's
    within float32 rounding."""
    common = SYN + ["--data_dir", syn_dir, "--max_steps", 6, "--compile", "false", "--ckpt_interval", 2,
                    "--batch_size", 4]  # 1,024 tokens a step: grad accum 4 on one rank, 2 on each of two
    one = tmp_path / "one"
    ok(train_here(common + ["--out_dir", one], capsys))
    moved = tmp_path / "moved"
    ok(torchrun(common + ["--out_dir", moved, "--run_steps", 2, "--parallel", parallel]))
    r = ok(train_here(["--resume", moved / "ckpt_000002", "--run_steps", 2], capsys))  # fsdp goes on unsharded
    assert "grad accum 4" in r.stdout and "resumed from" in r.stdout and "x1 ddp" in r.stdout
    ok(torchrun(["--resume", moved / "ckpt_000004"] + (["--parallel", parallel] if parallel == "fsdp" else [])))
    a, b = events(one), events(moved)
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5), (k, x, y)


def test_a_world_size_the_batch_does_not_divide_is_refused_naming_those_that_do():
    from cli import ConfigError
    from config import parse_args, validate
    cfg, _ = parse_args(["--total_batch_size", "1024", "--batch_size", "8", "--seq_len", "64", "--device", "cpu"])
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"\(world sizes that work at this batch size: 1, 2\)$"):
        validate(cfg, world_size=3)
