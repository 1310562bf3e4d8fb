"""Audio tokenizer details not covered by test_audio_and_vq.py: rates, Griffin-Lim length, state."""

from __future__ import annotations

import pytest
import torch

from models.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig, MuLawTokenizer


@pytest.mark.parametrize("bits", [4, 8])
def test_mulaw_vocab_range_and_silence(bits):
    tok = MuLawTokenizer(bits)
    wave = torch.rand(3, 500) * 2 - 1
    codes = tok.encode(wave)
    assert tok.vocab_size == 2**bits and codes.shape == wave.shape and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits
    # companding puts the finest steps near zero: silence comes back (almost) silent
    assert tok.decode(tok.encode(torch.zeros(1, 10))).abs().max() < 0.02


def test_codes_per_second_follows_hop_and_downsample():
    cfg = AudioTokenizerConfig(preset="tiny", hop_length=320, downsample=4)
    tok = AudioTokenizer(cfg).eval()
    assert tok.codes_per_second == pytest.approx(16000 / 320 / 4)
    codes = tok.encode(torch.zeros(1, 32000))
    # 2 s at 12.5 codes/s (the last mel frame of the centred STFT is padded into one more token frame)
    assert codes.shape == (1, 26, cfg.num_quantizers) and tok.vocab_size == cfg.codebook_size


def test_griffin_lim_length_and_state_dict_stable():
    cfg = AudioTokenizerConfig(preset="tiny", griffin_lim_iters=4)
    tok = AudioTokenizer(cfg).eval()
    keys = set(tok.state_dict())
    wave = torch.rand(2, 8000) * 2 - 1
    mel = tok.decode(tok.encode(wave))
    rec = tok.mel_to_wave(mel)
    # centred STFT: S frames invert to hop * (S - 1) samples
    assert rec.shape == (2, cfg.hop_length * (mel.shape[-1] - 1)) and torch.isfinite(rec).all()
    assert tok.decode_wave(tok.encode(wave), num_samples=8000).shape == (2, 8000)
    # Regression: the lazily built Griffin-Lim must not add buffers to state_dict, else a checkpoint
    # saved after logging audio does not load into a fresh tokenizer.
    assert set(tok.state_dict()) == keys
    AudioTokenizer(cfg).load_state_dict(tok.state_dict())
