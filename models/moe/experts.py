"""Routed SwiGLU experts with stacked weights, run as one grouped GEMM or a per-expert loop.

Shapes: N tokens, M routed (token, expert) pairs sorted by expert, c pairs of one expert, D model
dim, H expert hidden, E experts. w13 [E, D, 2H] holds the gate (w1) and up (w3) projections side
by side, so one GEMM computes both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

IMPLS = ("auto", "grouped_mm", "loop")

_GROUPED_MM_OK: dict[tuple, bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward on this device/dtype (probed once, cached)."""
    key = (device.type, device.index, dtype)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _probe_grouped_mm(device, dtype)
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(48, 16, generator=gen).to(device, dtype).requires_grad_()
        w = torch.randn(3, 16, 16, generator=gen).to(device, dtype).requires_grad_()
        # An empty middle group: real routing produces them and some builds mishandle them.
        offs = torch.tensor([16, 16, 48], device=device, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        ref = torch.cat((x[:16] @ w[0], x[16:] @ w[2]))
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        return bool(torch.allclose(y.float(), ref.float(), atol=tol * 16, rtol=tol)) and w.grad is not None
    except Exception:  # any failure (unsupported arch, dtype, alignment) just means "use the loop"
        return False


def _local(w: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (differentiable), any other tensor itself."""
    return w.to_local() if isinstance(w, DTensor) else w


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _scatter_add_rows(out_ND: torch.Tensor, idx_M: torch.Tensor, src_MD: torch.Tensor) -> torch.Tensor:
    """out[idx[m]] += src[m], in place.

    On CPU index_add_ opens an OpenMP region even for a handful of rows, and with more runnable
    threads than cores (a shared machine) every region costs milliseconds (measured 57 ms for 6
    rows); index_put_(accumulate=True) is serial there, deterministic and as fast single-threaded.
    """
    if out_ND.device.type == "cpu":
        return out_ND.index_put_((idx_M,), src_MD, accumulate=True)
    return out_ND.index_add_(0, idx_M, src_MD)


class _GatherRows(torch.autograd.Function):
    """x[idx] whose backward scatter-adds with `_scatter_add_rows` (autograd's would use index_add_)."""

    @staticmethod
    def forward(ctx, x_ND, idx_M):
        ctx.save_for_backward(idx_M)
        ctx.num_rows = x_ND.shape[0]
        return x_ND.index_select(0, idx_M)

    @staticmethod
    def backward(ctx, g_MD):
        (idx_M,) = ctx.saved_tensors
        return _scatter_add_rows(g_MD.new_zeros(ctx.num_rows, g_MD.shape[1]), idx_M, g_MD.contiguous()), None


class _ScatterAddRows(torch.autograd.Function):
    """zeros[N, D] with rows src[m] added at idx[m]; backward is a gather."""

    @staticmethod
    def forward(ctx, src_MD, idx_M, num_rows: int):
        ctx.save_for_backward(idx_M)
        return _scatter_add_rows(src_MD.new_zeros(num_rows, src_MD.shape[1]), idx_M, src_MD)

    @staticmethod
    def backward(ctx, g_ND):
        (idx_M,) = ctx.saved_tensors
        return g_ND.index_select(0, idx_M), None, None


def _loop_forward(x, w13s, w2s, weight, token_idx, counts: list[int], num_out: int, keep: bool):
    """Per-expert SwiGLU forward over sequences of per-expert weights; returns (y, saved pre-activations)."""
    H = w2s[0].shape[0]
    routed = token_idx is not None
    # Pre-activations are the only activations kept for backward; inference needs no [M, 2H] buffer.
    h_MH2 = x.new_empty(sum(counts), 2 * H) if keep else None
    hs = torch.split(h_MH2, counts) if keep else None
    y = x.new_zeros(num_out, x.shape[1]) if routed else x.new_empty(sum(counts), x.shape[1])
    idx = torch.split(token_idx, counts) if routed else None
    xs = None if routed else torch.split(x, counts)
    ys = None if routed else torch.split(y, counts)
    ws = torch.split(weight, counts) if weight is not None else None
    for e, c in enumerate(counts):
        if c == 0:
            continue
        x_cD = x.index_select(0, idx[e]) if routed else xs[e]
        h_cH2 = torch.mm(x_cD, w13s[e], out=hs[e]) if keep else torch.mm(x_cD, w13s[e])
        a_cH = F.silu(h_cH2[:, :H]).mul_(h_cH2[:, H:])
        if ws is not None:
            a_cH.mul_(ws[e].unsqueeze(1))
        if routed:
            _scatter_add_rows(y, idx[e], torch.mm(a_cH, w2s[e]))
        else:
            torch.mm(a_cH, w2s[e], out=ys[e])
    return y, h_MH2


def _loop_backward(g, x, w13s, w2s, weight, token_idx, h_MH2, counts, need_x, need_w13, need_w2, need_wt,
                   gw13_out=None, gw2_out=None):
    """Backward of `_loop_forward`. Per-expert weight gradients go into `gw*_out[e]` (views of one
    stacked gradient, zeroed for unused experts) when given, else into fresh tensors, None for
    experts that received no token. Returns (gx, gw13 list, gw2 list, gweight)."""
    H = w2s[0].shape[0]
    routed = token_idx is not None
    g = g.contiguous()
    n = len(counts)
    gx = (torch.zeros_like(x) if routed else torch.empty_like(x)) if need_x else None
    gw13s = list(gw13_out) if gw13_out is not None else [None] * n
    gw2s = list(gw2_out) if gw2_out is not None else [None] * n
    gwt = torch.empty_like(weight) if need_wt else None
    hs = torch.split(h_MH2, counts)
    idx = torch.split(token_idx, counts) if routed else None
    xs = None if routed else torch.split(x, counts)
    gs = None if routed else torch.split(g, counts)
    gxs = None if routed or gx is None else torch.split(gx, counts)
    ws = torch.split(weight, counts) if weight is not None else None
    gws = torch.split(gwt, counts) if gwt is not None else None
    for e, c in enumerate(counts):
        if c == 0:
            for out in (gw13s, gw2s):
                if out[e] is not None:
                    out[e].zero_()
            continue
        g_cD = g.index_select(0, idx[e]) if routed else gs[e]
        h_cH2 = hs[e]
        gate, up = h_cH2[:, :H], h_cH2[:, H:]
        s_cH = F.silu(gate)
        a_cH = s_cH * up
        da_cH = torch.mm(g_cD, w2s[e].t())
        if ws is not None:
            if gws is not None:
                torch.sum(da_cH * a_cH, dim=1, out=gws[e])
            w_c1 = ws[e].unsqueeze(1)
            a_cH.mul_(w_c1)
            da_cH.mul_(w_c1)
        if need_w2:
            gw2s[e] = torch.mm(a_cH.t(), g_cD, out=gw2s[e]) if gw2s[e] is not None else torch.mm(a_cH.t(), g_cD)
        if not need_w13 and gx is None:
            continue
        dh_cH2 = torch.empty_like(h_cH2)
        torch.mul(da_cH, s_cH, out=dh_cH2[:, H:])
        # aten's fused silu derivative: one pass instead of five elementwise ops per expert
        torch.ops.aten.silu_backward.grad_input(da_cH.mul_(up), gate, grad_input=dh_cH2[:, :H])
        if need_w13:
            x_cD = x.index_select(0, idx[e]) if routed else xs[e]
            gw13s[e] = torch.mm(x_cD.t(), dh_cH2, out=gw13s[e]) if gw13s[e] is not None else torch.mm(x_cD.t(), dh_cH2)
        if gx is not None:
            if routed:
                _scatter_add_rows(gx, idx[e], torch.mm(dh_cH2, w13s[e].t()))
            else:
                torch.mm(dh_cH2, w13s[e].t(), out=gxs[e])
    return gx, gw13s, gw2s, gwt


class _ExpertLoop(torch.autograd.Function):
    """Per-expert SwiGLU with hand-written backward, optionally fused with gather and scatter-add.

    With token_idx, x is the unpermuted [N, D] input: each expert gathers its rows and scatter-adds
    its output straight into [N, D], so every temporary is one expert's size (cache-resident and
    recycled by the allocator) rather than an [M, D] permuted copy, whose fresh pages cost more on
    CPU than the gather itself. Without token_idx, x is already sorted [M, D] and y is [M, D].
    The gate weight is folded into the activation ([c, H], cheaper to scale than [c, D]). Only the
    pre-activations h [M, 2H] are saved; silu is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, w13, w2, weight, token_idx, counts: list[int], num_out: int):
        keep = any(ctx.needs_input_grad[:4])
        y, h_MH2 = _loop_forward(x, w13.unbind(0), w2.unbind(0), weight, token_idx, counts, num_out, keep)
        if keep:
            ctx.save_for_backward(x, w13, w2, weight, token_idx, h_MH2)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx, g):
        x, w13, w2, weight, token_idx, h_MH2 = ctx.saved_tensors
        need_x, need_w13, need_w2, need_wt = ctx.needs_input_grad[:4]
        gw13 = torch.empty_like(w13) if need_w13 else None
        gw2 = torch.empty_like(w2) if need_w2 else None
        gx, _, _, gwt = _loop_backward(
            g, x, w13.unbind(0), w2.unbind(0), weight, token_idx, h_MH2, ctx.counts, need_x, need_w13, need_w2,
            need_wt, None if gw13 is None else gw13.unbind(0), None if gw2 is None else gw2.unbind(0),
        )
        return gx, gw13, gw2, gwt, None, None, None


class _ExpertLoopPerExpert(torch.autograd.Function):
    """`_ExpertLoop` over a list of per-expert weight tensors (views of a shared pool).

    Its backward returns a gradient only for experts that received tokens. A MoUE layer uses half
    of the pool or less; with the stacked form every layer would allocate, zero and accumulate a
    gradient the size of the whole pool (measured: 22% of a CPU step in fills alone).
    """

    @staticmethod
    def forward(ctx, x, weight, token_idx, counts: list[int], num_out: int, n: int, *ws):
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or any(ctx.needs_input_grad[6:])
        y, h_MH2 = _loop_forward(x, ws[:n], ws[n:], weight, token_idx, counts, num_out, keep)
        if keep:
            ctx.save_for_backward(x, weight, token_idx, h_MH2, *ws)
        ctx.counts, ctx.n = counts, n
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, token_idx, h_MH2, *ws = ctx.saved_tensors
        n, needs = ctx.n, ctx.needs_input_grad
        gx, gw13s, gw2s, gwt = _loop_backward(
            g, x, ws[:n], ws[n:], weight, token_idx, h_MH2, ctx.counts, needs[0], any(needs[6 : 6 + n]),
            any(needs[6 + n :]), needs[1],
        )
        return (gx, gwt, None, None, None, None, *gw13s, *gw2s)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's backward rejects expanded gradients (e.g. from `y.sum()`).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _grouped_swiglu(x_MD, w13, w2, weight_M, counts_E):
    H = w2.shape[1]
    offs = counts_E.cumsum(0).to(torch.int32)
    h_MH2 = torch._grouped_mm(x_MD, w13, offs=offs)
    a_MH = F.silu(h_MH2[:, :H]) * h_MH2[:, H:]
    if weight_M is not None:
        a_MH = a_MH * weight_M.unsqueeze(1)
    return _ContiguousGrad.apply(torch._grouped_mm(a_MH, w2, offs=offs))


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; inputs are pairs sorted by expert plus per-expert counts.

    impl: 'grouped_mm' (torch._grouped_mm, falls back to 'loop' where unsupported), 'loop' (one
    GEMM pair per non-empty expert), or 'auto' (the faster one for the shape, see `choose_impl`).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {list(IMPLS)}")
        self.num_experts, self.dim, self.hidden, self.impl = num_experts, dim, hidden, impl
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.init_weights(0.02, 0.02)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, impl={self.impl}"

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init; `out_std` for the output projection w2 (usually scaled down by depth)."""
        nn.init.normal_(self.w13, 0.0, std)
        nn.init.normal_(self.w2, 0.0, out_std)

    def num_params_per_expert(self) -> int:
        return 3 * self.dim * self.hidden

    def choose_impl(self, num_pairs: int, device: torch.device, dtype: torch.dtype) -> str:
        """The implementation this call will use ('grouped_mm' or 'loop')."""
        impl = self.impl
        if impl == "auto":
            impl = _auto_impl(num_pairs, self.num_local_experts, self.dim, self.hidden, device)
        if impl == "grouped_mm" and not grouped_mm_supported(device, dtype):
            impl = "loop"
        if impl == "grouped_mm" and device.type == "cuda":
            # CUDA grouped GEMMs need 16-byte aligned row strides; the probe's shapes always are.
            size = torch.finfo(dtype).bits // 8
            if (self.dim * size) % 16 or (self.hidden * size) % 16:
                impl = "loop"
        return impl

    @property
    def num_local_experts(self) -> int:
        """Experts held here: all of them, or this rank's slice under expert parallelism, where w13
        and w2 are DTensors sharded on dim 0 over the expert-parallel mesh."""
        return _local(self.w13).shape[0]

    def _cast(self, x: torch.Tensor, weight: torch.Tensor | None):
        dt = _compute_dtype(x)
        w13, w2 = _local(self.w13), _local(self.w2)
        return x.to(dt), w13.to(dt), w2.to(dt), None if weight is None else weight.to(dt)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, weight_M: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU per expert on rows sorted by expert: (silu(x w1) * (x w3)) w2, rows scaled by weight_M if given."""
        x, w13, w2, weight = self._cast(x_MD, weight_M)
        with torch.autocast(x.device.type, enabled=False):
            if self.choose_impl(x.shape[0], x.device, x.dtype) == "grouped_mm":
                return _grouped_swiglu(x, w13, w2, weight, counts_E)
            return _ExpertLoop.apply(x, w13, w2, weight, None, counts_E.tolist(), x.shape[0])

    def forward_routed(
        self, x_ND: torch.Tensor, token_idx_M: torch.Tensor, weight_M: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """sum over pairs (n, e) of weight * expert_e(x_n), into [N, D]; pairs sorted by expert."""
        x, w13, w2, weight = self._cast(x_ND, weight_M)
        with torch.autocast(x.device.type, enabled=False):
            if self.choose_impl(token_idx_M.shape[0], x.device, x.dtype) == "grouped_mm":
                y_MD = _grouped_swiglu(_GatherRows.apply(x, token_idx_M), w13, w2, weight, counts_E)
                return _ScatterAddRows.apply(y_MD, token_idx_M, x.shape[0])
            return _ExpertLoop.apply(x, w13, w2, weight, token_idx_M, counts_E.tolist(), x.shape[0])

    def forward_routed_subset(
        self, x_ND: torch.Tensor, token_idx_M: torch.Tensor, weight_M: torch.Tensor, counts_S: torch.Tensor,
        w13s: list[torch.Tensor], w2s: list[torch.Tensor],
    ) -> torch.Tensor:
        """`forward_routed` over a subset of the experts, given as per-expert weight views (e.g. one
        MoUE layer's window of a shared pool, from one `unbind` per model forward); pairs are
        sorted by position in the subset, `counts_S` per subset expert. Loop path only."""
        dt = _compute_dtype(x_ND)
        with torch.autocast(x_ND.device.type, enabled=False):
            ws = [w.to(dt) for w in (*w13s, *w2s)]
            return _ExpertLoopPerExpert.apply(
                x_ND.to(dt), weight_M.to(dt), token_idx_M, counts_S.tolist(), x_ND.shape[0], len(w13s), *ws
            )


def _auto_impl(num_pairs: int, num_experts: int, dim: int, hidden: int, device: torch.device) -> str:
    """grouped_mm on accelerators; on CPU the loop once each expert has enough work to hide its overhead."""
    if device.type != "cpu":
        # The loop pays a host sync (counts.tolist()) and ~2E kernel launches per pass.
        return "grouped_mm"
    # CPU, torch 2.14, 1 thread, fwd+bwd of moe_forward (benchmarks/moe_dispatch.py shapes and smaller):
    # the loop costs ~0.3 ms of fixed overhead per expert but runs its GEMMs ~20% faster than
    # torch._grouped_mm's CPU kernel (and fuses gather/scatter per expert). Per-expert work
    # w = (pairs / E) * D * H decides: w = 134M (E8 k2 H512, 1024 pairs each): gmm/loop 1.21;
    # w = 8.4M (E64 k8 H64, 512 each): 1.20; w = 4.2M: 0.91-1.03; w = 2.1M: 1.03; w = 1M: 0.76;
    # w <= 0.5M: 0.4-0.66. Crossover near w = 4M.
    work = num_pairs / max(num_experts, 1) * dim * hidden
    return "loop" if work >= 4e6 else "grouped_mm"
