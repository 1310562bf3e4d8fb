"""The shared trunk: described masks against explicit references, every kernel path against SDPA with an
explicit mask, segment memory against the full forward, KV cache, layer subsets and chosen hidden states."""

from __future__ import annotations

import warnings

import pytest
import torch

from models.layers.attention import attend
from models.layers.mask import AttentionMask, block_layout, blocks_from_spans, flex_available, frame_mask_keep, \
    reference_mask, reference_video_mask
from models.layers.positions import sequence_positions
from models.layers.trunk import Trunk, TrunkConfig, next_memory

warnings.filterwarnings("ignore", message=".*flex_attention.*")  # eager FlexAttention on CPU warns


def reference_attention(q, k, v, mask_TS):
    """softmax(q k^T / sqrt(D) + log mask) v with kv heads repeated: the slow, explicit reference."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask_TS, float("-inf"))
    return s.softmax(-1) @ v


DOCS = [0] * 70 + [1] * 100 + [2] * 130
SPANS = [-1] * 10 + [0] * 30 + [-1] * 160 + [1] * 90 + [-1] * 10
CASES = {
    "causal": (AttentionMask(), reference_mask(block_ids=list(range(300)))),
    "documents": (AttentionMask.documents(torch.tensor(DOCS)), reference_mask(doc_ids=DOCS)),
    "full": (AttentionMask.full(), reference_mask(block_ids=[0] * 300)),
    "full_documents": (AttentionMask.full(torch.tensor(DOCS)), reference_mask(doc_ids=DOCS, causal=False)),
    "spans": (AttentionMask.spans(torch.tensor(SPANS)), None),
}


def _case(name):
    mask, ref = CASES[name]
    if name == "spans":
        ref = reference_mask(block_ids=blocks_from_spans(torch.tensor([SPANS]))[0].tolist())
    return mask, ref


@pytest.mark.parametrize("name", sorted(CASES))
def test_described_masks_equal_the_explicit_construction(name):
    mask, ref = _case(name)
    assert torch.equal(mask.dense(300, 300)[0, 0], ref)


def test_spans_are_bidirectional_inside_and_causal_outside():
    ref = reference_mask(block_ids=blocks_from_spans(torch.tensor([SPANS]))[0].tolist())
    assert ref[15, 35] and ref[35, 15]  # inside span 0, both ways
    assert not ref[5, 6] and ref[6, 5]  # causal before it
    assert ref[250, 39] and not ref[39, 250]  # later tokens see the whole span, not the reverse
    assert ref[200, 289] and not ref[199, 200]


def test_video_layout_with_frame_mask_equals_the_explicit_construction():
    scales = [(1, 1), (2, 2), (3, 3)]
    block, frame = block_layout(2, scales, 4)
    keep = frame_mask_keep(2, 4, 0.5, torch.Generator().manual_seed(0))
    L = block.numel()
    mask = AttentionMask.blocks(block, frame_ids=frame, frame_keep=keep, frame_window=2)
    assert torch.equal(mask.dense(L, L)[:, 0], reference_video_mask(2, scales, 4, keep, 2))


@pytest.mark.parametrize("impl", ["segments", "sdpa", "flex_eager"])
@pytest.mark.parametrize("name", sorted(CASES) + ["video", "video_frame_mask", "per_sample", "memory",
                                                  "queries_after_cache"])
def test_every_kernel_path_equals_explicit_mask_attention(name, impl):
    """Outputs (and, where the kernel has a backward on CPU, gradients) equal attention under the
    explicit boolean mask."""
    if impl == "flex_eager" and not flex_available():
        pytest.skip("FlexAttention is not in this torch")
    g = torch.Generator().manual_seed(0)
    S, T, M = 300, 300, 0
    if name in CASES:
        mask, ref = _case(name)
    elif name.startswith("video"):
        scales = [(1, 1), (2, 2), (4, 4), (8, 8)]
        block, frame = block_layout(3, scales, 4)
        S = T = block.numel()
        if name == "video":
            mask, ref = AttentionMask.blocks(block), reference_video_mask(3, scales, 4)
        else:
            keep = frame_mask_keep(2, 4, 0.4, torch.Generator().manual_seed(1))
            mask = AttentionMask.blocks(block, frame_ids=frame, frame_keep=keep, frame_window=2)
            ref = reference_video_mask(3, scales, 4, keep, 2)
    elif name == "per_sample":  # another packing per sample
        docs = torch.tensor([DOCS, [0] * 200 + [1] * 100])
        mask = AttentionMask.documents(docs)
        ref = torch.stack([reference_mask(doc_ids=d.tolist()) for d in docs])
    elif name == "memory":  # 40 segment-memory keys before a causal segment
        M = 40
        mask, ref = AttentionMask(), reference_mask(block_ids=list(range(S)), memory=M)
    else:  # 7 new queries after 293 cached positions, packed documents
        T = 7
        mask = AttentionMask.documents(torch.tensor(DOCS))
        ref = reference_mask(doc_ids=DOCS, q_len=T)
    B, H, K, D = 2, 4, 2, 16
    backward = impl != "flex_eager"  # FlexAttention has no backward on CPU
    q = torch.randn(B, H, T, D, generator=g, requires_grad=backward)
    k = torch.randn(B, K, M + S, D, generator=g, requires_grad=backward)
    v = torch.randn(B, K, M + S, D, generator=g, requires_grad=backward)
    ref4 = ref if ref.dim() == 3 else ref[None]
    want = reference_attention(q, k, v, ref4[:, None])
    plan = mask.plan(T, S, M, impl)
    if impl == "segments" and name in ("documents", "full_documents", "video", "per_sample"):
        assert plan.kind == "segments" and plan.nbytes() == 0  # no mask at all
    got = attend(q, k, v, plan)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    if not backward:
        return
    gw = torch.autograd.grad(want.square().sum(), (q, k, v))
    gg = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-4)


def test_plans_pick_the_cheapest_exact_kernel():
    assert AttentionMask().plan(16, 16).kind == "causal"  # SDPA is_causal (flash kernels on GPU)
    assert AttentionMask().plan(1, 16).kind == "none"  # the newest token sees everything
    assert AttentionMask().plan(4, 16).kind == "dense"  # a chunk after a cache: offset causal
    assert AttentionMask().plan(16, 16, memory=4).kind == "dense"
    assert AttentionMask.full().plan(16, 16).kind == "none"
    assert AttentionMask.documents(torch.zeros(16, dtype=torch.long)).plan(16, 16).kind == "dense"


@pytest.mark.skipif(not flex_available(), reason="FlexAttention is not in this torch")
def test_block_mask_is_built_from_ranges_and_skips_blocks():
    n = 1024
    docs = torch.arange(n) // 256  # 4 documents of 256
    plan = AttentionMask.documents(docs).plan(n, n, impl="flex")
    bm = plan.block_mask
    # 8 x 8 blocks of 128: each query block sees its document's blocks up to itself (1.5 on average)
    visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    assert visited == 8 + 4  # diagonal blocks partial (8), one full block below each second diagonal
    assert int(bm.kv_num_blocks.sum()) == 8
    # mask memory: index tensors over (n / 128)^2 blocks, far below n^2 booleans
    assert plan.nbytes() < n * n // 100
    dense = AttentionMask.documents(docs).plan(n, n, impl="sdpa")
    assert dense.nbytes() == n * n


def _trunk(**kw) -> Trunk:
    torch.manual_seed(0)
    cfg = TrunkConfig(**{"n_layers": 3, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, **kw})
    t = Trunk(cfg).eval()
    with torch.no_grad():  # non-trivial norms
        for n, p in t.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return t


@pytest.mark.parametrize("ffn", ["dense", "moe", "moue"])
def test_segment_memory_of_layer_inputs_equals_the_full_forward(ffn):
    """Transformer-XL recurrence: segment 2 attending to segment 1's per-layer inputs (detached, at the
    positions before it) computes what one causal forward over both segments computes."""
    t = _trunk(ffn=ffn, moe=dict(num_experts=4, top_k=2, expert_hidden=16), moue=dict(window=2, state_dim=8))
    x = torch.randn(2, 24, 32)
    pos = torch.arange(24)
    full = t(x, pos).hidden
    first = t(x[:, :12], pos[:12], return_states="inputs")
    memory = [next_memory(None, first.states[i], 12) for i in range(3)]
    second = t(x[:, 12:], pos[12:], memory=memory)  # memory positions default to 0..11
    torch.testing.assert_close(torch.cat([first.hidden, second.hidden], 1), full, atol=1e-5, rtol=1e-5)
    # mem_len keeps the last states; shorter memory = a window into the past
    short = next_memory(memory[0], first.states[0], 5)
    assert short.shape[1] == 5 and torch.equal(short, first.states[0][:, -5:])


def test_segment_memory_takes_no_gradient_and_same_layer_recurrence_differs():
    t = _trunk().train()
    x = torch.randn(2, 16, 32, requires_grad=True)
    pos = torch.arange(8)
    first = t(x[:, :8], pos, return_states="outputs")  # ERNIE-Doc: layer l's output feeds layer l
    memory = [next_memory(None, first.states[i], 8) for i in range(3)]
    assert all(not m.requires_grad for m in memory)
    second = t(x[:, 8:], pos + 8, memory=memory)
    second.hidden.sum().backward()
    assert x.grad[:, :8].abs().sum() == 0 and x.grad[:, 8:].abs().sum() > 0
    xl = t(x[:, 8:], pos + 8, memory=[next_memory(None, s, 8) for s in t(x[:, :8], pos, return_states="inputs")
                                      .states.values()])
    assert not torch.allclose(second.hidden, xl.hidden)


def test_kv_cache_chunks_equal_the_full_forward_under_a_block_mask():
    t = _trunk()
    block, _ = block_layout(2, [(1, 1), (2, 2), (3, 3)], 3)
    L = block.numel()
    x, pos = torch.randn(2, L, 32), torch.arange(L)
    mask = AttentionMask.blocks(block)
    full = t(x, pos, mask).hidden
    cache = t.new_cache(2, L)
    parts, start = [], 0
    for end in (2, 3, 7, 16, L):  # the prefix, then (frame, scale) blocks, then the rest at once
        parts.append(t(x[:, start:end], pos[start:end], mask, cache).hidden)
        start = end
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache[0].length == L


def test_layer_subset_and_chosen_hidden_states():
    t = _trunk(ffn="moue", moe=dict(num_experts=4, top_k=2, expert_hidden=16), moue=dict(window=2, state_dim=8))
    x, pos = torch.randn(2, 10, 32), torch.arange(10)
    out = t(x, pos, layers=[0, 2], return_hidden=[0, 2])
    # by hand: block 0 then block 2, the trajectory state carried from 0 to 2
    rope = t.rope(pos)
    plan = AttentionMask().plan(10, 10)
    state = t.pool.begin(x)
    h0, state, _ = t.layers[0](x, rope, plan, ffn_state=state)
    h2, _, _ = t.layers[2](h0, rope, plan, ffn_state=state)
    torch.testing.assert_close(out.hidden_states[0], h0)
    torch.testing.assert_close(out.hidden, t.norm(h2))
    assert [i.layer for i in out.routing] == [0, 2] and torch.isfinite(out.balance_loss)
    with pytest.raises(ValueError, match="ascending"):
        t(x, pos, layers=[2, 0])
    with pytest.raises(ValueError, match="do not run"):
        t(x, pos, layers=[0], return_hidden=[1])


def test_grouped_query_heads_equal_repeated_kv_heads():
    t = _trunk(n_kv_heads=1)
    x, pos = torch.randn(2, 9, 32), torch.arange(9)
    a = t.layers[0].attn
    xn = t.layers[0].attn_norm(x)
    H, K, D = 4, 1, 8
    q, k, v = a.wqkv(xn).split([H * D, K * D, K * D], -1)
    from models.layers.rope import apply_rotary

    cos, sin = t.rope(pos)
    q = apply_rotary(q.view(2, 9, H, D).transpose(1, 2), cos, sin)
    k = apply_rotary(k.view(2, 9, K, D).transpose(1, 2), cos, sin)
    v = v.view(2, 9, K, D).transpose(1, 2)
    want = reference_attention(q, k, v, torch.ones(9, 9, dtype=torch.bool).tril())
    want = a.wo(want.transpose(1, 2).reshape(2, 9, H * D))
    torch.testing.assert_close(a(xn, (cos, sin), AttentionMask().plan(9, 9)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not flex_available(), reason="FlexAttention is not in this torch")
def test_compiled_flex_attention_equals_sdpa_on_cpu():
    """The one compiled test of FlexAttention (about 40 s of compilation on CPU; forward only: CPU
    FlexAttention has no backward, so CPU training uses the `segments` / dense paths)."""
    block, frame = block_layout(1, [(1, 1), (2, 2), (4, 4), (8, 8)], 6)
    L = block.numel()
    mask = AttentionMask.blocks(block)
    sdpa, flex = _trunk(attn_impl="sdpa"), _trunk(attn_impl="flex")
    flex.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, L, 32)
    pos = sequence_positions(1, [(1, 1), (2, 2), (4, 4), (8, 8)], 6).float()[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(flex(x, pos, mask).hidden, sdpa(x, pos, mask).hidden, atol=1e-5, rtol=1e-5)


def test_init_is_depth_scaled_in_one_place():
    t = _trunk(n_layers=8, d_model=64, init_std=0.02)
    t.init_weights()
    out_std = 0.02 / (2 * 8) ** 0.5
    w = torch.cat([b.attn.wo.weight.flatten() for b in t.layers] + [b.ffn.w2.weight.flatten() for b in t.layers])
    v = torch.cat([b.attn.wqkv.weight.flatten() for b in t.layers] + [b.ffn.w1.weight.flatten() for b in t.layers])
    assert abs(w.std().item() - out_std) / out_std < 0.05
    assert abs(v.std().item() - 0.02) / 0.02 < 0.05
    assert all(bool((b.attn_norm.weight == 1).all()) for b in t.layers)
