"""Where a script runs: the device, the autocast dtype, and the ranks of a torchrun job.

    d = setup_dist("auto")                  # Dist(rank, local_rank, world_size, device); one process: rank 0 of 1
    dtype = pick_dtype("auto", d.device)    # bfloat16 on CUDA; on CPU whichever multiplies faster here
    with make_autocast(dtype, d.device):
        ...
"""
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import ConfigError


def resolve_device(device):
    """--device: auto -> cuda, else mps, else cpu; otherwise one of cpu, cuda, cuda:N, mps."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"--device: unknown device {device!r} (auto, cpu, cuda, cuda:N or mps)")
    return device


def pick_dtype(dtype, device):
    """'auto' -> bfloat16 on CUDA; elsewhere whichever of bfloat16 and float32 multiplies faster here.

    CPUs without native bf16 (AVX2 only) run bf16 matmuls ~200x slower than fp32; those with
    AVX512-BF16 or AMX run them faster. A 256^3 matmul in each settles it in milliseconds.
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    def seconds(dt):
        a = torch.randn(256, 256, device=device, dtype=dt)
        a @ a
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        return time.perf_counter() - t0
    return "bfloat16" if seconds(torch.bfloat16) < seconds(torch.float32) else "float32"


def make_autocast(dtype, device):
    """The context the forward passes run in: bf16 autocast when dtype is 'bfloat16', else a no-op."""
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0

    def print0(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)

    def mean(self, t):
        """Average a tensor over ranks (gloo has no ReduceOp.AVG: sum, then divide)."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.world_size
        return t

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def rank0_first(self, fn):
        """fn() on rank 0, then on the other ranks once it is done: rank 0 downloads or prepares a file,
        the others wait at a barrier and then find it ready."""
        out = fn() if self.master else None
        self.barrier()
        return out if self.master else fn()


def setup_dist(device):
    """Start torch.distributed under torchrun (NCCL on CUDA, gloo on CPU) and pick the device."""
    device = resolve_device(device)
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # torch.distributed.nn (DDP imports it) binds the default group into function defaults when first
    # imported, which would keep the group and gloo's threads alive past destroy_process_group: import it first
    import torch.distributed.nn  # noqa: F401
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world, device)
