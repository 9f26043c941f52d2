"""Policy losses, KL estimators, masks, TIS and composition vs hand-worked values and
float64 python-loop references."""

import math

import pytest
import torch

from experts.losses import (KL_ESTIMATORS, POLICY_LOSSES, compute_kl_unbiased_k3, compute_offpolicy_sequence_mask,
                            compute_policy_loss, compute_tis_weights, get_kl_estimator, get_policy_loss,
                            register_kl_estimator, register_policy_loss)

torch.set_num_threads(1)
D = torch.float64


def rand_batch(B=5, T=9, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3  # log-probs in (-3, 0)
    lp = old + spread * torch.randn(B, T, generator=g, dtype=D)
    ref = old + spread * torch.randn(B, T, generator=g, dtype=D)
    rollout = old + spread * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)
    lengths = torch.randint(1, T, (B,), generator=g)
    starts = torch.randint(0, 2, (B,), generator=g)
    mask = torch.zeros(B, T, dtype=D)
    for b in range(B):
        mask[b, starts[b]:starts[b] + lengths[b]] = 1
    return lp, old, ref, rollout, adv, mask


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def ref_token_loss(lp, old, adv, mask, cl, ch, gspo=False):
    """Loop reference: per-token -min(r A, clip(r) A); r per token, or per sequence for GSPO."""
    B, T = mask.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t] > 0]
        s = math.exp(sum(lp[b, t].item() - old[b, t].item() for t in toks) / max(len(toks), 1))
        for t in toks:
            r = s if gspo else math.exp(lp[b, t].item() - old[b, t].item())
            a = adv[b].item() if adv.dim() == 1 else adv[b, t].item()
            out[b][t] = -min(r * a, clip(r, 1 - cl, 1 + ch) * a)
    return torch.tensor(out, dtype=D)


# ------------------------------------------------------------------ policy losses
def test_grpo_hand_worked():
    # ratios [1.5, 0.5, 0.5, 1.5], A [1, -1, 1, -1], clip_low 0.2, clip_high 0.28:
    #   r=1.5, A=+1: -min(1.5, 1.28) = -1.28   (clipped high, no gradient)
    #   r=0.5, A=-1: -min(-0.5, -0.8) = 0.8    (clipped low, no gradient)
    #   r=0.5, A=+1: -min(0.5, 0.8) = -0.5     (gradient dL/dlogp = -r A = -0.5)
    #   r=1.5, A=-1: -min(-1.5, -1.28) = 1.5   (gradient -r A = 1.5)
    old = torch.zeros(4, 1, dtype=D)
    lp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]], dtype=D)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)
    loss, m = get_policy_loss("grpo")(lp, old, adv, torch.ones(4, 1), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.28], [0.8], [-0.5], [1.5]], dtype=D))
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.0], [0.0], [-0.5], [1.5]], dtype=D))
    assert m["clip_frac_low"].item() == pytest.approx(0.25) and m["clip_frac_high"].item() == pytest.approx(0.25)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    # approx_kl: mean of r - 1 - log r = (2 * (0.5 - log 1.5) + 2 * (-0.5 - log 0.5)) / 4 = 0.0933
    assert m["approx_kl"].item() == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)


def test_gspo_hand_worked():
    # one sequence, log-ratios [log 2, 0] -> mean log 2 / 2 -> s = sqrt(2) = 1.41421
    # A=+1, clip_high 0.28: -min(1.41421, 1.28) = -1.28 at both tokens; A=-1: +1.41421
    lp = torch.tensor([[math.log(2.0), 0.0], [math.log(2.0), 0.0]], dtype=D)
    loss, m = get_policy_loss("gspo")(lp, torch.zeros(2, 2, dtype=D), torch.tensor([1.0, -1.0], dtype=D),
                                      torch.ones(2, 2), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.28, -1.28], [math.sqrt(2), math.sqrt(2)]], dtype=D))
    assert m["clip_frac_high"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("name,gspo", [("grpo", False), ("vanilla", False), ("gspo", True)])
@pytest.mark.parametrize("token_adv", [False, True])
def test_policy_loss_matches_loop_reference(name, gspo, token_adv):
    lp, old, _, _, adv, mask = rand_batch(B=12, seed=3)
    if token_adv:
        adv = adv.unsqueeze(1) + 0.1 * torch.randn(mask.shape, dtype=D, generator=torch.Generator().manual_seed(9))
    cl, ch = (0.03, 0.04) if gspo else (0.1, 0.15)  # GSPO's sequence ratios stay closer to 1
    loss, metrics = get_policy_loss(name)(lp, old, adv, mask, clip_low=cl, clip_high=ch)
    assert torch.allclose(loss, ref_token_loss(lp, old, adv, mask, cl, ch, gspo=gspo), atol=1e-12)
    assert set(metrics) == {"clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl"}
    assert 0 < metrics["clip_frac_low"].item() + metrics["clip_frac_high"].item() < 1  # clipping is exercised


def test_grpo_gradient_closed_form():
    # dL/dlogp = -r A where the unclipped branch is active, else 0
    lp, old, _, _, adv, mask = rand_batch(seed=4)
    lp.requires_grad_()
    loss, _ = get_policy_loss("grpo")(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    loss.sum().backward()
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            r, a = math.exp(lp[b, t].item() - old[b, t].item()), adv[b].item()
            active = mask[b, t] > 0 and not ((r < 0.8 and a < 0) or (r > 1.28 and a > 0))
            assert lp.grad[b, t].item() == pytest.approx(-r * a if active else 0.0, abs=1e-12)


def test_gspo_gradient_equals_sequence_level_objective():
    # GSPO objective: mean_b -min(s_b A_b, clip(s_b) A_b), s_b = exp(mean_t (logp - old)).
    # Our GSPO-token loss aggregated by seq-mean-token-mean must have the same gradient.
    from experts.losses import aggregate_loss

    lp, old, _, _, adv, mask = rand_batch(seed=5, spread=0.1)
    lp1 = lp.clone().requires_grad_()
    loss, _ = get_policy_loss("gspo")(lp1, old, adv, mask, clip_low=0.02, clip_high=0.03)
    aggregate_loss(loss, mask, "seq-mean-token-mean").backward()
    lp2 = lp.clone().requires_grad_()
    total = 0.0
    for b in range(mask.shape[0]):
        toks = [t for t in range(mask.shape[1]) if mask[b, t] > 0]
        s = torch.exp(sum(lp2[b, t] - old[b, t] for t in toks) / len(toks))
        total = total - torch.minimum(s * adv[b], s.clamp(0.98, 1.03) * adv[b])
    (total / mask.shape[0]).backward()
    assert torch.allclose(lp1.grad, lp2.grad, atol=1e-12)
    assert (lp1.grad != 0).any() and (lp1.grad == 0).any()  # some sequences clipped, some not


def test_padding_with_inf_does_not_leak():
    lp, old, _, _, adv, mask = rand_batch(seed=6)
    lp = torch.where(mask > 0, lp, torch.tensor(float("inf"), dtype=D)).requires_grad_()
    for name in POLICY_LOSSES:
        loss, _ = get_policy_loss(name)(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
        assert torch.isfinite(loss).all() and (loss[mask == 0] == 0).all()
        g, = torch.autograd.grad(loss.sum(), lp)
        assert torch.isfinite(g).all()


# ------------------------------------------------------------------ KL estimators
def test_kl_hand_worked():
    # pi_theta = 0.5, pi_ref = 0.25, pi_old = 0.25: log q = log(pi_ref/pi_theta) = -0.693147
    #   k1 = 0.693147; k2 = 0.693147^2 / 2 = 0.240227; k3 = 0.5 + 0.693147 - 1 = 0.193147
    #   unbiased_k3 = (0.5 / 0.25) * 0.193147 = 0.386294
    lp, ref, old = (torch.tensor([[math.log(p)]], dtype=D) for p in (0.5, 0.25, 0.25))
    expect = {"k1": 0.693147, "k2": 0.240227, "k3": 0.193147, "unbiased_k3": 0.386294}
    for name, v in expect.items():
        assert get_kl_estimator(name)(lp, ref, old).item() == pytest.approx(v, abs=1e-6)


def test_kl_estimators_match_loop_reference():
    lp, old, ref, _, _, _ = rand_batch(seed=7)
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            x, r, o = lp[b, t].item(), ref[b, t].item(), old[b, t].item()
            q = math.exp(r) / math.exp(x)
            expect = {"k1": math.log(math.exp(x) / math.exp(r)), "k2": 0.5 * math.log(q) ** 2,
                      "k3": q - math.log(q) - 1, "unbiased_k3": math.exp(x) / math.exp(o) * (q - math.log(q) - 1)}
            for name, v in expect.items():
                assert get_kl_estimator(name)(lp, ref, old)[b, t].item() == pytest.approx(v, rel=1e-10, abs=1e-12)


def test_unbiased_k3_is_exactly_unbiased_in_value_and_gradient():
    # Over a categorical distribution, E_{x ~ pi_old}[unbiased_k3(x)] = KL(pi_theta || pi_ref) exactly,
    # and so is its gradient w.r.t. the logits of pi_theta (the ratio is not detached).
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, generator=g, dtype=D).requires_grad_()
    log_ref = torch.log_softmax(torch.randn(6, generator=g, dtype=D), -1)
    log_old = torch.log_softmax(torch.randn(6, generator=g, dtype=D), -1)
    log_p = torch.log_softmax(z, -1)
    kl_true = (log_p.exp() * (log_p - log_ref)).sum()
    est = compute_kl_unbiased_k3(log_p.view(1, 6), log_ref.view(1, 6), log_old.view(1, 6))  # (1, 6)
    expectation = (log_old.exp() * est[0]).sum()
    assert expectation.item() == pytest.approx(kl_true.item(), rel=1e-12)
    g_est, = torch.autograd.grad(expectation, z, retain_graph=True)
    g_true, = torch.autograd.grad(kl_true, z)
    assert torch.allclose(g_est, g_true, atol=1e-12)
    # k3 (and k1) are unbiased under pi_theta's own samples
    for name in ("k1", "k3"):
        e = (log_p.exp() * get_kl_estimator(name)(log_p.view(1, 6), log_ref.view(1, 6), log_old.view(1, 6))[0]).sum()
        assert e.item() == pytest.approx(kl_true.item(), rel=1e-12)


# ------------------------------------------------------------------ masks and TIS
def test_offpolicy_mask_hand_worked():
    # delta 0.2. seq0: A=-1, mean log(pi_old/pi_theta) = (0.4 + 0.2) / 2 = 0.3 > 0.2 -> dropped
    # seq1: A=+1, same drift -> kept (only negative-advantage sequences are dropped)
    # seq2: A=-1, drift 0.1 -> kept; seq3: A=-1, drift 0.5 on a padded token only -> 0 -> kept
    old = torch.zeros(4, 2, dtype=D)
    lp = -torch.tensor([[0.4, 0.2], [0.4, 0.2], [0.1, 0.1], [0.0, 0.5]], dtype=D)
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    keep = compute_offpolicy_sequence_mask(lp, old, torch.tensor([-1.0, 1.0, -1.0, -1.0], dtype=D), mask, 0.2)
    assert keep.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_offpolicy_mask_matches_loop_reference():
    lp, old, _, _, adv, mask = rand_batch(B=40, seed=10)
    keep = compute_offpolicy_sequence_mask(lp, old, adv, mask, 0.05)
    expect = []
    for b in range(40):
        toks = [t for t in range(mask.shape[1]) if mask[b, t] > 0]
        drift = sum(old[b, t].item() - lp[b, t].item() for t in toks) / len(toks)
        expect.append(0.0 if adv[b] < 0 and drift > 0.05 else 1.0)
    assert keep.tolist() == expect and 0 < sum(expect) < 40


def test_tis_hand_worked_and_reference():
    # old - rollout = log 3 -> min(3, 2) = 2; log 0.5 -> 0.5; masked position -> 0
    w = compute_tis_weights(torch.log(torch.tensor([[3.0, 0.5, 9.0]], dtype=D)), torch.zeros(1, 3, dtype=D),
                            torch.tensor([[1, 1, 0]]), 2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 0.0]], dtype=D))
    _, old, _, rollout, _, mask = rand_batch(seed=11)
    old = old.clone().requires_grad_()
    w = compute_tis_weights(old, rollout, mask, 1.2)
    assert not w.requires_grad  # detached
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            e = min(math.exp(old[b, t].item() - rollout[b, t].item()), 1.2) if mask[b, t] > 0 else 0.0
            assert w[b, t].item() == pytest.approx(e, rel=1e-12)


# ------------------------------------------------------------------ composition
def ref_policy_loss(lp, old, ref, rollout, adv, mask, *, cl, ch, beta, tis_cap, delta):
    """Loop reference of compute_policy_loss with token-mean aggregation and k3 KL."""
    pg = ref_token_loss(lp, old, adv, mask, cl, ch)
    total, n = 0.0, 0
    for b in range(mask.shape[0]):
        toks = [t for t in range(mask.shape[1]) if mask[b, t] > 0]
        # the off-policy mask measures drift from the behaviour (rollout) policy
        drift = sum(rollout[b, t].item() - lp[b, t].item() for t in toks) / len(toks)
        keep = 0.0 if (adv[b] < 0 and drift > delta) else 1.0
        for t in toks:
            w = min(math.exp(old[b, t].item() - rollout[b, t].item()), tis_cap)
            q = math.exp(ref[b, t].item() - lp[b, t].item())
            total += pg[b, t].item() * w * keep + beta * (q - math.log(q) - 1)
            n += 1
    return total / n


def test_compute_policy_loss_matches_loop_reference():
    lp, old, ref, rollout, adv, mask = rand_batch(B=12, seed=12)
    kw = dict(clip_low=0.2, clip_high=0.28, kl_beta=0.05, tis_cap=1.3, offpolicy_mask_delta=0.05)
    loss, metrics = compute_policy_loss(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref,
                                        rollout_logprobs=rollout, kl_estimator="k3", **kw)
    expect = ref_policy_loss(lp, old, ref, rollout, adv, mask, cl=0.2, ch=0.28, beta=0.05, tis_cap=1.3, delta=0.05)
    assert loss.item() == pytest.approx(expect, rel=1e-12)
    assert all(isinstance(v, float) for v in metrics.values())
    assert {"loss", "pg_loss", "kl", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean",
            "tis_weight_mean", "tis_capped_frac", "offpolicy_masked_frac"} <= set(metrics)
    assert 0 < metrics["offpolicy_masked_frac"] < 1 and 0 < metrics["tis_capped_frac"] < 1


def test_offpolicy_masking_measures_drift_from_the_rollout_policy():
    """DeepSeek-V3.2 masks against the policy that SAMPLED: with the trainer's old log-probs
    equal to pi_theta (one optimiser step per batch) the drift must still be seen when the
    rollout log-probs differ, and nothing is masked when the rollout equals pi_theta."""
    lp, _, _, _, adv, mask = rand_batch(B=40, seed=14)
    drifted = lp + 0.3  # the sampler gave every token e^0.3 more probability: drift 0.3 > delta
    kw = dict(logprobs=lp, old_logprobs=lp.detach(), advantages=adv, mask=mask, offpolicy_mask_delta=0.1)
    _, m_drift = compute_policy_loss(rollout_logprobs=drifted, **kw)
    n_neg = int(((adv < 0) & (mask.sum(1) > 0)).sum())
    assert m_drift["offpolicy_masked_seqs"] == n_neg > 0  # exactly the negative-advantage sequences
    assert m_drift["offpolicy_masked_frac"] == pytest.approx(n_neg / 40)
    _, m_same = compute_policy_loss(rollout_logprobs=lp.detach(), **kw)
    assert m_same["offpolicy_masked_seqs"] == 0.0
    with pytest.raises(ValueError, match="rollout_logprobs"):
        compute_policy_loss(**kw)


def test_compute_policy_loss_beta_zero_needs_no_reference_and_ignores_padding():
    lp, old, _, _, adv, mask = rand_batch(seed=13)
    nan = torch.tensor(float("nan"), dtype=D)
    lp_pad = torch.where(mask > 0, lp, nan).requires_grad_()
    loss, metrics = compute_policy_loss(logprobs=lp_pad, old_logprobs=torch.where(mask > 0, old, nan),
                                        advantages=adv, mask=mask)
    assert "kl" not in metrics
    assert loss.item() == pytest.approx(ref_token_loss(lp, old, adv, mask, 0.2, 0.28).sum().item() / mask.sum().item())
    loss.backward()
    assert torch.isfinite(lp_pad.grad).all()


def test_compute_policy_loss_bad_input():
    lp, old, ref, _, adv, mask = rand_batch(seed=14)
    base = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
    with pytest.raises(ValueError, match="ref_logprobs"):
        compute_policy_loss(**base, kl_beta=0.1)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        compute_policy_loss(**base, tis_cap=2.0)
    with pytest.raises(ValueError, match=r"old_logprobs must be \(B, T\)"):
        compute_policy_loss(**{**base, "old_logprobs": old[:, :-1]})
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_loss(**{**base, "advantages": adv[:-1]})
    b, t = (mask > 0).nonzero()[0].tolist()
    bad = lp.clone()
    bad[b, t] = float("nan")
    with pytest.raises(ValueError, match=rf"logprobs\[{b}, {t}\] is nan"):
        compute_policy_loss(**{**base, "logprobs": bad})
    with pytest.raises(KeyError, match="known:.*k3"):
        compute_policy_loss(**base, kl_estimator="k4")  # a typo fails even at kl_beta = 0
    with pytest.raises(KeyError, match="known:.*gspo"):
        compute_policy_loss(**base, policy_loss="ppo2")
    with pytest.raises(KeyError, match="known:.*token-mean"):
        compute_policy_loss(**base, loss_agg="sum")
    with pytest.raises(ValueError, match="clip_low"):
        compute_policy_loss(**base, clip_low=1.5)
    with pytest.raises(ValueError, match="global_tokens"):
        compute_policy_loss(**base, global_tokens=0)


def test_registries_reject_duplicates_and_list_names():
    assert {"grpo", "vanilla", "gspo"} <= set(POLICY_LOSSES)
    assert {"k1", "k2", "k3", "unbiased_k3"} <= set(KL_ESTIMATORS)
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("gspo")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="already registered"):
        register_kl_estimator("k3")(lambda *a: None)
    with pytest.raises(KeyError, match="unknown policy loss 'ppo'; known: grpo, gspo, vanilla"):
        get_policy_loss("ppo")
