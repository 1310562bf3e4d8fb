"""RL post-training of ERNIE 5.0 on a verifiable multimodal task: captioning (`experiment=ernie5_rl_caption`).

The policy starts from an ERNIE 5.0 checkpoint (`model.init_ckpt`; its `model.net` is used, so none
is given here). One training step takes `data.batch_size` captioning prompts (image, video and sound
items of the train split, `data.mode=captions`) and:

1. samples `rl.group_size` captions per item with the KV-cached sampler, seeded from
   (seed, batch index, rank), so a resumed run draws the same rollouts; each token's rollout
   log-prob under softmax(logits / temperature) is recorded;
2. scores every caption with the verifier `datamodules.captions.caption_reward` (the fraction of the
   true caption's fields the caption states correctly: the main object's shape, colour and direction
   and the background, or the sound's kind and duration); advantages are group-normalised
   (`models.rl.group_advantages`);
3. takes one optimiser step on the teacher-forced log-probs of the sampled captions (one document
   `<boX> item <eoX> <sep> caption` per row, the same network pass as pre-training):
   `models.rl.policy_loss` (grpo | gspo | grpo_icepop | gspo_icepop | mixed_icepop; one update per
   rollout batch, so the ratio to the old policy is 1 and IcePop's k measures the rollout /
   training mismatch) + `rl.kl_coef` x the k3 KL to the frozen initial policy + the trunk's balance loss.

Logged: train/reward (and per medium), train/loss, train/kl, train/response_len, train/clip_frac,
train/mismatch_k_mean. Validation captions the first `data.val_prompts` held-out items of each
medium greedily: val/reward and val/reward_{image,video,audio} (mean field accuracy; the same
verifier as tools/eval_ernie5.py's caption accuracy), and val/loss, the per-token NLL of their
true captions (what RL costs the likelihood of the reference captions).

Checkpoints are ordinary ERNIE 5.0 checkpoints (the RL knobs are kept under `rl`, outside the
hyper-parameters), so generate.py, tools/eval_ernie5.py and tools/export_submodel.py read them.
Single process or DDP; FSDP2 sharding of the policy is not supported here (the rollout runs the
sharded network token by token).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from datamodules.captions import caption_reward
from lit_modules.base import step_seed
from lit_modules.ernie5 import Ernie5Module
from models.io import load_checkpoint
from models.rl import AGGREGATIONS, OBJECTIVES, group_advantages, kl_k3, policy_loss

__all__ = ["Ernie5RLConfig", "Ernie5RLModule", "MEDIA"]

MEDIA = ("image", "video", "audio")


@dataclass
class Ernie5RLConfig:
    """`model.rl.*`: group_size G captions per item; max_new_tokens / temperature / top_k of the rollout;
    objective / aggregation / clip_eps(_high) / icepop_alpha, icepop_beta as in `models.rl.policy_loss`;
    kl_coef: weight of the k3 KL to the frozen initial policy (0 = no reference copy)."""

    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: Optional[int] = None
    objective: str = "grpo"
    aggregation: str = "token_mean"
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    icepop_alpha: float = 0.5
    icepop_beta: float = 2.0
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        checks = [("group_size", self.group_size >= 2, "must be >= 2 (advantages are normalised within a group)"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("temperature", self.temperature > 0, "must be > 0 (rollouts sample)"),
                  ("top_k", self.top_k is None or self.top_k >= 1, "must be >= 1 or null"),
                  ("objective", self.objective in OBJECTIVES, f"must be one of {list(OBJECTIVES)}"),
                  ("aggregation", self.aggregation in AGGREGATIONS, f"must be one of {list(AGGREGATIONS)}"),
                  ("clip_eps", self.clip_eps > 0, "must be > 0"),
                  ("icepop_alpha", 0 <= self.icepop_alpha < 1 < self.icepop_beta, "/ icepop_beta: need alpha < 1 < beta"),
                  ("kl_coef", self.kl_coef >= 0, "must be >= 0")]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"model.rl.{key} {why}, got {getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Ernie5RLConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"model.rl has unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


class Ernie5RLModule(Ernie5Module):
    """ERNIE 5.0 policy trained by RL on captioning (see the module docstring)."""

    def __init__(self, init_ckpt: Optional[str] = None, rl: Optional[dict] = None, net: Optional[dict] = None,
                 **kwargs) -> None:
        if not init_ckpt:
            raise ValueError("model.init_ckpt must name the ERNIE 5.0 checkpoint RL starts from "
                             "(experiment=ernie5_rl_caption builds one with `requires`)")
        src = load_checkpoint(init_ckpt, what="model.init_ckpt checkpoint")
        hp = src.get("hyper_parameters") or {}
        if "tokenizers" not in src or "net" not in hp:
            raise ValueError(f"model.init_ckpt={init_ckpt} is not an ERNIE 5.0 checkpoint (no tokenizers / net)")
        # the policy is the checkpoint's network: its architecture, whatever model.net says
        super().__init__(net=dict(hp["net"]), init_ckpt=init_ckpt, **kwargs)
        self.rl = Ernie5RLConfig.from_dict(rl)
        self.hparams["net"] = dict(hp["net"])  # what builds this network (save_hyperparameters saw model.net)
        self.hparams["rl"] = asdict(self.rl)
        self._ref = None  # frozen initial policy (kl_coef > 0), kept out of the module tree
        self.last_rollout: Optional[dict] = None  # the last step's {'media', 'responses', 'rewards'}
        from torchmetrics import MeanMetric

        self.reward_means = torch.nn.ModuleDict({k: MeanMetric() for k in ("all", "loss") + MEDIA})

    # ------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.net is not None:
            return
        super().configure_model()
        if self.rl.kl_coef > 0:
            ref = copy.deepcopy(self.net).eval().requires_grad_(False)
            object.__setattr__(self, "_ref", ref)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._ref is not None:
            self._ref.to(self.device)

    # ------------------------------------------------------------------------------- rollouts
    def _item(self, split: str, prompt: dict) -> tuple[str, tuple, str]:
        """(medium, (latents or codes, pixels or None), its first caption)."""
        from datamodules.multimodal import item_pixels

        data = self._datamodule().corpus.splits[split]
        m, j = prompt["medium"], int(prompt["index"])
        return m, (data[m][j], item_pixels(data, m, j)), data[f"{m}_captions"][j][0]

    def rollout(self, prompts: list[dict], generator: torch.Generator) -> dict:
        """G sampled captions per prompt: {'media', 'items', 'responses' [ids], 'logp' [[n]], 'rewards' [N]}."""
        v, rl = self.vocab, self.rl
        media, items, responses, logps, rewards = [], [], [], [], []
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                for prompt in prompts:
                    m, item, truth = self._item("train", prompt)
                    pieces = self.caption_prompt(m, *item)  # built (and moved to the device) once per item
                    for _ in range(rl.group_size):
                        ids, lp = self.net.generate_text(pieces, rl.max_new_tokens, [v.eos],
                                                         rl.temperature, rl.top_k, None, generator, return_logprobs=True)
                        media.append(m)
                        items.append(item)
                        responses.append(ids)
                        logps.append(lp)
                        rewards.append(caption_reward(m, v.decode(ids), truth))
        finally:
            self.net.train(was_training)
        return {"media": media, "items": items, "responses": responses, "logp": logps,
                "rewards": torch.tensor(rewards, dtype=torch.float32, device=self.device)}

    def response_logprobs(self, net, media: list[str], items: list, responses: list[list[int]],
                          temperature: Optional[float] = None) -> tuple:
        """Teacher-forced log-probs of each response under softmax(logits / temperature) (default the
        rollout's): ([N, T] padded, mask [N, T], the balance loss, routing statistics)."""
        from datamodules.multimodal import caption_document, collate_rows, pack_documents

        v, scales = self.vocab, net.scales
        docs = [caption_document(v, scales, m, x.cpu(), r, None if px is None else px.cpu())
                for m, (x, px), r in zip(media, items, responses)]
        S = max(len(d["ids"]) for d, _ in docs)
        rows = []
        for (doc, media_), r in zip(docs, responses):
            row = pack_documents([(doc, media_, 0)], S)
            n = len(doc["ids"])
            # only the response is scored: the target of <sep> (the first caption token) onwards
            row["text_targets"].fill_(-100)
            row["text_targets"][n - len(r) - 1:n - 1] = torch.as_tensor(r, dtype=torch.long)
            row["mtp_targets"].fill_(-100)
            rows.append(row)
        batch = collate_rows(rows).to(self.device)
        out = net(batch, [], mtp=False)
        lp = F.log_softmax(out.text_logits.float() / (temperature or self.rl.temperature), -1)
        lp = lp.gather(-1, out.text_targets[:, None]).squeeze(-1)
        per = list(lp.split([len(r) for r in responses]))
        logp = pad_sequence(per, batch_first=True)
        mask = pad_sequence([torch.ones(len(r), dtype=torch.bool, device=lp.device) for r in responses], batch_first=True)
        return logp, mask, out.balance_loss, out.routing

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        rl = self.rl
        gen = torch.Generator(device=self.device).manual_seed(
            step_seed(self.seed, self.trainer.fit_loop.total_batch_idx, self.global_rank) % (2 ** 63))
        ro = self.rollout(batch, gen)
        adv = group_advantages(ro["rewards"].view(-1, rl.group_size)).reshape(-1)
        logp, mask, balance, routing = self.response_logprobs(self.net, ro["media"], ro["items"], ro["responses"])
        rollout_lp = pad_sequence([x.to(logp) for x in ro["logp"]], batch_first=True)
        loss, stats = policy_loss(logp, logp.detach(), rollout_lp, adv, mask, rl.objective, clip_eps=rl.clip_eps,
                                  clip_eps_high=rl.clip_eps_high, icepop=(rl.icepop_alpha, rl.icepop_beta),
                                  aggregation=rl.aggregation)
        logs = {"train/policy_loss": loss.detach()}
        if self._ref is not None:
            with torch.no_grad():
                ref_lp = self.response_logprobs(self._ref, ro["media"], ro["items"], ro["responses"])[0]
            kl = kl_k3(logp, ref_lp, mask)
            loss = loss + rl.kl_coef * kl
            logs["train/kl"] = kl.detach()
        if self.sparse:
            loss = loss + balance
            self.record_routing(routing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite ERNIE 5.0 RL loss at step {self.global_step}")
        rewards = ro["rewards"]
        logs.update({"train/loss": loss.detach(), "train/reward": rewards.mean(),
                     "train/response_len": mask.sum(1).float().mean(), "train/clip_frac": stats["clip_frac"],
                     "train/mismatch_k_mean": stats.get("mismatch_k_mean", torch.ones(()))})
        for m in MEDIA:
            sel = [i for i, x in enumerate(ro["media"]) if x == m]
            if sel:
                logs[f"train/reward_{m}"] = rewards[sel].mean()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(batch))
        self.last_rollout = {k: ro[k] for k in ("media", "responses", "rewards")}
        return loss

    # ------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _score(self, batch: list[dict]) -> None:
        """Greedy captions scored by the verifier, and the NLL of the true captions (temperature 1)."""
        media, items, truths = [], [], []
        for prompt in batch:
            m, item, truth = self._item("val", prompt)
            text = self.caption(m, item[0], pixels=item[1], temperature=0.0, max_new_tokens=self.rl.max_new_tokens)
            r = caption_reward(m, text, truth)
            self.reward_means["all"].update(r)
            self.reward_means[m].update(r)
            media.append(m)
            items.append(item)
            truths.append(self.vocab.encode(truth) + [self.vocab.eos])
        logp, mask, _, _ = self.response_logprobs(self.net, media, items, truths, temperature=1.0)
        self.reward_means["loss"].update(-(logp * mask).sum() / mask.sum(), int(mask.sum()))

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        self._score(batch)

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self._score(batch)

    def _log_rewards(self, stage: str) -> None:
        logs = {}
        for key, metric in self.reward_means.items():
            if metric.update_count == 0 and not torch.distributed.is_initialized():
                continue
            value = metric.compute()
            metric.reset()
            if torch.isfinite(value):
                name = {"all": "reward", "loss": "loss"}.get(key, f"reward_{key}")
                logs[f"{stage}/{name}"] = value
        self.log_dict(logs, sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._log_rewards("val")

    def on_test_epoch_end(self) -> None:
        self._log_rewards("test")

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # an ordinary ERNIE 5.0 checkpoint: Ernie5Module (generate.py, the tools) loads it without the
        # initial checkpoint; the RL knobs are recorded beside it
        hp = dict(checkpoint.get("hyper_parameters") or {})
        checkpoint["rl"] = hp.pop("rl", asdict(self.rl))
        hp["init_ckpt"] = None
        checkpoint["hyper_parameters"] = hp
