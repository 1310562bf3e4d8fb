"""Training-time schedules and monitors. They set documented knobs on the module; no model math."""

from callbacks.checkpoint import ModelCheckpoint

__all__ = ["ModelCheckpoint"]
