"""Where a script runs: the device, the autocast dtype, and the ranks of a torchrun job.

    d = setup_dist("auto")                  # Dist(rank, local_rank, world_size, device); one process: rank 0 of 1
    dtype = pick_dtype("auto", d.device)    # bfloat16 on recent GPUs, float16 on T4/V100; CPU: the faster
    scaler = make_scaler(dtype, d.device)   # float16's loss scaling; a pass-through for the other dtypes
    with make_autocast(dtype, d.device):
        ...
    run = wrap_model(model, "fsdp", compile=True, d=d)   # run.train(x, y), run.eval(x, y), run.sync(False)
"""
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import ConfigError

DTYPES = ("auto", "bfloat16", "float16", "float32")  # --dtype's values


def resolve_device(device):
    """--device: auto -> cuda, else mps, else cpu; otherwise one of cpu, cuda, cuda:N, mps, which must exist here
    (checked now, so a typo'd or missing GPU fails before any data or model is loaded)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if device not in ("cpu", "cuda", "mps") and not (kind == "cuda" and index.isdigit()):
        raise ConfigError(f"--device: unknown device {device!r} (auto, cpu, cuda, cuda:N or mps)")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"--device {device}: no CUDA device here (torch {torch.__version__}); "
                              "use --device auto or cpu")
        if index and int(index) >= n:
            raise ConfigError(f"--device {device}: this machine has {n} CUDA device{'s' * (n > 1)} "
                              f"(cuda:0..cuda:{n - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available here; use --device auto or cpu")
    return device


def matmul_seconds(dtype, device, repeats=7):
    """Seconds for three 256^3 matmuls in dtype on device, the fastest of `repeats` tries after a warm-up:
    pick_dtype's measurement. The minimum, because another process on the machine only ever adds time
    (one try of a fraction of a millisecond once picked float32 on a bf16-native CPU while a script started)."""
    a = torch.randn(256, 256, device=device, dtype=dtype)
    a @ a
    tries = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        tries.append(time.perf_counter() - t0)
    return min(tries)


def pick_dtype(dtype, device):
    """'auto' -> on CUDA bfloat16 where the GPU has it natively (Ampere, sm_80, and later), else float16 (T4, V100,
    Colab's free GPUs); elsewhere whichever of bfloat16 and float32 multiplies faster here.

    torch.cuda.is_bf16_supported() says yes by default also where bf16 is only emulated (sm_75 and older), slowly
    and without bf16 tensor-core kernels: including_emulation=False asks about the hardware. It asks the current
    device, which setup_dist sets to the rank's GPU under torchrun.

    CPUs without native bf16 (AVX2 only) run bf16 matmuls ~200x slower than fp32; those with
    AVX512-BF16 or AMX run them faster. A 256^3 matmul in each settles it in milliseconds.
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    faster = matmul_seconds(torch.bfloat16, device) < matmul_seconds(torch.float32, device)
    return "bfloat16" if faster else "float32"


def make_autocast(dtype, device):
    """The context the forward passes run in: autocast to bfloat16 or float16, a no-op for float32."""
    low = dtype in ("bfloat16", "float16")
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype) if low else torch.bfloat16,
                          enabled=low)


def make_scaler(dtype, device, init_scale=2.0**16):
    """torch.amp.GradScaler for float16, disabled (every call a pass-through) for bfloat16 and float32.

    float16 overflows past 65504 and has nothing below 6e-8, where small gradients vanish: the loss is multiplied by
    the scale before backward (scale), and the gradients divided by it before clipping (unscale_). step() skips a
    step whose gradients hold an inf or nan, and update() then halves the scale (2000 clean steps double it). With
    the fused AdamW (CPU and CUDA) the skip is decided on the device, so nothing waits for the GPU before the step;
    with another optimizer step() reads found_inf back (one sync).
    """
    return torch.amp.GradScaler(device.split(":")[0], init_scale=init_scale, enabled=dtype == "float16")


def check_float16(device):
    """--dtype float16 needs float16 autocast and loss scaling on the device: one scaled step of a tiny layer now,
    so that a torch or device without them stops in one line, before any data or model is loaded."""
    try:
        with warnings.catch_warnings():  # autocast warns and disables itself for a dtype the device lacks
            warnings.simplefilter("ignore")
            w, scaler = torch.ones(4, 4, device=device, requires_grad=True), make_scaler("float16", device)
            with make_autocast("float16", device):
                out = torch.ones(2, 4, device=device) @ w  # (2, 4)
            if out.dtype != torch.float16 or not scaler.is_enabled():
                raise RuntimeError(f"autocast gave {out.dtype}, GradScaler enabled: {scaler.is_enabled()}")
            scaler.scale(out.float().sum()).backward()
            scaler.step(torch.optim.SGD([w], lr=0.1))
            scaler.update()
    except Exception as e:
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise ConfigError(f"--dtype float16: float16 autocast with loss scaling does not work on {device} with torch "
                          f"{torch.__version__} ({type(e).__name__}: {line[:200]}); use --dtype bfloat16 or float32") from None


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

    def agree(self, value):
        """Rank 0's value on every rank: a decision all ranks must share (a checkpoint to resume, an error)."""
        if self.world_size > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def first(self, value):
        """The first value that is not None over the ranks, on every rank: each rank checks its share of
        something, and all of them stop together if any found a problem."""
        values = [value]
        if self.world_size > 1:
            values = [None] * self.world_size
            dist.all_gather_object(values, value)
        return next((v for v in values if v is not None), None)

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
        device = resolve_device(f"cuda:{local_rank}")  # one line if torchrun starts more ranks than GPUs
        torch.cuda.set_device(device)
    # torch.distributed.nn (DDP imports it) binds the default group into function defaults when first
    # imported, which would keep the group and gloo's threads alive past destroy_process_group: import it first
    from torch.distributed import nn as _  # noqa: F401 (for its side effect; `import torch.distributed.nn` here
    # would make `torch` a local name of this function, unbound above: torchrun on CUDA died at set_device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world, device)


def check_compile(device):
    """Compile and run a tiny function now, in a fresh inductor cache so that nothing cached hides a missing
    compiler: where torch.compile cannot work (no C++ compiler for inductor on CPU, no Triton on CUDA, some
    Windows and Mac setups) the run stops here in one line, before its first step, instead of deep inside
    torch. (A silent fall back to eager would run a different, slower recipe.)"""
    from torch._inductor.utils import fresh_inductor_cache
    logging.getLogger("torch._inductor.utils").setLevel(logging.ERROR)  # not "temporary cache dir kept at ..."
    try:
        with fresh_inductor_cache():
            torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)(torch.ones(8, device=device))
    except Exception as e:
        inner = getattr(e, "inner_exception", None) or e
        line = next((ln.strip() for ln in str(inner).splitlines() if ln.strip()), "")
        raise ConfigError(f"--compile true: torch.compile does not work here ({type(inner).__name__}: {line[:200]}); "
                          f"run with --compile false") from None


def compiled_graphs():
    """How many graphs torch.compile has captured in this process (one per use: train, eval, HellaSwag)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def loss_seconds(model, fused, rows, dtype, device, compile=False):
    """Seconds for one forward and backward of model.head_loss on `rows` random hidden states, fused or
    plain, in dtype's autocast, compiled or eager as training will run it: the fastest of two tries after a
    warm-up (which compiles). pick_loss's measurement."""
    x = torch.randn(rows, model.config.n_embd, device=device, requires_grad=True)  # (N, C)
    targets = torch.randint(0, model.config.vocab_size, (rows,), device=device)  # (N,)
    model.fused_loss, tries = fused, []
    head_loss = torch.compile(lambda x, t: model.head_loss(x, t), dynamic=False) if compile else model.head_loss
    for _ in range(3):
        t0 = time.perf_counter()
        with make_autocast(dtype, device):
            loss = head_loss(x, targets)
        loss.backward()
        tries.append(time.perf_counter() - t0)
    model.lm_head.weight.grad = None
    return min(tries[1:])


def pick_loss(loss, model, rows, dtype, device, compile=False):
    """--loss: 'auto' -> 'fused' or 'plain'. On CUDA fused: the plain path's full logits are the largest
    tensor of a step (6.6 GB in bf16 for GPT-2 124M at 64 x 1024), so even measuring it could run out of
    memory. On CPU whichever trains the head faster here, timed at one micro batch (`rows` = B * T) and
    compiled if training compiles: which wins depends on the CPU, the dtype, the thread count and compile
    (2-core AVX512-BF16 CPU, bf16, the Shakespeare shape: fused 1.14x plain eager, plain 1.19x fused
    compiled; README, Results). A few seconds eager, some more to compile the two small graphs."""
    if loss == "auto":
        if device.startswith("cuda"):
            loss = "fused"
        else:
            fused, plain = (loss_seconds(model, f, rows, dtype, device, compile) for f in (True, False))
            loss = "fused" if fused <= plain else "plain"
    model.fused_loss = loss == "fused"
    return loss


class Wrapped(NamedTuple):
    """The model as the training loop calls it (see wrap_model)."""
    train: torch.nn.Module  # the training forward: DDP(compiled), the compiled FSDP model, or compiled
    eval: torch.nn.Module  # val loss and HellaSwag forwards: the compiled model (without DDP's hooks)
    sync: Callable[[bool], None]  # sync(False): the next backward keeps its gradients local (a micro step)
    release: Callable[[], None]  # before destroy_process_group: drop our references to the process group


def wrap_model(model, parallel, compile, d):
    """Compile `model` and spread it over torchrun's ranks: the one place a parallelism is applied.

    ddp: each rank holds all of the model; DDP all-reduces the gradients in backward. fsdp (FSDP2's
    fully_shard): each transformer block, then the root (wte = lm_head, tied, wpe, ln_f), becomes a unit
    whose weights, gradients and AdamW state are sharded over the ranks; a unit's weights are all-gathered
    just before its forward and backward, and its gradients reduce-scattered after. The change is in place:
    `model`'s parameters become DTensor shards, so build the optimizer over `model` after this call, and
    every rank must join every forward (generate and eval included). One process: compiled only.
    sync(flag) is set before each micro step's forward (DDP reads it there): False accumulates locally, True
    (the last micro step) reduces; under FSDP the unsynced gradients are held unsharded (4 bytes/param).
    Shapes are static: every use pads to one shape, and automatic dynamic shapes crash DDP's graph splitting.
    release(), before destroy_process_group: drops the group from FSDP's device mesh (a private dict), which
    DTensor's caches keep alive, so that the group's last reference goes and gloo's threads are joined.
    """
    fsdp = parallel == "fsdp" and d.world_size > 1
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(d.device.split(":")[0], (d.world_size,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    compiled = torch.compile(model, dynamic=False) if compile else model
    if fsdp:
        return Wrapped(compiled, compiled, model.set_requires_gradient_sync, mesh._pg_registry.clear)
    if d.world_size == 1:
        return Wrapped(compiled, compiled, lambda sync: None, lambda: None)
    ddp = DDP(compiled, device_ids=[d.local_rank] if d.device.startswith("cuda") else None)
    return Wrapped(ddp, compiled, lambda sync: setattr(ddp, "require_backward_grad_sync", sync), lambda: None)
