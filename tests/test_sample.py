"""sample.py: streaming output equals generate, model resolution, flags and errors."""
import io
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from checkpoint import model_dir as resolve
from conftest import ROOT, make_hf
from data.tokenizer import get_encoding
from model import GPT, GPTConfig
from sample import main as sample_main
from sample import stream


def test_stream_writes_what_generate_returns(tmp_path):
    _, path = make_hf(tmp_path, vocab_size=50257)
    model, enc = GPT.from_pretrained(path).eval(), get_encoding()
    idx = torch.tensor([enc.encode("To be, or not to be")])
    args = SimpleNamespace(max_new_tokens=25, temperature=0, top_k=None, top_p=None)
    out = io.StringIO()
    new = stream(model, enc, idx, args, generator=None, out=out)
    full = model.generate(idx, 25, temperature=0, eos_token_id=50256)[0, idx.size(1):].tolist()
    assert new == [t for t in full[:len(new)]] and (len(new) == 25 or full[len(new)] == 50256)
    assert out.getvalue() == enc.decode(new) + "\n"  # multi-byte characters reassembled across tokens


def test_resolve_prefers_the_final_model_then_the_newest_checkpoint(tmp_path):
    for step in (2, 4):
        d = tmp_path / f"ckpt_{step:06d}"
        d.mkdir()
        for f in ("config.json", "model.safetensors", "trainer.json", "trainer.pt"):
            (d / f).write_text("x")
    (tmp_path / ".tmp_ckpt_000006").mkdir()  # half-written: never picked
    assert resolve(str(tmp_path)) == str(tmp_path / "ckpt_000004")
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == str(tmp_path)
    assert resolve("gpt2") == "gpt2"


def test_cli_streams_seeded_samples(tmp_path):
    _, path = make_hf(tmp_path, vocab_size=50257)
    (tmp_path / "prompt.txt").write_text("Once upon a time")

    def sample(seed):  # pure sampling (no top-k), so every token depends on the seed
        cmd = [sys.executable, "sample.py", "--init_from", path, "--prompt_file", str(tmp_path / "prompt.txt"),
               "--num_samples", "2", "--max_new_tokens", "12", "--temperature", "1", "--top_k", "0",
               "--seed", str(seed), "--device", "cpu", "--dtype", "float32"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout
    a, b, c = sample(7), sample(7), sample(8)
    assert a.count("--- sample") == 2 and a.count("Once upon a time") == 2
    assert a == b and a != c


def test_cli_stops_quietly_when_the_reader_goes(tmp_path):
    """`python sample.py | head -1`: no BrokenPipeError, nothing on stderr, exit code 1 (output cut short)."""
    _, path = make_hf(tmp_path, vocab_size=50257)
    p = subprocess.Popen([sys.executable, "sample.py", "--init_from", path, "--num_samples", "1000",
                          "--max_new_tokens", "50", "--device", "cpu", "--dtype", "float32"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "--- sample 1\n"
    p.stdout.close()  # as head does after its line; sample.py is still writing
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1 and err == "", err


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0 is greedy), got inf"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 is greedy), got -1.0"),
    (["--top_k", "-1"], "--top_k must be >= 1, or off, got -1"),
    (["--top_p", "nan"], "--top_p must be in (0, 1], or off, got nan"),
    (["--seed", "-1"], "--seed: must be in 0..4294967295, got -1"),
    (["--seed", str(2**32)], "--seed: must be in 0..4294967295, got 4294967296"),
    (["--device", "cuda"], "--device cuda: no CUDA device here"),  # before --init_from is looked at
    (["--max_new_token", "5"], "unrecognized arguments: --max_new_token 5 (did you mean --max_new_tokens?)"),
    (["--top=5"], "unrecognized arguments: --top=5 (did you mean --top_k or --top_p?)"),  # not taken as --top_k
])
def test_bad_flags_are_one_line_before_loading(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    with pytest.raises(SystemExit) as e:
        sample_main(["--init_from", str(tmp_path / "missing"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_cli_errors_exit_2_with_one_line(tmp_path):
    for args, message in ((["--init_from", str(tmp_path)], "holds no model"),
                          (["--init_from", "gpt5"], "--init_from"),
                          (["--top_p", "1.5"], "--top_p"),
                          (["--prompt_file", str(tmp_path / "missing.txt")], "--prompt_file")):
        r = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_a_prompt_longer_than_block_size_is_cut_with_a_note(tmp_path, capsys):
    """The model sees the prompt's last block_size tokens: stderr says how many were cut; stdout still shows it all."""
    path = str(tmp_path / "tiny")
    GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=1, n_embd=8)).save_pretrained(path)
    prompt = " one two three four five six seven eight nine ten" * 2  # 20 tokens
    assert len(get_encoding().encode(prompt)) == 20
    args = ["--init_from", path, "--max_new_tokens", "20", "--top_k", "0", "--device", "cpu", "--dtype", "float32"]
    sample_main(args + ["--prompt", prompt])
    out, err = capsys.readouterr()
    assert err == ("note: the prompt is 20 tokens, more than the model's block_size 16: its first 4 are cut and "
                   "generation sees the last 16 (the output still shows it all)\n")
    assert out.startswith(prompt) and len(out) > len(prompt) + 1  # generated past the window's end, no error
    sample_main(args + ["--prompt", prompt[:len(prompt) // 2]])  # 10 tokens fit: no note
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(prompt[:len(prompt) // 2])
