"""Decoder-only transformer language model (LLaMA-style), with KV-cached sampling.

Shapes: B batch, T time, C model dim, V vocabulary.
Read top to bottom: config and presets, block, model, generation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import CausalSelfAttention, LayerKVCache, RotaryEmbedding, SwiGLU, swiglu_hidden
from models.moe.dispatch import moe_forward, plan_dispatch
from models.moe.experts import GroupedExperts
from models.moe.layer import MoEConfig, MoELayer
from models.moe.moue import MoUEConfig, UniversalRouting

FFN_KINDS = ("dense", "moe", "moue")

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
    ffn_hidden: SwiGLU hidden size of dense FFNs; None gives LLaMA's rounded 8/3 * d_model.
    ffn: the FFN of every block: 'dense' (SwiGLU), 'moe' (per-layer experts, `moe`) or 'moue'
        (one expert pool shared by all layers, `moe` for the expert shape and `moue` for the pool).
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
    ffn: str = "dense"
    moe: MoEConfig = field(default_factory=MoEConfig)
    moue: MoUEConfig = field(default_factory=MoUEConfig)

    def __post_init__(self) -> None:
        for name, cls in (("moe", MoEConfig), ("moue", MoUEConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                try:
                    setattr(self, name, cls(**dict(value)))
                except TypeError as e:
                    raise ValueError(f"{name}: {e}") from e
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
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn={self.ffn!r} is not one of {list(FFN_KINDS)}")
        if self.ffn == "moue":
            self.moue.validate(self.n_layers)
            if self.moue.window * (self.moue.block_size or self.moe.num_experts) < self.moe.top_k:
                raise ValueError("moue.window * block_size must be >= moe.top_k (a layer needs k candidates)")

    @property
    def pool_blocks(self) -> int:
        return self.moue.num_blocks or self.n_layers

    @property
    def pool_size(self) -> int:
        return self.pool_blocks * (self.moue.block_size or self.moe.num_experts)

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


@dataclass
class LayerRouting:
    """What one sparse layer reports: its losses (with grad) and detached statistics."""

    loss: torch.Tensor         # balance + z-loss of this layer (coefficients applied); 0 for MoUE (pooled)
    counts: torch.Tensor       # [E] kept pairs per expert (E = N_U for MoUE)
    probs_mean: torch.Tensor   # [E] mean gate probability (with grad for MoUE: UELB needs it)
    dropped: torch.Tensor      # dropped pairs
    num_pairs: int
    entropy: torch.Tensor
    z_loss: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)). The FFN is dense, MoE or MoUE.

    A MoUE block owns no experts: the pool and router live on the model and are passed in.
    """

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.layer, self.kind = layer, cfg.ffn
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dropout)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = None
        if cfg.ffn == "dense":
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        elif cfg.ffn == "moe":
            self.ffn = MoELayer(cfg.d_model, cfg.moe)
        self.shared = None
        if cfg.ffn == "moue" and cfg.moe.num_shared:
            self.shared = SwiGLU(cfg.d_model, cfg.moe.num_shared * (cfg.moe.shared_hidden or cfg.moe.expert_hidden))
        self.capacity_factor = cfg.moe.capacity_factor
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BTC,
        cos,
        sin,
        cache: LayerKVCache | None = None,
        start_pos: int = 0,
        routing: UniversalRouting | None = None,
        pool: GroupedExperts | None = None,
        state_NS: torch.Tensor | None = None,
        pool_views: tuple[list, list] | None = None,
    ):
        """Returns (x, trajectory state, LayerRouting or None)."""
        x_BTC = x_BTC + self.resid_drop(self.attn(self.attn_norm(x_BTC), cos, sin, cache, start_pos))
        h = self.ffn_norm(x_BTC)
        if self.kind == "dense":
            return x_BTC + self.resid_drop(self.ffn(h)), state_NS, None
        if self.kind == "moe":
            y, aux = self.ffn(h)
            info = LayerRouting(aux.aux_loss + aux.z_loss, aux.counts, aux.probs_mean, aux.dropped, aux.num_pairs, aux.entropy, aux.z_loss)
            return x_BTC + self.resid_drop(y), state_NS, info
        B, T, C = h.shape
        h_NC = h.reshape(B * T, C)
        if state_NS is None:
            state_NS = routing.init_state(h_NC)
        out = routing.route(self.layer, h_NC, state_NS)
        if pool_views is None:
            y, plan = moe_forward(h_NC, out, pool, self.capacity_factor)
            counts = plan.counts
        else:
            # Dispatch among this layer's candidates only, with per-expert views of the pool: the
            # backward then touches just the experts this layer used.
            cand = routing.candidates[self.layer]
            local = routing.local_index[self.layer][out.topk_idx]
            plan = plan_dispatch(local, out.topk_weight, len(cand), self.capacity_factor)
            w13s, w2s = pool_views
            y = pool.forward_routed_subset(
                h_NC, plan.token_idx, plan.weight, plan.counts, [w13s[e] for e in cand], [w2s[e] for e in cand]
            )
            # the candidate list is host-side: no device sync (unlike nonzero() on the mask)
            cand_idx = torch.as_tensor(cand, dtype=torch.long, device=plan.counts.device)
            counts = plan.counts.new_zeros(pool.num_experts).index_copy_(0, cand_idx, plan.counts)
        if self.shared is not None:
            y = y + self.shared(h_NC)
        state_NS = routing.next_state(self.layer, state_NS, out.topk_idx, out.topk_weight)
        probs = out.probs
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean().detach()
        finite = torch.where(torch.isfinite(out.logits), out.logits, torch.full_like(out.logits, -1e30))
        z = torch.logsumexp(finite, dim=-1).pow(2).mean()
        info = LayerRouting(
            torch.zeros((), device=h.device), counts.detach(), probs.mean(0), plan.dropped.detach(),
            out.topk_idx.numel(), entropy, z,
        )
        return x_BTC + self.resid_drop(y.view(B, T, C)), state_NS, info


class Transformer(nn.Module):
    """Token embedding -> blocks -> final norm -> LM head."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("TransformerConfig.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.pool = self.routing = None
        if cfg.ffn == "moue":
            # Owned by the model, not by a block: FSDP2 shards the pool once, with the root.
            self.pool = GroupedExperts(cfg.pool_size, cfg.d_model, cfg.moe.expert_hidden, impl=cfg.moe.impl)
            self.routing = UniversalRouting(
                cfg.n_layers, cfg.d_model, cfg.pool_size, cfg.pool_blocks, cfg.moe.top_k, cfg.moue,
                router_kwargs=dict(gate=cfg.moe.gate, renormalize=cfg.moe.renormalize, noise_std=cfg.moe.noise_std,
                                   bias_balancing=cfg.moe.bias_balancing, bias_update_rate=cfg.moe.bias_update_rate),
            )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style: N(0, std), output projections scaled down by depth; routing extras at 0."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.startswith("routing.") and not name.startswith("routing.routers."):
                # trajectory signatures, depth embeddings, block bias, GRU: start neutral
                if name.endswith("block_bias"):
                    p.copy_(self.routing._initial_block_bias(self.cfg.moue.block_bias_init))
                elif "state_norm" in name:
                    nn.init.ones_(p)
                elif ".gru." not in name:
                    nn.init.zeros_(p)
                continue
            if p.dim() == 1:  # norm gains
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", ".w2")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        self.rope.reset_parameters()

    def num_params(self) -> dict[str, int]:
        """Total parameters, and those one token activates (experts counted k per sparse layer).

        A pool expert used by several layers is one tensor (counted once in `total`) but runs once
        per use, so `activated` counts the k experts of every layer, like an MoE's.
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        activated = total
        k, L = self.cfg.moe.top_k, self.cfg.n_layers
        if self.cfg.ffn == "moe":
            for layer in self.layers:
                per_expert = layer.ffn.experts.num_params_per_expert()
                activated -= (layer.ffn.experts.w13.shape[0] - k) * per_expert
        elif self.cfg.ffn == "moue":
            per_expert = self.pool.num_params_per_expert()
            activated += (L * k - self.cfg.pool_size) * per_expert
        return {"total": total, "activated": activated}

    def forward(
        self,
        tokens_BT: torch.Tensor,
        cache: list[LayerKVCache] | None = None,
        start_pos: int = 0,
        return_routing: bool = False,
    ):
        """Logits [B, T, V]; with `return_routing`, also (balance loss, per-layer LayerRouting list).

        With `cache`, tokens sit at positions start_pos.. and keys are kept.
        """
        T = tokens_BT.shape[1]
        cos, sin = self.rope(start_pos, T)
        x = self.drop(self.tok_emb(tokens_BT))
        state, infos = None, []
        views = None
        if self.pool is not None:
            # choose_impl judges work per expert over the whole pool; a layer spreads its pairs over
            # only window/num_blocks of it, hence the scaling.
            pairs = tokens_BT.numel() * self.cfg.moe.top_k * self.routing.num_blocks // self.routing.window
            if x.device.type == "cpu" and self.pool.choose_impl(pairs, x.device, x.dtype) == "loop":
                # one unbind per forward: every layer takes its window's experts from these views
                views = (self.pool.w13.unbind(0), self.pool.w2.unbind(0))
        for i, layer in enumerate(self.layers):
            x, state, info = layer(
                x, cos, sin, None if cache is None else cache[i], start_pos, self.routing, self.pool, state, views
            )
            if info is not None:
                infos.append(info)
        logits = self.lm_head(self.norm(x))
        if not return_routing:
            return logits
        return logits, self.balance_loss(infos), infos

    def balance_loss(self, infos: list[LayerRouting]) -> torch.Tensor:
        """Sparse models' auxiliary loss (coefficients applied), averaged over layers; 0 if dense."""
        if not infos:
            return self.tok_emb.weight.new_zeros(())
        if self.cfg.ffn == "moe":
            return torch.stack([i.loss for i in infos]).mean()
        moe = self.cfg.moe
        f = torch.stack([i.counts.float() / i.num_pairs for i in infos])
        P = torch.stack([i.probs_mean for i in infos])
        loss = moe.z_loss_coef * torch.stack([i.z_loss for i in infos]).mean()
        if moe.aux_loss_coef:
            loss = loss + moe.aux_loss_coef * self.routing.balance_loss(f, P)
        return loss

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
