"""loggers.py: --tensorboard and --wandb_project get the events of metrics.jsonl, read back from their own files."""
import glob
import html
import json
import os
import struct
import sys

import pytest

from checkpoint import run_contents
from conftest import HELLASWAG, write_hellaswag
from test_train import one_error, tiny, train_main


def run_args(shakespeare_dir, out, tmp_path, *extra):
    """2 tiny steps with every kind of event: train, val and HellaSwag at steps 0 and 1, samples at 1."""
    return tiny(shakespeare_dir, out, "--max_steps", 2, "--val_steps", 1, "--hellaswag_interval", 100,
                "--hellaswag_path", write_hellaswag(tmp_path / "hs.jsonl", HELLASWAG[:2]), "--sample_interval", 1,
                "--sample_tokens", 4, *extra)


def events(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def number_events(out_dir):
    return [e for e in events(out_dir) if "samples" not in e]


def samples(out_dir):
    return {e["step"]: e["samples"] for e in events(out_dir) if "samples" in e}


def test_tensorboard_gets_every_metrics_event_and_the_samples(tmp_path, shakespeare_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, tb = tmp_path / "out", tmp_path / "tb"
    code, _, err = train_main(run_args(shakespeare_dir, out, tmp_path, "--tensorboard", tb), capsys)
    assert code == 0, err
    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    expected = {}
    for e in number_events(out):
        for key, value in e.items():
            if key != "step":
                expected.setdefault(key, []).append((e["step"], value))
    assert {"train_loss", "lr", "norm", "tokens_per_sec", "val_loss", "hellaswag_acc",
            "hellaswag_acc_norm"} <= set(expected)
    assert sorted(ea.Tags()["scalars"]) == sorted(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in ea.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), key
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors("samples/text_summary")}
    assert set(texts) == set(samples(out)) == {1}
    for step, sample_list in samples(out).items():
        assert len(sample_list) == 2 and all(s and s in texts[step] for s in sample_list)


def wandb_records(run_dir):
    """The protobuf Records of an offline run's .wandb file: LevelDB's log format (32 KiB blocks of chunks with
    a 7-byte header: crc, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after wandb's 7-byte file header."""
    from wandb.proto.wandb_internal_pb2 import Record
    [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(chunk))
            chunk = b""
    return records


def wandb_run(run_dir):
    """(run record, config dict, history rows) of an offline wandb run."""
    records = wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {}
    for update in [*run.config.update] + [u for r in records if r.WhichOneof("record_type") == "config"
                                          for u in r.config.update]:
        config[update.key] = json.loads(update.value_json)
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return run, config, rows


@pytest.fixture
def wandb_env(monkeypatch):
    """Offline wandb, set up afresh from this test's environment; call the returned function (wandb.teardown)
    before reading a run's files: wandb keeps process-wide state (the mode it read at first use, and a service
    process that may still be writing the run's file after finish())."""
    import wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # files go to out_dir/wandb
    wandb.teardown()
    yield wandb.teardown
    wandb.teardown()


def test_wandb_offline_run_holds_the_config_every_metrics_event_and_the_samples(tmp_path, shakespeare_dir, capsys,
                                                                                 wandb_env, monkeypatch):
    import train_gpt2
    out = tmp_path / "my-run"
    args = [a for a in run_args(shakespeare_dir, out, tmp_path, "--wandb_project", "gpt2-tests")
            if a not in ("--dtype", "float32")]  # dtype auto: wandb's config must get the resolved dtype
    monkeypatch.setattr(train_gpt2, "pick_dtype", lambda dtype, device: ("float32", "stub"))  # auto -> float32
    code, _, err = train_main(args, capsys)
    assert code == 0, err
    wandb_env()
    [run_dir] = glob.glob(str(out / "wandb" / "offline-run-*"))
    run, config, rows = wandb_run(run_dir)
    assert (run.project, run.display_name) == ("gpt2-tests", "my-run")
    assert run.run_id == (out / "wandb_run_id").read_text().strip() and run_dir.endswith(run.run_id)
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["dtype"] == "auto" and recorded["loss"] == "fused"  # the TrainConfig as given ...
    assert {k: config[k] for k in recorded} == {**recorded, "dtype": "float32"}  # ... and as trained: auto resolved
    assert config["max_steps"] == 2

    numbers = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows  # _step, _runtime: wandb's
               if not any(k.startswith("samples") for k in row)]
    assert numbers == [pytest.approx(e) for e in number_events(out)]
    assert {"train_loss", "val_loss", "hellaswag_acc_norm", "tokens_per_sec"} <= {k for e in numbers for k in e}
    html_rows = {row["step"]: row for row in rows if "samples/path" in row}
    assert set(html_rows) == set(samples(out)) == {1}
    for step, sample_list in samples(out).items():
        with open(os.path.join(run_dir, "files", html_rows[step]["samples/path"])) as f:
            page = f.read()
        assert all(s and html.escape(s) in page for s in sample_list)


def test_resumed_run_continues_the_same_wandb_run_a_fresh_one_starts_another(tmp_path, shakespeare_dir, capsys,
                                                                             wandb_env):
    out = tmp_path / "out"
    out.mkdir()
    (out / "wandb_run_id").write_text("oldrun\n")  # left by an earlier run: a fresh run does not continue it
    args = tiny(shakespeare_dir, out, "--max_steps", 2, "--val_steps", 1, "--wandb_project", "p")
    assert train_main(args + ["--run_steps", "1"], capsys)[0] == 0
    first = (out / "wandb_run_id").read_text().strip()
    assert first != "oldrun"
    assert train_main(args + ["--resume", "auto"], capsys)[0] == 0
    wandb_env()
    assert (out / "wandb_run_id").read_text().strip() == first
    runs = [wandb_run(r) for r in glob.glob(str(out / "wandb" / "offline-run-*"))]  # one local dir per invocation
    assert len(runs) == 2 and {run.run_id for run, _, _ in runs} == {first}
    assert sorted([row["step"] for row in rows if "train_loss" in row] for _, _, rows in runs) == [[0], [1]]


@pytest.mark.parametrize("flag, module, package", [("--tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                   ("--wandb_project", "wandb", "wandb")])
def test_missing_package_is_one_line_before_data_or_model(tmp_path, capsys, monkeypatch, flag, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "out"
    code, _, err = train_main(tiny(str(tmp_path / "no_shards"), out, "--max_steps", 1, flag, "x"), capsys)
    one_error(code, err, f"{flag}: needs the {package} package: pip install {package}")
    assert not out.exists()


def test_wandb_that_cannot_start_is_one_line_and_leaves_no_run(tmp_path, shakespeare_dir, capsys, monkeypatch,
                                                               wandb_env):
    monkeypatch.setenv("WANDB_MODE", "online")  # and not logged in:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved login
    monkeypatch.delenv("WANDB_CONFIG_DIR", raising=False)
    wandb_env()  # so wandb reads WANDB_MODE now
    out = tmp_path / "out"
    code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 1, "--wandb_project", "p"), capsys)
    one_error(code, err, "--wandb_project: wandb could not start the run", "WANDB_MODE=offline")
    assert run_contents(out) == []  # so the same command runs once logged in


def test_tensorboard_dir_that_cannot_be_written_is_one_line_at_start(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code, _, err = train_main(tiny(str(tmp_path / "no_shards"), tmp_path / "out", "--max_steps", 1,
                                   "--tensorboard", tmp_path / "a_file" / "tb"), capsys)
    one_error(code, err, f"--tensorboard {tmp_path / 'a_file' / 'tb'}: {tmp_path / 'a_file'} is a file")


def test_other_ranks_open_no_logger(tmp_path, shakespeare_dir, capsys, monkeypatch, wandb_env):
    from runtime import Dist
    monkeypatch.setattr(Dist, "master", property(lambda d: False))  # this process runs as a rank other than 0
    out, tb = tmp_path / "out", tmp_path / "tb"
    code, _, err = train_main(tiny(shakespeare_dir, out, "--max_steps", 1, "--val_steps", 1, "--tensorboard", tb,
                                   "--wandb_project", "p"), capsys)
    assert code == 0, err
    assert not tb.exists() and not (out / "wandb").exists() and not (out / "wandb_run_id").exists()
