"""VideoAR network pieces: block mask, MST-RoPE, KV-cached generation, CFEC teacher forcing, sparse FFNs."""

from __future__ import annotations

import pytest
import torch

from models.layers.mask import AttentionMask, block_layout, frame_mask_keep, reference_video_mask
from models.layers.positions import sequence_positions
from models.layers.rope import Rotary, apply_rotary, axis_pairs
from models.tokenizers.visual import TokenizerConfig, VisualTokenizer
from models.videoar import (
    CFECConfig,
    GuidanceSchedule,
    VideoAR,
    VideoARConfig,
    bitwise_loss,
    sample_bits,
    scale_token_weights,
    teacher_forcing_sequence,
)

SCALES = [(1, 1), (2, 2), (3, 3)]


@pytest.fixture(scope="module")
def tok() -> VisualTokenizer:
    torch.manual_seed(0)
    return VisualTokenizer(TokenizerConfig(preset="tiny")).eval()


@pytest.fixture(scope="module")
def model(tok) -> VideoAR:
    torch.manual_seed(1)
    cfg = VideoARConfig(preset="tiny", bits=tok.cfg.dim, scales=tok.cfg.scales, num_classes=4, cond_len=2)
    m = VideoAR(cfg).eval()
    with torch.no_grad():  # break the zero-init symmetry of the head / sos so logits vary
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _feats(tok, b=2, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(b, 3, 1 + (frames - 1) * tok.cfg.time_stride, 16, 16, generator=g) * 2 - 1
    return tok.encode_features(v).transpose(1, 2), v


# ------------------------------------------------------------------------------------ mask


def _video_mask(block, frame, keep=None, window=None):
    """The VideoAR mask description, materialised as SDPA's dense booleans [B|1, L, L]."""
    L = block.numel()
    if keep is None and window is None:
        return AttentionMask.blocks(block).dense(L, L)[:, 0]
    return AttentionMask.blocks(block, frame_ids=frame, frame_keep=keep, frame_window=window).dense(L, L)[:, 0]


@pytest.mark.parametrize("window", [None, 1])
def test_block_mask_equals_explicit_construction(window):
    n, T = 3, 4
    block, frame = block_layout(n, SCALES, T)
    fast = _video_mask(block, frame, window=window)[0]
    assert torch.equal(fast, reference_video_mask(n, SCALES, T, window=window))
    keep = frame_mask_keep(2, T, 0.5, torch.Generator().manual_seed(0))
    fast = _video_mask(block, frame, keep, window)
    assert fast.shape == (2, block.numel(), block.numel())
    assert torch.equal(fast, reference_video_mask(n, SCALES, T, keep, window))


def test_random_frame_mask_hides_exactly_the_sampled_frames():
    n, T = 2, 4
    block, frame = block_layout(n, SCALES, T)
    keep = torch.ones(1, T, T, dtype=torch.bool)
    keep[0, 3, 1] = False  # frame 3 may not see frame 1
    keep[0, 2, 2] = False  # a query's own frame is never hidden
    keep[0, 1, 3] = False  # nor a later frame's entry (it is not visible anyway)
    m = _video_mask(block, frame, keep)[0]
    base = _video_mask(block, frame)[0]
    diff = base & ~m
    q, k = diff.nonzero(as_tuple=True)
    assert q.numel() > 0 and bool((frame[q] == 3).all()) and bool((frame[k] == 1).all())
    assert int(diff.sum()) == (frame == 3).sum() * (frame == 1).sum()
    assert bool(m[:, :n].all())  # the condition prefix is always visible


# ------------------------------------------------------------------------------------ RoPE


def test_mst_rope_positions_match_the_paper_figure():
    # papers.md / VideoAR Fig. 2: 5 text tokens, scales 1x1 and 2x2, two frames
    pos = sequence_positions(5, [(1, 1), (2, 2)], 2, "raw").long().tolist()
    assert pos[:5] == [[i, i, i] for i in range(5)]
    assert pos[5] == [5, 5, 5]
    assert pos[6:10] == [[5, 5, 5], [5, 5, 6], [5, 6, 5], [5, 6, 6]]
    assert pos[10] == [6, 5, 5]
    assert pos[11:15] == [[6, 5, 5], [6, 5, 6], [6, 6, 5], [6, 6, 6]]
    # ERNIE 5.0's centre-aligned layout puts the 1x1 scale at the centre of the 2x2 grid
    centre = sequence_positions(5, [(1, 1), (2, 2)], 1, "center")
    assert centre[5].tolist() == [5.0, 5.5, 5.5]
    assert axis_pairs(16, [0.25, 0.375, 0.375]) == (2, 3, 3)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = Rotary(16, split=[0.25, 0.375, 0.375])
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([pq], dtype=torch.float64))
        ck, sk = rope(torch.tensor([pk], dtype=torch.float64))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    a = score([3, 1, 2], [1, 0, 5])
    b = score([10, 7, 9], [8, 6, 12])  # both shifted by (7, 6, 7)
    assert abs(a - b) < 1e-5
    assert abs(a - score([3, 1, 2], [1, 0, 6])) > 1e-4  # but not invariant to the difference itself
    # text tokens at (i, i, i) behave as 1-D RoPE: again only i - j matters
    assert abs(score([4, 4, 4], [1, 1, 1]) - score([9, 9, 9], [6, 6, 6])) < 1e-5
    # fractional positions (ERNIE 5.0's centre layout) too
    assert abs(score([3, 1.25, 2.5], [1, 0.75, 5]) - score([10, 8.25, 9.5], [8, 7.75, 12])) < 1e-5


# ------------------------------------------------------------------------------------ generation


def test_kv_cached_generation_equals_uncached_and_teacher_forced_forward(tok, model):
    labels = torch.tensor([0, 3])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    cached, lc = model.generate(tok.quantizer, labels, 3, generator=g1, return_logits=True)
    uncached, lu = model.generate(tok.quantizer, labels, 3, generator=g2, return_logits=True, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    assert max((a - b).abs().max().item() for a, b in zip(lc, lu)) <= 1e-5
    # the same tokens teacher-forced through the full forward give the same logits
    feats = tok.tokens_to_features(cached).transpose(1, 2)  # [B, T, d, H, W]
    inputs = []
    for t in range(3):
        f_hat = torch.zeros_like(feats[:, 0])
        for k in range(len(model.scales)):
            if k == 0:
                prev = torch.zeros_like(f_hat) if t == 0 else prev_full
                inputs.append(tok.quantizer.next_input(prev, 0).flatten(2).transpose(1, 2))
            else:
                inputs.append(tok.quantizer.next_input(f_hat, k).flatten(2).transpose(1, 2))
            f_hat = tok.quantizer.accumulate(f_hat, tok.quantizer.tokens_to_code(cached[k][:, t], k), k)
        prev_full = f_hat
    full = model(torch.cat(inputs, 1), labels, 3)
    assert (full - torch.cat(lc, 1)).abs().max().item() <= 1e-5


def test_generation_is_deterministic_under_a_generator_and_uses_guidance(tok, model):
    labels = torch.tensor([1, 2])
    sched = GuidanceSchedule(1.0, 3.0, 5.0)
    a = model.generate(tok.quantizer, labels, 2, guidance=sched, generator=torch.Generator().manual_seed(3))
    b = model.generate(tok.quantizer, labels, 2, guidance=sched, generator=torch.Generator().manual_seed(3))
    c = model.generate(tok.quantizer, labels, 2, guidance=sched, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert sched(0, 0, 5, 3) == 1.0 and sched(4, 0, 5, 3) == 3.0 and sched(4, 2, 5, 3) == 5.0
    assert sched(2, 1, 5, 3) == pytest.approx(3.5)
    # continuation: given frames are kept verbatim
    cont = model.generate(tok.quantizer, labels, 3, prefix_tokens=[t[:, :2] for t in a],
                          generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(x[:, :2], y) for x, y in zip(cont, a))


def test_sample_bits_greedy_and_nucleus():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    assert sample_bits(logits, top_k=1).tolist() == [[0, 1]]
    assert sample_bits(logits, temperature=0.0).tolist() == [[0, 1]]
    g = torch.Generator().manual_seed(0)
    many = sample_bits(logits.expand(4000, 2, 2), top_p=0.5, generator=g)  # likelier bit covers 0.5
    assert many[:, 0].sum() == 0 and many[:, 1].sum() == 4000


# ------------------------------------------------------------------------------------ CFEC


def test_without_flips_inputs_and_labels_are_plain_teacher_forcing(tok):
    feats, video = _feats(tok)
    out = teacher_forcing_sequence(tok.quantizer, feats, CFECConfig(enabled=False))
    tokens = tok.encode(video)
    B, T, K = 2, 3, len(tok.scales)
    labels = torch.cat([torch.cat([tokens[k][:, t].reshape(B, -1, tok.cfg.dim) for k in range(K)], 1)
                        for t in range(T)], 1)
    assert torch.equal(out["labels"], labels)
    assert float(out["flip_p"].abs().sum()) == 0.0
    # inputs: scales 2..K from the quantizer's teacher-forcing path; scale 1 of frame t from frame t-1
    sizes = [h * w for h, w in tok.scales]
    per_frame = sum(sizes)
    for t in range(T):
        tf = tok.quantizer.teacher_forcing_inputs([tokens[k][:, t] for k in range(K)])
        for k in range(1, K):
            start = t * per_frame + sum(sizes[:k])
            got = out["inputs"][:, start:start + sizes[k]]
            assert torch.allclose(got, tf[k - 1].flatten(2).transpose(1, 2), atol=1e-6)
        if t > 0:
            prev = tok.quantizer.decode([tokens[k][:, t - 1] for k in range(K)])
            got = out["inputs"][:, t * per_frame:t * per_frame + sizes[0]]
            assert torch.allclose(got, tok.quantizer.next_input(prev, 0).flatten(2).transpose(1, 2), atol=1e-6)


def test_flips_requantize_later_scales_hand_computed(tok):
    # p_min = p_max = 1: every bit of every scale is flipped, deterministically.
    feats, _ = _feats(tok, b=1, frames=2)
    cfec = CFECConfig(enabled=True, p_min=1.0, p_max=1.0, delta=0.0, inherit=False)
    out = teacher_forcing_sequence(tok.quantizer, feats, cfec, torch.Generator().manual_seed(0))
    q = tok.quantizer
    f = feats[:, 0]
    b0 = q.quantize_scale(f, 0).tokens
    f_hat = q.accumulate(torch.zeros_like(f), q.tokens_to_code(1 - b0, 0), 0)  # the corrupted code is used
    b1 = q.quantize_scale(f - f_hat, 1).tokens                                  # label = re-quantized residual
    n0 = 1
    assert torch.equal(out["labels"][:, :n0], b0.reshape(1, -1, tok.cfg.dim))
    assert torch.equal(out["labels"][:, n0:n0 + 4], b1.reshape(1, -1, tok.cfg.dim))
    clean_b1 = q.encode(f)[1]
    assert not torch.equal(b1, clean_b1)  # self-correcting, not the clean encoding's bits
    # the next scale's input is built from the corrupted reconstruction
    assert torch.allclose(out["inputs"][:, n0:n0 + 4], q.next_input(f_hat, 1).flatten(2).transpose(1, 2), atol=1e-6)
    assert torch.all(out["flip_p"] == 1.0)


def test_time_dependence_and_inheritance_bounds(tok):
    feats, _ = _feats(tok, b=64, frames=3)
    cfec = CFECConfig(enabled=True, p_min=0.0, p_max=0.25, delta=0.05, inherit=True)
    p = teacher_forcing_sequence(tok.quantizer, feats, cfec, torch.Generator().manual_seed(0))["flip_p"]
    K = p.shape[2]
    for t in range(3):
        hi = 0.25 + 0.05 * t
        assert bool((p[:, t] <= hi + 1e-6).all())
        assert bool((p[:, t, 1:] >= 0.05 * t - 1e-6).all())
        if t > 0:
            assert bool((p[:, t, 0] >= p[:, t - 1, K - 1] - 1e-6).all())  # inherited lower bound
    assert p[:, 2].mean() > p[:, 0].mean()  # later frames are corrupted more
    off = CFECConfig(enabled=True, p_min=0.0, p_max=0.25, delta=0.05, time_dependent=False, inherit=False)
    p2 = teacher_forcing_sequence(tok.quantizer, feats, off, torch.Generator().manual_seed(0))["flip_p"]
    assert bool((p2 <= 0.25 + 1e-6).all())


def test_losses_and_weights():
    w = scale_token_weights(SCALES, 2, "infinity")
    assert w.shape == (2 * 14,) and abs(w.sum().item() - 1) < 1e-6 and w[0] > w[-1]
    assert torch.allclose(scale_token_weights(SCALES, 2, "uniform"), torch.full((28,), 1 / 28))
    logits = torch.zeros(1, 28, 4, 2)
    loss, per_tok = bitwise_loss(logits, torch.zeros(1, 28, 4, dtype=torch.uint8), w)
    assert abs(loss.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6 and per_tok.shape == (1, 28)


# ------------------------------------------------------------------------------------ on the trunk


@pytest.mark.parametrize("rope", ["mst", "1d", "center"])
@pytest.mark.parametrize("ffn", ["dense", "moe", "moue"])
def test_every_ffn_and_rope_layout_generates_with_cache_equal_to_uncached(tok, ffn, rope):
    torch.manual_seed(2)
    cfg = VideoARConfig(preset="tiny", bits=tok.cfg.dim, scales=tok.cfg.scales, num_classes=4, ffn=ffn, rope=rope,
                        moe=dict(num_experts=4, top_k=2, expert_hidden=32), moue=dict(window=2, state_dim=8))
    m = VideoAR(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    labels = torch.tensor([0, 3])
    a, la = m.generate(tok.quantizer, labels, 2, generator=torch.Generator().manual_seed(5), return_logits=True,
                       guidance=2.0)
    b, lb = m.generate(tok.quantizer, labels, 2, generator=torch.Generator().manual_seed(5), return_logits=True,
                       guidance=2.0, use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert max((x - y).abs().max().item() for x, y in zip(la, lb)) <= 1e-5
    feats = torch.randn(2, 2 * cfg.frame_tokens, cfg.bits)
    logits, balance, routing = m.train()(feats, labels, 2, return_routing=True)
    assert logits.shape == (2, 2 * cfg.frame_tokens, cfg.bits, 2)
    assert (len(routing) == 2 and balance > 0) if ffn != "dense" else (not routing and balance == 0)
    if rope == "center":  # fractional positions reach the rotary tables
        assert not torch.equal(m.positions(1), m.positions(1).round())
