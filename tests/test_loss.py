"""loss.py: the fused linear cross-entropy, the plain path, LMLoss and the --head_vocab train head, against
F.cross_entropy on the full logits of model.GPT."""
import pytest
import torch

from loss import HeadVocab, LMLoss, linear_cross_entropy
from model import GPT, GPTConfig
from optim import configure_optimizers


def reference_loss_and_grads(model, idx, targets):
    """The loss model(idx, targets) gives (full logits, F.cross_entropy), and its gradients."""
    _, loss = model(idx, targets)
    return loss, torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("chunk", [2**28, 1000])  # 1000 logits: chunks of 7 rows, the last one short
def test_fused_loss_and_gradients_match_plain_cross_entropy(chunk):
    model = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 128, (2, 3, 20))
    targets[0, :4] = -100
    ref_loss, ref_grads = reference_loss_and_grads(model, idx, targets)
    lm = LMLoss(model, chunk=chunk)
    loss = lm(idx, targets)
    grads = torch.autograd.grad(loss * 3.0, list(model.parameters()))  # backward scales by the upstream grad
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, 3.0 * r, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # eval: the loss alone, no gradient work
        torch.testing.assert_close(lm(idx, targets), ref_loss)


def test_plain_loss_path_is_the_models_own_loss():
    """LMLoss(fused=False) (what --loss plain and auto under compile on CPU run): the loss and gradients of
    model(idx, targets), bit for bit, on sliced int32 inputs too."""
    model = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=1, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 128, (2, 3, 21))
    targets[1, -5:] = -100
    idx, targets = idx.int()[:, :-1], targets.int()[:, 1:]  # sliced, as notebook users pass them
    ref_loss, ref_grads = reference_loss_and_grads(model, idx, targets)
    loss = LMLoss(model, fused=False)(idx.long(), targets.long())
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for g, r in zip(torch.autograd.grad(loss, list(model.parameters())), ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [2**28, 1000])
def test_fused_loss_under_bf16_autocast(chunk):
    model = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=1, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 128, (2, 2, 16))
    targets[0, :5] = -100
    targets[1, -3:] = -100
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # reference in the same precision path: bf16 lm_head matmul
        ref_loss, ref_grads = reference_loss_and_grads(model, idx, targets)
        loss = LMLoss(model, chunk=chunk)(idx, targets)
    grads = torch.autograd.grad(loss, params)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    # Both paths round the same bf16 matmul outputs (logits, then (softmax - onehot) @ W and its transpose) and do
    # softmax in float32, so the loss differs only by float32 summation order (a few ulps: rtol 1e-6, where a
    # float32 head would be 1e-5 away). A gradient may differ by one bf16 rounding (2^-8) that a different
    # accumulation order flips; with chunks, lm_head's gradient sums per-chunk bf16 products where the reference
    # rounds the whole sum once: 2^-7 of the tensor's largest entry covers both.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=2**-8, atol=2**-7 * r.abs().max().item())


def test_fused_loss_reads_no_logit_by_index():
    """The target's logit comes from its own small matmul, not a gather from a chunk's logits: inductor fuses
    such gathers over all chunks into one kernel with int32 offsets, which overflow past 2^31 logits (docs/gpu.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=1, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 128, (2, 2, 16))
    x = model.transformer(idx).detach().flatten(0, 1)  # (32, 32)

    class IndexedReads(TorchDispatchMode):  # ops that read a tensor at positions given by another tensor
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.gather, torch.ops.aten.index, torch.ops.aten.take):
                self.seen.append((func.overloadpacket.__name__, tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))
    with IndexedReads() as reads:
        loss = linear_cross_entropy(x, model.lm_head.weight, targets.flatten(), chunk=1000)  # 7 rows per chunk
    logits_wide = [r for r in reads.seen if r[1][-1] == 128]  # a read from a (rows, vocab) tensor
    assert reads.seen and not logits_wide, reads.seen  # it does index the (vocab, C) weight, by target
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model.lm_head(x), targets.flatten()))


def test_fused_loss_compiles():
    """dynamo + AOT autograd trace the Function; inductor's codegen runs in test_train's compiled training."""
    model = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=1, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 128, (2, 2, 16))
    targets[0, :5] = -100
    ref_loss, ref_grads = reference_loss_and_grads(model, idx, targets)
    loss = torch.compile(LMLoss(model), backend="aot_eager")(idx, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_head_vocab_trains_like_the_full_head_on_k_plus_one_columns(fused):
    """HeadVocab: in training, the loss and every gradient equal the full head's for a model whose other rows
    are tied (the rest row's gradient = the sum over its copies), -100 included; eval uses the full head; the
    optimizer's hook keeps the rows tied after every step, with no call from the loop; no kept id's row is
    touched."""
    torch.manual_seed(0)
    V, ids = 96, torch.tensor([3, 5, 7, 8, 20, 41, 42, 60, 61, 95])
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    kept_before = model.lm_head.weight[ids].clone()
    optimizer = configure_optimizers(model, 0.1, 1e-2)
    head = HeadVocab.of(ids[torch.randperm(len(ids))], model.lm_head.weight, optimizer)  # any order
    lm = LMLoss(model, fused=fused, head=head, chunk=1000)  # the fused path in chunks
    rest = torch.tensor([i for i in range(V) if i not in ids])
    w = model.lm_head.weight
    assert torch.equal(w[rest], w[rest[:1]].expand(len(rest), -1))  # tied at once
    assert torch.equal(w[ids], kept_before)  # the ids training sees keep their own rows
    assert head.cols.tolist() == ids.tolist() + [rest[0].item()]
    idx = ids[torch.randint(0, len(ids), (2, 17))]
    targets = idx[:, 1:].clone()
    targets[1, 5] = -100
    params = list(model.parameters())
    loss = lm(idx[:, :-1], targets)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, params)))
    ref_loss, ref = reference_loss_and_grads(model, idx[:, :-1], targets)
    ref = dict(zip([n for n, _ in model.named_parameters()], ref))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        if name == "transformer.wte.weight":  # lm_head.weight, tied (named_parameters lists it once)
            r = ref[name].clone()
            r[rest[0]], r[rest[1:]] = r[rest].sum(0), 0  # the R copies' gradients land on the rest row
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=name)
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(idx[:, :-1], targets), ref_loss)  # eval: the full head
    lm.train()
    for _ in range(3):  # AdamW's eps makes the copies' updates differ slightly: the hook ties them again
        optimizer.zero_grad()
        lm(idx[:, :-1], targets).backward()
        optimizer.step()
        assert torch.equal(w[rest], w[rest[:1]].expand(len(rest), -1))
    assert HeadVocab.of(torch.arange(V - 1), w, optimizer) is None  # one id left out: nothing to share
