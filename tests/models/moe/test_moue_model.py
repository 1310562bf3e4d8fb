"""The transformer with MoE and MoUE FFNs: counts, losses, trajectory state, conversion."""

from __future__ import annotations

import copy

import pytest
import torch

from models.moe.moue import MoUEConfig, UniversalRouting
from models.transformer import Transformer, TransformerConfig
from tools.convert_moe_to_moue import convert_state, moue_config_from_moe

MOE = dict(num_experts=4, top_k=2, expert_hidden=32)


def build(ffn: str, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    net = dict(preset="tiny", vocab_size=61, n_layers=3, ffn=ffn, moe=dict(MOE, **kw.pop("moe", {})), **kw)
    return Transformer(TransformerConfig.from_dict(net))


def test_param_counts_are_matched_by_construction():
    dense = build("dense", ffn_hidden=MOE["top_k"] * MOE["expert_hidden"])
    moe = build("moe")
    moue = build("moue", moue=dict(window=2, state_dim=8))
    per_expert = 3 * 64 * 32
    # activated: dense FFN hidden = k * expert hidden -> equal up to the routers
    routers_moe = 3 * 4 * 64
    assert moe.num_params()["activated"] == dense.num_params()["total"] + routers_moe
    # MoUE pool = union of the MoE's experts (N_U = L * E): equal totals up to routing extras
    assert moue.trunk.pool.experts.w13.shape[0] == 12
    extras = moue.num_params()["total"] - moe.num_params()["total"]
    routing = moue.trunk.pool.routing
    expected_extras = (
        routing.routers[0].weight.numel() - routers_moe + routing.signatures.numel() + routing.depth.numel()
        + sum(p.numel() for p in routing.state_norm.parameters())
    )
    assert extras == expected_extras
    assert moe.num_params()["total"] - moe.num_params()["activated"] == 3 * (4 - 2) * per_expert
    assert moue.num_params()["activated"] - moe.num_params()["activated"] == extras


@pytest.mark.parametrize("ffn", ["moe", "moue"])
def test_balance_loss_reaches_router_gradients(ffn):
    m = build(ffn, moue=dict(window=2, state_dim=8)) if ffn == "moue" else build(ffn)
    x = torch.randint(0, 61, (2, 12))
    logits, bal, infos = m(x, return_routing=True)
    assert bal.requires_grad and bal.item() > 0
    router = m.trunk.layers[0].ffn.router if ffn == "moe" else m.trunk.pool.routing.routers[0]
    g1 = torch.autograd.grad(logits.float().mean(), router.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(logits.float().mean() + bal, router.weight)[0]
    assert not torch.allclose(g1, g2)


def test_moue_uelb_vs_naive_and_uniform_target_switches():
    x = torch.randint(0, 61, (2, 12))
    vals = {}
    for balance, target in [("uelb", "exposure"), ("uelb", "uniform"), ("naive", "exposure")]:
        # B = 4 blocks for 3 layers: exposure [1, 2, 2, 1] is not uniform, so the targets differ
        m = build("moue", moue=dict(num_blocks=4, window=2, state_dim=8, balance=balance, uelb_target=target))
        vals[(balance, target)] = m(x, return_routing=True)[1].item()
    assert len(set(round(v, 8) for v in vals.values())) == 3


def test_trajectory_state_follows_the_update_rule_and_changes_routing():
    cfg = MoUEConfig(window=3, state_dim=6, trajectory="additive", depth_embed=True)
    routing = UniversalRouting(3, 16, 12, 3, 2, cfg, router_kwargs={})
    torch.manual_seed(0)
    with torch.no_grad():
        routing.routers[0].weight.normal_()
        routing.signatures.normal_()
        routing.depth.normal_()
    h = torch.randn(5, 16)
    s0 = routing.init_state(h)
    assert torch.equal(s0, torch.zeros(5, 6))
    out = routing.route(1, h, s0)
    s1 = routing.next_state(1, s0, out.topk_idx, out.topk_weight)
    msg = (out.topk_weight.unsqueeze(-1) * routing.signatures[out.topk_idx]).sum(1) + routing.depth[1]
    torch.testing.assert_close(s1, torch.nn.functional.rms_norm(s0 + msg, (6,), routing.state_norm.weight, routing.state_norm.eps))
    # the router reads the state: a different state, different logits (and here, different choices)
    out_a = routing.route(1, h, s1)
    out_b = routing.route(1, h, -3 * s1)
    assert not torch.allclose(out_a.logits, out_b.logits)
    # trajectory off: the router sees only h
    off = UniversalRouting(3, 16, 12, 3, 2, MoUEConfig(window=3, trajectory="off"), router_kwargs={})
    assert off.init_state(h) is None and off.routers[0].weight.shape == (12, 16)


def test_moue_routes_only_inside_each_layer_window():
    m = build("moue", moue=dict(window=1, state_dim=8))
    x = torch.randint(0, 61, (4, 16))
    _, _, infos = m(x, return_routing=True)
    for layer, info in enumerate(infos):
        used = info.counts.nonzero().flatten()
        assert ((used >= layer * 4) & (used < (layer + 1) * 4)).all()


def test_conversion_preserves_every_tensor_and_the_logits():
    src = build("moe", moe=dict(num_shared=1))
    with torch.no_grad():  # a trained-looking router bias as well
        for layer in src.trunk.layers:
            layer.ffn.router.expert_bias.normal_()
    net = moue_config_from_moe(src.cfg.to_dict(), window=2, trajectory="additive", state_dim=8, beta=4.0)
    dst = Transformer(TransformerConfig.from_dict(copy.deepcopy(net)))
    state, mapping = convert_state(src.state_dict(), src.cfg, dst)
    dst.load_state_dict(state)
    assert {s for s, _ in mapping} == set(src.state_dict())  # nothing dropped
    # every source tensor appears verbatim in the target
    d = src.cfg.d_model
    for layer in range(3):
        home = slice(layer * 4, (layer + 1) * 4)
        assert torch.equal(dst.trunk.pool.experts.w13[home], src.trunk.layers[layer].ffn.experts.w13)
        assert torch.equal(dst.trunk.pool.routing.routers[0].weight[home, :d], src.trunk.layers[layer].ffn.router.weight)
        assert torch.equal(dst.trunk.layers[layer].ffn.shared.w1.weight, src.trunk.layers[layer].ffn.shared.w1.weight)
    assert (dst.trunk.pool.routing.routers[0].weight[:, d:] == 0).all() and (dst.trunk.pool.routing.signatures == 0).all()
    x = torch.randint(0, 61, (3, 20))
    src.eval()
    dst.eval()
    dst.trunk.set_moue_window(1)
    torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=1e-5)
    dst.trunk.set_moue_window(2)  # opening the window changes the function only through the (-beta) bias
    assert not torch.equal(dst(x), src(x))


def test_moue_per_expert_view_path_equals_full_pool_path(monkeypatch):
    """The CPU fast path (dispatch over the layer's candidates, per-expert pool views) equals the
    plain full-pool dispatch: outputs, routing counts and every gradient."""
    from models.moe.experts import GroupedExperts, _ExpertLoop

    m = build("moue", moue=dict(window=2, state_dim=8))
    x = torch.randint(0, 61, (2, 16))
    subset_calls = []
    original_subset = GroupedExperts.forward_routed_subset

    def counting_subset(self, *a, **kw):
        subset_calls.append(1)
        return original_subset(self, *a, **kw)

    def full_pool_loop(self, x_ND, token_idx_M, weight_M, counts_E):
        return _ExpertLoop.apply(x_ND, self.w13, self.w2, weight_M, token_idx_M, counts_E.tolist(), x_ND.shape[0])

    monkeypatch.setattr(GroupedExperts, "forward_routed_subset", counting_subset)
    monkeypatch.setattr(GroupedExperts, "forward_routed", full_pool_loop)
    results = []
    for path in ("views", "full"):
        # any answer other than "loop" makes the model dispatch over the whole pool
        monkeypatch.setattr(GroupedExperts, "choose_impl", lambda self, *a, _p=path: "loop" if _p == "views" else "full")
        m.zero_grad()
        logits, bal, infos = m(x, return_routing=True)
        (logits.float().pow(2).mean() + bal).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((logits.detach(), [i.counts for i in infos], grads))
    assert len(subset_calls) == 3  # one per layer, only on the views pass
    (l1, c1, g1), (l2, c2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(c1, c2))
    assert g1.keys() == g2.keys() and "trunk.pool.experts.w13" in g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-4, msg=name)
