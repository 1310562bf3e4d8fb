"""LightningModule for the decoder-only language model: next-token loss, AdamW, sampling."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from lit_modules.base import OptimConfig
from lit_modules.trunk import TrunkModule
from models.transformer import Transformer, TransformerConfig, distill_loss, lm_loss, upgrade_state_dict

NONFINITE_POLICIES = ("error", "skip", "off")


def tokenizer_to_state(tokenizer) -> dict:
    """Serialise a text tokenizer into the checkpoint, so a checkpoint alone can generate text."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tokenizer")
        tokenizer.save(path)
        with open(path, "rb") as f:
            blob = f.read()
    return {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", "blob": blob}


def tokenizer_from_state(state: dict):
    import importlib

    module, _, name = state["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tokenizer")
        with open(path, "wb") as f:
            f.write(state["blob"])
        return cls.load(path)


class LanguageModelModule(TrunkModule):
    """Trains `models.transformer.Transformer` on packed next-token batches.

    net: TransformerConfig fields (vocab_size 0 = take it from the DataModule's tokenizer).
    optim: OptimConfig fields.
    nonfinite: 'error' raises on a NaN/inf loss naming the step; 'skip' skips that optimiser
        step on every rank and counts it (`train/nonfinite_skipped`); 'off' does not check.
    fsdp: options for `models.parallelize.parallelize` under `trainer=fsdp`.
    sample: text sampled at each validation end and logged to TensorBoard (max_new_tokens 0: off).
    init_ckpt: a checkpoint whose weights initialise the network (weights only: a fresh optimiser
        and schedule; e.g. the output of tools/convert_moe_to_moue.py). `ckpt_path` resumes instead.
    compile / compile_backend: regional compilation, `torch.compile` of each trunk block.

    Knobs set by callbacks: `moue_window` (MoUE: blocks each layer may route to) and the elastic
    knobs (`elastic_layers`, `elastic_experts`, `elastic_top_k`, `elastic_distill`: the sub-model a
    training step runs); the callbacks' surface is described in lit_modules/trunk.py.
    """

    network_attr = "model"
    upgrade_state_dict = staticmethod(upgrade_state_dict)
    supports_elastic = True

    def __init__(
        self,
        net: dict,
        optim: Optional[dict] = None,
        nonfinite: str = "error",
        fsdp: Optional[dict] = None,
        sample: Optional[dict] = None,
        seed: int = 0,
        init_ckpt: Optional[str] = None,
        compile: bool = False,
        compile_backend: str = "inductor",
    ):
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = TransformerConfig.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"model.nonfinite={nonfinite!r} is not one of {list(NONFINITE_POLICIES)}")
        self.nonfinite = nonfinite
        self.fsdp_cfg = {"mixed_precision": "auto", "activation_checkpointing": False, **(fsdp or {})}
        self.sample_cfg = {"max_new_tokens": 48, "temperature": 0.8, "top_k": 50, "top_p": None, **(sample or {})}
        self.seed = seed
        self.init_ckpt = init_ckpt
        self.compile_trunk, self.compile_backend = compile, compile_backend
        self.model: Transformer | None = None
        self.tokenizer = None
        self.nonfinite_skipped = 0
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._last_step_time: float | None = None

    # ----------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            self.tokenizer = dm.tokenizer
        if self.net_cfg.vocab_size == 0:
            if self.tokenizer is None:
                raise ValueError("model.net.vocab_size=0 needs a DataModule with a tokenizer (or set it)")
            self.net_cfg.vocab_size = self.tokenizer.vocab_size
            # Stored back into hparams so that load_from_checkpoint rebuilds the same shapes.
            self.hparams["net"] = {**self.hparams["net"], "vocab_size": self.tokenizer.vocab_size}
        self.model = Transformer(self.net_cfg)
        if self.init_ckpt:
            self._load_init_weights(self.init_ckpt)
        self.finish_build(self.fsdp_cfg)

    def _load_init_weights(self, path: str) -> None:
        state, ckpt = self.init_state(path)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"model.init_ckpt={path} does not match model.net: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        if "moue_window" in ckpt and self.moue_window is not None:
            self.moue_window = ckpt["moue_window"]
        rank_zero_info(f"initialised {len(state)} tensors from {path}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int):
        layers, routing = self.elastic_choice()
        sub = dict(layers=layers, routing=routing) if layers is not None or routing is not None else {}
        if self.sparse:
            logits, balance, infos = self.model(batch.tokens, return_routing=True, **sub)
            ce = lm_loss(logits, batch.targets)
            loss = ce + balance
            self.record_routing(infos, balance=routing is None or routing.kept is None)
        else:
            logits = self.model(batch.tokens, **sub)
            loss = ce = lm_loss(logits, batch.targets)
        self.note_elastic(layers, routing)
        if self.elastic_distill > 0:
            distill = torch.zeros((), device=loss.device)  # logged on full steps too (0): no stale values
            if sub:
                with torch.no_grad():
                    teacher = self.model(batch.tokens)
                distill = distill_loss(logits, teacher, batch.targets)
                loss = loss + self.elastic_distill * distill
            self.log("train/distill", distill.detach(), on_step=True, on_epoch=False)
        if self.nonfinite != "off":
            bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
            if bad:
                if self.nonfinite == "error":
                    raise FloatingPointError(
                        f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
                        f"(epoch {self.current_epoch}, batch {batch_idx}); set model.nonfinite=skip to "
                        "skip such steps"
                    )
                self.nonfinite_skipped += 1
                self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
                return None  # every rank agreed above, so no rank waits on a missing all-reduce
        now = time.perf_counter()
        if self._last_step_time is not None:
            tokens = batch.tokens.numel() * self.trainer.world_size
            self.log("train/tokens_per_sec", tokens / (now - self._last_step_time), on_step=True, on_epoch=False)
        self._last_step_time = now
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/ppl", ce.detach().exp(), on_step=True, on_epoch=False)
        if self.sparse:
            self.log_routing_losses(ce, balance)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def validation_step(self, batch, batch_idx: int) -> None:
        loss = lm_loss(self.model(batch.tokens), batch.targets)
        self.val_loss.update(loss, weight=batch.targets.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)  # MeanMetric already synced
        self.log("val/ppl", loss.exp())
        if not self.trainer.sanity_checking:
            self._log_samples()

    def test_step(self, batch, batch_idx: int) -> None:
        loss = lm_loss(self.model(batch.tokens), batch.targets)
        self.test_loss.update(loss, weight=batch.targets.numel())

    def on_test_epoch_end(self) -> None:
        loss = self.test_loss.compute()
        self.test_loss.reset()
        self.log("test/loss", loss)
        self.log("test/ppl", loss.exp())

    # ----------------------------------------------------------------------------- sampling
    def generate_text(self, prompts: list[str], generator: torch.Generator | None = None, **kwargs) -> list[str]:
        """Decode continuations of each prompt with the attached tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached to this module")
        opts = {k: v for k, v in self.sample_cfg.items() if k in ("max_new_tokens", "temperature", "top_k", "top_p")}
        opts.update(kwargs)
        outs = []
        for prompt in prompts:
            ids = [self.tokenizer.eos_id] + self.tokenizer.encode(prompt)
            x = torch.tensor([ids], device=self.device)
            y = self.model.generate(x, generator=generator, eos_id=self.tokenizer.eos_id, **opts)[0, 1:].tolist()
            if self.tokenizer.eos_id in y[len(ids) - 1 :]:
                y = y[: y.index(self.tokenizer.eos_id, len(ids) - 1)]
            outs.append(self.tokenizer.decode(y))
        return outs

    def _log_samples(self) -> None:
        if self.tokenizer is None or not self.sample_cfg.get("max_new_tokens"):
            return
        tb = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not tb:
            return
        # All ranks run the forward (FSDP2 all-gathers weights inside it); rank zero writes.
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        prompt = self.sample_cfg.get("prompt") or ""
        text = self.generate_text([prompt], generator=gen)[0]
        if self.global_rank == 0:
            for lg in tb:
                lg.experiment.add_text("samples/text", text, self.global_step)

    # ----------------------------------------------------------------------------- bookkeeping
    def on_fit_start(self) -> None:
        self.log_param_counts()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        if self.moue_window is not None:
            checkpoint["moue_window"] = self.moue_window
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = tokenizer_to_state(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.nonfinite_skipped = checkpoint.get("nonfinite_skipped", 0)
        if "tokenizer" in checkpoint and self.tokenizer is None:
            self.tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
        # load_from_checkpoint restores weights without a Trainer: build the net first.
        vocab = self.hparams["net"].get("vocab_size", 0)
        if self.model is None and vocab:
            self.net_cfg.vocab_size = vocab
            self.configure_model()
        self.upgrade_legacy_checkpoint(checkpoint)
        if "moue_window" in checkpoint and self.moue_window is not None:
            self.moue_window = checkpoint["moue_window"]
