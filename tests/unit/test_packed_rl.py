"""Padding-free RL micro-batches (`micro_batch_tokens`, engine/batching.py): the packing plan,
the row/sample layouts, and the GRPO loss, its gradient and the old/reference log-probs on a
real (tiny, random) Qwen2 model against the right-padded path, to 1e-6 relative in fp32, for
every aggregation, GSPO, the off-policy mask, TIS and the KL term, with multi-turn episodes
whose tool results are masked out of the loss."""

import random

import pytest
import torch

from engine.batching import (ROW_KEYS, pack_row_tensors, plan_token_micro_batches, row_order, split_packed_rows,
                             unpack_to_samples)
from engine.episode import RolloutSample
from engine.model import TinySpec, load_model, materialize_tiny
from engine.trainer_common import LogprobFn, run_loss
from experts.grpo import GRPOLoss
from experts.grpo_settings import GRPOSettings
from experts.rl_batch import build_minibatches

SPEC = TinySpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.set_num_threads(1)
    d = materialize_tiny(SPEC, tmp_path_factory.mktemp("packed") / "m", seed=0)
    return load_model(d, dtype="fp32").eval()


def _episode(rng: random.Random, i: int, vocab: int) -> RolloutSample:
    """A prompt, then 1-3 model turns with tool results between them (masked out): lengths
    from a 3-token answer to a ~90-token episode."""
    p = rng.randint(4, 12)
    ids, mask = [rng.randrange(4, vocab) for _ in range(p)], [0] * p
    for turn in range(rng.choice([1, 1, 2, 3])):
        if turn:
            k = rng.randint(3, 8)  # a tool result: context, not a target
            ids += [rng.randrange(4, vocab) for _ in range(k)]
            mask += [0] * k
        r = rng.choice([rng.randint(1, 6), rng.randint(20, 40)])
        ids += [rng.randrange(4, vocab) for _ in range(r)]
        mask += [1] * r
    lp = [-rng.uniform(0.1, 4.0) if m else 0.0 for m in mask]
    return RolloutSample(input_ids=ids, loss_mask=mask, rollout_logprobs=lp, finish_reason="stop", text="",
                         reference=None, route="d", advantage=rng.gauss(0, 1),
                         max_response_tokens=rng.choice([48, 144]))


def _samples(n=24, seed=0, vocab=90):
    rng = random.Random(seed)
    return [_episode(rng, i, vocab) for i in range(n)]


# ----------------------------------------------------------------------------- plan and layouts
def test_plan_covers_every_sample_once_within_rows_and_the_token_budget():
    rng = random.Random(1)
    lengths = [rng.choice([rng.randint(3, 10), rng.randint(60, 120)]) for _ in range(57)]
    for budget in (1, 120, 500, 10_000):
        micro = plan_token_micro_batches(lengths, budget)
        T = max(lengths)
        flat = [i for m in micro for i in row_order(m)]
        assert sorted(flat) == list(range(57))
        for m in micro:
            assert all(sum(lengths[i] for i in row) <= T for row in m)
            assert len(m) == 1 or len(m) * T <= budget
    padded = 57 * max(lengths)
    packed = sum(len(m) for m in plan_token_micro_batches(lengths, 10_000)) * max(lengths)
    assert packed < 0.6 * padded  # short samples share rows


def test_unpacking_gives_back_each_sample_and_its_positions():
    rng = random.Random(2)
    seqs = [[rng.randrange(1, 50) for _ in range(rng.randint(1, 30))] for _ in range(11)]
    (rows,) = plan_token_micro_batches([len(s) for s in seqs], 10_000)
    b = pack_row_tensors(seqs, rows, max(len(s) for s in seqs), pad_id=0)
    order = row_order(rows)
    ids = unpack_to_samples(b["input_ids"], b)  # (S, L)
    pos = unpack_to_samples(b["position_ids"], b)
    for k, i in enumerate(order):
        n = len(seqs[i])
        assert ids[k, :n].tolist() == seqs[i]
        assert pos[k, :n].tolist() == list(range(n))
    assert int(b["attention_mask"].sum()) == sum(map(len, seqs))


def test_split_over_ranks_keeps_rows_with_their_samples():
    samples = _samples(30, seed=3)
    (mini,) = build_minibatches(samples, 1, 8, pad_id=0, seed=0, micro_batch_tokens=100_000)
    (b,) = mini
    for world in (1, 2, 3, 50):
        parts, counts = split_packed_rows(b, world)
        assert sum(counts) == b["loss_mask"].shape[0]
        got = torch.cat([unpack_to_samples(p["input_ids"], p)[:n] for p, n in zip(parts, counts) if n])
        want = unpack_to_samples(b["input_ids"], b)
        assert torch.equal(got, want)
        for p, n in zip(parts, counts):
            assert p["loss_mask"].shape[0] == p["unpack_index"].shape[0]
            assert all(p[k].shape[0] == p["input_ids"].shape[0] for k in ROW_KEYS)


# ----------------------------------------------------------------------------- the loss against the padded path
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _loss_and_grads(lm, micro_batches, loss_fn):
    lm.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro_batches:
        loss, _ = run_loss(lm, mb, loss_fn)
        loss.backward()
        total += float(loss)
    return total, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


def _with_logprobs(lm, minis, ref=False):
    """old (and reference) log-probs as `experts.grpo._optimise` takes them, shifted by a
    function of each sample's tokens and positions (a stand-in for the policy that sampled,
    so ratios are not 1; the same shift in either layout)."""
    for micro in minis:
        for mb in micro:
            with torch.no_grad():
                lp, _ = run_loss(lm, mb, LogprobFn())  # (S, L) either way
            ids = unpack_to_samples(mb["input_ids"], mb).to(lp.dtype)  # (S, L)
            phase = ids * 1.3 + torch.arange(lp.shape[1], dtype=lp.dtype)
            mb["old_logprobs"] = lp + 0.05 * torch.sin(phase)
            if ref:
                mb["ref_logprobs"] = lp - 0.1 * torch.cos(phase)
    return minis


CASES = [
    dict(loss_agg="token-mean"),
    dict(loss_agg="seq-mean-token-mean"),
    dict(loss_agg="seq-mean-token-sum-norm"),
    dict(loss_agg="seq-mean-token-mean", policy_loss="gspo", clip_low=3e-4, clip_high=4e-4),
    dict(loss_agg="token-mean", offpolicy_mask_delta=0.5, tis_cap=2.0),
    dict(loss_agg="token-mean", kl_beta=0.1, kl_estimator="unbiased_k3"),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_packed_loss_and_gradient_equal_the_padded_ones(lm, kw):
    samples = _samples(24)
    loss_fn = GRPOLoss(GRPOSettings(**kw))
    args = dict(num_minibatches=2, pad_id=0, seed=5, temperature=0.8)
    padded = _with_logprobs(lm, build_minibatches(samples, micro_batch_size=5, **args), ref=True)
    packed = _with_logprobs(lm, build_minibatches(samples, micro_batch_size=5, micro_batch_tokens=150, **args),
                            ref=True)
    assert sum(len(m) for m in packed) != sum(len(m) for m in padded)  # another split into micro-batches
    for pad_micro, pack_micro in zip(padded, packed):
        # the old log-probs themselves: the same values per sample (each episode ends with a target)
        want = {}
        for mb in pad_micro:
            for i in range(mb["input_ids"].shape[0]):
                n = int(mb["attention_mask"][i].sum())
                want[tuple(mb["input_ids"][i, :n].tolist())] = mb["old_logprobs"][i, :n]
        for mb in pack_micro:
            ids = unpack_to_samples(mb["input_ids"], mb)  # (S, L)
            for i in range(ids.shape[0]):
                n = int(mb["loss_mask"][i].nonzero().max()) + 1
                assert _rel(mb["old_logprobs"][i, :n], want[tuple(ids[i, :n].tolist())]) < 1e-6
        l_pad, g_pad = _loss_and_grads(lm, pad_micro, loss_fn)
        l_pack, g_pack = _loss_and_grads(lm, pack_micro, loss_fn)
        assert l_pack == pytest.approx(l_pad, rel=1e-6, abs=1e-9)
        assert g_pad.keys() == g_pack.keys()
        for n in g_pad:
            assert _rel(g_pack[n], g_pad[n]) < 1e-6, n


def test_packed_micro_batches_do_less_work_than_padded_ones():
    samples = _samples(64, seed=7)
    padded = build_minibatches(samples, 1, 16, pad_id=0, seed=0)
    packed = build_minibatches(samples, 1, 16, pad_id=0, seed=0, micro_batch_tokens=1024)
    cells = lambda minis: sum(mb["input_ids"].numel() for m in minis for mb in m)  # noqa: E731
    real = sum(len(s.input_ids) for s in samples)
    assert cells(packed) < cells(padded)
    assert cells(packed) < 1.3 * real
