"""How a round's prompts are split among the OPD teachers (distill.allocation)."""

import random
from fractions import Fraction

import pytest

from distill.allocation import allocate_in_proportion, allocate_prompts, round_allocation
from distill.opd import TeacherRef
from distill.opd_settings import OPDSettings


def _reference(total, weights, minimum):
    """Exact quotas in rationals (floats rounded to float64 first), then Hamilton's method."""
    names = sorted(weights)
    rest = total - minimum * len(names)
    w = {k: Fraction(weights[k]) for k in names}
    mass = sum(w.values())
    quota = {k: rest * (w[k] / mass if mass else Fraction(1, len(names))) for k in names}
    base = {k: int(quota[k]) for k in names}
    for k in sorted(names, key=lambda k: (-(quota[k] - base[k]), k))[:rest - sum(base.values())]:
        base[k] += 1
    return {k: minimum + base[k] for k in names}, quota


def test_counts_sum_to_the_total_keep_the_floor_and_match_an_exact_reference():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randrange(1, 11)
        weights = {f"r{i}": rng.choice([0.0, rng.random(), rng.uniform(0, 1e-3), 7.0]) for i in range(n)}
        total = rng.randrange(n, 600)
        minimum = rng.randrange(0, total // n + 1)
        got = allocate_prompts(total, weights, minimum)
        want, quota = _reference(total, weights, minimum)
        assert sum(got.values()) == total and min(got.values()) >= minimum
        for k in weights:  # every count within one of its exact quota (floor + share of the rest)
            assert abs(got[k] - minimum - quota[k]) < 1
        # float64 quotas and exact ones pick the same largest remainders except at near-ties
        diff = sum(abs(got[k] - want[k]) for k in weights)
        assert diff == 0 or diff == 2, (weights, total, minimum, got, want)


def test_equal_weights_split_evenly_and_more_weight_never_means_fewer_prompts():
    assert allocate_prompts(512, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, 64) == dict.fromkeys("abcd", 128)
    assert allocate_prompts(10, {"a": 0.0, "b": 0.0}, 0) == {"a": 5, "b": 5}  # no gap anywhere: even
    got = allocate_prompts(512, {"a": 1.0, "b": 3.0, "c": 0.0, "d": 2.0}, 64)
    assert got == {"a": 107, "b": 192, "c": 64, "d": 149}
    base = {"a": 0.2, "b": 0.5, "c": 0.3}
    for k in base:
        more = allocate_prompts(300, {**base, k: base[k] * 2}, 10)
        assert more[k] >= allocate_prompts(300, base, 10)[k]


@pytest.mark.parametrize("weights,minimum", [({}, 0), ({"a": -1.0}, 0), ({"a": float("nan")}, 0),
                                             ({"a": float("inf")}, 0), ({"a": 1.0, "b": 1.0}, 6)])
def test_bad_allocations_are_refused(weights, minimum):
    with pytest.raises(ValueError, match="allocate_prompts"):
        allocate_prompts(10, weights, minimum)


def _teachers(shares=(1.0, 1.0, 1.0)):
    return [TeacherRef(i, f"grpo:{d}", d, "x", 1.0, None, s) for i, (d, s) in enumerate(zip("abc", shares))]


def test_round_allocation_follows_the_last_known_round_kl_with_a_floor():
    hist = {"kl_per_teacher": [{"grpo:a": 0.01, "grpo:b": 0.03, "grpo:c": 0.0},
                               {"grpo:a": 0.02, "grpo:b": 0.02, "grpo:c": 0.04}]}
    s = OPDSettings(prompts_per_domain=100, allocation="kl", allocation_floor=0.5)
    assert round_allocation(s, _teachers(), hist, 0) == {"a": 100, "b": 100, "c": 100}  # no KL yet
    assert round_allocation(s, _teachers(), hist, 1) == {"a": 88, "b": 162, "c": 50}  # round 0's KL
    assert round_allocation(s, _teachers(), hist, 2) == {"a": 88, "b": 87, "c": 125}  # round 1's (a tie: a first)
    # pipelined: round r is drawn while r - 1 trains, so it follows round r - 2's KL
    sp = s.model_copy(update={"pipelined": True})
    assert round_allocation(sp, _teachers(), hist, 1) == {"a": 100, "b": 100, "c": 100}
    assert round_allocation(sp, _teachers(), hist, 2) == round_allocation(s, _teachers(), hist, 1)
    with pytest.raises(RuntimeError, match="round 3 needs round 2's KL"):
        round_allocation(s, _teachers(), hist, 3)
    # a teacher's share scales its gap; floor 0 lets a closed gap take nothing beyond one prompt
    got = round_allocation(s.model_copy(update={"allocation_floor": 0.0}), _teachers((1.0, 1.0, 2.0)), hist, 1)
    assert got == {"a": 75, "b": 224, "c": 1}


def test_fixed_allocation_is_the_plain_split_unless_shares_differ():
    s = OPDSettings(prompts_per_domain=128)
    assert round_allocation(s, _teachers(), {}, 5) == {"a": 128, "b": 128, "c": 128}
    got = round_allocation(s, _teachers((1.0, 2.0, 1.0)), {}, 5)
    assert got == {"a": 96, "b": 192, "c": 96} and sum(got.values()) == 3 * 128


def test_fixed_shares_split_in_exact_proportion_with_a_floor_of_one():
    """Shares 1:3 of 16 prompts: 4 and 12 (a floor of one prompt taken first gave 5 and 11);
    a share worth less than one prompt gets one, the others split the rest in proportion."""
    s = OPDSettings(prompts_per_domain=8)
    assert round_allocation(s, _teachers((1.0, 3.0))[:2], {}, 0) == {"a": 4, "b": 12}
    assert allocate_in_proportion(16, {"a": 1.0, "b": 3.0}, 1) == {"a": 4, "b": 12}
    assert allocate_in_proportion(16, {"a": 0.01, "b": 1.0, "c": 3.0}, 1) == {"a": 1, "b": 4, "c": 11}
    # 15 left for b:c = 1:3 -> 3.75 / 11.25 -> 4 / 11
    rng = random.Random(1)
    for _ in range(500):
        n = rng.randrange(1, 8)
        weights = {f"r{i}": rng.choice([rng.random(), rng.uniform(0, 1e-3), 5.0]) for i in range(n)}
        total = rng.randrange(n, 400)
        minimum = rng.randrange(0, total // n + 1)
        got = allocate_in_proportion(total, weights, minimum)
        assert sum(got.values()) == total and min(got.values()) >= minimum
        # reference: the floored routes are the j lightest for the smallest j at which the
        # lightest remaining route's share of what is left reaches the minimum
        order = sorted(weights, key=lambda k: weights[k])
        for j in range(n):
            free, left = order[j:], total - minimum * j
            mass = sum(weights[k] for k in free)
            if mass > 0 and left * weights[free[0]] / mass >= minimum:
                break
        for k in order[:j]:
            assert got[k] == minimum
        for k in free:
            assert abs(got[k] - left * weights[k] / mass) < 1, (weights, total, minimum, got)
        if all(total * w / sum(weights.values()) >= minimum for w in weights.values()):
            for k in weights:  # nothing floored: within one of the exact proportion of the total
                assert abs(got[k] - total * weights[k] / sum(weights.values())) < 1
