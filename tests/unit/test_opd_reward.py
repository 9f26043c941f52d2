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
        got = compute_policy_gradient_term(h1, w1, y, adv, tw, chunk, temperature)
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
                                 chunk).backward()
    with torch.no_grad():
        after = torch.log_softmax(h @ (w - 0.1 * w.grad).T, -1).gather(1, y[:, None]).sum()
    assert after > before
    empty = compute_policy_gradient_term(torch.zeros(0, 6, requires_grad=True), torch.zeros(9, 6), torch.zeros(0, dtype=torch.long),
                                         torch.zeros(0), torch.zeros(0), chunk)
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
