"""Sample from our checkpoints or GPT-2 weights, streaming the text as tokens are generated.

    python sample.py --init_from gpt2 --prompt "Hello, I'm a language model," --num_samples 3
    python sample.py --init_from out-shakespeare --prompt "ROMEO:" --max_new_tokens 200 --top_p 0.9

--init_from takes a training out_dir (its final model, else its newest checkpoint), a ckpt_* dir,
a Hugging Face GPT-2 directory, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl. Generation decodes
with a key/value cache and stops early at <|endoftext|>. A prompt longer than the model's block_size is
printed whole, but the model sees only its last block_size tokens (a note on stderr says how many were cut).
"""
import argparse
import codecs
import sys

import torch

from checkpoint import load_model
from cli import ConfigError, OneLineParser, check_seed, parse_bool, run_main
from data.tokenizer import EOT, get_encoding
from generate import check_sampling
from runtime import pick_dtype, resolve_device


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="gpt2", help="out_dir, ckpt dir, HF dir or gpt2* name (default: gpt2)")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="the text to continue")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file instead")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=50, help="0 disables")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling, e.g. 0.9")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="weights in auto | bfloat16 | float32")
    p.add_argument("--compile", type=parse_bool, default=False, help="torch.compile the model's forward")
    args = p.parse_args(argv)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompt_file {args.prompt_file}: {e}") from None
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name}: must be positive, got {getattr(args, name)}")
    args.top_k = args.top_k or None  # 0: off
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)  # the model's own checks, named as flags
    except ValueError as e:
        raise ConfigError(f"--{e}") from None
    check_seed(args.seed)
    if args.dtype not in ("auto", "bfloat16", "float32"):
        raise ConfigError(f"--dtype: expected auto, bfloat16 or float32, got {args.dtype!r}")
    return args


def stream(model, enc, idx, args, generator, out=None):
    """Generate one sample for the prompt idx (1, T), writing text to out (sys.stdout at call time) as it comes;
    return the new tokens."""
    out = sys.stdout if out is None else out
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    new = []
    for tok in model.generate_stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, eos_token_id=EOT, generator=generator):
        t = int(tok[0, 0])
        if t == EOT:
            break
        new.append(t)
        out.write(decoder.decode(enc.decode_single_token_bytes(t)))
        out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    return new


def sample(args):
    device = resolve_device(args.device)
    model = load_model(args.init_from)
    dtype = pick_dtype(args.dtype, device)[0]
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    enc = get_encoding()
    ids = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    if len(ids) > (block := model.config.block_size):  # generate keeps the last block_size tokens: say so
        print(f"note: the prompt is {len(ids)} tokens, more than the model's block_size {block}: its first "
              f"{len(ids) - block} are cut and generation sees the last {block} (the output still shows it all)",
              file=sys.stderr)
    idx = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        sys.stdout.write(args.prompt)
        stream(model, enc, idx, args, generator)


def main(argv=None):
    run_main(lambda: sample(parse_args(argv)))


if __name__ == "__main__":
    main()
