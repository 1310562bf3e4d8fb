"""Pure PyTorch networks. Nothing here imports Lightning or Hydra."""

from models.transformer import PRESETS, Transformer, TransformerConfig

__all__ = ["PRESETS", "Transformer", "TransformerConfig"]
