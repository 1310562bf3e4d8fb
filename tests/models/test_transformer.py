import pytest
import torch

from models.transformer import PRESETS, Transformer, TransformerConfig, sample_next


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(preset="tiny", vocab_size=97, max_seq_len=64, **kw)).eval()


def test_presets_fill_missing_fields_and_overrides_win():
    cfg = TransformerConfig(preset="small", vocab_size=10, n_layers=3)
    assert cfg.n_layers == 3 and cfg.d_model == PRESETS["small"]["d_model"]
    assert cfg.ffn_hidden % 32 == 0 and cfg.ffn_hidden >= 8 * cfg.d_model // 3


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(preset="huge"), "preset"),
        (dict(d_model=60, n_heads=8), "divisible"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_config_validation_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(vocab_size=10, **kw)


def test_shapes_and_param_counts():
    m = tiny()
    x = torch.randint(0, 97, (3, 17))
    assert m(x).shape == (3, 17, 97)
    counts = m.num_params()
    assert counts["total"] == counts["activated"] == sum(p.numel() for p in m.parameters())
    untied = tiny(tie_embeddings=False).num_params()["total"]
    assert untied - counts["total"] == 97 * m.cfg.d_model


def test_causal_mask_future_tokens_do_not_change_past_logits():
    m = tiny()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_matches_uncached_forward(n_kv_heads):
    m = tiny(n_kv_heads=n_kv_heads)
    x = torch.randint(0, 97, (2, 24))
    full = m(x)
    cache = m.new_cache(2, 24)
    # prefill, a chunk, then one token at a time
    parts = [m(x[:, :10], cache, 0), m(x[:, 10:16], cache, 10)]
    parts += [m(x[:, t : t + 1], cache, t) for t in range(16, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", [dict(temperature=0.0), dict(temperature=1.0, top_k=5), dict(temperature=0.9, top_p=0.8)])
def test_generate_with_cache_equals_without(opts):
    m = tiny()
    prompt = torch.randint(0, 97, (3, 5))
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        outs.append(m.generate(prompt, 20, generator=g, use_cache=use_cache, **opts))
    assert outs[0].shape == (3, 25)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :5], prompt)


def test_generate_is_reproducible_with_generator_and_keeps_eos():
    m = tiny()
    prompt = torch.randint(0, 97, (2, 3))
    a = m.generate(prompt, 15, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 15, generator=torch.Generator().manual_seed(1))
    c = m.generate(prompt, 15, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    eos = int(a[0, 5])
    d = m.generate(prompt, 15, generator=torch.Generator().manual_seed(1), eos_id=eos)
    first = (d[0, 3:] == eos).nonzero()[0].item() + 3
    assert (d[0, first:] == eos).all()


def test_sample_next_filters():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    # probs ~ [0.71, 0.26, 0.013, ...]: the first token alone does not reach 0.9, two tokens do
    assert set(sample_next(logits, 1.0, top_p=0.9, generator=g).tolist()) <= {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert (sample_next(logits, 0.0) == 0).all()


def test_dropout_only_in_training():
    m = tiny(dropout=0.5)
    x = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_max_seq_len_is_enforced():
    m = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 65, dtype=torch.long))
