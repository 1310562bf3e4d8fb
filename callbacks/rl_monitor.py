"""RL stability monitors: reward and accuracy per task, response length, entropy, clipping, IcePop masking,
the training/rollout mismatch, router disagreement and expert load.

Reads the module's `last_rl` (lit_modules/rl.py), a dict the RL step leaves behind:
    reward, acc, format        mean total reward, correctness, format reward of the step's responses
    acc_per_task               {task name: accuracy}
    response_len, finished_frac  mean response tokens; share that emitted the end marker
    entropy                    mean per-response token entropy of the policy (training forward)
    clip_frac, icepop_masked_frac, ratio_mean   from `models.rl.policy_loss`
    mismatch_k_mean, mismatch_k_max, mismatch_kl, mismatch_kl_k3
                               k = pi_train(old) / pi_rollout per response token, and KL estimates
    kl_ref, wpsm_frac, hint_frac, all_same_reward_frac (groups with zero advantage)
    router_disagreement        sparse policies: [L] share of tokens whose expert set differs between the
                               rollout and the training forward's router (with replay: what it would pick)
    expert_load                [L, E] routed pairs of the last update
    rollout_s, update_s, step_s, rollout_tokens

Logged under rl/* on every `every_n_steps`-th step. A collapse warning is raised (once, and counted in
rl/entropy_collapsed) when the entropy falls below `entropy_floor`.
"""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

SCALARS = ("reward", "acc", "format", "response_len", "finished_frac", "entropy", "clip_frac",
           "icepop_masked_frac", "ratio_mean", "mismatch_k_mean", "mismatch_k_max", "mismatch_kl",
           "mismatch_kl_k3", "kl_ref", "wpsm_frac", "hint_frac", "all_same_reward_frac", "balance_loss")


class RLMonitor(L.Callback):
    def __init__(self, every_n_steps: int = 1, entropy_floor: Optional[float] = 0.05):
        if every_n_steps < 1:
            raise ValueError(f"callbacks.rl_monitor.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.entropy_floor = every_n_steps, entropy_floor
        self.collapsed = False
        self.history: list[dict] = []  # the logged metrics of each step (for tools and tests)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        info = getattr(pl_module, "last_rl", None)
        if info is None or batch_idx % self.every_n_steps:
            return
        metrics = {f"rl/{k}": float(info[k]) for k in SCALARS if info.get(k) is not None}
        for name, value in (info.get("acc_per_task") or {}).items():
            metrics[f"rl/acc/{name}"] = float(value)
        if info.get("router_disagreement") is not None:
            vals = info["router_disagreement"]
            for layer, v in enumerate(vals):
                metrics[f"rl/router_disagreement/layer_{layer}"] = float(v)
            metrics["rl/router_disagreement/mean"] = sum(vals) / len(vals)
        load = info.get("expert_load")
        if load is not None:
            share = load.float() / load.float().sum(1, keepdim=True).clamp_min(1)
            E = share.shape[1]
            ent = -(share * share.clamp_min(1e-12).log()).sum(1) / math.log(E)
            metrics["rl/expert_load/norm_entropy_mean"] = float(ent.mean())
            metrics["rl/expert_load/max_share"] = float(share.max())
        step_s = info.get("step_s") or 0.0
        if step_s > 0:
            metrics["rl/rollout_share"] = info["rollout_s"] / step_s
            metrics["rl/rollout_tokens_per_s"] = info["rollout_tokens"] / max(info["rollout_s"], 1e-9)
        if self.entropy_floor is not None and info.get("entropy") is not None and info["entropy"] < self.entropy_floor:
            if not self.collapsed:
                rank_zero_warn(f"RL policy entropy {info['entropy']:.4f} fell below "
                               f"callbacks.rl_monitor.entropy_floor={self.entropy_floor} at step "
                               f"{trainer.global_step}: entropy collapse")
            self.collapsed = True
        metrics["rl/entropy_collapsed"] = float(self.collapsed)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self.history.append({"step": trainer.global_step, **metrics})
