"""Load-balance losses and routing statistics.

Shapes: N tokens, E experts, k experts per token.
Everything here is vectorised and syncs nothing to the host, so it can run every step.
"""

from __future__ import annotations

import torch


def switch_aux_loss(probs_NE: torch.Tensor, topk_idx_Nk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer balance loss E * sum_e f_e * P_e (1 for uniform routing, up to E when collapsed).

    f_e: fraction of the N*k routed pairs sent to e (before capacity drops; not differentiable);
    P_e: mean gate probability of e (carries the gradient to the router).
    """
    if probs_NE.shape[0] == 0:
        return probs_NE.sum() * 0
    counts_E = torch.bincount(topk_idx_Nk.reshape(-1), minlength=num_experts)
    f_E = counts_E.to(probs_NE.dtype) / topk_idx_Nk.numel()
    P_E = probs_NE.mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss mean_n logsumexp(logits_n)^2; -inf (masked) entries contribute exp(-inf) = 0."""
    if logits_NE.shape[0] == 0:
        return logits_NE.sum() * 0
    # logsumexp already treats -inf as 0 mass, and is finite while one entry per row is finite.
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


def router_entropy(probs_NE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy in nats of the gate distribution, renormalised to sum 1 (so sigmoid gates work).

    ln(E) means uniform gates, 0 means one-hot.
    """
    p = probs_NE.float()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(p * p.clamp_min(1e-20).log()).sum(dim=-1).mean()


def routing_stats(
    counts_E: torch.Tensor,
    probs_NE_or_mean: torch.Tensor,
    dropped: torch.Tensor | int,
    num_pairs: int,
) -> dict[str, torch.Tensor]:
    """Per-step routing health (all detached float tensors).

    load: fraction of kept pairs per expert [E]; max_vio: max(load)/mean(load) - 1 (0 = balanced);
    cv: population std / mean of counts; dead_frac: fraction of experts with no pair;
    dropped_frac: dropped / num_pairs; entropy: mean per-token gate entropy in nats (see
    `router_entropy`) for [N, E] probs; given only the [E] mean it is the entropy of the mean
    distribution, an upper bound on the per-token mean.
    """
    c = counts_E.detach().float()
    total = c.sum().clamp_min(1.0)
    mean = c.mean().clamp_min(1e-20)
    probs = probs_NE_or_mean.detach()
    entropy = router_entropy(probs if probs.dim() == 2 else probs.unsqueeze(0))
    dropped_t = torch.as_tensor(dropped, device=c.device).float()
    return {
        "load": c / total,
        "max_vio": c.max() / mean - 1.0,
        "cv": c.std(correction=0) / mean,
        "dead_frac": (c == 0).float().mean(),
        "dropped_frac": dropped_t / max(num_pairs, 1),
        "entropy": entropy,
    }
