"""The multi-scale visual tokenizer: round trips, causality, chunking, inflation, step-wise API."""

from __future__ import annotations

import pytest
import torch

from models.tokenizers.multiscale import MultiScaleQuantizer, QuantizerConfig, flip_bits, parse_scales
from models.tokenizers.visual import TokenizerConfig, VisualTokenizer, inflate_2d_to_3d


def _video(cfg: TokenizerConfig, b: int = 2, latents: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = 1 + (latents - 1) * cfg.time_stride
    hw = cfg.scales[-1][0] * cfg.spatial_factor
    return torch.rand(b, 3, t, hw, hw, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def tok() -> VisualTokenizer:
    torch.manual_seed(0)
    return VisualTokenizer(TokenizerConfig(preset="tiny")).eval()


def test_round_trip_shapes_dtypes_ranges(tok):
    v = _video(tok.cfg)
    tokens = tok.encode(v)
    assert len(tokens) == len(tok.scales)
    for (h, w), t in zip(tok.scales, tokens):
        assert t.shape == (2, 3, h, w, tok.cfg.dim) and t.dtype == torch.uint8
        assert set(t.unique().tolist()) <= {0, 1}
    rec = tok.decode(tokens)
    assert rec.shape == v.shape and rec.dtype == torch.float32
    out = tok(v)
    assert out["recon"].shape == v.shape
    assert torch.allclose(out["recon"], rec, atol=1e-5)  # training pass decodes the same tokens


def test_vq_option_round_trip():
    torch.manual_seed(0)
    tok = VisualTokenizer(TokenizerConfig(preset="tiny", quantizer="vq", codebook_size=64)).eval()
    v = _video(tok.cfg)
    tokens = tok.encode(v)
    for (h, w), t in zip(tok.scales, tokens):
        assert t.shape == (2, 3, h, w) and t.dtype == torch.long
        assert 0 <= int(t.min()) and int(t.max()) < 64
    assert tok.decode(tokens).shape == v.shape


def test_causal_future_frames_never_change_past_tokens(tok):
    v = _video(tok.cfg, latents=3)
    base = tok.encode(v)
    v2 = v.clone()
    v2[:, :, -tok.cfg.time_stride:] = torch.rand_like(v2[:, :, -tok.cfg.time_stride:])  # last latent's frames
    new = tok.encode(v2)
    for a, b in zip(base, new):
        assert torch.equal(a[:, :2], b[:, :2])
    assert any(not torch.equal(a[:, 2], b[:, 2]) for a, b in zip(base, new))
    # and the decoder: changing the last latent frame leaves earlier output frames unchanged
    z = tok.encode_features(v)
    z2 = z.clone()
    z2[:, :, -1] += 1.0
    d1, d2 = tok.decode_features(z), tok.decode_features(z2)
    keep = 1 + tok.cfg.time_stride
    assert torch.equal(d1[:, :, :keep], d2[:, :, :keep]) and not torch.equal(d1, d2)


@pytest.mark.parametrize("chunk_latents", [1, 2])
def test_chunked_encoding_equals_full(tok, chunk_latents):
    v = _video(tok.cfg, latents=5)
    full = tok.encode(v)
    chunked = tok.encode_chunked(v, chunk_latents=chunk_latents)
    assert all(torch.equal(a, b) for a, b in zip(full, chunked))
    # streaming the decoder chunk by chunk also equals the full decode
    z = tok.encode_features(v)
    cache: dict = {}
    parts = [tok.decode_features(z[:, :, i:i + 1], cache) for i in range(z.shape[2])]
    assert torch.allclose(torch.cat(parts, dim=2), tok.decode_features(z), atol=1e-6)


def test_image_is_a_one_frame_video(tok):
    v = _video(tok.cfg, latents=1)
    assert v.shape[2] == 1
    img = v[:, :, 0]
    ti, tv = tok.encode(img), tok.encode(v)
    assert all(torch.equal(a, b) for a, b in zip(ti, tv))
    assert torch.allclose(tok(img)["recon"], tok(v)["recon"][:, :, 0])


def test_inflation_reproduces_image_tokenizer_on_one_frame():
    torch.manual_seed(1)
    image_tok = VisualTokenizer(TokenizerConfig(preset="tiny", video=False)).eval()
    # perturb every weight so the test is not passing on an initialisation symmetry
    with torch.no_grad():
        for p in image_tok.parameters():
            p.add_(0.05 * torch.randn_like(p))
    video_tok, fresh = inflate_2d_to_3d(image_tok, TokenizerConfig(preset="tiny", video=True))
    video_tok.eval()
    assert fresh and all(".time." in k for k in fresh)  # only temporal layers are new
    img = _video(image_tok.cfg, latents=1)[:, :, 0]
    assert torch.allclose(image_tok.encode_features(img), video_tok.encode_features(img), atol=1e-5)
    a, b = image_tok.encode(img), video_tok.encode(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.allclose(image_tok(img)["recon"], video_tok(img)["recon"], atol=1e-5)
    # the earlier temporal slices are fresh: a multi-frame clip is no longer frame-by-frame 2D
    clip = _video(video_tok.cfg, latents=2)
    assert video_tok.encode_features(clip).shape[2] == 2


def test_reconstruction_error_decreases_as_scales_are_added():
    # On a trained tokenizer this holds for pixels; for the quantizer alone it holds by construction
    # whenever each scale's code magnitude matches the residual, which we set here by least squares.
    torch.manual_seed(0)
    q = MultiScaleQuantizer(QuantizerConfig(dim=8, scales=[1, 2, 4, 8], phi="none")).eval()
    f = torch.randn(16, 8, 8, 8)
    with torch.no_grad():
        f_hat = torch.zeros_like(f)
        for k in range(q.num_scales):
            r = q.down(f - f_hat, k)
            q.quant.log_magnitude[k] = r.abs().mean().log()  # optimal L1 magnitude for sign codes
            f_hat = q.accumulate(f_hat, q.tokens_to_code(q.quantize_scale(f - f_hat, k).tokens, k), k)
        tokens = q.encode(f)
        errs = [torch.mean((q.decode(tokens[:k]) - f) ** 2).item() for k in range(1, q.num_scales + 1)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs


def test_step_wise_path_equals_encode():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(QuantizerConfig(dim=6, scales=[1, 2, 3, 5])).eval()
    f = torch.randn(3, 6, 5, 5)
    tokens, partial = q.encode(f, return_partial=True)
    with torch.no_grad():
        f_hat = torch.zeros_like(f)
        for k in range(q.num_scales):
            sq = q.quantize_scale(f - f_hat, k)
            assert torch.equal(sq.tokens, tokens[k])
            f_hat = q.accumulate(f_hat, q.tokens_to_code(sq.tokens, k), k)
            assert torch.allclose(f_hat, partial[k])
        assert torch.allclose(q.decode(tokens), f_hat)
        # teacher forcing features equal the encoder's accumulation, downsampled to the next scale
        inputs = q.teacher_forcing_inputs(tokens)
        assert len(inputs) == q.num_scales - 1
        for k, inp in enumerate(inputs):
            assert inp.shape[-2:] == q.scales[k + 1]
            assert torch.allclose(inp, q.next_input(partial[k], k + 1))


def test_flip_then_requantize_self_corrects():
    # Infinity's bitwise self-correction: after corrupting scale 1, the re-quantized scale-2 target is
    # the residual of the CORRUPTED reconstruction, so it differs from the clean encoding's.
    torch.manual_seed(0)
    q = MultiScaleQuantizer(QuantizerConfig(dim=16, scales=[2, 4], phi="none")).eval()
    f = torch.randn(4, 16, 4, 4)
    clean = q.encode(f)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t1 = flip_bits(clean[0], 0.5, g)
        f_hat = q.accumulate(torch.zeros_like(f), q.tokens_to_code(t1, 0), 0)
        t2 = q.quantize_scale(f - f_hat, 1).tokens
    assert not torch.equal(t1, clean[0]) and not torch.equal(t2, clean[1])
    assert torch.equal(flip_bits(clean[0], 0.0, g), clean[0])
    assert torch.equal(flip_bits(clean[0], 1.0, g), 1 - clean[0])


def test_training_pass_has_gradients_everywhere(tok):
    model = VisualTokenizer(TokenizerConfig(preset="tiny"))
    out = model(_video(model.cfg, latents=2))
    loss = out["recon"].pow(2).mean() + out["commit_loss"] + out["quant_loss"] + 0.1 * out["entropy_loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(preset="huge"), "model.net.preset"),
        (dict(time_stride=3), "model.net.time_stride"),
        (dict(scales=[4, 2]), "model.net.scales"),
        (dict(quantizer="fsq"), "model.net"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TokenizerConfig(**kwargs)


def test_grid_mismatch_is_a_clear_error():
    tok = VisualTokenizer(TokenizerConfig(preset="tiny", scales=[1, 2, 3])).eval()
    with pytest.raises(ValueError, match="latent grid"):
        tok.encode(torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="time_stride"):
        tok.encode(torch.zeros(1, 3, 4, 8, 8))
    assert parse_scales([1, (2, 3)]) == [(1, 1), (2, 3)]
