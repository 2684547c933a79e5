"""finetune_classify.py: parity with HF's GPT2ForSequenceClassification, a short real fine-tuning, errors."""
import csv
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, make_hf
from finetune_classify import GPTClassifier, check_train_out_dir, main, read_rows, set_trainable
from model import GPT, GPTConfig

KEYWORDS = {"food": "pizza", "sports": "football", "tech": "computer"}
FILLER = "the a of and to in is it that was for on are with as be at by this have from".split()


def synthetic(n, seed=0):
    """n (text, label) rows: filler words with the class's keyword at a random place."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(KEYWORDS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 12))]
        words.insert(rng.randint(0, len(words)), KEYWORDS[label])
        rows.append((" ".join(words), label))
    return rows


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


def write_jsonl(path, records):
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def hf_classifier(tmp_path, num_labels=3):
    """A random tiny GPT2ForSequenceClassification (vocab 50257, pad 50256), saved; return (model, dir)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    config = GPT2Config(**{**TINY, "vocab_size": 50257}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        num_labels=num_labels, pad_token_id=50256, id2label={0: "neg", 1: "neu", 2: "pos"})
    hf = GPT2ForSequenceClassification(config).eval()
    path = str(tmp_path / "hf_cls")
    hf.save_pretrained(path)
    return hf, path


def padded_batch(lengths, T):
    """Random real tokens (never the pad id 50256), right-padded with 50256: idx (B, T), mask (B, T)."""
    idx = torch.randint(0, 50256, (len(lengths), T))
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return idx.masked_fill(mask == 0, 50256), mask


def test_hf_parity_load_and_save(tmp_path):
    from transformers import GPT2ForSequenceClassification
    hf, path = hf_classifier(tmp_path)
    ours = GPTClassifier.from_pretrained(path).eval()
    assert ours.id2label == ["neg", "neu", "pos"] and ours.has_head
    idx, mask = padded_batch([9, 4, 1, 16], 16)
    with torch.no_grad():
        expected = hf(input_ids=idx, attention_mask=mask).logits  # HF finds the last token by pad_token_id
        torch.testing.assert_close(ours(idx, mask), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(idx[3:]), expected[3:], rtol=1e-5, atol=1e-5)  # no mask: all real
    ours.save_pretrained(str(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "merges.txt", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json", "vocab.json"]  # GPT-2's tokenizer too
    back, info = GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert back.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and back.config.pad_token_id == 50256
    with torch.no_grad():
        logits = back.eval()(input_ids=idx, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_lm_weights_get_a_fresh_head(tmp_path):
    _, lm_dir = make_hf(tmp_path, vocab_size=50257)
    with pytest.raises(ValueError, match="no classification head"):
        GPTClassifier.from_pretrained(lm_dir)
    lm = GPT.from_pretrained(lm_dir)
    GPT.from_pretrained(lm_dir).save_pretrained(str(tmp_path / "out" / "ckpt_000002"))  # a training out_dir
    for name in ("trainer.json", "trainer.pt"):
        (tmp_path / "out" / "ckpt_000002" / name).touch()
    for source in (lm_dir, str(tmp_path / "out")):
        model = GPTClassifier.from_pretrained(source, num_labels=4)
        assert not model.has_head and model.score.weight.shape == (4, 32) and model.id2label == ["0", "1", "2", "3"]
        assert 0.01 < model.score.weight.std().item() < 0.03
        for k, v in model.transformer.state_dict().items():
            torch.testing.assert_close(v, lm.transformer.state_dict()[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="classifies into 3 labels, the data has 2"):
        GPTClassifier.from_pretrained(hf_classifier(tmp_path)[1], num_labels=2)


def test_trainable_sets():
    model = GPTClassifier(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32), num_labels=2)

    def trainable(which):
        set_trainable(model, which)
        return {n for n, p in model.named_parameters() if p.requires_grad}
    trained = {which: trainable(which) for which in ("head", "last_block", "all")}
    assert trained["head"] == {"score.weight"}
    assert trained["last_block"] == {"score.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"} | \
        {n for n, _ in model.named_parameters() if n.startswith("transformer.h.1.")}
    assert trained["all"] == {n for n, _ in model.named_parameters()}


def test_forward_masks_and_length():
    model = GPTClassifier(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32), num_labels=2)
    idx, mask = padded_batch([5, 3], 8)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, mask.float()), model(idx, mask))  # HF-style float masks work
        torch.testing.assert_close(model(idx, mask)[1], model(idx[1:, :3])[0])  # padding changes nothing
        with pytest.raises(ValueError, match="attention_mask has a row without a real token"):
            model(idx, mask * torch.tensor([[1], [0]]))
        with pytest.raises(ValueError, match="sequence of 65 tokens is longer than block_size 64"):
            model(torch.zeros(1, 65, dtype=torch.long))


def test_csv_with_a_bom_reads_its_header(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("text,label\nhello there,pos\n", encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    assert read_rows(str(path), "--data", "text", "label") == [("hello there", "pos", f"{path}: line 2")]


def test_missing_splits_are_carved_from_train(tmp_path, capsys):
    _, lm_dir = make_hf(tmp_path, vocab_size=50257)
    data, test = write_csv(tmp_path / "d.csv", synthetic(40)), write_csv(tmp_path / "s.csv", synthetic(7, seed=1))
    common = ["--init_from", lm_dir, "--trainable", "head", "--epochs", "1", "--device", "cpu", "--dtype", "float32"]
    metrics = []
    for i, flags in enumerate((["--data", data], ["--train", data], ["--train", data, "--test", test])):
        main(flags + common + ["--out_dir", str(tmp_path / f"out{i}")])
        with open(tmp_path / f"out{i}" / "metrics.jsonl") as f:
            metrics.append(f.read())
    printed = [line for line in capsys.readouterr().out.splitlines() if " train / " in line]
    assert [line.split(",")[0] for line in printed] == ["32 train / 4 val / 4 test examples"] * 2 + \
        ["36 train / 4 val / 7 test examples"]
    assert metrics[0] == metrics[1]  # --train alone is split exactly as --data


def assert_one_error_line(capsys, args, message):
    capsys.readouterr()  # drop what preparing the inputs printed
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and message in err[0], err


def test_torchrun_and_bad_device_are_refused(monkeypatch, capsys):
    assert_one_error_line(capsys, ["--data", "x.csv", "--device", "gpu"], "--device: unknown device 'gpu'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cuda", "mps"):  # checked before the (missing) data is read
        assert_one_error_line(capsys, ["--data", "x.csv", "--device", device], f"--device {device}: ")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's: every rank would train alone and write the same out_dir
    assert_one_error_line(capsys, ["--data", "x.csv"], "runs in one process; start it with python, not torchrun")


def test_cli_fine_tunes_to_95_percent_and_predicts(tmp_path):
    _, lm_dir = make_hf(tmp_path, vocab_size=50257)
    data, out = write_csv(tmp_path / "data.csv", synthetic(400)), str(tmp_path / "out")
    r = subprocess.run([sys.executable, "finetune_classify.py", "--data", data, "--init_from", lm_dir, "--out_dir", out,
                        "--trainable", "all", "--lr", "3e-3", "--epochs", "8", "--device", "cpu", "--dtype", "float32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny matmuls: one thread, immune to a busy CPU
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    assert [e["epoch"] for e in events[:-1]] == list(range(1, 9))
    assert all({"step", "val_acc", "val_loss", "train_loss"} <= e.keys() for e in events[:-1])
    assert events[-1]["test_acc"] >= 0.95, r.stdout
    r = subprocess.run([sys.executable, "finetune_classify.py", "--out_dir", out, "--device", "cpu",  # no --init_from
                        "--predict", "this is a pizza that was on the"], cwd=ROOT, capture_output=True, text=True)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0] == "food" and len(lines) == 4, r.stdout + r.stderr
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["food", "sports", "tech"]


def test_head_only_leaves_the_transformer_unchanged_and_notes_truncation(tmp_path, capsys):
    _, lm_dir = make_hf(tmp_path, vocab_size=50257)
    rows = synthetic(40) + [(" ".join(["the"] * 100) + " pizza", "food")]  # 101 tokens > block_size 64
    out = str(tmp_path / "out")
    main(["--train", write_csv(tmp_path / "t.csv", rows), "--val", write_csv(tmp_path / "v.csv", rows[:10]),
          "--init_from", lm_dir, "--out_dir", out, "--trainable", "head", "--max_length", "1000",
          "--epochs", "1", "--device", "cpu", "--dtype", "float32"])
    assert "note: 1 of 51 texts are longer than 64 tokens; kept their first 64" in capsys.readouterr().out
    before, after = GPTClassifier.from_pretrained(lm_dir, num_labels=3), GPTClassifier.from_pretrained(out)
    for k, v in before.transformer.state_dict().items():
        assert torch.equal(v, after.transformer.state_dict()[k]), k
    assert not torch.equal(before.score.weight, after.score.weight)


def lm_run(p, ckpt):
    """A language-model training out_dir: its metrics.jsonl, with ckpt_* dirs or (crashed early) without."""
    (p / "lm").mkdir()
    events = [{"config": {}}, {"step": 0, "train_loss": 10.9}, {"step": 0, "val_loss": 11.0}]
    write_jsonl(p / "lm" / "metrics.jsonl", events)
    for step in (2, 4) if ckpt else ():
        (p / "lm" / f"ckpt_{step:06d}").mkdir()
    return str(p / "lm")


def checksums(path):
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in sorted(os.listdir(path))}


def test_a_finished_classifier_is_kept_unless_overwrite_true(tmp_path, capsys):
    """Training into an out_dir that holds a classifier is refused in one line and leaves every byte of it; with
    --overwrite true it is replaced. --predict still reads --out_dir, and a classifier run that saved no model yet
    (metrics.jsonl only) or a new directory need no flag."""
    _, path = hf_classifier(tmp_path)
    write_jsonl(tmp_path / "hf_cls" / "metrics.jsonl", [{"epoch": 1, "step": 3, "val_acc": 0.5, "val_loss": 0.7,
                                                          "train_loss": 0.8}, {"step": 3, "test_acc": 0.5}])
    before = checksums(tmp_path / "hf_cls")
    assert {"config.json", "model.safetensors", "metrics.jsonl"} <= before.keys()
    _, lm_dir = make_hf(tmp_path, vocab_size=50257)
    args = ["--data", write_csv(tmp_path / "d.csv", synthetic(40)), "--init_from", lm_dir, "--out_dir", path,
            "--trainable", "head", "--epochs", "1", "--device", "cpu", "--dtype", "float32"]
    refused = (f"error: --out_dir {path}: holds a fine-tuned classifier ({path}/config.json); fine-tuning would "
               f"replace it (pass --overwrite true, or pick another --out_dir)")
    assert_one_error_line(capsys, args, refused)
    assert checksums(tmp_path / "hf_cls") == before
    main(args + ["--overwrite", "true"])
    after = checksums(tmp_path / "hf_cls")
    assert all(after[name] != before[name] for name in ("config.json", "model.safetensors", "metrics.jsonl"))
    assert GPTClassifier.from_pretrained(path).id2label == ["food", "sports", "tech"]  # was neg/neu/pos
    capsys.readouterr()
    main(["--out_dir", path, "--predict", "this is a pizza", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] in KEYWORDS and len(lines) == 4 and checksums(tmp_path / "hf_cls") == after
    (tmp_path / "crashed").mkdir()
    write_jsonl(tmp_path / "crashed" / "metrics.jsonl", [{"epoch": 1, "step": 3, "val_acc": 0.5, "val_loss": 0.7}])
    for out_dir in (str(tmp_path / "crashed"), str(tmp_path / "new" / "out")):
        assert check_train_out_dir(out_dir) == out_dir


@pytest.mark.parametrize("make, message", [
    (lambda p: ["--data", write_csv(p / "d.csv", [("a b", "x")] * 5, header=("text", "y"))],
     "d.csv: no column 'label' (columns: text, y; set --label_field)"),
    (lambda p: ["--data", write_jsonl(p / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}] * 3)],
     "d.jsonl: line 2: label 'pos' mixes integers and class names (first label 0"),
    (lambda p: ["--data", write_jsonl(p / "d.jsonl", [{"text": "a", "label": 1.5}] * 3)],
     "d.jsonl: line 1: label 1.5 is neither an integer nor a class name"),
    (lambda p: ["--data", write_jsonl(p / "d.jsonl", [{"text": "a", "label": "x"}] * 3)],
     "every label is 'x'; need at least two classes"),
    (lambda p: ["--data", write_jsonl(p / "d.jsonl", [{"text": "a"}])], "d.jsonl: line 1: no field 'label'"),
    (lambda p: ["--train", write_csv(p / "t.csv", synthetic(5)), "--val", str(p / "v.jsonl")],
     "--val {p}/v.jsonl: no such file"),
    (lambda p: ["--data", write_text(p / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b",\n')],
     "d.jsonl: line 2: not valid JSON"),
    (lambda p: ["--data", write_jsonl(p / "d.jsonl", [])], "--data {p}/d.jsonl: no rows (an empty file?)"),
    (lambda p: ["--data", str(p / "nope.csv")], "--data {p}/nope.csv: no such file"),
    (lambda p: ["--data", write_jsonl(p / "d.txt", [])], "d.txt: unknown extension; expected .csv or .jsonl"),
    (lambda p: ["--val", write_jsonl(p / "d.jsonl", [])], "give --data FILE or --train FILE [--val FILE]"),
    *[(lambda p, bad=bad: ["--data", write_text(p / "d.jsonl", '{"text": "a", "label": 0}\n' + bad + "\n")],
       "d.jsonl: line 2: not a JSON object") for bad in ("null", "5", "[1]")],
    (lambda p: ["--train", write_jsonl(p / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])],
     "--train {p}/d.jsonl: 2 rows are too few to split off val and test"),
    (lambda p: ["--out_dir", str(p / "none"), "--predict", "hi"], "--init_from: '{p}/none' is neither a directory"),
    (lambda p: ["--data", "x.csv", "--trainable", "some"], "argument --trainable: invalid choice: 'some'"),
    (lambda p: ["--data", write_csv(p / "d.csv", synthetic(5)), "--init_from", str(p)],
     "--init_from: {p} holds no model (config.json) and no complete checkpoint"),
    (lambda p: ["--init_from", make_hf(p, vocab_size=50257)[1], "--predict", "hi"], "has no classification head"),
    (lambda p: ["--data", write_jsonl(p / "d.jsonl", [{"text": "a", "label": y} for y in (0, 1, 0, 1, 100000, 1)])],
     "d.jsonl: line 5: label 100000 leaves a gap; integer labels must be 0..K-1, "
     "and the 3 labels seen are 0, 1, 100000"),
    (lambda p: ["--data", write_jsonl(p / "d.jsonl", [{"text": "a", "label": y} for y in (0, 2, 0, 2)])],
     "d.jsonl: line 2: label 2 leaves a gap; integer labels must be 0..K-1, and the 2 labels seen are 0, 2"),
    (lambda p: ["--data", "x.csv", "--seed", "-1"], "--seed: must be in 0..4294967295, got -1"),
    (lambda p: ["--data", "x.csv", "--seed", str(2**32)], "--seed: must be in 0..4294967295, got 4294967296"),
    (lambda p: ["--data", "x.csv", "--out_dir", write_text(p / "f", "x") + "/out"],
     "--out_dir {p}/f/out: {p}/f is a file, not a directory"),
    (lambda p: ["--data", "x.csv", "--out_dir", make_hf(p, vocab_size=50257)[1]],
     "--out_dir {p}/hf: holds a model that is not a classifier ({p}/hf/config.json: architectures "
     "['GPT2LMHeadModel']); fine-tuning would overwrite it (pick another --out_dir)"),
    (lambda p: ["--data", "x.csv", "--out_dir", lm_run(p, ckpt=True)],
     "--out_dir {p}/lm: holds a language-model training run (ckpt_000004); fine-tuning would overwrite it"),
    (lambda p: ["--data", "x.csv", "--out_dir", lm_run(p, ckpt=False)],
     "--out_dir {p}/lm: holds a language-model training run ({p}/lm/metrics.jsonl: line 2 logs train_loss)"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make, message):
    assert_one_error_line(capsys, make(tmp_path) + ["--device", "cpu"], message.format(p=tmp_path))


def test_cli_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "finetune_classify.py", "--data", str(tmp_path / "missing.jsonl")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == f"error: --data {tmp_path / 'missing.jsonl'}: no such file\n"
