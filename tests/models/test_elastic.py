"""Elastic sub-models of the trunk: width masks, top-k, depth subsets, expert choice, parameter counts."""

from __future__ import annotations

import pytest
import torch

from models.layers.elastic import RoutingLimit, depth_layers, keep_experts, sample_depth_layers
from models.moe.router import Router
from models.transformer import Transformer, TransformerConfig, distill_loss, lm_loss


def moe_lm(ffn: str = "moe", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(preset="tiny", vocab_size=64, n_layers=4, ffn=ffn,
               moe=dict(num_experts=6, top_k=3, expert_hidden=16, num_shared=kw.pop("num_shared", 0)))
    if ffn == "moue":
        cfg["moue"] = dict(window=2, state_dim=8)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg)).eval()


def test_router_top_k_override_and_masked_experts_are_never_picked_nor_trained():
    torch.manual_seed(0)
    r = Router(8, 6, 3)
    x = torch.randn(50, 8)
    mask = torch.tensor([0.0, float("-inf"), 0.0, float("-inf"), 0.0, 0.0])
    out = r(x, mask, top_k=2)
    assert out.topk_idx.shape == (50, 2)
    assert not torch.isin(out.topk_idx, torch.tensor([1, 3])).any()
    torch.testing.assert_close(out.topk_weight.sum(-1), torch.ones(50))
    out.topk_weight.sum().backward()
    assert r.weight.grad[[1, 3]].abs().sum() == 0 and r.weight.grad[[0, 2, 4, 5]].abs().sum() > 0
    assert r(x).topk_idx.shape == (50, 3)  # the configured k when not overridden


@pytest.mark.parametrize("ffn", ["moe", "moue"])
def test_full_limit_equals_the_full_model(ffn):
    model = moe_lm(ffn)
    x = torch.randint(0, 64, (2, 12))
    full = model(x)
    E = model.trunk.num_experts
    same = RoutingLimit([list(range(E))] * 4, model.cfg.moe.top_k)
    torch.testing.assert_close(model(x, routing=same), full, rtol=0, atol=0)
    torch.testing.assert_close(model(x, layers=[0, 1, 2, 3]), full, rtol=0, atol=0)
    assert not torch.allclose(model(x, routing=RoutingLimit(top_k=1)), full)


def test_width_limit_matches_a_slow_reference_and_sends_no_gradient_to_dropped_experts():
    model = moe_lm().train()
    x = torch.randint(0, 64, (2, 10))
    kept = [[0, 2, 5], [1, 2, 3], [0, 1, 4], [3, 4, 5]]
    logits, _, infos = model(x, return_routing=True, routing=RoutingLimit(kept, 2))
    for info, ids in zip(infos, kept):
        outside = [e for e in range(6) if e not in ids]
        assert info.counts[outside].sum() == 0 and info.counts.sum() == 2 * x.numel()
    lm_loss(logits, x).backward()
    for layer, ids in zip(model.trunk.layers, kept):
        outside = [e for e in range(6) if e not in ids]
        assert layer.ffn.experts.w13.grad[outside].abs().sum() == 0
        assert layer.ffn.router.weight.grad[outside].abs().sum() == 0
        assert layer.ffn.experts.w13.grad[ids].abs().sum() > 0
    # reference: each layer's MoE rebuilt by hand from the kept experts (a loop over tokens)
    model.eval()
    h = model.tok_emb(x)
    positions = torch.arange(x.shape[1])
    rope = model.trunk.rope(positions)
    from models.layers.mask import AttentionMask

    plan = AttentionMask().plan(x.shape[1], x.shape[1], 0, "sdpa", x.device)
    for layer, ids in zip(model.trunk.layers, kept):
        h = h + layer.attn(layer.attn_norm(h), rope, plan)
        z = layer.ffn_norm(h).reshape(-1, h.shape[-1])
        ffn = layer.ffn
        probs = (z @ ffn.router.weight[ids].T).softmax(-1)
        w, idx = probs.topk(2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(z)
        for n in range(z.shape[0]):
            for j in range(2):
                e = ids[int(idx[n, j])]
                a, b = ffn.experts.w13[e].chunk(2, dim=-1)
                y[n] += w[n, j] * ((torch.nn.functional.silu(z[n] @ a) * (z[n] @ b)) @ ffn.experts.w2[e])
        h = h + y.view_as(h)
    ref = model.lm_head(model.trunk.norm(h))
    torch.testing.assert_close(model(x, routing=RoutingLimit(kept, 2)), ref, rtol=1e-4, atol=1e-5)


def test_limits_that_cannot_route_are_errors():
    model = moe_lm()
    x = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="keeps 2 routable experts but top_k=3"):
        model(x, routing=RoutingLimit([[0, 1]] * 4))
    with pytest.raises(ValueError, match="must list all 4 layers"):
        model(x, routing=RoutingLimit([[0, 1, 2]]))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        RoutingLimit(top_k=0)
    dense = moe_lm("dense")
    with pytest.raises(ValueError, match="needs a sparse FFN"):
        dense(x, routing=RoutingLimit(top_k=1))
    moue = moe_lm("moue")  # pool of 4 blocks x 6; each layer sees a window of 2 blocks (12 experts)
    window0 = moue.trunk.pool.routing.candidates[0]
    outside0 = [e for e in range(24) if e not in window0]
    with pytest.raises(ValueError, match="layer 0 keeps 0 routable experts"):
        moue(x, routing=RoutingLimit([outside0] + [window0] * 3))


def test_moue_width_and_top_k_limits_route_inside_both_window_and_kept_set():
    model = moe_lm("moue").train()
    cand = model.trunk.pool.routing.candidates
    kept = keep_experts(4, 24, 4, "prefix", candidates=cand)
    assert all(set(k) <= set(c) and len(k) == 4 for k, c in zip(kept, cand))
    _, _, infos = model(torch.randint(0, 64, (2, 8)), return_routing=True, routing=RoutingLimit(kept, 1))
    for info, ids in zip(infos, kept):
        assert info.counts.sum() == 16 and info.counts[[e for e in range(24) if e not in ids]].sum() == 0


def test_depth_layers_keep_first_and_last_and_drop_one_contiguous_span():
    assert depth_layers(4, 4) == [0, 1, 2, 3]
    assert depth_layers(4, 3) == [0, 1, 3]
    assert depth_layers(4, 2) == [0, 3]
    assert depth_layers(8, 5) == [0, 1, 5, 6, 7] or depth_layers(8, 5) == [0, 1, 2, 6, 7]
    assert depth_layers(5, 1) == [0]
    with pytest.raises(ValueError, match=r"depth must be in \[1, 4\]"):
        depth_layers(4, 5)
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        run = sample_depth_layers(8, 5, g)
        assert len(run) == 5 and run[0] == 0 and run[-1] == 7
        dropped = sorted(set(range(8)) - set(run))
        assert dropped == list(range(dropped[0], dropped[0] + 3))
        seen.add(dropped[0])
    assert seen == {1, 2, 3, 4}  # every span position is drawn


def test_keep_experts_usage_and_prefix_rules():
    usage = torch.tensor([[5.0, 1, 9, 0], [0, 0, 0, 0], [1, 2, 2, 1]])
    assert keep_experts(2, 4, 3, "usage", usage) == [[0, 2], [0, 1], [1, 2]]
    assert keep_experts(2, 4, 3, "prefix", usage) == [[0, 1]] * 3
    assert keep_experts(2, 4, 3, "usage", None) == [[0, 1]] * 3  # no statistics yet: the prefix
    with pytest.raises(ValueError, match=r"experts kept must be in \[1, 4\]"):
        keep_experts(5, 4, 3)


def test_sub_model_parameter_counts():
    model = moe_lm(num_shared=1)
    full = model.num_params()
    assert model.num_params(None, RoutingLimit()) == full
    sub = model.num_params([0, 3], RoutingLimit([[0, 1, 2]] * 4, 1))
    per_expert, d = 3 * 64 * 16, 64
    block = sum(p.numel() for p in model.trunk.layers[1].parameters())
    assert sub["total"] == full["total"] - 2 * block - 2 * 3 * (per_expert + d)
    # activated: two layers fewer (each activating block - 3 idle experts); in the two kept layers,
    # three experts and their router rows gone and 1 routed expert active instead of 3
    assert sub["activated"] == full["activated"] - 2 * (block - 3 * per_expert) - 2 * (3 * d + 2 * per_expert)
    dense = moe_lm("dense")
    b = sum(p.numel() for p in dense.trunk.layers[0].parameters())
    assert dense.num_params([0, 3])["total"] == dense.num_params()["total"] - 2 * b


def test_distill_loss_is_zero_on_itself_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert distill_loss(a, a).abs() < 1e-6
    b = torch.randn(2, 5, 11, requires_grad=True)
    loss = distill_loss(b, a, torch.tensor([[1, 2, -100, 3, 4], [1, 1, 1, 1, -100]]))
    assert loss > 0
    loss.backward()
    assert b.grad[0, 2].abs().sum() == 0  # an ignored position adds nothing


def test_kv_cached_generation_of_a_sub_model_equals_uncached():
    model = moe_lm()
    prompt = torch.randint(0, 64, (2, 5))
    sub = dict(layers=[0, 3], routing=RoutingLimit([[0, 1, 2]] * 4, 1))
    cached = model.generate(prompt, 6, temperature=0.0, **sub)
    uncached = model.generate(prompt, 6, temperature=0.0, use_cache=False, **sub)
    assert torch.equal(cached, uncached)
    # the cache path itself: a prompt then one token at a time equals one forward over all of them
    seq = torch.randint(0, 64, (2, 9))
    cache = model.new_cache(2, 9)
    steps = [model(seq[:, :5], cache, 0, **sub)] + [model(seq[:, t:t + 1], cache, t, **sub) for t in range(5, 9)]
    full = model(seq, **sub)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, model(seq))
