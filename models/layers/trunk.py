"""The one transformer trunk: a stack of pre-norm blocks (attention + dense | moe | moue FFN) and a final norm.

Every family (LM, VideoAR, ERNIE 3.0, ERNIE 5.0) composes it and adds only embeddings, heads and
generation. Shapes: B batch, T tokens, C model dim, L layers, M memory tokens, E experts.

Read top to bottom: the config (the fields every family's config inherits), one block, the trunk
(forward with any described mask, positions, KV cache, segment memory, a layer subset and chosen
hidden states), its losses / statistics, caches and initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from models.layers.attention import Attention, LayerKVCache
from models.layers.elastic import RoutingLimit
from models.layers.ffn import DenseFFN, swiglu_hidden
from models.layers.mask import AttentionMask, flex_available
from models.layers.rope import Rotary
from models.moe.layer import LayerRouting, MoEConfig, MoEFFN
from models.moe.moue import MoUEConfig, MoUEFFN, UniversalPool

__all__ = ["ATTN_IMPLS", "FFN_KINDS", "Block", "Trunk", "TrunkConfig", "TrunkOutput", "next_memory", "rename_prefix"]

FFN_KINDS = ("dense", "moe", "moue")
ATTN_IMPLS = ("auto", "segments", "sdpa", "flex", "flex_eager")


@dataclass
class TrunkConfig:
    """The trunk's fields; each family's config dataclass inherits them (and fills None from its presets).

    ffn: 'dense' (SwiGLU of ffn_hidden; None = LLaMA's 8/3 d rounded), 'moe' (per-layer experts,
        `moe`) or 'moue' (one pool shared by all layers: `moe` for the expert shape, `moue` for the pool).
    rope_split: None = 1-D rotary positions; three fractions (t, h, w) = three-axis positions.
    attn_impl: kernel for structured masks (models/layers/mask.py): 'auto' (FlexAttention on CUDA
        unless training with attention dropout, 'segments' elsewhere), 'segments' (unmasked SDPA per
        run of queries; dense masks where the rule needs one), 'sdpa' (dense boolean masks), 'flex'
        (compiled) or 'flex_eager' (slow; debugging). Plain causal masks always use SDPA's is_causal.
    """

    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    ffn_hidden: Optional[int] = None
    ffn: str = "dense"
    moe: MoEConfig = field(default_factory=MoEConfig)
    moue: MoUEConfig = field(default_factory=MoUEConfig)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    rope_theta: float = 10000.0
    rope_split: Optional[list] = None
    attn_impl: str = "auto"

    def __post_init__(self) -> None:
        self.validate_trunk()

    def validate_trunk(self) -> None:
        """Fill derived fields and check the trunk's fields (families call it after their presets)."""
        for name, cls in (("moe", MoEConfig), ("moue", MoUEConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                try:
                    setattr(self, name, cls(**dict(value)))
                except TypeError as e:
                    raise ValueError(f"{name}: {e}") from e
        for key in ("n_layers", "d_model", "n_heads"):
            if getattr(self, key) is None:
                raise ValueError(f"{key} must be set (or come from a preset)")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden(self.d_model)
        for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
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
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is not one of {list(ATTN_IMPLS)}")
        if self.rope_split is not None and len(self.rope_split) != 3:
            raise ValueError(f"rope_split must have 3 fractions (t, h, w) or be null, got {self.rope_split}")
        if self.ffn == "moue":
            self.moue.validate(self.n_layers)
            if self.moue.window * (self.moue.block_size or self.moe.num_experts) < self.moe.top_k:
                raise ValueError("moue.window * block_size must be >= moe.top_k (a layer needs k candidates)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def pool_blocks(self) -> int:
        return self.moue.num_blocks or self.n_layers

    @property
    def pool_size(self) -> int:
        return self.pool_blocks * (self.moue.block_size or self.moe.num_experts)


# ----------------------------------------------------------------------------------------- block


def make_ffn(cfg: TrunkConfig, layer: int, pool: Optional[UniversalPool] = None) -> nn.Module:
    """The FFN of block `layer`; every kind is called as ffn(h, state) -> (y, state, LayerRouting | None),
    `state` being the MoUE trajectory state (None for the others, passed through)."""
    if cfg.ffn == "dense":
        return DenseFFN(cfg.d_model, cfg.ffn_hidden)
    if cfg.ffn == "moe":
        return MoEFFN(cfg.d_model, cfg.moe, layer)
    return MoUEFFN(cfg.d_model, cfg.moe, layer, pool)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: TrunkConfig, layer: int, pool: Optional[UniversalPool] = None):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dropout)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = make_ffn(cfg, layer, pool)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTC, rope, plan, cache=None, memory_BMC=None, memory_rope=None, ffn_state=None, limit=None):
        """Returns (x, ffn_state, LayerRouting or None). memory_BMC: raw memory states (normalised
        here like x); ffn_state: the MoUE trajectory state, a tensor argument and result so that
        wrappers (FSDP2, activation checkpointing) see it; limit: this layer's elastic (expert mask,
        top_k), or None."""
        mem = None if memory_BMC is None else self.attn_norm(memory_BMC)
        x_BTC = x_BTC + self.drop(self.attn(self.attn_norm(x_BTC), rope, plan, cache, mem, memory_rope))
        y, ffn_state, info = self.ffn(self.ffn_norm(x_BTC), ffn_state, limit)
        return x_BTC + self.drop(y), ffn_state, info


# ----------------------------------------------------------------------------------------- trunk


@dataclass
class TrunkOutput:
    """hidden: final-normed output [B, T, C]; hidden_states: raw outputs of the requested layers;
    states: per layer that ran, its input or output (`return_states`), for segment memory;
    routing: one LayerRouting per sparse layer that ran; balance_loss: their weighted sum."""

    hidden: torch.Tensor
    hidden_states: dict[int, torch.Tensor]
    states: dict[int, torch.Tensor]
    routing: list[LayerRouting]
    balance_loss: torch.Tensor


def next_memory(previous: Optional[torch.Tensor], states: torch.Tensor, mem_len: int) -> torch.Tensor:
    """The next segment's memory of one layer: the last mem_len of [previous memory; new states], detached."""
    x = states.detach() if previous is None else torch.cat([previous, states.detach()], dim=1)
    return x[:, -mem_len:]


class Trunk(nn.Module):
    """Blocks + final norm; the MoUE pool (if any) is owned here, once, and shared by the blocks."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.cfg = cfg
        self.pool = UniversalPool(cfg.n_layers, cfg.d_model, cfg.moe, cfg.moue) if cfg.ffn == "moue" else None
        self.layers = nn.ModuleList(Block(cfg, i, self.pool) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.rope = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_split)

    # -- forward ----------------------------------------------------------------------------------

    def attn_impl(self, device: torch.device) -> str:
        impl = self.cfg.attn_impl
        if impl == "auto":
            # FlexAttention has no attention dropout: training with it falls back to per-run SDPA
            dropout = self.training and any(block.attn.dropout > 0 for block in self.layers)
            return "flex" if device.type == "cuda" and flex_available() and not dropout else "segments"
        return impl

    def forward(
        self,
        x_BTC: torch.Tensor,
        positions: torch.Tensor,
        mask: Optional[AttentionMask] = None,
        cache: Optional[list[LayerKVCache]] = None,
        memory: Optional[Sequence[Optional[torch.Tensor]]] = None,
        memory_positions: Optional[torch.Tensor] = None,
        layers: Optional[Sequence[int]] = None,
        return_hidden: Sequence[int] = (),
        return_states: Optional[str] = None,
        routing: Optional[RoutingLimit] = None,
    ) -> TrunkOutput:
        """Run the blocks over embedded tokens x.

        positions: rotary positions of the T tokens ([T] / [B, T], or [T, 3] / [B, T, 3]).
        mask: an AttentionMask over the sequence (cached past + these tokens); None = causal.
        cache: one LayerKVCache per layer (indexed by layer); these tokens follow what it holds.
        memory: per layer (indexed by layer) memory states [B, M, C] of the previous segment (no
            gradient flows into them) or None; memory_positions: their positions (default for 1-D
            positions: the M positions just before the segment's first).
        layers: indices of the layers to run, ascending (default all): elastic depth.
        return_hidden: layers whose raw output to return; return_states: 'inputs' | 'outputs' of
            every layer that ran (for the next segment's memory) or None.
        routing: elastic width / sparsity (`RoutingLimit`: experts each layer may route to, top-k);
            with `layers`, this is how an elastic sub-model runs inside the full one.
        """
        run = list(range(len(self.layers))) if layers is None else [int(i) for i in layers]
        if any(b <= a for a, b in zip(run, run[1:])) or (run and not 0 <= run[0] <= run[-1] < len(self.layers)):
            raise ValueError(f"layers must be ascending indices in [0, {len(self.layers)}), got {list(layers)}")
        missing = sorted(set(return_hidden) - set(run))
        if missing:
            raise ValueError(f"return_hidden asks for layers {missing} that do not run ({run})")
        if return_states not in (None, "inputs", "outputs"):
            raise ValueError(f"return_states must be None, 'inputs' or 'outputs', got {return_states!r}")
        T = x_BTC.shape[1]
        past = cache[run[0]].length if cache is not None and run else 0
        mem_len = _memory_length(memory, run)
        mask = AttentionMask() if mask is None else mask
        plan = mask.plan(T, past + T, mem_len, self.attn_impl(x_BTC.device), x_BTC.device)
        rope = self.rope(positions)
        mem_rope = None
        if mem_len:
            if memory_positions is None:
                if self.rope.axes != 1:
                    raise ValueError("memory_positions must be given for (t, h, w) positions")
                first = positions[..., :1]
                memory_positions = first - mem_len + torch.arange(mem_len, device=first.device, dtype=first.dtype)
            mem_rope = self.rope(memory_positions)
        if routing is not None and routing.is_full:
            routing = None
        if routing is not None:
            self.check_routing(routing)
        E = self.num_experts
        state = self.pool.begin(x_BTC) if self.pool is not None else None
        hidden_states, states, infos = {}, {}, []
        x = x_BTC
        for i in run:
            if return_states == "inputs":
                states[i] = x
            mem = None if memory is None else memory[i]
            limit = None if routing is None else routing.for_layer(i, E, x.device)
            x, state, info = self.layers[i](x, rope, plan, None if cache is None else cache[i], mem, mem_rope, state, limit)
            if info is not None:
                infos.append(info)
            if i in return_hidden:
                hidden_states[i] = x
            if return_states == "outputs":
                states[i] = x
        return TrunkOutput(self.norm(x), hidden_states, states, infos, self.balance_loss(infos))

    # -- losses, statistics, knobs ----------------------------------------------------------------

    def balance_loss(self, infos: list[LayerRouting]) -> torch.Tensor:
        """Sparse layers' auxiliary loss (coefficients applied), averaged over the layers that ran; 0 if dense."""
        if not infos:
            return self.norm.weight.new_zeros(())
        loss = torch.stack([i.loss for i in infos]).mean()
        moe = self.cfg.moe
        if self.pool is not None and moe.aux_loss_coef:
            f = torch.stack([i.counts.float() / i.num_pairs for i in infos])
            P = torch.stack([i.probs_mean for i in infos])
            loss = loss + moe.aux_loss_coef * self.pool.routing.balance_loss(f, P, [i.layer for i in infos])
        return loss

    @torch.no_grad()
    def update_router_bias(self, counts_LE: torch.Tensor) -> None:
        """Aux-loss-free balancing step from the routed counts [L, E] accumulated since the last one."""
        if not self.cfg.moe.bias_balancing:
            return
        if self.pool is not None:
            load = self.pool.routing.bias_load(counts_LE)
            for router in self.pool.routing.routers:
                router.update_bias(load)
        elif self.cfg.ffn == "moe":
            for layer, c in zip(self.layers, counts_LE):
                layer.ffn.router.update_bias(c)

    def check_routing(self, routing: RoutingLimit) -> None:
        """Raise unless every layer can route top_k tokens within the experts `routing` keeps."""
        if self.cfg.ffn == "dense":
            raise ValueError("elastic width / top-k needs a sparse FFN (model.net.ffn=moe|moue); this trunk is dense")
        cand = self.pool.routing.candidates if self.pool is not None else None
        routing.check(self.cfg.n_layers, self.num_experts, self.cfg.moe.top_k, cand)

    @property
    def num_experts(self) -> int:
        """Experts per routing distribution (the pool size for MoUE; 0 if dense)."""
        if self.pool is not None:
            return self.pool.num_experts
        return self.cfg.moe.num_experts if self.cfg.ffn == "moe" else 0

    def routing_topology(self) -> Optional[dict]:
        """MoUE only: {'allowed': [L, E] bool candidate sets, 'pi': [E] expected share, 'window': W}."""
        if self.pool is None:
            return None
        r = self.pool.routing
        return {"allowed": r.allowed, "pi": r.pi, "window": r.window}

    @property
    def moue_window(self) -> Optional[int]:
        return None if self.pool is None else self.pool.routing.window

    def set_moue_window(self, window: int) -> None:
        if self.pool is None:
            raise AttributeError("moue_window is only defined for ffn=moue")
        self.pool.routing.set_window(int(window))

    def num_params(self, layers: Optional[Sequence[int]] = None, routing: Optional[RoutingLimit] = None) -> dict[str, int]:
        """Trunk parameters: total, and those one token activates (k experts per sparse layer).

        With `layers` / `routing` (an elastic sub-model): what that sub-model would hold and activate
        standing alone (layers dropped, experts outside `routing.kept` removed, its top_k).

        A pool expert used by several layers is one tensor (counted once in `total`) but runs once
        per use, so `activated` counts the k experts of every layer, like an MoE's.
        """
        run = range(self.cfg.n_layers) if layers is None else [int(i) for i in layers]
        routing = routing or RoutingLimit()
        k = self.cfg.moe.top_k if routing.top_k is None else int(routing.top_k)
        total = sum(p.numel() for p in self.parameters())
        total -= sum(p.numel() for i, b in enumerate(self.layers) if i not in run for p in b.parameters())
        E = self.num_experts
        kept = [range(E) if routing.kept is None else routing.kept[i] for i in range(self.cfg.n_layers)]
        if self.cfg.ffn == "moe":
            activated = total
            for i in run:
                experts = self.layers[i].ffn.experts
                per_expert, dropped = experts.num_params_per_expert(), E - len(kept[i])
                total -= dropped * (per_expert + self.cfg.d_model)  # the expert and its router row
                activated -= dropped * (per_expert + self.cfg.d_model) + (len(kept[i]) - k) * per_expert
        elif self.pool is not None:
            per_expert = self.pool.experts.num_params_per_expert()
            cand = self.pool.routing.candidates
            used = set(range(E))  # the whole pool, unless a sub-model leaves experts unreachable
            if layers is not None or routing.kept is not None:
                used = set().union(*(set(cand[i]) & set(kept[i]) for i in run))
            total -= (E - len(used)) * per_expert
            activated = total + (len(run) * k - len(used)) * per_expert
        else:
            activated = total
        return {"total": total, "activated": activated}

    # -- caches, initialisation, compilation ------------------------------------------------------

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> list[LayerKVCache]:
        p = self.norm.weight
        return [LayerKVCache.empty(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, device or p.device,
                                   dtype or p.dtype) for _ in self.layers]

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style: N(0, std) everywhere, output projections (attention wo, FFN w2) at std / sqrt(2 L)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.layers:
            block.attn.init_weights(std, out_std)
            block.ffn.init_weights(std, out_std)
            nn.init.ones_(block.attn_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
        if self.pool is not None:
            self.pool.init_weights(std, out_std)
        nn.init.ones_(self.norm.weight)
        self.rope.reset_parameters()

    def compile_blocks(self, **kwargs) -> None:
        """Regional compilation: `torch.compile` each block in place (parameter names unchanged)."""
        for block in self.layers:
            block.compile(**kwargs)


def _memory_length(memory, run: list[int]) -> int:
    if memory is None:
        return 0
    lengths = {memory[i].shape[1] for i in run if memory[i] is not None}
    if len(lengths) > 1:
        raise ValueError(f"memory states of different lengths {sorted(lengths)}: every layer keeps mem_len")
    if lengths and any(memory[i] is None for i in run):
        raise ValueError("memory is given for some layers but not others")
    return lengths.pop() if lengths else 0


def rename_prefix(key: str, renames: Sequence[tuple[str, str]]) -> str:
    """`key` with the first matching old prefix replaced by its new one (for old-checkpoint key maps)."""
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key
