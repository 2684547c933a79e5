"""Token shards: the on-disk format, a writer, checks, and a memory-mapped batch loader.

A shard is a 1-D uint16 array saved with np.save as `<name>_<split>_<idx:06d>.npy`
(split is `train` or `val`), with every document preceded by <|endoftext|> (50256).
These are exactly build-nanogpt's edufineweb_*.npy files, so they work unchanged.
"""
import contextlib
import glob
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

from data import DataError

EOT = 50256
SCAN_CHUNK = 2**24  # tokens per chunk when scanning a shard for its max id (32 MiB)
PARTIAL = ".partial-"  # write_splits' working folder inside out_dir: <prefix>.partial-XXXXXXXX
PARTIAL_FILE = re.compile(r".+_(train|val)_\d{6}\.npy(\.tmp\d+)?")  # what one holds: shards, write_shard's temps


def shard_name(prefix, split, idx):
    return f"{prefix}_{split}_{idx:06d}.npy"


def write_shard(path, tokens):
    """Save `tokens` as a uint16 shard, atomically: a temp file in the same dir, then os.replace."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must be in [0, 65536) to fit uint16")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # a file object, so np.save does not append ".npy"
            np.save(f, tokens.astype(np.uint16, copy=False))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_splits(docs, out_dir, prefix, shard_size=10**8, hint="", progress=True):
    """Write `(split, tokens)` documents as one val shard and numbered train shards; return counts.

    Val documents go whole into `<prefix>_val_000000.npy`. Train documents are packed into
    `<prefix>_train_000001.npy`, ... of `shard_size` tokens each (a document may straddle two
    shards, as in build-nanogpt); the last partial shard is written too. Refuses to mix with
    existing shards. All or nothing: the shards are written into a `<prefix>.partial-*` folder
    inside out_dir and moved into place (val last, so its presence marks a complete set) only
    once every one is written; on any failure, Ctrl-C included, whatever this call wrote is removed.
    A SIGKILL leaves the folder: the next call into out_dir removes it, with a note (remove_stale_partials).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if glob.glob(os.path.join(out_dir, f"{prefix}_*.npy")):
        raise DataError(f"{out_dir}: already holds {prefix}_*.npy shards; delete them or pick another out_dir")
    try:
        buf = np.empty(shard_size, np.uint16)  # (shard_size,)
    except MemoryError:
        raise DataError(f"shard_size {shard_size:,} tokens needs {shard_size / 2**29:.1f} GiB of memory for one "
                        f"shard; pick a smaller shard size") from None
    if stale := remove_stale_partials(out_dir):
        print(f"note: removed {len(stale)} folder{'s' * (len(stale) > 1)} of shards left by a killed run: "
              f"{', '.join(stale)}", file=sys.stderr)
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    partial, moved = tempfile.mkdtemp(prefix=f"{prefix}{PARTIAL}", dir=out_dir), []
    lock = _lock_dir(partial)  # held until we return or die: a later run sees the folder is in use
    try:
        counts, val = _pack_train(docs, partial, prefix, buf, progress)
        if not counts["train_docs"] + counts["val_docs"]:
            raise DataError(f"no documents to write to {out_dir}: the input is empty")
        if not counts["train_docs"]:
            raise DataError(f"{out_dir}: no documents left for the train split{hint}")
        if not counts["val_docs"]:
            raise DataError(f"{out_dir}: no documents for the val split{hint}")
        write_shard(os.path.join(partial, shard_name(prefix, "val", 0)), np.concatenate(val))
        val_name = shard_name(prefix, "val", 0)
        for name in sorted(os.listdir(partial), key=lambda n: n == val_name):  # val last: it marks a complete set
            os.replace(os.path.join(partial, name), os.path.join(out_dir, name))
            moved.append(os.path.join(out_dir, name))
    except BaseException:
        for path in moved:
            os.remove(path)
        shutil.rmtree(partial, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    os.rmdir(partial)
    return dict(out_dir=out_dir, **counts)


def _lock_dir(path):
    """An fd holding an exclusive flock on directory path, or None if a live process holds it, or where there
    are no such locks (Windows, some network filesystems). The OS drops the lock when its process dies, SIGKILL
    included, so a free lock on a partial folder means its writer is gone."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # removed meanwhile
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:  # BlockingIOError: held by a live writer; others: no locks here
        os.close(fd)
        return None


def remove_stale_partials(out_dir):
    """Remove the <prefix>.partial-* folders in out_dir that a killed write_splits left behind (a kill cannot be
    caught, so its own cleanup never ran); return their paths. A folder a live run holds (its flock), or one
    holding anything but shards, is left alone."""
    removed = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name)
        if PARTIAL not in name or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            ours = all(PARTIAL_FILE.fullmatch(f) for f in os.listdir(path))
        except OSError:  # gone meanwhile (its run finished), or unreadable
            continue
        if not ours or (lock := _lock_dir(path)) is None:
            continue
        try:
            shutil.rmtree(path)
        finally:
            os.close(lock)
        removed.append(path)
    return removed


def _pack_train(docs, out_dir, prefix, buf, progress):
    """Write train documents into out_dir as shards of len(buf) tokens; return (counts, val documents)."""
    counts = dict(val_docs=0, val_tokens=0, train_docs=0, train_tokens=0, train_shards=0)
    val, fill = [], 0
    with tqdm(unit="tok", unit_scale=True, desc=prefix, disable=not progress) as bar:
        for split, tokens in docs:
            counts[f"{split}_docs"] += 1
            counts[f"{split}_tokens"] += len(tokens)
            bar.update(len(tokens))
            if split == "val":
                val.append(tokens)
                continue
            while len(tokens):
                take = min(len(buf) - fill, len(tokens))
                buf[fill:fill + take] = tokens[:take]
                fill, tokens = fill + take, tokens[take:]
                if fill == len(buf):
                    counts["train_shards"] += 1
                    write_shard(os.path.join(out_dir, shard_name(prefix, "train", counts["train_shards"])), buf)
                    fill = 0
    if fill:
        counts["train_shards"] += 1
        write_shard(os.path.join(out_dir, shard_name(prefix, "train", counts["train_shards"])), buf[:fill])
    return counts, val


def shard_paths(data_dir, split, hint=""):
    """Sorted paths of `*_{split}_*.npy` in data_dir; DataError (plus `hint`) if there are none."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir} does not exist{hint}")
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))
    if not paths:
        raise DataError(f"data_dir {data_dir} has no {split} shards (*_{split}_*.npy){hint}")
    return paths


def open_shard(path):
    """Memory-map one shard, checking what its header can tell: readable, 1-D, uint16, non-empty."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # truncated, not .npy, missing, pickled objects
        raise DataError(f"{path}: cannot read shard ({e})") from None
    if tokens.ndim != 1 or tokens.dtype != np.uint16:
        raise DataError(f"{path}: expected a 1-D uint16 array, got shape {tokens.shape} dtype {tokens.dtype}")
    if tokens.size == 0:
        raise DataError(f"{path}: shard is empty")
    return tokens


def max_id(tokens):
    """The largest token id in a shard, read in SCAN_CHUNK pieces so a 20 GB memmap never loads at once."""
    return max(int(tokens[start:start + SCAN_CHUNK].max()) for start in range(0, tokens.size, SCAN_CHUNK))


def shard_problem(paths, vocab_size, rank=0, world_size=1, min_tokens=1):
    """The first problem with `paths` as a one-line message, or None if there is none.

    Every rank checks every shard's header (cheap) and the total token count, but scans the token
    ids of only its share, paths[rank::world_size], so together the ranks read each shard once.
    It returns instead of raising, so that a trainer can all-gather the verdicts and have every rank
    fail together rather than leave one waiting in a collective.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if not paths:
        return "no shards to validate"
    try:
        shards = [open_shard(path) for path in paths]
    except DataError as e:
        return str(e)
    total = sum(tokens.size for tokens in shards)
    if total < min_tokens:
        where = os.path.dirname(paths[0]) or "."
        return f"{where}: {len(paths)} shards hold {total} tokens, need at least {min_tokens}"
    for path, tokens in zip(paths[rank::world_size], shards[rank::world_size]):
        if (top := max_id(tokens)) >= vocab_size:
            return f"{path}: token id {top} >= vocab_size {vocab_size}"
    return None


def token_counts(paths, vocab_size, chunk=10**7):
    """How often each id occurs in the shards, (vocab_size,) int64 (the trainer's --head_vocab); reads them once."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens in map(open_shard, paths):
        for i in range(0, tokens.size, chunk):  # bincount makes an int64 copy: a chunk at a time
            counts += np.bincount(tokens[i:i + chunk], minlength=vocab_size)
    return counts


def frequent_ids(counts, top=None):
    """The ids that occur (counts > 0), or the `top` most frequent of them (ties: the lower id first), sorted."""
    ids = np.flatnonzero(counts)
    return ids if top is None else np.sort(ids[np.argsort(-counts[ids], kind="stable")[:top]])


def validate_shards(paths, vocab_size, min_tokens=1):
    """Check every shard (see shard_problem, one process); raise DataError or return the total token count."""
    if problem := shard_problem(paths, vocab_size, min_tokens=min_tokens):
        raise DataError(problem)
    return sum(open_shard(path).size for path in paths)


class ShardLoader:
    """Batches (x, y) of shape (B, T) from shards read as ONE continuous token stream.

    Each next_batch() consumes a global window of B*T*world_size tokens; rank r takes the
    r-th B*T slice plus one target token. Ranks never overlap, and together they read every
    token: windows cross shard boundaries and wrap into the next epoch (unlike build-nanogpt,
    which drops each shard's tail). shuffle "false": the shards in order, as build-nanogpt reads them.
    "true": epoch e visits the shards in the order np.random.default_rng(seed + e).permutation(n). "samples": so
    does it, and within each shard it reads the T-token samples in an order of their own for each epoch and
    seed (a shard's last, shorter piece stays last): every token is still read once an epoch.
    """

    def __init__(self, paths, B, T, rank=0, world_size=1, shuffle="false", seed=0):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.paths, self.B, self.T, self.rank, self.world_size = list(paths), B, T, rank, world_size
        self.shuffle, self.seed = {False: "false", True: "true"}.get(shuffle, shuffle), seed  # bools: older callers
        self.shards = [open_shard(p) for p in self.paths]  # memmaps: pages load on first touch
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)  # (n,)
        self.total = int(self.lengths.sum())
        self.reset()

    def reset(self):
        self.epoch, self.position = 0, 0  # position: token offset within the epoch's stream

    def order(self, epoch):
        """Shard indices in the order epoch `epoch` reads them."""
        n = len(self.shards)
        return np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle != "false" else np.arange(n)

    def sample_order(self, epoch, shard):
        """--shuffle samples: the order epoch `epoch` reads shard `shard`'s whole T-token samples in."""
        return np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.lengths[shard]) // self.T)

    def read(self, epoch, start, n):
        """n tokens of the stream from offset `start` of epoch `epoch`, wrapping into later epochs."""
        out = np.empty(n, dtype=np.uint16)  # (n,)
        filled, samples = 0, {}
        while filled < n:
            epoch, start = epoch + start // self.total, start % self.total
            order = self.order(epoch)
            starts = np.concatenate([[0], np.cumsum(self.lengths[order])])  # (n_shards + 1,)
            k = int(np.searchsorted(starts, start, side="right")) - 1
            offset, shard = start - int(starts[k]), int(order[k])
            take = min(n - filled, int(self.lengths[shard]) - offset)
            if self.shuffle == "samples" and offset // self.T < int(self.lengths[shard]) // self.T:  # a whole sample
                perm = samples.setdefault((epoch, shard), self.sample_order(epoch, shard))
                take = min(take, self.T - offset % self.T)  # to the end of this sample
                at = int(perm[offset // self.T]) * self.T + offset % self.T
            else:
                at = offset
            out[filled:filled + take] = self.shards[shard][at:at + take]
            filled, start = filled + take, start + take
        return out

    def next_batch(self):
        """Return this rank's (x, y), each (B, T) int64 on CPU, and advance the global position."""
        BT = self.B * self.T
        buf = torch.from_numpy(self.read(self.epoch, self.position + self.rank * BT, BT + 1).astype(np.int64))
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)  # (B, T), (B, T)
        position = self.position + BT * self.world_size
        self.epoch, self.position = self.epoch + position // self.total, position % self.total
        return x, y

    def state_dict(self):
        """Where the stream stands (the same on every rank), plus the shape it was read with."""
        return dict(epoch=self.epoch, position=self.position, B=self.B, T=self.T, world_size=self.world_size,
                    num_shards=len(self.shards), total_tokens=self.total, shuffle=self.shuffle, seed=self.seed)

    def load_state_dict(self, sd):
        """Resume from state_dict(): the same data, sequence length and order are required. The position is the
        global stream's, so another batch size or world size reads on from the same token."""
        sd = {**sd, "shuffle": {False: "false", True: "true"}.get(sd["shuffle"], sd["shuffle"])}  # older: bools
        for key in ("T", "num_shards", "total_tokens", "shuffle", "seed"):
            if sd[key] != self.state_dict()[key]:
                raise DataError(f"loader state has {key}={sd[key]} but this loader has {key}={self.state_dict()[key]}; "
                                f"resume with the same data, sequence length and order")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
