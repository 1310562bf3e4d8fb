"""Fact recall of a language-model checkpoint trained on the synthetic biographies (dense, MoE, MoUE).

    python tools/fact_recall.py RUN/checkpoints/last.ckpt                  # people trained on
    python tools/fact_recall.py CKPT --split val --max-probes 300          # held-out people (chance)
    python tools/fact_recall.py CKPT --max-new-tokens 40                   # byte tokenizer: longer objects

The corpus, the train/val split of people and the templates the training text used are rebuilt from
the checkpoint's data settings (datamodule_hyper_parameters); the tokenizer comes from the checkpoint.
Probes and metrics are those of callbacks/fact_recall.py (models/fact_recall.py): exact match of the
greedy continuation ('exact'), rank of the true object among the relation's candidates ('top1', 'mrr',
'chance'), per relation, and under 'seen' / 'unseen' for the templates the training text used / held
out (data.train_templates); 'fact_count', the facts of the split's people, and 'facts_known', the
exact-match rate in the training wording times that count. Prints one JSON object. Checkpoints load weights only (models.io).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.fact_recall import SCORES, fact_recall  # noqa: E402
from models.io import load_checkpoint  # noqa: E402

__all__ = ["evaluate", "main"]


def evaluate(ckpt: str | Path, split: str = "train", max_probes: int = 200, max_new_tokens: int = 16,
             max_candidates: int | None = 32, score: str = "mean", seed: int = 0, device: str = "cpu",
             records: bool = False) -> dict:
    """The fact-recall summary of `ckpt` (records: keep each probe's prompt, answer and continuation)."""
    from datamodules.text import TextDataModule
    from generate import is_ernie3, load_module

    path = Path(ckpt)
    state = load_checkpoint(path)  # weights only: a file that would unpickle code is refused
    if is_ernie3(path):
        raise ValueError(f"{path} is an ERNIE 3.0 checkpoint; probe it with tools/ernie3_probe.py")
    hp = dict(state.get("datamodule_hyper_parameters") or {})
    if hp.get("source", "bios") != "bios" or "num_people" not in hp:
        raise ValueError(f"{path} was not trained on the biography corpus (data.source=bios): "
                         f"its data settings are {sorted(hp) or 'missing'}")
    del state
    module = load_module(path, device)
    hp["cache_dir"] = hp.get("cache_dir", "data/cache")  # never written: probes need no token cache
    dm = TextDataModule(**hp)
    probes = dm.fact_probes(split, max_probes, seed, max_candidates)
    out = fact_recall(module, module.tokenizer, probes, max_new_tokens, score,
                      max_len=module.net_cfg.max_seq_len)
    kept = out.pop("records")
    count = dm.fact_count(split)
    result = {"checkpoint": str(path), "split": split, "train_templates": dm.train_templates,
              "max_candidates": max_candidates, "score": score, **out,
              "fact_count": count, "facts_known": out.get("seen", out)["exact"] * count}
    if records:
        result["records"] = kept
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--split", default="train", choices=["train", "val"], help="people trained on or held out")
    p.add_argument("--max-probes", type=int, default=200, help="probes per wording group (seen / unseen templates)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-candidates", type=int, default=32, help="0: every object of the relation")
    p.add_argument("--score", default="mean", choices=list(SCORES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--records", action="store_true", help="include each probe's prompt and continuation")
    args = p.parse_args(argv)
    if args.max_probes < 1:
        p.error(f"--max-probes must be >= 1, got {args.max_probes}")
    if args.max_candidates == 1 or args.max_candidates < 0:
        p.error(f"--max-candidates must be >= 2 (0: all), got {args.max_candidates}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    out = evaluate(args.ckpt, args.split, args.max_probes, args.max_new_tokens, args.max_candidates or None,
                   args.score, args.seed, args.device, args.records)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
