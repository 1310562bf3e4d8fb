"""Decoder-only transformer language model (LLaMA-style), with KV-cached sampling.

Shapes: B batch, T time, C model dim, V vocabulary.
Read top to bottom: config and presets, block, model, generation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import CausalSelfAttention, LayerKVCache, RotaryEmbedding, SwiGLU, swiglu_hidden

# Named sizes. `tiny` is for tests, `small` trains on a CPU in minutes, `base` is GPT-2-small sized.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4),
    "small": dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=8),
    "base": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12),
}


@dataclass
class TransformerConfig:
    """Architecture of the decoder. Fields left `None` are filled from `preset`.

    vocab_size: 0 means "ask the tokenizer"; the LightningModule fills it before building.
    ffn_hidden: SwiGLU hidden size; None gives LLaMA's rounded 8/3 * d_model.
    """

    preset: str = "tiny"
    vocab_size: int = 0
    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    ffn_hidden: Optional[int] = None
    max_seq_len: int = 1024
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden(self.d_model)
        for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even (rotary)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TransformerConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dropout)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTC, cos, sin, cache: LayerKVCache | None = None, start_pos: int = 0):
        x_BTC = x_BTC + self.resid_drop(self.attn(self.attn_norm(x_BTC), cos, sin, cache, start_pos))
        return x_BTC + self.resid_drop(self.ffn(self.ffn_norm(x_BTC)))


class Transformer(nn.Module):
    """Token embedding -> blocks -> final norm -> LM head."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("TransformerConfig.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style: N(0, std), output projections scaled down by depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm gains
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)
        self.rope.reset_parameters()

    def num_params(self) -> dict[str, int]:
        """Total and per-token activated parameter counts (equal for a dense model)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        return {"total": total, "activated": total}

    def forward(
        self,
        tokens_BT: torch.Tensor,
        cache: list[LayerKVCache] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, V]. With `cache`, tokens sit at positions start_pos.. and keys are kept."""
        T = tokens_BT.shape[1]
        cos, sin = self.rope(start_pos, T)
        x = self.drop(self.tok_emb(tokens_BT))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache[i], start_pos)
        return self.lm_head(self.norm(x))

    def new_cache(self, batch: int, max_len: int | None = None) -> list[LayerKVCache]:
        max_len = max_len or self.cfg.max_seq_len
        p = self.tok_emb.weight
        return [
            LayerKVCache.empty(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, p.device, p.dtype)
            for _ in self.layers
        ]

    @torch.no_grad()
    def generate(
        self,
        prompt_BT: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample a continuation; returns prompt + new tokens [B, T + n].

        temperature 0 is greedy. After `eos_id` a row keeps emitting `eos_id`.
        """
        if prompt_BT.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(
                f"prompt ({prompt_BT.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len={self.cfg.max_seq_len}"
            )
        was_training = self.training
        self.eval()
        out = prompt_BT
        done = torch.zeros(prompt_BT.shape[0], dtype=torch.bool, device=prompt_BT.device)
        cache = self.new_cache(prompt_BT.shape[0], prompt_BT.shape[1] + max_new_tokens) if use_cache else None
        logits = self(prompt_BT, cache, 0)[:, -1] if use_cache else None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(out)[:, -1]
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            if use_cache and out.shape[1] < prompt_BT.shape[1] + max_new_tokens:
                logits = self(nxt[:, None], cache, out.shape[1] - 1)[:, -1]
        self.train(was_training)
        return out


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits, with temperature, top-k and nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps at least one).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in float32."""
    return F.cross_entropy(
        logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1), ignore_index=ignore_index
    )
