"""A callback for the expert-parallel training test: each rank writes, at the end of fit, its routers'
aux-loss-free biases and the local shape of each layer's expert weights (ep_rank{R}.json)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class EPRecorder(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    grad_norms: dict | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """The first step's per-parameter gradient norms (before clipping), of the whole tensors."""
        if self.grad_norms is not None:
            return
        self.grad_norms = {}
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                self.grad_norms[name] = g.norm().item()

    def on_train_end(self, trainer, pl_module) -> None:
        trunk = pl_module.trunk
        record = {"step": trainer.global_step, "grad_norms": self.grad_norms, "bias": [], "w13_local": [], "w13_global": []}
        for layer in trunk.layers:
            ffn = layer.ffn
            w13 = ffn.experts.w13
            record["bias"].append(ffn.router.expert_bias.tolist())
            local = w13.to_local() if hasattr(w13, "to_local") else w13
            record["w13_local"].append(list(local.shape))
            record["w13_global"].append(list(w13.shape))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"ep_rank{trainer.global_rank}.json").write_text(json.dumps(record))
