"""The OPD reward term (MiMo's MOPD): the policy-gradient term against a float64
reference, and the group advantages of a round's samples."""

import pytest
import torch

from distill.opd import set_reward_advantages
from distill.opd_loss import compute_policy_gradient_term
from distill.opd_settings import OPDSettings
from engine.episode import RolloutSample


def _reference(h, w, targets, adv, tw, temperature=1.0):
    """-sum_i tw_i adv_i log softmax(h_i W^T / T)[y_i], plain float64 autograd."""
    logp = torch.log_softmax(h @ w.T / temperature, dim=-1)
    return -(tw * adv * logp.gather(1, targets[:, None])[:, 0]).sum()


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_policy_gradient_term_matches_a_float64_reference(chunk):
    g = torch.Generator().manual_seed(chunk)
    for n, hdim, vocab in [(7, 5, 11), (1, 3, 4), (20, 8, 33)]:
        h = torch.randn(n, hdim, generator=g, dtype=torch.float64)
        w = torch.randn(vocab, hdim, generator=g, dtype=torch.float64)
        y = torch.randint(0, vocab, (n,), generator=g)
        adv, tw = torch.randn(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
        temperature = 0.7 if vocab == 33 else 1.0
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        got, metrics = compute_policy_gradient_term(h1, w1, y, adv, tw, chunk, temperature)
        assert metrics == {}  # no sampler log-probs: plain REINFORCE
        got.backward()
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        want = _reference(h2, w2, y, adv, tw, temperature)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)
    # a positive advantage raises the sampled token's log-probability (a gradient step lowers the term)
    h = torch.randn(4, 6, dtype=torch.float64, generator=g)
    w = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([1, 2, 3, 4])
    before = torch.log_softmax(h @ w.T, -1).gather(1, y[:, None]).sum()
    compute_policy_gradient_term(h, w, y, torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                                 chunk)[0].backward()
    with torch.no_grad():
        after = torch.log_softmax(h @ (w - 0.1 * w.grad).T, -1).gather(1, y[:, None]).sum()
    assert after > before
    empty = compute_policy_gradient_term(torch.zeros(0, 6, requires_grad=True), torch.zeros(9, 6), torch.zeros(0, dtype=torch.long),
                                         torch.zeros(0), torch.zeros(0), chunk)[0]
    assert float(empty) == 0.0


def _sample(route, row, sid):
    return RolloutSample(input_ids=[1, 2], loss_mask=[0, 1], rollout_logprobs=[0.0, 0.0], finish_reason="stop",
                         text="", reference=None, route=route, row_id=row, sample_id=sid)


def test_group_advantages_are_the_rewards_z_scored_within_each_prompt():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.2, 0.9, 0.4]
    samples = [_sample("a" if i < 6 else "b", f"r{i // 3}", f"s{i}") for i in range(9)]
    set_reward_advantages(samples, rewards, 3)
    for g in range(3):
        r = torch.tensor(rewards[3 * g:3 * g + 3], dtype=torch.float64)
        want = (r - r.mean()) / (r.std() + 1e-6) if r.std() > 0 else torch.zeros(3, dtype=torch.float64)
        got = torch.tensor([s.advantage for s in samples[3 * g:3 * g + 3]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [s.reward for s in samples] == rewards
    assert [s.advantage for s in samples[3:6]] == [0.0, 0.0, 0.0]  # a group of equal rewards teaches nothing
    with pytest.raises(ValueError, match="not one prompt's group"):
        set_reward_advantages([_sample("a", "r0", "x"), _sample("a", "r1", "y")], [1.0, 0.0], 2)
    with pytest.raises(ValueError, match="groups of 2"):
        set_reward_advantages(samples[:3], rewards[:3], 2)


def test_reward_weight_needs_groups():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        OPDSettings(reward_weight=0.1, samples_per_prompt=1)
    assert OPDSettings(reward_weight=0.1, samples_per_prompt=2).reward_weight == 0.1


def _clipped_reference(h, w, targets, adv, tw, behaviour, temperature, clip_low, clip_high):
    """-sum_i tw_i min(r_i A_i, clip(r_i, 1 - lo, 1 + hi) A_i), r_i = p(y_i) / p_b(y_i),
    written out in float64 (no shared code with experts.losses)."""
    logp = torch.log_softmax(h @ w.T / temperature, dim=-1).gather(1, targets[:, None])[:, 0]
    r = torch.exp(logp - behaviour)
    return -(tw * torch.minimum(r * adv, r.clamp(1 - clip_low, 1 + clip_high) * adv)).sum(), r.detach()


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_clipped_reward_term_matches_a_float64_reference(chunk):
    """The reward term against the sampler's log-probs: value, gradients and the logged
    ratio mean and clip fractions, with ratios inside and outside the clip range."""
    g = torch.Generator().manual_seed(100 + chunk)
    n, hdim, vocab, temperature, lo, hi = 40, 6, 17, 0.8, 0.2, 0.28
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hdim, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,), generator=g)
    adv, tw = torch.randn(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    now = torch.log_softmax(h @ w.T / temperature, -1).gather(1, y[:, None])[:, 0]
    behaviour = now + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)  # ratios e^{+-0.5}: many clipped
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got, metrics = compute_policy_gradient_term(h1, w1, y, adv, tw, chunk, temperature, behaviour, lo, hi)
    got.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want, r = _clipped_reference(h2, w2, y, adv, tw, behaviour, temperature, lo, hi)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)
    low, high = float(((r < 1 - lo) & (adv < 0)).double().mean()), float(((r > 1 + hi) & (adv > 0)).double().mean())
    assert 0 < low and 0 < high  # both branches exercised
    assert metrics["ratio_mean"] == pytest.approx(float(r.mean()), rel=1e-12)
    assert metrics["clip_frac_low"] == pytest.approx(low) and metrics["clip_frac_high"] == pytest.approx(high)


def test_clipped_reward_term_on_fresh_samples_is_reinforce():
    """Sampled by the current weights (ratio 1): the clipped term's value and gradient are
    REINFORCE's; sampled by older weights, the gradient is reweighted by the ratio."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(12, 4, generator=g, dtype=torch.float64)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (12,), generator=g)
    adv, tw = torch.randn(12, generator=g, dtype=torch.float64), torch.rand(12, generator=g, dtype=torch.float64)
    now = torch.log_softmax(h @ w.T, -1).gather(1, y[:, None])[:, 0]
    grads = []
    for behaviour in (None, now, now + 0.1):
        w1 = w.clone().requires_grad_()
        value, metrics = compute_policy_gradient_term(h, w1, y, adv, tw, 4, 1.0, behaviour)
        value.backward()
        grads.append((float(value), w1.grad))
    assert grads[1][0] == pytest.approx(-float((tw * adv).sum()), rel=1e-12)  # r A at r = 1
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(grads[2][1], grads[0][1], rtol=1e-3)  # ratio e^-0.1: another gradient


def test_reward_term_refuses_greedy_sampling():
    with pytest.raises(ValueError, match="temperature > 0"):
        OPDSettings(reward_weight=1.0, samples_per_prompt=2, temperature=0.0)
    assert OPDSettings(reward_weight=1.0, samples_per_prompt=2, temperature=0.5).reward_ratio == "clip"
