"""GRPO mini/micro-batches: every sample once, global denominators per mini-batch, and
micro-batches grouped by length (less padding; the loss is a sum, so nothing else changes)."""

import random

import torch

from engine.episode import RolloutSample
from experts.rl_batch import build_minibatches


def _samples(n: int, seed: int = 0) -> list[RolloutSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(3, 8), rng.choice([rng.randint(2, 10), rng.randint(40, 90)])  # short and long episodes
        out.append(RolloutSample(input_ids=[10 + i] * (p + r), loss_mask=[0] * p + [1] * r,
                                 rollout_logprobs=[0.0] * p + [-1.0] * r, finish_reason="stop", text="",
                                 reference=None, route="d", reward=0.0, advantage=float(i)))
    return out


def test_micro_batches_cover_the_mini_batch_once_grouped_by_length():
    samples = _samples(48)
    minis = build_minibatches(samples, num_minibatches=2, micro_batch_size=8, pad_id=0, seed=3)
    seen = []
    for micro in minis:
        tokens = sum(float(mb["loss_mask"].sum()) for mb in micro)
        assert all(float(mb["global_tokens"]) == tokens for mb in micro)  # the mini-batch's own count
        assert all(float(mb["global_seqs"]) == 24 for mb in micro)
        lengths = [int(mb["attention_mask"].sum(-1).max()) for mb in micro]
        assert lengths == sorted(lengths)  # shortest micro-batch first
        for mb in micro:
            seen += mb["advantages"].tolist()
    assert sorted(seen) == [float(i) for i in range(48)]
    # the same mini-batches as before grouping (the shuffle decides membership)
    padded = sum(mb["input_ids"].numel() for micro in minis for mb in micro)
    order = list(range(48))
    random.Random(3).shuffle(order)
    halves = [[samples[i] for i in order[:24]], [samples[i] for i in order[24:]]]
    assert [sorted(float(a) for mb in micro for a in mb["advantages"]) for micro in minis] == \
        [sorted(s.advantage for s in h) for h in halves]
    ungrouped = sum(8 * max(len(s.input_ids) for s in h[k:k + 8]) for h in halves for k in range(0, 24, 8))
    assert padded < ungrouped


def test_positions_and_masks_follow_each_sample():
    s = _samples(5, seed=1)
    (micro,), = [build_minibatches(s, 1, 5, pad_id=0, seed=0)]
    mb = micro[0]
    for row in range(5):
        n = int(mb["attention_mask"][row].sum())
        assert mb["position_ids"][row, :n].tolist() == list(range(n))
        assert torch.all(mb["loss_mask"][row, n:] == 0)
