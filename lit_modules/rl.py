"""RL post-training of a generative policy on verifiable tasks (`model=rl`): GRPO / GSPO / IcePop variants.

One training step (one batch of `data.prompts_per_step` prompts per rank):

1. refresh the **rollout copy** (an unsharded copy of the policy, optionally in bf16/fp16: the
   training/inference mismatch real systems have, which IcePop masks);
2. sample `rl.group_size` responses per prompt with the KV-cached batched sampler, seeded from
   (seed, batch index, rank), so a resumed run draws the same rollouts; record the rollout's per-token
   log-probs and, for a sparse policy, every token's routed experts;
3. score them (correctness + `rl.format_reward` x format), group-normalised advantages;
4. optionally an old-log-prob pass of the training engine (when `rl.minibatches` > 1, or to record
   routes for R2), then `rl.minibatches` optimiser steps, each on a slice of the rows:
   loss = policy_loss(objective) + kl_coef * k3 KL to the frozen reference - entropy_coef * entropy
   (+ the sparse trunk's balance loss). With routing replay (R3: the rollout's routes; R2: the old
   pass's routes) the training forward uses the recorded top-k experts, gates still from the current
   router scores.

Optional switches: WPSM (drop well-learned positive samples), AHRL (hint prefixes from reference
solutions, decaying with the step and the SFT model's pass@G on the query), U-RB (`rl.urb_groups_ahead`
= a: the group sampled at step t is trained at step t + a, released by `models.rl.UnbiasedReplayBuffer`
strictly in query order; the sampler here finishes a group within its step, so the buffer only ever
waits for query order, and what the lag adds is the off-policy staleness of asynchronous rollouts).

Optimisation is manual: each of the `rl.minibatches` updates of a step is one optimiser step
(`trainer.max_steps` counts them; the LR schedule steps with them). `last_rollout` keeps the trained group
(prompts, responses, log-probs, scores). The policy runs without dropout
(`model.net.dropout` is forced to 0: a ratio of 1 must mean the same policy). What the step measured
is left in `last_rl` for `callbacks.rl_monitor.RLMonitor`; the module itself logs `train/loss`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_modules.base import step_seed
from lit_modules.sft import EvalConfig, TaskEvalMixin, resolve_net, score_response
from lit_modules.lm import LanguageModelModule
from models.config import config_from_dict
from models.layers.elastic import RoutingLimit
from models.moe.replay import RouteReplay, route_disagreement
from models.rl import (AGGREGATIONS, OBJECTIVES, UnbiasedReplayBuffer, entropy_from_logits, group_advantages,
                       hint_gamma, hint_ratio, kl_k3, policy_loss, wpsm_mask)
from models.rollout import response_logprobs, sample_responses

__all__ = ["RLConfig", "RLModule", "build_rl_batch", "hint_text"]

REPLAY = ("off", "R2", "R3")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RLConfig:
    """RL knobs (`model.rl.*`). Values papers.md leaves open carry its proposed defaults.

    group_size: G responses per prompt. max_new_tokens / temperature / top_k: rollout sampling
        (log-probs are of softmax(logits / temperature) in rollout and training alike).
    objective: grpo | gspo | grpo_icepop | gspo_icepop | mixed_icepop (`models.rl.policy_loss`).
    aggregation: token_mean (sum over the batch's response tokens / their count) | seq_mean_token_mean
        (mean over responses of each response's token mean).
    clip_eps / clip_eps_high: ratio clip range [1 - eps, 1 + eps_high] (eps_high null = eps).
    icepop_alpha / icepop_beta: the IcePop mismatch band [alpha, beta]; icepop_weight: mask | ratio.
    kl_coef: weight of the k3 KL to the frozen reference (the initial policy); 0 = no reference model.
    entropy_coef: entropy bonus. format_reward: weight of the format reward added to correctness.
    minibatches: optimiser steps per rollout batch (> 1 needs the old-log-prob pass).
    rollout_dtype: fp32 | bf16 | fp16, the rollout copy's precision.
    routing_replay: off | R2 | R3 (sparse policies only).
    wpsm / wpsm_tau / wpsm_eta / wpsm_alpha: Well-learned Positive Sample Mask (eta null: the batch's
        20th percentile of response entropy).
    hints / hint_p_initial / hint_gamma: AHRL (gamma null: p_hint halves over 20% of the run at pass 0.1).
    urb_groups_ahead: U-RB lag (0 = synchronous).
    """

    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: Optional[int] = None
    objective: str = "mixed_icepop"
    aggregation: str = "token_mean"
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    icepop_alpha: float = 0.5
    icepop_beta: float = 2.0
    icepop_weight: str = "mask"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    format_reward: float = 0.1
    minibatches: int = 1
    rollout_dtype: str = "fp32"
    routing_replay: str = "off"
    wpsm: bool = False
    wpsm_tau: float = 0.8
    wpsm_eta: Optional[float] = None
    wpsm_alpha: float = 1.0
    hints: bool = False
    hint_p_initial: float = 0.5
    hint_gamma: Optional[float] = None
    urb_groups_ahead: int = 0

    def __post_init__(self) -> None:
        def bad(key, why):
            raise ValueError(f"model.rl.{key}={getattr(self, key)!r}: {why}")

        if self.group_size < 2:
            bad("group_size", "must be >= 2 (advantages are relative to the group)")
        if self.max_new_tokens < 1:
            bad("max_new_tokens", "must be >= 1")
        if not self.temperature > 0:
            bad("temperature", "must be > 0 (the policy's log-probs are of logits / temperature)")
        if self.objective not in OBJECTIVES:
            bad("objective", f"is not one of {list(OBJECTIVES)}")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"is not one of {list(AGGREGATIONS)}")
        if self.icepop_weight not in ("mask", "ratio"):
            bad("icepop_weight", "is not one of ['mask', 'ratio']")
        if not 0 < self.icepop_alpha <= self.icepop_beta:
            bad("icepop_alpha", f"need 0 < icepop_alpha <= icepop_beta={self.icepop_beta}")
        for key in ("kl_coef", "entropy_coef", "format_reward"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.minibatches < 1:
            bad("minibatches", "must be >= 1")
        if self.rollout_dtype not in DTYPES:
            bad("rollout_dtype", f"is not one of {list(DTYPES)}")
        if self.routing_replay not in REPLAY:
            bad("routing_replay", f"is not one of {list(REPLAY)}")
        if not 0 <= self.wpsm_alpha <= 1:
            bad("wpsm_alpha", "must be in [0, 1]")
        if not 0 <= self.hint_p_initial <= 1:
            bad("hint_p_initial", "must be in [0, 1]")
        if self.urb_groups_ahead < 0:
            bad("urb_groups_ahead", "must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "RLConfig":
        return config_from_dict(cls, d, "model.rl")


def hint_text(solution: Optional[str], fraction: float) -> str:
    """The first `fraction` of a reference solution, cut back to a word boundary ('' when nothing fits)."""
    if not solution or fraction <= 0:
        return ""
    n = int(round(fraction * len(solution)))
    if n >= len(solution):
        return solution
    cut = solution[:n]
    return cut[:cut.rfind(" ")].rstrip() if " " in cut else ""


def build_rl_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                   rollout_logp: Optional[list[torch.Tensor]] = None,
                   routes: Optional[list[dict[int, torch.Tensor]]] = None) -> dict[str, Any]:
    """Right-padded training tensors for N = len(prompts) rows of prompt + response.

    tokens [N, T]: prompt + response[:-1] (the inputs), targets [N, T]: the next tokens; mask [N, T]: the
    positions that predict a response token (P - 1 .. P + R - 2); logp_rollout [N, T] placed at those
    positions (0 elsewhere); routes {layer: [N, T, k]} padded with each row's last recorded route.
    """
    rows = [p + r for p, r in zip(prompts, responses)]
    T = max(len(s) - 1 for s in rows)
    N = len(rows)
    tokens = torch.full((N, T), pad_id, dtype=torch.long)
    targets = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros((N, T), dtype=torch.bool)
    lp = torch.zeros((N, T), dtype=torch.float32)
    for i, (p, r, s) in enumerate(zip(prompts, responses, rows)):
        n = len(s) - 1
        tokens[i, :n] = torch.tensor(s[:-1])
        targets[i, :n] = torch.tensor(s[1:])
        mask[i, len(p) - 1:n] = True
        if rollout_logp is not None:
            lp[i, len(p) - 1:n] = rollout_logp[i]
    out = {"tokens": tokens, "targets": targets, "mask": mask, "logp_rollout": lp if rollout_logp is not None else None}
    if routes is not None:
        padded: dict[int, torch.Tensor] = {}
        for layer in routes[0]:
            k = routes[0][layer].shape[-1]
            t = torch.zeros((N, T, k), dtype=torch.long)
            for i, r in enumerate(routes):
                rr = r[layer]
                t[i, :rr.shape[0]] = rr
                t[i, rr.shape[0]:] = rr[-1]
            padded[layer] = t
        out["routes"] = padded
    return out


def _full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state with DTensor shards gathered (a collective under FSDP2: every rank calls it)."""
    out = {}
    for key, value in module.state_dict().items():
        out[key] = value.full_tensor() if hasattr(value, "full_tensor") else value
    return out


class RLModule(TaskEvalMixin, LanguageModelModule):
    """The RL recipe above on a `models.transformer.Transformer` policy (dense, MoE or MoUE trunk).

    net: overrides of the init checkpoint's `model.net` (the architecture itself without one).
    rl: RLConfig fields. evaluate: EvalConfig fields (held-out accuracy at each validation, greedy, with
    the policy itself). init_ckpt: the starting policy (an SFT checkpoint).
    Attributes for callbacks: `last_rl` (the last step's measurements, documented in
    callbacks/rl_monitor.py) and `rl_cfg`.
    """

    def __init__(
        self,
        net: Optional[dict] = None,
        optim: Optional[dict] = None,
        rl: Optional[dict] = None,
        evaluate: Optional[dict] = None,
        nonfinite: str = "error",
        fsdp: Optional[dict] = None,
        seed: int = 0,
        init_ckpt: Optional[str] = None,
        compile: bool = False,
        compile_backend: str = "inductor",
    ):
        resolved = {**resolve_net(net, init_ckpt), "dropout": 0.0}
        super().__init__(resolved, optim, nonfinite, fsdp, {"max_new_tokens": 0}, seed, init_ckpt, compile,
                         compile_backend)
        self.hparams["net"] = resolved
        self.rl_cfg = RLConfig.from_dict(dict(rl or {}))
        self.eval_cfg = EvalConfig.from_dict(dict(evaluate or {}))
        self.automatic_optimization = False
        self.last_rl: Optional[dict] = None
        self.last_rollout: Optional[dict] = None  # the group the last step trained on (None: U-RB filling)
        self._urb_next_id = 0
        self._urb_pool: list[int] = []  # released group ids waiting for their training step, in order
        self.last_eval: Optional[dict] = None
        self.pass_initial: Optional[torch.Tensor] = None  # AHRL: pass@G of the starting policy per train task
        self.urb: Optional[UnbiasedReplayBuffer] = None
        self._urb_pending: dict[int, dict] = {}
        self._nets: dict[str, torch.nn.Module] = {}  # rollout copy / reference: not submodules (not trained, not saved)

    # ----------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.rl_cfg.routing_replay != "off" and not self.sparse:
            raise ValueError(f"model.rl.routing_replay={self.rl_cfg.routing_replay} needs a sparse policy "
                             "(model.net.ffn=moe|moue); this one is dense")

    def _build_side_nets(self) -> None:
        """The rollout copy (refreshed every step) and, with kl_coef > 0, the frozen reference: the policy
        as it starts this fit (the init checkpoint's weights, also after a resume)."""
        if "rollout" in self._nets:
            return
        from models.transformer import Transformer

        dtype = DTYPES[self.rl_cfg.rollout_dtype]
        rollout = Transformer(copy.deepcopy(self.net_cfg)).to(self.device, dtype).eval().requires_grad_(False)
        self._nets["rollout"] = rollout
        if self.rl_cfg.kl_coef > 0:
            ref = Transformer(copy.deepcopy(self.net_cfg)).to(self.device).eval().requires_grad_(False)
            if self.init_ckpt:
                state, _ = self.init_state(self.init_ckpt)
                ref.load_state_dict(state, strict=False)
            else:
                ref.load_state_dict(_full_state(self.model))
            self._nets["reference"] = ref

    @torch.no_grad()
    def refresh_rollout(self) -> torch.nn.Module:
        """Copy the policy's current weights into the rollout copy (cast to its dtype) and return it."""
        self._build_side_nets()
        rollout = self._nets["rollout"]
        rollout.load_state_dict(_full_state(self.model))
        if self.moue_window is not None:
            rollout.trunk.set_moue_window(self.moue_window)
        return rollout

    @property
    def rollout_net(self) -> Optional[torch.nn.Module]:
        return self._nets.get("rollout")

    # ----------------------------------------------------------------------------- one step
    def _generator(self) -> torch.Generator:
        seed = step_seed(self.seed, self.trainer.fit_loop.total_batch_idx, self.global_rank)
        return torch.Generator().manual_seed(seed)

    def _hints(self, index: list[int], tasks) -> list[str]:
        cfg = self.rl_cfg
        if not cfg.hints or self.pass_initial is None:
            return [""] * len(tasks)
        gamma = cfg.hint_gamma if cfg.hint_gamma is not None else hint_gamma(max(1, self.planned_steps))
        out = []
        for i, task in zip(index, tasks):
            p = hint_ratio(self.global_step, float(self.pass_initial[i]), cfg.hint_p_initial, gamma)
            out.append(hint_text(task.solution, p))
        return out

    def _rollout(self, index: list[int]) -> dict:
        """Sample and score G responses for each prompt of `index` (train task ids) with the rollout copy."""
        cfg, dm = self.rl_cfg, self.trainer.datamodule
        tasks = [dm.train_tasks[i] for i in index]
        hints = self._hints(index, tasks)
        G = cfg.group_size
        prompts = [dm.prompt_ids(t, h) for t, h in zip(tasks, hints) for _ in range(G)]
        net = self.refresh_rollout()
        t0 = time.perf_counter()
        ro = sample_responses(net, prompts, cfg.max_new_tokens, dm.stop_ids, cfg.temperature, cfg.top_k,
                              self._generator(), record_routes=self.sparse)
        rollout_s = time.perf_counter() - t0
        scores = [score_response(dm.tokenizer, tasks[n // G], resp) for n, resp in enumerate(ro.responses)]
        return {"index": list(index), "prompts": ro.prompts, "responses": ro.responses, "logp": ro.logp,
                "finished": ro.finished, "routes": ro.routes, "scores": scores, "hints": hints,
                "rollout_s": rollout_s, "generated": ro.generated_tokens}

    def _next_group(self, index: list[int]) -> Optional[dict]:
        """Synchronous: this step's rollouts. U-RB (lag a): submit this step's group to the buffer, move the
        groups it releases (complete, in query order) to the training pool, and train the group sampled
        a steps ago, which must be the pool's head; None while the pipeline fills."""
        a = self.rl_cfg.urb_groups_ahead
        if a == 0:
            return self._rollout(index)
        if self.urb is None:
            self.urb = UnbiasedReplayBuffer(groups_ahead=a, first_group=self._urb_next_id)
        gid = self._urb_next_id
        group = self._rollout(index)
        self.urb.submit(gid, 1)
        self.urb.finish(gid, 0, None)  # this sampler finishes a group within its step
        self._urb_pending[gid] = group
        self._urb_pool.extend(g for g, _ in self.urb.ready())
        self._urb_next_id += 1
        train_id = gid - a
        if train_id < 0:
            return None
        if not self._urb_pool or self._urb_pool[0] != train_id:
            raise RuntimeError(f"U-RB: group {train_id} is not at the head of the training pool {self._urb_pool}")
        self._urb_pool.pop(0)
        return self._urb_pending.pop(train_id)

    def training_step(self, batch, batch_idx: int):
        cfg = self.rl_cfg
        t_start = time.perf_counter()
        group = self._next_group(batch.index.tolist())
        self.last_rollout = group
        if group is None:
            self.last_rl = None
            return None
        dm = self.trainer.datamodule
        G = cfg.group_size
        rewards = torch.tensor([s["reward"] + cfg.format_reward * s["format"] for s in group["scores"]])
        correct = torch.tensor([float(s["correct"]) for s in group["scores"]])
        adv = group_advantages(rewards.view(-1, G)).reshape(-1)
        data = build_rl_batch(group["prompts"], group["responses"], dm.tokenizer.pad_id, group["logp"],
                              group["routes"] if self.sparse else None)
        dev = self.device
        tokens, targets, mask = data["tokens"].to(dev), data["targets"].to(dev), data["mask"].to(dev)
        logp_rollout = data["logp_rollout"].to(dev)
        adv = adv.to(dev)
        N = tokens.shape[0]
        self.model.eval()  # no dropout anywhere in RL (it is 0 anyway); the gradient still flows

        # -- old log-probs of the training engine (and R2's routes)
        replay_routes = None
        if cfg.routing_replay == "R3":
            replay_routes = data["routes"]
        logp_old = None
        if cfg.minibatches > 1 or cfg.routing_replay == "R2":
            rec = RouteReplay("record") if cfg.routing_replay == "R2" else None
            with torch.no_grad():
                logits = self.model(tokens, routing=RoutingLimit(replay=rec)) if rec else self.model(tokens)
                logp_old = response_logprobs(logits, targets, cfg.temperature)
            del logits
            if rec is not None:
                replay_routes = rec.stacked(N)

        opt = self.optimizers()
        sched = self.lr_schedulers()
        chunks = torch.arange(N).chunk(cfg.minibatches)
        acc: dict[str, list] = {}
        disagreement: list[torch.Tensor] = []
        losses = []
        success = correct.view(-1, G).mean(1)  # WPSM's per-query success rate (this step's group)
        t_update = time.perf_counter()
        for rows in chunks:
            rows_d = rows.to(dev)
            x, y, m = tokens[rows_d], targets[rows_d], mask[rows_d]
            replay = None
            if replay_routes is not None:
                replay = RouteReplay("replay", {l: r[rows].to(dev) for l, r in replay_routes.items()})
            elif self.sparse:
                replay = RouteReplay("record")  # only to measure rollout/training router disagreement
            if self.sparse:
                logits, balance, infos = self.model(x, return_routing=True, routing=RoutingLimit(replay=replay))
            else:
                logits, balance, infos = self.model(x), None, []
            logp_new = response_logprobs(logits, y, cfg.temperature)
            old = logp_old[rows_d] if logp_old is not None else logp_new.detach()
            ent_seq = entropy_from_logits(logits.detach(), m, per_sequence=True)
            wpsm = None
            if cfg.wpsm:
                wpsm = wpsm_mask(success.repeat_interleave(G)[rows].to(dev), ent_seq, cfg.wpsm_tau, cfg.wpsm_eta,
                                 cfg.wpsm_alpha)
            pg, stats = policy_loss(logp_new, old, logp_rollout[rows_d], adv[rows_d], m, cfg.objective,
                                    clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                    icepop=(cfg.icepop_alpha, cfg.icepop_beta), aggregation=cfg.aggregation,
                                    wpsm_mask=wpsm, icepop_weight=cfg.icepop_weight)
            loss = pg
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * entropy_from_logits(logits, m)
            if cfg.kl_coef:
                with torch.no_grad():
                    logp_ref = response_logprobs(self._nets["reference"](x), y, cfg.temperature)
                kl = kl_k3(logp_new, logp_ref, m)
                loss = loss + cfg.kl_coef * kl
                stats["kl_ref"] = kl.detach()
            if self.sparse:
                loss = loss + balance
                self.record_routing(infos)
                stats["balance_loss"] = balance.detach()
                disagreement.append(self._disagreement(replay, data["routes"], rows, m))
            stats["entropy"] = (ent_seq * m.any(-1)).sum() / m.any(-1).sum().clamp_min(1)
            if wpsm is not None:
                stats["wpsm_frac"] = (wpsm > 0).float().mean()
            self._check_finite(loss, batch_idx)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(loss.detach())
            for k, v in stats.items():
                acc.setdefault(k, []).append(v.detach().float())
        update_s = time.perf_counter() - t_update
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False)
        stats = {k: (torch.stack(v).max() if k.endswith("_max") else torch.stack(v).mean()).item()
                 for k, v in acc.items()}
        lengths = torch.tensor([len(r) for r in group["responses"]], dtype=torch.float32)
        self.last_rl = {
            "loss": loss.item(),
            "reward": rewards.mean().item(),
            "acc": correct.mean().item(),
            "format": sum(s["format"] for s in group["scores"]) / len(group["scores"]),
            "acc_per_task": _per_task(group["scores"]),
            "response_len": lengths.mean().item(),
            "finished_frac": sum(group["finished"]) / len(group["finished"]),
            "hint_frac": sum(bool(h) for h in group["hints"]) / max(1, len(group["hints"])),
            "all_same_reward_frac": (rewards.view(-1, G).std(1, correction=0) == 0).float().mean().item(),
            **stats,
            "router_disagreement": torch.stack(disagreement).mean(0).tolist() if disagreement else None,
            "expert_load": None if self.last_routing is None else self.last_routing["counts"].cpu(),
            "rollout_s": group["rollout_s"],
            "update_s": update_s,
            "step_s": time.perf_counter() - t_start,
            "rollout_tokens": group["generated"],
        }
        return loss

    def _disagreement(self, replay: RouteReplay, rollout_routes: dict, rows, m) -> torch.Tensor:
        """Per layer: fraction of response-predicting tokens whose expert set differs between the rollout's
        routing and the training forward's own router choice (replayed or not)."""
        own = replay.natural if replay.mode == "replay" else {l: c[-1] for l, c in replay.recorded.items()}
        ref = rollout_routes  # padded [N, T, k] per layer (build_rl_batch)
        out = []
        for layer in sorted(own):
            a = own[layer].reshape(m.shape[0], m.shape[1], -1)
            b = ref[layer][rows].to(a.device)
            out.append(route_disagreement(a, b, m))
        return torch.stack(out)

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        if self.nonfinite == "off":
            return
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        if bad:
            raise FloatingPointError(f"non-finite RL loss ({loss.item()}) at global step {self.global_step} "
                                     f"(batch {batch_idx})")

    # ----------------------------------------------------------------------------- evaluation
    def on_train_start(self) -> None:
        if self.rl_cfg.hints and self.pass_initial is None:
            self.pass_initial = self._pass_at_g()
            rank_zero_info(f"AHRL: pass@{self.rl_cfg.group_size} of the starting policy on "
                           f"{len(self.pass_initial)} training tasks = {self.pass_initial.mean():.3f}")

    @torch.no_grad()
    def _pass_at_g(self) -> torch.Tensor:
        """pass@G (any of G samples correct) of the current policy on every training task."""
        cfg, dm = self.rl_cfg, self.trainer.datamodule
        net = self.refresh_rollout()
        G = cfg.group_size
        prompts = [dm.prompt_ids(t) for t in dm.train_tasks for _ in range(G)]
        # the same draws on every rank (each computes every task): ranks agree, and a resume restores it
        gen = torch.Generator().manual_seed(step_seed(self.seed, -1, 0))
        ro = sample_responses(net, prompts, cfg.max_new_tokens, dm.stop_ids, cfg.temperature, cfg.top_k, gen,
                              max_batch=self.eval_cfg.batch)
        ok = torch.tensor([score_response(dm.tokenizer, dm.train_tasks[n // G], r)["correct"]
                           for n, r in enumerate(ro.responses)], dtype=torch.float32)
        return ok.view(-1, G).amax(1)

    # Held-out accuracy (TaskEvalMixin) is measured on the policy itself (float32, greedy; under FSDP2 every
    # rank decodes the same prompts in step), not on the rollout copy: a bf16 copy would add its own rounding.

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.pass_initial is not None:
            checkpoint["rl_pass_initial"] = self.pass_initial.clone()
        if self.urb is not None:
            # every rank samples its own prompts: keep each rank's queued groups (the hook runs on every rank)
            pending = {int(k): _plain_group(v) for k, v in self._urb_pending.items()}
            by_rank = [pending]
            if self.trainer.world_size > 1 and torch.distributed.is_initialized():
                by_rank = [None] * self.trainer.world_size
                torch.distributed.all_gather_object(by_rank, pending)
            checkpoint["rl_urb"] = {"next_id": self._urb_next_id, "pool": list(self._urb_pool),
                                    "pending_by_rank": by_rank}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "rl_pass_initial" in checkpoint:
            self.pass_initial = checkpoint["rl_pass_initial"].clone()
        if "rl_urb" in checkpoint:
            state = checkpoint["rl_urb"]
            self._urb_next_id = int(state["next_id"])
            self._urb_pool = [int(g) for g in state["pool"]]
            by_rank = state["pending_by_rank"]
            world = self.trainer.world_size if self._trainer is not None else 1
            if len(by_rank) != world:
                raise ValueError(f"this checkpoint's U-RB queue holds the rollouts of {len(by_rank)} rank(s); resume "
                                 f"it with the same number of processes (now {world}) or model.rl.urb_groups_ahead=0")
            rank = self.global_rank if self._trainer is not None else 0
            self._urb_pending = {int(k): v for k, v in by_rank[rank].items()}
            # every submitted group was complete and released when saved: the buffer resumes at the next id
            self.urb = UnbiasedReplayBuffer(self.rl_cfg.urb_groups_ahead, first_group=self._urb_next_id)


def _per_task(scores: list[dict]) -> dict[str, float]:
    out = {}
    for name in sorted({s["task"] for s in scores}):
        rows = [s for s in scores if s["task"] == name]
        out[name] = sum(s["correct"] for s in rows) / len(rows)
    return out


def _plain_group(group: dict) -> dict:
    """A rollout group in types a weights-only checkpoint load accepts."""
    keep = ("index", "prompts", "responses", "logp", "finished", "routes", "scores", "hints", "rollout_s",
            "generated")
    return {k: group[k] for k in keep}
