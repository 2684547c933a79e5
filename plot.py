"""Plot training runs from their metrics.jsonl: loss and HellaSwag against GPT-2/GPT-3 baselines.

    python plot.py out-shakespeare                     # -> out-shakespeare/loss.png
    python plot.py out-a out-b --out compare.png       # several runs on the same axes

Two panels, as in build-nanogpt's play.ipynb: (1) train loss (light) and val loss with OpenAI
GPT-2 124M's val loss on FineWeb-Edu val; (2) HellaSwag acc_norm with GPT-2 124M's and GPT-3
124M's scores. explore.ipynb imports load_runs and plot_runs from here. No torch import, so it starts fast.
"""
import argparse
import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cli import ConfigError, OneLineParser, run_main  # no torch: plot.py starts fast
from data import DataError  # a missing or malformed metrics file

# Reference numbers (build-nanogpt's play.ipynb), not ours.
GPT2_124M_VAL_LOSS = 3.2924  # OpenAI GPT-2 124M checkpoint, FineWeb-Edu val
GPT2_124M_HELLASWAG = 0.2945  # acc_norm (play.ipynb: 0.294463)
GPT3_124M_HELLASWAG = 0.337  # acc_norm, GPT-3 paper's 125M model
FORMATS = (".png", ".pdf", ".svg")  # --out's extension picks one; none means .png
PLOTTED = ("train_loss", "val_loss", "hellaswag_acc_norm")  # the keys the panels draw


def metrics_path(run):
    """run is a training out_dir (holding metrics.jsonl) or the metrics file itself."""
    if os.path.isfile(run):
        return run
    if not os.path.isdir(run):
        raise DataError(f"{run}: no such directory")
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (train with --out_dir {run} first)")
    return path


def read_metrics(path):
    """metrics.jsonl -> {key: (steps, values)}, sorted by step, for every numeric key.

    A resumed run appends, so a step can appear twice for a key: the later line wins. Blank lines
    and non-numeric extra keys are skipped; a line that is not a JSON object with an integer
    "step" raises DataError naming the file and line.
    """
    by_key = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                raise DataError(f"{path}:{lineno}: not JSON ({e})") from None
            step = event.get("step") if isinstance(event, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise DataError(f"{path}:{lineno}: expected a JSON object with an integer \"step\"")
            for key, value in event.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    by_key.setdefault(key, {})[step] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def load_runs(runs):
    """{run: read_metrics' dict} for each run (an out_dir or a metrics file), in order. A run with nothing to plot
    (an empty file, or no train_loss, val_loss or hellaswag_acc_norm in it) is a DataError naming its file."""
    loaded = {}
    for run in runs:
        loaded[run] = read_metrics(path := metrics_path(run))
        if not any(key in loaded[run] for key in PLOTTED):
            with open(path, "rb") as f:
                events = sum(1 for line in f if line.strip())
            why = f"{events} event{'s' * (events > 1)}, none with {', '.join(PLOTTED[:-1])} or {PLOTTED[-1]}" \
                if events else "the file is empty"
            raise DataError(f"{path}: nothing to plot ({why})")
    return loaded


def plot_runs(runs, out=None):
    """Draw the two panels for each run; save to `out` if given. `runs` is a list of out_dirs or metrics
    files, or load_runs' dict when the caller has read them already.

    Returns the matplotlib Figure. It is built without pyplot, so importing or calling this never
    changes the caller's backend (a notebook still shows it inline) and leaks no global figures.
    """
    runs = runs if isinstance(runs, dict) else load_runs(runs)
    data = [(os.path.basename(os.path.normpath(r)) or r, m) for r, m in runs.items()]
    fig = Figure(figsize=(14, 5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, hella_ax = fig.subplots(1, 2, sharex=True)  # one step axis, also when HellaSwag is empty
    for i, (name, m) in enumerate(data):
        color = f"C{i % 10}"
        if "train_loss" in m:
            loss_ax.plot(*m["train_loss"], color=color, alpha=0.3, label=f"{name} train loss")
        if "val_loss" in m:
            loss_ax.plot(*m["val_loss"], color=color, marker=".", label=f"{name} val loss")
        if "hellaswag_acc_norm" in m:
            hella_ax.plot(*m["hellaswag_acc_norm"], color=color, marker=".", label=name)
    loss_ax.axhline(GPT2_124M_VAL_LOSS, color="r", linestyle="--",
                    label=f"OpenAI GPT-2 124M checkpoint val loss ({GPT2_124M_VAL_LOSS})")
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="Loss")  # log: early and late losses both readable
    plain = FuncFormatter(lambda y, _: f"{y:g}")  # 3, 4, 10 rather than 3x10^0
    loss_ax.yaxis.set_major_formatter(plain)
    loss_ax.yaxis.set_minor_formatter(plain)
    hella_ax.axhline(GPT2_124M_HELLASWAG, color="r", linestyle="--", label=f"OpenAI GPT-2 124M ({GPT2_124M_HELLASWAG})")
    hella_ax.axhline(GPT3_124M_HELLASWAG, color="g", linestyle="--", label=f"OpenAI GPT-3 124M ({GPT3_124M_HELLASWAG})")
    hella_ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
    if not any("hellaswag_acc_norm" in m for _, m in data):
        hella_ax.text(0.5, 0.5, f"no HellaSwag evals in {'this run' if len(data) == 1 else 'these runs'}",
                      transform=hella_ax.transAxes, ha="center", va="center", color="gray")
    for ax in (loss_ax, hella_ax):
        ax.legend(fontsize="small")
    if out:
        fig.savefig(out, dpi=100)
    return fig


def summary(metrics):
    """read_metrics' dict -> one line: last step, last train loss, min val loss, max HellaSwag."""
    picks = {"train_loss": ("last train loss", lambda v: v[-1]), "val_loss": ("min val loss", min),
             "hellaswag_acc_norm": ("max HellaSwag", max)}
    last = max((steps[-1] for steps, _ in metrics.values()), default=None)
    parts = [f"{label} {pick(metrics[key][1]):.4f}" for key, (label, pick) in picks.items() if key in metrics]
    return " | ".join([f"last step {last}" if last is not None else "no events"] + parts)


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="OUT_DIR", help="training out_dir(s) with metrics.jsonl")
    parser.add_argument("--out", help=f"image to write, {'/'.join(FORMATS)} by its extension "
                                      f"(default: OUT_DIR/loss.png for one run, loss.png for several)")

    def run():
        args = parser.parse_args(argv)
        out = args.out or (os.path.join(args.runs[0], "loss.png") if len(args.runs) == 1 and os.path.isdir(args.runs[0])
                           else "loss.png")
        ext = os.path.splitext(out)[1]
        if not ext:
            out += ".png"  # what matplotlib would write anyway; named here so that "wrote ..." is the real path
        elif ext.lower() not in FORMATS:
            raise ConfigError(f"--out {out}: unknown extension {ext!r}; use one of {', '.join(FORMATS)}")
        runs = load_runs(args.runs)
        plot_runs(runs, out)
        for name, metrics in runs.items():
            print(f"{name}: {summary(metrics)}")
        print(f"wrote {out}")
    run_main(run)  # a bad flag, metrics file or --out (DataError, ConfigError, OSError): one line, exit 2


if __name__ == "__main__":
    main()
