"""ERNIE 5.0: one autoregressive ultra-sparse MoE over text, image, video and audio tokens, on the shared trunk.

Shapes: B batch rows, S tokens per packed row, C model dim, V text vocabulary (BPE ids + the boundary
tokens), d bits per visual token, T' latent frames, (H, W) the visual latent grid, K scales,
F audio frames, Q audio code levels, G codebook size.

**One sequence, one id space** (papers.md 4.1-4.3). Every position of a packed row has a `kind`:
    text       a BPE id or a boundary token (BOI/EOI, BOV/EOV, BOA/EOA, SEP: ids V_bpe .. V_bpe + 6)
    vis_und    an understanding token of an image / video: the visual tokenizer's continuous
               (pre-quantization) latent, 2x2 patches of one latent frame merged by the attention-based
               patch merger (K = 4 per token; a latent frame already spans 4 video frames, so this is
               the paper's K = 16 for video); with `vit_layers` > 0 the merger also takes the 2x2
               patches of a ViT over the pixels (the dual-path hybrid representation, 2K slots)
    vis_gen    a next-frame-and-scale token: VideoAR's input (the accumulated reconstruction of the
               earlier scales, downsampled; <SOS> for the first scale of the first frame) through
               `word_embed`, plus a scale embedding; it predicts the d bits of its own position
    audio      one audio frame: the sum of its Q code embeddings, e = sum_j Emb_j(c_j)
    speaker    (TTS, `speaker=True`) one vector for the voice of a reference clip of the same speaker:
               the mean over its frames of the same additive code embedding, through `speaker_enc`
               (an MLP); it conditions audio generation from the document's first position
so the id space is: text ids [0, V), visual bit vectors {0,1}^d, audio codes [0, G) per level;
`modality` (text / image / video / audio) and `task` travel with the batch for losses and routing
statistics only: the network never reads them (the router sees the hidden state alone).

Layouts of the seven tasks (`DocumentBuilder`):
    text        T .. T EOS
    image_und   BOI I .. I EOI SEP T .. T EOS        (I: understanding tokens, one bidirectional span)
    image_gen   T .. T BOI S1 .. SK EOI EOS          (Sk: scale k's block of generation tokens)
    video_und   BOV I .. I EOV SEP T .. T EOS
    video_gen   T .. T BOV F1S1 .. F1SK F2S1 .. EOV EOS
    audio_und   BOA A .. A EOA SEP T .. T EOS
    audio_gen   T .. T BOA A .. A EOA EOS          (with speakers: SPK T .. T BOA A .. A EOA EOS)
Attention (`block_ids` per token, `models.layers.mask.AttentionMask.blocks`): causal for text and
audio (one block per token), bidirectional inside an understanding span (one block), block-causal
over the (frame, scale) blocks of a generation span; never across packed documents (`doc_ids`).

Uni-RoPE positions (t, h, w): text and audio tokens sit at (p, p, p) with p a running index; a
visual span starting at p puts frame f at t = p + f and a scale-k cell (i, j) at the centre of its
area on the final latent grid, h = p + (i + 0.5) H / h_k - 0.5 (likewise w; understanding tokens
are 2x2 cells of that grid); the index after a span is 1 + the ceiling of its largest coordinate.

Heads (next-group-of-tokens prediction, papers.md 4.3 / 4.9):
    text   NTP from the final hidden state, plus one DeepSeek-V3 MTP module: a one-block trunk over
           W [norm(h_i); norm(x_{i+1})] predicting token i + 2 with the shared output head
    vision VideoAR's bitwise head (2 logits per bit) on the final hidden state
    audio  NCP: level j (0-based) is read from the raw output of layer L - Q + j, plus the
           embeddings of the target frame's codes of levels < j (teacher forcing; the sampled codes
           at inference), through a per-level norm and head. [I] The feedback enters the head's
           input, not the residual stream of the later layers, so every token runs the same trunk
           forward (KV caches and FSDP see one ordinary pass).

Read top to bottom: ids and the document builder; config and presets; the patch merger; the
network (embedding, forward, heads); KV-cached any-to-any generation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import config_from_dict
from models.layers.elastic import RoutingLimit
from models.layers.mask import AttentionMask
from models.layers.positions import sequence_positions
from models.layers.trunk import Trunk, TrunkConfig
from models.moe.layer import MoEConfig
from models.tokenizers.multiscale import parse_scales

__all__ = ["BOUNDARY_TOKENS", "SPAN_TOKENS", "DocumentBuilder", "Ernie5", "Ernie5Config", "Ernie5Output", "KINDS", "MODALITIES",
           "PRESETS", "TASKS", "UnifiedBatch", "VisualSpans", "AudioSpans", "merge_patches"]

BOUNDARY_TOKENS = ("<boi>", "<eoi>", "<bov>", "<eov>", "<boa>", "<eoa>", "<sep>")
SPAN_TOKENS = {"image": ("<boi>", "<eoi>"), "video": ("<bov>", "<eov>"), "audio": ("<boa>", "<eoa>")}  # open, close
KINDS = {"pad": -1, "text": 0, "vis_und": 1, "vis_gen": 2, "audio": 3, "speaker": 4}
MODALITIES = ("text", "image", "video", "audio")
TASKS = ("text", "image_und", "image_gen", "video_und", "video_gen", "audio_und", "audio_gen")
IGNORE = -100


# ----------------------------------------------------------------------------------- batch layout


@dataclass
class VisualSpans:
    """Visual spans of one task in a batch (all with the same number of latent frames).

    latents: [n, T', d, H, W] the visual tokenizer's continuous latents (encode_features).
    dest: [n, N] int64 flat indices (row * S + position) of the span's tokens, in layout order.
    pixels: understanding spans only, [n, T, H_px, W_px, 3] uint8, the frames the latents encode (the
        ViT branch's input; None when the data has none).
    """

    task: str
    latents: torch.Tensor
    dest: torch.Tensor
    pixels: Optional[torch.Tensor] = None

    def to(self, device) -> "VisualSpans":
        return VisualSpans(self.task, self.latents.to(device), self.dest.to(device),
                           None if self.pixels is None else self.pixels.to(device))


@dataclass
class AudioSpans:
    """Audio spans of one task: codes [n, F, Q] int64; dest [n, F] flat indices of the frames' tokens
    (frame j is predicted at dest[:, j] - 1: the BOA token for frame 0, the previous frame otherwise)."""

    task: str
    codes: torch.Tensor
    dest: torch.Tensor

    def to(self, device) -> "AudioSpans":
        return AudioSpans(self.task, self.codes.to(device), self.dest.to(device))


@dataclass
class UnifiedBatch:
    """One batch of packed multimodal rows (the DataModule's output, the network's input).

    ids [B, S] int64: text / boundary ids (0 at media and pad positions).
    kind [B, S] int64: KINDS (pad -1).  modality / task [B, S] int64: indices into MODALITIES / TASKS
        (-1 at pads): statistics and losses only, never a network input.
    positions [B, S, 3] float: Uni-RoPE (t, h, w).  block_ids / doc_ids [B, S] int64: the mask.
    text_targets / mtp_targets [B, S] int64: the token at i + 1 / i + 2 (IGNORE where there is none).
    vis_und / vis_gen / audio: the media spans, grouped by task.
    speakers: the speaker tokens' reference clips (AudioSpans with dest [n, 1]; conditioning, no target).
    """

    ids: torch.Tensor
    kind: torch.Tensor
    modality: torch.Tensor
    task: torch.Tensor
    positions: torch.Tensor
    block_ids: torch.Tensor
    doc_ids: torch.Tensor
    text_targets: torch.Tensor
    mtp_targets: torch.Tensor
    vis_und: list = field(default_factory=list)
    vis_gen: list = field(default_factory=list)
    audio: list = field(default_factory=list)
    speakers: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device) -> "UnifiedBatch":
        t = {k: getattr(self, k).to(device) for k in ("ids", "kind", "modality", "task", "positions", "block_ids",
                                                         "doc_ids", "text_targets", "mtp_targets")}
        return UnifiedBatch(**t, vis_und=[s.to(device) for s in self.vis_und],
                            vis_gen=[s.to(device) for s in self.vis_gen], audio=[s.to(device) for s in self.audio],
                            speakers=[s.to(device) for s in self.speakers])

    def frame_ids(self) -> tuple[torch.Tensor, int]:
        """([B, S] frame id of every visual-generation token, -1 elsewhere; F the number of frames).

        Ids count the batch's generated frames in span order (a span's tokens are in layout order:
        frame-major), so the frames of different documents in one row never share an id and
        `frame_keep` [B, F, F] addresses every (query frame, key frame) pair of a document."""
        B, S = self.ids.shape
        out = torch.full((B * S,), -1, dtype=torch.long, device=self.ids.device)
        count = 0
        for spans in self.vis_gen:
            n, T = spans.latents.shape[:2]
            N = spans.dest.shape[1]
            local = torch.arange(N, device=out.device) // (N // T)  # [N] frame within the span
            base = count + T * torch.arange(n, device=out.device)[:, None]
            out[spans.dest.reshape(-1)] = (base + local).reshape(-1)
            count += n * T
        return out.view(B, S), count

    def mask(self, frame_keep: Optional[torch.Tensor] = None, frame_window: Optional[int] = None) -> AttentionMask:
        """Block-causal within documents; with `frame_keep` [B, F, F] (F from `frame_ids()`) and/or
        `frame_window`, VideoAR's Random Frame Mask / windowed temporal attention over generated frames."""
        if frame_keep is None and frame_window is None:
            return AttentionMask.blocks(self.block_ids, doc_ids=self.doc_ids)
        frames, _ = self.frame_ids()
        return AttentionMask.blocks(self.block_ids, doc_ids=self.doc_ids, frame_ids=frames, frame_keep=frame_keep,
                                    frame_window=frame_window)


def und_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """The understanding tokens' grid of one latent frame: 2x2 cells of the latent grid."""
    H, W = grid
    if H % 2 or W % 2:
        raise ValueError(f"the visual latent grid {grid} must be even to merge 2x2 patches")
    return H // 2, W // 2


class DocumentBuilder:
    """Builds one document's per-token arrays (kind, ids, positions, blocks) piece by piece.

    Pieces: `text(ids)`, `understanding(frames)` (a bidirectional span of merged tokens),
    `generation(frames)` (next-frame-and-scale blocks), `audio(frames)`. Positions follow Uni-RoPE
    (module docstring). `finish()` returns the arrays and each media span's token offsets.
    """

    def __init__(self, modality: int, task: int, scales: Sequence[tuple[int, int]]) -> None:
        self.modality, self.task = modality, task
        self.scales = [tuple(s) for s in scales]
        self.grid = self.scales[-1]
        self.ids: list[int] = []
        self.kind: list[int] = []
        self.pos: list[torch.Tensor] = []
        self.block: list[int] = []
        self.spans: list[tuple[str, int, int]] = []  # (kind, first token, number of tokens)
        self.p = 0.0  # next running position
        self.b = 0  # next block id

    def __len__(self) -> int:
        return len(self.ids)

    def _add(self, kind: str, ids: Sequence[int], pos: torch.Tensor, blocks: Sequence[int]) -> None:
        self.ids.extend(int(i) for i in ids)
        self.kind.extend([KINDS[kind]] * len(ids))
        self.pos.append(pos.to(torch.float64))
        self.block.extend(blocks)

    def text(self, ids: Sequence[int]) -> "DocumentBuilder":
        n = len(ids)
        idx = self.p + torch.arange(n, dtype=torch.float64)
        self._add("text", ids, idx[:, None].expand(n, 3), range(self.b, self.b + n))
        self.p += n
        self.b += n
        return self

    def audio(self, frames: int) -> "DocumentBuilder":
        start = len(self.ids)
        idx = self.p + torch.arange(frames, dtype=torch.float64)
        self._add("audio", [0] * frames, idx[:, None].expand(frames, 3), range(self.b, self.b + frames))
        self.spans.append(("audio", start, frames))
        self.p += frames
        self.b += frames
        return self

    def speaker(self) -> "DocumentBuilder":
        """One speaker token (its embedding comes from a reference clip): a causal position like text."""
        start = len(self.ids)
        self._add("speaker", [0], torch.full((1, 3), self.p, dtype=torch.float64), [self.b])
        self.spans.append(("speaker", start, 1))
        self.p += 1
        self.b += 1
        return self

    def understanding(self, frames: int) -> "DocumentBuilder":
        h, w = und_grid(self.grid)
        pos = sequence_positions(0, [(h, w)], frames, "raw")
        # cell centres of the merged 2x2 cells on the latent grid (the generation tokens' frame)
        pos[:, 1:] = (pos[:, 1:] + 0.5) * 2 - 0.5
        start = len(self.ids)
        n = pos.shape[0]
        self._add("vis_und", [0] * n, pos + self.p, [self.b] * n)
        self.spans.append(("vis_und", start, n))
        self.p += math.ceil(float(pos.max())) + 1
        self.b += 1
        return self

    def generation(self, frames: int) -> "DocumentBuilder":
        pos = sequence_positions(0, self.scales, frames, "center")
        blocks = []
        for f in range(frames):
            for k, (h, w) in enumerate(self.scales):
                blocks.extend([self.b + f * len(self.scales) + k] * (h * w))
        start = len(self.ids)
        n = pos.shape[0]
        self._add("vis_gen", [0] * n, pos + self.p, blocks)
        self.spans.append(("vis_gen", start, n))
        self.p += math.ceil(float(pos.max())) + 1
        self.b += frames * len(self.scales)
        return self

    def finish(self) -> dict:
        """{'ids', 'kind', 'positions' [n, 3], 'block_ids', 'text_targets', 'mtp_targets', 'spans'}."""
        ids = torch.tensor(self.ids, dtype=torch.long)
        kind = torch.tensor(self.kind, dtype=torch.long)
        text = kind == KINDS["text"]
        nxt = torch.full_like(ids, IGNORE)
        both = text[:-1] & text[1:]
        nxt[:-1] = torch.where(both, ids[1:], IGNORE)
        mtp = torch.full_like(ids, IGNORE)
        three = text[:-2] & text[1:-1] & text[2:]
        mtp[:-2] = torch.where(three, ids[2:], IGNORE)
        pos = torch.cat(self.pos) if self.pos else torch.zeros(0, 3, dtype=torch.float64)
        return {"ids": ids, "kind": kind, "positions": pos.float(), "block_ids": torch.tensor(self.block, dtype=torch.long),
                "text_targets": nxt, "mtp_targets": mtp, "spans": list(self.spans),
                "modality": torch.full_like(ids, self.modality), "task": torch.full_like(ids, self.task)}


# ----------------------------------------------------------------------------------------- config

# `tiny` for tests; `small` trains on CPU in tens of minutes; `base` is papers.md 4.9's small scale.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4,
                 moe=dict(num_experts=16, top_k=2, expert_hidden=32, num_shared=1, shared_hidden=64)),
    "small": dict(n_layers=6, d_model=192, n_heads=6,
                  moe=dict(num_experts=64, top_k=4, expert_hidden=64, num_shared=1, shared_hidden=256)),
    "base": dict(n_layers=12, d_model=512, n_heads=8,
                 moe=dict(num_experts=64, top_k=4, expert_hidden=256, num_shared=1, shared_hidden=1024)),
}

# the preset's MoE shape; routing (aux-loss-free bias, dropless, every layer sparse) is ERNIE 5.0's
_MOE_DEFAULTS = dict(aux_loss_coef=0.0, z_loss_coef=0.0, bias_balancing=True, bias_update_rate=1e-4,
                     capacity_factor=None)


@dataclass
class Ernie5Config(TrunkConfig):
    """Architecture of ERNIE 5.0: the trunk's fields plus the unified model's. Fields left `None` (or 0)
    come from `preset` or, for the tokenizer-given sizes, from the LightningModule.

    text_vocab: BPE ids + boundary tokens (0 = from the data).
    bits / scales: the visual tokenizer's code dim and scale schedule; latent_dim: its latent channels
        (= bits for a bitwise tokenizer).
    audio_levels / audio_codebook: the audio tokenizer's Q and G.
    merger_dim / merger_heads: the patch merger's width and heads (0 = d_model).
    vit_layers / vit_dim / vit_heads: the patch merger's ViT branch (papers.md 4.2), trained from
        scratch (no pretrained vision model offline): 0 layers = the CNN path only; vit_dim 0 = the
        merger's width. Its patches are tubelets of `time_stride` frames x `pixel_patch`^2 pixels, one
        per latent cell (both 0 = from the visual tokenizer: its temporal stride and spatial factor).
    mtp: one MTP module predicting t + 2; mtp_hidden: its dense FFN width (None = the trunk's rule).
    speaker: the TTS speaker embedding (`speaker_enc`; papers.md 4.3): None = from the data (on when
        its sounds have speakers, `data.speakers` > 0), false = none (checkpoints written before it).
    moe: MoEConfig fields over the preset's (None = the preset's); ERNIE 5.0's routing by default:
        aux-loss-free bias balancing at rate 1e-4, no auxiliary or z loss, dropless.
    rope_theta: 1e6 as in the paper; rope_split: fractions of rotated pairs for (t, h, w).
    """

    preset: str = "tiny"
    text_vocab: int = 0
    bits: int = 0
    latent_dim: int = 0
    scales: Optional[list] = None
    audio_levels: int = 0
    audio_codebook: int = 0
    merger_dim: int = 0
    merger_heads: int = 4
    vit_layers: int = 0
    vit_dim: int = 0
    vit_heads: int = 4
    pixel_patch: int = 0
    time_stride: int = 0
    mtp: bool = True
    mtp_hidden: Optional[int] = None
    max_frames: int = 16
    speaker: Optional[bool] = None
    ffn: str = "moe"
    moe: Any = None
    rope_theta: float = 1e6
    rope_split: Optional[list] = field(default_factory=lambda: [0.25, 0.375, 0.375])

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.net.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        preset = PRESETS[self.preset]
        for k, v in preset.items():
            if k != "moe" and getattr(self, k) is None:
                setattr(self, k, v)
        if not isinstance(self.moe, MoEConfig):  # an explicit MoEConfig is used as is
            given = {k: v for k, v in dict(self.moe or {}).items() if v is not None}
            try:
                self.moe = MoEConfig(**{**_MOE_DEFAULTS, **preset["moe"], **given})
            except (TypeError, ValueError) as e:
                raise ValueError(f"model.net.moe: {e}") from e
        try:
            self.validate_trunk()
        except ValueError as e:
            raise ValueError(f"model.net: {e}") from e
        if self.rope_split is None or len(self.rope_split) != 3:
            raise ValueError(f"model.net.rope_split must have 3 fractions (t, h, w), got {self.rope_split}")
        if self.scales is not None:
            try:
                self.scales = [list(s) for s in parse_scales(self.scales)]
            except ValueError as e:
                raise ValueError(f"model.net.scales: {e}") from e
        for key in ("text_vocab", "bits", "latent_dim", "audio_levels", "audio_codebook", "merger_dim", "vit_layers",
                    "vit_dim", "pixel_patch", "time_stride"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.net.{key} must be >= 0, got {getattr(self, key)}")
        if self.merger_heads < 1:
            raise ValueError(f"model.net.merger_heads must be >= 1, got {self.merger_heads}")
        if self.vit_layers and self.vit_heads < 1:
            raise ValueError(f"model.net.vit_heads must be >= 1, got {self.vit_heads}")
        if self.vit_layers and (self.vit_dim or self.merger_dim or self.d_model) % self.vit_heads:
            raise ValueError(f"model.net.vit_dim={self.vit_dim or self.merger_dim or self.d_model} is not divisible "
                             f"by vit_heads={self.vit_heads}")
        if self.ready and self.audio_levels > self.n_layers:
            raise ValueError(f"model.net.n_layers={self.n_layers} must be >= the audio code levels "
                             f"({self.audio_levels}): level j is read from layer L - Q + j")

    @property
    def ready(self) -> bool:
        return (self.text_vocab > 0 and self.bits > 0 and self.scales is not None and self.audio_levels > 0
                and self.audio_codebook > 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Ernie5Config":
        return config_from_dict(cls, d)


# ----------------------------------------------------------------------------------- patch merger


def merge_patches(latents: torch.Tensor) -> torch.Tensor:
    """[n, T', D, H, W] -> [n, T' * H/2 * W/2, 4, D]: the 2x2 patches of each latent frame, row-major
    over (frame, h, w) like `DocumentBuilder.understanding`, patch order (0,0) (0,1) (1,0) (1,1)."""
    n, T, D, H, W = latents.shape
    und_grid((H, W))
    x = latents.reshape(n, T, D, H // 2, 2, W // 2, 2)
    x = x.permute(0, 1, 3, 5, 4, 6, 2)  # n, T, h, w, 2, 2, D
    return x.reshape(n, T * (H // 2) * (W // 2), 4, D)


def _sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding [h * w, dim] (row-major), any grid size."""
    q = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32, device=device) / max(q, 1)))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    out = [f(c.reshape(-1, 1) * freq) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(out, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class PixelViT(nn.Module):
    """The patch merger's ViT branch, from scratch: pixels -> one feature per latent cell.

    A causal tubelet embedding (frame 0 alone, as the tokenizer encodes it; then `time_stride` frames
    per latent frame, zero frames padded in the past) cuts each latent frame's pixels into
    `patch`^2 tubelets aligned with the tokenizer's latent grid; a pre-norm transformer encoder
    attends among the tubelets of one latent frame (fixed 2D sine-cosine positions).
    """

    def __init__(self, dim: int, layers: int, heads: int, patch: int, time_stride: int) -> None:
        super().__init__()
        if patch < 1 or time_stride < 1:
            raise ValueError(f"the ViT branch needs the tokenizer's patch and time stride, got {patch}, {time_stride}")
        self.patch, self.tau = patch, time_stride
        self.embed = nn.Conv3d(3, dim, (time_stride, patch, patch), stride=(time_stride, patch, patch))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """pixels [n, T, H_px, W_px, 3] uint8 (or floats in [-1, 1]) -> features [n, T', D, H, W]."""
        x = pixels.float().div(127.5).sub(1.0) if not pixels.is_floating_point() else pixels
        x = x.to(self.embed.weight.dtype).permute(0, 4, 1, 2, 3)  # [n, 3, T, H, W]
        n, _, T = x.shape[:3]
        if T != 1 + self.tau * (latent_frames - 1):
            raise ValueError(f"{T} pixel frames do not make {latent_frames} latent frames at time stride {self.tau}")
        x = F.pad(x, (0, 0, 0, 0, self.tau - 1, 0))  # the first frame is its own tubelet
        x = self.embed(x)  # [n, D, T', H, W]
        D, Tl, H, W = x.shape[1:]
        x = x.permute(0, 2, 3, 4, 1).reshape(n * Tl, H * W, D) + _sincos_2d(H, W, D, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).view(n, Tl, H, W, D).permute(0, 1, 4, 2, 3)


class PatchMerger(nn.Module):
    """Attention-based patch merger (papers.md 4.2): project the K patch features of a token (and,
    with a ViT branch, its K ViT patch features: 2K slots), add a learned slot embedding, self-attend
    over the slots, mean-pool, map to the model width."""

    def __init__(self, in_dim: int, dim: int, heads: int, out_dim: int, slots: int = 4, vit_dim: int = 0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.net.merger_dim={dim} is not divisible by merger_heads={heads}")
        self.proj = nn.Linear(in_dim, dim)
        self.vit_proj = nn.Linear(vit_dim, dim) if vit_dim else None
        self.slot = nn.Parameter(torch.zeros(2 * slots if vit_dim else slots, dim))
        self.slots = slots
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, patches: torch.Tensor, vit: Optional[torch.Tensor] = None) -> torch.Tensor:
        """patches [n, N, K, D] (and vit [n, N, K, D_vit] with a ViT branch) -> tokens [n, N, C]."""
        n, N, K, _ = patches.shape
        x = self.proj(patches) + self.slot[:K]
        if self.vit_proj is not None:
            if vit is None:
                raise ValueError("the patch merger has a ViT branch (model.net.vit_layers > 0): understanding "
                                 "inputs need their pixels")
            x = torch.cat([x, self.vit_proj(vit) + self.slot[self.slots:self.slots + vit.shape[2]]], dim=2)
        x = x.reshape(n * N, x.shape[2], -1)
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.out(x.mean(dim=1)).view(n, N, -1)


# ---------------------------------------------------------------------------------------- network


@dataclass
class Ernie5Output:
    """Per-modality predictions at the positions that have targets (flat over the batch).

    text_logits [Nt, V] / text_targets [Nt]; mtp_logits [Nm, V] / mtp_targets [Nm];
    vis[task] = (bit logits [n, N, d, 2]) per generation group, in batch.vis_gen order;
    audio[task] = (per level logits [n, F, G] list, codes [n, F, Q]); routing: LayerRouting list;
    balance_loss: the trunk's auxiliary loss (plus 0 x the parameters of heads the batch did not use:
    every rank's backward then yields the same gradients); hidden: final hidden states [B, S, C].
    """

    text_logits: torch.Tensor
    text_targets: torch.Tensor
    mtp_logits: Optional[torch.Tensor]
    mtp_targets: Optional[torch.Tensor]
    vis: dict
    audio: dict
    routing: list
    balance_loss: torch.Tensor
    hidden: torch.Tensor


class Ernie5(nn.Module):
    """Embeddings of the four kinds of token, the shared trunk, and the text / MTP / visual / audio heads."""

    def __init__(self, cfg: Ernie5Config) -> None:
        super().__init__()
        if not cfg.ready:
            raise ValueError("Ernie5Config needs text_vocab, bits, scales, audio_levels and audio_codebook "
                             "(the LightningModule fills them from the tokenizers)")
        self.cfg = cfg
        C = cfg.d_model
        self.scales = [tuple(s) for s in cfg.scales]
        latent = cfg.latent_dim or cfg.bits
        self.tok_emb = nn.Embedding(cfg.text_vocab, C)
        self.audio_emb = nn.ModuleList(nn.Embedding(cfg.audio_codebook, C) for _ in range(cfg.audio_levels))
        self.word_embed = nn.Linear(cfg.bits, C)
        self.scale_emb = nn.Embedding(len(self.scales), C)
        self.sos = nn.Parameter(torch.zeros(C))
        md = cfg.merger_dim or C
        vd = (cfg.vit_dim or md) if cfg.vit_layers else 0
        self.merger = PatchMerger(latent, md, cfg.merger_heads, C, vit_dim=vd)
        self.vit = PixelViT(vd, cfg.vit_layers, cfg.vit_heads, cfg.pixel_patch, cfg.time_stride) if vd else None
        self.trunk = Trunk(cfg)
        self.lm_head = nn.Linear(C, cfg.text_vocab, bias=False)
        self.vis_head = nn.Linear(C, 2 * cfg.bits)
        self.audio_norm = nn.ModuleList(nn.RMSNorm(C, eps=cfg.norm_eps) for _ in range(cfg.audio_levels))
        self.audio_head = nn.ModuleList(nn.Linear(C, cfg.audio_codebook) for _ in range(cfg.audio_levels))
        self.speaker_enc = None
        if cfg.speaker:
            self.speaker_enc = nn.Sequential(nn.RMSNorm(C, eps=cfg.norm_eps), nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))
        self.mtp = None
        if cfg.mtp:
            mcfg = TrunkConfig(n_layers=1, d_model=C, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                               ffn_hidden=cfg.mtp_hidden, ffn="dense", norm_eps=cfg.norm_eps, init_std=cfg.init_std,
                               rope_theta=cfg.rope_theta, rope_split=cfg.rope_split, attn_impl=cfg.attn_impl)
            self.mtp = nn.ModuleDict({"norm_h": nn.RMSNorm(C, eps=cfg.norm_eps), "norm_e": nn.RMSNorm(C, eps=cfg.norm_eps),
                                      "proj": nn.Linear(2 * C, C, bias=False), "trunk": Trunk(mcfg)})
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        for m in (self.tok_emb, self.word_embed, self.scale_emb, self.lm_head, self.vis_head, *self.audio_emb,
                  *self.audio_head, self.merger.proj, self.merger.out):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.sos)
        nn.init.normal_(self.merger.slot, std=std)
        if self.speaker_enc is not None:
            for m in (self.speaker_enc[1], self.speaker_enc[3]):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        if self.merger.vit_proj is not None:
            nn.init.normal_(self.merger.vit_proj.weight, std=std)
            nn.init.zeros_(self.merger.vit_proj.bias)
        self.trunk.init_weights()
        if self.mtp is not None:
            nn.init.normal_(self.mtp["proj"].weight, std=std)
            self.mtp["trunk"].init_weights()

    def num_params(self) -> dict[str, int]:
        """Total parameters, and those one token activates (k routed experts per sparse layer)."""
        total = sum(p.numel() for p in self.parameters())
        trunk = self.trunk.num_params()
        return {"total": total, "activated": total - trunk["total"] + trunk["activated"]}

    @property
    def audio_layers(self) -> list[int]:
        """The trunk layer (0-based) whose output each audio code level is read from: L - Q + j."""
        return self.audio_layers_of(range(self.cfg.n_layers))

    def audio_layers_of(self, run: Sequence[int]) -> list[int]:
        """The layers audio level j reads in a model that runs `run` (ascending): the last Q of them.
        For the full model that is L - Q + j; an elastic sub-model of fewer layers reads its own last Q,
        as the same sub-model exported on its own would."""
        run, Q = list(run), self.cfg.audio_levels
        if len(run) < Q:
            raise ValueError(f"the {Q} audio code levels read the last {Q} layers run; the layer subset {run} "
                             f"has {len(run)}")
        return run[len(run) - Q:]

    # -- embedding ---------------------------------------------------------------------------------

    def scale_ids(self, frames: int, device=None) -> torch.Tensor:
        ids = torch.cat([torch.full((h * w,), k, dtype=torch.long) for k, (h, w) in enumerate(self.scales)])
        return ids.repeat(frames).to(device)

    def visual_gen_embed(self, inputs: torch.Tensor, frames: int) -> torch.Tensor:
        """Generation tokens [n, N, C] from VideoAR inputs [n, N, d] (frame 0 scale 1 rows -> <SOS>)."""
        x = self.word_embed(inputs) + self.scale_emb(self.scale_ids(frames, inputs.device))
        n0 = self.scales[0][0] * self.scales[0][1]
        sos = (self.sos + self.scale_emb.weight[0]).expand(x.shape[0], n0, -1)
        return torch.cat([sos, x[:, n0:]], dim=1)

    def audio_embed(self, codes: torch.Tensor, levels: Optional[int] = None) -> torch.Tensor:
        """sum_j Emb_j(c_j) over the first `levels` levels of codes [..., Q] -> [..., C]."""
        levels = self.cfg.audio_levels if levels is None else levels
        out = 0
        for j in range(levels):
            out = out + self.audio_emb[j](codes[..., j])
        return out

    def speaker_embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Speaker vectors [n, C] of reference clips' codes [n, F, Q]: the MLP over the mean additive code
        embedding (a clip-level summary: timbre, not content order)."""
        if self.speaker_enc is None:
            raise ValueError("the input has speaker tokens (data.speakers > 0) but the network was built without a "
                             "speaker embedding (model.net.speaker=false)")
        return self.speaker_enc(self.audio_embed(codes).mean(dim=-2))

    def und_embed(self, latents: torch.Tensor, pixels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Understanding tokens [n, N, C] of latents [n, T', D, H, W] (and their pixels
        [n, T, H_px, W_px, 3] for the ViT branch): the patch merger over 2x2 patches."""
        vit = None
        if self.vit is not None:
            if pixels is None:
                raise ValueError("model.net.vit_layers > 0: understanding inputs need their pixels (the data gives "
                                 "them; a prompt piece is ('vis_und', (latents, pixels)))")
            vit = merge_patches(self.vit(pixels, latents.shape[1]))
        return self.merger(merge_patches(latents), vit)

    def embed(self, batch: UnifiedBatch, vis_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Input embeddings [B, S, C]: text ids, then every media span scattered to its positions.

        vis_inputs: per batch.vis_gen group, the teacher-forced VideoAR inputs [n, N, d].
        """
        B, S = batch.ids.shape
        x = self.tok_emb(batch.ids * (batch.kind == KINDS["text"]))
        x = x * (batch.kind == KINDS["text"]).unsqueeze(-1).to(x.dtype)  # media / pad rows start at zero
        flat = x.reshape(B * S, -1)
        parts_idx, parts_val = [], []
        for spans in batch.vis_und:
            parts_idx.append(spans.dest.reshape(-1))
            parts_val.append(self.und_embed(spans.latents.to(x.dtype), spans.pixels).reshape(-1, x.shape[-1]))
        for spans, inputs in zip(batch.vis_gen, vis_inputs):
            parts_idx.append(spans.dest.reshape(-1))
            frames = spans.latents.shape[1]
            parts_val.append(self.visual_gen_embed(inputs.to(x.dtype), frames).reshape(-1, x.shape[-1]))
        for spans in batch.audio:
            parts_idx.append(spans.dest.reshape(-1))
            parts_val.append(self.audio_embed(spans.codes).reshape(-1, x.shape[-1]))
        for spans in batch.speakers:
            parts_idx.append(spans.dest.reshape(-1))
            parts_val.append(self.speaker_embed(spans.codes))
        if parts_idx:
            flat = flat.index_put((torch.cat(parts_idx),), torch.cat(parts_val).to(flat.dtype), accumulate=True)
        return flat.view(B, S, -1)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, batch: UnifiedBatch, vis_inputs: Sequence[torch.Tensor] = (),
                layers: Optional[Sequence[int]] = None, routing: Optional[RoutingLimit] = None,
                mtp: bool = True, frame_keep: Optional[torch.Tensor] = None,
                frame_window: Optional[int] = None) -> Ernie5Output:
        """Teacher-forced predictions of every target in the batch (see `Ernie5Output`).

        layers / routing: an elastic sub-model (layer subset, RoutingLimit); audio level j reads the
        j-th of the last Q layers it runs (L - Q + j for the full model), so it needs at least Q layers.
        frame_keep [B, F, F] / frame_window: the Random Frame Mask and temporal window over the batch's
        generated video frames (`UnifiedBatch.mask`).
        """
        x = self.embed(batch, vis_inputs)
        B, S, C = x.shape
        run = list(range(self.cfg.n_layers)) if layers is None else sorted(int(i) for i in layers)
        audio_layers = self.audio_layers_of(run) if batch.audio else []
        want = sorted(set(audio_layers) | ({run[-1]} if self.mtp is not None and mtp else set()))
        mask = batch.mask(frame_keep, frame_window)
        out = self.trunk(x, batch.positions, mask, layers=layers, return_hidden=want, routing=routing)
        hidden = out.hidden
        flat = hidden.reshape(B * S, C)

        tt = batch.text_targets.reshape(-1)
        sel = (tt != IGNORE).nonzero().squeeze(-1)
        text_logits = self.lm_head(flat[sel])
        text_targets = tt[sel]

        mtp_logits = mtp_targets = None
        if self.mtp is not None and mtp:
            mt = batch.mtp_targets.reshape(-1)
            msel = (mt != IGNORE).nonzero().squeeze(-1)
            mtp_targets = mt[msel]
            if msel.numel():
                h = out.hidden_states[run[-1]]
                nxt = torch.cat([x[:, 1:], x.new_zeros(B, 1, C)], dim=1)
                m = self.mtp["proj"](torch.cat([self.mtp["norm_h"](h), self.mtp["norm_e"](nxt)], dim=-1))
                hm = self.mtp["trunk"](m, batch.positions, mask).hidden
                mtp_logits = self.lm_head(hm.reshape(B * S, C)[msel])
            else:
                mtp_logits = flat.new_zeros(0, self.cfg.text_vocab)

        vis = {}
        for spans in batch.vis_gen:
            h = flat[spans.dest.reshape(-1)]
            vis[spans.task] = self.vis_head(h).view(*spans.dest.shape, self.cfg.bits, 2)

        audio = {}
        for spans in batch.audio:
            src = (spans.dest - 1).reshape(-1)
            codes = spans.codes.reshape(-1, self.cfg.audio_levels)
            logits = []
            for j, layer in enumerate(audio_layers):
                h = out.hidden_states[layer].reshape(B * S, C)[src]
                if j:
                    h = h + self.audio_embed(codes, j)
                logits.append(self.audio_head[j](self.audio_norm[j](h)).view(*spans.dest.shape, -1))
            audio[spans.task] = (logits, spans.codes)
        # heads / embeddings this batch did not use join the graph at weight 0, so that every rank's
        # backward produces the same gradients (FSDP2 reduce-scatters and DDP all-reduces match)
        unused = []
        if not batch.vis_und:
            unused.append(self.merger)
            if self.vit is not None:
                unused.append(self.vit)
        if not batch.vis_gen:
            unused += [self.word_embed, self.scale_emb, self.vis_head]
        if not batch.audio:
            unused += [self.audio_emb, self.audio_norm, self.audio_head]
        if self.speaker_enc is not None and not batch.speakers:
            unused.append(self.speaker_enc)
        if self.mtp is not None and (not mtp or mtp_targets is None or not mtp_targets.numel()):
            unused.append(self.mtp)
        balance = out.balance_loss
        if unused:
            touch = sum(p.sum() for m in unused for p in m.parameters())
            if not batch.vis_gen:
                touch = touch + self.sos.sum()
            balance = balance + 0.0 * touch
        return Ernie5Output(text_logits, text_targets, mtp_logits, mtp_targets, vis, audio, out.routing,
                            balance, hidden)

    # -- generation --------------------------------------------------------------------------------

    def embed_document(self, pieces: Sequence[tuple[str, Any]]) -> tuple[torch.Tensor, "_Stream"]:
        """Embed one prompt document from pieces ('text', ids) / ('vis_und', latents [T', D, H, W], or
        (latents, pixels [T, H_px, W_px, 3]) for the ViT branch) / ('audio', codes [F, Q]) / ('speaker', a
        reference clip's codes [F, Q]); returns
        (x [1, T, C], a stream positioned after it, not yet fed)."""
        b = DocumentBuilder(0, 0, self.scales)
        dev = self.sos.device
        embs = []
        for kind, val in pieces:
            if kind == "text":
                ids = torch.as_tensor(list(val), dtype=torch.long, device=dev)
                b.text(ids.tolist())
                embs.append(self.tok_emb(ids))
            elif kind == "vis_und":
                lat, pix = val if isinstance(val, (tuple, list)) else (val, None)
                b.understanding(lat.shape[0])
                embs.append(self.und_embed(lat[None].to(dev, self.sos.dtype), None if pix is None else pix[None].to(dev))[0])
            elif kind == "audio":
                b.audio(val.shape[0])
                embs.append(self.audio_embed(val.to(dev)))
            elif kind == "speaker":
                b.speaker()
                embs.append(self.speaker_embed(val[None].to(dev)))
            else:
                raise ValueError(f"prompt pieces are 'text', 'vis_und', 'audio' or 'speaker', got {kind!r}")
        d = b.finish()
        return torch.cat(embs)[None], _Stream(self, d["positions"].to(dev), d["block_ids"].to(dev), b.p, b.b)

    def _text_logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_last).float()

    @torch.no_grad()
    def generate_text(self, prompt: Sequence[tuple[str, Any]], max_new_tokens: int, stop_ids: Sequence[int] = (),
                      temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                      generator: Optional[torch.Generator] = None, use_cache: bool = True,
                      return_logprobs: bool = False):
        """Text continuation of a prompt document (text, or media then SEP: captioning); stops after
        a token of `stop_ids` (included) or max_new_tokens. return_logprobs: (ids, [n] log-probs of
        each sampled token under softmax(logits / temperature), the full softmax at temperature 0):
        the rollout's log-probs of RL."""
        from models.transformer import sample_next

        x, stream = self.embed_document(prompt)
        stream.open(x.shape[1] + max_new_tokens, use_cache)
        h = stream.feed(x, stream.prompt_pos, stream.prompt_blocks).hidden[:, -1]
        out: list[int] = []
        logps: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = self._text_logits(h)
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(int(tok))
            if return_logprobs:
                logps.append(torch.log_softmax(logits / (temperature or 1.0), -1).reshape(-1)[int(tok)])
            if int(tok) in stop_ids:
                break
            h = stream.feed(self.tok_emb(tok)[:, None], *stream.next_text(1)).hidden[:, -1]
        if return_logprobs:
            return out, (torch.stack(logps) if logps else x.new_zeros(0))
        return out

    @torch.no_grad()
    def generate_visual(self, quantizer, prompt: Sequence[tuple[str, Any]], frames: int,
                        uncond_prompt: Optional[Sequence[tuple[str, Any]]] = None, guidance=None,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                        generator: Optional[torch.Generator] = None, use_cache: bool = True,
                        frame_window: Optional[int] = None) -> list[torch.Tensor]:
        """Caption -> image (frames=1) / video: bits per scale [1, frames, h_k, w_k, d], one forward per
        (frame, scale) block. prompt ends with BOI / BOV. guidance: classifier-free guidance, a number
        or a `models.videoar.GuidanceSchedule`, applied with `uncond_prompt` (e.g. BOI alone).
        frame_window: a frame attends to at most this many earlier frames (the prompt always), as a
        model trained with the Random Frame Mask's window saw; None = every earlier frame."""
        if frame_window is not None and frame_window < 1:
            raise ValueError(f"frame_window must be >= 1 or None, got {frame_window}")
        from models.videoar import GuidanceSchedule, sample_bits

        sched = guidance if isinstance(guidance, GuidanceSchedule) else GuidanceSchedule.constant(float(guidance or 1.0))
        cfg_on = not sched.is_identity
        if cfg_on and uncond_prompt is None:
            raise ValueError("classifier-free guidance needs an unconditional prompt")
        n_vis = frames * sum(h * w for h, w in self.scales)
        streams = []
        for p in ([prompt, uncond_prompt] if cfg_on else [prompt]):
            x, s = self.embed_document(p)
            s.open(x.shape[1] + n_vis, use_cache)
            s.window = frame_window
            s.feed(x, s.prompt_pos, s.prompt_blocks)
            streams.append(s)
        pos = sequence_positions(0, self.scales, frames, "center").to(self.sos.device)
        # a quantizer of fewer bits than the network (a progressive-switching stage) feeds zero-padded
        # inputs and samples the first d of the head's bits
        d, K, D = int(quantizer.cfg.dim), len(self.scales), self.cfg.bits
        if d > D:
            raise ValueError(f"the quantizer has {d} bits, the network {D}")
        dev = self.sos.device
        grid = self.scales[-1]
        tokens = [torch.zeros(1, frames, h, w, d, dtype=torch.uint8, device=dev) for h, w in self.scales]
        off = 0
        f_prev = None
        for t in range(frames):
            f_hat = torch.zeros(1, d, *grid, device=dev)
            for k, (h, w) in enumerate(self.scales):
                L = h * w
                if t == 0 and k == 0:
                    x = (self.sos + self.scale_emb.weight[0]).expand(1, L, -1)
                else:
                    src = f_prev if k == 0 else f_hat
                    feat = quantizer.next_input(src, k).flatten(2).transpose(1, 2)
                    if d < D:
                        feat = F.pad(feat, (0, D - d))
                    x = self.word_embed(feat.to(self.sos.dtype)) + self.scale_emb.weight[k]
                logits = []
                for s in streams:
                    hid = s.feed(x, pos[off:off + L] + s.p, torch.full((L,), s.b, device=dev),
                                 frames=torch.full((L,), t, device=dev)).hidden
                    logits.append(self.vis_head(hid).view(1, L, D, 2)[:, :, :d].float())
                lg = logits[0]
                if cfg_on:
                    g = sched(t, k, frames, K)
                    lg = logits[1] + g * (logits[0] - logits[1])
                bits = sample_bits(lg, temperature, top_k, top_p, generator)
                tokens[k][:, t] = bits.view(1, h, w, d)
                f_hat = quantizer.accumulate(f_hat, quantizer.tokens_to_code(bits.view(1, h, w, d), k), k)
                for s in streams:
                    s.b += 1
                off += L
            f_prev = f_hat
        return tokens

    @torch.no_grad()
    def generate_audio(self, prompt: Sequence[tuple[str, Any]], frames: int, temperature: float = 1.0,
                       top_k: Optional[int] = None, top_p: Optional[float] = None,
                       generator: Optional[torch.Generator] = None, use_cache: bool = True) -> torch.Tensor:
        """Description -> audio codes [1, frames, Q] (prompt ends with BOA): next-codec prediction, level
        j from layer L - Q + j plus the embeddings of the codes already sampled for this frame."""
        from models.transformer import sample_next

        x, stream = self.embed_document(prompt)
        stream.open(x.shape[1] + frames, use_cache)
        layers = self.audio_layers
        out = stream.feed(x, stream.prompt_pos, stream.prompt_blocks, return_hidden=layers)
        codes = []
        for f in range(frames):
            frame = torch.zeros(1, self.cfg.audio_levels, dtype=torch.long, device=x.device)
            for j, layer in enumerate(layers):
                h = out.hidden_states[layer][:, -1]
                if j:
                    h = h + self.audio_embed(frame, j)
                lg = self.audio_head[j](self.audio_norm[j](h)).float()
                frame[:, j] = sample_next(lg, temperature, top_k, top_p, generator)
            codes.append(frame)
            if f + 1 < frames:
                out = stream.feed(self.audio_embed(frame)[:, None], *stream.next_text(1), return_hidden=layers)
        return torch.stack(codes, dim=1)


class _Stream:
    """One sequence being generated: its KV cache (or, uncached, everything fed so far, re-run each
    time under the block mask: the slow reference), next Uni-RoPE index `p` and next block id `b`.
    `window`: the temporal window over generated frames (None = none)."""

    def __init__(self, net: Ernie5, prompt_pos: torch.Tensor, prompt_blocks: torch.Tensor, p: float, b: int) -> None:
        self.net, self.prompt_pos, self.prompt_blocks, self.p, self.b = net, prompt_pos, prompt_blocks, p, b
        self.cache = None
        self.use_cache = True
        self.window: Optional[int] = None
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.ids: list[tuple[torch.Tensor, torch.Tensor]] = []  # (block ids, frame ids) of every token fed

    def open(self, max_len: int, use_cache: bool = True) -> None:
        self.use_cache = use_cache
        if use_cache:
            self.cache = self.net.trunk.new_cache(1, max_len)

    def next_text(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and blocks of n causal tokens (text or audio frames) at the current index."""
        dev = self.prompt_pos.device
        idx = self.p + torch.arange(n, dtype=torch.float32, device=dev)
        blocks = self.b + torch.arange(n, device=dev)
        self.p += n
        self.b += n
        return idx[:, None].expand(n, 3), blocks

    def feed(self, x: torch.Tensor, pos: torch.Tensor, blocks: torch.Tensor, return_hidden: Sequence[int] = (),
             frames: Optional[torch.Tensor] = None):
        """Run x [1, T, C] (positions [T, 3], block ids [T], generated-frame ids [T] or None) after
        everything fed before."""
        trunk = self.net.trunk
        self.ids.append((blocks, torch.full_like(blocks, -1) if frames is None else frames))
        windowed = None
        if self.window is not None and frames is not None and int(frames.max()) > self.window:
            # a frame past the window: the mask over every token fed (cached keys included)
            bs, fs = (torch.cat([i[j] for i in self.ids]) for j in range(2))
            windowed = AttentionMask.blocks(bs[None], frame_ids=fs[None], frame_window=self.window)
        if self.use_cache:
            first = self.cache[0].length == 0
            mask = windowed or (AttentionMask.blocks(blocks[None]) if first else AttentionMask.full())
            return trunk(x, pos, mask, self.cache, return_hidden=return_hidden)
        self.seen.append((x, pos, blocks))
        xs, ps, bs = (torch.cat([s[i] for s in self.seen], dim=1 if i == 0 else 0) for i in range(3))
        out = trunk(xs, ps, windowed or AttentionMask.blocks(bs[None]), return_hidden=return_hidden)
        T = x.shape[1]
        out.hidden = out.hidden[:, -T:]
        out.hidden_states = {k: v[:, -T:] for k, v in out.hidden_states.items()}
        return out
