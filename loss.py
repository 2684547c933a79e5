"""The trainer's loss: GPT-2's cross-entropy without the full logits, and the --head_vocab train head.

    lm = LMLoss(model)                     # fused: never builds the (B, T, vocab) logits
    loss = lm(idx, targets)                # the mean loss model(idx, targets) gives, a scalar

LMLoss is the model as the trainer runs it (compiled, under DDP or FSDP); GPT itself stays plain GPT-2.
"""
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

LOGITS_CHUNK = 2**28  # the most logits the fused loss makes at once (1 GiB in float32); evidence: `bench.py loss`


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T (+ bias) against targets (-100: ignored), a chunk of rows at a time.

    With GPT-2's 50304-wide head the float32 logits are the largest tensor of a training step, and softmax, its
    backward and the one-hot scatter are memory-bound passes over them. Here each chunk's logits are made, reduced
    to the loss and, in the same pass, turned into the gradients (softmax - onehot) @ weight and its transpose
    (as Liger-Kernel's fused linear cross-entropy does); backward only scales them. Matmuls run in `dtype` (the
    autocast dtype), softmax in float32.

    (softmax - onehot) enters the matmuls without the 1/n_valid of the mean, which is applied after, in float32:
    its entries lie in [-1, 1], where float16 keeps them, while divided by 65,536 tokens they would fall below
    float16's smallest numbers (the loss scale cannot help: it multiplies these gradients only in backward).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, needs_grad, bias=None, chunk=LOGITS_CHUNK):
        # x (N, C), weight (V, C), targets (N,); bias (V,) or None; chunk: the most logits made at once
        valid = targets != -100  # (N,)
        n_valid = valid.sum().clamp(min=1)
        xc, wc = x.to(dtype), weight.to(dtype)
        losses = torch.empty(x.size(0), device=x.device)  # (N,)
        grad_x = torch.empty(x.shape, device=x.device) if needs_grad else None  # (N, C), float32
        grad_w = torch.zeros(weight.shape, device=x.device) if needs_grad else None  # (V, C), float32
        n_chunks = -(-x.size(0) * weight.size(0) // chunk)  # ceil: chunks of at most `chunk` logits
        rows = -(-x.size(0) // n_chunks)
        for i in range(0, x.size(0), rows):
            s, t = slice(i, i + rows), targets[i:i + rows].clamp(min=0)[:, None]  # (n, 1)
            logits = (xc[s] @ wc.t()).float()  # (n, V)
            # the target's logit (before the bias) as its own (n, 1, C) @ (n, C, 1) product, not a gather from
            # logits: inductor fuses such gathers across chunks with int32 offsets, which overflow past 2^31 logits
            picked = (wc[t] @ xc[s, :, None]).float().view(-1)  # (n,)
            if bias is not None:
                logits += bias  # (V,), float32
            lse = logits.logsumexp(dim=-1)  # (n,)
            losses[s] = lse - picked
            if needs_grad:  # d(mean loss)/d(logits) = (softmax - onehot) / n_valid on valid rows
                g = logits.sub_(lse[:, None]).exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=logits.dtype))
                g = g.mul_(valid[s, None]).to(dtype)  # (n, V), in [-1, 1]: / n_valid comes after the matmuls
                grad_x[s] = g @ wc
                grad_w += g.t() @ xc[s]
        if needs_grad:
            ctx.save_for_backward(grad_x.div_(n_valid).to(x.dtype), grad_w.div_(n_valid).to(weight.dtype))
        return (losses * valid).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None, None


def linear_cross_entropy(x, weight, targets, fused=True, bias=None, chunk=LOGITS_CHUNK):
    """Mean cross-entropy of the logits x @ weight.T (+ bias) against targets (-100: ignored); x (N, C), weight
    (V, C), targets (N,). fused: LinearCrossEntropy; else the plain path, the float32 logits and F.cross_entropy.
    A bias entry stands for several ids that share one row (HeadVocab): the loss of a target there is its own
    logit's, without the bias."""
    if not fused:
        logits = F.linear(x, weight).float()  # (N, V)
        if bias is None:
            return F.cross_entropy(logits, targets, ignore_index=-100)
        valid = targets != -100  # (N,)
        own = (bias[targets.clamp(min=0)] * valid).sum() / valid.sum().clamp(min=1)
        return F.cross_entropy(logits + bias, targets, ignore_index=-100) + own
    device = x.device.type
    autocast = device in ("cuda", "cpu") and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(x, weight, targets, dtype, needs_grad, bias, chunk)


class HeadVocab:
    """--head_vocab train: the head's softmax over the K ids that occur in the train shards, plus one column for
    the R others, at the cost of K + 1 columns instead of vocab_size (Shakespeare: 19,084 ids + 1 of 50,304).

    The R other ids never occur in training, as inputs or targets. Their rows start equal (the first of them,
    "the rest row", is copied onto the others) and stay equal, so their R logits are one value z, and the full
    softmax's sum over them is R e^z: one column, the rest row, with a bias of log R. The loss and gradients
    are then the full head's, the rest row's being R times each copy's; Adam's update does not change with the
    gradient's scale (up to its eps), so the rest row moves as each copy would, and a hook on the optimizer copies
    it back onto them after each step. No id of the train
    shards shares a row, and evaluation, generation and export use the full head: the model stays GPT-2.

    Make it with HeadVocab.of(ids, weight, optimizer): None when fewer than 2 ids are left out.
    """

    def __init__(self, kept, rest, weight, optimizer):
        V, device = weight.size(0), weight.device
        self.weight, self.rest = weight, rest[1:]  # the rows kept equal to the rest row, rest[0]
        self.cols = torch.cat([kept, rest[:1]])  # (K + 1,): the head's rows
        self.col_of = torch.full((V,), len(kept), device=device)  # (V,): token id -> column
        self.col_of[kept] = torch.arange(len(kept), device=device)
        self.bias = torch.zeros(len(kept) + 1, device=device)  # (K + 1,)
        self.bias[-1] = math.log(len(rest))
        self.tie_()
        optimizer.register_step_post_hook(lambda *_: self.tie_())

    @classmethod
    def of(cls, ids, weight, optimizer):
        keep = torch.zeros(weight.size(0), dtype=torch.bool, device=weight.device)
        keep[torch.as_tensor(ids, device=weight.device)] = True
        rest = (~keep).nonzero().squeeze(1)  # (R,)
        return cls(keep.nonzero().squeeze(1), rest, weight, optimizer) if len(rest) >= 2 else None

    @torch.no_grad()
    def tie_(self):
        """Copy the rest row onto the rows of the other ids left out."""
        self.weight[self.rest] = self.weight[self.cols[-1]].clone()

    def columns(self, weight, targets):
        """(the head's K + 1 rows, their bias, targets as columns) for targets (N,) of token ids or -100."""
        return weight[self.cols], self.bias, torch.where(targets == -100, targets, self.col_of[targets.clamp(min=0)])


class LMLoss(nn.Module):
    """GPT as the trainer runs it: forward(idx, targets), both (B, T) int64, is the mean loss that model(idx,
    targets) gives, without the full logits when fused, and on a HeadVocab's columns in training mode when it has
    one. (No id checks: the trainer's shards were checked when the run started.)

    logits(idx) and generate(...) reach the model through this module: FSDP shards it as one unit (its root),
    and gathers the weights for its registered methods too (runtime.wrap_model)."""

    def __init__(self, model, fused=True, head=None, chunk=None):
        super().__init__()
        self.model, self.fused, self.head, self.chunk = model, fused, head, chunk or LOGITS_CHUNK

    def forward(self, idx, targets):
        x = self.model.transformer(idx).flatten(0, 1)  # (B * T, C)
        weight, bias, targets = self.model.lm_head.weight, None, targets.flatten()  # (V, C), (B * T,)
        if self.training and self.head is not None:
            weight, bias, targets = self.head.columns(weight, targets)  # (K + 1, C)
        return linear_cross_entropy(x, weight, targets, self.fused, bias, self.chunk)

    def logits(self, idx):
        return self.model(idx)[0]  # (B, T, vocab)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)
