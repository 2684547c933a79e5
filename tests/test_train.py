"""train_gpt2.py: the CLI, the schedule, short real trainings, compile, and DDP on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from config import PRESETS, TrainConfig, parse_args
from conftest import ROOT, spy_on_the_step, train_here
from model import GPT
from optim import get_lr

# A tiny model on the real Shakespeare shards: 512 tokens per step, fast on 2 cores.
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--seq_len", "64",
        "--batch_size", "4", "--total_batch_size", "512", "--max_lr", "3e-3", "--min_lr", "3e-4",
        "--warmup_steps", "5", "--val_steps", "4", "--dtype", "float32", "--hellaswag_interval", "0",
        "--sample_interval", "0", "--loss", "fused"]  # fixed: runs compared would each measure (auto) for themselves


def run(args, **kw):
    return subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def metrics(out_dir, key):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(e["step"], e[key]) for e in map(json.loads, f) if key in e]


def test_flags_presets_and_overrides():
    cfg, _ = parse_args([])
    assert cfg == TrainConfig()  # gpt2-124m: build-nanogpt's recipe
    assert (cfg.total_batch_size, cfg.batch_size, cfg.seq_len, cfg.max_lr, cfg.min_lr, cfg.warmup_steps,
            cfg.max_steps, cfg.weight_decay, cfg.grad_clip, cfg.vocab_size, cfg.eval_interval) == \
        (524288, 64, 1024, 6e-4, 6e-5, 715, 19073, 0.1, 1.0, 50304, 250)
    cfg, given = parse_args(["--preset", "shakespeare", "--max_steps=7", "--compile", "false", "--max_lr", "5e-4"])
    assert (cfg.max_steps, cfg.compile, cfg.max_lr) == (7, False, 5e-4)
    assert given == {"preset", "max_steps", "compile", "max_lr"} and not hasattr(cfg, "given")  # kept beside cfg
    assert cfg.n_embd == PRESETS["shakespeare"]["n_embd"] and cfg.data_dir == "data/shards/shakespeare"
    assert parse_args(["--preset=gpt2-xl"])[0].n_layer == 48


def test_help_lists_every_field_with_its_default():
    out = run(["--help"]).stdout
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in out
    assert "default: 524288" in out and "shakespeare" in out
    assert "one of auto, bfloat16, float16, float32" in " ".join(out.split())  # --dtype's values (help wraps lines)


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "--preset: unknown preset 'nope'"),
    (["--max_lr", "-1"], "--max_lr: must not be negative"),
    (["--total_batch_size", "1000", "--batch_size", "4", "--seq_len", "64"],
     "not divisible by batch_size*seq_len*world_size"),
    (["--compile", "maybe"], "expected true or false"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--dtype", "fp8"], "--dtype: expected auto, bfloat16, float16 or float32, got 'fp8'"),
    (["--seq_len", "2048"], "--seq_len 2048 is longer than --block_size 1024"),
    (["--init_from", "gpt5"], "--init_from: 'gpt5'"),
    (["--loss", "fast"], "--loss: expected auto, fused or plain, got 'fast'"),
    (["--time_budget", "nan"], "--time_budget: must be a finite number"),
])
def test_bad_values_exit_2_with_one_line(args, message, capsys):
    import train_gpt2
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(args + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_a_bad_value_is_one_line_and_exit_2_from_the_shell():
    r = run(["--loss", "fast", "--device", "cpu"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: --loss: expected auto, fused or plain, got 'fast'", r.stderr


def test_missing_shards_name_the_prepare_command(tmp_path):
    r = run(["--data_dir", str(tmp_path / "nothing"), "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "python data/fineweb.py" in r.stderr and str(tmp_path / "nothing") in r.stderr


def test_bad_shard_is_named(tmp_path, shakespeare_dir):
    import shutil
    shutil.copytree(shakespeare_dir, tmp_path / "d")
    with open(tmp_path / "d" / "shakespeare_train_000001.npy", "r+b") as f:
        f.truncate(1000)
    r = run(TINY + ["--data_dir", str(tmp_path / "d"), "--device", "cpu", "--max_steps", "1", "--compile", "false",
                    "--out_dir", str(tmp_path / "out")])
    assert r.returncode == 2 and "shakespeare_train_000001.npy: cannot read shard" in r.stderr


def test_lr_schedule():
    def lr(step):
        return get_lr(step, max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0) and lr(55) == pytest.approx(0.55)
    assert lr(100) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory, shakespeare_dir):
    """30 steps on the Shakespeare shards from one seed, with the full head and with --head_vocab train:
    {head: (out_dir, stdout)}."""
    runs = {}
    for head in ("full", "train"):
        out = str(tmp_path_factory.mktemp(head) / "out")
        r = run(TINY + ["--data_dir", shakespeare_dir, "--out_dir", out, "--max_steps", "30", "--eval_interval", "10",
                        "--compile", "false", "--device", "cpu", "--head_vocab", head], timeout=300)
        assert r.returncode == 0, r.stderr
        runs[head] = (out, r.stdout)
    return runs


def test_short_shakespeare_training_lowers_val_loss(head_runs):
    out, stdout = head_runs["full"]
    val = metrics(out, "val_loss")
    assert [s for s, _ in val] == [0, 10, 20, 29]
    assert val[0][1] > 10.5 and val[-1][1] < val[0][1] - 2.0, val  # from ln(50304) clearly down
    train = metrics(out, "train_loss")
    assert [s for s, _ in train] == list(range(30))
    assert next(ln for ln in stdout.splitlines() if ln.startswith("done: steps 0-29 in ")).count("tok/s") == 1
    line = next(ln for ln in stdout.splitlines() if ln.startswith("step    29 | loss"))
    for field in ("lr", "norm", "ms", "tok/s", "eta"):
        assert field in line
    # the final model loads in our GPT and in Hugging Face, with the 50257 real tokens
    from transformers import GPT2LMHeadModel
    ours, hf = GPT.from_pretrained(out).eval(), GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (1, 16))
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_head_vocab_train_learns_like_the_full_head_and_saves_a_gpt2(head_runs, shakespeare_dir):
    """--head_vocab train: the printed count is the train shards' ids, val loss (always the full head) falls
    at least as fast as the full head's from the same seed, and the saved model's rows outside those ids are one row,
    loadable by Hugging Face."""
    from data.shards import shard_paths, token_counts
    vals = {head: [v for _, v in metrics(out, "val_loss")] for head, (out, _) in head_runs.items()}
    out, stdout = head_runs["train"]
    ids = token_counts(shard_paths(shakespeare_dir, "train"), 50304).nonzero()[0]
    assert f"head vocab: the {len(ids):,} ids of the train shards + 1 column for the other {50304 - len(ids):,}" \
        in stdout
    assert vals["train"][0] > 10.5 and vals["train"][-1] < vals["train"][0] - 2.0, vals
    assert vals["train"][-1] < vals["full"][-1] + 0.05, vals  # no worse (here 7.80 vs 7.96 after 30 steps)
    w = GPT.from_pretrained(out).lm_head.weight.detach()  # (50257, C): exported without the padding
    rest = torch.ones(len(w), dtype=torch.bool)
    rest[ids[ids < len(w)]] = False
    assert rest.sum() > 20000 and torch.equal(w[rest], w[rest][:1].expand(int(rest.sum()), -1))
    from transformers import GPT2LMHeadModel
    idx = torch.tensor([ids[:16].tolist()])
    torch.testing.assert_close(GPT.from_pretrained(out).eval()(idx)[0],
                               GPT2LMHeadModel.from_pretrained(out).eval()(idx).logits, rtol=1e-4, atol=1e-4)


def test_finetune_preset_defaults():
    cfg, _ = parse_args(["--preset", "finetune", "--data_dir", "data/shards/mine"])
    assert (cfg.init_from, cfg.data_dir, cfg.out_dir, cfg.compile, cfg.hellaswag_interval) == \
        ("gpt2", "data/shards/mine", "out-ft", True, 0)
    assert (cfg.total_batch_size, cfg.batch_size, cfg.seq_len, cfg.max_steps, cfg.max_lr, cfg.min_lr,
            cfg.warmup_steps) == (32768, 8, 1024, 200, 3e-5, 3e-5, 10)
    assert cfg.eval_interval <= 25 and cfg.ckpt_interval <= 50 and cfg.sample_interval <= 50
    assert cfg.keep_last * cfg.ckpt_interval >= cfg.max_steps  # every checkpoint is kept
    assert cfg.total_batch_size % (cfg.batch_size * cfg.seq_len) == 0  # grad accum 4 on one GPU
    assert parse_args(["--preset", "finetune", "--init_from", "out-ft", "--max_lr", "1e-4"])[0].max_lr == 1e-4


def test_finetune_own_text_lowers_val_loss(tmp_path, capsys):
    """Own text (one .txt through fineweb.py) fine-tunes a pretrained (random tiny HF) model; a second run
    continues from the first's out_dir, read from its newest checkpoint."""
    from conftest import make_hf
    from data import fineweb, shakespeare
    _, hf_dir = make_hf(tmp_path, vocab_size=50257)
    text = dict(shakespeare.read_plays(shakespeare.download()))["hamlet"][:40000]
    (tmp_path / "mine.txt").write_text(text, encoding="utf-8")
    fineweb.prepare(str(tmp_path / "shards"), input=str(tmp_path / "mine.txt"), prefix="mine", num_threads=1,
                    progress=False)
    common = ["--preset", "finetune", "--data_dir", str(tmp_path / "shards"), "--device", "cpu", "--compile", "false",
              "--dtype", "float32", "--seq_len", "64", "--batch_size", "4", "--total_batch_size", "512",
              "--val_steps", "2", "--max_lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "2"]
    out = str(tmp_path / "out")
    r = train_here(common + ["--init_from", hf_dir, "--out_dir", out, "--max_steps", "8", "--eval_interval", "4",
                             "--sample_interval", "4", "--sample_tokens", "4", "--ckpt_interval", "4"], capsys)
    assert r.returncode == 0, r.stderr
    val = metrics(out, "val_loss")
    assert [s for s, _ in val] == [0, 4, 7] and val[-1][1] < val[0][1], val
    assert r.stdout.count("sample: 'ROMEO:\\n") == 4
    os.remove(os.path.join(out, "model.safetensors"))
    os.remove(os.path.join(out, "config.json"))  # now only ckpt_000004 and ckpt_000008 are left
    r = train_here(common + ["--init_from", out, "--out_dir", str(tmp_path / "out2"), "--max_steps", "1",
                             "--sample_interval", "0"], capsys)
    assert r.returncode == 0, r.stderr
    assert metrics(tmp_path / "out2", "val_loss")[0][1] < val[0][1]


# ----- no run is ever lost; a user's mistake is one line (in-process runs: fast, and monkeypatchable) -----

def train_main(args, capsys):
    """train_gpt2.main(args) in this process: (exit code, stdout, stderr)."""
    r = train_here(args, capsys)
    return r.returncode, r.stdout, r.stderr


def tiny(data_dir, out_dir, *extra):
    return TINY + ["--data_dir", data_dir, "--out_dir", str(out_dir), "--device", "cpu", "--compile", "false",
                   "--eval_interval", "100", *map(str, extra)]


def one_error(code, err, *parts):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], err


def test_resume_path_writes_where_its_checkpoint_lives(tmp_path):
    run_dir = tmp_path / "runX"
    assert parse_args(["--resume", str(run_dir / "ckpt_000010")])[0].out_dir == str(run_dir)
    assert parse_args(["--resume", str(run_dir / "ckpt_000010"), "--out_dir", "elsewhere"])[0].out_dir == "elsewhere"
    assert parse_args(["--resume", "auto"])[0].out_dir == "out"


def test_fresh_run_into_a_finished_run_is_refused_then_overwritten_on_request(tmp_path, shakespeare_dir, capsys):
    out = tmp_path / "out"
    assert train_main(tiny(shakespeare_dir, out, "--max_steps", 2), capsys)[0] == 0
    before = {n: os.path.getmtime(out / n) for n in os.listdir(out) if n != ".lock"}
    code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 3), capsys)
    one_error(code, err, f"--out_dir {out} already holds a run", "--resume auto", "--overwrite true")
    assert {n: os.path.getmtime(out / n) for n in os.listdir(out) if n != ".lock"} == before  # nothing touched
    code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 3, "--overwrite", "true"), capsys)
    assert code == 0, err
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == ["ckpt_000003"]  # the old run's are gone
    assert [s for s, _ in metrics(out, "train_loss")] == [0, 1, 2]  # not interleaved with the old run's


def test_resume_auto_with_only_incomplete_checkpoints_is_refused(tmp_path, shakespeare_dir, capsys):
    out = tmp_path / "out"
    assert train_main(tiny(shakespeare_dir, out, "--max_steps", 2), capsys)[0] == 0
    os.remove(out / "ckpt_000002" / "trainer.pt")
    code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 4, "--resume", "auto"), capsys)
    one_error(code, err, "--resume auto", "no complete checkpoint", "ckpt_000002", "--overwrite true")


def test_two_runs_into_one_out_dir_at_once_are_refused(tmp_path, shakespeare_dir, capsys):
    from checkpoint import lock_run
    out = tmp_path / "out"
    held = lock_run(str(out))  # another training holds it
    try:
        code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 1), capsys)
    finally:
        held.close()
    one_error(code, err, f"--out_dir {out} is in use by pid {os.getpid()}")
    assert train_main(tiny(shakespeare_dir, out, "--max_steps", 1), capsys)[0] == 0  # released: it runs


@pytest.mark.parametrize("extra, message", [
    (["--sample_interval", "1", "--sample_prompt", ""], "--sample_prompt: empty"),
    (["--sample_interval", "1", "--vocab_size", "256"], "--sample_prompt \"Hello, I'm a language model,\" holds token "
     "15496, beyond the model's 256 ids; give text of smaller ids, or --sample_interval 0"),
    (["--max_lr", "inf"], "--max_lr: must be a finite number"),
    (["--min_lr", "nan"], "--min_lr: must be a finite number"),
    (["--seed", "-1"], "--seed: must be in 0..4294967295"),
    (["--seed", str(2**32)], "--seed: must be in 0..4294967295"),
    (["--beta2", "1"], "--beta2: must be in [0, 1), got 1.0"),
    (["--beta1", "-0.5"], "--beta1: must be in [0, 1), got -0.5"),
    (["--init_std", "0"], "--init_std: must be positive, got 0.0"),
    (["--init_std", "0.05", "--init_from", "gpt2"], "--init_std 0.05 sets the weights of a new model, and --init_from "
     "gpt2 loads them"),
])
def test_bad_values_are_refused_before_anything_runs(tmp_path, shakespeare_dir, capsys, extra, message):
    out = tmp_path / "out"
    one_error(*train_main(tiny(shakespeare_dir, out, "--max_steps", 1, *extra), capsys)[::2], message)
    assert not out.exists()


def test_out_dir_that_is_a_file_or_under_one(tmp_path, shakespeare_dir, capsys):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        one_error(*train_main(tiny(shakespeare_dir, out, "--max_steps", 1), capsys)[::2], f"--out_dir {out}",
                  "is a file")


def test_mistyped_shakespeare_data_dir_is_an_error_not_a_new_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's default data_dir is relative: prepared here if used
    typo = tmp_path / "data" / "shards" / "shakespear"
    code, _, err = train_main(["--preset", "shakespeare", "--data_dir", typo, "--out_dir", tmp_path / "o",
                               "--device", "cpu", "--max_steps", "1"], capsys)
    one_error(code, err, f"data_dir {typo} does not exist", "python data/shakespeare.py")
    assert not (tmp_path / "data").exists()


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, shakespeare_dir, capsys):
    out = tmp_path / "out"
    code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 30, "--ckpt_interval", 1, "--keep_last", 30,
                                   "--max_lr", "1e30", "--min_lr", "1e30", "--warmup_steps", 0, "--grad_clip", 0),
                              capsys)
    one_error(code, err, "training diverged", "stopped without saving")
    ckpts = sorted(n for n in os.listdir(out) if n.startswith("ckpt_"))
    newest = os.path.join(out, ckpts[-1])
    assert newest in err and not (out / "model.safetensors").exists()
    weights = GPT.from_pretrained(newest).state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())  # no NaN model was saved


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous(tmp_path, shakespeare_dir, capsys,
                                                                            monkeypatch):
    import errno
    out = tmp_path / "out"
    real_save = torch.save

    def full_disk(obj, path, *a, **kw):
        if "ckpt_000002" in str(path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 3, "--ckpt_interval", 1), capsys)
    one_error(code, err, "no space left on device while writing", ".tmp_ckpt_000002")
    assert sorted(os.listdir(out)) == [".lock", "ckpt_000001", "metrics.jsonl", "train_config.json"]


def test_resume_keeps_the_runs_dtype_and_loss_path(tmp_path, shakespeare_dir, capsys, monkeypatch):
    """--dtype auto and --loss auto are decided at a run's start and recorded; a resume keeps them (here on a
    "machine" whose rules now pick otherwise) unless the flag is given, which is said in one line."""
    import train_gpt2
    out = tmp_path / "out"
    args = [a for a in tiny(shakespeare_dir, out) if a not in ("--dtype", "float32", "--loss", "fused")]
    monkeypatch.setattr(train_gpt2, "pick_dtype",
                        lambda dtype, device: ("float32", "rule") if dtype == "auto" else (dtype, "given"))
    monkeypatch.setattr(train_gpt2, "pick_loss",
                        lambda loss, device, compile: ("plain", "rule") if loss == "auto" else (loss, "given"))
    assert train_main(args + ["--max_steps", 4, "--run_steps", 2], capsys)[0] == 0
    monkeypatch.setattr(train_gpt2, "pick_dtype",
                        lambda dtype, device: ("bfloat16", "rule") if dtype == "auto" else (dtype, "given"))
    monkeypatch.setattr(train_gpt2, "pick_loss",
                        lambda loss, device, compile: ("fused", "rule") if loss == "auto" else (loss, "given"))
    code, text, err = train_main(["--resume", str(out / "ckpt_000002"), "--run_steps", 1], capsys)
    assert code == 0 and "dtype float32 (the run's)" in text and "loss plain (the run's)" in text, err
    meta = json.loads((out / "ckpt_000003" / "trainer.json").read_text())
    assert meta["config"]["dtype"] == meta["config"]["loss"] == "auto"  # the config as given ...
    assert (meta["run"]["dtype"], meta["run"]["loss"]) == ("float32", "plain")  # ... and what it decided
    code, text, err = train_main(["--resume", "auto", "--out_dir", out, "--dtype", "bfloat16"], capsys)
    assert code == 0 and "note: --dtype bfloat16 overrides the run's float32" in text, err
    assert "dtype bfloat16 (given)" in text and "loss plain (the run's)" in text


def test_bad_rng_or_loader_in_trainer_json_is_one_line(tmp_path, shakespeare_dir, capsys):
    out = tmp_path / "out"
    assert train_main(tiny(shakespeare_dir, out, "--max_steps", 4, "--run_steps", 2), capsys)[0] == 0
    path = out / "ckpt_000002" / "trainer.json"
    good = json.loads(path.read_text())
    for broken in ({**good, "rng": [{"python": "x", "numpy": []}]}, {k: v for k, v in good.items() if k != "loader"}):
        path.write_text(json.dumps(broken))
        code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 4, "--resume", "auto"), capsys)
        one_error(code, err, "ckpt_000002")


def test_no_host_sync_before_the_optimizer_step_and_gc_frozen(tmp_path, shakespeare_dir, capsys, monkeypatch):
    """Reading .item() inside the step stalls a GPU's queue; the loss and norm are read after optimizer.step()."""
    import gc

    import train_gpt2
    events = []
    spy_on_the_step(monkeypatch, train_gpt2, events)
    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))
    assert train_main(tiny(shakespeare_dir, tmp_path / "out", "--max_steps", 3), capsys)[0] == 0
    assert events.count("freeze") == 1 and events.index("freeze") < events.index("zero_grad")
    for i, e in enumerate(events):
        if e == "zero_grad":
            assert events[i + 1:events.index("step", i)].count("item") == 0, events


def test_ctrl_c_stops_with_a_checkpoint_and_names_the_resume_command(tmp_path, shakespeare_dir):
    """Ctrl-C mid-run: the step finishes, a checkpoint is written, and the line names it and the command that
    continues (tests/test_repeat.py resumes with that command and compares every number)."""
    import signal
    import time
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "train_gpt2.py", *tiny(shakespeare_dir, out, "--max_steps", 100000,
                                                                  "--ckpt_interval", 1)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "ckpt_000002").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("stopped at step") and f"continue with: python train_gpt2.py --resume {out}/ckpt_" in line
    ckpt = line.split("--resume ")[1]
    assert os.path.isdir(ckpt) and int(ckpt[-6:]) >= 2, line


def test_resume_command_names_the_checkpoint_alone():
    """A checkpoint holds its run's settings: --resume PATH is the whole command (torchrun on several ranks)."""
    from checkpoint import resume_command
    assert resume_command("out/ckpt_000001") == "python train_gpt2.py --resume out/ckpt_000001"
    assert resume_command("my run/ckpt_000100", 8) == \
        "torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume 'my run/ckpt_000100'"


# ----- numerics: compiled == eager, K micro steps == one K-times-larger batch, DDP == one process, RNG restore -----

@pytest.fixture
def py_np_rngs():
    """Tests below set python's and numpy's global RNGs (conftest restores torch's only): put them back."""
    import random

    import numpy as np
    py, npy = random.getstate(), np.random.get_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)


def test_load_checkpoint_restores_python_and_numpy_rngs(tmp_path, shakespeare_dir, py_np_rngs):
    """A resumed run continues python's `random` and numpy's global RNG where the checkpoint left them (the
    trainer seeds both from --seed, so anything drawing from them must be reproducible across a resume).
    The draws after load_checkpoint must equal the draws that followed save_checkpoint, and must not be what
    the scrambled state would have given."""
    import random

    import numpy as np

    from checkpoint import load_checkpoint, save_checkpoint
    from data.shards import ShardLoader, shard_paths
    from optim import configure_optimizers
    from runtime import Dist
    from train_gpt2 import build_model
    cfg, _ = parse_args(tiny(shakespeare_dir, tmp_path / "out", "--max_steps", 1))
    os.makedirs(cfg.out_dir)
    model = build_model(cfg)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.max_lr)
    loader = ShardLoader(shard_paths(cfg.data_dir, "train"), cfg.batch_size, cfg.seq_len)

    def draws():
        return [random.random() for _ in range(5)], np.random.rand(5).tolist(), torch.rand(5).tolist()
    random.seed(11)
    np.random.seed(22)
    torch.manual_seed(33)
    draws()  # states part-way through a stream, not fresh seeds
    save_checkpoint(cfg.out_dir, cfg.keep_last, 1, model, optimizer, loader, Dist())
    expected = draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    scrambled = draws()
    assert all(a != b for a, b in zip(scrambled, expected))  # so the comparison below can tell them apart
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert load_checkpoint(os.path.join(cfg.out_dir, "ckpt_000001"), model, optimizer, loader, Dist()) == 1
    assert draws() == expected  # exact: the same generator state gives bit-identical draws


def rel_err(a, b):
    """||a - b|| / ||b||: the error relative to the tensor's size, not blown up by entries near zero."""
    return ((a - b).norm() / b.norm()).item()


def train_capturing_grads(args, capsys, monkeypatch):
    """train_gpt2.main(args) in this process, as it runs. Returns (the model's weights before step 0, the
    gradients AdamW consumed at each step (after clipping) by parameter name, stdout). Only configure_optimizers
    is wrapped, to watch optimizer.step(); the loop itself is not copied."""
    import optim
    import train_gpt2
    init, grads, real_configure = {}, [], optim.configure_optimizers  # the original, not an earlier wrap

    def configure(model, *a, **kw):
        opt = real_configure(model, *a, **kw)
        real_step = opt.step

        def step(*sa, **skw):
            if not init:
                init.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            return real_step(*sa, **skw)
        opt.step = step
        return opt
    monkeypatch.setattr(train_gpt2, "configure_optimizers", configure)
    code, out, err = train_main(args, capsys)
    assert code == 0, err
    return init, grads, out


def test_grad_accumulation_equals_one_larger_batch(tmp_path, shakespeare_dir, capsys, monkeypatch):
    """K micro steps of B sequences == one step of K*B sequences: the loop divides each micro loss by
    grad_accum, so the summed gradient is the gradient of the mean loss over the whole batch. AdamW hides a
    constant gradient scale (its update is m / sqrt(v)), so the losses after a few steps would not notice a
    wrong scale: the gradients themselves and the pre-clip norm are compared, against a second run and against
    the gradient of model(x, y) on the same 8 sequences, computed directly here.

    batch_size 2 at total_batch_size 256 (T=64) is 2 micro steps; batch_size 4 is 1. The loader reads one
    stream, so two batches of 2 are exactly the first batch of 4. Val: 2 batches of 2 == 1 batch of 4."""
    from data.shards import ShardLoader, shard_paths
    from model import GPTConfig
    steps = 2
    runs = {}
    for B, val_steps, accum in ((2, 2, 2), (4, 1, 1)):
        out = tmp_path / f"b{B}"
        args = tiny(shakespeare_dir, out, "--max_steps", steps, "--total_batch_size", 256, "--batch_size", B,
                    "--val_steps", val_steps)
        init, grads, text = train_capturing_grads(args, capsys, monkeypatch)
        assert f"grad accum {accum} |" in text and len(grads) == steps
        runs[B] = (init, grads, out)
    (init2, g2, out2), (init4, g4, out4) = runs[2], runs[4]
    assert all(torch.equal(init2[k], init4[k]) for k in init4)  # same seed, same initial weights

    # Float32 rounding only: the two runs add the same per-token terms in a different order (two half-batch
    # sums vs one), which moves a result by ~1e-7 relative (observed here: loss 9e-8, norm 0, gradients 4e-7
    # to 1.4e-6 relative over 3 steps). 1e-5 leaves 10x for other CPUs' kernels; a scale error is O(1).
    for key in ("train_loss", "norm", "val_loss"):
        a, b = metrics(out2, key), metrics(out4, key)
        assert [s for s, _ in a] == [s for s, _ in b] and a, (key, a, b)
        for (_, x), (_, y) in zip(a, b):
            assert x == pytest.approx(y, rel=1e-5), (key, a, b)
    for step, (a, b) in enumerate(zip(g2, g4)):
        for name in b:
            assert rel_err(a[name], b[name]) < 1e-5, (step, name, rel_err(a[name], b[name]))

    # Step 0 against the gradient computed here: model(x, y) on the first 4 sequences, then clipped as the
    # trainer's --grad_clip 1.0 clips it (the logged norm is the pre-clip one).
    cfg, _ = parse_args(tiny(shakespeare_dir, tmp_path / "unused"))
    ref = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_embd=cfg.n_embd))
    ref.load_state_dict(init4)
    x, y = ShardLoader(shard_paths(shakespeare_dir, "train"), 4, cfg.seq_len).next_batch()
    _, loss = ref(x, y)
    loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_norm = torch.cat([g.flatten() for g in ref_grads.values()]).norm().item()
    assert metrics(out2, "train_loss")[0][1] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics(out2, "norm")[0][1] == pytest.approx(ref_norm, rel=1e-5)
    assert ref_norm > cfg.grad_clip  # so clipping is really exercised at step 0
    scale = cfg.grad_clip / ref_norm
    for name, g in ref_grads.items():
        assert rel_err(g2[0][name], g * scale) < 1e-5, (name, rel_err(g2[0][name], g * scale))


def test_resume_given_a_run_folder_writes_nothing_and_names_the_fix(tmp_path, shakespeare_dir, capsys):
    run_dir = tmp_path / "runs" / "runC"
    assert train_main(tiny(shakespeare_dir, run_dir, "--max_steps", 2), capsys)[0] == 0
    code, _, err = train_main(tiny(shakespeare_dir, run_dir, "--max_steps", 4) + ["--resume", run_dir],
                              capsys)
    one_error(code, err, f"--resume {run_dir}: not a complete checkpoint", f"--out_dir {run_dir} --resume auto")
    assert os.listdir(tmp_path / "runs") == ["runC"]  # nothing written beside it


def test_overwrite_deletes_only_the_runs_own_checkpoints_and_says_so(tmp_path, shakespeare_dir, capsys):
    import shutil
    out = tmp_path / "out"
    assert train_main(tiny(shakespeare_dir, out, "--max_steps", 2), capsys)[0] == 0
    shutil.copytree(out / "ckpt_000002", out / "ckpt_backup")  # a user's copy
    (out / "notes.txt").write_text("mine")
    code, text, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 1, "--overwrite", "true"), capsys)
    assert code == 0, err
    assert "--overwrite: deleting the previous run" in text and "ckpt_000002" in text
    assert (out / "ckpt_backup" / "trainer.pt").exists() and (out / "notes.txt").read_text() == "mine"


def test_empty_out_dir_names_the_flag(tmp_path, shakespeare_dir, capsys):
    one_error(*train_main(tiny(shakespeare_dir, "", "--max_steps", 1), capsys)[::2], "--out_dir: empty")


def test_saved_models_are_readable_by_others_as_the_umask_says(tmp_path):
    from model import GPTConfig
    old = os.umask(0o022)
    try:
        GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8)).save_pretrained(str(tmp_path / "m"))
    finally:
        os.umask(old)
    assert {f: oct(os.stat(tmp_path / "m" / f).st_mode & 0o777) for f in ("model.safetensors", "config.json")} == \
        {"model.safetensors": "0o644", "config.json": "0o644"}


def test_resume_keeps_the_checkpoints_compile_setting(tmp_path, shakespeare_dir, capsys):
    """The gpt2-124m preset compiles by default; a run started with --compile false resumes without compile."""
    out = tmp_path / "out"
    assert train_main(tiny(shakespeare_dir, out, "--max_steps", 4, "--run_steps", 2), capsys)[0] == 0
    args = [a for a in tiny(shakespeare_dir, out, "--max_steps", 4, "--resume", "auto")]
    i = args.index("--compile")
    code, text, err = train_main(args[:i] + args[i + 2:], capsys)  # no --compile flag: the preset says true
    assert code == 0 and "compile False" in text, err


def test_time_budget_fixes_max_steps_once_and_a_resume_keeps_it(tmp_path, shakespeare_dir, capsys, monkeypatch):
    """--time_budget: after step BUDGET_PROBE the budget (here a stubbed clock's verdict, 9) becomes max_steps:
    the cosine ends there, it is logged, recorded in the checkpoint, and a resume continues to it without
    timing again, with the losses of the uninterrupted run."""
    import train_gpt2
    from config import BUDGET_PROBE
    calls = []

    def budget(cfg, step, elapsed, step_seconds, eval_batch_seconds):
        calls.append(step)
        assert elapsed > 0 and step_seconds > 0 and eval_batch_seconds > 0
        return 9
    monkeypatch.setattr(train_gpt2, "budget_steps", budget)
    args = ["--time_budget", 60, "--max_steps", 1000, "--warmup_steps", 2]
    whole, part = tmp_path / "whole", tmp_path / "part"
    code, text, err = train_main(tiny(shakespeare_dir, whole, *args), capsys)
    assert code == 0 and calls == [BUDGET_PROBE] and "--time_budget 60 s: max_steps 9 (recorded" in text, err
    lines = [line for line in text.splitlines() if line.startswith("step") and " | loss " in line]  # the ETA waits
    # for the budget's max_steps
    assert all(f"eta after step {BUDGET_PROBE}" in line for line in lines[:BUDGET_PROBE]), lines
    assert all(line.endswith(" min") for line in lines[BUDGET_PROBE:]), lines
    losses = metrics(whole, "train_loss")
    assert [s for s, _ in losses] == list(range(9)) and (BUDGET_PROBE, 9) in metrics(whole, "max_steps")
    lrs = dict(metrics(whole, "lr"))
    cfg, _ = parse_args(tiny(shakespeare_dir, whole, *args))
    assert lrs[8] == pytest.approx(get_lr(8, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, 9)) and lrs[8] < lrs[7]  # the
    # cosine ends at step 8, not 999
    meta = json.loads((whole / "ckpt_000009" / "trainer.json").read_text())
    assert meta["run"]["max_steps"] == 9 and meta["config"]["max_steps"] == 1000  # decided, and as given

    assert train_main(tiny(shakespeare_dir, part, *args, "--run_steps", 7), capsys)[0] == 0
    calls.clear()
    code, text, err = train_main(tiny(shakespeare_dir, part, "--time_budget", 60, "--warmup_steps", 2,
                                      "--resume", "auto"), capsys)  # no --max_steps: the recorded 9 holds
    assert code == 0 and calls == [], err  # no second timing: the checkpoint's max_steps (9) is kept
    assert metrics(part, "train_loss") == losses

    early = tmp_path / "early"  # stopped before the budget was fixed: the resume times the step and an eval
    assert train_main(tiny(shakespeare_dir, early, *args, "--run_steps", BUDGET_PROBE - 2), capsys)[0] == 0
    code, text, err = train_main(tiny(shakespeare_dir, early, *args, "--resume", "auto"), capsys)
    assert code == 0 and calls == [BUDGET_PROBE] and "max_steps 9 (recorded" in text, err
    assert metrics(early, "train_loss") == losses  # the extra eval changes nothing in training


def test_betas_and_init_std_reach_the_optimizer_and_model_and_a_resume_keeps_the_betas(tmp_path, shakespeare_dir,
                                                                                       capsys, monkeypatch):
    """--beta1/--beta2 are AdamW's at every step; a resume keeps the checkpoint's unless they are given (then
    with a note); --init_std is the scratch model's N(0, std)."""
    import train_gpt2
    seen = []
    real_configure, real_build = train_gpt2.configure_optimizers, train_gpt2.build_model

    def configure(*a, **kw):
        opt = real_configure(*a, **kw)
        step = opt.step
        opt.step = lambda *sa, **skw: seen.append({g["betas"] for g in opt.param_groups}) or step(*sa, **skw)
        return opt

    def build(cfg, ckpt=None):
        model = real_build(cfg, ckpt)
        seen.append(model.transformer.h[0].mlp.c_fc.weight.std().item())
        return model
    monkeypatch.setattr(train_gpt2, "configure_optimizers", configure)
    monkeypatch.setattr(train_gpt2, "build_model", build)
    out = tmp_path / "out"
    flags = ("--max_steps", 2, "--beta2", "0.99", "--init_std", "0.05")
    assert train_main(tiny(shakespeare_dir, out, *flags), capsys)[0] == 0
    assert seen[0] == pytest.approx(0.05, rel=0.05) and seen[1:] == [{(0.9, 0.99)}] * 2
    assert json.loads((out / "train_config.json").read_text())["beta2"] == 0.99
    seen.clear()
    assert train_main(tiny(shakespeare_dir, out, "--max_steps", 3, "--resume", "auto"), capsys)[0] == 0
    assert seen[-1] == {(0.9, 0.99)}  # step 2 (loading the optimizer's state may step it once before)
    seen.clear()
    code, stdout, _ = train_main(tiny(shakespeare_dir, out, "--max_steps", 5, "--resume", "auto", "--beta1", "0.8",
                                      "--beta2", "0.999"), capsys)
    assert code == 0 and seen[-2:] == [{(0.8, 0.999)}] * 2  # steps 3 and 4
    assert "note: --beta1 0.8 overrides the run's 0.9" in stdout and "--beta2 0.999 overrides the run's 0.99" in stdout


def test_a_resume_needs_no_init_from_weights(tmp_path, shakespeare_dir, capsys):
    """A run started from pretrained weights resumes from its checkpoint alone: the --init_from directory may be
    gone by then (the checkpoint holds the weights and the shape)."""
    import shutil

    from conftest import make_hf
    _, hf_dir = make_hf(tmp_path, vocab_size=50257)
    out = tmp_path / "out"
    assert train_main(TINY_FT(shakespeare_dir, out, hf_dir), capsys)[0] == 0
    shutil.rmtree(hf_dir)
    code, text, err = train_main(["--resume", str(out / "ckpt_000002")], capsys)
    assert code == 0 and "resumed from" in text and (out / "model.safetensors").exists(), err


def TINY_FT(shakespeare_dir, out, hf_dir):
    """A tiny fine-tuning run from a Hugging Face directory: 4 steps, stopped after 2."""
    return ["--init_from", hf_dir, "--data_dir", shakespeare_dir, "--out_dir", str(out), "--seq_len", "64",
            "--batch_size", "4", "--total_batch_size", "256", "--max_steps", "4", "--run_steps", "2",
            "--val_steps", "2", "--eval_interval", "100", "--dtype", "float32", "--compile", "false",
            "--hellaswag_interval", "0", "--sample_interval", "0", "--device", "cpu", "--warmup_steps", "1"]
