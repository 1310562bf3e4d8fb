"""Token-choice top-k router with softmax or sigmoid gates and aux-loss-free bias balancing.

Shapes: N tokens, D router input dim, E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("softmax", "sigmoid")


@dataclass
class RouterOutput:
    """Selected experts, their combine weights, and the full gate distribution for losses/stats."""

    topk_idx: torch.Tensor  # [N, k] int64 expert ids
    topk_weight: torch.Tensor  # [N, k] float32 combine weights (gates)
    probs: torch.Tensor  # [N, E] float32 gate probabilities (masked experts: 0)
    logits: torch.Tensor  # [N, E] float32 raw logits (masked entries -inf)


class Router(nn.Module):
    """Linear scores -> softmax/sigmoid gates -> top-k, optionally biased for balance (DeepSeek-V3)."""

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        top_k: int,
        gate: str = "softmax",
        renormalize: bool = True,
        noise_std: float = 0.0,
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
    ):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate={gate!r} is not one of {list(GATES)}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.in_dim, self.num_experts, self.top_k = in_dim, num_experts, top_k
        self.gate, self.renormalize, self.noise_std = gate, renormalize, noise_std
        self.bias_balancing, self.bias_update_rate = bias_balancing, bias_update_rate
        self.weight = nn.Parameter(torch.empty(num_experts, in_dim))
        # Persistent so a resumed run keeps the balance it had learned.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32), persistent=True)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, 0.0, std)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_experts={self.num_experts}, top_k={self.top_k}, gate={self.gate}, "
            f"renormalize={self.renormalize}, bias_balancing={self.bias_balancing}"
        )

    def forward(self, x_ND: torch.Tensor, mask: torch.Tensor | None = None, top_k: int | None = None) -> RouterOutput:
        """Route each row of x_ND; `mask` is additive (0 allowed, -inf forbidden), broadcastable to [N, E].

        top_k: experts per token for this call (elastic sparsity); None = the router's own k.
        """
        k = self.top_k if top_k is None else int(top_k)
        # Routing decisions are precision-sensitive (near-ties flip experts), so gates stay float32 under autocast.
        with torch.autocast(x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.weight.float())
            if self.training and self.noise_std > 0:
                logits_NE = logits_NE + torch.randn_like(logits_NE) * self.noise_std
            if mask is not None:
                logits_NE = logits_NE + mask.to(logits_NE.dtype)
            probs_NE = logits_NE.softmax(dim=-1) if self.gate == "softmax" else torch.sigmoid(logits_NE)
            scores_NE = probs_NE.detach()
            if self.bias_balancing:
                scores_NE = scores_NE + self.expert_bias
            if mask is not None:
                # A forbidden expert must lose even against an allowed one whose gate underflowed to 0.
                scores_NE = scores_NE.masked_fill(logits_NE.detach() == float("-inf"), float("-inf"))
            topk_idx_Nk = scores_NE.topk(k, dim=-1, sorted=False).indices
            # Gathered from probs, not scores: the balance bias steers selection but never the output.
            topk_weight_Nk = probs_NE.gather(1, topk_idx_Nk)
            if self.renormalize:
                topk_weight_Nk = topk_weight_Nk / topk_weight_Nk.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(topk_idx_Nk, topk_weight_Nk, probs_NE, logits_NE)

    def forced(self, out: RouterOutput, topk_idx_Nk: torch.Tensor) -> RouterOutput:
        """`out` with its selection replaced by `topk_idx_Nk` (routing replay): the gates are gathered from
        the current probabilities at those experts (renormalised like a normal call), so they keep their
        gradient to the router weights."""
        idx = topk_idx_Nk.to(out.probs.device, torch.long)
        with torch.autocast(out.probs.device.type, enabled=False):
            weight = out.probs.gather(1, idx)
            if self.renormalize:
                weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(idx, weight, out.probs, out.logits)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free step: raise the bias of under-loaded experts, lower it for over-loaded ones.

        Called by the training loop once per optimizer step with the counts accumulated since the
        previous one, so gradient accumulation sees one update per step, not one per micro-batch.
        """
        if not self.bias_balancing:
            return
        load_E = load_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
