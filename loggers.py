"""Optional experiment trackers beside metrics.jsonl: TensorBoard (--tensorboard DIR) and Weights & Biases
(--wandb_project NAME). metrics.jsonl stays the record; MetricsLog hands each tracker a copy of every event.

    check_loggers(cfg)                          # at start: a missing package is one error line, before any work
    loggers = open_loggers(cfg, config, resumed=False)  # rank 0, once out_dir is claimed; config: what to record
    log = MetricsLog(path, True, loggers)       # log.write(step=..., train_loss=...), log.text(...), log.close()

Neither package is a dependency: each is imported only when its flag is given.
"""
import html
import importlib
import os

from cli import ConfigError, check_out_dir

# flag -> (the module we use, the pip package that provides it)
MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb_project": ("wandb", "wandb")}


def check_loggers(cfg):
    """Import what the flags ask for now, so a missing package (or an unwritable --tensorboard) stops the
    run at start in one line instead of after the data and the model have loaded."""
    if cfg.tensorboard:
        check_out_dir(cfg.tensorboard, "--tensorboard")
    for flag, (module, package) in MODULES.items():
        if getattr(cfg, flag):
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"--{flag}: needs the {package} package: pip install {package}") from None


def open_loggers(cfg, config, resumed):
    """The trackers the flags ask for (call on rank 0 only). config: the run's settings as trained (a dict, for
    wandb's config); resumed: the run continues from a checkpoint."""
    return ([TensorBoardLogger(cfg.tensorboard)] if cfg.tensorboard else []) + \
        ([WandbLogger(cfg, config, resumed)] if cfg.wandb_project else [])


class TensorBoardLogger:
    """Scalars and text into DIR's event files, flushed at every event (as metrics.jsonl is written), so a
    crash loses nothing. A resumed run adds an event file to the same DIR, which TensorBoard shows as one run
    (where a crash repeats steps after the checkpoint, its reader keeps the later ones)."""

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir)

    def scalars(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def text(self, step, name, texts):
        self.writer.add_text(name, "\n\n".join(f"```\n{t}\n```" for t in texts), step)  # markdown: keep newlines
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbLogger:
    """A wandb run: project --wandb_project, name the out_dir's basename, config the run's settings as trained.

    Its id is kept in out_dir/wandb_run_id, so a resumed run (--resume) continues the same wandb run.
    Each event is one history row with a `step` key, the x axis of every chart (define_metric): a resumed
    run that repeats steps after a crash adds rows rather than being dropped as out of order. Local files
    go to $WANDB_DIR, else out_dir/wandb/. WANDB_MODE=offline works without an account."""

    def __init__(self, cfg, config, resumed):
        import wandb
        self.wandb = wandb
        id_path = os.path.join(cfg.out_dir, "wandb_run_id")
        run_id = None
        if resumed and os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        try:
            self.run = wandb.init(project=cfg.wandb_project, name=os.path.basename(os.path.abspath(cfg.out_dir)),
                                  id=run_id, resume="allow" if run_id else None, config=config,
                                  dir=os.environ.get("WANDB_DIR") or cfg.out_dir)
        except wandb.errors.Error as e:  # not logged in, a bad project name, ...
            raise ConfigError(f"--wandb_project: wandb could not start the run ({str(e).splitlines()[0]}); log in "
                              f"with `wandb login`, or set WANDB_MODE=offline") from None
        with open(id_path, "w") as f:
            f.write(self.run.id + "\n")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def _log(self, row):
        self.run.log(row)

    def scalars(self, step, values):
        self._log({"step": step, **values})

    def text(self, step, name, texts):
        self._log({"step": step, name: self.wandb.Html("<pre>" + html.escape("\n\n".join(texts)) + "</pre>")})

    def close(self):
        self.run.finish()
