"""train_gpt2.py compiled and on several ranks: inductor's training equals eager's, evals, HellaSwag and sampling
under compile on 2 ranks, static shapes, a compiler that cannot work, and DDP on 2 gloo ranks equal to one process.
(One process compiled, twice, with evals and sampling: test_repeat.)"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import HELLASWAG, ROOT, train_here, write_hellaswag
from model import GPT
from test_train import TINY, metrics, rel_err, run, tiny, train_main


def test_torchrun_with_one_rank_destroys_its_process_group(tmp_path, shakespeare_dir, monkeypatch):
    """Under torchrun with --nproc_per_node=1 the group exists too, and the run ends it (on an H100, NCCL warned at
    exit that destroy_process_group() was not called). In this process, with torchrun's variables set."""
    import socket

    import torch.distributed as dist

    import train_gpt2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    destroyed, destroy = [], dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(True) or destroy())
    try:
        train_gpt2.main(TINY + ["--data_dir", shakespeare_dir, "--out_dir", str(tmp_path / "out"), "--device", "cpu",
                                "--max_steps", "2", "--compile", "false", "--eval_interval", "100"])
        assert len(destroyed) == 1 and not dist.is_initialized()
    finally:  # a failed run must not leave its group to the tests after it
        if dist.is_initialized():
            destroy()


def test_torchrun_two_ranks_match_one_process(tmp_path, shakespeare_dir, capsys):
    """Same global batch of 8 sequences: 1 process x 4 micro steps of 2 == 2 gloo ranks x 2 micro steps of 2
    (grad accum = 512 / (2 * 64 * world)). Train loss, the pre-clip grad norm (which AdamW would hide a wrong
    gradient scale behind, e.g. averaging over ranks twice) and val loss all match. --val_steps counts batches of
    the whole job, which the ranks share (they take turns reading one stream): the same flag gives the same val
    loss on 1 and 2 ranks."""
    common = TINY + ["--data_dir", shakespeare_dir, "--max_steps", "6", "--eval_interval", "3",
                     "--compile", "false", "--device", "cpu", "--batch_size", "2",
                     "--hellaswag_interval", "3", "--hellaswag_path", write_hellaswag(tmp_path / "hs.jsonl")]
    single = train_here(common + ["--out_dir", str(tmp_path / "one"), "--val_steps", "7"], capsys)
    assert single.returncode == 0, single.stderr
    assert "grad accum 4 |" in single.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_gpt2.py", *common, "--out_dir", str(tmp_path / "two"), "--val_steps", "7"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "grad accum 2 |" in ddp.stdout
    # Float32 rounding only: the 8 sequences' gradients are summed in another order (gloo adds the ranks'
    # halves), a few ulps (observed: train loss 9e-8, norm 6e-8 relative over 6 steps, val loss identical).
    # rel=1e-5 leaves 100x; a wrong reduction (a rank's half missing, a double average) is O(1e-2) or more.
    for key in ("train_loss", "norm"):
        one, two = metrics(tmp_path / "one", key), metrics(tmp_path / "two", key)
        assert [s for s, _ in one] == [s for s, _ in two] == list(range(6)), key
        for (_, a), (_, b) in zip(one, two):
            assert a == pytest.approx(b, rel=1e-5), (key, one, two)
    val_one, val_two = metrics(tmp_path / "one", "val_loss"), metrics(tmp_path / "two", "val_loss")
    assert [s for s, _ in val_one] == [s for s, _ in val_two] == [0, 3, 5]
    for (_, a), (_, b) in zip(val_one, val_two):
        assert a == pytest.approx(b, rel=1e-5), (val_one, val_two)
    # HellaSwag: rank r scores examples r, r + 2, ...; the summed counts equal one process's
    for key in ("hellaswag_acc", "hellaswag_acc_norm"):
        hs_one, hs_two = metrics(tmp_path / "one", key), metrics(tmp_path / "two", key)
        assert hs_one == hs_two and [s for s, _ in hs_one] == [0, 3, 5], (hs_one, hs_two)
        assert all(abs(x * len(HELLASWAG) - round(x * len(HELLASWAG))) < 1e-9 for _, x in hs_one)  # k / 7 examples


def test_compile_that_cannot_work_stops_in_one_line(tmp_path, shakespeare_dir):
    """No C++ compiler for inductor (as on some Windows/Mac/container setups): one line naming --compile false."""
    env = {**os.environ, "CXX": "/nonexistent/c++"}
    r = run(TINY + ["--data_dir", shakespeare_dir, "--out_dir", str(tmp_path / "out"), "--device", "cpu",
                    "--compile", "true", "--max_steps", "1"], env=env, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--compile true: torch.compile does not work here" in r.stderr and "--compile false" in r.stderr


def test_torchrun_compile_with_chunked_loss_many_buckets_and_every_eval(tmp_path, shakespeare_dir):
    """The calls the trainer makes on GPUs, on 2 gloo ranks: compile; val eval at (B, T); HellaSwag at another
    sequence length (rows padded to 64, training at 32); sampling; a checkpoint every step; DDP training with the
    loss in 4 chunks over several gradient buckets. Static shapes compile one graph per use: train, eval,
    HellaSwag. (The crash this guards against, "'int' object has no attribute 'meta'" from DDP's graph splitting
    under automatic dynamic shapes, was seen with torch 2.11; torch 2.13 on CPU does not show it, so the test
    below pins dynamic=False directly.)"""
    out = tmp_path / "out"
    args = TINY + ["--data_dir", shakespeare_dir, "--out_dir", str(out), "--device", "cpu", "--compile", "true",
                   "--seq_len", "32", "--max_steps", "2", "--eval_interval", "1", "--hellaswag_interval", "1",
                   "--hellaswag_path", write_hellaswag(tmp_path / "hs.jsonl"), "--sample_interval", "1",
                   "--sample_tokens", "4", "--ckpt_interval", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "tests/helpers/ddp_chunks.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, _ in metrics(out, "train_loss")] == [0, 1]
    assert [s for s, _ in metrics(out, "hellaswag_acc_norm")] == [0, 1]
    assert r.stdout.count("sample: ") == 2 and os.path.isdir(out / "ckpt_000002")  # 2 samples at the last step
    assert "compiled graphs: 3" in r.stdout, r.stdout[-2000:]  # rank 0's: train, eval, HellaSwag


def test_compile_is_static(tmp_path, shakespeare_dir, capsys, monkeypatch):
    """Every use pads to one shape, so the model is compiled with dynamic=False (no automatic dynamic shapes): the
    training loss (loss.LMLoss) and the model's logits for HellaSwag."""
    import train_gpt2
    calls = []
    monkeypatch.setattr(train_gpt2, "check_compile", lambda device: None)
    monkeypatch.setattr(train_gpt2.torch, "compile", lambda model, **kw: calls.append(kw) or model)
    assert train_main(tiny(shakespeare_dir, tmp_path / "out", "--max_steps", 1) + ["--compile", "true"], capsys)[0] == 0
    assert calls == [{"dynamic": False}] * 2


def test_inductor_compiled_training_matches_eager(monkeypatch):
    """torch.compile (the default inductor backend, as the trainer calls it: dynamic=False) trains as eager
    does: three steps of forward, backward, clip and fused AdamW on two copies of one tiny GPT (one block:
    a second adds compile time, not kinds of kernels), float32, the loss forced into 2 chunks (GPT-2 124M's
    has 13). Each step compares the loss, the pre-clip norm and every gradient; the weights then drift apart
    only by what each step's rounding adds. test_model's compile test uses aot_eager, which runs no inductor
    code, and test_repeat's compiled runs check that a run repeats, not that it matches eager."""
    import copy

    from loss import LMLoss
    from model import GPTConfig
    from optim import configure_optimizers
    from runtime import compiled_graphs
    eager = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
    twin = copy.deepcopy(eager)
    from torch._dynamo.utils import counters
    graphs, inductor_events = compiled_graphs(), sum(counters["inductor"].values())
    compiled = torch.compile(LMLoss(twin, chunk=2**13), dynamic=False)  # 64 rows x 256 vocab = 2 chunks
    runs = [(eager, LMLoss(eager, chunk=2**13), configure_optimizers(eager, 0.1, 1e-2)),
            (twin, compiled, configure_optimizers(twin, 0.1, 1e-2))]
    data = torch.randint(0, 256, (3, 2, 33))
    for step, batch in enumerate(data):
        results = []
        for model, forward, opt in runs:
            opt.zero_grad(set_to_none=True)
            loss = forward(batch[:, :-1], batch[:, 1:])
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            results.append((loss.item(), norm.item(), grads))
        (loss_e, norm_e, grads_e), (loss_c, norm_c, grads_c) = results
        # Inductor fuses and reorders float32 reductions (layer norm, softmax, bias sums), a few ulps per op:
        # observed loss within 1e-7, gradients within 1.5e-6 relative over these steps, here and with AVX2
        # kernels forced (ATEN_CPU_CAPABILITY=avx2, cpp.simdlen=256). 2e-5 leaves >10x; a wrong term is O(1e-2+).
        assert loss_c == pytest.approx(loss_e, rel=1e-5, abs=0), step
        assert norm_c == pytest.approx(norm_e, rel=1e-5, abs=0), step
        for name, g in grads_e.items():
            assert rel_err(grads_c[name], g) < 2e-5, (step, name, rel_err(grads_c[name], g))
    assert compiled_graphs() - graphs == 1  # the compiled path really ran: one graph, no break, no recompile
    assert sum(counters["inductor"].values()) > inductor_events  # and inductor built it (aot_eager counts nothing)
