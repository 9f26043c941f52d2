"""Batching: padding, packing with attention boundaries, global denominators, the cursor,
and aligned token log-probs against a float64 reference."""

import pytest
import torch

from engine.batching import (EpochCursor, Sample, build_step_batches, pack_rows, pad_rows, plan_packing,
                             split_into_micro_batches, weight_groups_equally, with_global_tokens)
from engine.logprobs import compute_chunked_token_logprobs
from engine.trainer_common import LogprobFn, run_loss

torch.set_num_threads(1)


def _samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Sample(torch.randint(6, 90, (n,), generator=g).tolist(), [0] * 2 + [1] * (n - 2)) for n in lengths]


def test_pad_rows_hand_worked():
    s = [Sample([5, 6, 7], [0, 1, 1]), Sample([8, 9], [1, 1])]
    b = pad_rows(s, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    # token 0 is never a target (no context); padding carries none
    assert b["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]


def test_plan_packing_best_fit_decreasing():
    # row_length 10, longest first: 10 fills row 0; 6 opens row 1 (room 4); 5 opens row 2
    # (room 5); 4 fits rows 1 and 2 and goes to the tighter, row 1; 3 and then 1 go to row 2.
    # (In input order, next-fit would need 4 rows: [4,5] [3,6] [10] [1].)
    assert plan_packing([4, 5, 3, 6, 10, 1], 10) == [[4], [3, 0], [1, 2, 5]]
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        plan_packing([3, 11], 10)


def test_pack_rows_positions_and_masks():
    s = [Sample([5, 6, 7], [0, 1, 1]), Sample([8, 9], [1, 1]), Sample([10, 11, 12, 13], [0, 0, 1, 1])]
    b = pack_rows(s, row_length=6, pad_id=0)  # rows: [sample 2, sample 1], [sample 0]
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 8, 9], [5, 6, 7, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    # the first token of each sample is not a target even where the sample says so
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize("seed", range(5))
def test_plan_packing_places_every_sample_once_within_rows(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 33, (int(torch.randint(1, 80, (1,), generator=g)),), generator=g).tolist()
    plan = plan_packing(lengths, 32)
    assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 32 for row in plan)
    # a row is opened only when its first sample fits no earlier row (rooms only shrink)
    room = [32 - sum(lengths[i] for i in row) for row in plan]
    assert all(lengths[plan[j][0]] > room[k] for j in range(len(plan)) for k in range(j))
    # and packing beats one sample per row whenever two samples can share one
    if len(lengths) > 1 and sum(sorted(lengths)[:2]) <= 32:
        assert len(plan) < len(lengths)


def test_weight_groups_equally_is_the_mean_of_group_token_means():
    """Against a float64 reference: per-token values v; the weighted token mean equals the
    mean over groups of each group's own token mean, and the weights sum to the target count."""
    g = torch.Generator().manual_seed(0)
    samples = [Sample(list(range(n)), [0] + torch.randint(0, 2, (n - 1,), generator=g).tolist(), grp)
               for n, grp in [(6, "math"), (30, "tool"), (25, "tool"), (4, "math"), (12, "code")]]
    values = [torch.randn(len(s.input_ids), generator=g, dtype=torch.float64) for s in samples]
    weighted = weight_groups_equally(samples)
    targets = sum(sum(s.loss_mask[1:]) for s in samples)
    assert sum(sum(w.loss_mask[1:]) for w in weighted) == pytest.approx(targets)
    got = sum(float((torch.tensor(w.loss_mask[1:], dtype=torch.float64) * v[1:]).sum())
              for w, v in zip(weighted, values)) / targets
    means = []
    for grp in ("math", "tool", "code"):
        vals = [float(v[1:][torch.tensor(s.loss_mask[1:]) > 0].sum()) for s, v in zip(samples, values) if s.group == grp]
        n = sum(sum(s.loss_mask[1:]) for s in samples if s.group == grp)
        means.append(sum(vals) / n)
    assert got == pytest.approx(sum(means) / 3, rel=1e-12)
    # one group: the weights are the targets themselves (token mean unchanged)
    same = weight_groups_equally([Sample([1, 2, 3], [0, 1, 1], "a"), Sample([4, 5], [0, 1], "a")])
    assert [s.loss_mask for s in same] == [[0, 1, 1], [0, 1]]


def test_group_shares_weight_each_groups_token_mean():
    """Against a float64 reference: with shares {tool: 2, code: 0.5} (math unnamed: 1), the
    weighted token mean equals sum_g w_g * mean_g / sum_g w_g, the weights still sum to the
    target count, and shares that are all equal give the equal-share weights exactly."""
    g = torch.Generator().manual_seed(1)
    samples = [Sample(list(range(n)), [0] + torch.randint(0, 2, (n - 1,), generator=g).tolist(), grp)
               for n, grp in [(6, "math"), (30, "tool"), (25, "tool"), (4, "math"), (12, "code")]]
    values = [torch.randn(len(s.input_ids), generator=g, dtype=torch.float64) for s in samples]
    shares = {"tool": 2.0, "code": 0.5}
    weighted = weight_groups_equally(samples, shares)
    targets = sum(sum(s.loss_mask[1:]) for s in samples)
    assert sum(sum(w.loss_mask[1:]) for w in weighted) == pytest.approx(targets)
    got = sum(float((torch.tensor(w.loss_mask[1:], dtype=torch.float64) * v[1:]).sum())
              for w, v in zip(weighted, values)) / targets
    ref, norm = 0.0, 0.0
    for grp in ("math", "tool", "code"):
        vals = [float(v[1:][torch.tensor(s.loss_mask[1:]) > 0].sum()) for s, v in zip(samples, values) if s.group == grp]
        n = sum(sum(s.loss_mask[1:]) for s in samples if s.group == grp)
        w = shares.get(grp, 1.0)
        ref += w * sum(vals) / n
        norm += w
    assert got == pytest.approx(ref / norm, rel=1e-12)
    equal = weight_groups_equally(samples, {"math": 3.0, "tool": 3.0, "code": 3.0})
    assert [s.loss_mask for s in equal] == [s.loss_mask for s in weight_groups_equally(samples)]


def test_domain_shares_need_the_domain_mean_and_positive_weights():
    from experts.sft_settings import SFTSettings

    assert SFTSettings(loss_aggregation="domain_token_mean", domain_shares={"tool": 2}).domain_shares == {"tool": 2.0}
    with pytest.raises(ValueError, match="domain_shares needs loss_aggregation: domain_token_mean"):
        SFTSettings(domain_shares={"tool": 2})
    with pytest.raises(ValueError, match="domain_shares must be positive"):
        SFTSettings(loss_aggregation="domain_token_mean", domain_shares={"tool": 0})


def test_global_tokens_and_split():
    b = pad_rows(_samples([5, 7, 4]), pad_id=0)
    parts = with_global_tokens(split_into_micro_batches(b, 2))
    assert [p["input_ids"].shape[0] for p in parts] == [2, 1]
    total = float(b["loss_mask"].sum())  # (5-2) + (7-2) + (4-2) = 10
    assert total == 10
    assert all(float(p["global_tokens"]) == total for p in parts)
    steps = build_step_batches(_samples([5, 7, 4, 6]), micro_batch_size=3, pad_id=0, pack_length=12)
    assert sum(float(m["loss_mask"].sum()) for m in steps) == float(steps[0]["global_tokens"]) == 3 + 5 + 2 + 4


def test_split_into_micro_batches_gives_scalars_to_every_part():
    b = dict(pad_rows(_samples([5, 7, 4]), pad_id=0), temperature=torch.tensor(0.7))
    parts = split_into_micro_batches(b, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 1]
    assert all(p["temperature"].dim() == 0 and float(p["temperature"]) == pytest.approx(0.7) for p in parts)


def test_logprob_fn_divides_logits_by_the_batch_temperature(tiny_lm):
    """A GRPO batch sampled at T carries `temperature`: its log-probs are log_softmax(logits / T)."""
    s = _samples([6], seed=4)[0]
    ids = torch.tensor([s.input_ids])
    with torch.no_grad():
        logits = tiny_lm(input_ids=ids).logits.double()  # (1, T, V)
        got = run_loss(tiny_lm, dict(pad_rows([s], 0), temperature=torch.tensor(0.5)), LogprobFn(3))[0][0]
    ref = torch.log_softmax(logits / 0.5, -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got[1:].double(), ref, atol=1e-5, rtol=1e-5)
    assert (got[1:] - _alone(tiny_lm, s)[1:]).abs().max() > 1e-2  # not the T=1 values


def test_token_logprobs_match_float64_reference():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.zeros(2, 5, dtype=torch.float64)
    for b in range(2):
        for t in range(1, 5):
            logits = hidden[b, t - 1].double() @ weight.double().T
            ref[b, t] = logits[ids[b, t]] - torch.logsumexp(logits, 0)
    for chunk in (0, 1, 3):
        got = compute_chunked_token_logprobs(hidden, weight, ids, chunk or None)
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from engine.model import TinySpec, load_model, materialize_tiny

    d = materialize_tiny(TinySpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64),
                         tmp_path_factory.mktemp("m") / "tiny", seed=0)
    return load_model(d).eval()


def _alone(lm, s):
    with torch.no_grad():
        return run_loss(lm, pad_rows([s], 0), LogprobFn())[0][0]  # (T,)


def test_packed_row_logprobs_equal_each_sample_alone(tiny_lm):
    """transformers detects the position restarts and keeps attention inside each sample."""
    samples = _samples([7, 5, 9, 4])
    packed = pack_rows(samples, row_length=16, pad_id=0)  # rows [9,7] and [5,4]
    with torch.no_grad():
        lp = run_loss(tiny_lm, packed, LogprobFn())[0]  # (2, 16)
    starts = {}
    for r, members in enumerate(plan_packing([len(s.input_ids) for s in samples], 16)):
        c = 0
        for i in members:
            starts[i] = (r, c)
            c += len(samples[i].input_ids)
    assert starts == {2: (0, 0), 0: (0, 9), 1: (1, 0), 3: (1, 5)}
    for i, s in enumerate(samples):
        r, c = starts[i]
        n = len(s.input_ids)
        torch.testing.assert_close(lp[r, c:c + n], _alone(tiny_lm, s), atol=1e-5, rtol=1e-5)
    # control: the same row with positions NOT restarted lets sample 0 see sample 2
    flat = dict(packed, position_ids=torch.arange(16).repeat(2, 1))
    with torch.no_grad():
        leaky = run_loss(tiny_lm, flat, LogprobFn())[0]
    assert (leaky[0, 10:16] - _alone(tiny_lm, samples[0])[1:7]).abs().max() > 1e-3


def test_padded_rows_logprobs_equal_each_sample_alone(tiny_lm):
    samples = _samples([7, 3, 5], seed=2)
    with torch.no_grad():
        lp = run_loss(tiny_lm, pad_rows(samples, 0), LogprobFn())[0]
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        torch.testing.assert_close(lp[i, :n], _alone(tiny_lm, s), atol=1e-5, rtol=1e-5)


def test_logprobs_match_hf_logits(tiny_lm):
    s = _samples([6], seed=3)[0]
    ids = torch.tensor([s.input_ids])
    with torch.no_grad():
        logits = tiny_lm(input_ids=ids).logits.double()  # (1, T, V)
    ref = torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(_alone(tiny_lm, s)[1:].double(), ref, atol=1e-5, rtol=1e-5)


def test_epoch_cursor_order_and_resume():
    c = EpochCursor(5, seed=3)
    first = c.take(3) + c.take(4)  # crosses into epoch 1 after 5
    assert sorted(first[:5]) == list(range(5)) and c.epoch == 1 and c.index == 2
    state = c.state_dict()
    rest = c.take(6)
    d = EpochCursor(5, seed=3)
    d.load_state_dict(state)
    assert d.take(6) == rest
    big = EpochCursor(20, seed=3)
    e0, e1 = big.take(20), big.take(20)
    assert e0 == EpochCursor(20, seed=3).take(20)  # seeded, reproducible
    assert e0 != e1 and sorted(e1) == list(range(20))  # a fresh permutation each epoch
    assert EpochCursor(5, seed=3, shuffle=False).take(7) == [0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(ValueError, match="seed 3"):
        EpochCursor(5, seed=9).load_state_dict(state)


@pytest.mark.parametrize("balance", [False, True])
def test_a_packed_step_has_the_padded_steps_loss(tiny_lm, balance):
    """The SFT step's loss does not depend on how its samples are laid out in rows: packed
    (best fit decreasing) and padded micro-batches give the same value, token mean or
    domain-balanced."""
    from experts.sft import SFTLoss

    samples = [Sample(s.input_ids, s.loss_mask, grp) for s, grp in
               zip(_samples([7, 5, 9, 4, 12, 3], seed=4), ["a", "b", "a", "b", "b", "c"])]
    losses = []
    for pack in (None, 16):
        mbs = build_step_batches(samples, micro_batch_size=2, pad_id=0, pack_length=pack, balance_groups=balance)
        with torch.no_grad():
            losses.append(sum(float(run_loss(tiny_lm, mb, SFTLoss())[0]) for mb in mbs))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
