"""train_gpt2.py: the CLI, the schedule, short real trainings, compile, and DDP on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HELLASWAG, ROOT, write_hellaswag
from model import GPT
from runtime import pick_dtype
from train_gpt2 import PRESETS, TrainConfig, get_lr, parse_args

# A tiny model on the real Shakespeare shards: 512 tokens per step, fast on 2 cores.
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--seq_len", "64",
        "--batch_size", "4", "--total_batch_size", "512", "--max_lr", "3e-3", "--min_lr", "3e-4",
        "--warmup_steps", "5", "--val_steps", "4", "--dtype", "float32", "--hellaswag_interval", "0",
        "--sample_interval", "0"]


def run(args, **kw):
    return subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def metrics(out_dir, key):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(e["step"], e[key]) for e in map(json.loads, f) if key in e]


def test_flags_presets_and_overrides():
    cfg = parse_args([])
    assert cfg == TrainConfig()  # gpt2-124m: build-nanogpt's recipe
    assert (cfg.total_batch_size, cfg.batch_size, cfg.seq_len, cfg.max_lr, cfg.min_lr, cfg.warmup_steps,
            cfg.max_steps, cfg.weight_decay, cfg.grad_clip, cfg.vocab_size, cfg.eval_interval) == \
        (524288, 64, 1024, 6e-4, 6e-5, 715, 19073, 0.1, 1.0, 50304, 250)
    cfg = parse_args(["--preset", "shakespeare", "--max_steps=7", "--compile", "false", "--max_lr", "1e-3"])
    assert (cfg.max_steps, cfg.compile, cfg.max_lr) == (7, False, 1e-3)
    assert cfg.n_embd == PRESETS["shakespeare"]["n_embd"] and cfg.data_dir == "data/shards/shakespeare"
    assert parse_args(["--preset=gpt2-xl"]).n_layer == 48


def test_help_lists_every_field_with_its_default():
    out = run(["--help"]).stdout
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in out
    assert "default: 524288" in out and "shakespeare" in out


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "--preset: unknown preset 'nope'"),
    (["--max_lr", "-1"], "--max_lr: must not be negative"),
    (["--total_batch_size", "1000", "--batch_size", "4", "--seq_len", "64"], "not divisible by batch_size*seq_len*world_size"),
    (["--compile", "maybe"], "expected true or false"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--dtype", "float16"], "--dtype: expected auto, bfloat16 or float32"),
    (["--seq_len", "2048"], "--seq_len 2048 is longer than --block_size 1024"),
    (["--init_from", "gpt5"], "--init_from: 'gpt5'"),
])
def test_bad_values_exit_2_with_one_line(args, message):
    r = run(args + ["--device", "cpu"])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_missing_shards_name_the_prepare_command(tmp_path):
    r = run(["--data_dir", str(tmp_path / "nothing"), "--device", "cpu"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "python data/fineweb.py" in r.stderr and str(tmp_path / "nothing") in r.stderr


def test_bad_shard_is_named(tmp_path, shakespeare_dir):
    import shutil
    shutil.copytree(shakespeare_dir, tmp_path / "d")
    with open(tmp_path / "d" / "shakespeare_train_000001.npy", "r+b") as f:
        f.truncate(1000)
    r = run(TINY + ["--data_dir", str(tmp_path / "d"), "--device", "cpu", "--max_steps", "1", "--compile", "false"])
    assert r.returncode == 2 and "shakespeare_train_000001.npy: cannot read shard" in r.stderr


def test_lr_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, max_lr=1.0, min_lr=0.1)
    assert get_lr(0, cfg) == pytest.approx(0.1) and get_lr(9, cfg) == pytest.approx(1.0)
    assert get_lr(10, cfg) == pytest.approx(1.0) and get_lr(55, cfg) == pytest.approx(0.55)
    assert get_lr(100, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == pytest.approx(0.1)


def test_pick_dtype():
    assert pick_dtype("float32", "cpu") == "float32" and pick_dtype("auto", "cuda") == "bfloat16"
    assert pick_dtype("auto", "cpu") in ("bfloat16", "float32")


def test_short_shakespeare_training_lowers_val_loss(tmp_path, shakespeare_dir):
    out = str(tmp_path / "out")
    r = run(TINY + ["--data_dir", shakespeare_dir, "--out_dir", out, "--max_steps", "30", "--eval_interval", "10",
                    "--compile", "false", "--device", "cpu"], timeout=300)
    assert r.returncode == 0, r.stderr
    val = metrics(out, "val_loss")
    assert [s for s, _ in val] == [0, 10, 20, 29]
    assert val[0][1] > 10.5 and val[-1][1] < val[0][1] - 2.0, val  # from ln(50304) clearly down
    train = metrics(out, "train_loss")
    assert [s for s, _ in train] == list(range(30))
    line = next(l for l in r.stdout.splitlines() if l.startswith("step    29 | loss"))
    for field in ("lr", "norm", "ms", "tok/s", "eta"):
        assert field in line
    # the final model loads in our GPT and in Hugging Face, with the 50257 real tokens
    from transformers import GPT2LMHeadModel
    ours, hf = GPT.from_pretrained(out).eval(), GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (1, 16))
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_eval_and_sampling_work_under_compile(tmp_path, shakespeare_dir):
    out = str(tmp_path / "out")
    args = TINY[:-2] + ["--data_dir", shakespeare_dir, "--out_dir", out, "--max_steps", "4", "--eval_interval", "2",
                        "--sample_interval", "2", "--sample_tokens", "8", "--compile", "true", "--device", "cpu",
                        "--hellaswag_interval", "2", "--hellaswag_path", write_hellaswag(tmp_path / "hs.jsonl")]
    r = run(args, timeout=400)
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in metrics(out, "val_loss")] == [0, 2, 3]
    assert [s for s, _ in metrics(out, "hellaswag_acc_norm")] == [0, 2, 3]
    assert r.stdout.count("sample: ") == 4  # two samples at step 2 and at the last step


def test_torchrun_two_ranks_match_one_process(tmp_path, shakespeare_dir):
    """Same global batch: 1 process x 2 micro steps == 2 gloo ranks x 1 micro step."""
    common = TINY + ["--data_dir", shakespeare_dir, "--max_steps", "6", "--eval_interval", "3",
                     "--compile", "false", "--device", "cpu", "--batch_size", "2",
                     "--hellaswag_interval", "3", "--hellaswag_path", write_hellaswag(tmp_path / "hs.jsonl")]
    single = run(common + ["--out_dir", str(tmp_path / "one")], timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_gpt2.py", *common, "--out_dir", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = metrics(tmp_path / "one", "train_loss"), metrics(tmp_path / "two", "train_loss")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(6))
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-5), (one, two)
    # each rank evaluates its own val batches; the logged loss is their mean (rank 0 alone writes)
    assert [s for s, _ in metrics(tmp_path / "two", "val_loss")] == [0, 3, 5]
    # HellaSwag: rank r scores examples r, r + 2, ...; the summed counts equal one process's
    for key in ("hellaswag_acc", "hellaswag_acc_norm"):
        hs_one, hs_two = metrics(tmp_path / "one", key), metrics(tmp_path / "two", key)
        assert hs_one == hs_two and [s for s, _ in hs_one] == [0, 3, 5], (hs_one, hs_two)
        assert all(abs(x * len(HELLASWAG) - round(x * len(HELLASWAG))) < 1e-9 for _, x in hs_one)  # k / 7 examples


def test_finetune_preset_defaults():
    cfg = parse_args(["--preset", "finetune", "--data_dir", "data/shards/mine"])
    assert (cfg.init_from, cfg.data_dir, cfg.out_dir, cfg.compile, cfg.hellaswag_interval) == \
        ("gpt2", "data/shards/mine", "out-ft", True, 0)
    assert (cfg.total_batch_size, cfg.batch_size, cfg.seq_len, cfg.max_steps, cfg.max_lr, cfg.min_lr,
            cfg.warmup_steps) == (32768, 8, 1024, 200, 3e-5, 3e-5, 10)
    assert cfg.eval_interval <= 25 and cfg.ckpt_interval <= 50 and cfg.sample_interval <= 50
    assert cfg.keep_last * cfg.ckpt_interval >= cfg.max_steps  # every checkpoint is kept
    assert cfg.total_batch_size % (cfg.batch_size * cfg.seq_len) == 0  # grad accum 4 on one GPU
    assert parse_args(["--preset", "finetune", "--init_from", "out-ft", "--max_lr", "1e-4"]).max_lr == 1e-4


def test_finetune_own_text_lowers_val_loss(tmp_path):
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
    r = run(common + ["--init_from", hf_dir, "--out_dir", out, "--max_steps", "8", "--eval_interval", "4",
                      "--sample_interval", "4", "--sample_tokens", "4", "--ckpt_interval", "4"], timeout=300)
    assert r.returncode == 0, r.stderr
    val = metrics(out, "val_loss")
    assert [s for s, _ in val] == [0, 4, 7] and val[-1][1] < val[0][1], val
    assert r.stdout.count("sample: 'ROMEO:\\n") == 4
    os.remove(os.path.join(out, "model.safetensors"))
    os.remove(os.path.join(out, "config.json"))  # now only ckpt_000004 and ckpt_000008 are left
    r = run(common + ["--init_from", out, "--out_dir", str(tmp_path / "out2"), "--max_steps", "1",
                      "--sample_interval", "0"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert metrics(tmp_path / "out2", "val_loss")[0][1] < val[0][1]
