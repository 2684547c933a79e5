"""explore.ipynb runs top to bottom offline; plot.py draws its panels and rejects bad files in one line."""
import json
import os
import subprocess
import sys

import nbformat
import pytest

import plot
from conftest import ROOT
from plot import GPT2_124M_VAL_LOSS, GPT3_124M_HELLASWAG, load_runs, main, plot_runs, read_metrics

NOTEBOOK = os.path.join(ROOT, "explore.ipynb")


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert code_cells(nb)[0].source == 'MODEL = "gpt2"'
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells(nb))


def this_python_kernel(tmp_path):
    """A KernelManager whose "python3" kernel is this interpreter, whatever python3 kernelspec the
    machine has elsewhere (a user-level one may name another Python)."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def test_notebook_runs_offline(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub fails at once instead of retrying for ~25 s
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(nb, km=this_python_kernel(tmp_path), timeout=120,
                   resources={"metadata": {"path": ROOT}}).execute()  # raises CellExecutionError on any failure
    outputs = [o for c in code_cells(nb) for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("max abs diff ours vs HF", "logits agree", "same greedy tokens", "min val loss"):
        assert line in text, text
    assert text.strip().splitlines()[-1] == sys.executable  # the kernel ran this interpreter
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # wpe and the loss panels


def write_metrics(path, events, extra_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + "".join(extra_lines))
    return path


# A resumed run: step 1 was logged, the run died, and step 1 was logged again after the restart.
EVENTS = [{"step": 0, "val_loss": 10.9}, {"step": 0, "train_loss": 11.0, "lr": 1e-3, "mfu": None},
          {"step": 1, "train_loss": 9.0}, {"step": 1, "train_loss": 8.5, "note": "resumed"},
          {"step": 2, "train_loss": 8.0}, {"step": 2, "val_loss": 8.2}]


def test_read_metrics_later_line_wins(tmp_path):
    m = read_metrics(write_metrics(tmp_path / "metrics.jsonl", EVENTS, ["\n"]))
    assert m["train_loss"] == ([0, 1, 2], [11.0, 8.5, 8.0])
    assert m["val_loss"] == ([0, 2], [10.9, 8.2])
    assert "note" not in m and "mfu" not in m and "hellaswag_acc_norm" not in m


def test_plot_cli_writes_png_with_baselines(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "metrics.jsonl", EVENTS)
    r = subprocess.run([sys.executable, "plot.py", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "last step 2" in r.stdout and "min val loss 8.2000" in r.stdout
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss_ax, hella_ax = plot_runs([str(run)]).axes
    assert GPT2_124M_VAL_LOSS in [line.get_ydata()[0] for line in loss_ax.lines]
    assert [t.get_text() for t in hella_ax.texts] == ["no HellaSwag evals in this run"]


def test_plot_with_hellaswag_and_two_runs(tmp_path):
    a = write_metrics(tmp_path / "a" / "metrics.jsonl", EVENTS + [{"step": 2, "hellaswag_acc_norm": 0.25}]).parent
    b = write_metrics(tmp_path / "b" / "metrics.jsonl", EVENTS).parent
    fig = plot_runs([str(a), str(b)], out=str(tmp_path / "both.png"))
    hella_ax = fig.axes[1]
    assert len(hella_ax.texts) == 0 and (tmp_path / "both.png").stat().st_size > 0
    ys = [list(line.get_ydata()) for line in hella_ax.lines]
    assert [0.25] in ys and [GPT3_124M_HELLASWAG] * 2 in ys


def test_cli_reads_each_file_once_and_plot_runs_takes_loaded_runs(tmp_path, monkeypatch, capsys):
    a = write_metrics(tmp_path / "a" / "metrics.jsonl", EVENTS + [{"step": 2, "hellaswag_acc_norm": 0.25}]).parent
    b = write_metrics(tmp_path / "b" / "metrics.jsonl", EVENTS).parent
    read = []
    monkeypatch.setattr(plot, "read_metrics", lambda path: read.append(path) or read_metrics(path))
    main([str(a), str(b), "--out", str(tmp_path / "both.png")])
    assert read == [str(a / "metrics.jsonl"), str(b / "metrics.jsonl")]
    assert "max HellaSwag 0.2500" in capsys.readouterr().out
    runs = load_runs([str(a)])
    read.clear()
    assert [list(line.get_ydata()) for line in plot_runs(runs).axes[1].lines][0] == [0.25] and read == []


def test_usage_error_is_one_line(tmp_path):
    for args in ([], [str(tmp_path), "--bogus"]):
        r = subprocess.run([sys.executable, "plot.py"] + args, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, \
            r.stderr


@pytest.mark.parametrize("out, written, magic", [("loss", "loss.png", b"\x89PNG"), ("a.png", "a.png", b"\x89PNG"),
                                                 ("a.pdf", "a.pdf", b"%PDF"), ("A.SVG", "A.SVG", b"<?xml")])
def test_out_prints_the_file_it_wrote(tmp_path, capsys, out, written, magic):
    """--out's extension picks the format; with none, .png is added, and "wrote ..." names the real file."""
    write_metrics(tmp_path / "run" / "metrics.jsonl", EVENTS)
    main([str(tmp_path / "run"), "--out", str(tmp_path / out)])
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / written}"
    assert (tmp_path / written).read_bytes().startswith(magic)
    assert sorted(os.listdir(tmp_path)) == sorted(["run", written])


def test_unknown_out_extension_is_one_line(tmp_path, capsys):
    write_metrics(tmp_path / "run" / "metrics.jsonl", EVENTS)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run"), "--out", str(tmp_path / "x.xyz")])
    assert e.value.code == 2 and capsys.readouterr().err == \
        f"error: --out {tmp_path / 'x.xyz'}: unknown extension '.xyz'; use one of .png, .pdf, .svg\n"
    assert os.listdir(tmp_path) == ["run"]


@pytest.mark.parametrize("lines, where", [
    (['{"step": 0, "val_loss": 1.0}\n', '{"step": 1, "val_lo\n'], "metrics.jsonl:2: not JSON"),
    (['{"val_loss": 1.0}\n'], "metrics.jsonl:1: expected a JSON object with an integer \"step\""),
    (['[1, 2]\n'], "metrics.jsonl:1: expected a JSON object"),
    ([b"\xff\xfe\n"], "metrics.jsonl:1: not JSON"),
])
def test_malformed_line_is_named(tmp_path, capsys, lines, where):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(s if isinstance(s, bytes) else s.encode() for s in lines))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {path}") and where in err, err


def test_missing_run_exits_2_with_one_line(tmp_path):
    for run, message in ((tmp_path / "nope", "no such directory"), (tmp_path, "metrics.jsonl: no such file")):
        r = subprocess.run([sys.executable, "plot.py", str(run)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {run}") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content, why", [
    (b"", "the file is empty"), (b"\n  \n\n", "the file is empty"),
    (b'{"step": 0, "config": {"lr": 0.1}}\n', "1 event, none with train_loss, val_loss or hellaswag_acc_norm"),
    (b'{"step": 0, "lr": 0.001}\n\n{"step": 1, "note": "x"}\n', "2 events, none with train_loss, val_loss or "
                                                               "hellaswag_acc_norm")])
def test_nothing_to_plot_is_one_line_and_writes_no_figure(tmp_path, content, why):
    """A run that has logged nothing plottable yet: exit 2, one line naming the file, no loss.png."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(content)
    r = subprocess.run([sys.executable, "plot.py", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {tmp_path / 'run' / 'metrics.jsonl'}: nothing to plot ({why})\n"
    assert os.listdir(tmp_path / "run") == ["metrics.jsonl"]
    write_metrics(tmp_path / "good" / "metrics.jsonl", EVENTS)  # next to a good run, too: nothing written
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "good"), str(tmp_path / "run"), "--out", str(tmp_path / "both.png")])
    assert e.value.code == 2 and sorted(os.listdir(tmp_path)) == ["good", "run"]
