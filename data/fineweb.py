"""Tokenize FineWeb-Edu (or your own text) into GPT-2 token shards, as build-nanogpt's fineweb.py.

The first `val_tokens` tokens' worth of whole documents become `<prefix>_val_000000.npy`; the
rest fill `<prefix>_train_000001.npy`, ... of `shard_size` tokens each. Every document starts
with <|endoftext|>. Local input: a .txt file (one document), a .jsonl or .parquet file (one
document per row, field --text_field), or a folder of such files; val_tokens defaults to ~10% of
it, and a document longer than that is cut at the boundary, so one small .txt still gives a val
and a train shard. A note on stderr names each input skipped: a folder's other entries, files without text.

Usage:
    python data/fineweb.py                              # sample-10BT -> data/shards/edufineweb
    python data/fineweb.py --name sample-100BT
    python data/fineweb.py --input my_texts/ --prefix mytext --shard_size 10000000
"""
import itertools
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data import DataError
from data.shards import write_splits
from data.tokenizer import EOT, get_encoding

SHARDS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shards")
EXTENSIONS = (".txt", ".jsonl", ".parquet")
HUB_VAL_TOKENS = 10**8  # build-nanogpt's val shard 0
SHOW_SKIPPED = 20  # a note names this many of a folder's skipped entries


def tokenize(texts, num_threads=None, batch=256):
    """Yield each text's tokens, uint16 with <|endoftext|> first, in order.

    tiktoken's BPE runs in Rust without holding the GIL, so batches of documents are encoded on
    num_threads threads of this process (default: every core). build-nanogpt uses a process pool
    instead, which pickles every document and token array between processes; `python bench.py
    tokenize` compares the two on the same documents.
    """
    enc, texts = get_encoding(), iter(texts)
    while chunk := list(itertools.islice(texts, batch)):
        for tokens in enc.encode_ordinary_batch(chunk, num_threads=num_threads or os.cpu_count()):
            yield np.array([EOT] + tokens, dtype=np.uint16)  # (n,)


def note(message):
    """One line on stderr: stdout keeps the final summary."""
    print(f"note: {message}", file=sys.stderr)


def input_files(path):
    """The files to read under `path` (a supported file, or a folder's supported files, sorted). A folder's other
    entries (other extensions, subfolders: it is not read recursively) are named in a note."""
    if os.path.isdir(path):
        files, skipped = [], []
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.endswith(EXTENSIONS) and os.path.isfile(full):
                files.append(full)
            else:
                skipped.append(name + "/" * os.path.isdir(full))
        if not files:
            raise DataError(f"--input {path}: folder has no {'/'.join(EXTENSIONS)} files")
        if skipped:
            more = f" and {len(skipped) - SHOW_SKIPPED} more" if len(skipped) > SHOW_SKIPPED else ""
            note(f"skipped {len(skipped)} of {len(files) + len(skipped)} entries in {path}, which are not "
                 f"{'/'.join(EXTENSIONS)} files: {', '.join(skipped[:SHOW_SKIPPED])}{more}")
        return files
    if not os.path.exists(path):
        raise DataError(f"--input {path}: no such file or folder")
    if not path.endswith(EXTENSIONS):
        raise DataError(f"--input {path}: unknown extension; expected one of {', '.join(EXTENSIONS)}")
    return [path]


def read_texts(files, text_field="text"):
    """Yield the documents of local files: a whole .txt, or `text_field` of each .jsonl/.parquet row. A file that
    gives none (empty, blank, no rows) is named in a note."""
    for path in files:
        empty = True
        try:
            for text in _read_file(path, text_field):
                empty = False
                yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if empty:
            note(f"skipped {path}: {'no text' if path.endswith('.txt') else 'no rows'} in it (an empty file?)")


def _read_file(path, text_field):
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            if (text := f.read()).strip():  # a blank file is no document, not a lone <|endoftext|>
                yield text
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield text_field_of(parse_json_line(line, path, line_no), text_field, f"{path}: line {line_no}")
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: cannot read parquet ({e})") from None
        if text_field not in table.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)})")
        row = 0
        for batch in table.iter_batches(columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield text_field_of({text_field: value}, text_field, f"{path}: row {row}")


def parse_json_line(line, path, line_no):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None


def text_field_of(record, text_field, where):
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(f"{where}: no string field {text_field!r} (set --text_field)")
    return record[text_field]


def hub_texts(name, text_field="text"):
    """Stream the documents of HuggingFaceFW/fineweb-edu, config `name` (e.g. sample-10BT)."""
    from datasets import load_dataset

    try:
        rows = load_dataset("HuggingFaceFW/fineweb-edu", name=name, split="train", streaming=True)
    except ConnectionError as e:
        raise DataError(f"--name {name}: {e}; check the connection, or shard local text with --input") from None
    for row in rows:
        yield row[text_field]


def split_first(docs, val_tokens):
    """Tag documents ("val", tokens) until val holds >= val_tokens tokens, then ("train", tokens).

    A document longer than val_tokens that crosses the boundary (a book, a single .txt) is cut there,
    so that one file still gives both splits: its head ends val, its tail, behind a new
    <|endoftext|>, starts train.
    """
    seen = 0
    for tokens in docs:
        if seen < val_tokens < seen + len(tokens) and len(tokens) > val_tokens:
            head = val_tokens - seen
            yield "val", tokens[:head]
            tokens, seen = np.concatenate([[EOT], tokens[head:]]).astype(np.uint16), val_tokens  # (n - head + 1,)
        yield ("val" if seen < val_tokens else "train"), tokens
        seen += len(tokens)


def prepare(out_dir, input=None, name="sample-10BT", prefix="edufineweb", shard_size=10**8,
            val_tokens=None, text_field="text", num_threads=None, progress=True):
    """Tokenize the hub dataset `name`, or local `input`, into shards in out_dir; return counts."""
    if num_threads is not None and num_threads < 1:
        raise DataError(f"--num_threads {num_threads}: must be >= 1 (leave it out to use every core)")
    if input is None:
        texts, val_tokens = hub_texts(name, text_field), val_tokens or HUB_VAL_TOKENS
    else:
        files = input_files(input)
        texts = read_texts(files, text_field)
        if val_tokens is None:  # 10% of a 4-bytes-per-token estimate
            val_tokens = max(1, sum(os.path.getsize(f) for f in files) // 4 // 10)
    for flag, value in (("--shard_size", shard_size), ("--val_tokens", val_tokens)):
        if value < 1:
            raise DataError(f"{flag} {value}: must be >= 1")
    docs = split_first(tokenize(texts, num_threads), val_tokens)
    return write_splits(docs, out_dir, prefix, shard_size, progress=progress,
                        hint=f" (val_tokens {val_tokens} took every document; lower --val_tokens)")


def main(argv=None):
    from cli import OneLineParser, run_main  # the scripts' one-line errors (the library code above needs no cli)
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", help="where the shards go (default: data/shards/<prefix>)")
    p.add_argument("--input", help="a .txt/.jsonl/.parquet file or a folder of them (default: the hub dataset)")
    p.add_argument("--name", default="sample-10BT", help="fineweb-edu config: sample-10BT, sample-100BT, ...")
    p.add_argument("--prefix", default="edufineweb", help="shard file name prefix")
    p.add_argument("--shard_size", type=int, default=10**8, help="tokens per train shard")
    p.add_argument("--val_tokens", type=int, help="tokens of whole documents for val (default: 1e8 hub, 10%% local)")
    p.add_argument("--text_field", default="text", help="the document field of .jsonl/.parquet rows")
    p.add_argument("--num_threads", type=int, help="tokenizer threads (default: every core)")

    def run():
        args = p.parse_args(argv)
        out_dir = args.out_dir or os.path.join(SHARDS_DIR, args.prefix)
        return out_dir, prepare(out_dir, args.input, args.name, args.prefix, args.shard_size, args.val_tokens,
                                args.text_field, args.num_threads)
    out_dir, counts = run_main(run)  # a DataError or OSError (--out_dir a file, a full disk): one line, exit 2
    print(f"wrote {counts['val_tokens']:,} val tokens ({counts['val_docs']:,} docs) and {counts['train_tokens']:,} "
          f"train tokens ({counts['train_docs']:,} docs, {counts['train_shards']} shards) to {out_dir}")


if __name__ == "__main__":
    main()
