"""Mixture of Universal Experts: one expert pool shared by every layer.

Pieces (the paper body is not public, so the forms below are a documented reconstruction, every
choice a config field):
  * `MoUEConfig`                - pool layout, topology, router and balance options;
  * `staggered_rotational_mask` - which pool experts each layer may route to (Staggered Rotational Topology);
  * `uelb_loss`                 - Universal Expert Load Balance on depth-aggregated statistics;
  * `UniversalRouting`          - the universal router, its trajectory state and the pool masks;
  * `UniversalPool`             - the pool's experts + routing, and one layer's dispatch into its window;
  * `MoUEFFN`                   - a block's FFN: its layer's routing into the pool + the layer's shared experts.

Shapes: L layers, N tokens, U pool experts (N_U), B pool blocks, S state dim, D model dim, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from models.layers.ffn import SwiGLU
from models.moe.dispatch import moe_forward, plan_dispatch
from models.moe.experts import GroupedExperts
from models.moe.layer import LayerRouting, MoEConfig, layer_routing

TRAJECTORIES = ("off", "additive", "gru")
ROUTERS = ("universal", "per_layer")
BALANCES = ("uelb", "naive")
UELB_TARGETS = ("exposure", "uniform")


@dataclass
class MoUEConfig:
    """Universal pool and routing options (the expert shape, k and gate come from MoEConfig).

    num_blocks: B, pool blocks; None -> n_layers (block l = layer l's "home" experts).
    block_size: b, experts per block; None -> MoEConfig.num_experts. Pool size N_U = B * b.
    window: W, consecutive blocks each layer may use (1 = a standard MoE, B = full sharing).
    stride: s, block offset between consecutive layers (the stagger).
    centered: window centred on the home block instead of starting at it.
    router: 'universal' (one router over the pool for all layers) or 'per_layer'.
    trajectory: state carried from layer to layer and fed to the router: off | additive | gru.
    state_dim: S, trajectory state size.
    depth_embed: learnable per-layer vector added to the state (breaks depth symmetry).
    balance: 'uelb' (depth-aggregated, exposure-corrected) or 'naive' (per-layer Switch loss).
    uelb_target: 'exposure' (pi_e from the topology) or 'uniform' (1/N_U).
    block_bias: learnable [L, B] routing bias, used by MoE->MoUE conversion (0 on home blocks).
    window_override: None or a smaller window currently open (set by the conversion schedule).
    """

    num_blocks: Optional[int] = None
    block_size: Optional[int] = None
    window: int = 2
    stride: int = 1
    centered: bool = False
    router: str = "universal"
    trajectory: str = "additive"
    state_dim: int = 64
    depth_embed: bool = True
    balance: str = "uelb"
    uelb_target: str = "exposure"
    block_bias: bool = False
    block_bias_init: float = 4.0

    def validate(self, n_layers: int) -> None:
        for name, value, allowed in (
            ("router", self.router, ROUTERS),
            ("trajectory", self.trajectory, TRAJECTORIES),
            ("balance", self.balance, BALANCES),
            ("uelb_target", self.uelb_target, UELB_TARGETS),
        ):
            if value not in allowed:
                raise ValueError(f"moue.{name}={value!r} is not one of {list(allowed)}")
        B = self.num_blocks or n_layers
        if not 1 <= self.window <= B:
            raise ValueError(f"moue.window={self.window} must be in [1, num_blocks={B}]")
        if self.stride < 0:
            raise ValueError(f"moue.stride must be >= 0, got {self.stride}")
        if self.state_dim <= 0 and self.trajectory != "off":
            raise ValueError(f"moue.state_dim must be > 0 with trajectory={self.trajectory!r}")


def window_blocks(layer: int, num_blocks: int, window: int, stride: int = 1, centered: bool = False) -> list[int]:
    """Blocks visible to `layer`: W consecutive blocks from offset (layer * stride) mod B, wrapping."""
    offset = layer * stride - (window - 1) // 2 if centered else layer * stride
    return [(offset + j) % num_blocks for j in range(window)]


def staggered_rotational_mask(
    n_layers: int, num_blocks: int, block_size: int, window: int, stride: int = 1, centered: bool = False
) -> torch.Tensor:
    """Boolean [L, N_U] candidate sets C_l of the Staggered Rotational Topology."""
    allowed = torch.zeros(n_layers, num_blocks * block_size, dtype=torch.bool)
    for layer in range(n_layers):
        for blk in window_blocks(layer, num_blocks, window, stride, centered):
            allowed[layer, blk * block_size : (blk + 1) * block_size] = True
    return allowed


def exposure(allowed_LU: torch.Tensor) -> torch.Tensor:
    """c_e: number of layers that may route to each pool expert."""
    return allowed_LU.sum(0)


def uelb_target(allowed_LU: torch.Tensor, target: str = "exposure") -> torch.Tensor:
    """pi_e, the share of routed pairs expert e gets under topology-uniform routing (sums to 1).

    exposure: pi_e = (1/L) sum_{l: e in C_l} 1/|C_l|;  uniform: 1/N_U.
    """
    L, U = allowed_LU.shape
    if target == "uniform":
        return torch.full((U,), 1.0 / U)
    per_layer = allowed_LU.float() / allowed_LU.sum(1, keepdim=True).float()
    return per_layer.sum(0) / L


def uelb_loss(f_LU: torch.Tensor, P_LU: torch.Tensor, pi_U: torch.Tensor) -> torch.Tensor:
    """Universal Expert Load Balance: sum_e F_e * Pbar_e / pi_e, with F, Pbar averaged over depth.

    f_LU: fraction of layer l's routed pairs sent to e; P_LU: layer l's mean gate probability of e.
    Equals 1 when F = Pbar = pi; experts with pi_e = 0 are unreachable and excluded.
    """
    F_U, P_U = f_LU.mean(0), P_LU.mean(0)
    live = pi_U > 0
    return (F_U[live] * P_U[live] / pi_U[live]).sum()


def naive_balance_loss(f_LU: torch.Tensor, P_LU: torch.Tensor, allowed_LU: torch.Tensor) -> torch.Tensor:
    """Per-layer Switch loss over each layer's candidates, averaged over layers (the ablation)."""
    width = allowed_LU.sum(1).to(f_LU.dtype)  # |C_l|
    return (width * (f_LU * P_LU).sum(1)).mean()


class UniversalRouting(nn.Module):
    """Topology masks, the (universal or per-layer) router and the trajectory state.

    The router is `models.moe.Router` over the whole pool, fed [norm(x); state] and an additive
    mask that is 0 on the layer's candidates and -inf elsewhere (plus the optional block bias).
    """

    def __init__(self, n_layers: int, dim: int, pool_size: int, num_blocks: int, top_k: int, cfg: MoUEConfig, router_kwargs: dict):
        super().__init__()
        from models.moe.router import Router

        self.cfg, self.n_layers, self.num_blocks = cfg, n_layers, num_blocks
        self.block_size = pool_size // num_blocks
        self.state_dim = cfg.state_dim if cfg.trajectory != "off" else 0
        in_dim = dim + self.state_dim
        n_routers = 1 if cfg.router == "universal" else n_layers
        self.routers = nn.ModuleList(Router(in_dim, pool_size, top_k, **router_kwargs) for _ in range(n_routers))
        self.window = cfg.window
        self.register_buffer("allowed", torch.zeros(n_layers, pool_size, dtype=torch.bool), persistent=False)
        self.register_buffer("pi", torch.zeros(pool_size), persistent=False)
        self.set_window(cfg.window)
        if self.state_dim:
            self.signatures = nn.Parameter(torch.zeros(pool_size, self.state_dim))  # u_e
            self.depth = nn.Parameter(torch.zeros(n_layers, self.state_dim)) if cfg.depth_embed else None  # lambda_l
            self.state_norm = nn.RMSNorm(self.state_dim)
            self.gru = nn.GRUCell(self.state_dim, self.state_dim) if cfg.trajectory == "gru" else None
        self.block_bias = (
            nn.Parameter(self._initial_block_bias(cfg.block_bias_init)) if cfg.block_bias else None
        )

    # -------------------------------------------------------------------------------- topology
    def set_window(self, window: int) -> None:
        """Open `window` blocks per layer (the conversion schedule widens this over training)."""
        if not 1 <= window <= self.num_blocks:
            raise ValueError(f"window={window} must be in [1, {self.num_blocks}]")
        self.window = window
        allowed = staggered_rotational_mask(
            self.n_layers, self.num_blocks, self.block_size, window, self.cfg.stride, self.cfg.centered
        )
        self.allowed.copy_(allowed.to(self.allowed.device))
        # Per layer: its candidate experts (ascending) and pool id -> position among them (-1 outside).
        self.candidates = [row.nonzero().flatten().tolist() for row in allowed]
        local = torch.full(allowed.shape, -1, dtype=torch.long)
        for layer, cand in enumerate(self.candidates):
            local[layer, cand] = torch.arange(len(cand))
        self.register_buffer("local_index", local.to(self.allowed.device), persistent=False)
        self.pi.copy_(uelb_target(allowed, self.cfg.uelb_target).to(self.pi.device))

    def _initial_block_bias(self, beta: float) -> torch.Tensor:
        """0 on each layer's home block (the block at its window offset), -beta elsewhere."""
        bias = torch.full((self.n_layers, self.num_blocks), -float(beta))
        for layer in range(self.n_layers):
            bias[layer, window_blocks(layer, self.num_blocks, 1, self.cfg.stride, False)[0]] = 0.0
        return bias

    def report(self) -> dict:
        """Physical width (pool size), virtual width per layer, exposure, and routing-path counts."""
        from math import comb, log10

        k = self.routers[0].top_k
        widths = self.allowed.sum(1).tolist()
        log_paths = sum(log10(comb(int(w), k)) for w in widths)
        full = self.n_layers * log10(comb(self.allowed.shape[1], k))
        return {
            "physical_width": int(self.allowed.shape[1]),
            "virtual_width_per_layer": [int(w) for w in widths],
            "window": int(self.window),
            "exposure": exposure(self.allowed).tolist(),
            "log10_routing_paths": round(log_paths, 3),
            "log10_routing_paths_full_sharing": round(full, 3),
        }

    # -------------------------------------------------------------------------------- routing
    def init_state(self, x_ND: torch.Tensor) -> torch.Tensor | None:
        if not self.state_dim:
            return None
        return x_ND.new_zeros(x_ND.shape[0], self.state_dim)

    def route(self, layer: int, h_ND: torch.Tensor, state_NS: torch.Tensor | None, limit=None):
        """RouterOutput of `layer` for normalised hidden states h and the incoming state.

        limit: (additive [U] mask, top_k, RouteReplay) of `RoutingLimit.for_layer`, any part None.
        """
        extra, top_k, replay = limit or (None, None, None)
        mask = torch.zeros(self.allowed.shape[1], device=h_ND.device, dtype=torch.float32)
        mask = mask.masked_fill(~self.allowed[layer], float("-inf"))
        if extra is not None:
            mask = mask + extra.to(mask.device, mask.dtype)
        if self.block_bias is not None:
            mask = mask + self.block_bias[layer].float().repeat_interleave(self.block_size)
        inp = h_ND if state_NS is None else torch.cat((h_ND, state_NS.to(h_ND.dtype)), dim=-1)
        router = self.routers[0 if len(self.routers) == 1 else layer]
        if replay is not None:
            return replay.route(layer, router, inp, mask, top_k)
        return router(inp, mask, top_k)

    def next_state(self, layer: int, state_NS: torch.Tensor | None, topk_idx, topk_weight) -> torch.Tensor | None:
        """s_l = RMSNorm(s_{l-1} + sum_k g_k u_{e_k} + lambda_l) (or a GRU cell on the same input)."""
        if state_NS is None:
            return None
        msg = (topk_weight.unsqueeze(-1).to(self.signatures.dtype) * self.signatures[topk_idx]).sum(1)
        if self.depth is not None:
            msg = msg + self.depth[layer]
        if self.gru is not None:
            return self.gru(msg, state_NS)
        return self.state_norm(state_NS + msg)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Routers N(0, std); the trajectory signatures and depth embeddings start neutral (0)."""
        for router in self.routers:
            router.reset_parameters(std)
        if self.state_dim:
            nn.init.zeros_(self.signatures)
            if self.depth is not None:
                nn.init.zeros_(self.depth)
            nn.init.ones_(self.state_norm.weight)
            if self.gru is not None:
                self.gru.reset_parameters()
        if self.block_bias is not None:
            self.block_bias.copy_(self._initial_block_bias(self.cfg.block_bias_init))

    def balance_loss(self, f_LU: torch.Tensor, P_LU: torch.Tensor, layers: Optional[list[int]] = None) -> torch.Tensor:
        """UELB (or the naive per-layer loss) over the layers that ran (all by default, rows in order)."""
        allowed = self.allowed if layers is None else self.allowed[layers]
        if self.cfg.balance == "uelb":
            pi = self.pi if layers is None or len(layers) == self.n_layers else uelb_target(allowed, self.cfg.uelb_target)
            return uelb_loss(f_LU, P_LU, pi.to(f_LU.device))
        return naive_balance_loss(f_LU, P_LU, allowed)

    def bias_load(self, counts_LU: torch.Tensor) -> torch.Tensor:
        """Pool load for aux-loss-free bias updates: counts against the topology's expected share pi_e."""
        load = counts_LU.sum(0) / self.pi.clamp_min(1e-12)
        return torch.where(self.pi > 0, load, load[self.pi > 0].mean())


# ------------------------------------------------------------------------------------ the pool


class UniversalPool(nn.Module):
    """The expert pool every MoUE layer shares, with its routing; owned once by the trunk (FSDP2 shards
    it once, with the root) and used by every block's `MoUEFFN`.

    The trajectory state travels from block to block as an ordinary tensor argument / return value
    (so FSDP2's hooks see it); `begin` starts it for one forward.
    """

    def __init__(self, n_layers: int, dim: int, moe: MoEConfig, moue: MoUEConfig):
        super().__init__()
        num_blocks = moue.num_blocks or n_layers
        pool_size = num_blocks * (moue.block_size or moe.num_experts)
        self.moe_cfg = moe
        self.experts = GroupedExperts(pool_size, dim, moe.expert_hidden, impl=moe.impl)
        self.routing = UniversalRouting(
            n_layers, dim, pool_size, num_blocks, moe.top_k, moue,
            router_kwargs=dict(gate=moe.gate, renormalize=moe.renormalize, noise_std=moe.noise_std,
                               bias_balancing=moe.bias_balancing, bias_update_rate=moe.bias_update_rate),
        )
        self._views: Optional[tuple[tuple, tuple]] = None  # this forward's per-expert weight views

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.experts.init_weights(std, out_std)
        self.routing.init_weights(std)

    def begin(self, x_BTC: torch.Tensor) -> Optional[torch.Tensor]:
        """Start one forward over x: returns the initial trajectory state [N, S] (None if off) and
        picks the dispatch path (per-expert weight views on CPU when the loop is faster)."""
        x_NC = x_BTC.reshape(-1, x_BTC.shape[-1])
        self._views = None
        # choose_impl judges work per expert over the whole pool; a layer spreads its pairs over
        # only window/num_blocks of it, hence the scaling.
        pairs = x_NC.shape[0] * self.moe_cfg.top_k * self.routing.num_blocks // self.routing.window
        if x_NC.device.type == "cpu" and self.experts.choose_impl(pairs, x_NC.device, x_NC.dtype) == "loop":
            # one unbind per forward: every layer takes its window's experts from these views
            self._views = (self.experts.w13.unbind(0), self.experts.w2.unbind(0))
        return self.routing.init_state(x_NC)

    def forward_layer(self, layer: int, h_NC: torch.Tensor, state: Optional[torch.Tensor], limit=None
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor], LayerRouting]:
        """Route `layer`'s tokens into its window of the pool: (y, next trajectory state, LayerRouting).

        limit: (additive [U] mask, top_k, RouteReplay) of `RoutingLimit.for_layer`, or None."""
        out = self.routing.route(layer, h_NC, state, limit)
        cf = self.moe_cfg.capacity_factor
        if self._views is None:
            y, plan = moe_forward(h_NC, out, self.experts, cf)
            counts = plan.counts
        else:
            # Dispatch among this layer's candidates only, with per-expert views of the pool: the
            # backward then touches just the experts this layer used.
            cand = self.routing.candidates[layer]
            local = self.routing.local_index[layer][out.topk_idx]
            plan = plan_dispatch(local, out.topk_weight, len(cand), cf)
            w13s, w2s = self._views
            y = self.experts.forward_routed_subset(
                h_NC, plan.token_idx, plan.weight, plan.counts, [w13s[e] for e in cand], [w2s[e] for e in cand]
            )
            # the candidate list is host-side: no device sync (unlike nonzero() on the mask)
            cand_idx = torch.as_tensor(cand, dtype=torch.long, device=plan.counts.device)
            counts = plan.counts.new_zeros(self.num_experts).index_copy_(0, cand_idx, plan.counts)
        state = self.routing.next_state(layer, state, out.topk_idx, out.topk_weight)
        # the pooled UELB is added by the trunk; a layer contributes only its z-loss
        return y, state, layer_routing(out, plan, counts, layer, None, self.moe_cfg.z_loss_coef)


class MoUEFFN(nn.Module):
    """A block's MoUE FFN: its layer's routing into the shared pool, plus the layer's own shared experts.

    The pool is referenced, not registered: it belongs to the trunk (one tensor set, sharded once).
    """

    def __init__(self, dim: int, moe: MoEConfig, layer: int, pool: UniversalPool):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "pool", pool)  # not a submodule
        self.shared = SwiGLU(dim, moe.num_shared * (moe.shared_hidden or moe.expert_hidden)) if moe.num_shared else None

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        if self.shared is not None:
            self.shared.init_weights(std, out_std)

    def forward(self, h_BTC: torch.Tensor, state: Optional[torch.Tensor], limit=None):
        """(y, next trajectory state, LayerRouting); limit: see `UniversalPool.forward_layer`."""
        B, T, C = h_BTC.shape
        h_NC = h_BTC.reshape(B * T, C)
        y, state, info = self.pool.forward_layer(self.layer, h_NC, state, limit)
        if self.shared is not None:
            y = y + self.shared(h_NC)
        return y.view(B, T, C), state, info
