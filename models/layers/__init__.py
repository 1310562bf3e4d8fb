"""The trunk every family shares: attention (described masks, 1-D or (t, h, w) rotary positions, KV cache,
segment memory), feed-forward layers, one block (dense | moe | moue FFN) and one stack of blocks."""

from models.layers.attention import Attention, LayerKVCache, attend
from models.layers.ffn import DenseFFN, SwiGLU, swiglu_hidden
from models.layers.mask import AttentionMask, MaskPlan
from models.layers.rope import Rotary, apply_rotary
from models.layers.trunk import Block, Trunk, TrunkConfig, TrunkOutput

__all__ = ["Attention", "AttentionMask", "Block", "DenseFFN", "LayerKVCache", "MaskPlan", "Rotary", "SwiGLU", "Trunk",
           "TrunkConfig", "TrunkOutput", "apply_rotary", "attend", "swiglu_hidden"]
