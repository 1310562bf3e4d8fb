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


def expert_parallel_mesh(data_parallel_mesh: DeviceMesh, expert_parallel_size: int) -> DeviceMesh:
    """The 2-D mesh (dp_mod_ep, ep) over the data-parallel ranks: consecutive groups of
    `expert_parallel_size` ranks split each layer's experts, and the dp_mod_ep = world / ep ranks
    holding the same experts shard them with FSDP2. Every rank still reads its own data."""
    world = data_parallel_mesh.size()
    if expert_parallel_size < 1 or world % expert_parallel_size:
        raise ValueError(f"trainer.strategy.expert_parallel_size={expert_parallel_size} must divide the "
                         f"data-parallel size {world} (trainer.devices x trainer.num_nodes)")
    ranks = data_parallel_mesh.mesh.reshape(world // expert_parallel_size, expert_parallel_size)
    return DeviceMesh(data_parallel_mesh.device_type, ranks, mesh_dim_names=("dp_mod_ep", "ep"))


def enable_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Switch every MoE layer of `model` to expert parallelism over the 1-D `ep_mesh` (each rank keeps
    E/ep experts per layer); returns those layers. A MoUE pool (shared by all layers) is refused."""
    from models.moe.layer import MoELayer
    from models.moe.moue import UniversalPool

    if any(isinstance(m, UniversalPool) for m in model.modules()):
        raise ValueError("trainer.strategy.expert_parallel_size > 1 supports model.net.ffn=moe only, not moue")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("trainer.strategy.expert_parallel_size > 1 needs MoE layers (model.net.ffn=moe)")
    for layer in layers:
        ep = ep_mesh.size()
        if layer.cfg.num_experts % ep:
            raise ValueError(f"model.net.moe.num_experts={layer.cfg.num_experts} must be divisible by "
                             f"trainer.strategy.expert_parallel_size={ep}")
        if layer.cfg.capacity_factor is not None:
            raise ValueError("expert parallelism is dropless: set model.net.moe.capacity_factor=null "
                             f"(got {layer.cfg.capacity_factor})")
        layer.enable_expert_parallel(ep_mesh)
    return layers


def parallelize(
    model: nn.Module,
    device_mesh: DeviceMesh,
    mixed_precision: str = "auto",
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    blocks_attr: str | tuple[str, ...] = "trunk.layers",
    expert_parallel_size: int = 1,
) -> nn.Module:
    """Apply `fully_shard` to every block in `model.<blocks_attr>` (a ModuleList, dotted path; several
    for a family with several stacks, e.g. ERNIE 3.0's universal, NLU and NLG modules), then
    to the root, which also holds a MoUE pool (`trunk.pool`): sharded once, never per block.

    Parameters are kept in fp32 (sharded); compute runs in the policy's dtype and gradients are
    reduced in fp32.

    expert_parallel_size > 1: the MoE layers' experts are split over groups of that many ranks
    (`expert_parallel_mesh`) and each layer's GroupedExperts is sharded on its own over dp_mod_ep,
    before its block; everything else is sharded over all ranks as usual. An expert's gradient
    sums the contributions of the ep ranks that sent it tokens, so its reduction divides by the whole
    data-parallel size, as every other gradient's does.
    """
    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names and "data_parallel" in device_mesh.mesh_dim_names else device_mesh
    dtype = resolve_param_dtype(mixed_precision, mesh.device_type)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if expert_parallel_size > 1:
        ep_mesh = expert_parallel_mesh(mesh, expert_parallel_size)
        for layer in enable_expert_parallel(model, ep_mesh["ep"]):
            fully_shard(layer.experts, mesh=ep_mesh["dp_mod_ep"], mp_policy=policy,
                        reshard_after_forward=reshard_after_forward)
            layer.experts.set_gradient_divide_factor(float(mesh.size()))
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


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm of `params` (clipped to `max_norm` when > 0), a plain tensor.

    Unlike torch.nn.utils.clip_grad_norm_ it accepts DTensor gradients on several meshes (expert
    parallelism: experts on the (dp_mod_ep, ep) mesh, the rest on the data-parallel one): one norm
    per mesh, made whole with full_tensor, then combined.
    """
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if max_norm > 0:
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        if coef < 1.0:
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
    return total
