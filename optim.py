"""The optimizer, its schedule and its guard: AdamW with GPT-2's weight-decay groups, build-nanogpt's cosine learning
rate, and the skip of an update whose loss or gradient norm spikes.

    optimizer = configure_optimizers(model, weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95))
    lr = get_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    skip, z = guard(loss, norm)                  # SpikeGuard: is this step's loss or norm an outlier?
    step_unless(optimizer, scaler, skip)         # the update, unless skipped, decided on the device
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


class SpikeGuard:
    """Skip an update whose loss or gradient norm lies more than z standard deviations above its mean over the
    last `window` steps (llm.c's outlier detector), decided on the device: no host sync in the step. Every step's
    values enter the window, skipped ones too, so a lasting change of level is learned within a window, and no step
    is skipped before the window is full. z 0: off."""

    def __init__(self, z, window=128, device="cpu"):
        self.z, self.window = z, window
        self.values = torch.zeros(2, window, device=device)  # (loss, norm) of the last `window` steps, a ring
        self.count = torch.zeros((), dtype=torch.long, device=device)  # steps seen

    def __call__(self, loss, norm):
        """(skip, z): skip is 1.0 for an outlier step, else 0.0; z (2,) the loss's and the norm's z-scores."""
        x = torch.stack([loss.float(), norm.float()])  # (2,)
        z = (x - self.values.mean(1)) / self.values.std(1).clamp(min=1e-12)  # (2,)
        full = (self.count >= self.window) & (self.z > 0)
        skip = (full & (z > self.z).any() & torch.isfinite(x).all()).float()
        self.values[:, self.count % self.window] = torch.nan_to_num(x, nan=0.0, posinf=0.0)
        self.count += 1
        return skip, z

    def state_dict(self):
        return {"values": self.values, "count": self.count}

    def load_state_dict(self, sd):
        if sd["values"].shape == self.values.shape:  # a window of another size: start it over
            self.values.copy_(sd["values"])
            self.count.copy_(sd["count"])


def step_unless(optimizer, scaler, skip):
    """optimizer.step() unless skip (1.0, a tensor on the device) says not to, the weights and AdamW's state then
    untouched. Decided on the device where the optimizer is fused, through the found_inf that float16's GradScaler
    also uses (which skips its overflows as before); elsewhere it reads skip back (a host sync)."""
    if scaler.is_enabled():  # GradScaler's record of this step's unscale_ (private): a spike counts as an overflow
        for found in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            found.copy_(torch.maximum(found, skip.to(found.device)))
        scaler.step(optimizer)
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = skip
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():
        optimizer.step()
