"""The spike guard (optim.SpikeGuard, --spike_z), activation checkpointing (--activation_checkpointing) and the
line an out-of-memory first step gives."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, train_here
from data.shards import write_shard
from optim import SpikeGuard, configure_optimizers, step_unless

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--vocab_size", "256", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--seq_len", "32", "--batch_size", "4", "--total_batch_size", "128", "--max_lr", "1e-2", "--min_lr", "1e-3",
        "--warmup_steps", "2", "--val_steps", "2", "--eval_interval", "1000", "--device", "cpu", "--dtype", "float32",
        "--hellaswag_interval", "0", "--sample_interval", "0", "--compile", "false"]


def run(args, capsys=None):
    """A training run: its stdout. With capsys, in this process (eager runs: no interpreter and torch import to
    pay for); without, in a process of its own (compiled runs: dynamo's caches start empty)."""
    r = train_here(args, capsys) if capsys is not None else subprocess.run(
        [sys.executable, "train_gpt2.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=ENV,
        timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def events(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [e for e in map(json.loads, f) if "train_loss" in e]


def test_guard_skips_an_outlier_after_a_full_window_and_learns_a_new_level():
    guard = SpikeGuard(z=5, window=8)
    one = torch.tensor(1.0)
    skips = []
    for i in range(34):  # a noisy level, a spike at 12, then a lasting jump to 10 from step 24
        loss = torch.tensor(10.0 if i >= 24 else (50.0 if i == 12 else 1.0 + 0.01 * (i % 3)))
        skips.append(int(guard(loss, one)[0].item()))
    assert skips[:8] == [0] * 8  # no skip before the window is full
    assert skips[12] == 1 and sum(skips[8:24]) == 1  # the spike, and nothing else
    assert skips[24] == 1 and sum(skips[25:]) == 0  # the new level enters the window too, and is learned
    assert SpikeGuard(z=0, window=2)(torch.tensor(1e9), one)[0].item() == 0  # 0: off


def test_a_skipped_step_leaves_weights_and_adamw_state_untouched():
    """Decided on the device (fused AdamW's found_inf): no read back, nothing changes, the step count included."""
    model = torch.nn.Linear(4, 4)
    opt = configure_optimizers(model, 0.1, 1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model(torch.ones(2, 4)).sum().backward()
    step_unless(opt, scaler, torch.tensor(0.0))  # a normal step: AdamW's state exists now
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = [v.clone() for s in opt.state.values() for v in s.values()]  # step, m, v of each parameter
    model(torch.ones(2, 4)).sum().backward()
    step_unless(opt, scaler, torch.tensor(1.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(state, [v for s in opt.state.values() for v in s.values()]))
    step_unless(opt, scaler, torch.tensor(0.0))
    assert not torch.equal(before["weight"], model.weight)


def pattern_then_noise(d, n_pattern, n_noise):
    """A learnable stream (0, 1, ..., 63 repeated) whose last stretch is random tokens; a val shard of the pattern."""
    rng = np.random.default_rng(0)
    stream = np.concatenate([np.tile(np.arange(64), n_pattern // 64), rng.integers(0, 256, n_noise)])
    write_shard(os.path.join(d, "syn_train_000001.npy"), stream)
    write_shard(os.path.join(d, "syn_val_000000.npy"), np.tile(np.arange(64), 40))
    return str(d)


def test_the_trainer_skips_at_a_switch_to_noise_and_goes_on(tmp_path, capsys):
    """The data switch from a learned pattern to random tokens is a spike in the loss: the update is skipped,
    printed and logged with its reason, and training goes on; the run without the guard updates there."""
    data = pattern_then_noise(tmp_path / "d", 128 * 140, 128 * 30)  # 140 steps of pattern, then noise
    args = TINY + ["--data_dir", data, "--max_steps", 150, "--max_lr", "3e-3"]
    out = run(args + ["--out_dir", tmp_path / "guarded"], capsys)
    steps = events(tmp_path / "guarded")
    skipped = [e for e in steps if e.get("skipped")]
    assert skipped and all(e["step"] >= 140 for e in skipped), [(e["step"], e.get("reason")) for e in skipped]
    assert skipped[0]["reason"].startswith("spike: loss z ") and "update skipped" in out
    assert len(steps) == 150 and os.path.exists(tmp_path / "guarded" / "model.safetensors")
    run(args + ["--out_dir", tmp_path / "off", "--spike_z", 0], capsys)
    assert not any(e.get("skipped") for e in events(tmp_path / "off"))


@pytest.mark.parametrize("compile, dtype, tol", [("false", "float32", 1e-6), ("true", "float32", 1e-5),
                                                 ("false", "bfloat16", 1e-6), ("false", "float16", 1e-6)])
def test_activation_checkpointing_trains_the_same_model(tmp_path, capsys, compile, dtype, tol):
    """Recomputing the blocks in backward changes no number beyond float32 rounding (eager 1e-6, compiled 1e-5),
    under bf16 and float16 autocast too (the recompute repeats the same ops)."""
    from conftest import write_syn_shards
    data = write_syn_shards(tmp_path / "d", (4000,), 2000)
    args = [a if a != "float32" else dtype for a in TINY] + ["--data_dir", data, "--max_steps", 4, "--compile",
                                                            compile, "--eval_interval", 2]
    here = capsys if compile == "false" else None
    run(args + ["--out_dir", tmp_path / "plain"], here)
    out = run(args + ["--out_dir", tmp_path / "ckpt", "--activation_checkpointing", "true"], here)
    a, b = events(tmp_path / "plain"), events(tmp_path / "ckpt")
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=tol, abs=tol), (x, y)
        assert x["norm"] == pytest.approx(y["norm"], rel=10 * tol), (x, y)
    assert len(a) == len(b) == 4 and "done:" in out


def test_out_of_memory_in_the_first_step_is_one_line_naming_what_fits(tmp_path, monkeypatch, capsys):
    """A CUDA out-of-memory error in the first step (raised here from a stubbed step, on CPU) stops the run with one
    line naming the flags the memory estimate says fit, not a traceback; later ones are not second-guessed."""
    from types import SimpleNamespace

    import train_gpt2
    from conftest import write_syn_shards
    data = write_syn_shards(tmp_path / "d", (8000,), 4000)

    def oom(run, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(train_gpt2, "train_step", oom)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        name="NVIDIA GeForce RTX 4090", total_memory=24 * 2**30))
    args = ["--preset", "gpt2-medium", "--data_dir", data, "--out_dir", tmp_path / "out", "--device", "cpu",
            "--dtype", "float32", "--compile", "false", "--hellaswag_interval", "0", "--sample_interval", "0",
            "--n_layer", "1", "--vocab_size", "256", "--block_size", "64", "--seq_len", "64", "--val_steps", "1"]
    with pytest.raises(SystemExit) as e:
        train_gpt2.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: out of GPU memory in the first step at --batch_size 32 (NVIDIA GeForce RTX 4090, "
                          "24 GiB); by the memory estimate (python model.py) this fits: --batch_size "), err


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_activation_checkpointing_under_torchrun(tmp_path, parallel):
    """On 2 gloo ranks, DDP and FSDP (whose units gather their weights again for the recompute): the losses and
    norms of a run without it, within float32 rounding."""
    from conftest import communicate, write_syn_shards
    data = write_syn_shards(tmp_path / "d", (4000,), 2000)
    outs = {}
    for ckpt in ("false", "true"):
        out = tmp_path / f"{parallel}-{ckpt}"
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train_gpt2.py", *map(str, TINY + ["--data_dir", data, "--max_steps", 3,
                                                                 "--total_batch_size", 256,
                                                                 "--parallel", parallel, "--out_dir", out,
                                                                 "--activation_checkpointing", ckpt])],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = communicate(p, 300)
        assert p.returncode == 0, err[-3000:]
        outs[ckpt] = events(out)
    for x, y in zip(outs["false"], outs["true"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5) and x["norm"] == pytest.approx(y["norm"],
                                                                                                        rel=1e-4)
    assert len(outs["true"]) == 3


def test_activation_checkpointing_resumes_exactly(tmp_path, capsys):
    """With activation checkpointing, a run stopped after 2 steps and resumed with --resume PATH logs the numbers of
    the uninterrupted run, bit for bit."""
    from conftest import write_syn_shards
    data = write_syn_shards(tmp_path / "d", (4000,), 2000)
    args = TINY + ["--data_dir", data, "--max_steps", 4, "--activation_checkpointing", "true", "--dropout", "0.1"]
    run(args + ["--out_dir", tmp_path / "whole"], capsys)
    run(args + ["--out_dir", tmp_path / "cut", "--run_steps", 2], capsys)
    run(["--resume", tmp_path / "cut" / "ckpt_000002"], capsys)
    drop = ("dt_ms", "tokens_per_sec")
    assert [{k: v for k, v in e.items() if k not in drop} for e in events(tmp_path / "whole")] == \
        [{k: v for k, v in e.items() if k not in drop} for e in events(tmp_path / "cut")]
