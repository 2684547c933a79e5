"""A torchrun entry point: train_gpt2.main() unchanged, except that each rank counts the reduce-scatters
FSDP2 issues (it sends every gradient reduction through torch.distributed.reduce_scatter_single) and prints
`rank R: N reduce-scatters` when main() returns.

    torchrun --nproc_per_node=2 tests/helpers/count_reduce_scatter.py <train_gpt2 flags> --parallel fsdp

With gradient accumulation the count tells whether the micro steps before the last kept their gradients
local: steps x FSDP units, not steps x micro steps x units.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch.distributed as dist  # noqa: E402

import train_gpt2  # noqa: E402

if __name__ == "__main__":
    calls, real = [], dist.reduce_scatter_single

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    dist.reduce_scatter_single = counting
    try:
        train_gpt2.main()
    finally:
        print(f"rank {os.environ.get('RANK')}: {len(calls)} reduce-scatters", flush=True)
