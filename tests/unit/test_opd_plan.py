"""Teacher-mixed mini-batches with teacher-ordered micro-batches."""

import random

from distill.plan import plan_minibatches


def test_every_sample_once_and_micro_batches_in_teacher_order():
    rng = random.Random(0)
    teacher_of = [rng.randrange(4) for _ in range(203)]
    steps = plan_minibatches(teacher_of, mini_batch_size=64, micro_batch_size=5, seed=1)
    seen = [i for step in steps for mb in step for i in mb.sample_indices]
    assert sorted(seen) == list(range(203))  # nothing repeated, nothing skipped
    for step in steps:
        order = [mb.teacher_index for mb in step]
        assert order == sorted(order)  # each head needed once per step
        for mb in step:
            assert 1 <= len(mb.sample_indices) <= 5
            assert {teacher_of[i] for i in mb.sample_indices} == {mb.teacher_index}
        # a 64-sample step of 4 roughly balanced teachers sees all of them
    assert all(len({mb.teacher_index for mb in s}) == 4 for s in steps[:-1])


def test_plan_is_deterministic_per_seed():
    t = [i % 3 for i in range(50)]
    assert plan_minibatches(t, 16, 4, seed=7) == plan_minibatches(t, 16, 4, seed=7)
    assert plan_minibatches(t, 16, 4, seed=7) != plan_minibatches(t, 16, 4, seed=8)
