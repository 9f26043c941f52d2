"""Group advantages vs hand-worked values and a float64 python-loop reference."""

import math

import pytest
import torch

from experts.advantages import (ADVANTAGE_ESTIMATORS, compute_advantages, compute_group_normalized_advantages,
                                compute_mean_centered_advantages, get_advantage_estimator,
                                register_advantage_estimator)

torch.set_num_threads(1)


def ref_advantages(rewards: list[float], normalise: bool, eps: float) -> list[float]:
    """Straightforward loop: mean, unbiased std (divide by G - 1)."""
    g = len(rewards)
    mean = sum(rewards) / g
    if not normalise:
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (g - 1))
    return [(r - mean) / (std + eps) for r in rewards]


def test_hand_worked_grpo():
    # rewards [1, 0, 0, 1]: mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735
    # -> A = +-0.5 / 0.57735 = +-0.866025 (with eps=0)
    adv = compute_group_normalized_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64), eps=0.0)
    assert torch.allclose(adv, torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]], dtype=torch.float64),
                          atol=1e-6)
    # rewards [1, 0, 0, 0]: mean 0.25, unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    # -> A = [1.5, -0.5, -0.5, -0.5]
    adv = compute_group_normalized_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    assert torch.allclose(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]), atol=1e-6)


def test_hand_worked_dr_grpo():
    # Dr. GRPO: R - mean only. [1, 0, 0, 1] -> [0.5, -0.5, -0.5, 0.5]; [1, 0, 0, 0] -> [0.75, -0.25, ...]
    adv = compute_mean_centered_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]]))


def test_equal_rewards_give_zero_advantage():
    # std = 0 -> (R - mean) / eps = 0 / eps = 0: a group with no signal contributes nothing
    adv = compute_group_normalized_advantages(torch.full((2, 5), 0.7))
    assert torch.equal(adv, torch.zeros(2, 5))


@pytest.mark.parametrize("estimator,normalise", [("grpo", True), ("dr_grpo", False)])
def test_random_groups_match_loop_reference(estimator, normalise):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(7, 6, generator=g, dtype=torch.float64)
    rewards[3] = (rewards[3] > 0.5).double()  # a binary-reward group too
    adv = get_advantage_estimator(estimator)(rewards, eps=1e-6)
    for i in range(rewards.shape[0]):
        expect = ref_advantages(rewards[i].tolist(), normalise, 1e-6)
        assert adv[i].tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("estimator,normalise", [("grpo", True), ("dr_grpo", False)])
def test_compute_advantages_ragged_groups_match_loop_reference(estimator, normalise):
    g = torch.Generator().manual_seed(1)
    groups = [torch.randn(n, generator=g, dtype=torch.float64).tolist() for n in (3, 4, 2, 5)]
    groups.append([1.0, 0.0, 0.0, 1.0])
    adv = compute_advantages(groups, estimator, eps=1e-6)
    assert [len(a) for a in adv] == [3, 4, 2, 5, 4]
    for rewards, got in zip(groups, adv):
        # the rewards go through float32 (as GRPO trains): float32 precision, not 1e-12
        expect = ref_advantages([float(torch.tensor(r, dtype=torch.float32)) for r in rewards], normalise, 1e-6)
        assert got == pytest.approx(expect, rel=1e-6, abs=1e-6)
    assert all(isinstance(a, float) for row in adv for a in row)


def test_compute_advantages_is_pure_and_hand_worked():
    rewards = [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5]]
    # grpo: [1, 0, 0, 0] -> [1.5, -0.5, -0.5, -0.5] / (1 + 2e-6) (eps 1e-6 next to std 0.5); equal -> 0
    adv = compute_advantages(rewards, "grpo")
    assert adv[0] == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5) and adv[1] == [0.0, 0.0]
    assert rewards == [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5]]  # inputs untouched
    assert compute_advantages(rewards, "dr_grpo")[0] == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert compute_advantages([], "grpo") == []


def test_float32_input_keeps_dtype():
    adv = compute_group_normalized_advantages(torch.tensor([[1.0, 0.0, 0.5]]))
    assert adv.dtype == torch.float32


def test_registry_rejects_duplicates_and_lists_names():
    assert {"grpo", "dr_grpo"} <= set(ADVANTAGE_ESTIMATORS)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda r, *, eps=0.0: r)
    with pytest.raises(KeyError, match="dr_grpo.*grpo|grpo.*dr_grpo"):
        get_advantage_estimator("nope")


def test_bad_input_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        compute_group_normalized_advantages(torch.ones(3, 1))  # unbiased std of one sample is undefined
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 2\)"):
        compute_group_normalized_advantages(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\(num_groups, G\)"):
        compute_mean_centered_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="group 1: .*G >= 2"):
        compute_advantages([[1.0, 0.0], [1.0]], "grpo")  # the second group has one sample
    with pytest.raises(ValueError, match="floating"):
        compute_group_normalized_advantages(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(KeyError, match="unknown advantage estimator 'ppo'"):
        compute_advantages([[1.0, 0.0]], "ppo")


def test_with_advantages_copies_and_drops_truncated():
    from experts.grpo import with_advantages
    from engine.episode import RolloutSample

    def sample(reward, finish):
        return RolloutSample(input_ids=[1, 2], loss_mask=[0, 1], rollout_logprobs=[0.0, -1.0], finish_reason=finish,
                             text="", reference=None, route="d", reward=reward)

    groups = [[sample(1.0, "stop"), sample(0.0, "length")], [sample(0.5, "stop")]]
    out = with_advantages(groups, [[0.7, -0.7], [0.0]], drop_truncated=False)
    assert [(s.reward, s.advantage) for s in out] == [(1.0, 0.7), (0.0, -0.7), (0.5, 0.0)]
    assert all(s.advantage == 0.0 for g in groups for s in g)  # the inputs are not mutated
    kept = with_advantages(groups, [[0.7, -0.7], [0.0]], drop_truncated=True)
    assert [(s.reward, s.advantage) for s in kept] == [(1.0, 0.7), (0.5, 0.0)]
    with pytest.raises(ValueError):  # one advantage per sample, no silent truncation
        with_advantages(groups, [[0.7], [0.0]], drop_truncated=False)
