"""LightningModule for ERNIE 5.0: next-group-of-tokens prediction over packed multimodal rows.

Losses (one teacher-forced pass over a `models.ernie5.UnifiedBatch`):
    text    next-token cross-entropy over text targets                      train/loss_text
    mtp     the MTP module's t + 2 cross-entropy, times `mtp_weight`        train/loss_mtp
    image   VideoAR's bitwise loss of image generation spans, per-token     train/loss_image
            weights from `scale_weighting` ('infinity' emphasises the coarse scales)
    video   the same over video generation spans (with CFEC flips when on)  train/loss_video
    audio   next-codec cross-entropy, mean over the Q levels               train/loss_audio
    total   sum of the modality terms (each divided by its EMA when `posterior_weighting`) +
            mtp_weight * mtp + the trunk's balance loss                   train/loss
The same names are logged under val/ (val/loss is the unweighted sum, comparable across runs).

Knobs (documented attributes, set by callbacks or by hand; applied in `training_step`):
    mtp_weight: float            weight of the MTP loss (0.3 in the 8K stage, 0.1 later)
    posterior_weighting: bool    divide each modality's loss by its EMA (decay `posterior_decay`)
    cfec: CFECConfig             cross-frame error correction of the generation spans' history
    frame_mask_prob: float       VideoAR's Random Frame Mask over generated video frames: P(an earlier
                                 frame of the same video is hidden from a query frame); 0 = off
    frame_mask_window: int|None  windowed temporal attention: frames a query frame may look back
                                 (None = all). Both apply in training steps only, as in VideoAR
                                 (callbacks/videoar.py's RandomFrameMask sets them)
    bias_update_rate: float      aux-loss-free balancing speed of every router (1e-4 -> 1e-5)
    visual_stage: int            progressive tokenizer switching (papers.md 4.2): which visual tokenizer
                                 the visual terms use, an index into `visual_tokenizer_stages` + [the
                                 final one] (default: the final). The network is sized for the final
                                 tokenizer's d bits; a stage of d_s < d bits feeds its latents / inputs
                                 zero-padded to d and is scored on the first d_s bit logits
                                 (callbacks/progressive_tokenizer.py sets it from the step)
    track_routing: bool          while True, validation accumulates `routing_counts`: {task: [L, E]}
                                 routed (token, expert) pairs of that task's tokens
                                 (callbacks/routing_analysis.py sets it)
    elastic_layers / elastic_experts / elastic_top_k / elastic_distill
                                 elastic (once-for-all) pre-training, set per micro-batch by
                                 callbacks/elastic.py (`experiment=ernie5_elastic`): the step trains that
                                 sub-model of the trunk (lit_modules/trunk.py); the audio levels read the
                                 last Q layers it runs; distillation is KL(full || sub) over every output
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lit_modules.base import OptimConfig, step_seed
from lit_modules.trunk import TrunkModule
from lit_modules.videoar import _cfec_from
from models.ernie5 import SPAN_TOKENS, TASKS, Ernie5, Ernie5Config, UnifiedBatch
from models.layers.elastic import RoutingLimit
from models.layers.mask import frame_mask_keep
from models.moe.replay import RouteReplay
from models.tokenizers.checkpoint import load_media_tokenizer
from models.transformer import distill_loss
from models.videoar import bitwise_loss, scale_token_weights, teacher_forcing_sequence

__all__ = ["Ernie5Module", "LOSS_TERMS"]

LOSS_TERMS = ("text", "image", "video", "audio")
EVAL_KEYS = ("loss_text", "loss_mtp", "loss_image", "loss_video", "loss_audio", "bit_acc_image", "bit_acc_video")


class Ernie5Module(TrunkModule):
    """Trains `models.ernie5.Ernie5` on `datamodules.multimodal.MultimodalDataModule` batches.

    net: Ernie5Config fields (text_vocab / bits / scales / audio sizes 0 = from the data and tokenizers).
    visual_tokenizer / audio_tokenizer: the frozen tokenizers (the DataModule's by default).
    visual_tokenizer_stages: progressive switching's earlier visual tokenizers, fewest bits first (the
        DataModule's by default; see the `visual_stage` knob).
    """

    network_attr = "net"
    supports_elastic = True  # callbacks.elastic: depth / expert width / top-k sub-models per micro-batch

    @property
    def elastic_min_depth(self) -> int:
        """The fewest layers a sub-model may run: the audio code levels read the last Q layers run."""
        return 1 if self.net is None else max(1, self.net.cfg.audio_levels)

    def __init__(self, net: dict, optim: Optional[dict] = None, visual_tokenizer: Optional[str] = None,
                 audio_tokenizer: Optional[str] = None, mtp_weight: float = 0.3, posterior_weighting: bool = False,
                 posterior_decay: float = 0.99, scale_weighting: str = "infinity", cfec: Optional[dict] = None,
                 bias_update_rate: Optional[float] = None, frame_mask_prob: float = 0.0,
                 frame_mask_window: Optional[int] = None, seed: int = 0, init_ckpt: Optional[str] = None,
                 compile: bool = False, compile_backend: str = "inductor", fsdp: Optional[dict] = None,
                 sample: Optional[dict] = None, visual_tokenizer_stages: Optional[list] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = Ernie5Config.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        if mtp_weight < 0:
            raise ValueError(f"model.mtp_weight must be >= 0, got {mtp_weight}")
        if not 0.0 < posterior_decay < 1.0:
            raise ValueError(f"model.posterior_decay must be in (0, 1), got {posterior_decay}")
        if scale_weighting not in ("uniform", "infinity"):
            raise ValueError(f"model.scale_weighting must be 'uniform' or 'infinity', got {scale_weighting!r}")
        if bias_update_rate is not None and bias_update_rate < 0:
            raise ValueError(f"model.bias_update_rate must be >= 0, got {bias_update_rate}")
        if not 0.0 <= frame_mask_prob < 1.0:
            raise ValueError(f"model.frame_mask_prob must be in [0, 1), got {frame_mask_prob}")
        if frame_mask_window is not None and frame_mask_window < 1:
            raise ValueError(f"model.frame_mask_window must be >= 1 or null, got {frame_mask_window}")
        self.frame_mask_prob, self.frame_mask_window = float(frame_mask_prob), frame_mask_window
        self.mtp_weight = float(mtp_weight)
        self.posterior_weighting, self.posterior_decay = bool(posterior_weighting), float(posterior_decay)
        self.scale_weighting = scale_weighting
        self.cfec = _cfec_from(cfec)
        self._bias_rate = bias_update_rate
        self.seed = seed
        self.visual_tokenizer_ckpt, self.audio_tokenizer_ckpt = visual_tokenizer, audio_tokenizer
        self.visual_stage_ckpts = None if visual_tokenizer_stages is None else list(visual_tokenizer_stages)
        self._visual_stage: Optional[int] = None  # None = the final tokenizer
        self.init_ckpt = init_ckpt
        self.compile_trunk, self.compile_backend = compile, compile_backend
        self.fsdp_cfg = dict(fsdp or {})
        self.sample_cfg = {"num": 2, "guidance": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 0.0,
                           "max_new_tokens": 48, "frame_window": None, **(sample or {})}
        self.net: Optional[Ernie5] = None
        self.vocab = None  # the unified text vocabulary (datamodules.multimodal.Vocabulary), from the data or checkpoint
        self.track_routing = False
        self.routing_counts: dict[str, torch.Tensor] = {}
        self.register_buffer("loss_ema", torch.zeros(len(LOSS_TERMS)), persistent=True)
        # validation / test means per term: torchmetrics states, so that ranks whose batches lack a
        # modality still take part in every synchronisation (a fixed set of keys on every rank)
        from torchmetrics import MeanMetric

        self.eval_means = torch.nn.ModuleDict({stage: torch.nn.ModuleDict({k: MeanMetric() for k in EVAL_KEYS})
                                               for stage in ("val", "test")})
        self.tokenizer_info: dict[str, Any] = {}
        self._vtoks: list = []  # frozen visual tokenizers, the progressive stages' then the final one
        self._atok = None  # frozen, kept out of the module tree

    # ------------------------------------------------------------------------------- building
    @property
    def _vtok(self):
        """The visual tokenizer of the current `visual_stage` (None before they are loaded)."""
        return self._vtoks[self.visual_stage] if self._vtoks else None

    @property
    def visual_tokenizer(self):
        return self._vtok

    @property
    def num_visual_stages(self) -> int:
        """Visual tokenizers the run can switch between (1 without progressive switching)."""
        return len(self._vtoks) if self._vtoks else 1 + len(self.visual_stage_ckpts or [])

    @property
    def visual_stage(self) -> int:
        """Knob (module docstring): the index of the visual tokenizer in use; the last is the final one."""
        n = self.num_visual_stages
        return n - 1 if self._visual_stage is None else self._visual_stage

    @visual_stage.setter
    def visual_stage(self, stage: int) -> None:
        n = self.num_visual_stages
        if not 0 <= int(stage) < n:
            raise ValueError(f"visual_stage must be in [0, {n}) (the progressive stages, then the final "
                             f"visual tokenizer), got {stage}")
        self._visual_stage = int(stage)

    def visual_stage_slice(self, stage: Optional[int] = None) -> tuple[int, int]:
        """(first channel, bits) of a stage's latents in a training row's visual latents: the final
        tokenizer's d channels come first, then each earlier stage's (datamodules/multimodal.py)."""
        stage = self.visual_stage if stage is None else stage
        bits = [t.cfg.dim for t in self._vtoks]
        if stage == len(bits) - 1:
            return 0, bits[-1]
        return bits[-1] + sum(bits[:stage]), bits[stage]

    @property
    def audio_tokenizer(self):
        return self._atok

    def _datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _load_tokenizers(self) -> None:
        if self._vtoks:
            return
        from datamodules.multimodal import check_stage_tokenizer

        dm = self._datamodule()
        paths = {"visual": self.visual_tokenizer_ckpt or getattr(dm, "visual_tokenizer", None),
                 "audio": self.audio_tokenizer_ckpt or getattr(dm, "audio_tokenizer", None)}
        stage_paths = (self.visual_stage_ckpts if self.visual_stage_ckpts is not None
                       else list(getattr(dm, "visual_tokenizer_stages", None) or []))
        for kind, path in paths.items():
            if not path:
                raise ValueError(f"model.{kind}_tokenizer is not set and the DataModule gives none")
            tok, info = load_media_tokenizer(path, expect_kind=kind)
            if kind == "visual":
                vtoks = [tok.eval().requires_grad_(False)]
            else:
                object.__setattr__(self, "_atok", tok.eval().requires_grad_(False))
            self.tokenizer_info[kind] = {k: info[k] for k in ("kind", "config", "digest", "path")}
        stages = []
        for i, path in enumerate(stage_paths):
            if not path:
                raise ValueError(f"model.visual_tokenizer_stages.{i} is not set and the DataModule gives none")
            tok, info = load_media_tokenizer(path, expect_kind="visual")
            check_stage_tokenizer(tok, vtoks[0], f"model.visual_tokenizer_stages.{i}", path,
                                  prev_bits=stages[-1].cfg.dim if stages else None)
            stages.append(tok.eval().requires_grad_(False))
            self.tokenizer_info.setdefault("visual_stages", []).append(
                {k: info[k] for k in ("kind", "config", "digest", "path")})
        object.__setattr__(self, "_vtoks", stages + vtoks)
        self.hparams["visual_tokenizer"] = self.tokenizer_info["visual"]["path"]
        self.hparams["audio_tokenizer"] = self.tokenizer_info["audio"]["path"]
        if stages:
            self.hparams["visual_tokenizer_stages"] = [i["path"] for i in self.tokenizer_info["visual_stages"]]
        corpus = getattr(dm, "corpus", None)
        if corpus is not None:
            for kind in ("visual", "audio"):
                if corpus.info[f"{kind}_digest"] != self.tokenizer_info[kind]["digest"]:
                    raise ValueError(f"model.{kind}_tokenizer is not the tokenizer the data was encoded with")
            data_stages = [st["digest"] for st in corpus.info.get("visual_stages") or []]
            if data_stages != [i["digest"] for i in self.tokenizer_info.get("visual_stages", [])]:
                raise ValueError("model.visual_tokenizer_stages are not the stage tokenizers the data was encoded with "
                                 "(data.visual_tokenizer_stages)")

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self._load_tokenizers()
        cfg = self.net_cfg
        v, a = self._vtoks[-1], self._atok  # the network is sized for the final visual tokenizer
        given = {"bits": v.cfg.dim, "latent_dim": v.cfg.dim, "scales": [list(s) for s in v.scales],
                 "audio_levels": a.cfg.num_quantizers, "audio_codebook": a.cfg.codebook_size,
                 "pixel_patch": v.cfg.spatial_factor, "time_stride": v.cfg.time_stride}
        dm = self._datamodule()
        if cfg.text_vocab == 0:
            if dm is None or getattr(dm, "corpus", None) is None:
                raise ValueError("model.net.text_vocab=0 needs the multimodal DataModule (or set it)")
            cfg.text_vocab = len(dm.vocab)
        for k, val in given.items():
            cur = getattr(cfg, k)
            if cur in (0, None):
                setattr(cfg, k, val)
            elif (cur if k != "scales" else [list(s) for s in cur]) != val:
                raise ValueError(f"model.net.{k}={cur} differs from the tokenizers' {val}")
        if cfg.speaker is None:  # from the data: on when its sounds have speakers
            spk = dm.corpus.splits["train"].get("audio_speakers") if getattr(dm, "corpus", None) is not None else None
            cfg.speaker = bool(spk is not None and (spk >= 0).any())
        cfg.__post_init__()
        if dm is not None and getattr(dm, "corpus", None) is not None:
            self.vocab = dm.vocab
        self.hparams["net"] = {**self.hparams["net"], "text_vocab": cfg.text_vocab, "speaker": cfg.speaker, **given}
        self.net = Ernie5(cfg)
        if self._bias_rate is not None:
            self.bias_update_rate = self._bias_rate
        if self.init_ckpt:
            state, _ = self.init_state(self.init_ckpt)
            try:
                self.net.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"model.init_ckpt={self.init_ckpt} does not match model.net: {e}") from e
        self.finish_build(self.fsdp_cfg)

    def on_fit_start(self) -> None:
        self._tokenizers_to(self.device)
        self.log_param_counts()

    def on_validation_start(self) -> None:
        self._tokenizers_to(self.device)

    def on_test_start(self) -> None:
        self._tokenizers_to(self.device)

    def _tokenizers_to(self, device) -> None:
        for tok in (*self._vtoks, self._atok):
            if tok is not None:
                tok.to(device)

    # ------------------------------------------------------------------------------- knobs
    @property
    def bias_update_rate(self) -> Optional[float]:
        """Knob: the aux-loss-free bias update speed of every router (None for a dense trunk)."""
        if self.net is None or self.net_cfg.ffn != "moe":
            return self._bias_rate
        return self.net.trunk.layers[0].ffn.router.bias_update_rate

    @bias_update_rate.setter
    def bias_update_rate(self, rate: float) -> None:
        if rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {rate}")
        self._bias_rate = float(rate)
        if self.net is not None and self.net_cfg.ffn == "moe":
            for block in self.net.trunk.layers:
                block.ffn.router.bias_update_rate = float(rate)

    # ------------------------------------------------------------------------------- losses
    def _vis_inputs(self, batch: UnifiedBatch, corrupt: bool, gen: Optional[torch.Generator]) -> list[dict]:
        out = []
        with torch.no_grad():
            for spans in batch.vis_gen:
                out.append(teacher_forcing_sequence(self._vtok.quantizer, spans.latents.float(),
                                                    self.cfec if corrupt else None, gen))
        return out

    def visual_teacher_forcing(self, batch: UnifiedBatch, corrupt: bool = False,
                               gen: Optional[torch.Generator] = None) -> tuple[list[dict], list[torch.Tensor]]:
        """VideoAR teacher forcing of every generation span of a `stage_view` batch under the current
        stage's tokenizer ({'inputs', 'labels'} per span), and the network's inputs: those inputs
        zero-padded to its bits."""
        tf = self._vis_inputs(batch, corrupt, gen)
        d, bits = self.net_cfg.bits, self.visual_stage_slice()[1]
        return tf, [t["inputs"] if bits == d else F.pad(t["inputs"], (0, d - bits)) for t in tf]

    def stage_view(self, batch: UnifiedBatch) -> UnifiedBatch:
        """The batch as the current visual stage sees it: each visual span's latents narrowed to the
        stage's channels; understanding latents zero-padded to the network's d (generation spans are
        quantized by the stage's tokenizer first: `visual_teacher_forcing`). Every pass of the network
        over DataModule rows goes through it (a row of a progressive run carries every stage's channels)."""
        if not (batch.vis_und or batch.vis_gen):
            return batch
        d = self.net_cfg.bits
        start, bits = self.visual_stage_slice()
        have = (batch.vis_und or batch.vis_gen)[0].latents.shape[2]
        if start + bits > have:
            raise ValueError(f"visual_stage={self.visual_stage} reads latent channels [{start}, {start + bits}) but the "
                             f"batch has {have}: the data must be encoded by the stage tokenizers too "
                             "(data.visual_tokenizer_stages)")
        if have == d and (start, bits) == (0, d):
            return batch

        def narrow(spans, pad: bool):
            lat = spans.latents[:, :, start:start + bits]
            if pad and bits < d:
                lat = F.pad(lat, (0, 0, 0, 0, 0, d - bits))
            return replace(spans, latents=lat)

        return replace(batch, vis_und=[narrow(s, True) for s in batch.vis_und],
                       vis_gen=[narrow(s, False) for s in batch.vis_gen])

    def _losses(self, batch: UnifiedBatch, corrupt: bool, layers=None, routing=None) -> dict:
        gen = None
        if corrupt:
            gen = torch.Generator(device=batch.ids.device).manual_seed(
                step_seed(self.seed, self.trainer.fit_loop.total_batch_idx, self.global_rank) % (2 ** 63))
        batch = self.stage_view(batch)
        tf, inputs = self.visual_teacher_forcing(batch, corrupt, gen)
        d, bits = self.net_cfg.bits, self.visual_stage_slice()[1]
        keep = window = None
        if corrupt and batch.vis_gen:
            if self.frame_mask_prob > 0:  # drawn after CFEC's flips, from the step's generator
                keep = frame_mask_keep(len(batch), batch.frame_ids()[1], self.frame_mask_prob, gen, batch.ids.device)
            window = self.frame_mask_window
        out = self.net(batch, inputs, layers=layers, routing=routing, frame_keep=keep, frame_window=window)
        if bits < d:  # a progressive stage of fewer bits is scored (and distilled) on its own bits
            out.vis = {task: lg[..., :bits, :] for task, lg in out.vis.items()}
        zero = out.hidden.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        if out.text_targets.numel():
            terms["text"] = F.cross_entropy(out.text_logits.float(), out.text_targets)
            counts["text"] = out.text_targets.numel()
        if out.mtp_logits is not None and out.mtp_targets.numel():
            terms["mtp"] = F.cross_entropy(out.mtp_logits.float(), out.mtp_targets)
        vis_sum = {"image": [zero, 0], "video": [zero, 0]}
        bit_acc = {}
        for spans, t in zip(batch.vis_gen, tf):
            frames = spans.latents.shape[1]
            logits = out.vis[spans.task]
            w = scale_token_weights(self.net.scales, frames, self.scale_weighting)
            loss, _ = bitwise_loss(logits, t["labels"], w)
            key = spans.task.split("_")[0]
            n = spans.dest.shape[0]
            vis_sum[key][0] = vis_sum[key][0] + loss * n
            vis_sum[key][1] += n
            bit_acc[key] = (logits.argmax(-1) == t["labels"].long()).float().mean().detach()
        for key, (s, n) in vis_sum.items():
            if n:
                terms[key] = s / n
                counts[key] = n
        audio_sum, audio_n = zero, 0
        for task, (logits, codes) in out.audio.items():
            ce = torch.stack([F.cross_entropy(lg.float().flatten(0, 1), codes[..., j].reshape(-1))
                              for j, lg in enumerate(logits)]).mean()
            n = codes.shape[0] * codes.shape[1]
            audio_sum, audio_n = audio_sum + ce * n, audio_n + n
        if audio_n:
            terms["audio"] = audio_sum / audio_n
            counts["audio"] = audio_n
        return {"terms": terms, "counts": counts, "balance": out.balance_loss, "routing": out.routing,
                "bit_acc": bit_acc, "out": out}

    @staticmethod
    def _distill(student, teacher) -> torch.Tensor:
        """In-place distillation of an elastic sub-model: KL(full || sub) per predicted token, averaged
        within each output the batch has (text, MTP, each visual task's bits, each audio level), then
        over those outputs, as the modality losses are summed over modalities."""
        pairs = []
        if student.text_logits.numel():
            pairs.append((student.text_logits, teacher.text_logits))
        if student.mtp_logits is not None and student.mtp_logits.numel():
            pairs.append((student.mtp_logits, teacher.mtp_logits))
        for task, logits in student.vis.items():
            pairs.append((logits.flatten(0, -2), teacher.vis[task].flatten(0, -2)))
        for task, (levels, _) in student.audio.items():
            for j, logits in enumerate(levels):
                pairs.append((logits.flatten(0, -2), teacher.audio[task][0][j].flatten(0, -2)))
        if not pairs:
            return student.hidden.new_zeros(())
        return torch.stack([distill_loss(s, t) for s, t in pairs]).mean()

    def _total(self, terms: dict, train: bool) -> torch.Tensor:
        total = terms["text"].new_zeros(()) if "text" in terms else next(iter(terms.values())).new_zeros(())
        for i, key in enumerate(LOSS_TERMS):
            if key not in terms:
                continue
            value = terms[key]
            if self.posterior_weighting:
                ema = self.loss_ema[i]
                if train:
                    new = value.detach() if ema == 0 else self.posterior_decay * ema + (1 - self.posterior_decay) * value.detach()
                    self.loss_ema[i] = new
                    ema = new
                value = value / ema.clamp_min(1e-6) if ema > 0 else value
            total = total + value
        if "mtp" in terms:
            total = total + self.mtp_weight * terms["mtp"]
        return total

    def _log_terms(self, res: dict, stage: str) -> None:
        bs = max(1, sum(res["counts"].values()))
        kw = dict(on_step=stage == "train", on_epoch=stage != "train", sync_dist=stage != "train", batch_size=bs)
        logs = {f"{stage}/loss_{k}": v.detach() for k, v in res["terms"].items()}
        logs.update({f"{stage}/bit_acc_{k}": v for k, v in res["bit_acc"].items()})
        self.log_dict(logs, **kw)

    def training_step(self, batch: UnifiedBatch, batch_idx: int) -> torch.Tensor:
        layers, routing = self.elastic_choice()  # the full model unless a callback set the elastic knobs
        res = self._losses(batch, corrupt=True, layers=layers, routing=routing)
        loss = self._total(res["terms"], train=True)
        if self.sparse:
            loss = loss + res["balance"]
            # a width-reduced step routes nothing to its masked experts: kept out of the bias balance
            self.record_routing(res["routing"], balance=routing is None or routing.kept is None)
            self.log_routing_losses(loss.detach() - res["balance"].detach(), res["balance"])
        self.note_elastic(layers, routing)
        if self.elastic_distill > 0:
            distill = loss.new_zeros(())  # logged on full steps too (0): no stale values
            if layers is not None or routing is not None:
                with torch.no_grad():  # the same corrupted inputs: the corruption seed is the step's
                    teacher = self._losses(batch, corrupt=True)["out"]
                distill = self._distill(res["out"], teacher)
                loss = loss + self.elastic_distill * distill
            self.log("train/distill", distill.detach(), on_step=True, on_epoch=False)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite ERNIE 5.0 loss at step {self.global_step}: "
                                     f"{ {k: float(v) for k, v in res['terms'].items()} }")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/mtp_weight", self.mtp_weight, on_step=True, on_epoch=False)
        self._log_terms(res, "train")
        return loss

    @torch.no_grad()
    def _eval_step(self, batch: UnifiedBatch, stage: str) -> None:
        replay = None
        if self.track_routing and self.sparse and stage == "val":
            replay = RouteReplay("record")
        res = self._losses(batch, corrupt=False, routing=None if replay is None else RoutingLimit(replay=replay))
        means = self.eval_means[stage]
        for key, value in res["terms"].items():
            means[f"loss_{key}"].update(value.detach(), res["counts"].get(key, 1))
        for key, value in res["bit_acc"].items():
            means[f"bit_acc_{key}"].update(value, res["counts"][key])
        if replay is not None:
            self._count_routes(batch, replay)

    def _log_eval_means(self, stage: str) -> None:
        """Epoch means of every term, synchronised over ranks (every rank computes every key in the same
        order); {stage}/loss = the sum of the modality terms (unweighted: comparable across runs)."""
        logs = {}
        for key, metric in self.eval_means[stage].items():
            if metric.update_count == 0 and not torch.distributed.is_initialized():
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a term no rank saw computes to nan: left out below
                value = metric.compute()
            metric.reset()
            if torch.isfinite(value):
                logs[f"{stage}/{key}"] = value
        terms = [logs[f"{stage}/loss_{k}"] for k in LOSS_TERMS if f"{stage}/loss_{k}" in logs]
        if terms:
            logs[f"{stage}/loss"] = torch.stack(terms).sum()
        self.log_dict(logs, sync_dist=False, rank_zero_only=False)

    def on_test_epoch_end(self) -> None:
        self._log_eval_means("test")

    def _count_routes(self, batch: UnifiedBatch, replay: RouteReplay) -> None:
        """Add this batch's routed (token, expert) pairs per group to `routing_counts`: text and boundary
        tokens of every document count as 'text', media tokens by their document's task."""
        from models.moe.analysis import route_counts

        E, L = self.trunk.num_experts, self.net_cfg.n_layers
        group = torch.where(batch.kind == 0, torch.zeros_like(batch.task), batch.task).reshape(-1)
        for layer, calls in replay.recorded.items():
            routes = torch.cat([r.reshape(-1, r.shape[-1]) for r in calls])  # [N, k]
            c = route_counts(routes, group, len(TASKS), E)
            for g, name in enumerate(TASKS):
                if c[g].any():
                    cur = self.routing_counts.setdefault(name, torch.zeros(L, E, dtype=torch.long, device=c.device))
                    cur[layer] += c[g]

    def validation_step(self, batch: UnifiedBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: UnifiedBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------------------- generation
    def _opts(self, overrides: dict) -> dict:
        return {**self.sample_cfg, **{k: v for k, v in overrides.items() if v is not None}}

    def caption_prompt(self, medium: str, item: torch.Tensor, pixels: Optional[torch.Tensor] = None) -> list:
        """The captioning prompt `<boX> item <eoX> <sep>` as `Ernie5.generate_text` pieces (`pixels`
        [T, H, W, 3]: an image's / video's frames, for the patch merger's ViT branch)."""
        v = self.vocab
        open_, close = SPAN_TOKENS[medium]
        if medium == "audio":
            piece = ("audio", item.to(self.device))
        else:
            piece = ("vis_und", (item.to(self.device), None if pixels is None else pixels.to(self.device)))
        return [("text", [v[open_]]), piece, ("text", [v[close], v["<sep>"]])]

    @torch.no_grad()
    def caption(self, medium: str, item: torch.Tensor, generator: Optional[torch.Generator] = None,
                pixels: Optional[torch.Tensor] = None, **overrides) -> str:
        """Image / video (latents [T', d, H, W], and its `pixels` [T, H, W, 3] uint8 for a ViT branch) or
        audio (codes [F, Q]) -> its generated caption."""
        v, o = self.vocab, self._opts(overrides)
        prompt = self.caption_prompt(medium, item, pixels)
        ids = self.net.generate_text(prompt, int(o["max_new_tokens"]), [v.eos], o["temperature"], o["top_k"] or None,
                                     o["top_p"] or None, generator)
        return v.decode(ids)

    @torch.no_grad()
    def continue_text(self, text: str, generator: Optional[torch.Generator] = None, **overrides) -> str:
        """A held-out text's continuation (the prompt must not be empty: documents have no BOS)."""
        v, o = self.vocab, self._opts(overrides)
        if not text:
            raise ValueError("continue_text needs a non-empty prompt")
        ids = self.net.generate_text([("text", v.encode(text))], int(o["max_new_tokens"]), [v.eos], o["temperature"],
                                     o["top_k"] or None, o["top_p"] or None, generator)
        return v.decode(ids)

    @torch.no_grad()
    def render(self, caption: str, medium: str = "image", frames: int = 1,
               generator: Optional[torch.Generator] = None, **overrides) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Caption -> (tokens per scale, pixels [1, 3, T, H, W] in [-1, 1]); frames = latent frames
        (1 for an image); classifier-free guidance against the caption-less prompt; `frame_window`
        (model.sample.frame_window or an override) limits how many earlier frames a frame attends to."""
        v, o = self.vocab, self._opts(overrides)
        open_ = v[SPAN_TOKENS[medium][0]]
        tokens = self.net.generate_visual(self._vtok.quantizer, [("text", v.encode(caption) + [open_])], frames,
                                          uncond_prompt=[("text", [open_])], guidance=o["guidance"],
                                          temperature=o["temperature"], top_k=int(o["top_k"] or 0),
                                          top_p=float(o["top_p"] or 0.0), generator=generator,
                                          frame_window=o.get("frame_window"))
        video = self._vtok.decode(tokens).clamp(-1, 1)
        return tokens, video if video.dim() == 5 else video.unsqueeze(2)

    @torch.no_grad()
    def speak(self, description: str, frames: int, generator: Optional[torch.Generator] = None,
              num_samples: Optional[int] = None, reference: Optional[torch.Tensor] = None,
              **overrides) -> tuple[torch.Tensor, torch.Tensor]:
        """Description -> (codes [1, frames, Q], waveform [1, samples]); `reference`: the codes [F, Q] of a
        clip in the voice to speak in (the speaker token; needs a network with `speaker`)."""
        v, o = self.vocab, self._opts(overrides)
        prompt = [] if reference is None else [("speaker", reference)]
        prompt.append(("text", v.encode(description) + [v[SPAN_TOKENS["audio"][0]]]))
        codes = self.net.generate_audio(prompt, frames, o["temperature"], o["top_k"] or None, o["top_p"] or None,
                                        generator)
        return codes, self._atok.decode_wave(codes, num_samples)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_means("val")
        n = int(self.sample_cfg.get("num", 0))
        if n <= 0 or self.trainer.sanity_checking or not self.trainer.is_global_zero or self.vocab is None:
            return
        if self._device_mesh is not None:  # FSDP2: generation outside forward() would see sharded weights
            if not getattr(self, "_warned_samples", False):
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn("ERNIE 5.0 validation samples are skipped under FSDP2; sample from a checkpoint "
                               "with generate.py")
                self._warned_samples = True
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        writers = [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        dm = self._datamodule()
        if not writers or getattr(dm, "corpus", None) is None:
            return
        was = self.net.training
        self.net.eval()
        try:
            self._log_samples(writers, dm.corpus.splits["val"], n)
        finally:
            self.net.train(was)

    def reference_clip(self, split: dict, index: int, voice: Optional[int] = None) -> Optional[torch.Tensor]:
        """Codes of a clip of a corpus split in voice `voice` (default: sound `index`'s own), other than
        sound `index` when there is one; None when the network has no speaker embedding or the voice no clip."""
        spk = split.get("audio_speakers")
        if self.net is None or self.net.speaker_enc is None or spk is None:
            return None
        voice = int(spk[index]) if voice is None else int(voice)
        same = [j for j in (spk == voice).nonzero().flatten().tolist() if j != index] if voice >= 0 else []
        return split["audio"][same[0]] if same else None

    def stage_item(self, split: dict, medium: str, index: int) -> torch.Tensor:
        """Item `index` of a corpus split as the current visual stage encodes it (zero-padded to the
        network's bits); sounds and the final stage: the stored item."""
        if medium == "audio" or self.visual_stage == self.num_visual_stages - 1:
            return split[medium][index]
        item = split[f"{medium}_stages"][self.visual_stage][index]
        return F.pad(item, (0, 0, 0, 0, 0, self.net_cfg.bits - item.shape[1]))

    def _log_samples(self, writers, split: dict, n: int) -> None:
        from torchvision.utils import make_grid

        from datamodules.multimodal import item_pixels

        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        step = self.global_step
        lines = []
        for medium in ("image", "video", "audio"):
            for i in range(min(n, len(split[medium]))):
                truth = split[f"{medium}_captions"][i][0]
                said = self.caption(medium, self.stage_item(split, medium, i), gen, pixels=item_pixels(split, medium, i))
                lines.append(f"- {medium} {i}: generated: {said!r} / "
                             f"true: {truth!r}")
        frames = split["video"].shape[1]
        images, videos = [], []
        for i in range(min(n, len(split["image"]))):
            images.append(self.render(split["image_captions"][i][0], "image", 1, gen)[1][0, :, 0])
        for i in range(min(n, len(split["video"]))):
            videos.append(self.render(split["video_captions"][i][0], "video", frames, gen)[1][0])
        audio_frames = split["audio"].shape[1]
        waves = [self.speak(split["audio_captions"][i][0], audio_frames, gen, reference=self.reference_clip(split, i))[1][0]
                 for i in range(min(n, len(split["audio"])))]
        prefix = self.vocab.decode(split["text"][0][:8]) if split["text"] else "The"
        text = f"{prefix} | {self.continue_text(prefix, gen)}"
        rate = int(self._atok.cfg.sample_rate)
        for w in writers:
            if images:
                w.add_image("samples/caption_to_image", make_grid((torch.stack(images) + 1) / 2, nrow=len(images)), step)
            if videos:
                clip = ((torch.stack(videos) + 1) / 2).transpose(1, 2).cpu()  # [B, T, 3, H, W]
                w.add_video("samples/caption_to_video", clip, step, fps=4)
            for i, wave in enumerate(waves):
                w.add_audio(f"samples/description_to_audio_{i}", wave.cpu().clamp(-1, 1), step, sample_rate=rate)
            w.add_text("samples/captions", "\n".join(lines), step)
            w.add_text("samples/text", text, step)

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokenizers"] = dict(self.tokenizer_info)
        if self.vocab is not None:
            checkpoint["text_tokenizer"] = self.vocab.bpe.hf_tokenizer.to_str()
        checkpoint["knobs"] = {"mtp_weight": self.mtp_weight, "cfec": asdict(self.cfec),
                               "bias_update_rate": self.bias_update_rate, "frame_mask_prob": self.frame_mask_prob,
                               "frame_mask_window": self.frame_mask_window, "visual_stage": self._visual_stage}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.net is None and self._trainer is None:
            self.configure_model()
        if self.vocab is None and checkpoint.get("text_tokenizer"):
            from datamodules.multimodal import Vocabulary
            from models.tokenizers.text import BPETokenizer

            self.vocab = Vocabulary(BPETokenizer.from_str(checkpoint["text_tokenizer"]))
        knobs = checkpoint.get("knobs") or {}
        if "mtp_weight" in knobs:
            self.mtp_weight = float(knobs["mtp_weight"])
        if knobs.get("bias_update_rate") is not None:
            self.bias_update_rate = float(knobs["bias_update_rate"])
        if "frame_mask_prob" in knobs:
            self.frame_mask_prob, self.frame_mask_window = float(knobs["frame_mask_prob"]), knobs["frame_mask_window"]
        if knobs.get("visual_stage") is not None:
            self.visual_stage = int(knobs["visual_stage"])
