"""Attention masks described per token, materialised only where a kernel needs them.

Convention: True = the query may attend to the key (`scaled_dot_product_attention`'s). A mask is a
rule over per-token ids of the token sequence (cached past + current tokens, length S; the T
queries are its last T tokens), never an [S, S] tensor unless a kernel asks for one:

    allowed(q, k) = order(q, k) and same_document(q, k) and frame_rule(q, k)

    order           causal: k <= q (sequence indices); blocks: block[k] <= block[q], bidirectional
                    inside a block (VideoAR / next-frame-scale layouts, bidirectional spans inside a
                    causal sequence, an all-zero block id = full bidirectional); none: full
    same_document   doc[k] == doc[q] when doc ids are given (packed documents)
    frame_rule      VideoAR's Random Frame Mask: a query of frame tq does not see an earlier frame tk
                    when frame_keep[b, tq, tk] is False or tk < tq - window (the prefix, frame id -1,
                    and the query's own frame are always visible)

Segment-memory keys (Transformer-XL) are prepended by the attention and visible to every query.
`AttentionMask.plan` turns a description into what one forward needs (built once per forward, shared
by the layers):
    none       every key visible (full attention, or one newest query under a causal mask)
    causal     SDPA's `is_causal` (flash kernels on GPU)
    segments   the queries cut into runs whose visible keys are one contiguous range (a block of a
               block-causal layout, a packed document's causal square, a bidirectional document),
               one SDPA call per run with no mask at all: no mask memory, masked work skipped
               (the CPU training path; a run that is neither gets a small dense mask of its own)
    flex       a FlexAttention `BlockMask` built from per-block id ranges, never from an [S, S]
               grid (memory: (S / 128)^2 block entries); on CUDA (CPU FlexAttention has no backward)
    dense      SDPA with a dense boolean mask (any rule, incl. the Random Frame Mask)
`explicit` wraps a given boolean mask: the slow reference the structured masks are tested against.

Shapes: B batch (ids may have batch 1: shared), S sequence keys, T queries, M memory keys,
F frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from models.random import uniform

__all__ = ["AttentionMask", "MaskPlan", "block_layout", "blocks_from_spans", "flex_available", "frame_mask_keep",
           "reference_mask", "reference_video_mask"]

FLEX_BLOCK = 128
_NEG = -(2 ** 59)  # block id of memory keys: before everything
_BIG = 2 ** 60  # neutral padding of per-block ranges (exact in float64, as F.pad needs)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Run:
    """Queries [q0, q1) of one `segments` run, the key ranges they see (in [memory; sequence] indices)
    and how: causal = SDPA is_causal over the (square) run, mask = a small dense mask of its own."""

    q0: int
    q1: int
    keys: list[tuple[int, int]]
    causal: bool = False
    mask: Optional[torch.Tensor] = None


@dataclass
class MaskPlan:
    """What one forward's attention calls use (see `AttentionMask.plan`).

    kind: 'none' | 'causal' | 'segments' | 'dense' | 'flex'.
    segments: [(batch rows or None for all, runs)], one entry per distinct per-sample layout.
    """

    kind: str
    dense: Optional[torch.Tensor] = None  # [B|1, 1, T, M + S] bool
    block_mask: object = None  # torch.nn.attention.flex_attention.BlockMask
    compiled: bool = True  # flex: run FlexAttention compiled (False: eager, the slow reference)
    segments: Optional[list] = None

    def nbytes(self) -> int:
        """Bytes held by the materialised mask (dense booleans, run masks or the BlockMask's indices)."""
        if self.segments is not None:
            return sum(r.mask.numel() for _, runs in self.segments for r in runs if r.mask is not None)
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        if self.block_mask is not None:
            bm = self.block_mask
            parts = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                     bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices]
            return sum(t.numel() * t.element_size() for t in parts if t is not None)
        return 0


@dataclass
class AttentionMask:
    """A described attention mask (see the module docstring).

    causal: the order rule when `block_ids` is None (False = full attention).
    block_ids: [B|1, S] int; the order is block[k] <= block[q] (`causal` is then ignored).
    doc_ids: [B|1, S] int; keys of another document are hidden.
    frame_ids: [B|1, S] int (a 1-D [S] is one layout shared by the batch), -1 for tokens outside any
        frame; ids index frame_keep, so packed rows number their documents' frames apart
    frame_keep: [B, F, F] bool; frame_window: int.
    explicit: [B|1, 1|H, T, M + S] bool, used as given (the reference).
    """

    causal: bool = True
    block_ids: Optional[torch.Tensor] = None
    doc_ids: Optional[torch.Tensor] = None
    frame_ids: Optional[torch.Tensor] = None
    frame_keep: Optional[torch.Tensor] = None
    frame_window: Optional[int] = None
    explicit: Optional[torch.Tensor] = None

    # -- constructors -----------------------------------------------------------------------------

    @classmethod
    def full(cls, doc_ids: Optional[torch.Tensor] = None) -> "AttentionMask":
        """Bidirectional (ERNIE 3.0 NLU), optionally only within packed documents."""
        return cls(causal=False, doc_ids=_as_2d(doc_ids))

    @classmethod
    def documents(cls, doc_ids: torch.Tensor) -> "AttentionMask":
        """Causal within packed documents."""
        return cls(causal=True, doc_ids=_as_2d(doc_ids))

    @classmethod
    def blocks(cls, block_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
               frame_ids: Optional[torch.Tensor] = None, frame_keep: Optional[torch.Tensor] = None,
               frame_window: Optional[int] = None) -> "AttentionMask":
        """Block-causal: bidirectional inside a block, causal across blocks (+ the Random Frame Mask)."""
        if (frame_keep is not None or frame_window is not None) and frame_ids is None:
            raise ValueError("frame_keep / frame_window need frame_ids")
        return cls(block_ids=_as_2d(block_ids), doc_ids=_as_2d(doc_ids), frame_ids=_as_2d(frame_ids),
                   frame_keep=frame_keep, frame_window=frame_window)

    @classmethod
    def spans(cls, span_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> "AttentionMask":
        """Causal, except inside spans (span id >= 0) which are bidirectional (ERNIE 5.0 understanding inputs)."""
        return cls.blocks(blocks_from_spans(_as_2d(span_ids)), doc_ids)

    @classmethod
    def from_explicit(cls, mask: torch.Tensor) -> "AttentionMask":
        """A given boolean mask [T, S], [B, T, S] or [B, 1|H, T, S] (the slow reference)."""
        while mask.dim() < 4:
            mask = mask.unsqueeze(0) if mask.dim() < 3 else mask.unsqueeze(1)
        return cls(explicit=mask.bool())

    # -- properties -------------------------------------------------------------------------------

    @property
    def has_frames(self) -> bool:
        return self.frame_ids is not None and (self.frame_keep is not None or self.frame_window is not None)

    @property
    def is_plain_causal(self) -> bool:
        return self.explicit is None and self.block_ids is None and self.doc_ids is None and self.causal \
            and not self.has_frames

    @property
    def is_full(self) -> bool:
        return self.explicit is None and self.block_ids is None and self.doc_ids is None and not self.causal \
            and not self.has_frames

    # -- materialisation --------------------------------------------------------------------------

    def dense(self, q_len: int, seq_len: int, memory: int = 0, device=None) -> torch.Tensor:
        """[B|1, 1, T, M + S] bool for queries at sequence positions seq_len - q_len .. seq_len - 1."""
        if self.explicit is not None:
            return self.explicit.to(device)
        qb, kb, qd, kd = self._ids(q_len, seq_len, device)
        allowed = kb[:, None, :] <= qb[:, :, None]
        if kd is not None:
            allowed = allowed & (kd[:, None, :] == qd[:, :, None])
        if self.has_frames:
            allowed = allowed & ~self._frame_hidden(q_len, seq_len, device)
        if memory:
            allowed = torch.cat([allowed.new_ones(allowed.shape[0], q_len, memory), allowed], dim=-1)
        return allowed[:, None]

    def plan(self, q_len: int, seq_len: int, memory: int = 0, impl: str = "sdpa", device=None) -> MaskPlan:
        """The cheapest exact way to apply this mask to one forward.

        impl: 'segments' (runs of unmasked SDPA calls where the rule allows, else dense), 'sdpa'
            (dense booleans for structured masks), 'flex' (FlexAttention BlockMask, compiled) or
            'flex_eager' (the same, not compiled: slow, for debugging).
        """
        if self.explicit is not None:
            return MaskPlan("dense", dense=self.explicit.to(device))
        if self.is_full or (self.is_plain_causal and q_len == 1):
            return MaskPlan("none")  # a single newest query sees every key under a causal mask
        if self.is_plain_causal and memory == 0 and q_len == seq_len:
            return MaskPlan("causal")
        if impl in ("flex", "flex_eager"):
            return MaskPlan("flex", block_mask=self.block_mask(q_len, seq_len, memory, device),
                            compiled=impl == "flex")
        if impl == "segments":
            segments = self.segments(q_len, seq_len, memory, device)
            if segments is not None:
                return MaskPlan("segments", segments=segments)
        return MaskPlan("dense", dense=self.dense(q_len, seq_len, memory, device))

    def segments(self, q_len: int, seq_len: int, memory: int = 0, device=None) -> Optional[list]:
        """The queries as runs that each see one contiguous key range (see the module docstring), or
        None when the rule is not of that shape (the Random Frame Mask, unsorted ids)."""
        if self.explicit is not None or self.has_frames:
            return None
        qb, kb, qd, kd = self._ids(q_len, seq_len, "cpu")
        B = max(kb.shape[0], 1 if kd is None else kd.shape[0])
        layouts: dict[tuple, list[int]] = {}
        for b in range(B):
            blk = kb[min(b, kb.shape[0] - 1)]
            doc = None if kd is None else kd[min(b, kd.shape[0] - 1)]
            key = (tuple(blk.tolist()), None if doc is None else tuple(doc.tolist()))
            layouts.setdefault(key, []).append(b)
        out = []
        for (blk, doc), rows in layouts.items():
            runs = _runs(torch.tensor(blk), None if doc is None else torch.tensor(doc), q_len, memory, device)
            if runs is None:
                return None
            out.append((None if len(layouts) == 1 else rows, runs))
        return out

    def _ids(self, q_len: int, seq_len: int, device):
        """(query block ids [B, T], key block ids [B, S], query docs, key docs) as int64 on `device`."""
        if seq_len < q_len:
            raise ValueError(f"mask: {q_len} queries but only {seq_len} sequence positions")
        if self.block_ids is not None:
            kb = self.block_ids.to(device)
            if kb.shape[-1] < seq_len:
                raise ValueError(f"mask block_ids cover {kb.shape[-1]} tokens, the sequence has {seq_len}")
            kb = kb[:, :seq_len]
        elif self.causal:
            kb = torch.arange(seq_len, device=device)[None]
        else:
            kb = torch.zeros(1, seq_len, dtype=torch.long, device=device)
        kd = None if self.doc_ids is None else self.doc_ids.to(device)[:, :seq_len]
        if kd is not None and kd.shape[-1] < seq_len:
            raise ValueError(f"mask doc_ids cover {kd.shape[-1]} tokens, the sequence has {seq_len}")
        qb = kb[:, seq_len - q_len:]
        qd = None if kd is None else kd[:, seq_len - q_len:]
        return qb, kb, qd, kd

    def _frame_hidden(self, q_len: int, seq_len: int, device) -> torch.Tensor:
        """[B|1, T, S] True where the Random Frame Mask hides key k from query q."""
        fk = _as_2d(self.frame_ids).to(device)[:, :seq_len]  # [B|1, S]
        fq = fk[:, seq_len - q_len:]
        earlier = (fk[:, None, :] >= 0) & (fq[:, :, None] >= 0) & (fk[:, None, :] < fq[:, :, None])
        hidden = torch.zeros_like(earlier)
        if self.frame_window is not None:
            hidden = hidden | (earlier & (fk[:, None, :] < fq[:, :, None] - self.frame_window))
        if self.frame_keep is None:
            return hidden
        keep = self.frame_keep.to(device)
        B = max(keep.shape[0], fk.shape[0])
        rows = torch.arange(B, device=device)[:, None, None] % keep.shape[0]
        fq, fk = fq.clamp_min(0).expand(B, -1), fk.clamp_min(0).expand(B, -1)
        kept = keep[rows, fq[:, :, None], fk[:, None, :]]  # [B, T, S]
        return hidden | (earlier & ~kept)

    # -- FlexAttention ----------------------------------------------------------------------------

    def mask_mod(self, q_len: int, seq_len: int, memory: int, device):
        """FlexAttention mask_mod(b, h, q_idx, kv_idx) over kv = [memory; sequence] (q_idx counts queries)."""
        qb, kb, qd, kd = self._ids(q_len, seq_len, device)
        off = seq_len - q_len
        fk = _as_2d(self.frame_ids).to(device)[:, :seq_len].long() if self.has_frames else None
        batched = kb.shape[0] > 1 or (kd is not None and kd.shape[0] > 1) or (fk is not None and fk.shape[0] > 1)
        if batched:
            B = max(kb.shape[0], 1 if kd is None else kd.shape[0], 1 if fk is None else fk.shape[0])
            kb = kb.expand(B, -1).contiguous()
            kd = None if kd is None else kd.expand(B, -1).contiguous()
            fk = None if fk is None else fk.expand(B, -1).contiguous()
        frames = None
        if self.has_frames:
            keep = None if self.frame_keep is None else self.frame_keep.to(device)
            frames = (fk, keep, self.frame_window)

        def mask_mod(b, h, q_idx, kv_idx):
            bi = b if batched else 0
            # clamped: FlexAttention may evaluate padded rows / columns past the lengths
            k = (kv_idx - memory).clamp(0, seq_len - 1)
            q = (q_idx + off).clamp(max=seq_len - 1)
            ok = kb[bi, k] <= kb[bi, q]
            if kd is not None:
                ok = ok & (kd[bi, k] == kd[bi, q])
            if frames is not None:
                fk_, keep_, window = frames
                tk, tq = fk_[bi, k], fk_[bi, q]
                earlier = (tk >= 0) & (tq >= 0) & (tk < tq)
                if window is not None:
                    ok = ok & ~(earlier & (tk < tq - window))
                if keep_ is not None:
                    ok = ok & ~(earlier & ~keep_[b, tq.clamp(min=0), tk.clamp(min=0)])
            return ok | (kv_idx < memory)

        return mask_mod

    def block_mask(self, q_len: int, seq_len: int, memory: int = 0, device=None, block: int = FLEX_BLOCK):
        """A FlexAttention BlockMask from per-block id ranges (no [T, S] grid is ever built).

        A (query block, key block) pair is empty when no key can be visible to any query (its block
        ids all come later, or its documents are all others), full when every key is visible to
        every query (mask_mod is skipped there), partial otherwise.
        """
        from torch.nn.attention.flex_attention import BlockMask

        qb, kb, qd, kd = self._ids(q_len, seq_len, device)
        kv_len = memory + seq_len
        nq, nk = -(-q_len // block), -(-kv_len // block)
        is_mem = torch.arange(kv_len, device=device) < memory
        q_min, q_max = _block_range(qb, nq, block)
        # memory keys precede everything (their block id is _NEG) and belong to every document
        kb_all = torch.cat([kb.new_full((kb.shape[0], memory), _NEG), kb], dim=1)
        k_min, k_max = _block_range(kb_all, nk, block)
        full = k_max[:, None, :] <= q_min[:, :, None]
        empty = k_min[:, None, :] > q_max[:, :, None]
        if kd is not None:
            kd_all = torch.cat([kd.new_zeros((kd.shape[0], memory)), kd], dim=1)
            qd_min, qd_max = _block_range(qd, nq, block)
            kd_min, kd_max = _block_range(kd_all, nk, block, ignore=is_mem)
            same = (qd_min == qd_max)[:, :, None] & (kd_min == kd_max)[:, None, :] \
                & (qd_min[:, :, None] == kd_min[:, None, :])
            disjoint = (kd_max[:, None, :] < qd_min[:, :, None]) | (kd_min[:, None, :] > qd_max[:, :, None])
            full, empty = full & same, empty | disjoint
        all_mem = _block_all(is_mem, nk, block, kv_len)
        empty = empty & ~_block_any(is_mem, nk, block)  # a block holding a memory key is never empty
        if self.has_frames:
            full = torch.zeros_like(full)  # the frame rule can hide any sequence key
        full = full | all_mem
        if kv_len % block:
            full[:, :, -1] = False  # ragged last key block: the kernel's bounds + mask_mod handle it
        B = max(full.shape[0], 1 if self.frame_keep is None else self.frame_keep.shape[0],
                1 if not self.has_frames else _as_2d(self.frame_ids).shape[0])
        full, empty = full.expand(B, nq, nk), empty.expand(B, nq, nk)
        kv_num, kv_idx = _indices(~full & ~empty)
        full_num, full_idx = _indices(full)
        return BlockMask.from_kv_blocks(
            kv_num[:, None], kv_idx[:, None], full_num[:, None], full_idx[:, None], BLOCK_SIZE=block,
            mask_mod=self.mask_mod(q_len, seq_len, memory, device), seq_lengths=(q_len, kv_len),
        )


# ------------------------------------------------------------------------------------- helpers


def _runs(blk: torch.Tensor, doc: Optional[torch.Tensor], q_len: int, memory: int, device) -> Optional[list[Run]]:
    """Cut the last q_len of a sequence (block ids blk [S], doc ids doc [S] or None) into runs.

    With ids sorted, query i sees keys [doc_start(i), min(block_end(i), doc_end(i))): one range.
    Consecutive queries seeing the same range form a run with no mask; consecutive queries that
    each see up to themselves form a causal chain, square (is_causal) when it starts its range.
    """
    S = blk.numel()
    if bool((blk[1:] < blk[:-1]).any()) or (doc is not None and bool((doc[1:] < doc[:-1]).any())):
        return None
    block_end = torch.searchsorted(blk, blk, right=True)
    single = block_end - torch.searchsorted(blk, blk) == 1
    if doc is None:
        start, end = torch.zeros_like(blk), block_end
    else:
        start = torch.searchsorted(doc, doc)
        end = torch.minimum(block_end, torch.searchsorted(doc, doc, right=True))
    off = S - q_len
    idx = torch.arange(off, S)
    st, en = start[off:], end[off:]
    chain = single[off:] & (en == idx + 1)  # a singleton block: sees exactly up to itself
    runs: list[Run] = []
    i = 0
    st_l, en_l, ch_l = st.tolist(), en.tolist(), chain.tolist()
    while i < q_len:
        j = i + 1
        if ch_l[i]:
            while j < q_len and ch_l[j] and st_l[j] == st_l[i]:
                j += 1
        else:
            while j < q_len and not ch_l[j] and st_l[j] == st_l[i] and en_l[j] == en_l[i]:
                j += 1
        s0, e0 = st_l[i], en_l[j - 1]
        keys = [(0, memory + e0)] if (memory and s0 == 0) else ([(0, memory)] if memory else []) + [(memory + s0, memory + e0)]
        if not ch_l[i] or j - i == 1:
            runs.append(Run(i, j, keys))  # every query of the run sees the whole range
        elif memory == 0 and s0 == off + i:
            runs.append(Run(i, j, keys, causal=True))  # a square causal chain
        else:  # a causal chain after a prefix (or memory): lower-right causal, a mask of its own
            width = sum(b - a for a, b in keys)
            q = torch.arange(j - i)[:, None] + (width - (j - i))
            runs.append(Run(i, j, keys, mask=(torch.arange(width)[None, :] <= q).to(device)))
        i = j
    return runs


def _as_2d(ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if ids is None:
        return None
    ids = torch.as_tensor(ids)
    return ids[None] if ids.dim() == 1 else ids


def _block_range(ids: torch.Tensor, n: int, block: int,
                 ignore: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of `block` tokens: (min, max) of ids [B, L] -> [B, n] each; padding is neutral.

    ignore: [L] bool, tokens left out of the range (a block of only ignored tokens gets min > max).
    """
    B, L = ids.shape
    pad = n * block - L
    big = _BIG
    lo_src, hi_src = ids, ids
    if ignore is not None:
        lo_src = torch.where(ignore[None], torch.full_like(ids, big), ids)
        hi_src = torch.where(ignore[None], torch.full_like(ids, -big), ids)
    lo = torch.nn.functional.pad(lo_src, (0, pad), value=big).view(B, n, block).amin(-1)
    hi = torch.nn.functional.pad(hi_src, (0, pad), value=-big).view(B, n, block).amax(-1)
    return lo, hi


def _block_any(flag: torch.Tensor, n: int, block: int) -> torch.Tensor:
    return torch.nn.functional.pad(flag, (0, n * block - flag.numel()), value=False).view(n, block).any(-1)


def _block_all(flag: torch.Tensor, n: int, block: int, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(flag, (0, n * block - length), value=True).view(n, block).all(-1)


def _indices(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count [B, nq], indices [B, nq, nk]) of the selected kv blocks of each query block, selected first."""
    num = sel.sum(-1).to(torch.int32)
    idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def blocks_from_spans(span_ids: torch.Tensor) -> torch.Tensor:
    """Block ids [B, L] for a causal sequence whose tokens with equal span id >= 0 (contiguous) share a block."""
    prev = torch.cat([span_ids.new_full((span_ids.shape[0], 1), -1), span_ids[:, :-1]], dim=1)
    new = (span_ids < 0) | (span_ids != prev)
    return new.long().cumsum(1) - 1


def block_layout(prefix_len: int, scales: Sequence[tuple[int, int]], num_frames: int,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of [prefix][frame 0: scales][frame 1: scales]...: block id (prefix 0, frame t scale k
    1 + t*K + k) and frame id (prefix -1)."""
    sizes = [h * w for h, w in scales]
    k = len(sizes)
    block = [torch.zeros(prefix_len, dtype=torch.long)]
    frame = [torch.full((prefix_len,), -1, dtype=torch.long)]
    for t in range(num_frames):
        for s, n in enumerate(sizes):
            block.append(torch.full((n,), 1 + t * k + s, dtype=torch.long))
            frame.append(torch.full((n,), t, dtype=torch.long))
    return torch.cat(block).to(device), torch.cat(frame).to(device)


def frame_mask_keep(batch: int, num_frames: int, p_mask: float, generator: Optional[torch.Generator] = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """Random Frame Mask draw: keep[b, tq, tk] ~ Bernoulli(1 - p_mask) i.i.d. per (query, key) frame pair.

    Drawn on the generator's device (`models.random.uniform`), so any generator works on any device.
    """
    return uniform((batch, num_frames, num_frames), generator, device) >= p_mask


# ------------------------------------------------------------------------------------ references


def reference_mask(block_ids: Optional[Sequence[int]] = None, doc_ids: Optional[Sequence[int]] = None,
                   causal: bool = True, memory: int = 0, q_len: Optional[int] = None) -> torch.Tensor:
    """Slow, explicit [T, M + S] construction (python loops over token pairs), for tests."""
    n = len(block_ids if block_ids is not None else doc_ids)
    q_len = n if q_len is None else q_len
    out = torch.zeros(q_len, memory + n, dtype=torch.bool)
    for qi in range(q_len):
        i = n - q_len + qi
        for m in range(memory):
            out[qi, m] = True
        for j in range(n):
            if block_ids is not None:
                ok = block_ids[j] <= block_ids[i]
            else:
                ok = j <= i if causal else True
            if doc_ids is not None and doc_ids[j] != doc_ids[i]:
                ok = False
            out[qi, memory + j] = ok
    return out


def reference_video_mask(prefix_len: int, scales: Sequence[tuple[int, int]], num_frames: int,
                         frame_keep: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
    """Slow, explicit VideoAR mask [L, L] (or [B, L, L] with frame_keep): python loops over token pairs."""
    tokens = [("p", -1, 0)] * prefix_len  # (kind, frame, scale)
    for t in range(num_frames):
        for s, (h, w) in enumerate(scales):
            tokens += [("v", t, s)] * (h * w)
    n = len(tokens)
    batch = 1 if frame_keep is None else frame_keep.shape[0]
    out = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        for i, (kq, tq, sq) in enumerate(tokens):
            for j, (kk, tk, sk) in enumerate(tokens):
                if kk == "p":
                    ok = True  # the prefix is visible to everyone (and bidirectional inside)
                elif kq == "p":
                    ok = False  # the prefix never sees video tokens
                elif tk < tq:
                    ok = True
                    if window is not None and tk < tq - window:
                        ok = False
                    if frame_keep is not None and not bool(frame_keep[b, tq, tk]):
                        ok = False
                elif tk == tq:
                    ok = sk <= sq
                else:
                    ok = False
                out[b, i, j] = ok
    return out if frame_keep is not None else out[0]
