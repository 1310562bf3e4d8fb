"""VideoAR: next-scale prediction inside a frame, next-frame prediction across frames (LLaMA-style).

Shapes: B batch, L tokens, C model dim, d bits per token (the tokenizer's code dim), T latent
frames, K scales, (h_k, w_k) scale k's grid, n condition (prefix) tokens.

Sequence: [n condition tokens] [frame 0: scale 1 .. K] [frame 1: scale 1 .. K] ...
Input of frame t, scale k (Eq. 6): the reconstruction accumulated from scales < k of frame t,
downsampled to scale k's grid, through `word_embed` (d -> C), plus a learnable scale embedding s_k.
Scale 1 of frame 0 is the <SOS> embedding of the class; scale 1 of a later frame is the previous
frame's full accumulation downsampled to scale 1's grid. Each token predicts the d bits of its
own position of R_k (a bitwise head: 2 logits per bit). Attention is block-causal over
(frame, scale) blocks; positions are multi-scale temporal RoPE over (t, h, w).

Read top to bottom: config and presets, block, network, teacher-forced inputs (with cross-frame
error correction), losses, generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import config_from_dict

from models.layers.block_mask import block_causal_mask, block_layout
from models.layers.ffn import SwiGLU, swiglu_hidden
from models.layers.rope import apply_rotary
from models.layers.rope3d import MultiAxisRoPE, sequence_positions
from models.tokenizers.multiscale import MultiScaleQuantizer, flip_bits, parse_scales

__all__ = ["CFECConfig", "GuidanceSchedule", "PRESETS", "VideoAR", "VideoARConfig", "bitwise_loss",
           "scale_token_weights", "teacher_forcing_sequence"]

# `tiny` for tests; `small` trains on CPU in minutes; `base` is VideoAR-L (24 layers, 1536 wide).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4),
    "small": dict(n_layers=4, d_model=192, n_heads=6),
    "base": dict(n_layers=24, d_model=1536, n_heads=12),
}


@dataclass
class VideoARConfig:
    """Architecture of the VideoAR decoder. Fields left `None` come from `preset`.

    bits / scales / num_classes: 0 or None = taken from the tokenizer / data by the LightningModule.
    cond_len: condition tokens |Psi| (a class is embedded into cond_len tokens).
    cond_dropout: probability a training clip's class is replaced by the null class (for CFG).
    rope: 'mst' (multi-scale temporal RoPE, (t+n, h+n, w+n)) or '1d' (sequence-index RoPE, the
        ablation baseline); rope_split: fractions of the rotated pairs for (t, h, w).
    """

    preset: str = "tiny"
    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    ffn_hidden: Optional[int] = None
    bits: int = 0
    scales: Optional[list] = None
    num_classes: int = 0
    cond_len: int = 1
    cond_dropout: float = 0.1
    max_frames: int = 64
    rope: str = "mst"
    rope_split: list = field(default_factory=lambda: [0.25, 0.375, 0.375])
    rope_theta: float = 10000.0
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.net.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for k, v in PRESETS[self.preset].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model.net: d_model={self.d_model} must split into n_heads={self.n_heads} even-sized heads")
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden(self.d_model)
        if self.rope not in ("mst", "1d"):
            raise ValueError(f"model.net.rope must be 'mst' or '1d', got {self.rope!r}")
        if len(self.rope_split) != 3:
            raise ValueError(f"model.net.rope_split must have 3 fractions (t, h, w), got {self.rope_split}")
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


# ---------------------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, an explicit boolean mask and an append-only KV cache."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x_BLC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor] = None, cache: Optional[dict] = None) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        q, k, v = self.wqkv(x_BLC).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, cfg: VideoARConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# --------------------------------------------------------------------------------------- network


class VideoAR(nn.Module):
    """The VideoAR decoder: embeds scale inputs, runs block-causal attention, predicts bits."""

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
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(C, eps=cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.bits)
        self.rope = MultiAxisRoPE(C // cfg.n_heads, cfg.rope_split, cfg.rope_theta)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- sequence bookkeeping -----------------------------------------------------------------

    def positions(self, num_frames: int, device=None) -> torch.Tensor:
        layout = "raw" if self.cfg.rope == "mst" else "1d"
        return sequence_positions(self.cfg.cond_len, self.scales, num_frames, layout).to(device)

    def scale_ids(self, num_frames: int, device=None) -> torch.Tensor:
        ids = torch.cat([torch.full((h * w,), k, dtype=torch.long) for k, (h, w) in enumerate(self.scales)])
        return ids.repeat(num_frames).to(device)

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

    def _trunk(self, x: torch.Tensor, cos, sin, mask=None, caches=None) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, mask, None if caches is None else caches[i])
        return self.norm(x)

    def forward(self, feats_BLd: torch.Tensor, labels: torch.Tensor, num_frames: int,
                frame_keep: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
        """Teacher-forced bit logits [B, L_video, d, 2] (L_video = num_frames * tokens per frame).

        feats_BLd: the scale inputs (Eq. 6) of every video token; frame 0 scale 1 rows are ignored
            (replaced by <SOS>). frame_keep / window: the Random Frame Mask (see block_causal_mask).
        """
        if num_frames > self.cfg.max_frames:
            raise ValueError(f"{num_frames} latent frames exceed model.net.max_frames={self.cfg.max_frames}")
        n = self.cfg.cond_len
        x = self.embed(feats_BLd, labels, 0, num_frames, with_prefix=True)
        dev = x.device
        cos, sin = self.rope(self.positions(num_frames, dev))
        block, frame = block_layout(n, self.scales, num_frames, dev)
        mask = block_causal_mask(block, block, frame, frame, frame_keep, window)
        h = self._trunk(x, cos, sin, mask)
        return self.head(h[:, n:]).view(h.shape[0], -1, self.cfg.bits, 2)

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
        use_cache: False recomputes the whole prefix at every step (the slow reference).
        """
        B, dev = labels.shape[0], labels.device
        sched = guidance if isinstance(guidance, GuidanceSchedule) else GuidanceSchedule.constant(guidance or 1.0)
        cfg_on = not sched.is_identity
        lab = torch.cat([labels, torch.full_like(labels, self.null_class)]) if cfg_on else labels
        n, K = self.cfg.cond_len, self.K
        pos = self.positions(num_frames, dev)
        cos_all, sin_all = self.rope(pos)
        grid = self.scales[-1]
        d = self.cfg.bits
        given = 0 if prefix_tokens is None else prefix_tokens[0].shape[1]
        caches = [dict() for _ in self.blocks] if use_cache else None

        prefix_emb, sos = self.condition(lab)
        if use_cache:
            self._trunk(prefix_emb, cos_all[:n], sin_all[:n], None, caches)
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
                cos, sin = cos_all[offset:offset + L], sin_all[offset:offset + L]
                if use_cache:
                    hid = self._trunk(x, cos, sin, None, caches)
                else:
                    seq.append(x)
                    full = torch.cat(seq, dim=1)
                    blk, _ = block_layout(n, self.scales, num_frames, dev)
                    S = full.shape[1]
                    mask = block_causal_mask(blk[:S], blk[:S])
                    hid = self._trunk(full, cos_all[:S], sin_all[:S], mask)[:, -L:]
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
    u = torch.rand(probs.shape[:-1], generator=generator, device=probs.device)
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
                p = lo + (hi - lo) * torch.rand(B, generator=generator, device=dev)
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
