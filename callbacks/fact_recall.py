"""Fact recall of a language model on the synthetic biographies, logged at each validation end.

The biography corpus is written from a knowledge graph, so every fact of a person is a cloze probe
("Adela Novak was born in" -> "Valmora"). The callback takes a fixed, seeded set of probes from the
DataModule (`TextDataModule.fact_probes`: people of `split`, at most `max_probes` in the templates the
training text uses and as many in the ones `data.train_templates` holds out) and scores them with
`models.fact_recall.fact_recall`: exact match of the greedy continuation, and the rank of the true
object among the relation's candidates by mean (or summed) log-probability.

Logged (exact match unless named otherwise; over probes in training wording):
  val/fact_recall, val/fact_recall/<relation>, val/fact_recall_top1, val/fact_recall_mrr,
  val/fact_recall_chance (mean 1 / candidates), val/fact_recall_probes (how many probes the rates
  are over: their binomial error), and, when data.train_templates holds templates out,
  val/fact_recall_unseen, val/fact_recall_unseen_top1, val/fact_recall_unseen_mrr;
  val/fact_count, the number of facts the split's people have (`TextDataModule.fact_count`), and
  val/facts_known = val/fact_recall x val/fact_count, the estimated number of them recalled exactly
  (the knowledge-capacity sweep divides it by the parameter count).
Works for every model on the LM module (dense, MoE, MoUE): it only calls the module's forward.
"""

from __future__ import annotations

import lightning as L

from models.fact_recall import SCORES, fact_recall

__all__ = ["FactRecall", "recall_log_dict"]

SPLITS = ("train", "val")


def recall_log_dict(result: dict, stage: str = "val", fact_count: int | None = None) -> dict[str, float]:
    """The scalars the callback logs, from a `fact_recall` result (fact_count: the facts of the probed
    people, which adds {stage}/fact_count and {stage}/facts_known)."""
    seen = result.get("seen", result)
    out = {f"{stage}/fact_recall": seen["exact"], f"{stage}/fact_recall_top1": seen["top1"],
           f"{stage}/fact_recall_mrr": seen["mrr"], f"{stage}/fact_recall_chance": seen["chance"],
           f"{stage}/fact_recall_probes": float(seen["probes"])}  # the rates' binomial error (summarize_sweep)
    if fact_count is not None:
        out[f"{stage}/fact_count"] = float(fact_count)
        out[f"{stage}/facts_known"] = seen["exact"] * fact_count
    out.update({f"{stage}/fact_recall/{rel}": v["exact"] for rel, v in seen["per_relation"].items()})
    if "unseen" in result:
        u = result["unseen"]
        out.update({f"{stage}/fact_recall_unseen": u["exact"], f"{stage}/fact_recall_unseen_top1": u["top1"],
                    f"{stage}/fact_recall_unseen_mrr": u["mrr"]})
    return out


class FactRecall(L.Callback):
    """Score fact probes at every validation end (not in the sanity check) and log `val/fact_recall*`.

    max_probes: probes per wording group (seen / unseen templates); max_new_tokens: greedy tokens per
    probe (must cover the longest object: ~40 with the byte tokenizer, ~12 with BPE); split: 'train'
    (people trained on: memorisation) or 'val' (held-out people: chance expected); max_candidates:
    candidates ranked per probe (answer + seeded distractors; null: all the relation's objects);
    score: 'mean' or 'sum' log-probability of a candidate's tokens; seed: which probes and distractors.
    The probes are drawn once, so every validation scores the same set.
    """

    def __init__(self, max_probes: int = 64, max_new_tokens: int = 16, split: str = "train",
                 max_candidates: int | None = 32, score: str = "mean", seed: int = 0, batch_size: int = 64) -> None:
        if max_probes < 1:
            raise ValueError(f"callbacks.fact_recall.max_probes must be >= 1, got {max_probes}")
        if max_new_tokens < 1:
            raise ValueError(f"callbacks.fact_recall.max_new_tokens must be >= 1, got {max_new_tokens}")
        if split not in SPLITS:
            raise ValueError(f"callbacks.fact_recall.split must be one of {list(SPLITS)}, got {split!r}")
        if max_candidates is not None and max_candidates < 2:
            raise ValueError(f"callbacks.fact_recall.max_candidates must be >= 2 or null, got {max_candidates}")
        if score not in SCORES:
            raise ValueError(f"callbacks.fact_recall.score must be one of {list(SCORES)}, got {score!r}")
        if batch_size < 1:
            raise ValueError(f"callbacks.fact_recall.batch_size must be >= 1, got {batch_size}")
        self.max_probes, self.max_new_tokens, self.split = max_probes, max_new_tokens, split
        self.max_candidates, self.score, self.seed, self.batch_size = max_candidates, score, seed, batch_size
        self.probes: list[dict] | None = None
        self.fact_count: int | None = None  # facts of the split's people (set with the probes)
        self.last: dict | None = None  # the latest fact_recall result (records included)

    def _probes(self, trainer) -> list[dict]:
        if self.probes is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "fact_probes"):
                raise TypeError("callbacks.fact_recall needs the text DataModule on the biography corpus "
                                f"(data=text, data.source=bios), got {type(dm).__name__}")
            self.probes = dm.fact_probes(self.split, self.max_probes, self.seed, self.max_candidates)
            self.fact_count = dm.fact_count(self.split) if hasattr(dm, "fact_count") else None
        return self.probes

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        tokenizer = getattr(pl_module, "tokenizer", None) or getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise TypeError("callbacks.fact_recall needs a module or DataModule with a text tokenizer")
        probes = self._probes(trainer)
        max_len = getattr(getattr(pl_module, "net_cfg", None), "max_seq_len", None)
        was_training = pl_module.training
        pl_module.eval()
        try:
            # Every rank runs the same forwards (sharded weights are gathered inside them).
            self.last = fact_recall(pl_module, tokenizer, probes, self.max_new_tokens, self.score,
                                    self.batch_size, max_len)
        finally:
            pl_module.train(was_training)
        pl_module.log_dict(recall_log_dict(self.last, fact_count=self.fact_count), sync_dist=False)  # identical on every rank
