"""Batched KV-cached sampling against the uncached reference, and routing replay (R2/R3)."""

from __future__ import annotations

import pytest
import torch

from models.layers.elastic import RoutingLimit
from models.moe.replay import RouteReplay, route_disagreement
from models.rollout import response_logprobs, sample_responses
from models.transformer import Transformer, TransformerConfig

SPARSE = {"num_experts": 4, "top_k": 2, "expert_hidden": 32}


def tiny(ffn: str = "dense", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(preset="tiny", vocab_size=40, ffn=ffn, **kw)
    if ffn != "dense":
        cfg["moe"] = dict(SPARSE)
    return Transformer(TransformerConfig.from_dict(cfg))


PROMPTS = [[0, 5, 6], [0, 7, 8, 9], [0, 5, 6], [0, 11, 12, 13], [0, 3]]


@pytest.mark.parametrize("ffn", ["dense", "moe", "moue"])
def test_cached_sampling_equals_the_uncached_reference(ffn):
    net = tiny(ffn)
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        runs.append(sample_responses(net, PROMPTS, 6, stop_ids=[1, 2], generator=gen, use_cache=use_cache,
                                     record_routes=ffn != "dense"))
    cached, ref = runs
    assert cached.responses == ref.responses
    for a, b in zip(cached.logp, ref.logp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if ffn != "dense":
        for a, b in zip(cached.routes, ref.routes):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the cached path makes one prefill per length group + one call per fed token, far fewer FLOPs
    assert cached.generated_tokens == sum(len(r) for r in cached.responses)


def test_logprobs_are_those_of_a_full_forward_and_stop_tokens_end_rows():
    net = tiny()
    gen = torch.Generator().manual_seed(1)
    # every token is a stop token except 0..19: rows stop early and differently
    ro = sample_responses(net, PROMPTS, 8, stop_ids=list(range(20, 40)), generator=gen, temperature=0.7)
    for p, r, lp, fin in zip(ro.prompts, ro.responses, ro.logp, ro.finished):
        assert 1 <= len(r) <= 8 and lp.shape == (len(r),)
        assert fin == (r[-1] >= 20) and all(t < 20 for t in r[:-1])
        seq = torch.tensor([p + r])
        with torch.no_grad():
            full = response_logprobs(net(seq[:, :-1]), seq[:, 1:], temperature=0.7)[0, len(p) - 1:]
        torch.testing.assert_close(full, lp, atol=1e-5, rtol=0)


def test_greedy_is_deterministic_and_seeded_sampling_reproduces():
    net = tiny()
    a = sample_responses(net, PROMPTS, 5, [1], temperature=0.0)
    b = sample_responses(net, PROMPTS, 5, [1], temperature=0.0)
    assert a.responses == b.responses
    s = [sample_responses(net, PROMPTS * 3, 5, [1], generator=torch.Generator().manual_seed(3)).responses
         for _ in range(2)]
    assert s[0] == s[1]
    with pytest.raises(ValueError, match="at least one token"):
        sample_responses(net, [[]], 3, [1])


@pytest.mark.parametrize("ffn", ["moe", "moue"])
def test_replay_reproduces_recorded_routes_and_the_router_keeps_its_gradient(ffn):
    net = tiny(ffn)
    x = torch.randint(0, 40, (3, 9))
    rec = RouteReplay("record")
    with torch.no_grad():
        logits = net(x, routing=RoutingLimit(replay=rec))
    routes = rec.stacked(3)
    assert sorted(routes) == [0, 1] and routes[0].shape == (3, 9, 2)

    # same weights: replaying gives the same routes (what the router would pick) and the same logits
    rep = RouteReplay("replay", routes)
    torch.testing.assert_close(net(x, routing=RoutingLimit(replay=rep)), logits)
    assert all(torch.equal(rep.natural[l].view(3, 9, 2).sort(-1).values, routes[l].sort(-1).values) for l in routes)

    # forced routes differ from the router's choice: the forward uses them, and the router still learns
    forced = {l: (r + 1) % SPARSE["num_experts"] for l, r in routes.items()}
    if ffn == "moue":  # keep each forced expert inside the layer's window of the pool
        allowed = net.trunk.pool.routing.candidates
        forced = {l: torch.tensor(allowed[l])[torch.arange(3 * 9 * 2).view(3, 9, 2) % len(allowed[l])]
                  for l in routes}
    rep = RouteReplay("replay", forced)
    out = net(x, routing=RoutingLimit(replay=rep))
    assert not torch.allclose(out, logits)
    assert any(route_disagreement(rep.natural[l].view(3, 9, 2), forced[l]) > 0 for l in forced)
    out.float().pow(2).mean().backward()
    routers = [net.trunk.pool.routing.routers[0]] if ffn == "moue" else [b.ffn.router for b in net.trunk.layers]
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)


def test_a_replayed_moe_layer_equals_the_reference_moe_at_the_forced_experts():
    from models.moe.layer import MoEConfig, MoELayer
    from models.moe.reference import reference_moe

    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=6, top_k=2, expert_hidden=8, aux_loss_coef=0, z_loss_coef=0), layer=3)
    x = torch.randn(2, 5, 16)
    forced = torch.randint(0, 6, (2, 5, 1)).repeat(1, 1, 2)
    forced[..., 1] = (forced[..., 0] + 1 + torch.randint(0, 5, (2, 5))) % 6  # two distinct experts per token
    y, info = layer(x, replay=RouteReplay("replay", {3: forced}))
    x_N = x.reshape(-1, 16)
    probs = layer.router(x_N).probs
    w = probs.gather(1, forced.view(-1, 2))
    w = w / w.sum(-1, keepdim=True)
    ref = reference_moe(x_N, forced.view(-1, 2), w, layer.experts.w13, layer.experts.w2)
    torch.testing.assert_close(y.view(-1, 16), ref, atol=1e-5, rtol=1e-5)
    assert info.counts.sum() == 2 * 5 * 2 and torch.equal(info.counts, torch.bincount(forced.flatten(), minlength=6))


def test_forced_gates_are_the_current_probabilities_at_the_replayed_experts():
    from models.moe.router import Router

    torch.manual_seed(0)
    router = Router(8, 6, 2)
    x = torch.randn(5, 8)
    out = router(x)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5], [1, 4]])
    forced = router.forced(out, idx)
    assert torch.equal(forced.topk_idx, idx)
    w = out.probs.gather(1, idx)
    torch.testing.assert_close(forced.topk_weight, w / w.sum(-1, keepdim=True))
    forced.topk_weight[:, 0].sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_replay_errors_name_the_problem():
    net = tiny("moe")
    x = torch.randint(0, 40, (2, 4))
    with pytest.raises(KeyError, match="no routes for layer 0"):
        net(x, routing=RoutingLimit(replay=RouteReplay("replay", {})))
    with pytest.raises(ValueError, match="replayed routes have shape"):
        net(x, routing=RoutingLimit(replay=RouteReplay("replay", {0: torch.zeros(2, 3, 2, dtype=torch.long),
                                                                   1: torch.zeros(2, 3, 2, dtype=torch.long)})))
    with pytest.raises(ValueError, match="mode must be one of"):
        RouteReplay("bogus")


def test_route_disagreement_compares_expert_sets():
    a = torch.tensor([[[0, 1], [2, 3], [1, 0]]])
    b = torch.tensor([[[1, 0], [2, 4], [0, 1]]])
    assert route_disagreement(a, b).item() == pytest.approx(1 / 3)
    valid = torch.tensor([[True, False, True]])
    assert route_disagreement(a, b, valid).item() == 0.0
