"""ERNIE 3.0's network: recurrence memory against the concatenated sequence, stop-gradient, padding,
KV-cached generation."""

from __future__ import annotations

import pytest
import torch

from models.ernie3 import Ernie3, Ernie3Config, num_reorder_classes


def net(**kw) -> Ernie3:
    torch.manual_seed(0)
    return Ernie3(Ernie3Config(vocab_size=50, mem_len=8, **kw)).eval()


def test_shifted_memory_segments_equal_the_concatenated_sequence():
    # Transformer-XL memory (each layer's inputs of the previous segment) with mem_len >= the segment:
    # segment 2 sees exactly what it sees inside the whole sequence processed at once (causal)
    m = net(recurrence="shifted")
    x = torch.randint(0, 50, (2, 16))
    full, _ = m.forward_nlg(x, use_memory=False)
    h1, mem = m.forward_nlg(x[:, :8])
    h2, mem2 = m.forward_nlg(x[:, 8:], mem)
    torch.testing.assert_close(torch.cat([h1, h2], 1), full, rtol=1e-5, atol=1e-5)
    assert mem2.next_pos == 16 and all(t.shape == (2, 8, 64) for t in mem2.universal)


def test_same_layer_memory_sees_more_than_the_segment_and_memory_off_sees_less():
    m = net(recurrence="same_layer")
    x = torch.randint(0, 50, (2, 16))
    _, mem = m.forward_nlg(x[:, :8])
    with_mem, _ = m.forward_nlg(x[:, 8:], mem)
    alone, _ = m.forward_nlg(x[:, 8:], mem, use_memory=False)
    assert not torch.allclose(with_mem, alone)
    # the first segment does not depend on whether memory is on
    torch.testing.assert_close(m.forward_nlg(x[:, :8])[0], m.forward_nlg(x[:, :8], use_memory=False)[0])


@pytest.mark.parametrize("recurrence", ["same_layer", "shifted"])
def test_no_gradient_flows_into_memory(recurrence):
    m = net(recurrence=recurrence).train()
    x = torch.randint(0, 50, (2, 16))
    h1, mem = m.forward_nlg(x[:, :8])
    assert all(not t.requires_grad for t in mem.universal + mem.nlg)
    h2, _ = m.forward_nlg(x[:, 8:], mem)
    (grad,) = torch.autograd.grad(h2.sum(), h1, allow_unused=True)
    assert grad is None


def test_nlu_ignores_padding_and_is_bidirectional():
    m = net()
    x = torch.randint(0, 50, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 7:] = False
    h = m.forward_nlu(x, valid)
    torch.testing.assert_close(h[1, :7], m.forward_nlu(x[1:, :7])[0], rtol=1e-5, atol=1e-5)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 50
    assert not torch.allclose(m.forward_nlu(y)[:, 0], m.forward_nlu(x)[:, 0])  # the first token sees the last


def test_kv_cached_generation_equals_uncached_and_config_errors():
    m = net()
    prompt = torch.randint(0, 50, (2, 4))
    assert torch.equal(m.generate(prompt, 6, temperature=0.0), m.generate(prompt, 6, temperature=0.0, use_cache=False))
    assert num_reorder_classes(3) == 9 and m.reorder_head.out_features == 9
    with pytest.raises(ValueError, match="recurrence"):
        Ernie3Config(recurrence="xl")
    with pytest.raises(ValueError, match="task_d_model"):
        Ernie3Config(task_d_model=30, task_heads=4)
