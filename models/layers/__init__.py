"""Reusable building blocks: attention, rotary embeddings, feed-forward layers."""

from models.layers.attention import CausalSelfAttention, LayerKVCache
from models.layers.ffn import SwiGLU, swiglu_hidden
from models.layers.rope import RotaryEmbedding, apply_rotary

__all__ = ["CausalSelfAttention", "LayerKVCache", "RotaryEmbedding", "SwiGLU", "apply_rotary", "swiglu_hidden"]
