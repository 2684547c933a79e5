"""HellaSwag: pick the right one of 4 endings by the model's likelihood (completion style).

    python data/hellaswag.py --model gpt2                     # OpenAI's weights, the 10,042 val examples
    python data/hellaswag.py --model out --limit 500          # our out_dir / ckpt_* dir / HF dir
    python data/hellaswag.py --model gpt2 --jsonl hellaswag_val.jsonl --device cpu

The val set comes from the HellaSwag repository (rowanz/hellaswag) into data/cache/hellaswag/ on
first use, or from --jsonl. Each example is 4 rows: the context's tokens, then those of " " + ending.
`acc` picks the ending with the lowest summed loss over its tokens, `acc_norm` the lowest mean loss
per token. This is build-nanogpt's hellaswag.py; its docstring reports (float32, 10,042 examples):

    gpt2 (124M)      acc 0.2859  acc_norm 0.2955
    gpt2-xl (1558M)  acc 0.3842  acc_norm 0.4893

(GPT-3 124M: acc_norm 0.337, multiple-choice style, from the GPT-3 paper.)
"""
import argparse
import contextlib
import json
import os
import sys
import urllib.request

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache", "hellaswag")
PAD_TO = 64  # rows are padded to a multiple of this: one shape for a compiled model, GPU-friendly


def download(cache_dir=CACHE_DIR, url=URL, timeout=60):
    """Path of hellaswag_val.jsonl in cache_dir, fetched on first use (a temp file, then os.replace)."""
    path = os.path.join(cache_dir, os.path.basename(url))
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            f.write(r.read())
        os.replace(tmp, path)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        raise DataError(f"could not download {url} ({e}); pass a local copy (--jsonl / --hellaswag_path), "
                        f"put it at {path}, or turn the eval off with --hellaswag_interval 0") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def problem(ex):
    """What is wrong with one parsed line, or None if it is a usable example."""
    if not isinstance(ex, dict):
        return "not a JSON object"
    missing = [k for k in ("ctx", "endings", "label") if k not in ex]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(ex["ctx"], str):
        return "ctx is not a string"
    endings = ex["endings"]
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        return f"endings must be a list of 4 strings, got {json.dumps(endings)[:60]}"
    if type(ex["label"]) is not int or not 0 <= ex["label"] < 4:
        return f"label must be 0, 1, 2 or 3, got {ex['label']!r}"
    return None


def load_examples(path):
    """The examples of a HellaSwag jsonl file, every line checked; errors name the file and line."""
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read HellaSwag file ({e.strerror})") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except ValueError as e:  # bad JSON or bad UTF-8
            raise DataError(f"{path}:{n}: not valid JSON ({str(e).splitlines()[0]})") from None
        if isinstance(ex, dict) and ex.get("label") in ("0", "1", "2", "3"):
            ex["label"] = int(ex["label"])  # Hugging Face datasets' exports write the label as a string
        if (why := problem(ex)) is not None:
            raise DataError(f"{path}:{n}: {why}")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no HellaSwag examples in it")
    return examples


def render(example, enc):
    """(tokens, mask): 4 rows of context tokens then ending tokens, mask 1 over the ending's tokens.

    The ending is encoded as " " + ending, since GPT-2's BPE attaches a space to the word after it.
    """
    ctx = enc.encode_ordinary(example["ctx"])
    tokens, mask = [], []
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)
        tokens.append(ctx + end)
        mask.append([0] * len(ctx) + [1] * len(end))
    return tokens, mask


def prepare(examples, enc):
    """[(tokens, mask, label)] of the examples: rendered once, scored at every evaluation."""
    return [(*render(ex, enc), ex["label"]) for ex in examples]


def score_rows(logits, tokens, mask):
    """Summed and mean float32 cross-entropy of each row's masked tokens: logits (R, T, V) -> (R,), (R,).

    Position t predicts token t+1, so the mask is shifted: the ending's first token is scored from
    the context's last position.
    """
    R, T, V = logits.shape
    flat = logits[:, :-1].float().reshape(-1, V)  # (R * (T-1), V); class-last is faster than (R, V, T-1)
    losses = F.cross_entropy(flat, tokens[:, 1:].reshape(-1), reduction="none").view(R, T - 1)  # (R, T-1)
    mask = mask[:, 1:].float()  # (R, T-1)
    total = (losses * mask).sum(dim=1)  # (R,)
    return total, total / mask.sum(dim=1).clamp(min=1)


@torch.no_grad()
def evaluate(logits_of, items, block_size, device, batch_size=16, autocast=None, progress=False, batches=0):
    """Counts [correct by acc, correct by acc_norm, examples] of prepare()'s items as a long tensor (3,) on
    device. logits_of(idx) -> logits (B, T, V) of a model in eval mode (lambda idx: model(idx)[0]). `batches`:
    run at least this many forwards, the extra ones on empty rows (the ranks of a sharded model must all join
    each forward, though their shares of items differ by one).

    Every forward has one shape, (4 * batch_size, T): T is the longest row rounded up to a multiple of PAD_TO, at
    most block_size (a longer row keeps its last T tokens), and the last batch is filled with empty rows, so a
    torch.compile'd model compiles once. Rows are right-padded, which a causal model cannot see.
    """
    longest = max((len(row) for tokens, _, _ in items for row in tokens), default=1)
    T = min(block_size, -(-longest // PAD_TO) * PAD_TO)
    counts = torch.zeros(3, dtype=torch.long, device=device)
    counts[2] = len(items)
    for start in tqdm(range(0, max(len(items), batches * batch_size), batch_size), desc="hellaswag", unit="batch",
                      disable=not progress):
        batch = items[start:start + batch_size]
        tokens = torch.zeros(4 * batch_size, T, dtype=torch.long)  # (R, T), R = 4 * batch_size
        mask = torch.zeros_like(tokens)  # (R, T)
        rows = [(row[-T:], m[-T:]) for toks, masks, _ in batch for row, m in zip(toks, masks)]  # 4 per example
        for r, (row, m) in enumerate(rows):
            tokens[r, :len(row)], mask[r, :len(m)] = torch.tensor(row), torch.tensor(m)
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast or contextlib.nullcontext():
            logits = logits_of(tokens)  # (R, T, V)
        total, mean = (s.view(-1, 4)[:len(batch)] for s in score_rows(logits, tokens, mask))  # (b, 4)
        labels = torch.tensor([label for _, _, label in batch], device=device)  # (b,)
        counts[0] += (total.argmin(dim=1) == labels).sum()
        counts[1] += (mean.argmin(dim=1) == labels).sum()
    return counts


def main(argv=None):
    from checkpoint import load_model
    from cli import ConfigError, OneLineParser, run_main
    from data.tokenizer import get_encoding
    from runtime import make_autocast, pick_dtype, resolve_device
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="out_dir, ckpt dir, HF dir or gpt2* name (default: gpt2)")
    p.add_argument("--jsonl", default="", help=f"a local HellaSwag jsonl (default: the val set, cached in {CACHE_DIR})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"), help="autocast dtype")
    p.add_argument("--batch_size", type=int, default=16, help="examples (4 rows each) per forward")
    p.add_argument("--limit", type=int, default=0, help="score only the first N examples (0: all)")

    def run():
        args = p.parse_args(argv)
        device = resolve_device(args.device)
        if args.batch_size <= 0 or args.limit < 0:
            raise ConfigError(f"--batch_size must be positive and --limit not negative, got "
                              f"{args.batch_size}, {args.limit}")
        examples = load_examples(args.jsonl or download())[:args.limit or None]
        model = load_model(args.model, flag="--model")
        if model.config.vocab_size < 50257:
            raise ConfigError(f"--model: {args.model} has {model.config.vocab_size} tokens, not GPT-2's 50257")
        dtype = pick_dtype(args.dtype, device)[0]
        model = model.to(device).eval()
        counts = evaluate(lambda idx: model(idx)[0], prepare(examples, get_encoding()), model.config.block_size, device,
                          args.batch_size, make_autocast(dtype, device), progress=True)
        correct, correct_norm, total = counts.tolist()
        print(f"{args.model} | {dtype} | {total} examples | acc {correct / total:.4f} | "
              f"acc_norm {correct_norm / total:.4f}")
    run_main(run)


if __name__ == "__main__":
    main()
