"""Decoder-only transformer language model (LLaMA-style) on the shared trunk, with KV-cached sampling.

Shapes: B batch, T time, C model dim, V vocabulary.
Read top to bottom: config and presets, the network (token embedding -> trunk -> LM head),
generation, the loss, and the key map that loads checkpoints written before the trunk existed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import config_from_dict
from models.layers.attention import LayerKVCache
from models.layers.elastic import RoutingLimit
from models.layers.trunk import FFN_KINDS, Trunk, TrunkConfig, rename_prefix
from models.random import multinomial

__all__ = ["FFN_KINDS", "PRESETS", "Transformer", "TransformerConfig", "distill_loss", "lm_loss", "sample_next",
           "upgrade_state_dict"]

# Named sizes. `tiny` is for tests, `small` trains on a CPU in minutes, `base` is GPT-2-small sized.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4),
    "small": dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=8),
    "base": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12),
}


@dataclass
class TransformerConfig(TrunkConfig):
    """Architecture of the decoder: the trunk's fields (`TrunkConfig`) plus the LM's. Fields left `None`
    are filled from `preset`.

    vocab_size: 0 means "ask the tokenizer"; the LightningModule fills it before building.
    max_seq_len: the longest sequence (prompt + generation) the model accepts.
    """

    preset: str = "tiny"
    vocab_size: int = 0
    max_seq_len: int = 1024
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate_trunk()
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")
        if self.rope_split is not None:
            raise ValueError("rope_split must be null for the LM (its positions are 1-D)")

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        return config_from_dict(cls, d, "TransformerConfig")

    def to_dict(self) -> dict:
        return asdict(self)


class Transformer(nn.Module):
    """Token embedding -> trunk -> LM head (tied to the embedding by default)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("TransformerConfig.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.trunk = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.tok_emb.weight, 0.0, self.cfg.init_std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, self.cfg.init_std)
        self.trunk.init_weights()

    def num_params(self, layers: Optional[Sequence[int]] = None, routing: Optional[RoutingLimit] = None) -> dict[str, int]:
        """Total parameters, and those one token activates (experts counted k per sparse layer);
        with layers / routing, those of that elastic sub-model standing alone."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        full = self.trunk.num_params()
        trunk = self.trunk.num_params(layers, routing)
        total -= full["total"] - trunk["total"]
        return {"total": total, "activated": total - trunk["total"] + trunk["activated"]}

    def forward(
        self,
        tokens_BT: torch.Tensor,
        cache: list[LayerKVCache] | None = None,
        start_pos: Optional[int] = None,
        return_routing: bool = False,
        layers: Optional[Sequence[int]] = None,
        routing: Optional[RoutingLimit] = None,
    ):
        """Logits [B, T, V]; with `return_routing`, also (balance loss, per-layer LayerRouting list).

        With `cache`, the tokens sit at positions start_pos.. (default: after what the cache holds;
        keys from start_pos on are overwritten). layers / routing: an elastic sub-model (the trunk
        layers to run, default all; the experts each may route to and its top-k, default all / k).
        """
        T = tokens_BT.shape[1]
        start = 0
        if cache is not None:
            start = cache[0].length if start_pos is None else int(start_pos)
            for c in cache:
                c.length = start
        elif start_pos:
            start = int(start_pos)
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"position {start + T} exceeds max_seq_len={self.cfg.max_seq_len}; raise model.net.max_seq_len")
        positions = torch.arange(start, start + T, device=tokens_BT.device)
        out = self.trunk(self.drop(self.tok_emb(tokens_BT)), positions, cache=cache, layers=layers, routing=routing)
        logits = self.lm_head(out.hidden)
        if not return_routing:
            return logits
        return logits, out.balance_loss, out.routing

    def new_cache(self, batch: int, max_len: int | None = None) -> list[LayerKVCache]:
        return self.trunk.new_cache(batch, max_len or self.cfg.max_seq_len)

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
        layers: Optional[Sequence[int]] = None,
        routing: Optional[RoutingLimit] = None,
    ) -> torch.Tensor:
        """Sample a continuation; returns prompt + new tokens [B, T + n].

        temperature 0 is greedy. After `eos_id` a row keeps emitting `eos_id`. layers / routing:
        decode with an elastic sub-model of this network (see `forward`).
        """
        sub = dict(layers=layers, routing=routing)
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
        logits = self(prompt_BT, cache, 0, **sub)[:, -1] if use_cache else None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(out, **sub)[:, -1]
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            if use_cache and out.shape[1] < prompt_BT.shape[1] + max_new_tokens:
                logits = self(nxt[:, None], cache, out.shape[1] - 1, **sub)[:, -1]
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
    return multinomial(probs, 1, generator).squeeze(-1)


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in float32."""
    return F.cross_entropy(
        logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1), ignore_index=ignore_index
    )


def distill_loss(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, targets_BT: Optional[torch.Tensor] = None,
                 ignore_index: int = -100) -> torch.Tensor:
    """KL(teacher || student) per token in float32, averaged over tokens (those with a target, if given);
    the teacher is detached: in-place distillation of an elastic sub-model from the full model."""
    log_s = student_BTV.float().log_softmax(-1)
    log_t = teacher_BTV.detach().float().log_softmax(-1)
    kl_BT = (log_t.exp() * (log_t - log_s)).sum(-1)
    if targets_BT is None:
        return kl_BT.mean()
    keep = (targets_BT != ignore_index).float()
    return (kl_BT * keep).sum() / keep.sum().clamp_min(1.0)


def upgrade_state_dict(state: dict, prefix: str = "") -> tuple[dict, dict[str, list[str]]]:
    """Map a pre-trunk LM state dict (`layers.i.*`, `pool.*`, `routing.*`, `norm.*`, split `wq` / `wkv`)
    onto today's names; returns (new state, {new key: [old keys]}). A current state dict comes back as is.

    The old split projections are concatenated into `wqkv` (rows q | k | v, the layout `wkv` already
    had for k | v); a MoUE block's shared experts move under its FFN.
    """
    if not any(k.startswith(f"{prefix}layers.") for k in state):
        return state, {k: [k] for k in state}
    renames = [(f"{prefix}pool.w13", f"{prefix}trunk.pool.experts.w13"), (f"{prefix}pool.w2", f"{prefix}trunk.pool.experts.w2"),
               (f"{prefix}routing.", f"{prefix}trunk.pool.routing."), (f"{prefix}norm.", f"{prefix}trunk.norm.")]
    out, sources = {}, {}
    for key, value in state.items():
        new = rename_prefix(key, renames)
        if key.startswith(f"{prefix}layers."):
            layer, rest = key[len(prefix) + len("layers."):].split(".", 1)
            if rest.startswith("shared."):
                rest = "ffn." + rest
            if rest in ("attn.wq.weight", "attn.wkv.weight"):
                rest = "attn.wqkv.weight"
            new = f"{prefix}trunk.layers.{layer}.{rest}"
        sources.setdefault(new, []).append(key)
    for new, olds in sources.items():
        olds.sort(key=lambda k: k.endswith("attn.wkv.weight"))  # q rows before k | v rows
        out[new] = state[olds[0]] if len(olds) == 1 else torch.cat([state[k] for k in olds], dim=0)
    return out, sources
