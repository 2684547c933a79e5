"""data/hellaswag.py: reading and checking the jsonl, rendering, build-nanogpt's scoring, the CLI, training."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import HELLASWAG, ROOT, make_hf, write_hellaswag
from data import DataError, hellaswag
from data.tokenizer import get_encoding
from model import GPT
from test_train import TINY, metrics, run
from train_gpt2 import main as train_main


@pytest.fixture(scope="module")
def enc():
    return get_encoding()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-2 with the real vocabulary; initializer_range 0.2 spreads its losses apart."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return make_hf(tmp_path_factory.mktemp("hs"), vocab_size=50257, initializer_range=0.2)


def test_render_masks_exactly_the_ending(enc):
    ex = HELLASWAG[0]
    tokens, mask = hellaswag.render(ex, enc)
    ctx = enc.encode(ex["ctx"])
    assert len(tokens) == len(mask) == 4
    for row, m, ending in zip(tokens, mask, ex["endings"]):
        end = enc.encode(" " + ending)  # GPT-2's BPE: the space belongs to the ending's first word
        assert row == ctx + end and m == [0] * len(ctx) + [1] * len(end)
        assert enc.decode([t for t, keep in zip(row, m) if keep]) == " " + ending


def test_acc_and_acc_norm_differ_on_a_constructed_case():
    """Row 0: 1 ending token at loss ln 3. Row 1: 3 ending tokens at loss log(e + 2) - 1 = 0.55 each.
    Summed, row 0 is more likely (acc); per token, row 1 is (acc_norm)."""
    tokens = torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1]])
    mask = torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1]])
    logits = torch.zeros(2, 4, 3)
    logits[1, :, 1] = 1.0
    total, mean = hellaswag.score_rows(logits, tokens, mask)
    per_token = math.log(math.e + 2) - 1
    torch.testing.assert_close(total, torch.tensor([math.log(3), 3 * per_token]))
    torch.testing.assert_close(mean, torch.tensor([math.log(3), per_token]))
    assert total.argmin() == 0 and mean.argmin() == 1


def direct(hf, ex, enc):
    """build-nanogpt's choice (by summed, by mean loss) for one example: HF logits, one unpadded row at a time."""
    ctx, sums, means = enc.encode(ex["ctx"]), [], []
    for ending in ex["endings"]:
        end = enc.encode(" " + ending)
        with torch.no_grad():
            logp = hf(torch.tensor([ctx + end])).logits[0].float().log_softmax(-1)  # (L, V)
        nll = -logp[len(ctx) - 1:-1].gather(1, torch.tensor(end)[:, None])  # (len(end), 1)
        sums.append(nll.sum())
        means.append(nll.mean())
    return int(torch.stack(sums).argmin()), int(torch.stack(means).argmin())


def test_batched_scores_match_a_direct_computation(hf_dir, enc):
    """Labels set to the direct choices make acc (then acc_norm) exactly 1, so every prediction matches
    (batches of 3 examples: 12 rows padded to 64 tokens, the last batch has 4 empty rows); the other
    metric counts the examples where the two choices agree."""
    hf, path = hf_dir
    model = GPT.from_pretrained(path)
    picks = [direct(hf, ex, enc) for ex in HELLASWAG]
    agree = sum(a == b for a, b in picks)
    n = len(HELLASWAG)
    assert agree < n  # the two metrics really differ here
    model.eval()
    for k, expected in ((0, [n, agree, n]), (1, [agree, n, n])):
        examples = [{**ex, "label": p[k]} for ex, p in zip(HELLASWAG, picks)]
        counts = hellaswag.evaluate(lambda idx: model(idx)[0], hellaswag.prepare(examples, enc),
                                    model.config.block_size, "cpu", batch_size=3)
        assert counts.tolist() == expected


GOOD = json.dumps(HELLASWAG[0])


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "A man', "not valid JSON"),
    ("[1, 2, 3]", "not a JSON object"),
    (json.dumps({k: v for k, v in HELLASWAG[0].items() if k not in ("label", "ctx")}), "missing ctx, label"),
    (json.dumps({**HELLASWAG[0], "endings": ["a", "b", "c"]}), "endings must be a list of 4 strings"),
    (json.dumps({**HELLASWAG[0], "label": 4}), "label must be 0, 1, 2 or 3, got 4"),
    (json.dumps({**HELLASWAG[0], "label": "4"}), "label must be 0, 1, 2 or 3, got '4'"),
    (json.dumps({**HELLASWAG[0], "label": ""}), "label must be 0, 1, 2 or 3, got ''"),  # HF's unlabeled test split
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(DataError) as e:
        hellaswag.load_examples(str(path))
    assert str(e.value).startswith(f"{path}:2: {message}"), e.value


def test_load_skips_blank_lines_and_refuses_empty_or_missing_files(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n")
    assert hellaswag.load_examples(str(path)) == [HELLASWAG[0]] * 2
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no HellaSwag examples"):
        hellaswag.load_examples(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="nope.jsonl: cannot read"):
        hellaswag.load_examples(str(tmp_path / "nope.jsonl"))


def test_digit_string_labels_as_hugging_face_exports_write_them(tmp_path):
    path = tmp_path / "hf.jsonl"
    path.write_text("".join(json.dumps({**ex, "label": str(ex["label"])}) + "\n" for ex in HELLASWAG))
    assert hellaswag.load_examples(str(path)) == HELLASWAG


def test_download_once_atomically(tmp_path):
    src = write_hellaswag(tmp_path / "remote" / "hellaswag_val.jsonl")
    url, cache = pathlib.Path(src).as_uri(), str(tmp_path / "cache")
    path = hellaswag.download(cache, url)
    assert os.listdir(cache) == ["hellaswag_val.jsonl"] and hellaswag.load_examples(path) == HELLASWAG
    os.remove(src)
    assert hellaswag.download(cache, url) == path  # cached: not fetched again
    with pytest.raises(DataError, match="could not download .*--hellaswag_interval 0"):
        hellaswag.download(str(tmp_path / "other"), url)
    assert os.listdir(tmp_path / "other") == []  # no temporary file left behind


def test_cli_prints_acc_and_acc_norm(tmp_path, hf_dir, enc):
    _, path = hf_dir
    jsonl = write_hellaswag(tmp_path / "hs.jsonl")
    r = subprocess.run([sys.executable, "data/hellaswag.py", "--model", path, "--jsonl", jsonl, "--device", "cpu",
                        "--dtype", "float32", "--batch_size", "3", "--limit", "5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    model = GPT.from_pretrained(path).eval()
    correct, correct_norm, total = hellaswag.evaluate(lambda idx: model(idx)[0], hellaswag.prepare(HELLASWAG[:5], enc),
                                                      model.config.block_size, "cpu").tolist()
    assert r.stdout.strip().splitlines()[-1] == \
        f"{path} | float32 | 5 examples | acc {correct / 5:.4f} | acc_norm {correct_norm / 5:.4f}"


@pytest.mark.parametrize("args, message", [
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--model", "gpt5"], "--model: 'gpt5' is neither a directory nor one of gpt2"),
    (["--jsonl", "missing.jsonl"], "missing.jsonl: cannot read HellaSwag file"),
])
def test_cli_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, message):
    jsonl = write_hellaswag(tmp_path / "hs.jsonl")
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--jsonl", jsonl, "--device", "cpu"] + args)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_cli_refuses_a_missing_device_before_reading_anything(tmp_path, capsys, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:  # neither the jsonl nor the model exists: --device is checked first
        hellaswag.main(["--jsonl", str(tmp_path / "missing.jsonl"), "--model", "gpt5", "--device", device])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --device {device}: ") and err.count("\n") == 1, err


def test_training_logs_hellaswag_and_checks_its_file_first(tmp_path, capsys, shakespeare_dir):
    common = TINY + ["--data_dir", shakespeare_dir, "--compile", "false", "--device", "cpu", "--max_steps", "3",
                     "--val_steps", "1", "--hellaswag_interval", "2", "--out_dir", str(tmp_path / "out")]
    hs = write_hellaswag(tmp_path / "hs.jsonl")
    with pytest.raises(SystemExit) as e:  # the model's vocabulary cannot score real GPT-2 tokens
        train_main(common + ["--vocab_size", "256", "--hellaswag_path", hs])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--hellaswag_interval needs GPT-2's 50257 tokens, but the model has 256" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{GOOD}\n{{oops\n")
    with pytest.raises(SystemExit) as e:  # stops at start, before the model is built
        train_main(common + ["--hellaswag_path", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {bad}:2: not valid JSON") and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")
    r = run(common + ["--hellaswag_path", hs], timeout=120)
    assert r.returncode == 0, r.stderr
    logged = metrics(tmp_path / "out", "hellaswag_acc_norm")
    n = len(HELLASWAG)
    assert [s for s, _ in logged] == [0, 2] and all(abs(x * n - round(x * n)) < 1e-9 for _, x in logged)  # k / n
    assert [s for s, _ in metrics(tmp_path / "out", "hellaswag_acc")] == [0, 2]
    assert "step     2 | hellaswag acc " in r.stdout


def test_cli_refuses_a_model_without_gpt2s_vocabulary(tmp_path, capsys):
    _, small = make_hf(tmp_path)  # 128 tokens
    capsys.readouterr()  # transformers' warnings about the tiny vocab
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--model", small, "--jsonl", write_hellaswag(tmp_path / "hs.jsonl"), "--device", "cpu"])
    assert (e.value.code == 2
            and capsys.readouterr().err == f"error: --model: {small} has 128 tokens, not GPT-2's 50257\n")
