"""OPD loss aggregation across teachers and samples (`distill.opd_loss.loss_divisors`, and the
per-row token weights of `sample_mean` in `OPDLoss`), against a float64 reference that
averages per-token divergences directly."""

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
    with pytest.raises(ValueError, match="unknown aggregation 'seq_mean'"):
        loss_divisors([1], [0], "seq_mean")
    with pytest.raises(ValueError, match="sample_mean needs one sample count per micro-batch"):
        loss_divisors([1, 2], [0, 0], "sample_mean", [3])
    with pytest.raises(ValueError, match="2 token counts for 1 teachers"):
        loss_divisors([1, 2], [0], "token_mean")
    assert loss_divisors([0, 0], [0, 1], "teacher_token_mean") == [2.0, 2.0]  # empty: no division by zero



@pytest.mark.parametrize("seed", range(3))
def test_sample_mean_is_the_mean_over_samples_of_each_samples_token_mean(seed, tmp_path):
    """`OPDLoss` on micro-batches carrying `row_token_weights` (1 / the row's response
    tokens) with the step's sample count as divisor: the summed micro-batch losses equal
    the float64 mean over samples of (teacher weight x that sample's mean divergence), the
    per-token divergences taken from the (separately tested) unweighted kernel; short and
    long answers in one step, as the training loop builds them (`distill.opd._micro_batch`)."""
    from distill.heads import TeacherHead, extract_head
    from distill.kl import compute_chunked_divergence
    from distill.opd_loss import OPDLoss
    from engine.batching import Sample, pad_rows
    from engine.model import TinySpec, materialize_tiny

    spec = TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    heads = [str(extract_head(materialize_tiny(spec, tmp_path / f"t{i}", seed=seed + i), tmp_path / f"h{i}.safetensors"))
             for i in range(2)]
    vocab = TeacherHead.load(heads[0], "cpu").vocab_size
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    weights = [1.0, 0.5]
    loss_fn = OPDLoss(heads, weights, "reverse_kl", 8, 0.5)
    lm_head = torch.randn(vocab, spec.hidden_size, generator=g)
    micro = []  # (teacher, rows): teacher 0 gives short answers, teacher 1 long ones
    for t in (0, 0, 1):
        rows = []
        for _ in range(rng.randint(1, 3)):
            prompt, answer = rng.randint(2, 5), rng.randint(1, 4) if t == 0 else rng.randint(15, 40)
            rows.append(Sample([rng.randrange(3, 40) for _ in range(prompt + answer)], [0] * prompt + [1] * answer))
        micro.append((t, rows))
    divisors = loss_divisors([sum(sum(r.loss_mask[1:]) for r in rows) for _, rows in micro], [t for t, _ in micro],
                             "sample_mean", [len(rows) for _, rows in micro])
    got, ref = 0.0, []
    for (t, rows), d in zip(micro, divisors):
        batch = pad_rows(rows, 0)
        mask = batch["loss_mask"][:, 1:] > 0
        hidden = torch.randn(*batch["input_ids"].shape, spec.hidden_size, generator=g)
        h_t = torch.randn(int(mask.sum()), spec.hidden_size, generator=g)
        batch.update(teacher_hidden=h_t, teacher_index=torch.tensor(t), opt_step=torch.tensor(0),
                     global_tokens=torch.tensor(d),
                     row_token_weights=torch.tensor([1.0 / sum(r.loss_mask[1:]) for r in rows]))
        loss, _ = loss_fn(hidden, lm_head, batch)
        got += float(loss)
        _, per_token = compute_chunked_divergence(hidden[:, :-1][mask], lm_head, h_t, TeacherHead.load(heads[t], "cpu"),
                                                  torch.ones(h_t.shape[0]), kind="reverse_kl", chunk_size=8)
        row_of = torch.arange(len(rows))[:, None].expand(mask.shape)[mask]
        ref += [weights[t] * per_token[row_of == i].double().mean() for i in range(len(rows))]
    assert len(ref) == sum(len(rows) for _, rows in micro)
    assert got == pytest.approx(float(torch.stack(ref).mean()), rel=1e-5)
