"""--dtype float16 (GPUs without bf16: T4, V100, Colab's free tier): autocast float16 with a loss scaler.

Runs on CPU, where torch 2.13 has float16 autocast and GradScaler("cpu"). CPUs without float16 matmul units
run float16 matmuls 8x (the fused loss) to 30x (a 256^3 matmul) slower than float32 (measured on the 2-core
test machine), so the runs are tiny (2 layers, 64 wide) and, but for the Shakespeare run, use a 256-token
vocabulary on synthetic shards.

One tolerance serves the float16-vs-float32 comparisons: TOL = 2^-8, bfloat16's unit roundoff, as a norm-wise
relative error per tensor. float16 carries 11 significant bits (unit roundoff 2^-11); on these paths each value
is rounded a few times (a matmul's operands and output, the logits before softmax) and the sums run in float32,
so the errors stay at a few 2^-11: measured 4e-4 to 8e-4 through the whole model and 6e-4 to 1e-3 for the fused
loss. 2^-8 leaves 4x room for other CPUs' kernels, and every failure it is meant to catch lands well past it:
no loss scaling (underflow) 3e-2, a naive float16 loss gradient 1e-2 to 6e-2, bfloat16 itself 5e-3 to 8e-3.
"""
import functools
import json
import os

import numpy as np
import pytest
import torch

import runtime
import train_gpt2
from conftest import spy_on_the_step, write_syn_shards
from loss import LinearCrossEntropy
from test_train import TINY, metrics, one_error, rel_err, train_capturing_grads, train_main

TOL = 2**-8


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    """Random token ids < 256: one train shard of 20,000 tokens, one val shard of 2,000."""
    return write_syn_shards(tmp_path_factory.mktemp("syn16"), (20000,), 2000)


def syn(data_dir, out_dir, *extra, dtype="float16"):
    """2 layers, 64 wide, vocab 256; 2 micro steps of 8 x 128 tokens per step (the scale applies per micro step).
    The loss path is fixed: runs compared bit for bit would each time their own pick (auto), which a busy machine
    can tip either way."""
    return ["--loss", "fused", "--vocab_size", 256, "--n_layer", 2, "--n_head", 2, "--n_embd", 64, "--block_size", 128,
            "--seq_len", 128,
            "--batch_size", 8, "--total_batch_size", 2048, "--max_lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", 2,
            "--val_steps", 1, "--eval_interval", 100, "--compile", "false", "--device", "cpu", "--sample_interval", 0,
            "--hellaswag_interval", 0, "--dtype", dtype, "--data_dir", data_dir, "--out_dir", out_dir, *extra]


def scaler_starting_at(monkeypatch, init_scale):
    """The trainer's loss scaler starts at init_scale instead of 2^16 (2^24 makes float16 gradients overflow)."""
    monkeypatch.setattr(train_gpt2, "make_scaler", functools.partial(runtime.make_scaler, init_scale=init_scale))


def events(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [e for e in map(json.loads, f) if "train_loss" in e]


# ----- 1. float16 trains, and reads nothing back before the optimizer step -----

def test_float16_training_lowers_the_loss_without_a_host_sync_in_the_step(tmp_path, shakespeare_dir, capsys,
                                                                          monkeypatch):
    """Real text, GPT-2's padded vocabulary: the loss falls, every step is finite and none overflows at the
    default scale. The scaler's calls (scale, unscale_, step, update) read nothing back before optimizer.step
    (the fused AdamW skips an overflowed step on the device), as test_train checks for float32."""
    events_ = []
    spy_on_the_step(monkeypatch, train_gpt2, events_)
    out = tmp_path / "out"
    args = [a for a in TINY if a not in ("--dtype", "float32")] + [
        "--dtype", "float16", "--seq_len", 32, "--batch_size", 4, "--total_batch_size", 128, "--warmup_steps", 2,
        "--max_steps", 6, "--eval_interval", 5, "--val_steps", 2, "--data_dir", shakespeare_dir, "--out_dir", out,
        "--device", "cpu", "--compile", "false"]
    code, text, err = train_main(args, capsys)
    assert code == 0, err
    assert "dtype float16" in text and "fp16 overflow" not in text
    steps = events(out)
    assert [e["step"] for e in steps] == list(range(6))
    assert all(np.isfinite(e["train_loss"]) and np.isfinite(e["norm"]) and e["loss_scale"] == 2.0**16 and
               "skipped" not in e for e in steps), steps
    losses = [e["train_loss"] for e in steps]
    assert losses[0] > 10.5 and losses[-1] < losses[0] - 0.5, losses  # from ln(50304), clearly down
    val = metrics(out, "val_loss")
    assert [s for s, _ in val] == [0, 5] and val[1][1] < val[0][1] - 0.2, val
    assert events_.count("step") == 6
    for i, e in enumerate(events_):
        if e == "zero_grad":
            assert events_[i + 1:events_.index("step", i)].count("item") == 0, events_


# ----- 2. the gradients AdamW gets under float16 are float32's -----

def test_float16_gradients_after_unscaling_match_float32(tmp_path, syn_dir, capsys, monkeypatch):
    """Step 0 from the same weights on the same 2 x 1,024 tokens: the gradients AdamW consumes (unscaled, then
    clipped at --grad_clip 1.0) in float16 against float32, tensor by tensor, within TOL (see the top). At 1,024
    tokens per micro step the gradients inside the network are ~1e-6 to 1e-5, float16's subnormal range (below
    6.1e-5): without the loss scale they lose digits (3e-2 measured), scaled by 2^16 they keep them."""
    init32, ref, _ = train_capturing_grads(syn(syn_dir, tmp_path / "f32", "--max_steps", 1, dtype="float32"), capsys,
                                           monkeypatch)
    init16, got, text = train_capturing_grads(syn(syn_dir, tmp_path / "f16", "--max_steps", 1), capsys, monkeypatch)
    assert "dtype float16" in text and "grad accum 2" in text
    assert all(torch.equal(init16[k], init32[k]) for k in init32)
    errors = {name: rel_err(got[0][name], ref[0][name]) for name in ref[0]}
    assert max(errors.values()) < TOL, errors
    assert metrics(tmp_path / "f16", "norm")[0][1] == pytest.approx(metrics(tmp_path / "f32", "norm")[0][1], rel=TOL)


# ----- 3. an overflowed step is skipped, logged, and not taken for divergence -----

def test_overflow_step_is_skipped_logged_and_training_goes_on(tmp_path, syn_dir, capsys, monkeypatch):
    """A loss scale of 2^24 makes step 0's float16 gradients overflow (here they do from ~2^21 on): the scaler
    skips it (the weights and AdamW's state stay as they were), halves the scale, the trainer prints and logs it
    and goes on; the scale keeps halving until the gradients fit, and from then on the steps update the weights."""
    scaler_starting_at(monkeypatch, 2.0**24)
    snapshots, real_configure = [], train_gpt2.configure_optimizers

    def configure(model, *a, **kw):  # the weights and AdamW's state (m, v, step count) around each optimizer step
        opt = real_configure(model, *a, **kw)
        real_step = opt.step

        def state():
            adam = [t for st in opt.state.values() for t in st.values()]
            return {**model.state_dict(), **{f"adam{i}": t for i, t in enumerate(adam)}}

        def step(*sa, **skw):
            before = {k: v.clone() for k, v in state().items()}
            out = real_step(*sa, **skw)
            snapshots.append((before, {k: v.clone() for k, v in state().items()}))
            return out
        opt.step = step
        return opt
    monkeypatch.setattr(train_gpt2, "configure_optimizers", configure)
    out = tmp_path / "out"
    code, text, err = train_main(syn(syn_dir, out, "--max_steps", 8), capsys)
    assert code == 0, err
    steps = events(out)
    skipped = [e.get("skipped", False) for e in steps]
    assert skipped[0] and not skipped[-1], steps  # overflows at first, fits by the end
    scale = 2.0**24
    for e, (before, after) in zip(steps, snapshots):
        # AdamW makes its state at its first step: on a skipped one it must stay zero (m, v, and the step count)
        unchanged = all(torch.equal(before[k], after[k]) if k in before else not after[k].any() for k in after)
        if e.get("skipped"):
            scale /= 2
            assert unchanged and "norm" not in e, e
            assert f"step {e['step']:5d} | fp16 overflow: update skipped, loss scale -> {scale:g}" in text
        else:
            assert not unchanged and np.isfinite(e["norm"]), e
        assert e["loss_scale"] == scale and np.isfinite(e["train_loss"]), (e, scale)
    assert text.count("fp16 overflow") == sum(skipped) and len(snapshots) == 8


def test_loss_scale_below_one_stops_the_run(tmp_path, syn_dir, capsys, monkeypatch):
    """Gradients that overflow at every scale (here: made inf) halve the scale step after step; below 1 the
    run stops in one line, as a diverged one does, naming the float16 way out."""
    scaler_starting_at(monkeypatch, 4.0)
    real_build = train_gpt2.build_model

    def build(cfg, ckpt=None):
        model = real_build(cfg, ckpt)
        model.transformer.wpe.weight.register_hook(lambda g: g * float("inf"))
        return model
    monkeypatch.setattr(train_gpt2, "build_model", build)
    out = tmp_path / "out"
    code, text, err = train_main(syn(syn_dir, out, "--max_steps", 8, "--ckpt_interval", 1), capsys)
    one_error(code, err, "step 2:", "loss scale 0.5", "training diverged", "use --dtype bfloat16 or float32",
              f"newest checkpoint: {out / 'ckpt_000002'}")
    assert [e.get("skipped") for e in events(out)] == [True, True]  # step 2 stopped before it was logged


# ----- 4. the fused loss's gradient survives float16 -----

def naive_float16_grads(x, w, targets, rows):
    """The fused loss's gradients as they were before float16: (softmax - onehot) / n cast to float16, then
    multiplied. float16 roundings written out on float32 kernels (a float16 matmul rounds its operands and its
    output the same way and sums in float32; checked here against torch's float16 matmul: the same errors to 4
    digits), since this CPU runs float16 matmuls ~10x slower."""
    h = lambda a: a.half().float()  # noqa: E731 (round to float16)
    xh, wh = h(x), h(w)
    grad_x, grad_w = torch.empty_like(x), torch.zeros_like(w)
    for i in range(0, x.size(0), rows):
        s = slice(i, i + rows)
        g = h(xh[s] @ wh.t()).softmax(dim=-1)  # (n, V)
        g[torch.arange(g.size(0)), targets[s]] -= 1
        g = h(g / x.size(0))  # most entries fall below float16's 6e-8 here and become 0
        grad_x[s] = h(g @ wh)
        grad_w += h(g.t() @ xh[s])
    return grad_x, grad_w


def test_fused_loss_gradients_are_exact_under_float16(monkeypatch):
    """2 x 1,024 tokens, GPT-2's padded vocab, C = 8. x and W are N(0, 1), so the logits (std 2.8) give a peaked
    softmax with a long tail, as a trained model's, and the targets are drawn from it (loss ~7). The gradient
    (softmax - onehot) / n is ~1e-8 for most of the vocabulary, under float16's smallest number (6e-8): the
    fused loss multiplies by (softmax - onehot), within [-1, 1], and divides by n in float32 afterwards. Its
    gradients match float32 within TOL; the naive order (divide, cast, multiply) does not."""
    N, V, C = 2048, 50304, 8
    x, w = torch.randn(N, C), torch.randn(V, C)
    with torch.no_grad():
        targets = torch.cat([torch.multinomial((x[i:i + 256] @ w.t()).softmax(-1), 1)[:, 0] for i in range(0, N, 256)])

    def grads(dtype):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = LinearCrossEntropy.apply(xr, wr, targets, dtype, True, None, 2**24)
        loss.backward()
        return loss, xr.grad, wr.grad
    ref_loss, ref_x, ref_w = grads(torch.float32)
    loss, grad_x, grad_w = grads(torch.float16)
    assert 5 < ref_loss.item() < 9 and grad_x.dtype == grad_w.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=0)
    assert rel_err(grad_x, ref_x) < TOL and rel_err(grad_w, ref_w) < TOL, \
        (rel_err(grad_x, ref_x), rel_err(grad_w, ref_w))
    naive_x, naive_w = naive_float16_grads(x, w, targets, rows=333)
    assert rel_err(naive_x, ref_x) > 2 * TOL and rel_err(naive_w, ref_w) > 2 * TOL, \
        (rel_err(naive_x, ref_x), rel_err(naive_w, ref_w))


# ----- 5. resuming keeps the scaler -----

def test_float16_resume_is_exact_with_the_scalers_state(tmp_path, syn_dir, capsys, monkeypatch):
    """8 steps straight vs 2 + 6 resumed, dropout and shuffling on. Starting at a scale of 2^22, steps 0 and 1
    overflow (skipped, scale 2^20 by the checkpoint): a resumed run that forgot the scaler would start again at
    2^22 and skip step 2 as well. Losses, scales and skips match bit for bit, and so do the final weights."""
    scaler_starting_at(monkeypatch, 2.0**22)
    a, b = tmp_path / "a", tmp_path / "b"
    exact = ["--dropout", "0.1", "--shuffle", "true", "--max_steps", 8, "--ckpt_interval", 2]
    assert train_main(syn(syn_dir, a, *exact), capsys)[0] == 0
    assert train_main(syn(syn_dir, b, *exact, "--run_steps", 2), capsys)[0] == 0
    state = torch.load(b / "ckpt_000002" / "trainer.pt", weights_only=True)["scaler"]
    assert state["scale"] == 2.0**20 and state["_growth_tracker"] == 0, state
    code, text, err = train_main(syn(syn_dir, b, *exact, "--resume", "auto"), capsys)
    assert code == 0 and f"resumed from {b / 'ckpt_000002'} at step 2" in text, err
    ea, eb = events(a), events(b)
    assert [e.get("skipped", False) for e in ea][:3] == [True, True, False]
    keys = ("step", "train_loss", "loss_scale", "skipped", "norm")
    assert [[e.get(k) for k in keys] for e in eb] == [[e.get(k) for k in keys] for e in ea]
    assert metrics(b, "val_loss") == metrics(a, "val_loss")
    from safetensors.torch import load_file
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(d / "ckpt_000008" / "trainer.pt", weights_only=True)["scaler"] for d in (a, b))
    assert sa == sb and sa["_growth_tracker"] == 6, sa  # 6 clean steps since the last overflow


# ----- 6. --dtype auto, and float16 where it cannot work -----

@pytest.mark.parametrize("gpu, native_bf16, expected", [
    ("T4 / V100 / Colab free tier (sm_75, sm_70): bf16 only emulated", False, "float16"),
    ("A100 / H100 / L4 (sm_80 on)", True, "bfloat16"),
])
def test_auto_picks_float16_on_a_cuda_gpu_without_bf16(monkeypatch, gpu, native_bf16, expected):
    """torch.cuda.is_bf16_supported() says True on a T4 unless asked about the hardware alone (it counts
    emulation): the stub answers as such a GPU would. CPU choices are unchanged (test_runtime checks them)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native_bf16)
    assert runtime.pick_dtype("auto", "cuda")[0] == runtime.pick_dtype("auto", "cuda:1")[0] == expected, gpu
    assert (runtime.pick_dtype("float16", "cuda")[0] == "float16"
            and runtime.pick_dtype("bfloat16", "cuda")[0] == "bfloat16")


def test_float16_where_autocast_cannot_do_it_is_one_line(tmp_path, syn_dir, capsys, monkeypatch):
    """A torch or device without float16 autocast (autocast warns and turns itself off): refused before any
    data is read, naming the flag and the way out."""
    real = runtime.make_autocast
    monkeypatch.setattr(runtime, "make_autocast", lambda dtype, device: real("float32", device))
    code, _, err = train_main(syn(syn_dir, tmp_path / "out", "--max_steps", 1), capsys)
    one_error(code, err, "--dtype float16: float16 autocast with loss scaling does not work on cpu",
              "use --dtype bfloat16 or float32")
    assert not (tmp_path / "out").exists()
