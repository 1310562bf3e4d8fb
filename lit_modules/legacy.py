"""Loading checkpoints written before a refactor renamed or fused parameters.

A family's network module provides `upgrade_state_dict(state, prefix) -> (state, {new key: [old keys]})`
(pure torch, in `models/`); this applies it to a Lightning checkpoint dict in place: the weights, and
the optimizer state, whose entries are numbered by parameter order, so that `ckpt_path=` resumes an
old run exactly, not only `load_from_checkpoint`. Fused parameters (e.g. q and kv projections into
one `wqkv`) get their Adam moments concatenated the same way as their weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["upgrade_checkpoint"]


def upgrade_checkpoint(checkpoint: dict, module: torch.nn.Module, prefix: str, upgrade: Callable) -> bool:
    """Rewrite an old checkpoint's `state_dict` (and optimizer states) for `module`; False if already current.

    module: the LightningModule whose parameters the optimizer was built over (its network built).
    prefix: where the network sits in the module's state dict, e.g. 'model.'.
    """
    old = checkpoint.get("state_dict")
    if old is None:  # a distributed (FSDP2) checkpoint: its tensors load through DCP, by current names
        return False
    new, sources = upgrade(old, prefix)
    if new is old:
        return False
    checkpoint["state_dict"] = new
    for opt in checkpoint.get("optimizer_states") or []:
        _remap_optimizer(opt, list(old), sources, module)
    rank_zero_info(f"checkpoint written before the one-trunk refactor: mapped {len(old)} tensors onto current names")
    return True


def _groups(names_dims: list[tuple[str, int]]) -> list[list[str]]:
    # lit_modules.base.param_groups: matrices (decayed) first, then gains and biases
    return [[n for n, d in names_dims if d >= 2], [n for n, d in names_dims if d < 2]]


def _remap_optimizer(opt: dict, old_keys: list[str], sources: dict[str, list[str]], module: torch.nn.Module) -> None:
    new_params = [(n, p.dim()) for n, p in module.named_parameters() if p.requires_grad]
    new_names = {n for n, _ in new_params}
    # the old parameter order is the old state dict's order, restricted to what maps onto a parameter
    # (buffers and a tied head's second name map onto none)
    feeding = {o for n in new_names for o in sources.get(n, [])}
    dims = {n: d for n, d in new_params}
    old_params = []
    for key in old_keys:
        if key in feeding:
            target = next(n for n in new_names if key in sources.get(n, []))
            old_params.append((key, dims[target]))
    old_groups, new_groups = _groups(old_params), _groups(new_params)
    listed = sum(len(g["params"]) for g in opt["param_groups"])
    if listed != len(old_params) or len(opt["param_groups"]) != len(new_groups):
        raise ValueError(
            f"the old optimizer state lists {listed} parameters in {len(opt['param_groups'])} groups, the old "
            f"weights map onto {len(old_params)}: cannot resume its optimizer (model.init_ckpt loads the weights)"
        )
    old_index = {}
    i = 0
    for group in old_groups:
        for name in group:
            old_index[name] = i
            i += 1
    state, j = {}, 0
    for g, group in enumerate(new_groups):
        ids = []
        for name in group:
            olds = [opt["state"].get(old_index[o]) for o in sources[name]]
            if all(s is not None for s in olds):
                state[j] = _merge(olds)
            ids.append(j)
            j += 1
        opt["param_groups"][g]["params"] = ids
    opt["state"] = state


def _merge(states: list[dict]) -> dict:
    """One parameter's optimizer state from the states of the old parameters fused into it (rows concatenated)."""
    if len(states) == 1:
        return states[0]
    out = {}
    for key, value in states[0].items():
        if torch.is_tensor(value) and value.dim() > 0:
            out[key] = torch.cat([s[key] for s in states], dim=0)
        else:
            out[key] = value  # e.g. Adam's step count, the same for all
    return out
