"""Loss aggregation: hand-worked values, loop references, and the data-parallel invariance
test (as OpenRLHF tests/test_loss_aggregation.py): a mini-batch split over 2 ranks x 2
micro-batches, each piece normalised by the global denominators, sums to exactly the loss
and gradient of the whole batch, for every aggregation mode."""

import pytest
import torch

from experts.losses import AGGREGATION_MODES, aggregate_loss, compute_global_denominators, compute_policy_loss

torch.set_num_threads(1)
D = torch.float64


def test_hand_worked():
    # loss [[1,2,3],[4,x,x]], mask [[1,1,1],[1,0,0]] (x = padding, ignored even if inf)
    #   token-mean:                (1+2+3+4) / 4           = 2.5
    #   seq-mean-token-mean:       (6/3 + 4/1) / 2         = 3.0
    #   seq-mean-token-sum-norm:   (6/4 + 4/4) / 2 = 1.25 with max_len 4; local max_len 3: (2 + 4/3) / 2
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("inf"), 7.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(2.5)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=4).item() == pytest.approx(1.25)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((2 + 4 / 3) / 2)
    # global denominators of a bigger mini-batch: 10 tokens, 5 sequences
    assert aggregate_loss(loss, mask, "token-mean", global_tokens=10).item() == pytest.approx(1.0)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean", global_seqs=5).item() == pytest.approx(1.2)


def test_per_sequence_max_len_hand_worked():
    # Dr. GRPO with each sequence's own constant (mixed domains): seq0 sums 6 over max_len 4,
    # seq1 sums 4 over max_len 12 (a 3-turn tool budget): (6/4 + 4/12) / 2 = 0.916667
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("inf"), 7.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=torch.tensor([4.0, 12.0]))
    assert got.item() == pytest.approx((6 / 4 + 4 / 12) / 2)
    with pytest.raises(ValueError, match=r"per-sequence max_len must be \(B,\) = \(2,\)"):
        aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=torch.tensor([4.0, 12.0, 1.0]))
    with pytest.raises(ValueError, match="positive finite"):
        aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=torch.tensor([4.0, 0.0]))


def ref_aggregate(loss, mask, mode, max_len=None):
    """Loop reference over the whole batch."""
    per_seq, tokens = [], 0
    for b in range(mask.shape[0]):
        vals = [loss[b, t].item() for t in range(mask.shape[1]) if mask[b, t] > 0]
        tokens += len(vals)
        if vals:
            per_seq.append(vals)
    if mode == "token-mean":
        return sum(sum(v) for v in per_seq) / tokens
    if mode == "seq-mean-token-mean":
        return sum(sum(v) / len(v) for v in per_seq) / len(per_seq)
    L = max_len or max(len(v) for v in per_seq)
    return sum(sum(v) / L for v in per_seq) / len(per_seq)


def ragged_batch(B=8, T=14, seed=0):
    """Right-padded rows: a prompt of 1-3 masked-out tokens, then 1-10 response tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=D)
    for b in range(B):
        p = int(torch.randint(1, 4, (1,), generator=g))
        n = int(torch.randint(1, 11, (1,), generator=g))
        mask[b, p:p + n] = 1
    old = -3 * torch.rand(B, T, generator=g, dtype=D)
    lp = old + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    rollout = old + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)
    return dict(logprobs=lp, old_logprobs=old, ref_logprobs=ref, rollout_logprobs=rollout, advantages=adv, mask=mask)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_random_matches_loop_reference(mode):
    batch = ragged_batch(seed=1)
    loss = torch.randn(batch["mask"].shape, dtype=D, generator=torch.Generator().manual_seed(2))
    got = aggregate_loss(loss, batch["mask"], mode, max_len=12 if mode.endswith("norm") else None)
    assert got.item() == pytest.approx(ref_aggregate(loss, batch["mask"], mode, max_len=12), rel=1e-12)


def split_pieces(batch, ranks=2, micro=2):
    """Rows split over ranks, then micro-batches; each piece re-trimmed to its own last used column."""
    B = batch["mask"].shape[0]
    rows = torch.arange(B).chunk(ranks * micro)
    pieces = []
    for idx in rows:
        width = int((batch["mask"][idx] > 0).nonzero()[:, 1].max()) + 1
        pieces.append((idx, width, {k: (v[idx] if v.dim() == 1 else v[idx, :width]) for k, v in batch.items()}))
    return pieces


def whole_and_split(batch, loss_of, use_global=True):
    """Loss and d loss / d logprobs of the whole batch, and the same summed over pieces."""
    lp = batch["logprobs"].clone().requires_grad_()
    whole = loss_of({**batch, "logprobs": lp}, {})
    whole.backward()
    pieces = split_pieces(batch)
    denoms = compute_global_denominators([p[2]["mask"] for p in pieces], max_len=16)
    total, grad = 0.0, torch.zeros_like(lp)
    for idx, width, piece in pieces:
        plp = piece["logprobs"].clone().requires_grad_()
        part = loss_of({**piece, "logprobs": plp}, denoms if use_global else {})
        part.backward()  # gradients accumulate by summation, as over micro-batches and ranks
        total = total + part.item()
        grad[idx, :width] = plp.grad
    return whole.item(), lp.grad, total, grad


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_data_parallel_invariance_of_aggregate_loss(mode):
    batch = ragged_batch(seed=3)

    def loss_of(b, denoms):  # a nonlinear per-token loss of the log-probs
        per_token = (b["logprobs"] - b["old_logprobs"]).exp() * b["advantages"].unsqueeze(1)  # (B, T)
        return aggregate_loss(per_token, b["mask"], mode, **{"max_len": 16, **denoms})

    whole, g_whole, split, g_split = whole_and_split(batch, loss_of)
    assert split == pytest.approx(whole, rel=1e-12, abs=1e-14)
    assert torch.allclose(g_split, g_whole, rtol=1e-12, atol=1e-15)
    # the test can fail: with each piece's LOCAL denominators the pieces do not sum to the whole
    _, _, split_local, _ = whole_and_split(batch, loss_of, use_global=False)
    assert abs(split_local - whole) > 1e-3


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("policy_loss", ["grpo", "gspo"])
def test_data_parallel_invariance_of_full_policy_loss(mode, policy_loss):
    batch = ragged_batch(seed=4)
    kw = dict(policy_loss=policy_loss, clip_low=0.1, clip_high=0.12, kl_beta=0.1, kl_estimator="unbiased_k3",
              loss_agg=mode, offpolicy_mask_delta=0.05, tis_cap=1.2)

    def loss_of(b, denoms):
        return compute_policy_loss(**b, **kw, **{"max_len": 16, **denoms})[0]

    whole, g_whole, split, g_split = whole_and_split(batch, loss_of)
    assert split == pytest.approx(whole, rel=1e-12, abs=1e-14)
    assert torch.allclose(g_split, g_whole, rtol=1e-12, atol=1e-15)
    assert (g_whole != 0).any()


def test_global_denominators():
    # rows with 3, 1, 0 and 5 tokens: 9 tokens, 3 non-empty sequences, longest 5
    mask = torch.zeros(4, 7)
    mask[0, :3] = 1
    mask[1, 2] = 1
    mask[3, 1:6] = 1
    d = compute_global_denominators(mask)
    assert d == {"global_tokens": 9.0, "global_seqs": 3.0, "max_len": 5.0}
    assert compute_global_denominators([mask[:2, :3], mask[2:]]) == d  # pieces of any width
    assert compute_global_denominators(mask, max_len=64)["max_len"] == 64.0
    assert compute_global_denominators(torch.zeros(2, 3)) == {"global_tokens": 1.0, "global_seqs": 1.0, "max_len": 1.0}
    with pytest.raises(ValueError, match="masks"):
        compute_global_denominators([])


def test_bad_input():
    loss, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(KeyError, match="known:.*seq-mean-token-mean"):
        aggregate_loss(loss, mask, "sum")
    with pytest.raises(ValueError, match="global_seqs must be a positive"):
        aggregate_loss(loss, mask, "seq-mean-token-mean", global_seqs=0)
    with pytest.raises(ValueError, match="max_len must be a positive"):
        aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=float("nan"))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        aggregate_loss(loss, mask[:, :2], "token-mean")
    # global values may arrive as 0-dim tensors (as experts/rl_batch.py carries them)
    assert aggregate_loss(loss, mask, "token-mean", global_tokens=torch.tensor(12.0)).item() == pytest.approx(0.5)
