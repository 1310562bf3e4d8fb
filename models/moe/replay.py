"""Routing replay for MoE policies in RL: record each token's routed experts in one forward, force them in another.

R3 records during the rollout (the inference engine's routes), R2 during the old-log-prob pass of the
training engine; both replay the recorded top-k choices in the training forward. The gate weights are
still gathered from the *current* router probabilities at the replayed experts (and renormalised as
the router would), so the router keeps its gradient: only the selection is frozen (Megatron's router
replay does the same). Sparse layers pass the replay through `RoutingLimit.replay`.

Shapes: N tokens of one call (B*T, row-major), k experts per token, L layers.
"""

from __future__ import annotations

from typing import Optional

import torch

from models.moe.router import Router, RouterOutput

__all__ = ["REPLAY_MODES", "RouteReplay", "route_disagreement"]

REPLAY_MODES = ("record", "replay")


class RouteReplay:
    """One forward's routing record or replay.

    mode 'record': every sparse layer routes as usual and appends its top-k ids [N, k] to `recorded[layer]`
        (one entry per call: a KV-cached decode records the prefill, then one entry per new token).
    mode 'replay': `routes[layer]` ([N, k] or [B, T, k] int64, the call's tokens in row-major order)
        replaces the router's choice; the choice the router would have made is kept in `natural[layer]`
        (what the stability monitor compares with the replayed one).
    """

    def __init__(self, mode: str = "record", routes: Optional[dict[int, torch.Tensor]] = None):
        if mode not in REPLAY_MODES:
            raise ValueError(f"RouteReplay mode must be one of {list(REPLAY_MODES)}, got {mode!r}")
        if mode == "replay" and routes is None:
            raise ValueError("RouteReplay(mode='replay') needs the routes to replay")
        self.mode = mode
        self.routes = routes or {}
        self.recorded: dict[int, list[torch.Tensor]] = {}
        self.natural: dict[int, torch.Tensor] = {}

    def route(self, layer: int, router: Router, x_ND: torch.Tensor, mask=None, top_k: Optional[int] = None
              ) -> RouterOutput:
        out = router(x_ND, mask, top_k)
        if self.mode == "record":
            self.recorded.setdefault(layer, []).append(out.topk_idx.detach())
            return out
        if layer not in self.routes:
            raise KeyError(f"routing replay has no routes for layer {layer} (recorded layers: {sorted(self.routes)})")
        forced = self.routes[layer].to(out.topk_idx.device).reshape(-1, out.topk_idx.shape[-1])
        if forced.shape != out.topk_idx.shape:
            raise ValueError(f"layer {layer}: replayed routes have shape {tuple(forced.shape)}, the forward routes "
                             f"{tuple(out.topk_idx.shape)} (tokens x top-k)")
        self.natural[layer] = out.topk_idx.detach()
        return router.forced(out, forced)

    def stacked(self, batch: int) -> dict[int, torch.Tensor]:
        """The recorded calls of each layer joined along time: {layer: [batch, T_total, k]}."""
        return {layer: torch.cat([c.reshape(batch, -1, c.shape[-1]) for c in calls], dim=1)
                for layer, calls in self.recorded.items()}


def route_disagreement(a: torch.Tensor, b: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of tokens whose *set* of routed experts differs between a and b ([..., k] ids each);
    valid: a bool mask over the leading dims (tokens to count)."""
    if a.shape != b.shape:
        raise ValueError(f"route sets must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    differ = (a.sort(-1).values != b.sort(-1).values).any(-1)
    if valid is None:
        return differ.float().mean()
    return (differ & valid).float().sum() / valid.float().sum().clamp_min(1)
