"""LightningModules for ERNIE 3.0: knowledge-enhanced multi-task pre-training, and fine-tuning.

Pre-training (`Ernie3Module`): each micro-batch is one task (datamodules/knowledge.py draws it);
the module runs that task's path and head and logs `train/loss_<task>` and `train/acc_<task>`
(kmlm, dlm, reorder, distance, uktp). Document-LM batches run their segments in order with the
recurrence memory carried between them (stop-gradient); validation also reports the document-LM
loss per segment with memory on and off.

Fine-tuning (`Ernie3FinetuneModule`): a classification head on the NLU module's [CLS] state,
initialised from a pre-trained checkpoint, training everything (`mode=full`) or only the NLU task
module and the head (`mode=task_module`).

Knobs set by callbacks (callbacks/progressive.py): `lr_scale` (multiplies the scheduled learning
rate from this step on) and `dropout_now` (dropout probability of every dropout in the network);
the DataModule's `progressive` (batch index -> sequence length, batch size) shapes the batches.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from lit_modules.base import OptimConfig
from lit_modules.trunk import TrunkModule
from models.ernie3 import Ernie3, Ernie3Config, masked_ce
from models.io import load_checkpoint

__all__ = ["Ernie3FinetuneModule", "Ernie3Module", "FINETUNE_MODES", "set_dropout"]

TASKS = ("kmlm", "dlm", "reorder", "distance", "uktp")
FINETUNE_MODES = ("full", "task_module")


def set_dropout(net: nn.Module, p: float) -> None:
    """Set every dropout probability in `net` (nn.Dropout modules and the attention's own) to p."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p


class Ernie3Module(TrunkModule):
    """Pre-trains `models.ernie3.Ernie3` on `datamodules.knowledge.KnowledgeDataModule` batches.

    net: Ernie3Config fields (vocab_size 0 = the DataModule's, special tokens included).
    task_weights: loss weight per task (default 1 each); use_memory: carry document-LM memory.
    """

    network_attr = "model"
    blocks_attr = ("universal.layers", "nlu.layers", "nlg.layers")

    def __init__(self, net: dict, optim: Optional[dict] = None, task_weights: Optional[dict] = None,
                 use_memory: bool = True, fsdp: Optional[dict] = None, seed: int = 0, init_ckpt: Optional[str] = None,
                 sample: Optional[dict] = None):
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = Ernie3Config.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        weights = {t: 1.0 for t in TASKS}
        bad = sorted(set(task_weights or {}) - set(TASKS))
        if bad:
            raise ValueError(f"model.task_weights has unknown tasks {bad}; tasks: {list(TASKS)}")
        weights.update(task_weights or {})
        self.task_weights = weights
        self.use_memory = use_memory
        self.fsdp_cfg = {"mixed_precision": "auto", "activation_checkpointing": False, **(fsdp or {})}
        self.seed, self.init_ckpt = seed, init_ckpt
        self.sample_cfg = {"prompt": "", "max_new_tokens": 32, "temperature": 0.8, "top_k": 50, "top_p": None,
                           **(sample or {})}
        self.model: Optional[Ernie3] = None
        self.tokenizer = None
        self.specials: Optional[dict] = None
        self.lr_scale: float = 1.0
        self.dropout_now: Optional[float] = None
        self.val_metrics = nn.ModuleDict()

    @property
    def trunk(self):
        return None if self.model is None else self.model.universal

    # -- building ---------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "tokenizer", None) is None and hasattr(dm, "setup"):
            dm.setup()
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            self.tokenizer = dm.tokenizer
            self.specials = {name: dm.special(name) for name in ("[CLS]", "[SEP]", "[MASK]", "[PAD]")}
            self.hparams["specials"] = self.specials
        if self.net_cfg.vocab_size == 0:
            if dm is None or not hasattr(dm, "vocab_size"):
                raise ValueError("model.net.vocab_size=0 needs the knowledge DataModule (or set it)")
            self.net_cfg.vocab_size = dm.vocab_size
            self.hparams["net"] = {**self.hparams["net"], "vocab_size": dm.vocab_size}
        self.model = Ernie3(self.net_cfg)
        if self.init_ckpt:
            state, _ = self.init_state(self.init_ckpt)
            self.model.load_state_dict(state)
            rank_zero_info(f"initialised {len(state)} tensors from {self.init_ckpt}")
        self.extend_network(self.model)
        for t in TASKS:
            self.val_metrics[f"loss_{t}"] = MeanMetric()
            self.val_metrics[f"acc_{t}"] = MeanMetric()
        segments = max(16, int(getattr(getattr(dm, "hparams", None), "dlm_segments", 0) or 0))
        for s in range(segments):  # per-segment document-LM validation losses
            self.val_metrics[f"dlm_seg{s}"] = MeanMetric()
            self.val_metrics[f"dlm_nomem_seg{s}"] = MeanMetric()
        self.finish_build(self.fsdp_cfg)

    def extend_network(self, model: Ernie3) -> None:
        """Add modules to the network before it is sharded (fine-tuning heads)."""

    # -- the tasks --------------------------------------------------------------------------------

    def dlm_losses(self, batch, use_memory: bool) -> list[torch.Tensor]:
        """Causal-LM loss of each segment of the document batch, in order, memory carried between them."""
        memory, losses = None, []
        for s in range(batch.tokens.shape[1]):
            logits, memory = self.model(batch.tokens[:, s], "lm", memory=memory, use_memory=use_memory)
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), batch.targets[:, s].flatten()))
        return losses

    def task_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of one task's batch."""
        if batch.task in ("kmlm", "uktp"):
            return masked_ce(self.model(batch.tokens, "mlm", batch.valid), batch.targets)
        if batch.task in ("reorder", "distance"):
            logits = self.model(batch.tokens, batch.task, batch.valid).float()
            return F.cross_entropy(logits, batch.targets), (logits.argmax(-1) == batch.targets).float().mean()
        if batch.task == "dlm":
            loss = torch.stack(self.dlm_losses(batch, self.use_memory)).mean()
            return loss, loss.detach().neg().exp()  # "accuracy" of the LM: exp(-loss), the mean token probability
        raise ValueError(f"unknown task {batch.task!r}")

    # -- steps ------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        # the progressive knobs apply to this step (callbacks run before the module's hook)
        if self.dropout_now is not None:
            set_dropout(self.model, float(self.dropout_now))
        sched = self.lr_schedulers()
        if sched is not None:
            # the scheduled rate of this step times the knob (the scheduler alone sets it with scale 1)
            for group, fn in zip(self.optimizers().param_groups, sched.lr_lambdas):
                group["lr"] = group["initial_lr"] * fn(sched.last_epoch) * self.lr_scale

    def training_step(self, batch, batch_idx: int):
        loss, acc = self.task_loss(batch)
        weighted = self.task_weights[batch.task] * loss
        self.log(f"train/loss_{batch.task}", loss.detach(), on_step=True, on_epoch=False)
        self.log(f"train/acc_{batch.task}", acc.detach(), on_step=True, on_epoch=False)
        self.log("train/loss", weighted.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        self.log("train/elapsed_s", time.perf_counter() - self._fit_start, on_step=True, on_epoch=False)
        return weighted

    def validation_step(self, batch, batch_idx: int) -> None:
        n = batch.tokens.shape[0]
        if batch.task == "dlm":
            for key, mem in (("dlm_seg", self.use_memory), ("dlm_nomem_seg", False)):
                for s, loss in enumerate(self.dlm_losses(batch, mem)):
                    self.val_metrics[f"{key}{s}"].update(loss, weight=n)
        loss, acc = self.task_loss(batch)
        self.val_metrics[f"loss_{batch.task}"].update(loss, weight=n)
        self.val_metrics[f"acc_{batch.task}"].update(acc, weight=n)

    def on_validation_epoch_end(self) -> None:
        losses = []
        for name, metric in self.val_metrics.items():
            if metric.update_count == 0:
                continue
            value = metric.compute()
            metric.reset()
            self.log(f"val/{name}", value)
            if name.startswith("loss_"):
                losses.append(value)
        if losses:
            self.log("val/loss", torch.stack(losses).mean(), prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        losses = []
        for name, metric in self.val_metrics.items():
            if metric.update_count:
                value = metric.compute()
                self.log(f"test/{name}", value)
                metric.reset()
                if name.startswith("loss_"):
                    losses.append(value)
        if losses:
            self.log("test/loss", torch.stack(losses).mean())

    # -- generation -------------------------------------------------------------------------------

    def generate_text(self, prompts: list[str], generator: Optional[torch.Generator] = None, **kw) -> list[str]:
        """Continue each prompt with the NLG module (KV-cached)."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached to this module")
        opts = {k: self.sample_cfg[k] for k in ("max_new_tokens", "temperature", "top_k")}  # NLG sampling has no top-p
        opts.update(kw)
        out = []
        V = self.tokenizer.vocab_size
        for prompt in prompts:
            ids = [self.tokenizer.eos_id] + self.tokenizer.encode(prompt)
            y = self.model.generate(torch.tensor([ids], device=self.device), generator=generator,
                                    eos_id=self.tokenizer.eos_id, **opts)[0, 1:].tolist()
            y = [t for t in y if t < V]  # special tokens are never text
            if self.tokenizer.eos_id in y[len(ids) - 1:]:
                y = y[: y.index(self.tokenizer.eos_id, len(ids) - 1)]
            out.append(self.tokenizer.decode(y))
        return out

    # -- bookkeeping ------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()
        self.log_param_counts()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:
            from lit_modules.lm import tokenizer_to_state

            checkpoint["tokenizer"] = tokenizer_to_state(self.tokenizer)
        checkpoint["ernie3_knobs"] = {"lr_scale": self.lr_scale, "dropout_now": self.dropout_now}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "tokenizer" in checkpoint and self.tokenizer is None:
            from lit_modules.lm import tokenizer_from_state

            self.tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
        self.specials = self.hparams.get("specials", self.specials)
        knobs = checkpoint.get("ernie3_knobs") or {}
        self.lr_scale = knobs.get("lr_scale", 1.0)
        self.dropout_now = knobs.get("dropout_now")
        vocab = self.hparams["net"].get("vocab_size", 0)
        if self.model is None and vocab:
            self.net_cfg.vocab_size = vocab
            self.configure_model()


class Ernie3FinetuneModule(Ernie3Module):
    """A classifier on the NLU module's [CLS] state, from a pre-trained ERNIE 3.0 checkpoint.

    init_ckpt: the pre-training checkpoint; its `model.net` is the architecture (net here may only
    change dropout). num_classes: 0 = the DataModule's. mode: 'full' trains everything;
    'task_module' freezes the embeddings, the universal module and the projection (and the NLG side)
    and trains only the NLU task module and the head.
    """

    def __init__(self, net: Optional[dict] = None, optim: Optional[dict] = None, init_ckpt: Optional[str] = None,
                 mode: str = "full", num_classes: int = 0, fsdp: Optional[dict] = None, seed: int = 0):
        if mode not in FINETUNE_MODES:
            raise ValueError(f"model.mode={mode!r} is not one of {list(FINETUNE_MODES)}")
        net = dict(net or {})
        if init_ckpt:
            saved = load_checkpoint(init_ckpt, what="model.init_ckpt checkpoint")["hyper_parameters"]["net"]
            net = {**saved, **{k: v for k, v in net.items() if k == "dropout"}}
        super().__init__(net, optim, fsdp=fsdp, seed=seed, init_ckpt=init_ckpt)
        self.save_hyperparameters()
        self.hparams["net"] = net
        self.mode, self.num_classes = mode, num_classes
        self.val_acc, self.test_acc, self.val_loss = MeanMetric(), MeanMetric(), MeanMetric()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.num_classes == 0 and dm is not None:
            dm.setup()
            self.num_classes = dm.num_classes
            self.hparams["num_classes"] = dm.num_classes
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {self.num_classes}")
        super().configure_model()

    def extend_network(self, model: Ernie3) -> None:
        model.cls_head = nn.Linear(self.net_cfg.task_d_model, self.num_classes)
        if self.mode == "task_module":
            for part in (model.tok_emb, model.universal, model.proj, model.nlg, model.lm_head, model.mlm_head,
                         model.reorder_head, model.distance_head):
                part.requires_grad_(False)

    def logits(self, batch) -> torch.Tensor:
        return self.model(batch.tokens, "cls", batch.valid, head="cls_head").float()

    def training_step(self, batch, batch_idx: int):
        logits = self.logits(batch)
        loss = F.cross_entropy(logits, batch.targets)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == batch.targets).float().mean(), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        logits = self.logits(batch)
        n = len(batch.targets)
        self.val_acc.update((logits.argmax(-1) == batch.targets).float().mean(), weight=n)
        self.val_loss.update(F.cross_entropy(logits, batch.targets), weight=n)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc.compute(), prog_bar=True)
        self.log("val/loss", self.val_loss.compute())
        self.val_acc.reset()
        self.val_loss.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        logits = self.logits(batch)
        n = len(batch.targets)
        self.test_acc.update((logits.argmax(-1) == batch.targets).float().mean(), weight=n)
        self.val_loss.update(F.cross_entropy(logits, batch.targets), weight=n)

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc.compute())
        self.log("test/loss", self.val_loss.compute())
        self.test_acc.reset()
        self.val_loss.reset()

    def init_state(self, path: str) -> tuple[dict, dict]:
        # a pre-training checkpoint: its network tensors; the classification head starts fresh
        ckpt = load_checkpoint(path, what="model.init_ckpt checkpoint")
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        return state, ckpt
