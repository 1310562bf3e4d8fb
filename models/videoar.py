"""VideoAR: next-scale prediction inside a frame, next-frame prediction across frames, on the shared trunk.

Shapes: B batch, L tokens, C model dim, d bits per token (the tokenizer's code dim), T latent
frames, K scales, (h_k, w_k) scale k's grid, n condition (prefix) tokens.

Sequence: [n condition tokens] [frame 0: scale 1 .. K] [frame 1: scale 1 .. K] ...
Input of frame t, scale k (Eq. 6): the reconstruction accumulated from scales < k of frame t,
downsampled to scale k's grid, through `word_embed` (d -> C), plus a learnable scale embedding s_k.
Scale 1 of frame 0 is the <SOS> embedding of the class; scale 1 of a later frame is the previous
frame's full accumulation downsampled to scale 1's grid. Each token predicts the d bits of its
own position of R_k (a bitwise head: 2 logits per bit). Attention is block-causal over
(frame, scale) blocks (a described `AttentionMask`); positions are multi-scale temporal RoPE over
(t, h, w). The trunk's FFN is dense, MoE or MoUE (`ffn`).

Read top to bottom: config and presets; the network (embeddings, block-causal trunk, bitwise head,
KV-cached generation); teacher-forced inputs with cross-frame error correction; losses; bit
sampling and the guidance schedule; the key map for checkpoints written before the trunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import config_from_dict, fill_preset
from models.layers.mask import AttentionMask, block_layout
from models.layers.positions import sequence_positions
from models.layers.trunk import Trunk, TrunkConfig, rename_prefix
from models.random import uniform
from models.tokenizers.multiscale import MultiScaleQuantizer, flip_bits, parse_scales

__all__ = ["CFECConfig", "GuidanceSchedule", "PRESETS", "VideoAR", "VideoARConfig", "bitwise_loss",
           "sample_bits", "scale_token_weights", "teacher_forcing_sequence", "upgrade_state_dict"]

# `tiny` for tests; `small` trains on CPU in minutes; `base` is VideoAR-L (24 layers, 1536 wide).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4),
    "small": dict(n_layers=4, d_model=192, n_heads=6),
    "base": dict(n_layers=24, d_model=1536, n_heads=12),
}

# model.net.rope -> the position layout of the video tokens (models/layers/positions.py)
ROPE_LAYOUTS = {"mst": "raw", "1d": "1d", "center": "center"}


@dataclass
class VideoARConfig(TrunkConfig):
    """Architecture of the VideoAR decoder: the trunk's fields (`TrunkConfig`, incl. ffn / moe / moue)
    plus VideoAR's. Fields left `None` come from `preset`.

    bits / scales / num_classes: 0 or None = taken from the tokenizer / data by the LightningModule.
    cond_len: condition tokens |Psi| (a class is embedded into cond_len tokens).
    cond_dropout: probability a training clip's class is replaced by the null class (for CFG).
    rope: 'mst' (multi-scale temporal RoPE, (t+n, h+n, w+n) with raw grid indices), '1d'
        (sequence-index positions, the ablation baseline) or 'center' (ERNIE 5.0's Uni-RoPE: grid
        cell centres on the final scale's grid, fractional); rope_split: fractions of the rotated
        pairs for (t, h, w).
    """

    preset: str = "tiny"
    bits: int = 0
    scales: Optional[list] = None
    num_classes: int = 0
    cond_len: int = 1
    cond_dropout: float = 0.1
    max_frames: int = 64
    rope: str = "mst"
    rope_split: Optional[list] = field(default_factory=lambda: [0.25, 0.375, 0.375])

    def __post_init__(self) -> None:
        fill_preset(self, PRESETS)
        if self.rope not in ROPE_LAYOUTS:
            raise ValueError(f"model.net.rope must be one of {sorted(ROPE_LAYOUTS)}, got {self.rope!r}")
        if self.rope_split is None or len(self.rope_split) != 3:
            raise ValueError(f"model.net.rope_split must have 3 fractions (t, h, w), got {self.rope_split}")
        try:
            self.validate_trunk()
        except ValueError as e:
            raise ValueError(f"model.net: {e}") from e
        if self.cond_len < 1:
            raise ValueError(f"model.net.cond_len must be >= 1, got {self.cond_len}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"model.net.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.scales is not None:
            try:
                self.scales = [list(s) for s in parse_scales(self.scales)]
            except ValueError as e:
                raise ValueError(f"model.net.scales: {e}") from e

    @property
    def ready(self) -> bool:
        return self.bits > 0 and self.scales is not None and self.num_classes > 0

    @property
    def frame_tokens(self) -> int:
        return sum(h * w for h, w in self.scales)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoARConfig":
        return config_from_dict(cls, d)


# --------------------------------------------------------------------------------------- network


class VideoAR(nn.Module):
    """The VideoAR decoder: embeds scale inputs, runs the block-causal trunk, predicts bits."""

    def __init__(self, cfg: VideoARConfig) -> None:
        super().__init__()
        if not cfg.ready:
            raise ValueError("VideoARConfig needs bits, scales and num_classes (the LightningModule fills them)")
        self.cfg = cfg
        C = cfg.d_model
        self.scales = [tuple(s) for s in cfg.scales]
        self.K = len(self.scales)
        self.null_class = cfg.num_classes
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.cond_len * C)  # last row = null (CFG)
        self.sos = nn.Parameter(torch.zeros(C))
        self.word_embed = nn.Linear(cfg.bits, C)
        self.scale_emb = nn.Embedding(self.K, C)
        self.trunk = Trunk(cfg)
        self.head = nn.Linear(C, 2 * cfg.bits)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embeddings and head N(0, init_std), biases and <SOS> 0; the trunk's own scheme for the blocks."""
        for m in (self.class_emb, self.word_embed, self.scale_emb, self.head):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.sos)
        self.trunk.init_weights()

    def num_params(self) -> dict[str, int]:
        """Total parameters, and those one token activates (experts counted k per sparse layer)."""
        total = sum(p.numel() for p in self.parameters())
        trunk = self.trunk.num_params()
        return {"total": total, "activated": total - trunk["total"] + trunk["activated"]}

    # -- sequence bookkeeping -----------------------------------------------------------------

    def positions(self, num_frames: int, device=None) -> torch.Tensor:
        return sequence_positions(self.cfg.cond_len, self.scales, num_frames, ROPE_LAYOUTS[self.cfg.rope]).to(device)

    def scale_ids(self, num_frames: int, device=None) -> torch.Tensor:
        ids = torch.cat([torch.full((h * w,), k, dtype=torch.long) for k, (h, w) in enumerate(self.scales)])
        return ids.repeat(num_frames).to(device)

    def mask(self, num_frames: int, frame_keep: Optional[torch.Tensor] = None, window: Optional[int] = None,
             device=None) -> AttentionMask:
        """Block-causal over [prefix][(frame, scale) blocks], with the Random Frame Mask if given."""
        block, frame = block_layout(self.cfg.cond_len, self.scales, num_frames, device)
        return AttentionMask.blocks(block, frame_ids=frame, frame_keep=frame_keep, frame_window=window)

    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix tokens [B, n, C], <SOS> vector [B, C]) for class ids (null_class = unconditional)."""
        e = self.class_emb(labels).view(labels.shape[0], self.cfg.cond_len, -1)
        return e, e.mean(dim=1) + self.sos

    def embed(self, feats_BLd: torch.Tensor, labels: torch.Tensor, first_frame: int, num_frames: int,
              with_prefix: bool) -> torch.Tensor:
        """Token embeddings for `num_frames` frames starting at `first_frame` (+ the prefix)."""
        B = feats_BLd.shape[0]
        x = self.word_embed(feats_BLd) + self.scale_emb(self.scale_ids(num_frames, feats_BLd.device))
        prefix, sos = self.condition(labels)
        if first_frame == 0:
            n0 = self.scales[0][0] * self.scales[0][1]
            x = torch.cat([sos[:, None, :].expand(B, n0, -1) + self.scale_emb.weight[0], x[:, n0:]], dim=1)
        return torch.cat([prefix, x], dim=1) if with_prefix else x

    def forward(self, feats_BLd: torch.Tensor, labels: torch.Tensor, num_frames: int,
                frame_keep: Optional[torch.Tensor] = None, window: Optional[int] = None,
                return_routing: bool = False, layers: Optional[Sequence[int]] = None):
        """Teacher-forced bit logits [B, L_video, d, 2] (L_video = num_frames * tokens per frame); with
        `return_routing` also (balance loss, per-layer LayerRouting list) of a sparse trunk.

        feats_BLd: the scale inputs (Eq. 6) of every video token; frame 0 scale 1 rows are ignored
            (replaced by <SOS>). frame_keep / window: the Random Frame Mask (see models/layers/mask.py).
        """
        if num_frames > self.cfg.max_frames:
            raise ValueError(f"{num_frames} latent frames exceed model.net.max_frames={self.cfg.max_frames}")
        n = self.cfg.cond_len
        x = self.embed(feats_BLd, labels, 0, num_frames, with_prefix=True)
        dev = x.device
        out = self.trunk(x, self.positions(num_frames, dev), self.mask(num_frames, frame_keep, window, dev),
                         layers=layers)
        logits = self.head(out.hidden[:, n:]).view(x.shape[0], -1, self.cfg.bits, 2)
        return (logits, out.balance_loss, out.routing) if return_routing else logits

    # -- generation --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        quantizer: MultiScaleQuantizer,
        labels: torch.Tensor,
        num_frames: int,
        prefix_tokens: Optional[Sequence[torch.Tensor]] = None,
        guidance: "GuidanceSchedule | float | None" = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
        return_logits: bool = False,
    ):
        """Sample tokens [B, T, h_k, w_k, d] per scale: one forward pass per (frame, scale) block.

        quantizer: the tokenizer's multi-scale quantizer (turns sampled bits into the next inputs).
        prefix_tokens: tokens per scale [B, T0, h, w, d] of given frames (video continuation); they
            are teacher-forced, the remaining num_frames - T0 frames are sampled.
        guidance: classifier-free guidance, a constant or a GuidanceSchedule over (frame, scale);
            None or 1.0 = no guidance (a single conditional pass).
        use_cache: False recomputes the whole prefix at every step under the block-causal mask
            (the slow reference); True keeps every layer's keys and values in a preallocated cache.
        """
        B, dev = labels.shape[0], labels.device
        sched = guidance if isinstance(guidance, GuidanceSchedule) else GuidanceSchedule.constant(guidance or 1.0)
        cfg_on = not sched.is_identity
        lab = torch.cat([labels, torch.full_like(labels, self.null_class)]) if cfg_on else labels
        n, K = self.cfg.cond_len, self.K
        pos = self.positions(num_frames, dev)
        grid = self.scales[-1]
        d = self.cfg.bits
        given = 0 if prefix_tokens is None else prefix_tokens[0].shape[1]
        total = n + num_frames * self.cfg.frame_tokens
        caches = self.trunk.new_cache(lab.shape[0], total) if use_cache else None
        # a (frame, scale) block sees every earlier token and itself: no mask over [cache; block]
        visible = AttentionMask.full()

        prefix_emb, sos = self.condition(lab)
        if use_cache:
            self.trunk(prefix_emb, pos[:n], visible, caches)
        seq = [prefix_emb]  # embedded blocks so far (for the uncached path)

        out_tokens = [torch.zeros(B, num_frames, h, w, d, dtype=torch.uint8, device=dev) for h, w in self.scales]
        all_logits = []
        offset = n
        f_prev = None
        for t in range(num_frames):
            f_hat = torch.zeros(B, d, *grid, device=dev)
            for k, (h, w) in enumerate(self.scales):
                L = h * w
                if t == 0 and k == 0:
                    x = sos[:, None, :].expand(-1, L, -1) + self.scale_emb.weight[0]
                else:
                    src = f_prev if k == 0 else f_hat
                    feat = quantizer.next_input(src, k).flatten(2).transpose(1, 2)  # [B, L, d]
                    if cfg_on:
                        feat = torch.cat([feat, feat])
                    x = self.word_embed(feat) + self.scale_emb.weight[k]
                if use_cache:
                    hid = self.trunk(x, pos[offset:offset + L], visible, caches).hidden
                else:
                    seq.append(x)
                    full = torch.cat(seq, dim=1)
                    S = full.shape[1]
                    hid = self.trunk(full, pos[:S], self.mask(num_frames, device=dev)).hidden[:, -L:]
                logits = self.head(hid).view(hid.shape[0], L, d, 2).float()
                if cfg_on:
                    g = sched(t, k, num_frames, K)
                    cond, unc = logits[:B], logits[B:]
                    logits = unc + g * (cond - unc)
                if return_logits:
                    all_logits.append(logits)
                if t < given:
                    bits = prefix_tokens[k][:, t].reshape(B, L, d).to(torch.uint8)
                else:
                    bits = sample_bits(logits, temperature, top_k, top_p, generator)
                out_tokens[k][:, t] = bits.view(B, h, w, d)
                code = quantizer.tokens_to_code(bits.view(B, h, w, d), k)
                f_hat = quantizer.accumulate(f_hat, code, k)
                offset += L
            f_prev = f_hat
        return (out_tokens, all_logits) if return_logits else out_tokens


# ------------------------------------------------------------------------- teacher-forced inputs


@dataclass
class CFECConfig:
    """Cross-Frame Error Correction: how teacher-forced bits are corrupted (the module's knob).

    Frame t's flip probability is drawn per (clip, frame, scale) from U(p_min + delta*t, p_max + delta*t)
    (time_dependent=False drops delta*t); with `inherit`, the first scale of frame t > 0 draws from
    U(p_prev, p_max + delta*t) where p_prev is the previous frame's final-scale flip probability.
    """

    enabled: bool = False
    p_min: float = 0.0
    p_max: float = 0.25
    delta: float = 0.01
    time_dependent: bool = True
    inherit: bool = True
    requantize: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_min <= self.p_max <= 1.0:
            raise ValueError(f"need 0 <= p_min <= p_max <= 1, got p_min={self.p_min}, p_max={self.p_max}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")


def teacher_forcing_sequence(quantizer: MultiScaleQuantizer, feats: torch.Tensor, cfec: Optional[CFECConfig] = None,
                             generator: Optional[torch.Generator] = None) -> dict:
    """Inputs and labels of every video token for one teacher-forced pass (papers.md 2.5 algorithm).

    feats: the tokenizer's continuous latent, [B, T, d, H, W].
    Returns inputs [B, L, d] (Eq. 6; frame 0 scale 1 rows are zeros, the model puts <SOS> there),
    labels uint8 [B, L, d] (the bits of the residual left by the possibly CORRUPTED reconstruction:
    self-correcting targets), and flip_p [B, T, K] (the drawn flip probabilities; 0 without CFEC).
    Without CFEC (or enabled=False) this is plain teacher forcing on the clean tokens.
    """
    cfec = cfec if cfec is not None and cfec.enabled else None
    B, T, d, H, W = feats.shape
    K = quantizer.num_scales
    dev = feats.device
    inputs, labels = [], []
    flip_p = torch.zeros(B, T, K, device=dev)
    f_prev = None
    p_last = None
    for t in range(T):
        f = feats[:, t]
        f_hat = torch.zeros_like(f)
        clean_hat = torch.zeros_like(f)
        for k in range(K):
            # the input of (t, k): the reconstruction so far (frame start: the previous frame's)
            if k == 0:
                inp = torch.zeros(B, d, *quantizer.scales[0], device=dev) if t == 0 else quantizer.next_input(f_prev, 0)
            else:
                inp = quantizer.next_input(f_hat, k)
            inputs.append(inp.flatten(2).transpose(1, 2))
            target = f - (f_hat if (cfec is None or cfec.requantize) else clean_hat)
            bits = quantizer.quantize_scale(target, k).tokens  # [B, h, w, d]
            labels.append(bits.reshape(B, -1, d))
            used = bits
            if cfec is not None:
                shift = cfec.delta * t if cfec.time_dependent else 0.0
                hi = torch.full((B,), cfec.p_max + shift, device=dev)
                lo = torch.full((B,), cfec.p_min + shift, device=dev)
                if cfec.inherit and k == 0 and t > 0:
                    lo = torch.minimum(p_last, hi)
                p = lo + (hi - lo) * uniform((B,), generator, dev)
                flip_p[:, t, k] = p
                used = flip_bits(bits, p.view(B, 1, 1, 1), generator)
                if k == K - 1:
                    p_last = p
                if not cfec.requantize:
                    clean_hat = quantizer.accumulate(clean_hat, quantizer.tokens_to_code(bits, k), k)
            f_hat = quantizer.accumulate(f_hat, quantizer.tokens_to_code(used, k), k)
        f_prev = f_hat
    return {"inputs": torch.cat(inputs, dim=1), "labels": torch.cat(labels, dim=1), "flip_p": flip_p}


# ------------------------------------------------------------------------------------------ losses


def scale_token_weights(scales: Sequence[tuple[int, int]], num_frames: int, mode: str = "uniform") -> torch.Tensor:
    """Per-token loss weights [L] summing to 1: 'uniform' or Infinity's sqrt(H_K W_K) / sqrt(h_k w_k)."""
    hk, wk = scales[-1]
    parts = []
    for h, w in scales:
        if mode == "uniform":
            v = 1.0
        elif mode == "infinity":
            v = (hk * wk) ** 0.5 / (h * w) ** 0.5
        else:
            raise ValueError(f"model.scale_weighting must be 'uniform' or 'infinity', got {mode!r}")
        parts.append(torch.full((h * w,), v))
    wts = torch.cat(parts).repeat(num_frames)
    return wts / wts.sum()


def bitwise_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bit cross-entropy, mean over bits, weighted over tokens; returns (loss, per-token CE [B, L])."""
    ce = F.cross_entropy(logits.float().reshape(-1, 2), labels.reshape(-1).long(), reduction="none")
    per_token = ce.view(labels.shape).mean(-1)  # [B, L]
    return (per_token * weights.to(per_token.device)).sum(-1).mean(), per_token


# ------------------------------------------------------------------------ sampling and guidance


def sample_bits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample each bit from its 2 logits [..., 2] with temperature and top-k / top-p; uint8 [...]."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1).to(torch.uint8)
    probs = torch.softmax(logits / temperature, dim=-1)
    if 0.0 < top_p < 1.0:
        # nucleus over 2 outcomes: keep the likelier bit alone once it already covers top_p
        top = probs.max(dim=-1, keepdim=True).values
        keep = (probs == top) | (top < top_p)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    u = uniform(probs.shape[:-1], generator, probs.device)
    return (u < probs[..., 1]).to(torch.uint8)


@dataclass
class GuidanceSchedule:
    """Temporal-spatial classifier-free guidance gamma(t, k).

    The first scale of frame t gets `first_start -> first_end` linearly over frames; inside a frame
    gamma then moves linearly to `final` at the last scale (UCF-101 in VideoAR: 1 -> 5, then -> 10;
    text-to-video: decreasing, e.g. 5 -> 3 -> 3).
    """

    first_start: float = 1.0
    first_end: float = 5.0
    final: float = 10.0

    @classmethod
    def constant(cls, g: float) -> "GuidanceSchedule":
        return cls(g, g, g)

    @property
    def is_identity(self) -> bool:
        return self.first_start == self.first_end == self.final == 1.0

    def __call__(self, t: int, k: int, num_frames: int, num_scales: int) -> float:
        a = t / max(1, num_frames - 1)
        g0 = self.first_start + (self.first_end - self.first_start) * a
        b = k / max(1, num_scales - 1)
        return g0 + (self.final - g0) * b


# ------------------------------------------------------------------------- old checkpoints


def upgrade_state_dict(state: dict, prefix: str = "") -> tuple[dict, dict[str, list[str]]]:
    """Map a pre-trunk VideoAR state dict (`blocks.i.*`, `norm.*`) onto today's names (`trunk.layers.i.*`,
    `trunk.norm.*`; the fused wqkv kept its layout); returns (new state, {new key: [old key]})."""
    if not any(k.startswith(f"{prefix}blocks.") for k in state):
        return state, {k: [k] for k in state}
    renames = [(f"{prefix}blocks.", f"{prefix}trunk.layers."), (f"{prefix}norm.", f"{prefix}trunk.norm.")]
    new = {rename_prefix(k, renames): v for k, v in state.items()}
    return new, {rename_prefix(k, renames): [k] for k in state}
