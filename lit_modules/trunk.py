"""What the LightningModules of every family on the trunk share.

Sparse routing bookkeeping (the statistics monitors read, aux-loss-free bias updates once per
optimiser step), the MoUE window knob, regional compilation, parameter counts, and loading
checkpoints written before the one-trunk refactor.

The surface callbacks use (documented, stable):
    moue_window          knob: pool blocks each MoUE layer may route to (None unless ffn=moue)
    last_routing         the last training step's routing statistics (None for a dense trunk):
                         {'layers': [l..], 'counts': [R, E], 'probs_mean': [R, E], 'dropped': [R],
                          'num_pairs': int, 'entropy': [R]}, one row per sparse layer that ran
    routing_topology()   MoUE only: {'allowed': [L, E] candidate sets, 'pi': [E], 'window': W}
    planned_steps        the run's planned optimiser steps (model.optim.total_steps or the trainer's)
    expert_usage         [L, E] routed (token, expert) pairs accumulated over training, summed over
                         ranks (None for a dense trunk); checkpointed
    elastic knobs        (applied by a module whose `supports_elastic` is True, in its training step only;
                         validation and test always run the full model; None = the full configuration)
      elastic_layers       the trunk layers to run, ascending (elastic depth)
      elastic_experts      routed experts each layer keeps: a count (chosen by `elastic_expert_rule`:
                           'usage' = the layer's most used so far, 'prefix' = the lowest ids; for MoUE,
                           a count among the layer's window) or explicit per-layer id lists (elastic width)
      elastic_top_k        experts per token (elastic sparsity)
      elastic_distill      weight of the in-place distillation term (sub-model vs the detached full
                           model on the same batch); 0 = off
    last_elastic         the sub-model the last training step ran: {'layers', 'kept', 'top_k'}
    elastic_min_depth    the fewest layers a sub-model of this family may run (1; ERNIE 5.0: the audio
                         code levels, which read the last Q layers run)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_modules.base import ExperimentModule
from lit_modules.legacy import upgrade_checkpoint
from models.io import load_checkpoint
from models.layers.elastic import EXPERT_RULES, RoutingLimit, keep_experts

__all__ = ["TrunkModule"]


class TrunkModule(ExperimentModule):
    """Base of the LM and VideoAR modules (and every later family): the trunk-level behaviour above.

    Subclasses set `network_attr` (the attribute holding the network, which has `.trunk`) and
    `upgrade_state_dict` (the family's old-checkpoint key map), and call `finish_build()` at the end
    of `configure_model`.
    """

    network_attr: str = "model"
    upgrade_state_dict: Callable = staticmethod(lambda state, prefix: (state, {k: [k] for k in state}))
    compile_trunk: bool = False  # model.compile (nn.Module.compile is a method: not shadowed)
    compile_backend: str = "inductor"
    last_routing: Optional[dict] = None
    _pending_counts: Optional[torch.Tensor] = None
    expert_usage: Optional[torch.Tensor] = None
    supports_elastic: bool = False  # True where training_step applies the elastic knobs
    elastic_min_depth: int = 1
    elastic_layers: Optional[list] = None
    elastic_experts = None  # int | list[list[int]] | None
    elastic_expert_rule: str = "usage"
    elastic_top_k: Optional[int] = None
    elastic_distill: float = 0.0
    last_elastic: Optional[dict] = None

    @property
    def network(self) -> Optional[nn.Module]:
        return getattr(self, self.network_attr, None)

    @property
    def trunk(self):
        net = self.network
        return None if net is None else net.trunk

    @property
    def sparse(self) -> bool:
        return self.trunk is not None and self.trunk.cfg.ffn != "dense"

    blocks_attr: str | tuple = "trunk.layers"  # the block lists FSDP2 shards one by one

    def finish_build(self, fsdp: Optional[dict] = None) -> None:
        """After the network is built (and initial weights loaded): regional compile, then FSDP2 sharding."""
        if self.compile_trunk:
            # torchtitan's order: compile each block, then shard
            self.trunk.compile_blocks(backend=self.compile_backend)
        mesh = self._device_mesh if self._trainer is not None else None
        if mesh is not None:
            from models.parallelize import parallelize

            # trainer=fsdp_ep: lit_modules.parallel.ExpertParallelStrategy carries the expert-parallel size
            ep = getattr(self.trainer.strategy, "expert_parallel_size", 1)
            extra = {"expert_parallel_size": ep} if ep > 1 else {}
            parallelize(self.network, mesh, blocks_attr=self.blocks_attr, **(fsdp or {}), **extra)

    # -- knobs and the callbacks' surface ---------------------------------------------------------

    @property
    def moue_window(self) -> Optional[int]:
        """Knob: the number of pool blocks each MoUE layer may route to (None if not MoUE)."""
        return None if self.trunk is None else self.trunk.moue_window

    @moue_window.setter
    def moue_window(self, window: int) -> None:
        if self.trunk is None or self.trunk.pool is None:
            raise AttributeError("moue_window is only defined for model.net.ffn=moue")
        self.trunk.set_moue_window(int(window))

    def routing_topology(self) -> Optional[dict]:
        return None if self.trunk is None else self.trunk.routing_topology()

    def note_elastic(self, layers: Optional[list[int]], routing: Optional[RoutingLimit]) -> None:
        """Set `last_elastic` to the sub-model a training step ran (from `elastic_choice()`'s result)."""
        cfg = self.trunk.cfg
        self.last_elastic = {"layers": layers or list(range(cfg.n_layers)),
                             "kept": None if routing is None else routing.kept,
                             "top_k": (routing.top_k if routing is not None else None) or cfg.moe.top_k}

    def elastic_choice(self) -> tuple[Optional[list[int]], Optional[RoutingLimit]]:
        """The knobs as (layers to run or None, RoutingLimit or None), checked against the trunk."""
        trunk, L = self.trunk, self.trunk.cfg.n_layers
        layers = None
        if self.elastic_layers is not None:
            layers = sorted(int(i) for i in self.elastic_layers)
            if not layers or len(set(layers)) != len(layers) or not 0 <= layers[0] <= layers[-1] < L:
                raise ValueError(f"elastic_layers must be distinct layer ids in [0, {L}), got {self.elastic_layers}")
            if layers == list(range(L)):
                layers = None
        if self.elastic_experts is None and self.elastic_top_k is None:
            return layers, None
        if not self.sparse:
            raise ValueError("elastic_experts / elastic_top_k need a sparse trunk (model.net.ffn=moe|moue)")
        kept = self.elastic_experts
        if isinstance(kept, int):
            if self.elastic_expert_rule not in EXPERT_RULES:
                raise ValueError(f"elastic_expert_rule must be one of {list(EXPERT_RULES)}, got {self.elastic_expert_rule!r}")
            cand = trunk.pool.routing.candidates if trunk.pool is not None else None
            kept = keep_experts(kept, trunk.num_experts, L, self.elastic_expert_rule, self.expert_usage, cand)
        routing = RoutingLimit(kept, self.elastic_top_k)
        trunk.check_routing(routing)
        return layers, routing

    # -- routing bookkeeping ----------------------------------------------------------------------

    def record_routing(self, infos, balance: bool = True) -> None:
        """Keep this step's routing statistics (for monitors) and add its token counts to those since
        the last optimiser step (for aux-loss-free bias updates, so gradient accumulation is respected,
        and for `expert_usage`). balance=False keeps them out of the bias update: a width-reduced
        elastic step routes nothing to its masked experts, which must not read as under-loaded."""
        if not infos:
            return
        counts = torch.stack([i.counts for i in infos]).float()
        self.last_routing = {
            "layers": [i.layer for i in infos],
            "counts": counts,
            "probs_mean": torch.stack([i.probs_mean.detach() for i in infos]),
            "dropped": torch.stack([i.dropped.float() for i in infos]),
            "num_pairs": infos[0].num_pairs,
            "entropy": torch.stack([i.entropy for i in infos]),
        }
        full = counts.new_zeros(2, self.trunk.cfg.n_layers, counts.shape[1])  # [usage | balance, L, E]
        full[0, [i.layer for i in infos]] = counts
        if balance:
            full[1] = full[0]
        self._pending_counts = full if self._pending_counts is None else self._pending_counts + full

    def log_routing_losses(self, task_loss: torch.Tensor, balance: torch.Tensor) -> None:
        self.log("train/ce", task_loss.detach(), on_step=True, on_epoch=False)
        self.log("train/balance_loss", balance.detach(), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self._pending_counts is None:
            return
        counts, self._pending_counts = self._pending_counts, None
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # every rank applies the same bias update and keeps the same usage (elastic width reads it)
            torch.distributed.all_reduce(counts)
        usage = counts[0].double() if counts.device.type != "mps" else counts[0].float()
        self.expert_usage = usage if self.expert_usage is None else self.expert_usage.to(usage) + usage
        if self.trunk.cfg.moe.bias_balancing and counts[1].any():
            self.trunk.update_router_bias(counts[1])

    # -- bookkeeping ------------------------------------------------------------------------------

    def log_param_counts(self) -> None:
        counts = self.network.num_params()
        metrics = {"params/total": float(counts["total"]), "params/activated": float(counts["activated"])}
        for lg in self.loggers:
            lg.log_metrics(metrics, step=0)
        rank_zero_info(f"parameters: total {counts['total']:,}, activated per token {counts['activated']:,}")
        if self.trunk.pool is not None:
            rank_zero_info(f"MoUE topology: {self.trunk.pool.routing.report()}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.expert_usage is not None:
            checkpoint["expert_usage"] = self.expert_usage.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("expert_usage") is not None:
            self.expert_usage = checkpoint["expert_usage"].clone()

    def upgrade_legacy_checkpoint(self, checkpoint: dict) -> bool:
        """Map a checkpoint written before the one-trunk refactor onto today's names (weights and optimizer)."""
        if self.network is None:
            return False
        return upgrade_checkpoint(checkpoint, self, f"{self.network_attr}.", type(self).upgrade_state_dict)

    def init_state(self, path: str) -> tuple[dict, dict]:
        """(the network's tensors under current names, the whole checkpoint) of a `model.init_ckpt` file.

        Loaded before parallelize(): every rank reads the full tensors, then fully_shard keeps its shard.
        Weights only (`models.io.load_checkpoint`): a file that would unpickle code is refused.
        """
        ckpt = load_checkpoint(path, what="model.init_ckpt checkpoint")
        prefix = f"{self.network_attr}."
        state = {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        return type(self).upgrade_state_dict(state, "")[0], ckpt
