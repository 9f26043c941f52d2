"""OPD loss aggregation across teachers (`distill.opd_loss.loss_divisors`), against a float64
reference that averages per-token divergences directly."""

import random

import pytest
import torch

from distill.opd_loss import loss_divisors


def _reference(per_token: list[torch.Tensor], teachers: list[int], aggregation: str) -> float:
    """float64: token_mean = mean over every token of the step; teacher_token_mean = mean
    over the step's teachers of the mean over that teacher's tokens."""
    if aggregation == "token_mean":
        return float(torch.cat(per_token).mean())
    means = [torch.cat([x for x, t in zip(per_token, teachers) if t == k]).mean() for k in sorted(set(teachers))]
    return float(torch.stack(means).mean())


@pytest.mark.parametrize("aggregation", ["token_mean", "teacher_token_mean"])
@pytest.mark.parametrize("seed", range(5))
def test_sum_of_micro_batch_losses_over_divisors_is_the_reference_mean(aggregation, seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n_micro = rng.randint(1, 9)
    teachers = sorted(rng.randrange(4) for _ in range(n_micro))  # sorted by teacher, as the plan streams them
    # short answers for one teacher, long for the others (the math-vs-tool situation)
    per_token = [torch.rand(rng.randint(1, 6) if t == 0 else rng.randint(20, 90), dtype=torch.float64, generator=g)
                 for t in teachers]
    divisors = loss_divisors([len(x) for x in per_token], teachers, aggregation)
    got = sum(float(x.sum()) / d for x, d in zip(per_token, divisors))
    assert got == pytest.approx(_reference(per_token, teachers, aggregation), rel=1e-12)


def test_teacher_token_mean_gives_each_teacher_the_same_share():
    # teacher 0: 5 tokens, teacher 1: 95 tokens, divergence 1 everywhere
    d = loss_divisors([5, 50, 45], [0, 1, 1], "teacher_token_mean")
    shares = [5 / d[0], 50 / d[1] + 45 / d[2]]
    assert shares == pytest.approx([0.5, 0.5])
    d = loss_divisors([5, 50, 45], [0, 1, 1], "token_mean")
    assert [5 / d[0], 95 / d[1]] == pytest.approx([0.05, 0.95])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown aggregation 'sample_mean'"):
        loss_divisors([1], [0], "sample_mean")
    with pytest.raises(ValueError, match="2 token counts for 1 teachers"):
        loss_divisors([1, 2], [0], "token_mean")
    assert loss_divisors([0, 0], [0, 1], "teacher_token_mean") == [2.0, 2.0]  # empty: no division by zero
