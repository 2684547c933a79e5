"""Side-by-side speed against Hugging Face, in one process, on the same random weights.

    python bench.py generate                         # GPT-2 124M, batch 1, 256 new tokens, CPU, float32
    python bench.py generate --dtype bfloat16 --new_tokens 32 --json out.json

Rows are interleaved over --repeats rounds and the median is reported, because shared machines are
noisy: compare the ratios, which are measured side by side.

generate: our KV-cache `generate` against recomputing the whole context every token (as
build-nanogpt samples) and against Hugging Face `generate` with its cache (greedy, same weights,
same dtype). Goals: cache >= 5x recompute, and at least as fast as Hugging Face.
"""
import argparse
import json
import statistics
import tempfile
import time

import torch

from model import GPT, GPTConfig


def greedy_recompute(model, idx, n):
    """Reference decoding without a cache: the whole context through the model for every token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def bench_generate(args):
    from transformers import GPT2LMHeadModel
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=50257)
    dtype = getattr(torch, args.dtype)
    ours = GPT(config).eval()
    with tempfile.TemporaryDirectory() as tmp:  # the same weights, through our HF export
        ours.save_pretrained(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp).to(args.device, dtype).eval()
    ours = ours.to(args.device, dtype)
    idx = torch.randint(0, 50257, (args.batch, args.prompt_len), device=args.device)
    n = args.new_tokens
    runs = {
        "ours (KV cache)": lambda: ours.generate(idx, n, temperature=0),
        "ours (recompute context)": lambda: greedy_recompute(ours, idx, n),
        "HF generate (cache)": lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                                                   min_new_tokens=n, do_sample=False, pad_token_id=0),
    }
    with torch.no_grad():
        outs = {name: fn() for name, fn in runs.items()}  # warm-up, and the greedy tokens must agree
        assert torch.equal(outs["ours (KV cache)"], outs["ours (recompute context)"])
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    rate = {name: args.batch * n / statistics.median(t) for name, t in times.items()}
    print(f"generate: {args.n_layer}L/{args.n_embd}, batch {args.batch}, prompt {args.prompt_len}, {n} new tokens, "
          f"{args.device}, {args.dtype}, median of {args.repeats}")
    for name, r in rate.items():
        print(f"  {name:<26} {r:8.1f} tok/s")
    ratios = {"cache_vs_recompute": rate["ours (KV cache)"] / rate["ours (recompute context)"],
              "ours_vs_hf": rate["ours (KV cache)"] / rate["HF generate (cache)"]}
    print(f"  cache / recompute {ratios['cache_vs_recompute']:.1f}x (goal >= 5x), "
          f"ours / HF {ratios['ours_vs_hf']:.2f}x (goal >= 1x)")
    return {"generate": {"config": vars(args), "tokens_per_sec": rate, "ratios": ratios}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["generate"])
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = bench_generate(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
