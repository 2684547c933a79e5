"""runtime.py: device and dtype choice, and the rank helpers."""
import re

import pytest
import torch

import runtime
from cli import ConfigError
from model import GPT, GPTConfig
from runtime import Dist


@pytest.mark.parametrize("rank, world_size, expected", [
    (0, 1, ["prepare"]),
    (0, 2, ["prepare", "barrier"]),
    (1, 2, ["barrier", "prepare"]),  # after the barrier: rank 0 has prepared it by then
])
def test_rank0_first_runs_rank_0_before_the_others(monkeypatch, rank, world_size, expected):
    calls = []
    monkeypatch.setattr(runtime.dist, "barrier", lambda: calls.append("barrier"))
    d = Dist(rank=rank, world_size=world_size)
    assert d.rank0_first(lambda: calls.append("prepare") or "path") == "path"
    assert calls == expected


@pytest.mark.parametrize("cpu, seconds, expected", [
    ("AVX2 only: bf16 emulated, ~200x slower", {torch.bfloat16: 0.2, torch.float32: 0.001}, "float32"),
    ("AVX512-BF16 or AMX: bf16 ~4x faster", {torch.bfloat16: 0.001, torch.float32: 0.004}, "bfloat16"),
])
def test_pick_dtype_auto_on_cpu_takes_the_faster_matmul(monkeypatch, cpu, seconds, expected):
    monkeypatch.setattr(runtime, "matmul_seconds", lambda dtype, device: seconds[dtype])
    assert runtime.pick_dtype("auto", "cpu") == expected, cpu


def test_pick_dtype_on_cuda_or_given_a_dtype_measures_nothing(monkeypatch):
    def measure(dtype, device):
        raise AssertionError(f"measured {dtype} on {device}")
    monkeypatch.setattr(runtime, "matmul_seconds", measure)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # sm_80 or newer
    assert runtime.pick_dtype("auto", "cuda") == runtime.pick_dtype("auto", "cuda:1") == "bfloat16"
    for dtype in ("float32", "bfloat16", "float16"):
        for device in ("cpu", "cuda", "mps"):
            assert runtime.pick_dtype(dtype, device) == dtype


def test_matmul_seconds_times_a_real_matmul():
    assert 0 < runtime.matmul_seconds(torch.float32, "cpu") < 10


def fake_machine(monkeypatch, cuda=0, mps=False):
    """Pretend this machine has `cuda` CUDA devices and MPS or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, device, error", [
    (0, False, "cuda", "--device cuda: no CUDA device here"),
    (0, False, "cuda:0", "--device cuda:0: no CUDA device here"),
    (2, False, "cuda:2", "--device cuda:2: this machine has 2 CUDA devices (cuda:0..cuda:1)"),
    (1, False, "cuda:1", "--device cuda:1: this machine has 1 CUDA device (cuda:0..cuda:0)"),
    (1, False, "mps", "--device mps: MPS is not available here"),
    (0, True, "gpu", "--device: unknown device 'gpu'"),
    (0, True, "cuda:x", "--device: unknown device 'cuda:x'"),
])
def test_resolve_device_refuses_a_device_this_machine_lacks(monkeypatch, cuda, mps, device, error):
    fake_machine(monkeypatch, cuda, mps)
    with pytest.raises(ConfigError, match=re.escape(error)):
        runtime.resolve_device(device)


@pytest.mark.parametrize("cuda, mps, device, expected", [
    (0, False, "auto", "cpu"), (0, True, "auto", "mps"), (1, True, "auto", "cuda"),
    (0, False, "cpu", "cpu"), (2, False, "cuda", "cuda"), (2, False, "cuda:1", "cuda:1"), (0, True, "mps", "mps"),
])
def test_resolve_device_takes_a_device_this_machine_has(monkeypatch, cuda, mps, device, expected):
    fake_machine(monkeypatch, cuda, mps)
    assert runtime.resolve_device(device) == expected


@pytest.mark.parametrize("device, local_rank, expected, backend", [
    ("auto", "1", "cuda:1", "nccl"), ("cuda", "0", "cuda:0", "nccl"), ("cpu", "1", "cpu", "gloo"),
])
def test_setup_dist_under_torchrun_binds_the_local_gpu_and_picks_the_backend(monkeypatch, device, local_rank,
                                                                             expected, backend):
    """Under torchrun each rank takes cuda:LOCAL_RANK and NCCL (gloo on CPU). On a 2-GPU machine stand-in: the
    CUDA branch once died at set_device (UnboundLocalError: a later `import torch.distributed.nn` in the function
    made `torch` a local name), which no CPU run reached; it was found on an H100."""
    fake_machine(monkeypatch, 2 if backend == "nccl" else 0, False)
    calls = []
    monkeypatch.setattr(runtime.torch.cuda, "set_device", lambda dev: calls.append(("set_device", dev)))
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    for key, value in dict(RANK=local_rank, LOCAL_RANK=local_rank, WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    d = runtime.setup_dist(device)
    assert (d.rank, d.local_rank, d.world_size, d.device) == (int(local_rank), int(local_rank), 2, expected)
    assert calls == ([("set_device", expected)] if backend == "nccl" else []) + [("init", backend)]


def test_first_and_agree_share_one_verdict_across_ranks(monkeypatch):
    """Each rank checks its share (first) or rank 0 decides (agree); every rank gets the same answer."""
    def all_gather_object(out, value):  # rank 1 of 2, whose peer (rank 0) found nothing
        out[:] = [None, value]
    monkeypatch.setattr(runtime.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(runtime.dist, "broadcast_object_list", lambda box, src: box.__setitem__(0, "rank 0's"))
    d = Dist(rank=1, world_size=2)
    assert d.first("bad shard") == "bad shard" and d.first(None) is None
    assert d.agree("mine") == "rank 0's" and Dist().agree("mine") == "mine" and Dist().first(None) is None


def test_pick_loss_takes_the_faster_path_on_cpu_and_fused_on_cuda(monkeypatch):
    """--loss auto: on CPU the faster of the two measured paths (timing stubbed), on CUDA fused without
    measuring (the plain path's full logits could not fit); an explicit choice is kept. The model follows."""
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    timed = []

    def seconds(fast):
        def loss_seconds(m, fused, rows, dtype, device, compile=False):
            timed.append((fused, rows, dtype, compile))
            return 1.0 if fused == fast else 2.0
        return loss_seconds
    monkeypatch.setattr(runtime, "loss_seconds", seconds(fast=False))
    assert runtime.pick_loss("auto", model, 32, "float32", "cpu") == "plain" and model.fused_loss is False
    assert sorted(timed) == [(False, 32, "float32", False), (True, 32, "float32", False)]
    monkeypatch.setattr(runtime, "loss_seconds", seconds(fast=True))
    assert runtime.pick_loss("auto", model, 32, "bfloat16", "cpu") == "fused" and model.fused_loss is True
    timed.clear()  # a compiled run times the paths compiled: compile changes which one wins
    assert runtime.pick_loss("auto", model, 32, "bfloat16", "cpu", compile=True) == "fused"
    assert sorted(timed) == [(False, 32, "bfloat16", True), (True, 32, "bfloat16", True)]
    timed.clear()
    assert runtime.pick_loss("auto", model, 32, "bfloat16", "cuda") == "fused" and timed == []
    assert runtime.pick_loss("plain", model, 32, "bfloat16", "cpu") == "plain" and timed == []
    assert model.fused_loss is False


def test_loss_seconds_runs_both_paths_and_leaves_no_gradient():
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    for fused in (True, False):
        for compile in (False, True):
            assert runtime.loss_seconds(model, fused, 16, "float32", "cpu", compile) > 0 and model.fused_loss is fused
    assert model.lm_head.weight.grad is None
