"""bench.py runs every benchmark end to end on tiny shapes (no timing is asserted: goals live in the README)."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

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
                                            "ours eager, unfused loss", "HF sdpa eager", "HF sdpa compiled",
                                            "ours compiled, activation checkpointing",
                                            "ours compiled, deterministic off"}  # on CPU the trainer's is on
    assert all(v > 0 for v in train["tokens_per_sec"].values()) and train["config"]["dtype"] == "float32"
    assert set(train["ratios"]) == {"ours_vs_hf_compiled", "ours_vs_hf_eager", "ours_eager_vs_hf_eager",
                                    "fused_vs_unfused_loss", "picked_vs_other_loss_compiled",
                                    "checkpointing_vs_as_trained", "as_trained_vs_other_determinism"}
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
        ["error: unknown benchmark 'trian': expected any of train, loss, generate, loader, tokenize, quality, gpu"]


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
              "--val_batches", "1", "--train_args", tiny, "--json", str(out))
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
    (["--val_batches", "0"], "--val_batches: must be positive"),
    (["--train_args", "--max_lr nope"],
     "quality: ours (--preset shakespeare): train_gpt2.py exited 2: error: argument --max_lr"),
])
def test_quality_bad_input_is_one_line(args, message):
    r = bench("quality", "--device", "cpu", "--dtype", "float32", *args)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr


# ----- bench.py gpu: the GPU checklist -----

def test_gpu_checklist_smoke_runs_every_row_and_writes_json_and_table(tmp_path):
    """`bench.py gpu --smoke` runs every row of the checklist at tiny shapes on CPU, so that it cannot rot between
    GPUs: each row has its numbers, the JSON and the table are written, the logs beside them."""
    out = tmp_path / "gpu.json"
    r = bench("gpu", "--smoke", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    gpu = json.loads(out.read_text())["gpu"]
    rows, keys = gpu["rows"], list(bench_py.checklist("WORK", smoke=True))
    assert list(rows) == keys == ["124m", "124m-plain", "124m-ac", "xl", "ddp", "sample-eager", "sample-compiled",
                                  "bench-train"]
    for key, row in rows.items():
        assert row["ok"], (key, row.get("error"))
        assert row["tokens_per_sec"] > 0 and row["peak_memory_bytes"] > 0 and row["mfu"] is None, key  # no GPU peak
    for key in ("124m", "124m-plain", "124m-ac", "ddp", "xl"):
        row = rows[key]
        assert row["dtype"] == "float32" and row["step_ms"] > 0 and row["compile_s"] is None, key  # compile off
        assert row["graph_breaks"] == row["recompiles"] == 0 and row["ckpt_s"] and min(row["ckpt_s"]) > 0, key
    assert rows["124m"]["steps"] == 4 and len(rows["124m"]["ckpt_s"]) == 2  # checkpoints at steps 2 and 4
    assert (rows["124m"]["loss"], rows["124m-plain"]["loss"]) == ("fused", "plain")  # auto on CPU, eager: fused
    assert rows["xl"]["shape"].startswith("3L/96") and rows["ddp"]["command"].startswith("torchrun --standalone")
    for key in ("124m-plain", "124m-ac", "ddp"):
        assert rows[key]["vs_124m"]["tokens_per_sec"] > 0 and rows[key]["vs_124m"]["peak_memory"] > 0
    for key in ("sample-eager", "sample-compiled"):
        assert rows[key]["tokens"] == 8 and 0 < rows[key]["ttft_s"] < rows[key]["wall_s"]
    assert set(rows["bench-train"]["ratios"]) >= {"ours_vs_hf_compiled", "ours_vs_hf_eager"}
    h = gpu["header"]
    assert h["smoke"] and h["torch"] == torch.__version__ and h["rows_ok"] == h["rows"] == 8
    assert h["command"] == f"python bench.py gpu --smoke --json {out}" and h["device"].startswith("CPU")
    table = (tmp_path / "gpu.md").read_text()
    assert f"torch {torch.__version__}, {h['date']} (--smoke" in table and f"`{h['command']}`" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 9 and [line.split(":")[0][2:] for line in lines[1:]] == keys
    assert all(line.count(" | ") == 5 and "error" not in line for line in lines[1:])
    assert "| 124m: GPT-2 124M trainer" in r.stdout and "- xl: `python train_gpt2.py --preset gpt2-xl" in table
    logs = (tmp_path / "gpu-logs.txt").read_text()  # every row's output, in one file beside the JSON
    assert logs.count("===== ") == 16 and logs.count("done: steps 0-3") == 1


def test_gpu_checklist_reports_a_broken_row_in_one_line_and_runs_the_others(tmp_path):
    """A row that fails (here a bad flag, under torchrun) is its one error line in the JSON and the table; the other
    rows still run; the exit code says that a row failed."""
    out, table = tmp_path / "gpu.json", tmp_path / "t" / "table.md"
    r = bench("gpu", "--smoke", "--rows", "ddp,sample-eager", "--row_args", "ddp=--max_lr nope", "--json", str(out),
              "--table", str(table))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "gpu: 1 row failed: ddp", r.stderr
    rows = json.loads(out.read_text())["gpu"]["rows"]
    assert list(rows) == ["ddp", "sample-eager"] and rows["sample-eager"]["ok"]
    assert rows["ddp"]["ok"] is False
    assert rows["ddp"]["error"] == "error: argument --max_lr: invalid float value: 'nope'"
    assert rows["ddp"]["command"].endswith("--out_dir WORK/ddp --max_lr nope")
    ddp = next(line for line in table.read_text().splitlines() if line.startswith("| ddp:"))
    assert ddp.endswith("|  |  |  |  | error: argument --max_lr: invalid float value: 'nope' |")


def test_gpu_checklist_needs_the_tokenizer_file_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from data.tokenizer import vocab_path
    real = vocab_path()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(bench_py, "TOKENIZER_COPY", str(tmp_path / "copy"))
    monkeypatch.setattr(bench_py, "prepare_inputs", lambda *a: pytest.fail("nothing may run without the tokenizer"))
    with pytest.raises(SystemExit) as e:
        bench_py.main(["gpu", "--smoke"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: gpu: GPT-2's tokenizer file")
    assert f"nor {tmp_path}/copy/" in err and "TIKTOKEN_CACHE_DIR=data/cache/tiktoken python data/tokenizer.py" in err
    (tmp_path / "copy").mkdir()
    shutil.copy(real, tmp_path / "copy")  # a copy carried in data/cache/tiktoken is found, and the rows get its dir
    assert bench_py.find_tokenizer() == str(tmp_path / "copy")


@pytest.mark.parametrize("args, message", [
    (["gpu", "train", "--smoke"], "gpu runs alone (its rows include bench.py train), got: gpu train"),
    (["gpu"], f"gpu: no CUDA device here (torch {torch.__version__}); --smoke runs every row at tiny shapes on CPU"),
    (["gpu", "--smoke", "--rows", "124m,nope"], "gpu: no row 'nope'; the rows are 124m, 124m-plain, 124m-ac, xl, ddp, "
                                                "sample-eager, sample-compiled, bench-train"),
    (["gpu", "--smoke", "--row_args", "xl"], "--row_args 'xl': expected KEY=ARGS, e.g. 'xl=--batch_size 2'"),
    (["gpu", "--smoke", "--rows", "124m", "--row_args", "xl=--batch_size 2"],
     "--row_args xl=...: row xl is not in --rows 124m"),
    (["gpu", "--smoke", "--time_limit", "0"], "--time_limit: must be positive, got 0.0"),
    (["gpu", "--smoke", "--table", "{p}"], "--table {p}: is a directory, not a file"),
])
def test_gpu_bad_flags_are_one_line_before_any_row(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_py, "bench_gpu", lambda *a: pytest.fail("no row may run"))
    with pytest.raises(SystemExit) as e:
        bench_py.main([a.format(p=tmp_path) for a in args])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message.format(p=tmp_path)}\n"


def test_gpu_checklist_on_the_gpu_passes_each_script_the_flags_it_takes():
    """The GPU's rows run only on a GPU: their flags are parsed here by the scripts' own parsers, so that a renamed
    flag shows on CPU. Row 1 is the default recipe: GPT-2 124M, B=64, T=1024, 524,288 tokens per step, compile."""
    import sample
    from config import parse_args
    rows = bench_py.checklist("/w", smoke=False)
    cfg = {k: parse_args(r.shown[r.shown.index("train_gpt2.py") + 1:])[0] for k, r in rows.items() if r.kind == "train"}
    first = cfg["124m"]
    assert (first.n_layer, first.n_embd, first.batch_size, first.seq_len, first.total_batch_size) == \
        (12, 768, 64, 1024, 524288)
    assert (first.device, first.dtype, first.compile, first.loss, first.max_steps) == ("cuda", "auto", True, "auto", 20)
    assert (first.hellaswag_interval, first.hellaswag_path, first.sample_interval, first.ckpt_interval) == \
        (10, "/w/hellaswag.jsonl", 10, 10)
    assert cfg["124m-plain"].loss == "plain" and cfg["124m-ac"].activation_checkpointing is True
    assert rows["ddp"].cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    assert rows["ddp"].shown[:3] == ["torchrun", "--standalone", "--nproc_per_node=1"] and cfg["ddp"].max_steps == 5
    xl = cfg["xl"]
    assert (xl.preset, xl.n_layer, xl.n_embd, xl.batch_size, xl.max_steps) == ("gpt2-xl", 48, 1600, 4, 3)
    for key, compile in (("sample-eager", False), ("sample-compiled", True)):
        args = sample.parse_args(rows[key].shown[2:])
        assert (args.compile, args.device, args.max_new_tokens) == (compile, "cuda", 256)
        assert args.init_from == "/w/sample-model"
    args = bench_py.parse_args(rows["bench-train"].shown[2:])
    assert (args.what, args.device, args.batch, args.compile, args.json) == (["train"], "cuda", 16, True,
                                                                              "/w/bench-train.json")
    for row in rows.values():  # under the probe (but bench.py train, which writes its own JSON)
        assert row.kind == "bench" or "import bench; bench.probe()" in row.cmd


def test_gpu_rows_left_when_the_time_limit_is_spent_are_reported_as_not_run(tmp_path, monkeypatch):
    def fake_row(row, env, limit, work, logs):
        time.sleep(1.5)
        return {"name": row.name, "command": "x", "wall_s": 1.5, "ok": True, "tokens_per_sec": 10.0, "mfu": 0.4,
                "mfu_llmc": 0.42, "peak_memory_bytes": 3 * 2**30}
    monkeypatch.setattr(bench_py, "prepare_inputs", lambda *a: None)
    monkeypatch.setattr(bench_py, "gpu_row", fake_row)
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as e:
        bench_py.main(["gpu", "--smoke", "--rows", "124m,xl,bench-train", "--time_limit", "31", "--json", str(out)])
    rows = json.loads(out.read_text())["gpu"]["rows"]
    assert e.value.code == 1 and rows["124m"]["ok"] and list(rows) == ["124m", "xl", "bench-train"]
    for key in ("xl", "bench-train"):  # the first row took 1.5 of 31 s: the 30 s a row needs to start are gone
        assert rows[key]["ok"] is False
        assert re.fullmatch(r"error: not run: 2\d s of --time_limit 31 s left, and it takes about 30 s",
                            rows[key]["error"])
    table = (tmp_path / "gpu.md").read_text()
    assert "| 124m: GPT-2 124M trainer (default preset): val, HellaSwag, samples, checkpoints | 10 | 40.0% | 42.0% | " \
           "3.0 GiB |  |" in table
    assert f"| xl: gpt2-xl trainer |  |  |  |  | {rows['xl']['error']} |" in table


def test_gpu_row_errors_and_compile_events_are_read_from_stderr():
    torchrun = "[rank0]: x\nerror: argument --max_lr: invalid float value: 'nope'\nE1206 failed\n" \
               "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n============\n"
    assert bench_py.error_line(1, torchrun) == "error: argument --max_lr: invalid float value: 'nope'"
    assert bench_py.error_line(1, "Traceback:\n  ...\nRuntimeError: CUDA error: out of memory\n\n") == \
        "error: exit 1: RuntimeError: CUDA error: out of memory"
    assert bench_py.error_line(-9, "") == "error: exit -9: (no output)"
    log = ("V1206 22:08:24.850000 17080 torch/_dynamo/symbolic_convert.py:5124] [0/0] [__graph_breaks] Graph break in "
           "user code at /tmp/tl.py:5\n"
           "V1206 22:08:24.850000 17080 torch/_dynamo/symbolic_convert.py:5124] [0/0] [__graph_breaks] Graph Break "
           "Reason: Encountered graph break when attempting to trace CALL\n"
           "V1206 22:08:32.086000 17080 torch/_dynamo/guards.py:5396] [0/1] [__recompiles] Recompiling function f in "
           "/tmp/tl.py:2\n"
           "V1206 22:08:32.086000 17080 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     triggered by the "
           "following guard failure(s):\n")
    assert bench_py.compile_events(log) == {"graph_breaks": 1, "recompiles": 1, "first_events": [
        "Graph break in user code at /tmp/tl.py:5", "Recompiling function f in /tmp/tl.py:2"]}


def test_a_row_past_its_time_is_killed_with_its_children():
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            "print(p.pid, flush=True)\ntime.sleep(60)\n")
    t0 = time.time()
    rc, out, err, wall = bench_py.run_row([sys.executable, "-c", code], dict(os.environ), 3)
    assert rc is None and time.time() - t0 < 30 and bench_py.error_line(rc, err).startswith("error: killed after 3 s")
    child = int(out.split()[0])
    for _ in range(50):  # the orphan is reaped by init once killed
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} of the killed row still runs")
