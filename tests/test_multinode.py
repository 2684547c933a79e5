"""The README's multi-node command, run as two "nodes" on 127.0.0.1 (one torchrun agent each, one gloo rank per
node, a c10d rendezvous): the numbers of one process, and a resume on both nodes with --resume PATH."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, communicate, write_syn_shards

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SYN = ["--vocab_size", "256", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64",
       "--seq_len", "64", "--batch_size", "4", "--total_batch_size", "512", "--max_lr", "1e-2", "--min_lr", "1e-3",
       "--warmup_steps", "2", "--val_steps", "4", "--eval_interval", "3", "--device", "cpu", "--dtype", "float32",
       "--hellaswag_interval", "0", "--sample_interval", "0", "--compile", "false", "--ckpt_interval", "3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args, timeout=300):
    """The README's command on each of 2 nodes (here 2 agents on this machine); both must exit 0."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test-job", "train_gpt2.py", *map(str, args)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [communicate(p, timeout) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    return "".join(out for out, _ in outs)


def numbers(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in e.items() if k not in ("dt_ms", "tokens_per_sec")} for e in map(json.loads, f)]


def test_two_nodes_give_the_numbers_of_one_process_and_resume(tmp_path):
    data = write_syn_shards(tmp_path / "d", (6000, 5000), 3000)
    one = subprocess.run([sys.executable, "train_gpt2.py", *SYN, "--data_dir", data, "--max_steps", "6",
                          "--out_dir", str(tmp_path / "one")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    out = tmp_path / "nodes"  # shared by both nodes, as the README asks (here: one filesystem)
    text = two_nodes(SYN + ["--data_dir", data, "--max_steps", 6, "--run_steps", 3, "--out_dir", out])
    assert "device cpu x2" in text and "grad accum 1" in text
    two_nodes(["--resume", out / "ckpt_000003"])
    a, b = numbers(tmp_path / "one"), numbers(out)
    assert [e["step"] for e in a] == [e["step"] for e in b] and len(a) > 6
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5), (k, x, y)
