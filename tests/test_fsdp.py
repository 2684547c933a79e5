"""--parallel fsdp (FSDP2's fully_shard) on 2 gloo ranks on CPU: the numbers of one process, one reduce-scatter
per unit per step under gradient accumulation, bit-exact resume, checkpoints in the DDP / Hugging Face format,
compile, and the bad combinations refused in one line.

A tiny model (2 layers, 64 wide) in float32 on synthetic shards of ids < 256.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, communicate, write_hellaswag, write_syn_shards

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks share the cores
TIMEOUT = 300  # a rank left out of a collective hangs: the timeout turns that into a failure
SYN = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--seq_len", "32",
       "--batch_size", "2", "--total_batch_size", "256", "--max_lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "2",
       "--device", "cpu", "--dtype", "float32", "--compile", "false", "--hellaswag_interval", "0",
       "--sample_interval", "0", "--loss", "fused"]  # 256 tokens per step: grad accum 4 in one process, 2 on each
# of 2 ranks; --loss fixed, as the runs compared would each measure (auto) for themselves
UNITS = 3  # fully_shard units: 2 blocks and the root (wte = lm_head, wpe, ln_f)


def start(args, script="train_gpt2.py", nproc=0):
    """The trainer (or a helper) in the background: one process, or nproc gloo ranks under torchrun."""
    cmd = [sys.executable, script, *map(str, args)]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait(p):
    """(exit code, stdout, stderr) of a started run; one that hangs is killed with its ranks after TIMEOUT."""
    out, err = communicate(p, TIMEOUT)
    return p.returncode, out, err


def finish(*procs):
    """Wait for all; fail the test with the output of one that did not exit 0. Returns their stdouts."""
    done = [wait(p) for p in procs]  # all of them first: none is left running when one fails
    for p, (code, out, err) in zip(procs, done):
        assert code == 0, f"{p.args}\n{out[-2000:]}\n{err[-3000:]}"
    return [out for _, out, _ in done]


def events(out_dir, key):
    """Every logged (step, value) of `key`, in file order (a resumed run appends)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(e["step"], e[key]) for e in map(json.loads, f) if key in e]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    """Random ids < 256: 3 train shards (7,500 tokens), one val shard of 4,000."""
    return write_syn_shards(tmp_path_factory.mktemp("syn"), (3000, 2000, 2500), 4000)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, syn_dir):
    """4 steps of the same global batch: one process (4 micro steps), and 2 ranks under --parallel fsdp (2 micro
    steps each) through a helper that counts reduce-scatters; the same --val_steps 4, which the ranks share.
    Both write a checkpoint at the end (ckpt_000004). Returns (one out_dir, fsdp out_dir, stdouts)."""
    tmp = tmp_path_factory.mktemp("pair")
    common = SYN + ["--vocab_size", "256", "--data_dir", syn_dir, "--max_steps", "4", "--eval_interval", "2"]
    one, two = str(tmp / "one"), str(tmp / "two")
    outs = finish(start(common + ["--out_dir", one, "--val_steps", "4"]),
                  start(common + ["--out_dir", two, "--val_steps", "4", "--parallel", "fsdp"],
                        script="tests/helpers/count_reduce_scatter.py", nproc=2))
    return one, two, outs, common


def test_fsdp_matches_one_process(pair):
    """Train loss, pre-clip grad norm (the full norm over both ranks' shards) and val loss per step, and the
    final weights, equal one process's up to float32 rounding (summation order: gloo adds the ranks' halves)."""
    one, two, (out_one, out_two), _ = pair
    assert "x1 ddp |" in out_one and "grad accum 4 |" in out_one
    assert "x2 fsdp |" in out_two and "grad accum 2 |" in out_two
    for key, steps in (("train_loss", [0, 1, 2, 3]), ("norm", [0, 1, 2, 3]), ("val_loss", [0, 2, 3])):
        a, b = events(one, key), events(two, key)
        assert [s for s, _ in a] == [s for s, _ in b] == steps, key
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4, (key, a, b)
        assert len({x for _, x in a}) == len(a), (key, a)  # the values move: equal series are not constants
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_micro_steps_before_the_last_keep_their_gradients_local(pair):
    """With 2 micro steps per step, FSDP reduce-scatters each unit's gradients once per step (the last
    micro step), not once per micro step: 4 steps x 3 units = 12 on each rank, not 24."""
    out_two = pair[2][1]
    for rank in (0, 1):
        assert f"rank {rank}: {4 * UNITS} reduce-scatters" in out_two, out_two[-2000:]


def test_fsdp_checkpoint_has_the_format_of_one_process(pair):
    """The same files, the same weight names and shapes, the optimizer state under the same parameter names
    and shapes: gathered whole, not one rank's shards; only TrainConfig.parallel tells them apart."""
    one, two = (os.path.join(d, "ckpt_000004") for d in pair[:2])
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    wa, wb = weights(one), weights(two)
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
    assert wa["transformer.wte.weight"].shape == (256, 64)
    ta, tb = (torch.load(os.path.join(d, "trainer.pt"), weights_only=True) for d in (one, two))
    sa, sb = ta["optimizer"]["state"], tb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and "transformer.h.1.mlp.c_fc.weight" in sa
    for name in sa:
        assert {k: v.shape for k, v in sa[name].items()} == {k: v.shape for k, v in sb[name].items()}, name
        assert not any(hasattr(v, "placements") for v in sb[name].values())  # plain tensors, not DTensors
    assert sb["transformer.h.1.mlp.c_fc.weight"]["exp_avg"].shape == (256, 64)  # whole, not half
    assert ta["optimizer"]["param_groups"] == tb["optimizer"]["param_groups"]
    config = [json.load(open(os.path.join(d, "trainer.json")))["config"] for d in (one, two)]
    assert (config[0]["parallel"], config[1]["parallel"]) == ("ddp", "fsdp")


def test_checkpoint_with_the_optimizer_state_by_position_is_one_line(pair, tmp_path):
    """Checkpoints written before the optimizer state was keyed by name (optimizer.state_dict()'s numbers)
    are refused in one line that says how to use their weights."""
    one, _, _, common = pair
    path = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(one, "ckpt_000004"), path)
    state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    names = list(state["optimizer"]["state"])
    state["optimizer"]["state"] = {i: state["optimizer"]["state"][n] for i, n in enumerate(names)}
    torch.save(state, os.path.join(path, "trainer.pt"))
    code, _, err = wait(start(common + ["--out_dir", str(tmp_path / "out"), "--resume", path]))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "optimizer state by position" in lines[0], err
    assert lines[0].endswith(f"--init_from {path}")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, syn_dir):
    """Under --parallel fsdp, 4 steps in one go, and the same 4 as two invocations of 2 (--run_steps 2
    --resume auto) through ckpt_000002. Dropout, shuffled shards, HellaSwag and sampling on; GPT-2's padded
    vocabulary (50304), so the rows past 50257 travel in trainer.pt. The uninterrupted run goes through
    tests/helpers/flaky_train.py (without a crash), which reports gloo's threads. Returns (a, b, stdouts of a and
    of b's resume)."""
    tmp = tmp_path_factory.mktemp("resume")
    common = SYN + ["--data_dir", syn_dir, "--max_steps", "4", "--eval_interval", "2", "--ckpt_interval", "2",
                    "--val_steps", "2", "--parallel", "fsdp", "--dropout", "0.1", "--shuffle", "true",
                    "--hellaswag_interval", "2", "--hellaswag_path", write_hellaswag(tmp / "hs.jsonl"),
                    "--sample_interval", "2", "--sample_tokens", "4"]
    a, b = str(tmp / "a"), str(tmp / "b")
    chunk = common + ["--out_dir", b, "--run_steps", "2", "--resume", "auto"]  # the same command twice
    out_a = finish(start(common + ["--out_dir", a], script="tests/helpers/flaky_train.py", nproc=2),
                   start(chunk, nproc=2))[0]
    assert os.path.isdir(os.path.join(b, "ckpt_000002")) and not os.path.exists(os.path.join(b, "ckpt_000004"))
    return a, b, out_a, finish(start(chunk, nproc=2))[0]


def test_fsdp_resume_is_bit_exact(resumed):
    """Interrupted at step 2 and resumed, the run logs exactly the numbers of the uninterrupted one, and ends
    with the same weights: the shards are cut from the gathered state exactly as they were."""
    a, b, _, out = resumed
    assert f"resumed from {b}/ckpt_000002 at step 2" in out
    for key in ("train_loss", "norm", "lr", "val_loss", "hellaswag_acc_norm", "samples"):
        assert events(a, key) == events(b, key), key
    assert [s for s, _ in events(b, "train_loss")] == list(range(4))
    assert [s for s, _ in events(b, "hellaswag_acc_norm")] == [0, 2, 3]  # 7 examples: shares of 4 and 3
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = (torch.load(os.path.join(d, "ckpt_000004", "trainer.pt"), weights_only=True) for d in (a, b))
    assert torch.equal(ta["vocab_pad"], tb["vocab_pad"]) and ta["vocab_pad"].shape == (50304 - 50257, 64)
    sa, sb = ta["optimizer"]["state"], tb["optimizer"]["state"]
    assert all(torch.equal(sa[n][k], sb[n][k]) for n in sa for k in sa[n])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="threads are counted in /proc (Linux)")
def test_gloo_threads_end_with_the_run(resumed):
    """FSDP's units, its device mesh (kept by DTensor's caches) and the autograd graph hold the process group:
    freed before destroy_process_group, no gloo thread outlives main() (one that does can abort the rank with
    SIGABRT at interpreter exit, see tests/test_checkpoint.py)."""
    report = sorted(re.findall(r"rank (\d): (\d+) gloo threads while training, (\d+) after main", resumed[2]))
    assert [(rank, after) for rank, _, after in report] == [("0", "0"), ("1", "0")], resumed[2][-2000:]
    assert all(int(during) > 0 for _, during, _ in report), report


def test_fsdp_checkpoint_loads_in_hugging_face(resumed):
    """A checkpoint written under FSDP is an HF GPT-2 directory: GPT2LMHeadModel gives our logits, and its
    weights are the final model's (saved at the same step through the same gather)."""
    from transformers import GPT2LMHeadModel

    from model import GPT
    ckpt = os.path.join(resumed[0], "ckpt_000004")
    hf, ours = GPT2LMHeadModel.from_pretrained(ckpt).eval(), GPT.from_pretrained(ckpt).eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_layer == 2
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-4)
    final, saved = weights(resumed[0]), weights(ckpt)
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def test_compile_with_fsdp(pair, tmp_path):
    """--compile true under FSDP (the whole sharded model compiled; FSDP's hooks run between its graphs) trains
    2 steps with 2 micro steps each, and matches the eager FSDP run's first steps (the warmup lr does not depend
    on --max_steps)."""
    _, eager, _, common = pair
    out = str(tmp_path / "out")
    finish(start(common + ["--out_dir", out, "--val_steps", "4", "--parallel", "fsdp", "--compile", "true",
                           "--max_steps", "2"], nproc=2))
    for key, steps in (("train_loss", [0, 1]), ("norm", [0, 1]), ("val_loss", [0, 1])):
        got, want = events(out, key), dict(events(eager, key))
        assert [s for s, _ in got] == steps, key
        for s, x in got:
            if s in want:
                assert abs(x - want[s]) < 1e-4, (key, got, want)


@pytest.mark.parametrize("args, message", [
    (["--parallel", "x"], "error: --parallel: expected ddp or fsdp, got 'x'"),
    (["--parallel", "fsdp"], "error: --parallel fsdp: needs torchrun with 2 or more processes (this run has 1)"),
])
def test_bad_parallel_is_one_line(tmp_path, syn_dir, capsys, args, message):
    import train_gpt2
    with pytest.raises(SystemExit) as e:  # in this process: no torchrun, so world size 1
        train_gpt2.main(SYN + ["--data_dir", syn_dir, "--out_dir", str(tmp_path / "out"), "--max_steps", "1"] + args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), err
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


def test_fsdp_on_one_torchrun_process_is_refused(tmp_path, syn_dir):
    """torchrun --nproc_per_node=1 (WORLD_SIZE 1): the rank exits 2 with the line (torchrun then reports the
    failed rank in its own words)."""
    code, _, err = wait(start(SYN + ["--data_dir", syn_dir, "--out_dir", str(tmp_path / "out"), "--max_steps", "1",
                                     "--parallel", "fsdp"], nproc=1))
    assert code != 0 and "exitcode  : 2" in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines == ["error: --parallel fsdp: needs torchrun with 2 or more processes (this run has 1): torchrun "
                     "--standalone --nproc_per_node=N train_gpt2.py ...; one process needs no wrapping "
                     "(--parallel ddp)"], err[-3000:]
