"""Turn a distributed (FSDP2) checkpoint directory into one single-file Lightning checkpoint.

    python tools/consolidate_checkpoint.py logs/.../checkpoints/last.ckpt out.ckpt

The result holds the full (unsharded) weights, hyper-parameters, tokenizer and loop state, and
loads with `LitModule.load_from_checkpoint` or generate.py on one process. Optimiser state is kept
under `sharded_optimizer_states` in its FSDP2 (parameter-name keyed) layout only with
--keep-optimizer; resuming a sharded run should use the directory itself.
Weights only: the directory is checked by `models.io.check_dcp_checkpoint` and `meta.pt` read by
`models.io.load_checkpoint`, so a checkpoint whose pickles would run code is refused, naming the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402

from lit_modules.checkpointing import atomic_torch_save  # noqa: E402
from models.io import check_dcp_checkpoint, load_checkpoint  # noqa: E402

METADATA_FILENAME = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards


def consolidate(src: str | Path, dst: str | Path, keep_optimizer: bool = False) -> dict:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a distributed checkpoint directory")
    if not (src / METADATA_FILENAME).is_file():
        raise FileNotFoundError(f"{src} has no {METADATA_FILENAME}: not a Lightning FSDP2 checkpoint")
    check_dcp_checkpoint(src)  # before dcp_to_torch_save unpickles its metadata and non-tensor entries
    checkpoint = load_checkpoint(src / METADATA_FILENAME)
    with tempfile.TemporaryDirectory() as d:
        flat = os.path.join(d, "flat.pt")
        dcp_to_torch_save(str(src), flat)
        tensors = load_checkpoint(flat)
    checkpoint["state_dict"] = tensors.pop("state_dict")
    optim = [tensors[k] for k in sorted(tensors) if k.startswith("optimizer_")]
    if keep_optimizer:
        checkpoint["sharded_optimizer_states"] = optim
    atomic_torch_save(checkpoint, dst)
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="FSDP2 checkpoint directory (or the last.ckpt link to it)")
    p.add_argument("dst", help="output .ckpt file")
    p.add_argument("--keep-optimizer", action="store_true")
    args = p.parse_args(argv)
    ckpt = consolidate(args.src, args.dst, args.keep_optimizer)
    n = sum(t.numel() for t in ckpt["state_dict"].values())
    print(f"wrote {args.dst}: {len(ckpt['state_dict'])} tensors, {n:,} values")


if __name__ == "__main__":
    main()
