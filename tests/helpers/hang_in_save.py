"""Start writing a checkpoint and get killed part-way (the test sends SIGKILL).

    python tests/helpers/hang_in_save.py <train_gpt2 flags>

Builds the model, optimizer and train loader as train_gpt2.train does, loads the newest checkpoint
in --out_dir, advances the loader one batch, then calls save_checkpoint for the next step with
torch.save replaced by one that writes the first half of trainer.pt, prints "HALF-WRITTEN <path>"
and sleeps. config.json and model.safetensors of the temporary directory are complete by then.
"""
import io
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import checkpoint  # noqa: E402
import train_gpt2  # noqa: E402
from config import parse_args  # noqa: E402
from data.shards import ShardLoader, shard_paths  # noqa: E402
from optim import configure_optimizers  # noqa: E402
from runtime import Dist  # noqa: E402


def main():
    cfg, _ = parse_args(sys.argv[1:])
    d = Dist(device="cpu")
    torch.manual_seed(cfg.seed)
    model = train_gpt2.build_model(cfg)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.max_lr)
    loader = ShardLoader(shard_paths(cfg.data_dir, "train"), cfg.batch_size, cfg.seq_len,
                         shuffle=cfg.shuffle, seed=cfg.seed)
    ckpt = checkpoint.list_checkpoints(cfg.out_dir)[-1]
    step = checkpoint.load_checkpoint(ckpt, model, optimizer, loader, d)
    loader.next_batch()

    real_save = torch.save

    def half_save(obj, path, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        print("HALF-WRITTEN", path, flush=True)
        time.sleep(600)

    torch.save = half_save
    checkpoint.save_checkpoint(cfg.out_dir, cfg.keep_last, step + 1, model, optimizer, loader, d)
    print("save_checkpoint returned: torch.save was not hooked", flush=True)


if __name__ == "__main__":
    main()
