"""Index VQ, residual VQ, the mel RVQ audio tokenizer and the mu-law baseline."""

from __future__ import annotations

import pytest
import torch

from models.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig, MuLawTokenizer
from models.tokenizers.vq import ResidualVQ, VectorQuantizer, nearest_reference


@pytest.mark.parametrize("l2", [False, True])
def test_matmul_search_equals_cdist_reference(l2):
    torch.manual_seed(0)
    vq = VectorQuantizer(300, 12, l2_normalize=l2, search_chunk=100).eval()
    x = torch.randn(2, 257, 12)
    ref = nearest_reference(vq._prep(x), vq.codebook())
    assert torch.equal(vq.nearest(x), ref)
    assert vq.nearest(x).shape == (2, 257) and vq.nearest(x).dtype == torch.long


def test_straight_through_gradient_and_codebook_loss():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, l2_normalize=False, ema=False).train()
    x = torch.randn(32, 4, requires_grad=True)
    out = vq(x)
    assert torch.allclose(out.quantized, vq.lookup(out.indices))
    (out.quantized.sum() + out.loss).backward()
    assert x.grad is not None and vq.embed.grad is not None and vq.embed.grad.abs().sum() > 0


def test_ema_moves_codes_to_assigned_means_and_dead_codes_restart():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, l2_normalize=False, ema=True, ema_decay=0.5, dead_code_threshold=0.5).train()
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 50.0], [0.0, -50.0]]))
        vq.ema_sum.copy_(vq.embed * vq.ema_count[:, None])
    x = torch.cat([torch.tensor([[2.0, 0.0]]).repeat(8, 1), torch.tensor([[-2.0, 0.0]]).repeat(8, 1)])
    before = vq.embed.clone()
    for _ in range(6):
        vq(x)
    assert (vq.embed[0] - torch.tensor([2.0, 0.0])).norm() < (before[0] - torch.tensor([2.0, 0.0])).norm()
    # codes 2 and 3 are never chosen: their usage decays below the threshold and they restart onto data
    assert all(any(torch.allclose(vq.embed[c], row) for row in x) for c in (2, 3))


def test_residual_vq_error_falls_with_levels():
    torch.manual_seed(0)
    rvq = ResidualVQ(4, 32, 8, l2_normalize=False, ema=True).train()
    x = torch.randn(2048, 8)
    for _ in range(20):
        rvq(x)
    rvq.eval()
    idx = rvq.encode(x)
    assert idx.shape == (2048, 4) and int(idx.max()) < 32
    errs = [torch.mean((rvq.decode(idx, q) - x) ** 2).item() for q in range(1, 5)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert torch.allclose(rvq(x).quantized, rvq.decode(idx), atol=1e-6)


def test_mulaw_round_trip():
    tok = MuLawTokenizer()
    wave = torch.linspace(-1, 1, 1001)
    codes = tok.encode(wave)
    assert codes.dtype == torch.long and int(codes.min()) == 0 and int(codes.max()) == 255
    # mu-law 8 bit: the step near full scale is ~ 2 * ln(256) / 255 relative, i.e. < 4.5% of |x|
    err = (tok.decode(codes) - wave).abs()
    assert torch.all(err <= 0.045 * wave.abs() + 2e-3)


def test_audio_tokenizer_shapes_ranges_and_rates():
    torch.manual_seed(0)
    cfg = AudioTokenizerConfig(preset="tiny")
    tok = AudioTokenizer(cfg).eval()
    wave = torch.rand(2, 16000) * 2 - 1
    codes = tok.encode(wave)
    frames = -(-(16000 // cfg.hop_length + 1) // cfg.downsample)
    assert codes.shape == (2, frames, cfg.num_quantizers) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < cfg.codebook_size
    assert tok.codes_per_second == 50.0
    mel = tok.decode(codes)
    assert mel.shape == (2, cfg.n_mels, frames * cfg.downsample)
    out = tok(wave)
    assert out["mel"].shape == out["mel_hat"].shape == mel.shape
    wav = tok.decode_wave(codes, num_samples=16000)
    assert wav.shape == (2, 16000) and torch.isfinite(wav).all()


def test_log_mel_inverts_through_griffin_lim():
    # a pure tone survives log-mel -> inverse mel -> Griffin-Lim with its pitch intact
    cfg = AudioTokenizerConfig(preset="tiny", griffin_lim_iters=32)
    tok = AudioTokenizer(cfg).eval()
    t = torch.arange(16000) / 16000
    wave = 0.5 * torch.sin(2 * torch.pi * 440 * t)[None]
    rec = tok.mel_to_wave(tok.log_mel(wave), 16000)
    spec = torch.fft.rfft(rec[0]).abs()
    assert abs(int(spec.argmax()) - 440) <= 15


def test_bad_audio_config_names_the_key():
    with pytest.raises(ValueError, match="model.net.downsample"):
        AudioTokenizerConfig(downsample=3)
    with pytest.raises(ValueError, match="model.net.preset"):
        AudioTokenizerConfig(preset="huge")
