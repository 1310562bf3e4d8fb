"""Supervised fine-tuning on task demonstrations (`model=sft`): the starting policy of RL.

The network is a pre-trained language model (`model.init_ckpt`, e.g. the final checkpoint of
`experiment=lm_bios`); its architecture is read from that checkpoint, and `model.net` only overrides
fields of it (`model.net.dropout=0.0`). The loss is next-token cross-entropy on answer tokens only
(`data=tasks` gives the prompt tokens target -100) over packed demonstrations; each validation also
scores the held-out tasks by greedy generation (`val/acc`, `val/format`, `val/acc/<task>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.rl_tasks import score
from lit_modules.lm import LanguageModelModule
from models.config import config_from_dict
from models.io import load_checkpoint
from models.rollout import sample_responses

__all__ = ["EvalConfig", "SFTModule", "TaskEvalMixin", "resolve_net", "score_response"]


@dataclass
class EvalConfig:
    """Held-out generation scoring: greedy, at most max_new_tokens per answer; batch: rows decoded together."""

    max_new_tokens: int = 16
    batch: int = 256

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"model.evaluate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch < 1:
            raise ValueError(f"model.evaluate.batch must be >= 1, got {self.batch}")

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        return config_from_dict(cls, d, "model.evaluate")


def resolve_net(net: Optional[dict], init_ckpt: Optional[str]) -> dict:
    """The policy's architecture: the init checkpoint's `model.net` with `net`'s fields on top (or `net`
    alone, over the LM defaults, when there is no checkpoint)."""
    overrides = dict(net or {})
    if not init_ckpt:
        return {"preset": "small", **overrides}
    ckpt = load_checkpoint(init_ckpt, what="model.init_ckpt checkpoint")
    base = (ckpt.get("hyper_parameters") or {}).get("net")
    if not isinstance(base, dict):
        raise ValueError(f"model.init_ckpt={init_ckpt} has no hyper_parameters.net (not a language-model "
                         "checkpoint of this project?)")
    return {**base, **overrides}


def score_response(tokenizer, task, response: list[int]) -> dict:
    """`rl_tasks.score` of a sampled response (its EOS tokens dropped), with the task name and the text."""
    text = tokenizer.decode([t for t in response if t != tokenizer.eos_id])
    return {**score(task, text), "task": task.name, "text": text}


class TaskEvalMixin:
    """Scores held-out tasks (`trainer.datamodule.eval_tasks`) by greedy generation and logs the accuracy
    at the end of every validation (not the sanity check) and test, on the network `eval_net()` returns."""

    eval_cfg: EvalConfig

    def eval_net(self):
        return self.model

    def score_tasks(self, net, tasks, prompts) -> list[dict]:
        dm = self.trainer.datamodule
        ro = sample_responses(net, prompts, self.eval_cfg.max_new_tokens, dm.stop_ids, temperature=0.0,
                              max_batch=self.eval_cfg.batch)
        return [{**score_response(dm.tokenizer, task, resp), "length": len(resp)}
                for task, resp in zip(tasks, ro.responses)]

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            with torch.no_grad():
                self.log_task_accuracy("val", self.eval_net())

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        with torch.no_grad():
            self.log_task_accuracy("test", self.eval_net())

    def log_task_accuracy(self, prefix: str, net) -> Optional[dict]:
        """Every rank scores every held-out task (identical greedy work, so a sharded network's forwards stay
        in step); logs {prefix}/acc, /format, /response_len and /acc/<task name>."""
        dm = getattr(self.trainer, "datamodule", None)
        tasks = getattr(dm, "eval_tasks", None)
        if not tasks:
            return None
        results = self.score_tasks(net, tasks, [dm.prompt_ids(t) for t in tasks])
        metrics = {
            f"{prefix}/acc": sum(r["correct"] for r in results) / len(results),
            f"{prefix}/format": sum(r["format"] for r in results) / len(results),
            f"{prefix}/response_len": sum(r["length"] for r in results) / len(results),
        }
        for name in sorted({r["task"] for r in results}):
            rows = [r for r in results if r["task"] == name]
            metrics[f"{prefix}/acc/{name}"] = sum(r["correct"] for r in rows) / len(rows)
        for key, value in metrics.items():
            self.log(key, value, sync_dist=False)  # every rank computed the same value
        self.last_eval = {"metrics": metrics, "examples": results[:8]}
        return metrics


class SFTModule(TaskEvalMixin, LanguageModelModule):
    """LanguageModelModule whose architecture comes from `init_ckpt`, plus held-out task accuracy.

    net: overrides of the checkpoint's `model.net` (or the architecture itself without a checkpoint).
    evaluate: EvalConfig fields. The rest as LanguageModelModule (sampling to TensorBoard is off).
    """

    def __init__(
        self,
        net: Optional[dict] = None,
        optim: Optional[dict] = None,
        evaluate: Optional[dict] = None,
        nonfinite: str = "error",
        fsdp: Optional[dict] = None,
        seed: int = 0,
        init_ckpt: Optional[str] = None,
        compile: bool = False,
        compile_backend: str = "inductor",
    ):
        resolved = resolve_net(net, init_ckpt)
        super().__init__(resolved, optim, nonfinite, fsdp, {"max_new_tokens": 0}, seed, init_ckpt, compile,
                         compile_backend)
        self.hparams["net"] = resolved  # load_from_checkpoint / resume rebuild these shapes
        self.eval_cfg = EvalConfig.from_dict(dict(evaluate or {}))
        self.last_eval: Optional[dict] = None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.init_ckpt:
            rank_zero_info(f"SFT from {self.init_ckpt}")
        else:
            rank_zero_warn("model.init_ckpt is null: fine-tuning a randomly initialised network")
