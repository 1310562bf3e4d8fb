"""Print the MoUE topology report for a configuration: physical width (pool size), virtual width per
layer, exposure per expert, and routing-path counts (log10) against full sharing.

    python tools/moue_topology.py --layers 4 --experts 8 --window 2
    python tools/moue_topology.py --layers 12 --blocks 12 --experts 16 --window 3 --top-k 2 --stride 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.moe.moue import MoUEConfig, UniversalRouting  # noqa: E402


def report(layers: int, experts: int, window: int, blocks: int | None = None, top_k: int = 2, stride: int = 1,
           centered: bool = False) -> dict:
    blocks = blocks or layers
    cfg = MoUEConfig(num_blocks=blocks, block_size=experts, window=window, stride=stride, centered=centered,
                     trajectory="off")
    cfg.validate(layers)
    routing = UniversalRouting(layers, 8, blocks * experts, blocks, top_k, cfg, router_kwargs={})
    return routing.report()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--experts", type=int, required=True, help="experts per pool block (b)")
    p.add_argument("--window", type=int, required=True)
    p.add_argument("--blocks", type=int, default=None, help="pool blocks B (default: layers)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--centered", action="store_true")
    a = p.parse_args(argv)
    out = report(a.layers, a.experts, a.window, a.blocks, a.top_k, a.stride, a.centered)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
