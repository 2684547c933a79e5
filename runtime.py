"""Where a script runs: the device, the autocast dtype, the loss path, the ranks of a torchrun job, and FLOPs.

    d = setup_dist("auto")                  # Dist(rank, local_rank, world_size, device); one process: rank 0 of 1
    dtype = pick_dtype("auto", d.device)    # a rule over the hardware: bfloat16 where it is native, else ...
    scaler = make_scaler(dtype, d.device)   # float16's loss scaling; a pass-through for the other dtypes
    with make_autocast(dtype, d.device):
        ...
    run = wrap_model(LMLoss(model), "fsdp", compile=True, d=d)   # run.train(x, y), run.eval(x, y), run.logits(x)

dtype and loss path are rules over the hardware and software, never timings taken at start, so that one
command gives the same bits every time; the evidence for each rule is in docs/ (bench.py rows).
"""
import functools
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import ConfigError
from model import activation_bytes, param_counts

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


def native_bf16_cpu():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as torch reports it."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def pick_dtype(dtype, device):
    """(dtype, why): 'auto' -> on CUDA bfloat16 where the GPU has it natively (Ampere, sm_80, and later), else
    float16 (T4, V100, Colab's free GPUs); on a CPU bfloat16 where torch reports native bf16 (AVX512-BF16 or AMX),
    else float32 (AVX2-only CPUs emulate bf16 matmuls, about 200x slower); elsewhere (mps) float32.

    torch.cuda.is_bf16_supported() says yes by default also where bf16 is only emulated (sm_75 and older):
    including_emulation=False asks about the hardware, of the current device (setup_dist sets the rank's GPU)."""
    if dtype != "auto":
        return dtype, "given"
    if device.startswith("cuda"):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bfloat16", "native on this GPU") if native else ("float16", "this GPU has no native bf16")
    if device == "cpu":
        return (("bfloat16", "native bf16 on this CPU") if native_bf16_cpu()
                else ("float32", "no native bf16 on this CPU"))
    return "float32", f"on {device}"


def pick_loss(loss, device, compile):
    """(loss path, why): 'auto' -> 'fused' or 'plain' by a rule that bench.py's rows back (docs/cpu.md, docs/gpu.md).
    On CUDA (and Apple's mps) fused: the plain path's full logits are the largest tensor of a step (6.6 GB in bf16
    for GPT-2 124M at 64 x 1024). On CPU compiled plain (inductor fuses the softmax over the logits well), eager
    fused."""
    if loss != "auto":
        return loss, "given"
    if device.startswith("cuda") or device == "mps":
        return "fused", f"{device.split(':')[0].upper()}: the full logits would be the largest tensor"
    return ("plain", "compiled on CPU") if compile else ("fused", "eager on CPU")


def set_deterministic(mode, device):
    """(on, why) for --deterministic auto|true|false, applied: on is torch.use_deterministic_algorithms, so that one
    command repeats bit for bit. auto: on for CPU, where compiled runs otherwise drift: inductor sums the embedding's
    gradient rows of repeated ids with atomic adds across threads, in the order the threads reach them (docs/cpu.md
    has a reproduction and the cost); off on CUDA, whose atomics in attention and cuBLAS are faster."""
    on = mode == "true" or (mode == "auto" and device == "cpu")
    if on and device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode; before its 1st use
    torch.use_deterministic_algorithms(on, warn_only=True)  # an op without a deterministic kernel warns, not fails
    torch.utils.deterministic.fill_uninitialized_memory = False  # no need to fill torch.empty: nothing reads it
    return on, "given" if mode != "auto" else "CPU" if on else "CUDA" if device.startswith("cuda") else device


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
                          f"{torch.__version__} ({type(e).__name__}: {line[:200]}); "
                          f"use --dtype bfloat16 or float32") from None


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

    def sum(self, t):
        """Sum a tensor over ranks."""
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag):
        """Whether any rank's flag is set, on every rank (one small all-reduce)."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(torch.tensor(float(flag), device=self.device)).item())

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


class Stopper:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers send before they preempt a job) ask the run to stop after its
    current step, with a checkpoint; a second Ctrl-C stops at once (KeyboardInterrupt). `signal` holds the name
    of the first one received, None before. A context manager, in the main thread (where Python runs handlers)."""

    def __init__(self, verbose=True):
        self.signal, self.verbose, self.previous = None, verbose, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum).name
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (Ctrl-C again stops "
                  f"at once)", file=sys.stderr, flush=True)


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


class Wrapped(NamedTuple):
    """The model as the training loop calls it (see wrap_model)."""
    train: torch.nn.Module  # LMLoss as trained: DDP(compiled), the compiled FSDP module, or compiled
    eval: torch.nn.Module  # the val loss: the compiled LMLoss (without DDP's hooks)
    logits: Callable  # idx (B, T) -> logits (B, T, vocab): HellaSwag's forward
    generate: Callable  # GPT.generate, on every rank under FSDP (each forward gathers the weights)
    sync: Callable[[bool], None]  # sync(False): the next backward keeps its gradients local (a micro step)
    release: Callable[[], None]  # before destroy_process_group: drop our references to the process group


def checkpoint_activations(model):
    """Recompute each transformer block's activations in backward instead of keeping them (torch.utils.checkpoint,
    non-reentrant): only the blocks' inputs stay in memory, for one more forward of the blocks per step. Each
    block's forward is wrapped in place, inside the module's call, so FSDP's hooks still run around it."""
    from torch.utils.checkpoint import checkpoint
    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def wrap_model(lm, parallel, compile, d, activation_checkpointing=False):
    """Compile lm (a loss.LMLoss) and spread it over torchrun's ranks: the one place a parallelism is applied.

    ddp: each rank holds all of the model; DDP all-reduces the gradients in backward. fsdp (FSDP2's fully_shard):
    each transformer block, then lm as the root (wte = lm_head, tied, wpe, ln_f), becomes a unit whose weights,
    gradients and AdamW state are sharded over the ranks; a unit's weights are all-gathered just before its
    forward and backward, and its gradients reduce-scattered after. lm's logits and generate are registered as
    forwards too, so they gather the root's weights. The change is in place: the model's parameters become
    DTensor shards, so build the optimizer after this call, and every rank must join every forward (generate and
    eval included), eager for those two. One process: compiled only.
    sync(flag) is set before each micro step's forward (DDP reads it there): False accumulates locally, True
    (the last micro step) reduces; under FSDP the unsynced gradients are held unsharded (4 bytes/param).
    Shapes are static: every use pads to one shape, and automatic dynamic shapes crash DDP's graph splitting.
    release(), before destroy_process_group: drops the group from FSDP's device mesh (a private dict), which
    DTensor's caches keep alive, so that the group's last reference goes and gloo's threads are joined.
    """
    if activation_checkpointing:
        checkpoint_activations(lm.model)
    fsdp = parallel == "fsdp" and d.world_size > 1
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        mesh = init_device_mesh(d.device.split(":")[0], (d.world_size,))
        for block in lm.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(lm, mesh=mesh)
        for method in ("logits", "generate"):
            register_fsdp_forward_method(lm, method)
    compiled = torch.compile(lm, dynamic=False) if compile else lm
    if fsdp:
        return Wrapped(compiled, compiled, lm.logits, lm.generate, lm.set_requires_gradient_sync,
                       mesh._pg_registry.clear)
    model = torch.compile(lm.model, dynamic=False) if compile else lm.model
    logits = lambda idx: model(idx)[0]  # noqa: E731
    if d.world_size == 1:
        return Wrapped(compiled, compiled, logits, lm.generate, lambda sync: None, lambda: None)
    ddp = DDP(compiled, device_ids=[d.local_rank] if d.device.startswith("cuda") else None)
    return Wrapped(ddp, compiled, logits, lm.generate, lambda sync: setattr(ddp, "require_backward_grad_sync", sync),
                   lambda: None)


# Dense (not 2:4 sparse) bf16 tensor-core FLOP/s from NVIDIA's datasheets and whitepapers (GeForce: with fp32
# accumulate, as training uses), keyed by the model in torch.cuda.get_device_name(); see gpu_peak_flops.
GPU_PEAK_BF16_FLOPS = {
    "B200": 2250e12, "H200": 989e12, "H200 NVL": 835.5e12,
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835.5e12,  # "H100" is the SXM card ("NVIDIA H100 80GB HBM3")
    "A100": 312e12,  # 40GB and 80GB, PCIe and SXM alike
    "L40S": 362.05e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165.2e12, "RTX 3090": 71e12,
}


def gpu_peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU named as torch.cuda.get_device_name() names it, else None.

    A model must stand whole in the name, followed by its end, '-' or a memory size ("NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 80GB HBM3"): so "H100 NVL", "RTX 3090 Ti", "A10G" or "GH200" never take another card's figure.
    """
    for model, flops in GPU_PEAK_BF16_FLOPS.items():
        if re.search(rf"\b{re.escape(model)}($|-| \d+GB)", device_name, flags=re.IGNORECASE):
            return flops
    return None


def flops_per_token(config, seq_len, convention="nanogpt"):
    """Training FLOPs per token. nanoGPT's (and PaLM's) count: 6N for the matmuls, N without the position
    embeddings, which do no matmul, plus 12 * L * C * T for attention. llm.c's: 6N with every parameter, plus
    6 * L * C * T, attention's causal half."""
    total = param_counts(config)["total"]
    if convention == "llmc":
        return 6 * total + 6 * config.n_layer * config.n_embd * seq_len
    return 6 * (total - config.block_size * config.n_embd) + 12 * config.n_layer * config.n_embd * seq_len


def memory_plan(config, batch_size, seq_len, total_batch_size, world_size, gpu_bytes, parallel="ddp", skip=None,
                checkpointing=False):
    """The first (batch_size, activation checkpointing, fsdp) that model.py's memory estimate says fits a GPU of
    gpu_bytes (8/10 of it, for what the estimate leaves out: the allocator's slack, backward's transient buffers):
    the largest batch size up to batch_size that divides the step, then with activation checkpointing, then with
    --parallel fsdp on several ranks. skip: a choice known not to fit; checkpointing: already on (a plan without it
    would need more). None if nothing does."""
    state = 16 * param_counts(config)["total"]  # fp32 weights, grads, AdamW's m and v
    for fsdp in (parallel == "fsdp", True) if world_size > 1 else (False,):
        for ckpt in (True,) if checkpointing else (False, True):
            for b in range(batch_size, 0, -1):
                need = state / (world_size if fsdp else 1) + activation_bytes(config, b, seq_len, checkpointing=ckpt)
                if total_batch_size % (b * seq_len * world_size) == 0 and (b, ckpt, fsdp) != skip and \
                        need <= 0.8 * gpu_bytes:
                    return b, ckpt, fsdp
    return None


def memory_advice(config, batch_size, seq_len, total_batch_size, world_size, gpu_bytes, parallel="ddp",
                  checkpointing=False):
    """The flags to use instead of an out-of-memory --batch_size (and --activation_checkpointing, --parallel), by
    memory_plan, or None."""
    plan = memory_plan(config, batch_size, seq_len, total_batch_size, world_size, gpu_bytes, parallel,
                       skip=(batch_size, checkpointing, parallel == "fsdp"), checkpointing=checkpointing)
    if plan is None:
        return None
    b, ckpt, fsdp = plan
    return " ".join([f"--batch_size {b}"] + ["--activation_checkpointing true"] * ckpt +
                    ["--parallel fsdp"] * (fsdp and parallel != "fsdp"))
