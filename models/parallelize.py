"""FSDP2 sharding for every family on the trunk (torchtitan's shape: one function, no model edits)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_param_dtype(mixed_precision: str, device_type: str) -> torch.dtype:
    """'auto' means bf16 compute on GPU and fp32 on CPU (gloo has no bf16 speed-up)."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if mixed_precision not in _DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r} is not one of ['auto', {', '.join(_DTYPES)}]")
    return _DTYPES[mixed_precision]


def parallelize(
    model: nn.Module,
    device_mesh: DeviceMesh,
    mixed_precision: str = "auto",
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    blocks_attr: str | tuple[str, ...] = "trunk.layers",
) -> nn.Module:
    """Apply `fully_shard` to every block in `model.<blocks_attr>` (a ModuleList, dotted path; several
    for a family with several stacks, e.g. ERNIE 3.0's universal, NLU and NLG modules), then
    to the root, which also holds a MoUE pool (`trunk.pool`): sharded once, never per block.

    Parameters are kept in fp32 (sharded); compute runs in the policy's dtype and gradients are
    reduced in fp32.
    """
    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names and "data_parallel" in device_mesh.mesh_dim_names else device_mesh
    dtype = resolve_param_dtype(mixed_precision, mesh.device_type)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for attr in (blocks_attr,) if isinstance(blocks_attr, str) else blocks_attr:
        blocks = model.get_submodule(attr)
        if activation_checkpointing:
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root owns the embedding, final norm and (tied) head; no point resharding it after forward
    # since the head runs last and backward starts there.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model
