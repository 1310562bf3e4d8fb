"""MoE core: every dispatch path against the reference loop, router, balance losses, stats, capacity."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.moe import (
    GroupedExperts,
    MoEConfig,
    MoELayer,
    Router,
    expert_capacity,
    grouped_mm_supported,
    moe_forward,
    plan_dispatch,
    reference_moe,
    router_z_loss,
    routing_stats,
    switch_aux_loss,
)
from models.moe import experts as experts_mod

HAS_GMM = grouped_mm_supported(torch.device("cpu"), torch.float32)
IMPLS = [
    pytest.param("grouped_mm", marks=pytest.mark.skipif(not HAS_GMM, reason="torch._grouped_mm unsupported")),
    "loop",
    "auto",
]
SHAPES = {"coarse": dict(E=8, k=2, H=32), "fine": dict(E=64, k=8, H=8)}
N, D = 48, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests check numbers, not parallelism; on a shared 2-core machine even tiny GEMMs
    wait milliseconds at OpenMP barriers when another process holds a core (measured 15 ms per
    16x64 matmul), so run them single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(shape: str, impl: str, shared: bool, seed: int = 0):
    s = SHAPES[shape]
    torch.manual_seed(seed)
    router = Router(D, s["E"], s["k"])
    router.reset_parameters(std=0.5)
    experts = GroupedExperts(s["E"], D, s["H"], impl=impl)
    experts.init_weights(0.3, 0.3)
    shared_ffn = None
    if shared:
        from models.layers.ffn import SwiGLU

        shared_ffn = SwiGLU(D, 12)
    x = torch.randn(N, D, requires_grad=True)
    # Forbid the first three experts so some experts always receive zero tokens.
    mask = torch.zeros(s["E"])
    mask[:3] = float("-inf")
    return router, experts, shared_ffn, x, mask


def _grads(tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("shape", ["coarse", "fine"])
def test_paths_match_reference_forward_and_grads(impl, capacity_factor, shared, shape):
    router, experts, shared_ffn, x, mask = _setup(shape, impl, shared)
    params = [x, router.weight, experts.w13, experts.w2] + (list(shared_ffn.parameters()) if shared else [])
    gy = torch.randn(N, D)

    def run(use_ref: bool):
        r = router(x, mask)
        if use_ref:
            y = reference_moe(x, r.topk_idx, r.topk_weight, experts.w13, experts.w2, capacity_factor)
            plan = None
        else:
            y, plan = moe_forward(x, r, experts, capacity_factor)
        if shared:
            y = y + shared_ffn(x)
        (y * gy).sum().backward()
        return y.detach(), _grads(params), plan

    y_ref, g_ref, _ = run(True)
    y, g, plan = run(False)
    assert (plan.counts[:3] == 0).all()
    if capacity_factor is not None:
        assert int(plan.dropped) > 0 and int(plan.counts.max()) <= plan.capacity
    else:
        assert int(plan.dropped) == 0 and int(plan.counts.sum()) == N * SHAPES[shape]["k"]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["x", "router", "w13", "w2", "shared"], g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_sorted_forward_matches_per_expert_swiglu(impl, with_weight):
    torch.manual_seed(1)
    E, H, M = 6, 8, 40
    experts = GroupedExperts(E, D, H, impl=impl)
    experts.init_weights(0.3, 0.3)
    counts = torch.tensor([10, 0, 7, 0, 20, 3])
    x = torch.randn(M, D, requires_grad=True)
    w = torch.rand(M, requires_grad=True) if with_weight else None
    y = experts(x, counts, w)
    y.sum().backward()  # an expanded (stride-0) gradient, which grouped_mm's backward rejects unaided
    got = [y.detach(), x.grad.clone(), experts.w13.grad.clone(), experts.w2.grad.clone()]
    x.grad = experts.w13.grad = experts.w2.grad = None
    ys = []
    for e, xe in enumerate(torch.split(x, counts.tolist())):
        h = xe @ experts.w13[e]
        ys.append((F.silu(h[:, :H]) * h[:, H:]) @ experts.w2[e])
    ref = torch.cat(ys) * (w[:, None] if with_weight else 1)
    ref.sum().backward()
    want = [ref.detach(), x.grad, experts.w13.grad, experts.w2.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert experts.w13.grad[1].abs().sum() == 0 and experts.w2.grad[3].abs().sum() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_inference_matches_training_forward(impl):
    router, experts, _, x, mask = _setup("fine", impl, False)
    r = router(x, mask)
    y, _ = moe_forward(x, r, experts)
    with torch.no_grad():
        y_ng, _ = moe_forward(x, router(x, mask), experts)
    assert not y_ng.requires_grad
    torch.testing.assert_close(y_ng, y.detach())


def test_moe_layer_matches_reference_and_auto_picks_a_supported_path():
    torch.manual_seed(2)
    layer = MoELayer(D, MoEConfig(num_experts=8, top_k=2, expert_hidden=16, num_shared=1, shared_hidden=8))
    layer.experts.init_weights(0.3, 0.3)
    x = torch.randn(2, 5, D)
    y, aux = layer(x)
    r = layer.router(x.reshape(-1, D))
    ref = reference_moe(x.reshape(-1, D), r.topk_idx, r.topk_weight, layer.experts.w13, layer.experts.w2)
    ref = ref + layer.shared(x.reshape(-1, D))
    torch.testing.assert_close(y, ref.view(2, 5, D), rtol=1e-4, atol=1e-5)
    assert aux.counts.sum() == aux.num_pairs == 20 and aux.dropped == 0
    assert layer.experts.choose_impl(20, x.device, x.dtype) in ("grouped_mm", "loop")


def test_grouped_mm_falls_back_to_loop_when_unsupported(monkeypatch):
    monkeypatch.setitem(experts_mod._GROUPED_MM_OK, ("cpu", None, torch.float32), False)
    ex = GroupedExperts(4, D, 8, impl="grouped_mm")
    assert ex.choose_impl(10, torch.device("cpu"), torch.float32) == "loop"


def test_bf16_autocast_runs_experts_in_bf16_and_router_in_fp32():
    torch.manual_seed(3)
    layer = MoELayer(D, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, impl="loop"))
    x = torch.randn(1, 12, D)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = layer(x)
        assert layer.router(x.reshape(-1, D)).probs.dtype == torch.float32
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)
    y16.float().sum().backward()
    assert layer.experts.w13.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------- router


def test_softmax_and_sigmoid_gates_and_renormalisation():
    torch.manual_seed(4)
    x = torch.randn(10, D)
    for gate in ("softmax", "sigmoid"):
        r = Router(D, 6, 3, gate=gate)
        out = r(x)
        want = out.logits.softmax(-1) if gate == "softmax" else torch.sigmoid(out.logits)
        torch.testing.assert_close(out.probs, want)
        torch.testing.assert_close(out.topk_weight.sum(-1), torch.ones(10))
        assert out.topk_idx.dtype == torch.int64 and out.topk_weight.dtype == torch.float32
        raw = Router(D, 6, 3, gate=gate, renormalize=False)
        raw.load_state_dict(r.state_dict())
        o2 = raw(x)
        torch.testing.assert_close(o2.topk_weight, o2.probs.gather(1, o2.topk_idx))
        # top-k picks the largest probabilities
        assert torch.equal(o2.topk_weight.sort(-1).values, o2.probs.topk(3).values.sort(-1).values)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_mask_forbids_experts(gate):
    torch.manual_seed(5)
    r = Router(D, 6, 2, gate=gate)
    r.weight.data[1] = 10.0  # expert 1 would win everywhere if allowed
    x = torch.randn(30, D).abs()
    mask = torch.zeros(6)
    mask[[1, 4]] = float("-inf")
    out = r(x, mask)
    assert not torch.isin(out.topk_idx, torch.tensor([1, 4])).any()
    assert (out.probs[:, [1, 4]] == 0).all() and torch.isinf(out.logits[:, [1, 4]]).all()


def test_noise_only_in_training():
    torch.manual_seed(6)
    r = Router(D, 8, 2, noise_std=1.0)
    x = torch.randn(20, D)
    r.eval()
    a, b = r(x), r(x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.logits, x @ r.weight.t())
    r.train()
    c = r(x)
    assert not torch.allclose(c.logits, a.logits)


def test_bias_changes_selection_but_not_weights():
    torch.manual_seed(7)
    r = Router(D, 6, 2, bias_balancing=True)
    x = torch.randn(25, D)
    before = r(x)
    r.expert_bias[5] = 10.0
    after = r(x)
    assert (after.topk_idx == 5).any(dim=1).all()
    torch.testing.assert_close(after.probs, before.probs)
    w = after.probs.gather(1, after.topk_idx)
    torch.testing.assert_close(after.topk_weight, w / w.sum(-1, keepdim=True))
    # without bias_balancing the buffer is ignored
    plain = Router(D, 6, 2)
    plain.load_state_dict(r.state_dict())
    assert torch.equal(plain(x).topk_idx.sort(-1).values, before.topk_idx.sort(-1).values)


def test_update_bias_moves_towards_balance_and_is_noop_when_disabled():
    r = Router(D, 4, 1, bias_balancing=True, bias_update_rate=0.1)
    r.update_bias(torch.tensor([10, 0, 5, 5]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert "expert_bias" in r.state_dict()
    off = Router(D, 4, 1, bias_update_rate=0.1)
    off.update_bias(torch.tensor([10, 0, 5, 5]))
    assert (off.expert_bias == 0).all()


# ----------------------------------------------------------------------------------- balance


def test_switch_loss_uniform_is_one_collapsed_is_larger():
    E, n = 4, 8
    probs = torch.full((n, E), 1.0 / E)
    idx = torch.arange(n).remainder(E).unsqueeze(1)
    torch.testing.assert_close(switch_aux_loss(probs, idx, E), torch.tensor(1.0))
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(n, E)
    loss = switch_aux_loss(collapsed, torch.zeros(n, 1, dtype=torch.long), E)
    torch.testing.assert_close(loss, torch.tensor(E * 0.97))
    assert loss > 1


def test_z_loss_hand_computed_with_masked_entries():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), float("-inf")]])
    want = (math.log(2.0) ** 2 + math.log(3.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(want))


def test_aux_and_z_losses_reach_router_gradients():
    torch.manual_seed(8)
    x = torch.randn(3, 7, D)
    grads = {}
    for name, coefs in {"none": (0.0, 0.0), "aux": (1.0, 0.0), "z": (0.0, 1.0)}.items():
        torch.manual_seed(9)
        layer = MoELayer(D, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, aux_loss_coef=coefs[0], z_loss_coef=coefs[1]))
        y, info = layer(x)
        (y.sum() + info.loss).backward()  # the layer's weighted balance + z terms
        grads[name] = layer.router.weight.grad.clone()
        if name == "none":
            assert info.loss == 0
        # the raw z-loss is a statistic whatever its coefficient (as for a MoUE layer)
        torch.testing.assert_close(info.z_loss.detach(), router_z_loss(layer.router(x.reshape(-1, D)).logits).detach())
    assert not torch.allclose(grads["aux"], grads["none"])
    assert not torch.allclose(grads["z"], grads["none"])


def test_routing_stats_hand_computed():
    counts = torch.tensor([4, 0, 2, 2])
    probs = torch.full((5, 4), 0.25)
    s = routing_stats(counts, probs, dropped=torch.tensor(2), num_pairs=10)
    torch.testing.assert_close(s["load"], torch.tensor([0.5, 0.0, 0.25, 0.25]))
    torch.testing.assert_close(s["max_vio"], torch.tensor(1.0))
    torch.testing.assert_close(s["cv"], torch.tensor(math.sqrt(2.0) / 2))
    torch.testing.assert_close(s["dead_frac"], torch.tensor(0.25))
    torch.testing.assert_close(s["dropped_frac"], torch.tensor(0.2))
    torch.testing.assert_close(s["entropy"], torch.tensor(math.log(4.0)))
    torch.testing.assert_close(routing_stats(counts, probs.mean(0), 0, 10)["entropy"], torch.tensor(math.log(4.0)))


# ----------------------------------------------------------------------------------- capacity, config


def test_capacity_drops_exactly_the_later_pairs():
    # N=4, k=2, E=2, cf=0.5 -> capacity ceil(0.5 * 8 / 2) = 2 per expert
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    w = torch.rand(4, 2)
    assert expert_capacity(4, 2, 2, 0.5) == 2
    plan = plan_dispatch(idx, w, 2, capacity_factor=0.5)
    assert plan.order.tolist() == [0, 2, 1, 3]
    assert plan.token_idx.tolist() == [0, 1, 0, 1]
    assert plan.counts.tolist() == [2, 2] and int(plan.dropped) == 4
    torch.testing.assert_close(plan.weight, w.reshape(-1)[[0, 2, 1, 3]])
    dropless = plan_dispatch(idx, w, 2)
    assert dropless.order.tolist() == [0, 2, 4, 7, 1, 3, 5, 6] and int(dropless.dropped) == 0
    assert dropless.expert_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_num_params_hand_computed():
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, num_shared=1, shared_hidden=4))
    per_expert = 3 * 16 * 8
    router, shared = 4 * 16, 3 * 16 * 4
    assert layer.experts.num_params_per_expert() == per_expert
    assert layer.num_params() == {"total": router + shared + 4 * per_expert, "activated": router + shared + 2 * per_expert}


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(top_k=9), "top_k"),
        (dict(gate="relu"), "gate"),
        (dict(impl="triton"), "impl"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        (dict(z_loss_coef=-1.0), "z_loss_coef"),
        (dict(capacity_factor=0.0), "capacity_factor"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kw)


def test_config_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(MoEConfig)
    cfg.capacity_factor = 1.25
    cfg.shared_hidden = None
    assert OmegaConf.to_object(cfg).capacity_factor == 1.25
