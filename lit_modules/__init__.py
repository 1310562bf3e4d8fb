"""LightningModules: one per training recipe. They own losses, optimisation, logging, sampling."""

from lit_modules.lm import LanguageModelModule

__all__ = ["LanguageModelModule"]
