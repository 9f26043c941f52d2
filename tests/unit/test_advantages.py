"""Group advantages vs hand-worked values and a float64 python-loop reference."""

import math

import pytest
import torch

from experts.advantages import (ADVANTAGE_ESTIMATORS, broadcast_to_tokens, compute_grpo_advantages,
                                get_advantage_estimator, register_advantage_estimator)

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
    adv = compute_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64), eps=0.0)
    assert torch.allclose(adv, torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]], dtype=torch.float64),
                          atol=1e-6)
    # rewards [1, 0, 0, 0]: mean 0.25, unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    # -> A = [1.5, -0.5, -0.5, -0.5]
    adv = compute_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    assert torch.allclose(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]), atol=1e-6)


def test_hand_worked_dr_grpo():
    # Dr. GRPO: R - mean only. [1, 0, 0, 1] -> [0.5, -0.5, -0.5, 0.5]; [1, 0, 0, 0] -> [0.75, -0.25, ...]
    adv = compute_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]), estimator="dr_grpo")
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]]))


def test_equal_rewards_give_zero_advantage():
    # std = 0 -> (R - mean) / eps = 0 / eps = 0: a group with no signal contributes nothing
    adv = compute_grpo_advantages(torch.full((2, 5), 0.7))
    assert torch.equal(adv, torch.zeros(2, 5))


@pytest.mark.parametrize("estimator,normalise", [("grpo", True), ("dr_grpo", False)])
def test_random_groups_match_loop_reference(estimator, normalise):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(7, 6, generator=g, dtype=torch.float64)
    rewards[3] = (rewards[3] > 0.5).double()  # a binary-reward group too
    adv = compute_grpo_advantages(rewards, estimator=estimator, eps=1e-6)
    for i in range(rewards.shape[0]):
        expect = ref_advantages(rewards[i].tolist(), normalise, 1e-6)
        assert adv[i].tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("estimator,normalise", [("grpo", True), ("dr_grpo", False)])
def test_flat_rewards_with_ragged_interleaved_groups(estimator, normalise):
    g = torch.Generator().manual_seed(1)
    group_ids = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 5, 5])  # sizes 3, 3, 4, 2; not contiguous
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    adv = compute_grpo_advantages(rewards, group_ids, estimator=estimator, eps=1e-6)
    assert adv.shape == (12,)
    for gid in set(group_ids.tolist()):
        idx = [i for i, x in enumerate(group_ids.tolist()) if x == gid]
        expect = ref_advantages([rewards[i].item() for i in idx], normalise, 1e-6)
        assert [adv[i].item() for i in idx] == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_float32_input_keeps_dtype():
    adv = compute_grpo_advantages(torch.tensor([[1.0, 0.0, 0.5]]))
    assert adv.dtype == torch.float32


def test_broadcast_to_tokens():
    # advantages [2, -1] over masks [[0,1,1],[1,1,0]] -> [[0,2,2],[-1,-1,0]]
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]))
    with pytest.raises(ValueError, match="advantages"):
        broadcast_to_tokens(torch.zeros(3), torch.ones(2, 4))


def test_registry_rejects_duplicates_and_lists_names():
    assert {"grpo", "dr_grpo"} <= set(ADVANTAGE_ESTIMATORS)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda r, *, eps=0.0: r)
    with pytest.raises(KeyError, match="dr_grpo.*grpo|grpo.*dr_grpo"):
        get_advantage_estimator("nope")


def test_bad_input_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        compute_grpo_advantages(torch.ones(3, 1))  # unbiased std of one sample is undefined
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 2\)"):
        compute_grpo_advantages(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, float("nan")]]))
    with pytest.raises(ValueError, match="group_ids"):
        compute_grpo_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="group 7"):
        compute_grpo_advantages(torch.ones(3), torch.tensor([7, 1, 1]))  # group 7 has one sample
    with pytest.raises(ValueError, match="floating"):
        compute_grpo_advantages(torch.ones(2, 3, dtype=torch.long))
