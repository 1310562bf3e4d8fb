"""Index VQ details not covered by test_audio_and_vq.py: gradients, statistics, EMA bookkeeping, state."""

from __future__ import annotations

import pytest
import torch

from models.tokenizers.vq import ResidualVQ, VectorQuantizer, nearest_reference


@pytest.mark.parametrize("l2", [False, True])
def test_chunked_search_matches_reference_for_any_leading_shape(l2):
    torch.manual_seed(1)
    vq = VectorQuantizer(37, 5, l2_normalize=l2, search_chunk=7).eval()  # chunk does not divide rows
    x = torch.randn(3, 4, 11, 5)
    idx = vq.nearest(x)
    assert idx.shape == (3, 4, 11) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < 37
    assert torch.equal(idx, nearest_reference(vq._prep(x), vq.codebook()))
    if l2:  # cosine VQ: the looked-up codes are unit vectors
        assert torch.allclose(vq.lookup(idx).norm(dim=-1), torch.ones(3, 4, 11), atol=1e-5)


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, l2_normalize=False, ema=True, restart_dead_codes=False).train()
    x = torch.randn(10, 3, requires_grad=True)
    w = torch.randn(10, 3)
    (vq(x).quantized * w).sum().backward()
    assert torch.allclose(x.grad, w)  # d quantized / d x = I, whatever code was picked


def test_statistics_ranges():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, l2_normalize=False).eval()
    out = vq(torch.randn(500, 4))
    assert 1.0 <= float(out.perplexity) <= 16.0 + 1e-4
    assert 0.0 < float(out.usage) <= 1.0
    # one input repeated: a single code, perplexity 1, usage 1/16
    out = vq(torch.randn(1, 4).repeat(50, 1))
    assert float(out.perplexity) == pytest.approx(1.0) and float(out.usage) == pytest.approx(1 / 16)
    assert float(out.loss.detach()) >= 0 and out.commit_loss.shape == ()


def test_ema_leaves_unassigned_codes_in_place():
    # Regression: ema_sum started equal to the codes while counts started at threshold + 1, so every
    # code not yet assigned shrank by 1 / count on the first update.
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, l2_normalize=False, ema=True).train()
    before = vq.embed.clone()
    vq(before[:1].repeat(16, 1))  # everything goes to code 0
    assert torch.allclose(vq.embed[1:], before[1:], atol=1e-5)
    assert torch.allclose(vq.embed[0], before[0], atol=1e-5)  # its mean is itself


def test_eval_mode_never_updates_and_state_dict_round_trips():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, l2_normalize=True, ema=True, dead_code_threshold=50.0).train()
    vq(torch.randn(64, 4))
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    assert {"embed", "ema_sum", "ema_count"} <= set(state)
    vq.eval()
    vq(torch.randn(64, 4))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())
    fresh = VectorQuantizer(8, 4, l2_normalize=True, ema=True, dead_code_threshold=50.0)
    fresh.load_state_dict(state)
    x = torch.randn(20, 4)
    assert torch.equal(fresh.eval().nearest(x), vq.nearest(x))


def test_dead_code_restart_is_deterministic_under_the_global_seed():
    def run() -> torch.Tensor:
        torch.manual_seed(3)
        vq = VectorQuantizer(32, 4, l2_normalize=False, ema=True, ema_decay=0.5, dead_code_threshold=1.5).train()
        x = torch.randn(64, 4)
        for _ in range(3):
            vq(x)
        return vq.embed.clone()

    a, b = run(), run()
    assert torch.equal(a, b)


def test_residual_vq_shapes_and_partial_decode():
    torch.manual_seed(0)
    rvq = ResidualVQ(3, 16, 6, l2_normalize=False, ema=False).train()
    x = torch.randn(2, 5, 6, requires_grad=True)
    out = rvq(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 5, 3) and len(out.perplexity) == 3
    out.loss.backward()  # codebook term reaches every level's codebook
    assert all(vq.embed.grad is not None and vq.embed.grad.abs().sum() > 0 for vq in rvq.levels)
    idx = rvq.encode(x.detach())
    assert torch.allclose(rvq.decode(idx, num_levels=1), rvq.levels[0].lookup(idx[..., 0]))
