"""A torchrun entry point: train_gpt2.main() with the fused loss forced into several chunks and DDP's
gradient buckets made tiny, so a small model compiles the way GPT-2 124M does on GPUs (13 loss chunks,
many buckets: DDP's graph splitting then sees a multi-chunk loss).

    torchrun --nproc_per_node=2 tests/helpers/ddp_chunks.py <train_gpt2 flags>
"""
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import loss  # noqa: E402
import runtime  # noqa: E402
import train_gpt2  # noqa: E402

if __name__ == "__main__":
    loss.LOGITS_CHUNK = 2**21  # B=4 x T=32 rows x 50304 logits -> 4 chunks
    runtime.DDP = functools.partial(runtime.DDP, bucket_cap_mb=1)  # wte, then the blocks: several buckets
    train_gpt2.main()
