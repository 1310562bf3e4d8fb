"""RL post-training objectives: GRPO/GSPO advantages and losses, IcePop train/inference-mismatch masks
(token, sequence and Mixed-IcePop), k3 KL, entropy, WPSM masking, AHRL hint ratio and the U-RB scheduler.

Shape legend: B prompts (queries), G responses per prompt, N = B*G sequences (prompt-major: the G responses
of prompt b are rows b*G .. b*G+G-1), T response tokens, V vocabulary. `mask` [N, T] marks valid response
tokens (bool, or 0/1 floats). Log-probs are per-token log-probabilities of the sampled tokens:
`logp_new` under the policy being trained (the only input that receives gradient), `logp_old` under the
train-engine copy of the policy that generated the batch, `logp_rollout` under the inference engine that
sampled it, `logp_ref` under a frozen reference model.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

__all__ = [
    "OBJECTIVES",
    "AGGREGATIONS",
    "group_advantages",
    "masked_token_mean",
    "token_log_ratio",
    "token_ratio",
    "sequence_log_ratio",
    "sequence_ratio",
    "icepop_token_mask",
    "icepop_sequence_mask",
    "policy_loss",
    "kl_k3",
    "entropy_from_logits",
    "wpsm_mask",
    "hint_ratio",
    "hint_gamma",
    "UnbiasedReplayBuffer",
]

OBJECTIVES = ("grpo", "gspo", "grpo_icepop", "gspo_icepop", "mixed_icepop")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
_SEQUENCE_RATIO = {"gspo", "gspo_icepop", "mixed_icepop"}
_NEEDS_ROLLOUT = {"grpo_icepop", "gspo_icepop", "mixed_icepop"}


# ----------------------------------------------------------------------------------------------- helpers
def _as_bool_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)} (the log-probs' shape)")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_same_shape(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    if ref.dim() != 2:
        raise ValueError(f"{ref_name} must be [N, T], got shape {tuple(ref.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} like {ref_name}")


def _check_bounds(alpha: float, beta: float) -> None:
    if not (0 < alpha <= beta and math.isfinite(beta)):
        raise ValueError(f"icepop bounds need 0 < alpha <= beta < inf, got alpha={alpha}, beta={beta}")


def _masked_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a - b on valid tokens, 0 elsewhere (so padding holding -inf/nan never poisons sums or gradients)."""
    return torch.where(mask, a - b, torch.zeros((), dtype=a.dtype, device=a.device))


def _seq_mean(x_NT: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over valid tokens; 0 for a sequence with no valid token."""
    return (x_NT * mask).sum(-1) / mask.sum(-1).clamp_min(1)


# ------------------------------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, normalize_std: bool = True) -> torch.Tensor:
    """GRPO group-relative advantages [B, G]: (r - group mean) / (group std + eps).

    rewards: [B, G], one scalar reward per response. The std is the population std over the G responses
    (so a single response or a group of identical rewards gives zeros). normalize_std=False returns r - mean.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError(f"rewards must be a [B, G] tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    centered = r - r.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centered
    std = r.std(dim=1, keepdim=True, correction=0)
    return centered / (std + eps)


def masked_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over all valid tokens of the batch (0 when there are none)."""
    m = _as_bool_mask(mask, x)
    return (x * m).sum() / m.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------- ratio pieces
def token_log_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log r_{i,j} = logp_new - logp_old on valid tokens, 0 on padding. [N, T]"""
    _check_same_shape("logp_new", logp_new, logp_old=logp_old)
    return _masked_diff(logp_new, logp_old, _as_bool_mask(mask, logp_new))


def token_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token importance ratio r_{i,j} = exp(logp_new - logp_old); 1 on padding. [N, T]"""
    return token_log_ratio(logp_new, logp_old, mask).exp()


def sequence_log_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO log s_i = mean over valid tokens of (logp_new - logp_old); 0 for an empty sequence. [N]"""
    m = _as_bool_mask(mask, logp_new)
    return _seq_mean(token_log_ratio(logp_new, logp_old, m), m)


def sequence_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO sequence ratio s_i = exp(mean_j (logp_new - logp_old)_{i,j}) over valid tokens. [N]"""
    return sequence_log_ratio(logp_new, logp_old, mask).exp()


# ------------------------------------------------------------------------------------------------ IcePop
def icepop_token_mask(logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                      alpha: float = 0.5, beta: float = 2.0) -> torch.Tensor:
    """Token IcePop mask M(k) [N, T] bool: k = pi_train_old / pi_infer in [alpha, beta] (inclusive) on valid tokens.

    logp_old: train-engine log-probs of the behaviour policy; logp_rollout: inference-engine log-probs.
    The comparison is done in log space (log alpha <= log k <= log beta) in the inputs' dtype.
    """
    _check_same_shape("logp_old", logp_old, logp_rollout=logp_rollout)
    _check_bounds(alpha, beta)
    m = _as_bool_mask(mask, logp_old)
    log_k = _masked_diff(logp_old.detach(), logp_rollout.detach(), m)
    lo = torch.tensor(alpha, dtype=log_k.dtype, device=log_k.device).log()
    hi = torch.tensor(beta, dtype=log_k.dtype, device=log_k.device).log()
    return m & (log_k >= lo) & (log_k <= hi)


def icepop_sequence_mask(logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                         alpha: float = 0.5, beta: float = 2.0) -> torch.Tensor:
    """Sequence IcePop mask [N] bool: keep sequence i when exp(mean_j log k_{i,j}) is in [alpha, beta].

    Sequences with no valid token are dropped (False).
    """
    _check_same_shape("logp_old", logp_old, logp_rollout=logp_rollout)
    _check_bounds(alpha, beta)
    m = _as_bool_mask(mask, logp_old)
    log_k = _seq_mean(_masked_diff(logp_old.detach(), logp_rollout.detach(), m), m)
    lo = torch.tensor(alpha, dtype=log_k.dtype, device=log_k.device).log()
    hi = torch.tensor(beta, dtype=log_k.dtype, device=log_k.device).log()
    return m.any(-1) & (log_k >= lo) & (log_k <= hi)


# ----------------------------------------------------------------------------------------- policy loss
def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_rollout: Optional[torch.Tensor],
                advantages: torch.Tensor, mask: torch.Tensor, objective: str = "grpo", *,
                clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                icepop: tuple[float, float] = (0.5, 2.0), aggregation: str = "token_mean",
                wpsm_mask: Optional[torch.Tensor] = None,
                icepop_weight: str = "mask") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss (negative objective, to minimise) for GRPO/GSPO and the IcePop variants.

    Per valid token (i, j), with x the ratio, A_i the sequence advantage and
    clip(x) = clamp(x, 1 - clip_eps, 1 + clip_eps_high):
        term_{i,j} = w_{i,j} * min(x A_i, clip(x) A_i)
    objective:
        "grpo":         x = token ratio r_{i,j},  w = 1
        "gspo":         x = sequence ratio s_i,   w = 1
        "grpo_icepop":  x = r_{i,j},  w = M(k_{i,j})          (token IcePop mask)
        "gspo_icepop":  x = s_i,      w = M_seq(i)            (sequence IcePop mask)
        "mixed_icepop": x = s_i,      w = M(k_{i,j})          (Mixed-IcePop: sequence ratio, token mask)
    with k = pi_train_old / pi_infer = exp(logp_old - logp_rollout) and icepop = (alpha, beta).
    icepop_weight: "mask" uses M in {0, 1}; "ratio" uses the truncated IS weight M(k) = k on kept tokens
        (k for "gspo_icepop" is the sequence-level exp(mean log k)); the weight is never differentiated.
    wpsm_mask: [N] WPSM M_i; every term of sequence i is multiplied by (1 - M_i).
    aggregation:
        "token_mean":          sum of terms over the batch / number of valid tokens of the batch
        "seq_mean_token_mean": mean over sequences (with >= 1 valid token) of sum_j term_{i,j} / |y_i|
    IcePop-masked tokens still count in the |y_i| / token-count denominators. Gradient flows only through
    logp_new (logp_old, logp_rollout, advantages and wpsm_mask are detached).

    Returns (loss, stats) where stats holds detached 0-d tensors: "clip_frac" (valid tokens whose clipped
    branch is active; sequence ratios count once per token), "icepop_masked_frac" (valid tokens zeroed by
    this objective's IcePop mask), "ratio_mean" (mean token ratio r), and when logp_rollout is given
    "mismatch_k_mean", "mismatch_k_max" (k over valid tokens), "mismatch_kl" (k1 estimate of
    KL(pi_infer || pi_train_old) = mean(logp_rollout - logp_old)) and "mismatch_kl_k3" (mean(k - 1 - log k)).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if icepop_weight not in ("mask", "ratio"):
        raise ValueError(f"icepop_weight must be 'mask' or 'ratio', got {icepop_weight!r}")
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not eps_high > 0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high}")
    _check_same_shape("logp_new", logp_new, logp_old=logp_old, logp_rollout=logp_rollout)
    if objective in _NEEDS_ROLLOUT and logp_rollout is None:
        raise ValueError(f"objective {objective!r} needs logp_rollout (inference-engine log-probs), got None")
    alpha, beta = icepop
    _check_bounds(alpha, beta)
    N = logp_new.shape[0]
    if advantages.shape != (N,):
        raise ValueError(f"advantages must be [N] = [{N}], got shape {tuple(advantages.shape)}")
    if wpsm_mask is not None and wpsm_mask.shape != (N,):
        raise ValueError(f"wpsm_mask must be [N] = [{N}], got shape {tuple(wpsm_mask.shape)}")
    m = _as_bool_mask(mask, logp_new)
    mf = m.to(logp_new.dtype)
    logp_old = logp_old.detach()
    adv = advantages.detach().to(logp_new.dtype)[:, None]  # [N, 1]

    log_r = _masked_diff(logp_new, logp_old, m)  # [N, T]
    if objective in _SEQUENCE_RATIO:
        x = _seq_mean(log_r, m).exp()[:, None].expand_as(log_r)  # s_i broadcast to tokens
    else:
        x = log_r.exp()
    surrogate = torch.minimum(x * adv, x.clamp(1 - clip_eps, 1 + eps_high) * adv)

    weight = mf
    icepop_keep = None
    if objective in ("grpo_icepop", "mixed_icepop"):
        icepop_keep = icepop_token_mask(logp_old, logp_rollout, m, alpha, beta)
        k_w = _masked_diff(logp_old, logp_rollout.detach(), m).exp()
    elif objective == "gspo_icepop":
        icepop_keep = icepop_sequence_mask(logp_old, logp_rollout, m, alpha, beta)[:, None] & m
        k_w = _seq_mean(_masked_diff(logp_old, logp_rollout.detach(), m), m).exp()[:, None].expand_as(log_r)
    if icepop_keep is not None:
        weight = icepop_keep.to(logp_new.dtype) * (k_w if icepop_weight == "ratio" else 1.0)
    if wpsm_mask is not None:
        weight = weight * (1 - wpsm_mask.detach().to(logp_new.dtype))[:, None]

    terms = surrogate * weight
    terms = torch.where(m, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    if aggregation == "token_mean":
        objective_value = terms.sum() / mf.sum().clamp_min(1)
    else:
        per_seq = terms.sum(-1) / mf.sum(-1).clamp_min(1)
        has_tokens = m.any(-1)
        objective_value = (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1)
    loss = -objective_value

    with torch.no_grad():
        n_valid = mf.sum().clamp_min(1)
        xd = x.detach()
        clipped = ((adv > 0) & (xd > 1 + eps_high)) | ((adv < 0) & (xd < 1 - clip_eps))
        stats: dict[str, Any] = {
            "clip_frac": (clipped & m).sum() / n_valid,
            "icepop_masked_frac": ((m & ~icepop_keep).sum() / n_valid) if icepop_keep is not None
            else torch.zeros((), device=logp_new.device),
            "ratio_mean": (log_r.detach().exp() * mf).sum() / n_valid,
        }
        if logp_rollout is not None:
            log_k = _masked_diff(logp_old, logp_rollout.detach(), m)
            k = log_k.exp()
            stats["mismatch_k_mean"] = (k * mf).sum() / n_valid
            stats["mismatch_k_max"] = k.masked_fill(~m, float("-inf")).max() if m.any() \
                else torch.zeros((), dtype=k.dtype, device=k.device)
            stats["mismatch_kl"] = (-log_k * mf).sum() / n_valid
            stats["mismatch_kl_k3"] = ((k - 1 - log_k) * mf).sum() / n_valid
    return loss, stats


# ------------------------------------------------------------------------------------------ KL, entropy
def kl_k3(logp_new: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_new || pi_ref): masked token mean of exp(ref - new) - (ref - new) - 1 (>= 0)."""
    _check_same_shape("logp_new", logp_new, logp_ref=logp_ref)
    m = _as_bool_mask(mask, logp_new)
    d = _masked_diff(logp_ref, logp_new, m)
    return masked_token_mean(d.exp() - d - 1, m)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    """Masked mean token entropy of softmax(logits); per_sequence=True gives each sequence's mean [N].

    logits: [N, T, V] (computed in float32 at least).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(lf, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)  # [N, T]
    m = _as_bool_mask(mask, ent)
    ent = torch.where(m, ent, torch.zeros((), dtype=ent.dtype, device=ent.device))
    if per_sequence:
        return _seq_mean(ent, m)
    return masked_token_mean(ent, m)


# ------------------------------------------------------------------------------------------------ WPSM
def wpsm_mask(success_rate: torch.Tensor, response_entropy: torch.Tensor, tau: float = 0.8,
              eta: Optional[float] = None, alpha: float = 1.0) -> torch.Tensor:
    """Well-learned Positive Sample Mask [N]: M_i = alpha if success_rate > tau and entropy_i < eta, else 0.

    success_rate: per-query success rate, [N] (already per response) or [B] (repeated to the G = N / B
        responses of each query, prompt-major). response_entropy: [N] mean token entropy of each response.
    eta: entropy threshold; None uses the 20th percentile of response_entropy. alpha in [0, 1].
    """
    if response_entropy.dim() != 1:
        raise ValueError(f"response_entropy must be [N], got shape {tuple(response_entropy.shape)}")
    N = response_entropy.shape[0]
    if success_rate.dim() != 1 or success_rate.shape[0] == 0 or N % success_rate.shape[0] != 0:
        raise ValueError(f"success_rate must be [N] or [B] with N % B == 0 (N={N}), "
                         f"got shape {tuple(success_rate.shape)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rate = success_rate.repeat_interleave(N // success_rate.shape[0])
    ent = response_entropy.detach().float()
    thr = torch.quantile(ent, 0.2) if eta is None else torch.tensor(eta, dtype=ent.dtype, device=ent.device)
    hit = (rate.to(ent.device) > tau) & (ent < thr)
    return hit.to(ent.dtype) * alpha


# ------------------------------------------------------------------------------------------------ AHRL
def hint_ratio(step, pass_initial, p_initial: float = 0.5, gamma: float = 1.0):
    """AHRL hint fraction p_hint = p_initial * exp(-gamma * step * pass_initial).

    step: training step t >= 0; pass_initial: pass@k of the SFT model on the query, in [0, 1] (float or tensor).
    """
    if not 0 <= p_initial <= 1:
        raise ValueError(f"p_initial must be in [0, 1], got {p_initial}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if isinstance(step, torch.Tensor) or isinstance(pass_initial, torch.Tensor):
        s = torch.as_tensor(step, dtype=torch.float32)
        p = torch.as_tensor(pass_initial, dtype=torch.float32)
        if (s < 0).any():
            raise ValueError("step must be >= 0")
        if ((p < 0) | (p > 1)).any():
            raise ValueError("pass_initial must be in [0, 1]")
        return p_initial * torch.exp(-gamma * s * p)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0 <= pass_initial <= 1:
        raise ValueError(f"pass_initial must be in [0, 1], got {pass_initial}")
    return p_initial * math.exp(-gamma * step * pass_initial)


def hint_gamma(total_steps: int, pass_ref: float = 0.1, halve_fraction: float = 0.2) -> float:
    """gamma such that p_hint halves after halve_fraction * total_steps steps for a query with pass_ref."""
    if total_steps <= 0 or not 0 < pass_ref <= 1 or not 0 < halve_fraction <= 1:
        raise ValueError(f"need total_steps > 0, pass_ref in (0, 1], halve_fraction in (0, 1]; got "
                         f"total_steps={total_steps}, pass_ref={pass_ref}, halve_fraction={halve_fraction}")
    return math.log(2.0) / (halve_fraction * total_steps * pass_ref)


# ------------------------------------------------------------------------------------------------- U-RB
_PENDING = object()


class UnbiasedReplayBuffer:
    """U-RB scheduler: rollouts of the current group and up to `groups_ahead` later groups run in parallel,
    but groups move to the training pool strictly in query (group id) order, each only once all its
    responses have finished (so short, easy trajectories of later groups never jump the queue).

    groups_ahead: how many groups beyond the oldest unreleased one may be in flight (0 = synchronous).
    first_group: id of the first group; group ids must then be submitted consecutively.
    """

    def __init__(self, groups_ahead: int, first_group: int = 0):
        if not isinstance(groups_ahead, int) or groups_ahead < 0:
            raise ValueError(f"groups_ahead must be an int >= 0, got {groups_ahead!r}")
        self.groups_ahead = groups_ahead
        self._next_release = first_group
        self._next_submit = first_group
        self._groups: dict[int, list[Any]] = {}

    @property
    def next_release(self) -> int:
        """Id of the oldest group not yet released (the current group D_t)."""
        return self._next_release

    @property
    def in_flight(self) -> list[int]:
        """Submitted, unreleased group ids, oldest first."""
        return sorted(self._groups)

    def can_submit(self) -> bool:
        """Whether the next group fits in the in-flight window."""
        return self._next_submit <= self._next_release + self.groups_ahead

    def submit(self, group_id: int, num_responses: int) -> None:
        """Start rollouts for `num_responses` responses of group `group_id` (the next id in order)."""
        if group_id != self._next_submit:
            raise ValueError(f"group_id must be submitted in order: expected {self._next_submit}, got {group_id}")
        if not self.can_submit():
            raise ValueError(f"group_id {group_id} is more than groups_ahead={self.groups_ahead} past the "
                             f"current group {self._next_release}")
        if not isinstance(num_responses, int) or num_responses <= 0:
            raise ValueError(f"num_responses must be an int > 0, got {num_responses!r}")
        self._groups[group_id] = [_PENDING] * num_responses
        self._next_submit += 1

    def finish(self, group_id: int, response_id: int, trajectory: Any = None) -> None:
        """Mark response `response_id` of group `group_id` finished, storing its trajectory."""
        slots = self._groups.get(group_id)
        if slots is None:
            raise KeyError(f"group_id {group_id} is not in flight (in flight: {self.in_flight})")
        if not 0 <= response_id < len(slots):
            raise IndexError(f"response_id {response_id} out of range for group {group_id} with {len(slots)} responses")
        if slots[response_id] is not _PENDING:
            raise ValueError(f"response_id {response_id} of group {group_id} already finished")
        slots[response_id] = trajectory

    def is_complete(self, group_id: int) -> bool:
        """Whether every response of an in-flight group has finished."""
        slots = self._groups.get(group_id)
        if slots is None:
            raise KeyError(f"group_id {group_id} is not in flight (in flight: {self.in_flight})")
        return all(s is not _PENDING for s in slots)

    def ready(self) -> list[tuple[int, list[Any]]]:
        """Release complete groups in order from the current one, stopping at the first incomplete group.

        Returns [(group_id, trajectories in response order), ...]; may be empty.
        """
        out = []
        while self._next_release in self._groups and self.is_complete(self._next_release):
            out.append((self._next_release, self._groups.pop(self._next_release)))
            self._next_release += 1
        return out
