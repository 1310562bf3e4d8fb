"""Elastic (once-for-all) pre-training: sample a sub-model of the trunk for every training micro-batch.

ERNIE 5.0 (papers.md 4.5) trains one super-network whose sub-networks (fewer layers, fewer routable
experts, a smaller top-k) are usable on their own. Each axis is drawn independently: with its own
probability the full configuration, otherwise a reduced one. The draw is a pure function of
(seed, global step, micro-batch index), as in OFA and fairseq's LayerDrop, so every rank makes the
same choice with no communication, and a resumed run continues the same sequence.

The callback only sets the module's documented knobs (`elastic_layers`, `elastic_experts`,
`elastic_expert_rule`, `elastic_top_k`, `elastic_distill`, lit_modules/trunk.py) before the
training step and clears them after it, so validation and test always see the full model.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from models.io import atomic_write_text
from models.layers.elastic import sample_depth_layers

__all__ = ["ElasticSampler", "draw_seed"]

WIDTH_RULES = ("usage", "prefix", "random")


def draw_seed(seed: int, step: int, micro: int) -> int:
    """A 63-bit seed from (seed, global step, micro-batch index) only: identical on every rank."""
    digest = hashlib.blake2b(f"elastic:{seed}:{step}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ElasticSampler(L.Callback):
    """Draw (depth, routable experts, top-k) per training micro-batch and set them on the module.

    depth_full_prob: probability of running all layers (the paper: 0.75 in §3.3, 0.8 in §6.4.2).
    min_depth / max_depth: kept depth of a reduced draw, uniform in [min, max]; null = [ceil(L/2), L-1].
        A reduced model keeps the first and last layer and drops a random contiguous middle span.
    width_full_prob: probability of routing over all experts (paper: 0.8).
    experts: experts each layer keeps in a reduced draw (an int or a list to pick from uniformly);
        null = E/2 (MoUE: half of each layer's window). Shared experts always run.
    width_rule: which experts are kept: 'usage' (each layer's most used so far, the rule an exported
        sub-model uses), 'prefix' (the lowest ids) or 'random' (a random subset per layer, the paper's).
    sparsity_full_prob: probability of the configured top-k (paper: 0.8).
    top_k_range: [lo, hi] of a reduced top-k, uniform; null = [1, k-1].
    distill_weight: in-place distillation, sub-model vs the detached full model on the same batch (0 = off).
    seed: null = the run's seed (model.seed). A checkpoint's seed wins on resume.
    record: write every draw of this rank to {log_dir}/elastic_choices_rank{r}.json at the end of fit.
    """

    def __init__(self, depth_full_prob: float = 0.75, min_depth: Optional[int] = None,
                 max_depth: Optional[int] = None, width_full_prob: float = 0.8, experts=None,
                 width_rule: str = "usage", sparsity_full_prob: float = 0.8, top_k_range: Optional[list] = None,
                 distill_weight: float = 0.0, seed: Optional[int] = None, record: bool = False) -> None:
        for name, p in (("depth_full_prob", depth_full_prob), ("width_full_prob", width_full_prob),
                        ("sparsity_full_prob", sparsity_full_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"callbacks.elastic.{name} must be in [0, 1], got {p}")
        if width_rule not in WIDTH_RULES:
            raise ValueError(f"callbacks.elastic.width_rule must be one of {list(WIDTH_RULES)}, got {width_rule!r}")
        if distill_weight < 0:
            raise ValueError(f"callbacks.elastic.distill_weight must be >= 0, got {distill_weight}")
        if top_k_range is not None and (len(top_k_range) != 2 or not 1 <= top_k_range[0] <= top_k_range[1]):
            raise ValueError(f"callbacks.elastic.top_k_range must be [lo, hi] with 1 <= lo <= hi, got {top_k_range}")
        self.depth_full_prob, self.min_depth, self.max_depth = depth_full_prob, min_depth, max_depth
        self.width_full_prob, self.width_rule = width_full_prob, width_rule
        self.experts = None if experts is None else ([int(experts)] if isinstance(experts, int) else [int(e) for e in experts])
        self.sparsity_full_prob = sparsity_full_prob
        self.top_k_range = None if top_k_range is None else [int(v) for v in top_k_range]
        self.distill_weight, self.seed, self.record = distill_weight, seed, record
        self.history: list[dict] = []
        self.last: Optional[dict] = None
        self._ranges: Optional[dict] = None

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not getattr(pl_module, "supports_elastic", False):
            raise ValueError(f"callbacks.elastic: {type(pl_module).__name__} does not apply elastic knobs in its "
                             "training step")
        if self.seed is None:
            self.seed = int(getattr(pl_module, "seed", 0))
        from lightning.pytorch.strategies import DDPStrategy

        strategy = trainer.strategy
        if (isinstance(strategy, DDPStrategy) and self.depth_full_prob < 1
                and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)):
            raise ValueError("callbacks.elastic: elastic depth leaves dropped layers without gradients, which DDP "
                             "only allows with trainer.strategy.find_unused_parameters=true (or set "
                             "callbacks.elastic.depth_full_prob=1)")

    def _resolve(self, pl_module) -> dict:
        """The allowed ranges, from the built trunk (checked once, naming the callback's keys)."""
        if self._ranges is not None:
            return self._ranges
        cfg = pl_module.trunk.cfg
        n = cfg.n_layers
        floor = max(1, int(getattr(pl_module, "elastic_min_depth", 1)))  # the family's fewest layers (ERNIE 5.0: audio levels)
        lo = max(math.ceil(n / 2), floor) if self.min_depth is None else int(self.min_depth)
        hi = max(lo, n - 1) if self.max_depth is None else int(self.max_depth)
        if not floor <= lo <= hi <= n:
            raise ValueError(f"callbacks.elastic.min_depth / max_depth must satisfy {floor} <= min <= max <= "
                             f"n_layers={n} (the model needs at least {floor} layers), got [{lo}, {hi}]")
        sparse = cfg.ffn != "dense"
        k = cfg.moe.top_k
        ranges = {"depth": (lo, hi), "sparse": sparse, "k": k, "n_layers": n}
        if sparse:
            trunk = pl_module.trunk
            width = len(trunk.pool.routing.candidates[0]) if trunk.pool is not None else trunk.num_experts
            experts = self.experts or [max(k, width // 2)]
            bad = [e for e in experts if not 1 <= e <= width]
            if bad:
                raise ValueError(f"callbacks.elastic.experts must be in [1, {width}] (experts per layer), got {bad}")
            klo, khi = self.top_k_range or [1, max(1, k - 1)]
            if khi > k:
                raise ValueError(f"callbacks.elastic.top_k_range must stay <= model.net.moe.top_k={k}, got {[klo, khi]}")
            ranges.update(width=width, experts=experts, top_k=(klo, khi), candidates=(
                trunk.pool.routing.candidates if trunk.pool is not None else None))
        self._ranges = ranges
        return ranges

    # -- the draw ---------------------------------------------------------------------------------

    def choice_at(self, pl_module, step: int, micro: int) -> dict:
        """The sub-model of (step, micro-batch): {'layers' | None, 'experts' (int | lists | None), 'top_k' | None}.

        Every uniform below is drawn in a fixed order whatever the outcome, so one axis's setting
        never shifts another's draws.
        """
        r = self._resolve(pl_module)
        g = torch.Generator().manual_seed(draw_seed(self.seed, step, micro))
        u = torch.rand(3, generator=g).tolist()
        depth = int(torch.randint(r["depth"][0], r["depth"][1] + 1, (1,), generator=g))
        span_seed = int(torch.randint(1 << 62, (1,), generator=g))
        layers = None
        if u[0] >= self.depth_full_prob and depth < r["n_layers"]:
            layers = sample_depth_layers(r["n_layers"], depth, torch.Generator().manual_seed(span_seed))
        experts = top_k = None
        if r["sparse"]:
            n_keep = r["experts"][int(torch.randint(len(r["experts"]), (1,), generator=g))]
            pick_seed = int(torch.randint(1 << 62, (1,), generator=g))
            k = int(torch.randint(r["top_k"][0], r["top_k"][1] + 1, (1,), generator=g))
            if u[1] >= self.width_full_prob and n_keep < r["width"]:
                experts = n_keep if self.width_rule != "random" else self._random_experts(r, n_keep, pick_seed)
            if u[2] >= self.sparsity_full_prob and k < r["k"]:
                top_k = k
            if top_k is None and experts is not None and n_keep < r["k"]:
                top_k = n_keep  # a layer cannot pick more experts than it keeps
        return {"layers": layers, "experts": experts, "top_k": top_k}

    @staticmethod
    def _random_experts(r: dict, n_keep: int, seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for layer in range(r["n_layers"]):
            cand = list(range(r["width"])) if r["candidates"] is None else list(r["candidates"][layer])
            perm = torch.randperm(len(cand), generator=g)[:n_keep].tolist()
            out.append(sorted(cand[j] for j in perm))
        return out

    # -- hooks ------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        micro = batch_idx % max(1, trainer.accumulate_grad_batches)
        choice = self.choice_at(pl_module, trainer.global_step, micro)
        pl_module.elastic_layers = choice["layers"]
        pl_module.elastic_experts = choice["experts"]
        pl_module.elastic_expert_rule = "usage" if self.width_rule == "random" else self.width_rule
        pl_module.elastic_top_k = choice["top_k"]
        pl_module.elastic_distill = self.distill_weight
        self.last = {"step": int(trainer.global_step), "micro": micro, **choice}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        applied = pl_module.last_elastic or {}
        r = self._resolve(pl_module)
        kept = applied.get("kept")
        n_experts = r.get("width", 0) if kept is None else len(kept[0])
        metrics = {"elastic/depth": float(len(applied.get("layers") or range(r["n_layers"]))),
                   "elastic/experts": float(n_experts), "elastic/top_k": float(applied.get("top_k") or 0)}
        usage = pl_module.expert_usage
        if usage is not None and float(usage.sum()) > 0:
            ids = kept if kept is not None else [list(range(usage.shape[1]))] * usage.shape[0]
            share = sum(float(usage[i, ids[i]].sum()) for i in range(len(ids))) / float(usage.sum())
            metrics["elastic/kept_usage_share"] = share
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if self.record:
            self.history.append({"step": self.last["step"], "micro": self.last["micro"],
                                 "layers": applied.get("layers"), "kept": kept, "top_k": applied.get("top_k")})
        for knob in ("elastic_layers", "elastic_experts", "elastic_top_k"):
            setattr(pl_module, knob, None)
        pl_module.elastic_distill = 0.0

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.record and trainer.log_dir:
            path = Path(trainer.log_dir) / f"elastic_choices_rank{trainer.global_rank}.json"
            atomic_write_text(path, json.dumps(self.history))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the checkpoint's seed wins: a resumed run continues the sequence it started
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        self.last = state_dict.get("last")
