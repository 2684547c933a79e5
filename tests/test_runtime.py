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


@pytest.mark.parametrize("bf16, amx, expected", [
    (False, False, ("float32", "no native bf16 on this CPU")),  # AVX2 only: bf16 emulated, ~200x slower
    (True, False, ("bfloat16", "native bf16 on this CPU")),  # AVX512-BF16
    (False, True, ("bfloat16", "native bf16 on this CPU")),  # AMX
])
def test_pick_dtype_auto_on_cpu_is_a_rule_over_what_torch_reports(monkeypatch, bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert runtime.pick_dtype("auto", "cpu") == expected


def test_pick_dtype_on_cuda_or_given_a_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # sm_80 or newer
    assert (runtime.pick_dtype("auto", "cuda") == runtime.pick_dtype("auto", "cuda:1")
            == ("bfloat16", "native on this GPU"))
    assert runtime.pick_dtype("auto", "mps")[0] == "float32"
    for dtype in ("float32", "bfloat16", "float16"):
        for device in ("cpu", "cuda", "mps"):
            assert runtime.pick_dtype(dtype, device) == (dtype, "given")


def test_this_cpu_s_pick_matches_its_flags():
    """The rule reads the same flags /proc/cpuinfo shows (avx512_bf16, amx_bf16), where that file exists."""
    with open("/proc/cpuinfo") as f:  # Linux, as CI
        flags = f.read().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert runtime.pick_dtype("auto", "cpu")[0] == ("bfloat16" if native else "float32")


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


def test_pick_loss_is_a_rule_fused_on_cuda_plain_compiled_on_cpu():
    """--loss auto: fused on CUDA (the full logits would be the largest tensor), on CPU plain when compiled and
    fused when eager (bench.py's rows on both CPU kinds, docs/cpu.md); an explicit choice is kept."""
    assert runtime.pick_loss("auto", "cuda", True)[0] == runtime.pick_loss("auto", "cuda:0", False)[0] == "fused"
    assert runtime.pick_loss("auto", "cpu", True) == ("plain", "compiled on CPU")
    assert runtime.pick_loss("auto", "cpu", False) == ("fused", "eager on CPU")
    assert runtime.pick_loss("plain", "cuda", True) == ("plain", "given")
    assert runtime.pick_loss("fused", "cpu", True) == ("fused", "given")


def test_flops_per_token_in_nanogpts_and_llmcs_conventions():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=32)
    total = sum(p.numel() for p in GPT(config).parameters())
    assert runtime.flops_per_token(config, 16) == 6 * (total - 16 * 8) + 12 * 1 * 2 * 4 * 16  # nanoGPT's
    assert runtime.flops_per_token(config, 16, "llmc") == 6 * total + 6 * 1 * 8 * 16  # llm.c's
    gpt2 = GPTConfig(vocab_size=50304)  # 124M as trained: llm.c's count is 0.939 of nanoGPT's
    assert (runtime.flops_per_token(gpt2, 1024, "llmc") / runtime.flops_per_token(gpt2, 1024)
            == pytest.approx(0.939, abs=1e-3))


@pytest.mark.parametrize("name, flops", [  # names as torch.cuda.get_device_name() gives them
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA A10", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362.05e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 3090", 71e12),
    # cards not in the table, some named like one that is: no figure rather than a wrong one
    ("NVIDIA A10G", None), ("NVIDIA L40", None), ("NVIDIA GeForce RTX 3090 Ti", None),
    ("NVIDIA GeForce RTX 4090 D", None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None), ("NVIDIA GH200 480GB", None), ("NVIDIA H800", None),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_gpu_peak_flops(name, flops):
    assert runtime.gpu_peak_flops(name) == flops


def test_every_gpu_in_the_table_gets_its_own_figure():
    for model, flops in runtime.GPU_PEAK_BF16_FLOPS.items():
        assert runtime.gpu_peak_flops(f"NVIDIA {model}") == flops, model




def test_memory_advice_names_what_fits():
    """The out-of-memory line's advice (runtime.memory_advice, from model.activation_bytes): a smaller batch that
    divides the step first, then activation checkpointing, then FSDP on several GPUs."""
    from config import PRESETS, TrainConfig
    t = TrainConfig(**PRESETS["gpt2-xl"])
    xl = GPTConfig(n_layer=t.n_layer, n_head=t.n_head, n_embd=t.n_embd, vocab_size=t.vocab_size)
    gb = 2**30
    assert runtime.memory_advice(xl, 8, 1024, 524288, 1, 40 * gb) == "--batch_size 2"
    assert runtime.memory_advice(xl, 8, 1024, 524288, 8, 24 * gb) == "--batch_size 4 --parallel fsdp"
    assert runtime.memory_advice(xl, 8, 1024, 524288, 1, 24 * gb) is None  # the train state alone is 23 GiB
    small = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    assert runtime.memory_advice(small, 64, 1024, 524288, 1, 24 * gb) == "--batch_size 32"
    assert runtime.memory_advice(small, 64, 1024, 524288, 1, 6 * gb) == "--batch_size 8"
    assert runtime.memory_advice(small, 8, 1024, 524288, 1, 3 * gb) == "--batch_size 4 --activation_checkpointing true"


def test_apple_mps_is_picked_after_cuda_and_its_choices_are_the_safe_ones(monkeypatch):
    """No Mac here: a stubbed backend. --device auto takes cuda, then mps, then cpu; on mps dtype auto is float32
    (no autocast), the loss fused (the logits would be the largest tensor), deterministic algorithms off, and
    AdamW the foreach one (fused AdamW is CPU and CUDA's here)."""
    from optim import configure_optimizers
    fake_machine(monkeypatch, cuda=0, mps=True)
    assert runtime.resolve_device("auto") == "mps"
    assert runtime.pick_dtype("auto", "mps") == ("float32", "on mps")
    assert runtime.pick_loss("auto", "mps", compile=True)[0] == "fused"
    before = torch.are_deterministic_algorithms_enabled()
    try:
        assert runtime.set_deterministic("auto", "mps") == (False, "mps")
    finally:
        torch.use_deterministic_algorithms(before)
    assert not runtime.make_autocast("float32", "mps")._enabled
    opt = configure_optimizers(torch.nn.Linear(2, 2), 0.1, 1e-3, device_type="mps")
    assert not opt.defaults["fused"]
    fake_machine(monkeypatch, cuda=1, mps=True)
    assert runtime.resolve_device("auto") == "cuda"


def test_memory_advice_never_repeats_what_ran():
    """Out of memory with activation checkpointing already on: the advice keeps it on and lowers the batch."""
    small = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    advice = runtime.memory_advice(small, 8, 1024, 524288, 1, 3 * 2**30, checkpointing=True)
    assert advice == "--batch_size 4 --activation_checkpointing true"
    assert runtime.memory_advice(small, 4, 1024, 524288, 1, 3 * 2**30, checkpointing=True) != \
        "--batch_size 4 --activation_checkpointing true"


def test_resume_command_on_one_node_and_on_several():
    from checkpoint import resume_command
    assert resume_command("out/ckpt_000010", 8, 8) == \
        "torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume out/ckpt_000010"
    assert resume_command("out/ckpt_000010", 16, 8) == \
        "torchrun <your launch flags> train_gpt2.py --resume out/ckpt_000010"
