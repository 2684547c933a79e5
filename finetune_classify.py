"""Fine-tune GPT-2 as a text classifier: a linear head read at each text's last token, as Hugging Face's
GPT2ForSequenceClassification, whose file format it loads and saves.

    python finetune_classify.py --data reviews.csv --init_from gpt2 --out_dir out-classify   # split 80/10/10
    python finetune_classify.py --train t.jsonl --val v.jsonl --test s.jsonl --trainable head
    python finetune_classify.py --out_dir out-classify --predict "What a wonderful film"

Data: .csv (with a header row) or .jsonl, fields --text_field (text) and --label_field (label). Labels are
integers 0..K-1, each used, or class names (ids in sorted order, saved as id2label). A --val or --test not given is 10%
of --train (seeded). Texts are encoded with GPT-2's BPE and cut to --max_length tokens, keeping their start
(a note says how many were cut); batches are right-padded with <|endoftext|> under an attention mask. After
each epoch the model with the best val accuracy so far is written to out_dir; the test accuracy is that model's.
An out_dir holding a finished classifier is refused unless --overwrite true (then it is replaced); one holding a
language model or its training run is always refused.
"""
import argparse
import csv
import json
import os
import random
from dataclasses import asdict

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

import hf
from checkpoint import MetricsLog, load_model, model_dir
from cli import ConfigError, OneLineParser, check_out_dir, check_seed, parse_bool, run_main
from data import DataError
from data.fineweb import parse_json_line, text_field_of
from data.tokenizer import EOT, get_encoding
from model import GPT, GPT2_SHAPES, GPTConfig
from optim import configure_optimizers
from runtime import DTYPES, check_float16, make_autocast, make_scaler, pick_dtype, resolve_device

EXTENSIONS = (".csv", ".jsonl")
TRAINABLE = {"head": ("score.",), "last_block": ("score.", "transformer.h.{last}.", "transformer.ln_f."), "all": ("",)}
DEFAULT_LR = {"head": 1e-3, "last_block": 2e-4, "all": 5e-5}


class GPTClassifier(nn.Module):
    """GPT-2's trunk (model.Transformer, HF's GPT2Model) plus `score`, a bias-free linear head over the hidden
    state (after ln_f) of each sequence's last real token. Parameter names are HF's (transformer.*, score.weight)."""

    def __init__(self, config, num_labels, id2label=None):
        super().__init__()
        self.config = config
        self.transformer = GPT(config).transformer  # initialised as GPT-2's
        self.score = nn.Linear(config.n_embd, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        self.id2label = list(id2label or [str(i) for i in range(num_labels)])
        self.has_head = False  # set by from_pretrained when the head's weights were loaded

    def forward(self, idx, attention_mask=None):
        """idx (B, T) -> logits (B, num_labels). attention_mask (B, T): 1 for tokens, 0 for RIGHT padding;
        None means every token is real. Attention is causal, so padding never reaches a real token."""
        B, T = idx.size()
        x = self.transformer(idx)  # (B, T, C)
        last = torch.full((B,), T, device=idx.device) if attention_mask is None else attention_mask.long().sum(1)
        if (last == 0).any():
            raise ValueError("attention_mask has a row without a real token")
        return self.score(x[torch.arange(B, device=idx.device), last - 1])  # (B, num_labels)

    @classmethod
    def from_pretrained(cls, name_or_path, num_labels=None):
        """An HF GPT2ForSequenceClassification dir (with its head and labels), or GPT-2 weights with a fresh
        head of num_labels: an HF GPT2LMHeadModel dir, a gpt2* name, our training out_dir or ckpt dir."""
        path, labels = model_dir(name_or_path), None
        config, sd = hf.read(path, GPT2_SHAPES)
        head = sd.pop("score.weight", None)
        if head is not None:
            with open(os.path.join(path, "config.json")) as f:
                id2label = json.load(f).get("id2label") or {}
            labels = [id2label.get(str(i), str(i)) for i in range(head.size(0))]
        if head is None and num_labels is None:
            raise ValueError(f"{name_or_path} has no classification head (score.weight); fine-tune one first")
        if head is not None and num_labels not in (None, head.size(0)):
            raise ValueError(f"{name_or_path} classifies into {head.size(0)} labels, the data has {num_labels}")
        model = cls(GPTConfig(**config), num_labels or head.size(0), labels)
        sd = {k: v for k, v in hf.hf_to_ours(sd).items() if k != "lm_head.weight"}  # the trunk's weights
        hf.load_checked(model, {**sd, "score.weight": model.score.weight.data if head is None else head}, source=path)
        model.has_head = head is not None
        return model

    def save_pretrained(self, path):
        """Write config.json and model.safetensors as HF's GPT2ForSequenceClassification (Conv1D weights
        transposed back), each under a temporary name renamed into place."""
        config = {**hf.config_to_hf(asdict(self.config)), "architectures": ["GPT2ForSequenceClassification"],
                  "num_labels": len(self.id2label), "id2label": dict(enumerate(self.id2label)),
                  "label2id": {name: i for i, name in enumerate(self.id2label)}, "pad_token_id": EOT,
                  "problem_type": "single_label_classification"}
        hf.write_dir(path, hf.ours_to_hf(self.state_dict()), config)


def read_rows(path, flag, text_field, label_field):
    """[(text, raw label, 'file: line n')] of a .csv or .jsonl file; DataError naming the file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file")
    if not path.endswith(EXTENSIONS):
        raise DataError(f"{flag} {path}: unknown extension; expected {' or '.join(EXTENSIONS)}")
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drop the BOM Excel writes
            if path.endswith(".csv"):
                reader = csv.DictReader(f)
                for name, field in (("text_field", text_field), ("label_field", label_field)):
                    if reader.fieldnames and field not in reader.fieldnames:
                        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(reader.fieldnames)}; "
                                        f"set --{name})")
                records = ((rec, f"{path}: line {reader.line_num}") for rec in reader)
            else:
                records = ((parse_json_line(line, path, n), f"{path}: line {n}")
                           for n, line in enumerate(f, 1) if line.strip())
            for rec, where in records:
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: not a JSON object")
                if label_field not in rec or rec[label_field] is None:
                    raise DataError(f"{where}: no field {label_field!r} (set --label_field)")
                rows.append((text_field_of(rec, text_field, where), rec[label_field], where))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not valid CSV ({e})") from None
    if not rows:
        raise DataError(f"{flag} {path}: no rows (an empty file?)")
    return rows


def label_value(raw, where):
    """A raw label as an int (an int or a digit string) or a class name (a string, stripped)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).strip():
        raise DataError(f"{where}: label {raw!r} is neither an integer nor a class name")
    s = str(raw).strip()
    return int(s) if s.removeprefix("-").isdecimal() else s


def label_names(rows):
    """Check that the labels are all integers 0..K-1 (each one used) or all class names, and return the names:
    '0'..'K-1', or the class names sorted (their ids follow that order)."""
    values = [(label_value(raw, where), where) for _, raw, where in rows]
    first = values[0]
    for value, where in values:
        if isinstance(value, int) != isinstance(first[0], int):
            raise DataError(f"{where}: label {value!r} mixes integers and class names (first label {first[0]!r}, "
                            f"{first[1]})")
        if isinstance(value, int) and value < 0:
            raise DataError(f"{where}: label {value} is negative; integer labels are 0..K-1")
    seen = sorted({v for v, _ in values})
    for value, where in values:  # 0..K-1 exactly: one stray 100000 among 0/1 must not make a 100001-class head
        if isinstance(value, int) and value >= len(seen):
            shown = ", ".join(map(str, seen[:10])) + (", ..." if len(seen) > 10 else "")
            raise DataError(f"{where}: label {value} leaves a gap; integer labels must be 0..K-1, "
                            f"and the {len(seen)} labels seen are {shown}")
    names = [str(v) for v in seen] if isinstance(first[0], int) else seen
    if len(names) < 2:
        raise DataError(f"{first[1].split(': line')[0]}: every label is {names[0]!r}; need at least two classes")
    return names


def check_train_out_dir(path, overwrite=False):
    """--out_dir to train into: writable, and holding no model but a classifier, which is replaced only with
    overwrite (--overwrite true). A language-model run there (a config.json of another architecture, ckpt_* dirs, a
    metrics.jsonl with train_loss events but no val_acc) is always refused: one out_dir holds one run, and never
    another kind of model."""
    check_out_dir(path)
    if not os.path.isdir(path):
        return path
    refuse = "; fine-tuning would overwrite it (pick another --out_dir)"
    if os.path.isfile(config := os.path.join(path, "config.json")):
        try:
            with open(config) as f:
                arch = json.load(f).get("architectures")
        except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
            arch = None
        if arch != ["GPT2ForSequenceClassification"]:
            raise ConfigError(f"--out_dir {path}: holds a model that is not a classifier ({config}: "
                              f"architectures {arch}){refuse}")
        if not overwrite and os.path.isfile(os.path.join(path, "model.safetensors")):
            raise ConfigError(f"--out_dir {path}: holds a fine-tuned classifier ({config}); fine-tuning would "
                              f"replace it (pass --overwrite true, or pick another --out_dir)")
    if ckpts := sorted(n for n in os.listdir(path) if n.startswith("ckpt_")):
        raise ConfigError(f"--out_dir {path}: holds a language-model training run ({ckpts[-1]}){refuse}")
    if os.path.isfile(metrics := os.path.join(path, "metrics.jsonl")):
        with open(metrics, errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and "train_loss" in event and "val_acc" not in event:
                    raise ConfigError(f"--out_dir {path}: holds a language-model training run ({metrics}: line {n} "
                                      f"logs train_loss){refuse}")
    return path


def tokenize(enc, texts, max_length):
    """Each text's token ids cut to max_length, keeping the start (an empty text: [EOT]), and how many were cut."""
    ids = enc.encode_ordinary_batch(texts)
    return [t[:max_length] or [EOT] for t in ids], sum(len(t) > max_length for t in ids)


def collate(examples, device):
    """[(ids, label)] -> idx (B, T) right-padded with <|endoftext|>, attention mask (B, T), labels (B,)."""
    T = max(len(ids) for ids, _ in examples)
    idx, mask = torch.full((len(examples), T), EOT), torch.zeros(len(examples), T, dtype=torch.long)  # (B, T) each
    for i, (ids, _) in enumerate(examples):
        idx[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
    return idx.to(device), mask.to(device), torch.tensor([y for _, y in examples], device=device)  # (B,)


@torch.no_grad()
def evaluate(model, data, batch_size, device, autocast):
    """(accuracy, mean cross-entropy) over data."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(data), batch_size):
        idx, mask, y = collate(data[i:i + batch_size], device)
        with autocast:
            logits = model(idx, mask).float()  # (B, num_labels)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train()
    return correct / len(data), loss / len(data)


def set_trainable(model, which):
    """Train only the head (head), the head plus the last block and ln_f (last_block), or everything (all)."""
    keep = tuple(p.format(last=model.config.n_layer - 1) for p in TRAINABLE[which])
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(keep)


def load_splits(args):
    """(label names, {'train', 'val', 'test': rows}); a split not given is 10% of --data/--train (shuffled with
    --seed). Labels are checked in file order, so an error names the first odd line."""
    flag, train = ("--data", args.data) if args.data else ("--train", args.train)
    splits = {split: read_rows(path, f"--{split}" if split != "train" else flag, args.text_field, args.label_field)
              for split, path in (("train", train), ("val", args.val), ("test", args.test)) if path}
    names, rows = label_names([r for rows in splits.values() for r in rows]), splits["train"]
    missing = [split for split in ("val", "test") if split not in splits]
    if len(rows) <= len(missing):
        raise DataError(f"{flag} {train}: {len(rows)} rows are too few to split off {' and '.join(missing)}")
    if missing:  # the same split as ever for --data: val, test, then train
        rows, k = random.Random(args.seed).sample(rows, len(rows)), max(1, len(rows) // 10)
        splits.update({s: rows[i * k:(i + 1) * k] for i, s in enumerate(missing)}, train=rows[len(missing) * k:])
    return names, splits


def train(args, device, autocast, scaler):
    names, splits = load_splits(args)
    model = load_model(args.init_from, GPTClassifier.from_pretrained, num_labels=len(names))
    generic = [[str(i) for i in range(len(names))], [f"LABEL_{i}" for i in range(len(names))]]
    if model.has_head and model.id2label != names and model.id2label not in generic:
        raise ConfigError(f"--init_from {args.init_from} has labels {model.id2label}, the data {names}")
    if model.config.vocab_size < EOT + 1:
        raise ConfigError(f"--init_from {args.init_from}: vocab_size {model.config.vocab_size} is smaller than GPT-2's")
    model.id2label, max_length = names, min(args.max_length, model.config.block_size)
    enc, index, data, cut = get_encoding(), {name: i for i, name in enumerate(names)}, {}, 0
    for split, rows in splits.items():
        ids, n_cut = tokenize(enc, [text for text, _, _ in rows], max_length)
        data[split], cut = list(zip(ids, [index[str(label_value(raw, w))] for _, raw, w in rows])), cut + n_cut
    if cut:
        print(f"note: {cut} of {sum(map(len, data.values()))} texts are longer than {max_length} tokens; "
              f"kept their first {max_length}")
    print(f"{len(data['train'])} train / {len(data['val'])} val / {len(data['test'])} test examples, "
          f"labels {names}, trainable: {args.trainable}")
    set_trainable(model, args.trainable)
    model.to(device)
    optimizer = configure_optimizers(model, 0.01, args.lr or DEFAULT_LR[args.trainable], betas=(0.9, 0.999),
                                     device_type=torch.device(device).type)
    total = args.epochs * -(-len(data["train"]) // args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)  # linear decay to 0
    os.makedirs(args.out_dir, exist_ok=True)
    log = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), True)
    open(log.path, "w").close()  # a fresh run: no resuming here
    rng, best, step = random.Random(args.seed), None, 0
    for epoch in range(1, args.epochs + 1):
        order, loss_sum = rng.sample(data["train"], len(data["train"])), 0.0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch}", disable=None)
        for i in bar:
            idx, mask, y = collate(order[i:i + args.batch_size], device)
            with autocast:
                loss = F.cross_entropy(model(idx, mask).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # float16 only: loss scaling (runtime.make_scaler); else as is
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # frozen ones have no grad
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step, loss_sum = step + 1, loss_sum + loss.item() * len(y)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        val_acc, val_loss = evaluate(model, data["val"], args.batch_size, device, autocast)
        event = dict(epoch=epoch, step=step, val_acc=val_acc, val_loss=val_loss, train_loss=loss_sum / len(order))
        log.write(**event)
        if saved := best is None or (val_acc, -val_loss) > best:
            best = (val_acc, -val_loss)
            model.save_pretrained(args.out_dir)
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in event.items())
              + (f" | saved {args.out_dir}" if saved else ""))
    del model, optimizer, schedule  # free the last epoch's weights and AdamW state before loading the best
    model = GPTClassifier.from_pretrained(args.out_dir).to(device)
    test_acc, test_loss = evaluate(model, data["test"], args.batch_size, device, autocast)
    log.write(step=step, test_acc=test_acc, test_loss=test_loss)
    print(f"test acc {test_acc:.4f} | test loss {test_loss:.4f} (best val epoch's model, {args.out_dir})")


def predict(args, device, autocast):
    """Print the predicted label of args.predict, then every label's probability, most likely first."""
    model = load_model(args.init_from, GPTClassifier.from_pretrained).to(device).eval()
    (ids,), _ = tokenize(get_encoding(), [args.predict], min(args.max_length, model.config.block_size))
    with torch.no_grad(), autocast:
        probs = model(*collate([(ids, 0)], device)[:2]).float().softmax(-1)[0]  # (num_labels,)
    print(model.id2label[probs.argmax().item()])
    for i in probs.argsort(descending=True).tolist():
        print(f"  {model.id2label[i]}: {probs[i].item():.4f}")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="one .csv/.jsonl file, split 80/10/10 (seeded), as --train without --val/--test")
    p.add_argument("--train", help="train file (.csv/.jsonl); a --val or --test not given is 10%% of it")
    p.add_argument("--val", help="val file: picks the best epoch")
    p.add_argument("--test", help="test file: accuracy of the best model at the end")
    p.add_argument("--text_field", default="text")
    p.add_argument("--label_field", default="label")
    p.add_argument("--init_from", help="gpt2*, an HF GPT-2 (LM or classifier) dir, our out_dir; default: gpt2 "
                                       "(to train) or --out_dir (to --predict)")
    p.add_argument("--out_dir", default="out-classify")
    p.add_argument("--max_length", type=int, default=128, help="tokens per text (start kept; capped at block_size)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help=f"AdamW lr (default by --trainable: {DEFAULT_LR})")
    p.add_argument("--trainable", default="all", choices=list(TRAINABLE))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="autocast dtype (auto: see train_gpt2.py --help)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--predict", help="print the label of this text by a saved classifier")
    p.add_argument("--overwrite", type=parse_bool, default=False, help="replace a classifier already in --out_dir")
    args = p.parse_args(argv)
    for name in ("max_length", "batch_size", "epochs", "lr"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name}: must be positive, got {getattr(args, name)}")
    if (args.predict is None and not (args.data or args.train)) or (args.data and args.train):
        raise ConfigError("give --data FILE or --train FILE [--val FILE] [--test FILE] (or --predict TEXT)")
    check_seed(args.seed)
    if args.predict is None:
        check_train_out_dir(args.out_dir, args.overwrite)
    args.init_from = args.init_from or (args.out_dir if args.predict is not None else "gpt2")
    return args


def run(args):
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("finetune_classify.py runs in one process; start it with python, not torchrun")
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dtype = pick_dtype(args.dtype, device)[0]
    if dtype == "float16":
        check_float16(device)
    if args.predict is not None:
        predict(args, device, make_autocast(dtype, device))
    else:
        train(args, device, make_autocast(dtype, device), make_scaler(dtype, device))


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
