"""How a round's samples become optimiser steps: teacher-mixed mini-batches whose
micro-batches are ordered by teacher index.

Every mini-batch (one optimiser step) is a seeded random subset of the round's samples,
so it mixes every teacher's samples (a step that saw one domain only would pull the
student toward that domain and away from the others in turn). Inside the mini-batch the
samples are sorted by teacher index and cut into micro-batches that never span two
teachers, so each teacher's head is loaded at most once per step while gradients
accumulate across the micro-batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class MicroPlan:
    teacher_index: int
    sample_indices: tuple[int, ...]  # with `rows`: the rows' samples, row by row
    rows: tuple[tuple[int, ...], ...] | None = None  # packed (micro_batch_tokens): sample indices per row


def plan_minibatches(teacher_of: list[int], mini_batch_size: int, micro_batch_size: int,
                     seed: int, *, micro_batch_tokens: int | None = None,
                     lengths: list[int] | None = None) -> list[list[MicroPlan]]:
    """Split sample indices into mini-batches of micro-batches grouped by teacher.

    teacher_of[i] is the teacher index of sample i. Returns, per optimiser step, the
    micro-batches in ascending teacher order. With `micro_batch_tokens` (and `lengths[i]`,
    sample i's tokens) each teacher's samples of the mini-batch are packed into rows as long
    as the longest of them and cut into micro-batches of at most that many tokens
    (`engine.batching.plan_token_micro_batches`); `micro_batch_size` is then unused.
    """
    if mini_batch_size < 1 or micro_batch_size < 1:
        raise ValueError("mini_batch_size and micro_batch_size must be >= 1")
    if micro_batch_tokens is not None and (lengths is None or len(lengths) != len(teacher_of)):
        raise ValueError("plan_minibatches: micro_batch_tokens needs one length per sample")
    order = list(range(len(teacher_of)))
    random.Random(seed).shuffle(order)
    steps = []
    for start in range(0, len(order), mini_batch_size):
        mini = sorted(order[start:start + mini_batch_size], key=lambda i: (teacher_of[i], i))
        micro: list[MicroPlan] = []
        k = 0
        while k < len(mini):
            t = teacher_of[mini[k]]
            j = k
            cap = len(mini) if micro_batch_tokens is not None else micro_batch_size
            while j < len(mini) and teacher_of[mini[j]] == t and j - k < cap:
                j += 1
            if micro_batch_tokens is None:
                micro.append(MicroPlan(t, tuple(mini[k:j])))
            else:
                from engine.batching import plan_token_micro_batches

                group = mini[k:j]
                for rows in plan_token_micro_batches([lengths[i] for i in group], micro_batch_tokens):
                    packed = tuple(tuple(group[i] for i in row) for row in rows)
                    micro.append(MicroPlan(t, tuple(i for row in packed for i in row), packed))
            k = j
        steps.append(micro)
    return steps
