"""RL objectives: advantages, every policy objective's value and gradient against naive per-token loops, IcePop
mask bounds, k3 KL, entropy, WPSM, AHRL hint ratio and the U-RB release order."""

from __future__ import annotations

import math

import pytest
import torch

from models.rl import (
    OBJECTIVES,
    UnbiasedReplayBuffer,
    entropy_from_logits,
    group_advantages,
    hint_gamma,
    hint_ratio,
    icepop_sequence_mask,
    icepop_token_mask,
    kl_k3,
    policy_loss,
    sequence_ratio,
    token_ratio,
    wpsm_mask,
)

SEQ_OBJECTIVES = {"gspo", "gspo_icepop", "mixed_icepop"}


# ------------------------------------------------------------------------------------------ references
def reference_loss(new, old, roll, adv, mask, objective, eps_lo=0.2, eps_hi=0.2, alpha=0.5, beta=2.0,
                   aggregation="token_mean", wpsm=None, icepop_weight="mask"):
    """Naive per-token loop over Eq.1 / GSPO / Eq.2 / Eq.3 with scalar autograd ops."""
    N, T = new.shape
    rows = []
    for i in range(N):
        valid = [j for j in range(T) if bool(mask[i, j])]
        L = len(valid)
        if L == 0:
            rows.append(([], 0))
            continue
        log_s = sum(new[i, j] - old[i, j] for j in valid) / L
        s = torch.exp(log_s)
        if roll is not None:
            seq_k = math.exp(sum(float(old[i, j]) - float(roll[i, j]) for j in valid) / L)
        row = []
        for j in valid:
            x = s if objective in SEQ_OBJECTIVES else torch.exp(new[i, j] - old[i, j])
            a = float(adv[i])
            clipped = torch.clamp(x, 1 - eps_lo, 1 + eps_hi)
            term = torch.minimum(x * a, clipped * a)
            w = 1.0
            if objective in ("grpo_icepop", "mixed_icepop"):
                k = math.exp(float(old[i, j]) - float(roll[i, j]))
                w = (1.0 if alpha <= k <= beta else 0.0) * (k if icepop_weight == "ratio" else 1.0)
            elif objective == "gspo_icepop":
                w = (1.0 if alpha <= seq_k <= beta else 0.0) * (seq_k if icepop_weight == "ratio" else 1.0)
            if wpsm is not None:
                w *= 1.0 - float(wpsm[i])
            row.append(term * w)
        rows.append((row, L))
    if aggregation == "token_mean":
        total = sum(sum(r) for r, L in rows if L)
        obj = total / sum(L for _, L in rows)
    else:
        per = [sum(r) / L for r, L in rows if L]
        obj = sum(per) / len(per)
    return -obj


def reference_stats(new, old, roll, adv, mask, objective, eps_lo=0.2, eps_hi=0.2, alpha=0.5, beta=2.0):
    N, T = new.shape
    n = clipped = masked = 0
    ks, lks = [], []
    for i in range(N):
        valid = [j for j in range(T) if bool(mask[i, j])]
        if not valid:
            continue
        log_s = sum(float(new[i, j]) - float(old[i, j]) for j in valid) / len(valid)
        log_sk = sum(float(old[i, j]) - float(roll[i, j]) for j in valid) / len(valid)
        for j in valid:
            n += 1
            x = math.exp(log_s) if objective in SEQ_OBJECTIVES else math.exp(float(new[i, j]) - float(old[i, j]))
            a = float(adv[i])
            clipped += (a > 0 and x > 1 + eps_hi) or (a < 0 and x < 1 - eps_lo)
            lk = float(old[i, j]) - float(roll[i, j])
            ks.append(math.exp(lk))
            lks.append(lk)
            if objective in ("grpo_icepop", "mixed_icepop"):
                masked += not (alpha <= math.exp(lk) <= beta)
            elif objective == "gspo_icepop":
                masked += not (alpha <= math.exp(log_sk) <= beta)
    return {
        "clip_frac": clipped / n,
        "icepop_masked_frac": masked / n,
        "mismatch_k_mean": sum(ks) / n,
        "mismatch_k_max": max(ks),
        "mismatch_kl": -sum(lks) / n,
        "mismatch_kl_k3": sum(k - 1 - lk for k, lk in zip(ks, lks)) / n,
    }


def make_case(seed=0):
    """B=2 prompts x G=3 responses, T=5; varied lengths, one empty row, garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    N, T = 6, 5
    lengths = [5, 3, 4, 0, 2, 5]
    mask = torch.tensor([[j < L for j in range(T)] for L in lengths])
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2 - 0.1
    new = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3
    roll = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.7
    roll[1] = old[1] - 1.0  # sequence 1: k = e > beta everywhere -> sequence-level IcePop drops it
    rewards = torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, 0.0]], dtype=torch.float64)
    adv = group_advantages(rewards).reshape(-1)
    old = old.masked_fill(~mask, float("-inf"))  # padding garbage must not poison anything
    roll = roll.masked_fill(~mask, float("nan"))
    new = new.masked_fill(~mask, 7.0)
    return new, old, roll, adv, mask


# ------------------------------------------------------------------------------------------ advantages
def test_group_advantages_hand_computed():
    r = torch.tensor([[0.0, 1.0, 5.0], [2.0, 2.0, 2.0]])
    a = group_advantages(r)
    std = math.sqrt((4 + 1 + 9) / 3)
    expected0 = [(-2) / (std + 1e-6), (-1) / (std + 1e-6), 3 / (std + 1e-6)]
    torch.testing.assert_close(a[0], torch.tensor(expected0), rtol=1e-6, atol=1e-6)
    assert torch.equal(a[1], torch.zeros(3))  # identical rewards -> zeros
    torch.testing.assert_close(group_advantages(r, normalize_std=False)[0], torch.tensor([-2.0, -1.0, 3.0]))
    assert torch.equal(group_advantages(torch.tensor([[3.0], [1.0]])), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.ones(4))


# -------------------------------------------------------------------------------- objectives vs loops
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_policy_loss_value_and_grad_match_reference(objective, aggregation):
    new, old, roll, adv, mask = make_case()
    wpsm = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    configs = [dict(), dict(clip_eps=0.1, clip_eps_high=0.3, wpsm_mask=wpsm)]
    if objective.endswith("icepop"):
        configs.append(dict(icepop_weight="ratio", icepop=(0.6, 1.8)))
    for cfg in configs:
        x = new.clone().requires_grad_(True)
        loss, stats = policy_loss(x, old, roll, adv, mask, objective, aggregation=aggregation, **cfg)
        (g,) = torch.autograd.grad(loss, x)
        xr = new.clone().requires_grad_(True)
        alpha, beta = cfg.get("icepop", (0.5, 2.0))
        eps_lo, eps_hi = cfg.get("clip_eps", 0.2), cfg.get("clip_eps_high", 0.2)
        ref = reference_loss(xr, old, roll, adv, mask, objective, eps_lo, eps_hi, alpha, beta,
                             aggregation, cfg.get("wpsm_mask"), cfg.get("icepop_weight", "mask"))
        (gr,) = torch.autograd.grad(ref, xr)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        rs = reference_stats(new, old, roll, adv, mask, objective, eps_lo, eps_hi, alpha, beta)
        for key, val in rs.items():
            assert float(stats[key]) == pytest.approx(val, rel=1e-9, abs=1e-12), key


def test_case_exercises_clipping_and_icepop():
    """The random case must actually hit clipping and both IcePop masks, or the comparisons above prove little."""
    new, old, roll, adv, mask = make_case()
    for obj in ("grpo", "gspo"):
        assert float(policy_loss(new, old, roll, adv, mask, obj)[1]["clip_frac"]) > 0
    r = token_ratio(new, old, mask)
    low = (adv[:, None] < 0) & mask
    assert (low & (r < 0.7)).any() and (low & (r > 0.7) & (r < 0.9)).any()  # both lower clip settings differ
    assert ((adv[:, None] > 0) & mask & (r > 1.3)).any() and ((adv[:, None] > 0) & mask & (r > 1.1) & (r < 1.3)).any()
    tok = icepop_token_mask(old, roll, mask)
    assert 0 < int((mask & ~tok).sum()) < int(mask.sum()) - 3
    seq = icepop_sequence_mask(old, roll, mask)
    assert not seq[1] and not seq[3] and int(seq.sum()) >= 3


def test_gradient_only_through_logp_new():
    new, old, roll, adv, mask = make_case()
    x = new.clone().requires_grad_(True)
    o, r, a = old.clone().requires_grad_(True), roll.clone().requires_grad_(True), adv.clone().requires_grad_(True)
    w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    for obj in OBJECTIVES:
        loss, stats = policy_loss(x, o, r, a, mask, obj, wpsm_mask=w)
        grads = torch.autograd.grad(loss, [x, o, r, a, w], allow_unused=True)
        assert grads[0] is not None and all(gr is None for gr in grads[1:]), obj
        assert all(not v.requires_grad for v in stats.values())


def test_gradient_zero_for_masked_tokens():
    new, old, roll, adv, mask = make_case()
    tok_keep = icepop_token_mask(old, roll, mask)
    seq_keep = icepop_sequence_mask(old, roll, mask)
    grads = {}
    for obj in OBJECTIVES:
        x = new.clone().requires_grad_(True)
        (grads[obj],) = torch.autograd.grad(policy_loss(x, old, roll, adv, mask, obj)[0], x)
        assert torch.equal(grads[obj][~mask], torch.zeros(int((~mask).sum()), dtype=x.dtype)), obj  # padding
    g = grads["grpo_icepop"]
    assert (g[mask & ~tok_keep] == 0).all() and (g[tok_keep] != 0).any()
    g = grads["gspo_icepop"]
    assert (g[~seq_keep] == 0).all() and (g[seq_keep[:, None] & mask] != 0).any()
    # Mixed-IcePop: the sequence ratio still sees every valid token, so only sequences whose tokens are all
    # masked lose their gradient; a masked token inside a kept sequence still moves through s_i.
    g = grads["mixed_icepop"]
    partly = tok_keep.any(-1) & (mask & ~tok_keep).any(-1)
    assert partly.any() and (g[partly[:, None] & mask & ~tok_keep] != 0).any()
    fully = ~tok_keep.any(-1)
    assert (g[fully] == 0).all()


def test_icepop_mask_bounds_inclusive():
    la = torch.log(torch.tensor(0.5))
    lb = torch.log(torch.tensor(2.0))
    old = torch.stack([la, lb, la - 1e-3, lb + 1e-3, torch.tensor(0.0), torch.tensor(5.0)])[None]
    roll = torch.zeros_like(old)
    mask = torch.tensor([[True, True, True, True, True, False]])
    keep = icepop_token_mask(old, roll, mask, 0.5, 2.0)
    assert keep.tolist() == [[True, True, False, False, True, False]]
    # sequence level: each row is two equal log k values (mean is exact), one padding slot
    vals = [la, lb, la - 1e-3, lb + 1e-3, torch.tensor(0.3)]
    old_s = torch.stack([torch.stack([v, v, torch.tensor(9.0)]) for v in vals])
    mask_s = torch.tensor([[True, True, False]] * 5)
    assert icepop_sequence_mask(old_s, torch.zeros_like(old_s), mask_s).tolist() == [True, True, False, False, True]
    empty = icepop_sequence_mask(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert empty.tolist() == [False]
    with pytest.raises(ValueError, match="alpha"):
        icepop_token_mask(old, roll, mask, 2.0, 0.5)


def test_gspo_sequence_ratio_hand_formula():
    new = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]])
    old = torch.tensor([[-1.2, -1.5, -0.7], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s = sequence_ratio(new, old, mask)
    expected = [math.exp(((-1.0 + 1.2) + (-2.0 + 1.5) + (-0.5 + 0.7)) / 3), math.exp(-0.3 + 0.1)]
    torch.testing.assert_close(s, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(token_ratio(new, old, mask)[0, 1], torch.tensor(math.exp(-0.5)))
    assert token_ratio(new, old, mask)[1, 1] == 1.0


def test_policy_loss_errors():
    new, old, roll, adv, mask = make_case()
    with pytest.raises(ValueError, match="objective"):
        policy_loss(new, old, roll, adv, mask, "ppo")
    with pytest.raises(ValueError, match="logp_rollout"):
        policy_loss(new, old, None, adv, mask, "mixed_icepop")
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(new, old, roll, adv, mask, "grpo", aggregation="sum")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(new, old, roll, adv[:3], mask, "grpo")
    with pytest.raises(ValueError, match="logp_old"):
        policy_loss(new, old[:, :2], roll, adv, mask, "grpo")
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(new, old, roll, adv, mask, "grpo", clip_eps=0.0)
    with pytest.raises(ValueError, match="wpsm_mask"):
        policy_loss(new, old, roll, adv, mask, "grpo", wpsm_mask=torch.zeros(2))
    loss, stats = policy_loss(new, old, None, adv, mask, "grpo")
    assert "mismatch_k_mean" not in stats and torch.isfinite(loss)


# ------------------------------------------------------------------------------------------ KL, entropy
def test_kl_k3():
    new, old, _, _, mask = make_case()
    assert float(kl_k3(new, new.clone(), mask)) == 0.0
    val = kl_k3(new, old, mask)
    terms = []
    for i in range(new.shape[0]):
        for j in range(new.shape[1]):
            if mask[i, j]:
                d = float(old[i, j]) - float(new[i, j])
                terms.append(math.exp(d) - d - 1)
    assert float(val) == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert float(val) > 0


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ents = [[-sum(p * math.log(p) for p in torch.softmax(logits[i, j], -1).tolist()) for j in range(3)]
            for i in range(2)]
    assert float(entropy_from_logits(logits, mask)) == pytest.approx((ents[0][0] + ents[0][1] + ents[1][0]) / 3)
    torch.testing.assert_close(entropy_from_logits(logits, mask, per_sequence=True),
                               torch.tensor([(ents[0][0] + ents[0][1]) / 2, ents[1][0]], dtype=torch.float64))
    uniform = entropy_from_logits(torch.zeros(1, 2, 8), torch.ones(1, 2))
    assert float(uniform) == pytest.approx(math.log(8), rel=1e-6)


# ------------------------------------------------------------------------------------------------ WPSM
def test_wpsm_mask_cases():
    rate = torch.tensor([0.9, 0.9, 0.8, 0.9, 0.5])
    ent = torch.tensor([0.1, 0.5, 0.1, 0.3, 0.0])
    # > tau strictly, < eta strictly
    assert wpsm_mask(rate, ent, tau=0.8, eta=0.3).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert wpsm_mask(rate, ent, tau=0.8, eta=0.31, alpha=0.25).tolist() == [0.25, 0.0, 0.0, 0.25, 0.0]
    # per-query rate [B] broadcast to G = 2 responses each
    out = wpsm_mask(torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0, 0.0, 0.0]), eta=0.5)
    assert out.tolist() == [1.0, 0.0, 0.0, 0.0]
    # eta=None -> 20th percentile of the entropies: only the lowest of five passes
    e5 = torch.tensor([0.5, 0.1, 0.9, 0.7, 0.3])
    assert wpsm_mask(torch.ones(5), e5).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="alpha"):
        wpsm_mask(rate, ent, eta=0.3, alpha=1.5)
    with pytest.raises(ValueError, match="success_rate"):
        wpsm_mask(torch.ones(3), ent, eta=0.3)


def test_wpsm_full_mask_zeroes_loss_and_grad():
    new, old, roll, adv, mask = make_case()
    x = new.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, roll, adv, mask, "mixed_icepop", wpsm_mask=torch.ones(6, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss, x)
    assert float(loss.detach()) == 0.0 and (g == 0).all()


# ------------------------------------------------------------------------------------------------ AHRL
def test_hint_ratio():
    assert hint_ratio(0, 0.3, p_initial=0.5, gamma=0.1) == 0.5
    assert hint_ratio(10, 0.2, p_initial=0.4, gamma=0.05) == pytest.approx(0.4 * math.exp(-0.05 * 10 * 0.2))
    assert hint_ratio(100, 0.0, gamma=1.0) == 0.5  # never-solved queries keep the full hint
    t = hint_ratio(torch.tensor([0.0, 5.0]), torch.tensor([0.5, 0.5]), gamma=0.2)
    torch.testing.assert_close(t, torch.tensor([0.5, 0.5 * math.exp(-0.5)]))
    gam = hint_gamma(1000, pass_ref=0.1, halve_fraction=0.2)
    assert hint_ratio(200, 0.1, gamma=gam) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="pass_initial"):
        hint_ratio(1, 1.5, gamma=0.1)
    with pytest.raises(ValueError, match="gamma"):
        hint_ratio(1, 0.5, gamma=-1.0)


# ------------------------------------------------------------------------------------------------- U-RB
def test_urb_releases_in_order_only_when_complete():
    buf = UnbiasedReplayBuffer(groups_ahead=2)
    for gid in range(3):
        buf.submit(gid, 2)
    assert not buf.can_submit()
    with pytest.raises(ValueError, match="groups_ahead"):
        buf.submit(3, 2)
    # later groups finish first (short, easy rollouts) but must wait for group 0
    buf.finish(1, 0, "1a")
    buf.finish(1, 1, "1b")
    buf.finish(2, 1, "2b")
    assert buf.ready() == []
    buf.finish(0, 1, "0b")
    assert buf.ready() == []
    buf.finish(0, 0, "0a")
    assert buf.ready() == [(0, ["0a", "0b"]), (1, ["1a", "1b"])]  # both released, in order
    assert buf.next_release == 2 and buf.in_flight == [2]
    buf.submit(3, 1)
    buf.submit(4, 1)
    buf.finish(4, 0, "4a")
    buf.finish(3, 0, "3a")
    assert buf.ready() == []  # group 2 still incomplete blocks 3 and 4
    buf.finish(2, 0, "2a")
    assert [gid for gid, _ in buf.ready()] == [2, 3, 4]
    assert buf.ready() == []


def test_urb_errors():
    buf = UnbiasedReplayBuffer(groups_ahead=0)
    with pytest.raises(ValueError, match="group_id"):
        buf.submit(1, 2)
    buf.submit(0, 2)
    with pytest.raises(ValueError, match="groups_ahead"):
        buf.submit(1, 2)
    buf.finish(0, 0)
    with pytest.raises(ValueError, match="already finished"):
        buf.finish(0, 0)
    with pytest.raises(IndexError, match="response_id"):
        buf.finish(0, 2)
    with pytest.raises(KeyError, match="group_id"):
        buf.finish(5, 0)
    with pytest.raises(ValueError, match="groups_ahead"):
        UnbiasedReplayBuffer(groups_ahead=-1)
