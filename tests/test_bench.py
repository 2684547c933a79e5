"""bench.py runs every benchmark end to end on tiny shapes (no timing is asserted: goals live in the README)."""
import argparse
import json
import subprocess
import sys

import pytest
import torch

import bench as bench_py
from conftest import ROOT
from model import GPT, GPTConfig


def bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_all_benchmarks_run_and_write_json(tmp_path):
    out = tmp_path / "new" / "bench.json"  # its directory is made
    r = bench("--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch", "2", "--seq_len", "32", "--steps", "1",
              "--new_tokens", "8", "--loader_batches", "2", "--docs", "50", "--repeats", "1", "--device", "cpu",
              "--dtype", "float32",  # auto picks bfloat16 on AVX512-BF16 CPUs, float32 on AVX2 ones
              "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert list(result) == ["train", "loss", "generate", "loader", "tokenize"]
    train = result["train"]
    other = {"fused": "plain", "plain": "fused"}[train["config"]["loss"]]  # the path --loss auto did not pick
    assert set(train["tokens_per_sec"]) == {"ours (as trained: compiled)", f"ours compiled, {other} loss", "ours eager",
                                            "ours eager, unfused loss", "HF sdpa eager", "HF sdpa compiled"}
    assert all(v > 0 for v in train["tokens_per_sec"].values()) and train["config"]["dtype"] == "float32"
    assert set(train["ratios"]) == {"ours_vs_hf_compiled", "ours_vs_hf_eager", "ours_eager_vs_hf_eager",
                                    "fused_vs_unfused_loss", "picked_vs_other_loss_compiled"}
    assert all(v >= 0 for v in train["peak_memory_bytes"].values())  # Linux: peak RSS over each row's step
    gen = result["generate"]
    assert set(gen["tokens_per_sec"]) == {"ours (KV cache)", "ours (recompute context)", "HF generate (cache)"}
    assert gen["greedy_tokens_agree_float32"] == {"cache_vs_recompute": True, "cache_vs_hf": True}
    assert result["loader"]["tokens_per_sec"] > 0 and result["tokenize"]["documents"] == 50
    assert set(result["tokenize"]["ratios"]) == {"ours_vs_nanogpt", "ours_vs_pool_every_core"}
    for line in ("train: 1L/2H/32", "ours (as trained: compiled) / HF sdpa compiled", "cache / recompute",
                 "greedy tokens in float32: cache == recompute: yes, cache == HF generate: yes",
                 "loader: ShardLoader B=64, T=1024", "ours / build-nanogpt"):
        assert line in r.stdout, r.stdout


def test_unknown_benchmark_is_one_line_exit_2():
    r = bench("trian")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == \
        ["error: unknown benchmark 'trian': expected any of train, loss, generate, loader, tokenize, quality"]


@pytest.mark.parametrize("args, message", [
    *[([flag, "0"], f"{flag}: must be positive, got 0") for flag in
      ("--repeats", "--loader_batches", "--docs", "--new_tokens", "--prompt_len", "--steps", "--batch")],
    (["train", "--n_head", "5"], "--n_head 5 does not divide --n_embd 384 (train)"),
    (["generate", "--new_tokens", "1020"], "--prompt_len 16 + --new_tokens 1020 is over 1024 positions"),
    (["--json", "{p}"], "--json {p}: is a directory, not a file"),
    (["--json", "{p}/file/bench.json"], "--json {p}/file/bench.json: {p}/file is a file, not a directory"),
])
def test_bad_flags_are_one_line_before_any_benchmark(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "file").write_text("x")
    ran = []
    for what in ("train", "loss", "generate", "loader", "tokenize"):
        monkeypatch.setattr(bench_py, f"bench_{what}", lambda *a, what=what: ran.append(what))
    with pytest.raises(SystemExit) as e:
        bench_py.main([a.format(p=tmp_path) for a in args] + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {message.format(p=tmp_path)}\n" and ran == []


def test_loss_benchmark_times_the_chunk_sizes_and_both_paths(tmp_path):
    """512 rows x 50304 logits: chunks of 2^24 make 2, every larger chunk (2^26, loss.LOGITS_CHUNK) one."""
    out = tmp_path / "bench.json"
    r = bench("loss", "--n_embd", "32", "--n_head", "2", "--batch", "2", "--seq_len", "256", "--repeats", "1",
              "--device", "cpu", "--dtype", "float32", "--json", str(out))
    assert r.returncode == 0, r.stderr
    loss = json.loads(out.read_text())["loss"]
    rows = [f"{kind} {how}, {what}" for how in ("compiled", "eager") for kind, what in
            [("fused", "1 chunk of 512 rows"), ("fused", "2 chunks of 256 rows"), ("plain", "full logits")]]
    assert sorted(loss["rows_per_sec"]) == sorted(rows) and all(v > 0 for v in loss["rows_per_sec"].values())
    assert loss["config"]["logits_chunk"] == 2**28 and loss["config"]["dtype"] == "float32"
    shares = loss["shares"]
    assert sorted(shares) == sorted(f"{k}_{how}" for k in ("default_chunk_vs_fastest_fused", "auto_vs_fastest")
                                    for how in ("compiled", "eager"))
    assert all(0 < v <= 1 for v in shares.values())
    for how, picked in (("compiled", "plain full logits"), ("eager", "fused 1 chunk of 512 rows")):  # the rule's
        rate = {k: v for k, v in loss["rows_per_sec"].items() if how in k}  # picks on CPU (runtime.pick_loss)
        row = f"{picked.split()[0]} {how}, {' '.join(picked.split()[1:])}"
        assert shares[f"auto_vs_fastest_{how}"] == pytest.approx(rate[row] / max(rate.values()))
    assert "loss: (512 x 32) @ (32 x 50304) + cross-entropy" in r.stdout
    assert "eager: the fused loss at 2^28 at " in r.stdout, r.stdout


def test_greedy_agreement_compares_ours_with_hf_even_at_endoftext():
    ours = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # every hidden state becomes ln_f's bias, whose best match is <|endoftext|>'s embedding
        ours.transformer.ln_f.weight.zero_()
        ours.transformer.ln_f.bias.normal_()
        ours.transformer.wte.weight[50256] = 10 * ours.transformer.ln_f.bias
    hf, idx = bench_py.same_weights_hf(ours).eval(), torch.randint(0, 50256, (2, 5))
    assert ours.generate(idx, 6, temperature=0)[:, 5:].eq(50256).all()  # HF must neither stop nor skip it
    assert bench_py.greedy_agreement(ours, hf, idx, 6) == {"cache_vs_recompute": True, "cache_vs_hf": True}
    with torch.no_grad():
        hf.transformer.ln_f.bias.neg_()  # HF's weights differ now: its tokens must too
    assert bench_py.greedy_agreement(ours, hf, idx, 6) == {"cache_vs_recompute": True, "cache_vs_hf": False}


def test_interleaved_leaves_out_a_row_that_runs_out_of_gpu_memory_while_timed(capsys):
    """On one H100 at GPT-2 124M, B=64, the plain-logits rows fit alone but not in turn with the others: a row
    that runs out of memory in a later round is reported and left out, and the other rows are still timed."""
    calls = {"big": 0, "small": 0}

    def big():
        calls["big"] += 1
        if calls["big"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.28 GiB")

    runs = {"big": big, "small": lambda: calls.__setitem__("small", calls["small"] + 1)}
    seconds = bench_py.interleaved(runs, repeats=3, skip_oom=True)
    assert list(seconds) == ["small"] and seconds["small"] >= 0 and calls == {"big": 2, "small": 3}
    assert list(runs) == ["big", "small"]  # the caller's dict is left alone
    assert "big: out of memory while timed; row skipped" in capsys.readouterr().out
    calls["big"] = 1  # without skip_oom (the other benchmarks, which need every row) the error goes on
    with pytest.raises(torch.cuda.OutOfMemoryError):
        bench_py.interleaved(runs, repeats=1)


def test_generate_checks_in_float32_then_times_in_the_dtype_asked(monkeypatch, capsys):
    dtypes, recompute = [], bench_py.greedy_recompute

    def spy(model, idx, n):  # the dtype each call of the recompute row runs in
        dtypes.append(next(model.parameters()).dtype)
        return recompute(model, idx, n)
    monkeypatch.setattr(bench_py, "greedy_recompute", spy)
    args = argparse.Namespace(n_layer=1, n_head=2, n_embd=32, gen_batch=2, prompt_len=4, new_tokens=6, repeats=2)
    result = bench_py.bench_generate(args, "cpu", "bfloat16")
    assert dtypes == [torch.float32] + [torch.bfloat16] * 3  # the check; then warm-up and 2 timed rounds
    assert result["config"]["dtype"] == "bfloat16" and all(v > 0 for v in result["tokens_per_sec"].values())
    assert result["greedy_tokens_agree_float32"] == {"cache_vs_recompute": True, "cache_vs_hf": True}
    assert "greedy tokens in float32: cache == recompute: yes, cache == HF generate: yes" in capsys.readouterr().out


def test_quality_trains_both_recipes_for_the_budget_and_scores_them_alike(tmp_path, shakespeare_dir):
    """bench.py quality on a tiny shape: both recipes run under --time_budget and are scored on the same
    val tokens; the baseline gets build-nanogpt's hyperparameters, ours the preset's."""
    from config import PRESETS
    out = tmp_path / "q.json"
    tiny = ("--compile false --n_layer 1 --n_head 1 --n_embd 32 --block_size 32 --seq_len 32 --batch_size 2 "
            "--total_batch_size 64 --val_steps 2 --eval_interval 4 --sample_interval 0")
    r = bench("quality", "--budget", "4", "--device", "cpu", "--dtype", "float32", "--data_dir", str(shakespeare_dir),
              "--train_args", tiny, "--json", str(out))
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["quality"]["runs"]
    ours, base = runs["ours (--preset shakespeare)"], runs["build-nanogpt's recipe"]
    assert (base["config"]["max_lr"], base["config"]["min_lr"], base["config"]["warmup_steps"]) == (1e-3, 1e-4, 10)
    assert (base["config"]["beta1"], base["config"]["beta2"], base["config"]["init_std"]) == (0.9, 0.95, 0.02)
    for key in ("max_lr", "warmup_steps", "beta2", "init_std"):
        assert ours["config"][key] == PRESETS["shakespeare"][key], key
    for run in (ours, base):
        assert run["config"]["time_budget"] == 4 and run["config"]["n_embd"] == 32
        assert run["steps"] >= 6 and run["tokens"] == run["steps"] * 64  # the budget is spent by the timed steps
        assert 5 < run["val_loss"] < 11.5 and run["done"].startswith("done: steps 0-")
        assert run["budget"].startswith("--time_budget 4 s: max_steps ") and run["budget"] in r.stdout
    assert "ours - build-nanogpt's recipe" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget: must be positive"),
    (["--train_args", "--max_lr nope"], "quality: ours (--preset shakespeare): train_gpt2.py exited 2: error: argument --max_lr"),
])
def test_quality_bad_input_is_one_line(args, message):
    r = bench("quality", "--device", "cpu", "--dtype", "float32", *args)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
