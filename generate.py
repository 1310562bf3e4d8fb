"""Sample text from a trained language-model checkpoint.

    python generate.py logs/train/runs/<run>/checkpoints/last.ckpt --prompt "Mira Okafor was born" -n 3

The checkpoint carries the tokenizer, so nothing else is needed. An FSDP2 (directory) checkpoint is
first consolidated with tools/consolidate_checkpoint.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lit_modules.lm import LanguageModelModule


def load_module(ckpt: str | Path, device: str = "cpu") -> LanguageModelModule:
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a distributed (FSDP2) checkpoint; consolidate it first: "
            f"python tools/consolidate_checkpoint.py {path} {path.with_suffix('.consolidated.ckpt')}"
        )
    module = LanguageModelModule.load_from_checkpoint(path, map_location=device, weights_only=False)
    if module.tokenizer is None:
        raise ValueError(f"{path} holds no tokenizer; was it written by lit_modules.lm?")
    return module.to(device).eval()


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a .ckpt file written by train.py")
    p.add_argument("--prompt", action="append", default=None, help="repeatable; default: empty prompt")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    module = load_module(args.ckpt, args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    samples = []
    for prompt in args.prompt or [""]:
        for i in range(args.num_samples):
            text = module.generate_text(
                [prompt], generator=gen, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            )[0]
            samples.append(text)
            print(f"--- sample {i} (prompt {prompt!r})\n{text}\n")
    return samples


if __name__ == "__main__":
    main()
