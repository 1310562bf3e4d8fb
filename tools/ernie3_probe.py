"""Zero-shot knowledge probing of a pre-trained ERNIE 3.0 checkpoint (cloze with the NLU module).

    python tools/ernie3_probe.py RUN/checkpoints/last.ckpt            # facts of people seen in pre-training
    python tools/ernie3_probe.py CKPT --split val --max-probes 300    # held-out people (chance level expected)
    python tools/ernie3_probe.py CKPT --templates 0 1 2               # the pre-training wording (memorisation)

Each probe is a sentence in a template the pre-training never used (data.train_templates leaves it
out) stating one fact of a person; the fact's object is replaced by [MASK] tokens and every object
of that relation in the knowledge graph is a candidate. A candidate's score is the mean
log-probability the masked-LM head gives its tokens at the masked positions (as many [MASK] as it
has tokens); the prediction is the best-scoring candidate (ties count against the answer). Prints one
JSON object: accuracy, mean reciprocal rank, chance (mean 1 / number of candidates), per relation;
the summary is models/fact_recall.py's, which scores causal LMs on the same kind of probes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.fact_recall import cloze_parts, rank_of, recall_metrics  # noqa: E402
from models.io import load_checkpoint, refuse_unsafe_pickle  # noqa: E402

__all__ = ["probe"]


def _load(ckpt: str):
    from datamodules.knowledge import KnowledgeDataModule
    from lit_modules.ernie3 import Ernie3Module

    state = load_checkpoint(ckpt)  # weights only: a file that would unpickle code is refused
    if "ernie3_knobs" not in state:
        raise ValueError(f"{ckpt} is not an ERNIE 3.0 pre-training checkpoint")
    with refuse_unsafe_pickle(ckpt):
        module = Ernie3Module.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    hp = dict(state.get("datamodule_hyper_parameters") or {})
    return module, hp, KnowledgeDataModule


@torch.no_grad()
def probe(ckpt: str, split: str = "train", max_probes: int = 200, cache_dir: str | None = None, seed: int = 0,
          templates: list[int] | None = None) -> dict:
    module, hp, DM = _load(ckpt)
    if cache_dir:
        hp["cache_dir"] = cache_dir
    hp.pop("num_workers", None)
    dm = DM(**hp)
    dm.setup()
    held_out = templates or [t for t in range(4) if t not in dm.hparams.train_templates] or [0]
    probes = dm.cloze_probes(split, held_out, max_probes, seed)
    tok, mask, cls, pad = dm.tokenizer, dm.special("[MASK]"), dm.special("[CLS]"), dm.special("[PAD]")
    model = module.model
    records = []
    for p in probes:
        before, cands, after = cloze_parts(p, lead=" ")
        left = tok.encode(before) if before.strip() else []
        rows, spans = [], []
        for c in cands:
            # the candidate's tokens in context: encoded with its leading space, as in running text
            c_ids = tok.encode(c)
            right = tok.encode(after) if after else []
            ids = [cls] + left + [mask] * len(c_ids) + right
            rows.append((ids, c_ids))
            spans.append((1 + len(left), 1 + len(left) + len(c_ids)))
        T = max(len(r[0]) for r in rows)
        x = torch.full((len(rows), T), pad)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, (ids, _) in enumerate(rows):
            x[i, : len(ids)] = torch.tensor(ids)
            valid[i, : len(ids)] = True
        logp = model(x, "mlm", valid).float().log_softmax(-1)
        scores = []
        for i, ((ids, c_ids), (a, b)) in enumerate(zip(rows, spans)):
            scores.append(float(logp[i, torch.arange(a, b), torch.tensor(c_ids)].mean()))
        records.append({"relation": p["relation"], "num_candidates": len(scores),
                        "rank": rank_of(scores, p["candidates"].index(p["answer"]))})
    m = recall_metrics(records)
    return {
        "checkpoint": str(ckpt), "split": split, "templates": held_out, "probes": m["probes"],
        "cloze_accuracy": round(m["top1"], 4), "mrr": round(m["mrr"], 4), "chance": round(m["chance"], 4),
        "per_relation": {r: round(v["top1"], 4) for r, v in m["per_relation"].items()},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--split", default="train", choices=["train", "val"], help="people seen in pre-training or held out")
    p.add_argument("--max-probes", type=int, default=200)
    p.add_argument("--cache-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--templates", type=int, nargs="+", help="template ids (default: those pre-training left out)")
    args = p.parse_args(argv)
    out = probe(args.ckpt, args.split, args.max_probes, args.cache_dir, args.seed, args.templates)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
