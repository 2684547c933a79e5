"""The optimizer and its schedule: AdamW with GPT-2's weight-decay groups, and build-nanogpt's cosine learning rate.

    optimizer = configure_optimizers(model, weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95))
    lr = get_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
"""
import math

import torch


def configure_optimizers(module, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu"):
    """AdamW over module's trainable parameters: decay on matrices and embeddings (dim >= 2), not on biases and
    norms. Fused (one kernel for all tensors) on CUDA and CPU, where torch's default is a slower per-tensor loop."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8, fused=device_type in ("cuda", "cpu"))


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    ratio = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
