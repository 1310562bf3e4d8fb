"""Expert parallelism: each rank of an `ep` process group holds E/ep of a layer's experts; a token's
(token, expert) pairs travel to the rank that owns the expert and their outputs travel back.

Shapes: N tokens of this rank, k experts per token, E experts, El = E/ep local experts, M pairs this
rank routes (N*k, dropless), R pairs this rank receives, D model dim. Rank j owns the experts
[j*El, (j+1)*El), so pairs sorted by expert are also sorted by destination rank.

One call, dropless:
  1. plan_dispatch sorts this rank's pairs by (global) expert; counts [E] per expert.
  2. all_to_all of the counts: recv [ep, El] = how many pairs each source rank sends each local expert.
  3. all_to_all of the pair rows x[token] (split sizes from 2); received rows are grouped by
     (source rank, local expert) and re-sorted by local expert for the grouped expert kernels.
  4. The local GroupedExperts run without gates; the outputs are un-permuted and sent back by the
     reverse all_to_all; the source rank scales them by the gate weights and scatter-adds them into
     its tokens. The router, its gates and their gradients therefore stay local and global-E.

Gradients flow through `AllToAll`, whose backward is the reverse exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from models.moe.dispatch import DispatchPlan, plan_dispatch
from models.moe.experts import _GatherRows, _ScatterAddRows
from models.moe.router import RouterOutput

if TYPE_CHECKING:
    from models.moe.experts import GroupedExperts


class AllToAll(torch.autograd.Function):
    """Rows of x [sum(in_splits), ...] exchanged over `group`: in_splits[j] rows go to rank j, and
    out_splits[j] rows arrive from rank j. Backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group: Optional[dist.ProcessGroup]):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    if x.shape[0] != sum(in_splits):
        raise RuntimeError(f"all_to_all: {x.shape[0]} rows but in_splits sum to {sum(in_splits)}")
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def exchange_counts(counts_E: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """[ep, El]: row j = the pairs rank j sends to each of this rank's experts (this rank's counts_E
    viewed as [ep, El], row j, goes to rank j)."""
    ep = dist.get_world_size(group)
    recv = torch.empty_like(counts_E)
    dist.all_to_all_single(recv, counts_E.contiguous(), group=group)
    return recv.view(ep, -1)


def ep_moe_forward(
    x_ND: torch.Tensor,
    router_out: RouterOutput,
    experts: "GroupedExperts",
    num_experts: int,
    group: Optional[dist.ProcessGroup],
) -> tuple[torch.Tensor, DispatchPlan]:
    """Dropless y_n = sum over pairs (n, e) of gate * expert_e(x_n), the experts spread over `group`
    (`experts` holds this rank's El = E/ep of them, in order). Returns (y [N, D], this rank's plan
    over all E experts, as `moe_forward` does)."""
    ep = dist.get_world_size(group)
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {ep}")
    E_l = num_experts // ep
    plan = plan_dispatch(router_out.topk_idx, router_out.topk_weight, num_experts, None)
    recv_jl = exchange_counts(plan.counts, group)
    # One host sync for both split lists (all_to_all_single needs them on the host anyway).
    send_j, recv_j = torch.stack((plan.counts.view(ep, E_l).sum(1), recv_jl.sum(1))).tolist()

    x_MD = _GatherRows.apply(x_ND, plan.token_idx)
    x_RD = AllToAll.apply(x_MD, recv_j, send_j, group)
    # Received rows are grouped by (source, local expert): a stable sort by local expert groups
    # them per expert, keeping each expert's rows in source-rank then token order.
    local_R = torch.repeat_interleave(torch.arange(E_l, device=recv_jl.device).repeat(ep), recv_jl.reshape(-1))
    perm_R = torch.sort(local_R, stable=True).indices
    counts_l = recv_jl.sum(0)
    # Called, not .forward(): under FSDP2 the experts are their own FSDP module, whose hooks
    # all-gather the weights before and reduce the gradients after.
    y_RD = experts(_GatherRows.apply(x_RD, perm_R), counts_l)
    inv_R = torch.empty_like(perm_R)
    inv_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
    y_MD = AllToAll.apply(_GatherRows.apply(y_RD, inv_R), send_j, recv_j, group)
    y_MD = y_MD * plan.weight.to(y_MD.dtype).unsqueeze(1)
    return _ScatterAddRows.apply(y_MD, plan.token_idx, x_ND.shape[0]), plan
