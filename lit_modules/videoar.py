"""LightningModule for VideoAR: teacher-forced next-scale / next-frame bitwise prediction over the
tokens of a frozen multi-scale video tokenizer, with the two callback knobs of the paper.

Knobs (documented attributes, set by callbacks or by hand; applied in `training_step`):
    cfec: CFECConfig            Cross-Frame Error Correction (bit flips + re-quantization); off by default
    frame_mask_prob: float      Random Frame Mask: P(an earlier frame is hidden from a query frame); 0 = off
    frame_mask_window: int|None frames a query frame may look back (None = all)
    image_prob: float           joint image/video training: P(a batch is cut to its first latent frame)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_modules.base import OptimConfig, step_seed
from lit_modules.trunk import TrunkModule
from models.config import config_from_dict
from models.layers.mask import frame_mask_keep
from models.random import uniform
from models.tokenizers.checkpoint import load_media_tokenizer
from models.tokenizers.visual import VisualTokenizer
from models.videoar import (
    CFECConfig,
    GuidanceSchedule,
    VideoAR,
    VideoARConfig,
    bitwise_loss,
    scale_token_weights,
    teacher_forcing_sequence,
    upgrade_state_dict,
)

__all__ = ["VideoARModule"]


def _cfec_from(d: Optional[dict]) -> CFECConfig:
    try:
        return config_from_dict(CFECConfig, dict(d or {}), "model.cfec")
    except ValueError as e:
        # CFECConfig's own range checks do not know where in the config they sit
        raise (e if "model.cfec" in str(e) else ValueError(f"model.cfec: {e}")) from e


class VideoARModule(TrunkModule):
    """Trains `models.videoar.VideoAR` class-conditionally on clips (pixels or a token cache).

    net: VideoARConfig fields (bits, scales, num_classes 0 = from the tokenizer / data).
    tokenizer_ckpt: the frozen video tokenizer; None = the DataModule's (a token cache's) tokenizer.
    scale_weighting: 'uniform' or 'infinity' per-token loss weights.
    cfec: the initial Cross-Frame Error Correction knob (CFECConfig fields).
    frame_mask_prob / frame_mask_window: the initial Random Frame Mask knob.
    sample: generation at validation end (num_clips 0 = off): guidance [first_start, first_end,
        final], temperature, top_k, top_p; clips are decoded and logged to TensorBoard.
    tokenizer_scales: another scale schedule for the tokenizer (another resolution; staged training).
    init_ckpt: a previous stage's checkpoint (weights only; a grown scale schedule gets fresh scale
        embeddings for its new scales).
    compile / compile_backend: regional compilation, `torch.compile` of each trunk block.
    fsdp: options for `models.parallelize.parallelize` under `trainer=fsdp`.

    With a sparse trunk (`net.ffn=moe|moue`) the loss adds the balance loss and the module keeps
    the routing statistics and bias updates of lit_modules/trunk.py (so `moe_monitor` works here too).
    """

    network_attr = "net"
    upgrade_state_dict = staticmethod(upgrade_state_dict)

    def __init__(self, net: dict, optim: Optional[dict] = None, tokenizer_ckpt: Optional[str] = None,
                 scale_weighting: str = "infinity", cfec: Optional[dict] = None, frame_mask_prob: float = 0.0,
                 frame_mask_window: Optional[int] = None, sample: Optional[dict] = None, seed: int = 0,
                 init_ckpt: Optional[str] = None, tokenizer_scales: Optional[list] = None,
                 image_prob: float = 0.0, compile: bool = False, compile_backend: str = "inductor",
                 fsdp: Optional[dict] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = VideoARConfig.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        if scale_weighting not in ("uniform", "infinity"):
            raise ValueError(f"model.scale_weighting must be 'uniform' or 'infinity', got {scale_weighting!r}")
        if not 0.0 <= frame_mask_prob < 1.0:
            raise ValueError(f"model.frame_mask_prob must be in [0, 1), got {frame_mask_prob}")
        if not 0.0 <= image_prob <= 1.0:
            raise ValueError(f"model.image_prob must be in [0, 1], got {image_prob}")
        self.scale_weighting = scale_weighting
        self.tokenizer_scales = tokenizer_scales
        self.image_prob = image_prob
        self.cfec = _cfec_from(cfec)
        self.frame_mask_prob = frame_mask_prob
        self.frame_mask_window = frame_mask_window
        self.sample_cfg = {"num_clips": 4, "guidance": [1.0, 3.0, 5.0], "temperature": 1.0, "top_k": 0,
                           "top_p": 0.0, **(sample or {})}
        self.seed = seed
        self.tokenizer_ckpt = tokenizer_ckpt
        self.init_ckpt = init_ckpt
        self.compile_trunk, self.compile_backend = compile, compile_backend
        self.fsdp_cfg = dict(fsdp or {})  # models.parallelize.parallelize keyword arguments (it has the defaults)
        self.net: VideoAR | None = None
        self.tokenizer_info: dict[str, Any] = {}
        self._tokenizer: VisualTokenizer | None = None  # frozen, kept out of the module tree (not trained,
        # not sharded, not in this module's state dict: the checkpoint records its path and digest)

    # ------------------------------------------------------------------------------- building
    @property
    def tokenizer(self) -> VisualTokenizer:
        if self._tokenizer is None:
            raise RuntimeError("the video tokenizer is not loaded yet (configure_model)")
        return self._tokenizer

    def _load_tokenizer(self) -> None:
        if self._tokenizer is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.tokenizer_ckpt:
            tok, info = load_media_tokenizer(self.tokenizer_ckpt, expect_kind="visual")
        elif dm is not None and getattr(dm, "tokenizer", None) is not None:
            tok, info = dm.tokenizer, dict(dm.tokenizer_info)
        else:
            raise ValueError("model.tokenizer_ckpt is not set and the DataModule has no tokenizer (use data=tokens "
                             "or set model.tokenizer_ckpt to a video tokenizer checkpoint)")
        if dm is not None and getattr(dm, "tokenizer_info", None) and dm.tokenizer_info.get("digest") != info["digest"]:
            raise ValueError(f"model.tokenizer_ckpt ({info['digest']}) is not the tokenizer of the token cache "
                             f"({dm.tokenizer_info.get('digest')})")
        # object.__setattr__: an nn.Module attribute would register the tokenizer as a submodule
        object.__setattr__(self, "_tokenizer", tok.eval().requires_grad_(False))
        if self.tokenizer_scales:
            try:
                self._tokenizer.set_scales(self.tokenizer_scales)
            except ValueError as e:
                raise ValueError(f"model.tokenizer_scales: {e}") from e
        self.tokenizer_info = {k: info[k] for k in ("kind", "config", "digest", "checkpoint_sha256", "path") if k in info}

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self._load_tokenizer()
        tcfg = self.tokenizer.cfg
        tok_scales = [list(s) for s in self.tokenizer.scales]
        cfg = self.net_cfg
        if cfg.bits == 0:
            cfg.bits = tcfg.dim
        if cfg.scales is None:
            cfg.scales = tok_scales
        if cfg.bits != tcfg.dim or [list(s) for s in cfg.scales] != tok_scales:
            raise ValueError(f"model.net bits/scales ({cfg.bits}, {cfg.scales}) differ from the tokenizer's "
                             f"({tcfg.dim}, {tok_scales})")
        if cfg.num_classes == 0:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            n = int(getattr(dm, "num_classes", 0) or 0)
            if n < 1:
                raise ValueError("model.net.num_classes=0 needs a DataModule that knows its classes (or set it)")
            cfg.num_classes = n
        # stored back so that load_from_checkpoint rebuilds the same shapes
        self.hparams["net"] = {**self.hparams["net"], "bits": cfg.bits, "scales": cfg.scales,
                               "num_classes": cfg.num_classes}
        if self.tokenizer_ckpt is None and self.tokenizer_info.get("path"):
            self.hparams["tokenizer_ckpt"] = self.tokenizer_info["path"]
        self.net = VideoAR(cfg)
        if self.init_ckpt:
            self._load_init(self.init_ckpt)
        self.finish_build(self.fsdp_cfg)

    def _load_init(self, path: str) -> None:
        """Start from a previous stage: same trunk; the scale embedding may grow (new scales start fresh)."""
        state, _ = self.init_state(path)
        own = self.net.state_dict()
        grown = []
        for key in ("scale_emb.weight",):
            if key in state and key in own and state[key].shape[1:] == own[key].shape[1:] \
                    and state[key].shape[0] != own[key].shape[0]:
                new = own[key].clone()
                n = min(new.shape[0], state[key].shape[0])
                new[:n] = state[key][:n]
                state[key] = new
                grown.append(key)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"model.init_ckpt={path} does not match model.net: {e}") from e
        self.init_report = {"path": path, "resized": grown}

    def on_fit_start(self) -> None:
        self.tokenizer.to(self.device)
        self.log_param_counts()

    def on_validation_start(self) -> None:
        self.tokenizer.to(self.device)

    def on_test_start(self) -> None:
        self.tokenizer.to(self.device)

    # ------------------------------------------------------------------------------- data
    @torch.no_grad()
    def latents(self, batch) -> torch.Tensor:
        """The tokenizer's continuous latent per latent frame, [B, T, d, H, W]."""
        if getattr(batch, "features", None) is not None:
            z = batch.features
        elif hasattr(batch, "pixels"):
            z = self.tokenizer.encode_features(batch.pixels)
        else:
            raise ValueError("VideoAR needs clips (data=video) or a token cache built with features")
        return z.float().transpose(1, 2)

    def labels_of(self, batch, drop: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        labels = batch.labels.clone()
        labels[labels < 0] = self.net.null_class
        if drop > 0:
            u = uniform(labels.shape, generator, labels.device)
            labels[u < drop] = self.net.null_class
        return labels

    # ------------------------------------------------------------------------------- training
    def _step(self, batch, stage: str, corrupt: bool) -> dict:
        feats = self.latents(batch)
        gen = None
        if corrupt:
            gen = torch.Generator(device=feats.device).manual_seed(
                step_seed(self.seed, self.trainer.fit_loop.total_batch_idx, self.global_rank) % (2 ** 63))
            # joint image + video training: an image is the first latent frame of a causal clip
            if self.image_prob > 0 and float(uniform((), gen, feats.device)) < self.image_prob:
                feats = feats[:, :1]
        B, T = feats.shape[:2]
        with torch.no_grad():
            tf = teacher_forcing_sequence(self.tokenizer.quantizer, feats, self.cfec if corrupt else None, gen)
        keep = None
        window = None
        if corrupt:
            if self.frame_mask_prob > 0:
                keep = frame_mask_keep(B, T, self.frame_mask_prob, gen, feats.device)
            window = self.frame_mask_window
        labels = self.labels_of(batch, self.net_cfg.cond_dropout if corrupt else 0.0, gen)
        logits, balance, infos = self.net(tf["inputs"], labels, T, keep, window, return_routing=True)
        weights = scale_token_weights(self.net.scales, T, self.scale_weighting)
        loss, per_token = bitwise_loss(logits, tf["labels"], weights)
        return {"loss": loss, "balance": balance, "routing": infos, "per_token": per_token.detach(),
                "logits": logits.detach(), "labels": tf["labels"], "flip_p": tf["flip_p"], "T": T, "keep": keep}

    def _log_breakdown(self, out: dict, stage: str) -> None:
        T, scales = out["T"], self.net.scales
        per_tok = out["per_token"]
        correct = (out["logits"].argmax(-1) == out["labels"].long()).float().mean(-1)  # [B, L]
        sizes = [h * w for h, w in scales]
        frame_len = sum(sizes)
        kw = dict(on_step=stage == "train", on_epoch=stage != "train", batch_size=per_tok.shape[0],
                  sync_dist=stage != "train")
        logs = {}
        for k, n in enumerate(sizes):
            start = sum(sizes[:k])
            idx = torch.cat([torch.arange(t * frame_len + start, t * frame_len + start + n) for t in range(T)])
            logs[f"{stage}/loss_scale_{k + 1}"] = per_tok[:, idx].mean()
            logs[f"{stage}/bit_acc_scale_{k + 1}"] = correct[:, idx].mean()
        for t in range(T):
            logs[f"{stage}/bit_acc_frame_{t}"] = correct[:, t * frame_len:(t + 1) * frame_len].mean()
            logs[f"{stage}/loss_frame_{t}"] = per_tok[:, t * frame_len:(t + 1) * frame_len].mean()
        logs[f"{stage}/bit_acc"] = correct.mean()
        self.log_dict(logs, **kw)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self._step(batch, "train", corrupt=True)
        loss = out["loss"]
        if self.sparse:
            loss = loss + out["balance"]
            self.record_routing(out["routing"])
            self.log_routing_losses(out["loss"], out["balance"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite VideoAR loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self._log_breakdown(out, "train")
        if self.cfec.enabled:
            self.log("train/cfec_flip_p_mean", out["flip_p"].mean(), on_step=True, on_epoch=False)
        if out["keep"] is not None:
            T = out["T"]
            earlier = torch.tril(torch.ones(T, T, dtype=torch.bool, device=out["keep"].device), -1)
            hidden = (~out["keep"] & earlier).sum() / earlier.sum().clamp_min(1) / out["keep"].shape[0]
            self.log("train/frame_mask_hidden_frac", hidden.float(), on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int) -> None:
        out = self._step(batch, "val", corrupt=False)
        self.log("val/loss", out["loss"], prog_bar=True, on_epoch=True, batch_size=out["labels"].shape[0], sync_dist=True)
        self._log_breakdown(out, "val")

    @torch.no_grad()
    def test_step(self, batch, batch_idx: int) -> None:
        out = self._step(batch, "test", corrupt=False)
        self.log("test/loss", out["loss"], on_epoch=True, batch_size=out["labels"].shape[0], sync_dist=True)
        self._log_breakdown(out, "test")

    # ------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_clips(self, labels: torch.Tensor, num_frames: int, generator: Optional[torch.Generator] = None,
                       prefix_tokens=None, **overrides) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(tokens per scale, decoded pixels [B, 3, T_pix, H, W]) sampled for class ids `labels`."""
        opts = {**self.sample_cfg, **overrides}
        g = opts["guidance"]
        sched = GuidanceSchedule(*g) if isinstance(g, (list, tuple)) else GuidanceSchedule.constant(float(g))
        was = self.net.training
        self.net.eval()
        tokens = self.net.generate(self.tokenizer.quantizer, labels, num_frames, prefix_tokens=prefix_tokens,
                                   guidance=sched, temperature=opts["temperature"], top_k=opts["top_k"],
                                   top_p=opts["top_p"], generator=generator)
        self.net.train(was)
        return tokens, self.tokenizer.decode(tokens).clamp(-1, 1)

    @torch.no_grad()
    def extend_video(self, pixels: torch.Tensor, labels: torch.Tensor, total_latent: int, window: int,
                     overlap: int = 1, generator: Optional[torch.Generator] = None, **overrides) -> torch.Tensor:
        """Continue real clips [B, 3, T, H, W] to `total_latent` latent frames, past the trained length.

        Generation runs in windows of `window` latent frames. After each window the pixels of its last
        `overlap` latent frames are decoded and RE-ENCODED as a fresh clip (its first frame on its own,
        as the causal tokenizer does for any clip start); they are the next window's given frames, so
        positions restart and never exceed what was trained (VideoAR's frame re-encoding).
        """
        tau = self.tokenizer.cfg.time_stride
        if not 0 < overlap < window:
            raise ValueError(f"need 0 < overlap ({overlap}) < window ({window})")
        out = pixels
        have = self.tokenizer.cfg.latent_frames(pixels.shape[2])

        def tail_tokens(video: torch.Tensor, latents: int) -> list[torch.Tensor]:
            return self.tokenizer.encode(video[:, :, video.shape[2] - (1 + (latents - 1) * tau):])

        prefix = tail_tokens(out, min(have, window - 1))
        while have < total_latent:
            given = prefix[0].shape[1]
            steps = min(window - given, total_latent - have)
            tokens, video = self.generate_clips(labels, given + steps, generator, prefix_tokens=prefix, **overrides)
            new = video[:, :, video.shape[2] - steps * tau:]
            out = torch.cat([out, new], dim=2)
            have += steps
            prefix = tail_tokens(out, overlap)
        return out

    def on_validation_epoch_end(self) -> None:
        n = int(self.sample_cfg.get("num_clips", 0))
        if n <= 0 or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        writers = [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        labels = torch.arange(n, device=self.device) % self.net_cfg.num_classes
        frames = int(self.sample_cfg.get("num_frames", 0) or 0) or self._val_latent_frames()
        _, video = self.generate_clips(labels, frames, gen)
        clip = ((video + 1) / 2).transpose(1, 2).cpu()  # [B, T, 3, H, W] in [0, 1]
        for w in writers:
            w.add_video("samples/generated", clip, self.global_step, fps=4)
            from torchvision.utils import make_grid

            strip = make_grid(clip.flatten(0, 1), nrow=clip.shape[1], padding=1)
            w.add_image("samples/generated_frames", strip, self.global_step)

    def _val_latent_frames(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        nf = getattr(dm, "num_frames", None)
        if nf is None and getattr(dm, "manifest", None):  # a token cache records the clips' data config
            nf = dm.manifest["data"]["config"].get("num_frames")
        return self.tokenizer.cfg.latent_frames(nf) if nf else 2

    # ------------------------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.net is None and self._trainer is None:
            # load_from_checkpoint restores weights without a Trainer: build the net (and its tokenizer) first
            self.configure_model()
        self.upgrade_legacy_checkpoint(checkpoint)
        if "moue_window" in checkpoint and self.moue_window is not None:
            self.moue_window = checkpoint["moue_window"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.moue_window is not None:
            checkpoint["moue_window"] = self.moue_window
        checkpoint["video_tokenizer"] = dict(self.tokenizer_info)
        checkpoint["knobs"] = {"cfec": asdict(self.cfec), "frame_mask_prob": self.frame_mask_prob,
                               "frame_mask_window": self.frame_mask_window}
