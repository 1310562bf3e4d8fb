"""One MoE feed-forward layer: router, routed experts, optional shared experts, balance losses.

Shapes: B batch, T time, C model dim, N = B*T tokens, E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from models.layers.ffn import SwiGLU
from models.moe.balance import router_entropy, router_z_loss, switch_aux_loss
from models.moe.dispatch import DispatchPlan, moe_forward
from models.moe.expert_parallel import ep_moe_forward
from models.moe.experts import IMPLS, GroupedExperts
from models.moe.router import GATES, Router, RouterOutput


@dataclass
class MoEConfig:
    """Expert layout, routing and balancing of an MoE layer.

    num_shared: always-on shared experts, run as one dense SwiGLU of hidden num_shared * shared_hidden.
    capacity_factor: None is dropless; else each expert keeps ceil(cf * N * k / E) pairs.
    aux_loss_coef / z_loss_coef: Switch balance loss and router z-loss weights (0 disables).
    bias_balancing: DeepSeek-V3 aux-loss-free balancing (bias on selection only); usually with aux_loss_coef=0.
    impl: expert GEMMs: auto | grouped_mm | loop.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256
    num_shared: int = 0
    shared_hidden: Optional[int] = None
    gate: str = "softmax"
    renormalize: bool = True
    noise_std: float = 0.0
    capacity_factor: Optional[float] = None
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    impl: str = "auto"

    def __post_init__(self) -> None:
        for key in ("num_experts", "top_k", "expert_hidden"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.num_shared < 0:
            raise ValueError(f"num_shared must be >= 0, got {self.num_shared}")
        if self.shared_hidden is not None and self.shared_hidden <= 0:
            raise ValueError(f"shared_hidden must be positive or None, got {self.shared_hidden}")
        if self.gate not in GATES:
            raise ValueError(f"gate={self.gate!r} is not one of {list(GATES)}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r} is not one of {list(IMPLS)}")
        for key in ("noise_std", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")


@dataclass
class LayerRouting:
    """What one sparse layer reports, with the same meaning for an MoE and a MoUE layer.

    loss: this layer's weighted loss term (aux_loss_coef * Switch loss for MoE, + z_loss_coef * z_loss);
        a MoUE pool's Universal Expert Load Balance is pooled over layers and added by the trunk.
    z_loss: the raw router z-loss (`router_z_loss`), with gradient.
    probs_mean: [E] mean gate probability (with gradient: the MoUE balance needs it).
    entropy: mean per-token router entropy in nats (`router_entropy`), detached.
    """

    loss: torch.Tensor
    z_loss: torch.Tensor
    counts: torch.Tensor  # [E] int64 kept pairs per expert (E = pool size for MoUE)
    probs_mean: torch.Tensor
    dropped: torch.Tensor  # scalar int64 pairs dropped by capacity
    num_pairs: int  # N * k
    entropy: torch.Tensor
    layer: int = 0


def layer_routing(r: RouterOutput, plan: DispatchPlan, counts: torch.Tensor, layer: int,
                  aux_loss: Optional[torch.Tensor], z_loss_coef: float) -> LayerRouting:
    """The LayerRouting of one routed call (aux_loss: the layer's weighted balance term, or None)."""
    z = router_z_loss(r.logits)
    loss = r.probs.new_zeros(()) if aux_loss is None else aux_loss
    if z_loss_coef:
        loss = loss + z * z_loss_coef
    return LayerRouting(loss=loss, z_loss=z, counts=counts.detach(), probs_mean=r.probs.mean(0),
                        dropped=plan.dropped.detach(), num_pairs=r.topk_idx.numel(),
                        entropy=router_entropy(r.probs.detach()), layer=layer)


class MoELayer(nn.Module):
    """Router + GroupedExperts (+ shared experts) for one block."""

    def __init__(self, dim: int, cfg: MoEConfig, layer: int = 0):
        super().__init__()
        self.dim, self.cfg, self.layer = dim, cfg, layer
        self.router = Router(
            dim, cfg.num_experts, cfg.top_k, gate=cfg.gate, renormalize=cfg.renormalize, noise_std=cfg.noise_std,
            bias_balancing=cfg.bias_balancing, bias_update_rate=cfg.bias_update_rate,
        )
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden, impl=cfg.impl)
        self.shared = None
        if cfg.num_shared:
            self.shared = SwiGLU(dim, cfg.num_shared * (cfg.shared_hidden or cfg.expert_hidden))
        self.ep_mesh = None  # set by enable_expert_parallel

    def enable_expert_parallel(self, ep_mesh) -> None:
        """Keep only this rank's E/ep experts and route pairs to their owners with all-to-all.

        ep_mesh: a 1-D DeviceMesh over the ranks that split the experts (every rank of it must call
        this, with the same weights: they are taken from the mesh's first rank). w13 and w2 become
        DTensors sharded on the expert dim (global shape unchanged, so checkpoints keep one tensor
        per layer); the router, its bias, the shared experts and the losses stay replicated. Each
        rank keeps routing its own tokens, so the routed counts a LayerRouting reports are still
        this rank's, over all E experts (sum them over ranks for the global load).
        """
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        if ep_mesh.ndim != 1:
            raise ValueError(f"expert parallelism needs a 1-D mesh, got {ep_mesh.ndim}-D {ep_mesh}")
        ep = ep_mesh.size()
        if self.cfg.num_experts % ep:
            raise ValueError(f"num_experts={self.cfg.num_experts} is not divisible by the expert-parallel size {ep}")
        if self.cfg.capacity_factor is not None:
            raise ValueError("expert parallelism is dropless: capacity_factor must be None (null), "
                             f"got {self.cfg.capacity_factor}")
        if self.ep_mesh is not None or isinstance(self.experts.w13, DTensor):
            raise RuntimeError("expert parallelism is already enabled on this layer (or its experts are sharded)")
        for name in ("w13", "w2"):
            w = getattr(self.experts, name)
            setattr(self.experts, name, nn.Parameter(distribute_tensor(w.detach(), ep_mesh, [Shard(0)]),
                                                     requires_grad=w.requires_grad))
        self.ep_mesh = ep_mesh

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.router.reset_parameters(std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)

    def forward(self, x_BTC: torch.Tensor, mask_E: Optional[torch.Tensor] = None, top_k: Optional[int] = None,
                replay=None) -> tuple[torch.Tensor, LayerRouting]:
        """mask_E: additive [E] routing mask (elastic width: -inf on experts outside the sub-model);
        top_k: experts per token for this call (elastic sparsity), None = the configured k;
        replay: a `models.moe.replay.RouteReplay` recording or forcing this layer's routes."""
        shape = x_BTC.shape
        x_NC = x_BTC.reshape(-1, shape[-1])
        if replay is not None:
            r = replay.route(self.layer, self.router, x_NC, mask_E, top_k)
        else:
            r = self.router(x_NC, mask_E, top_k)
        if self.ep_mesh is not None:
            y_NC, plan = ep_moe_forward(x_NC, r, self.experts, self.cfg.num_experts, self.ep_mesh.get_group())
        else:
            y_NC, plan = moe_forward(x_NC, r, self.experts, self.cfg.capacity_factor)
        if self.shared is not None:
            y_NC = y_NC + self.shared(x_NC)
        aux = None
        if self.cfg.aux_loss_coef:
            aux = switch_aux_loss(r.probs, r.topk_idx, self.cfg.num_experts) * self.cfg.aux_loss_coef
        return y_NC.view(shape), layer_routing(r, plan, plan.counts, self.layer, aux, self.cfg.z_loss_coef)

    def num_params(self) -> dict[str, int]:
        """Total parameters and those one token activates (router + shared + k experts)."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = self.experts.num_params_per_expert()
        activated = total - (self.cfg.num_experts - self.cfg.top_k) * per_expert
        return {"total": total, "activated": activated}


class MoEFFN(MoELayer):
    """A block's MoE FFN, with the trunk's FFN interface: (h, state) -> (y, state, LayerRouting)."""

    def forward(self, x_BTC: torch.Tensor, state=None, limit=None):
        """limit: this layer's (additive expert mask [E] or None, top_k or None, replay or None)
        (`RoutingLimit.for_layer`)."""
        y, info = super().forward(x_BTC, *(limit or (None, None, None)))
        return y, state, info
