"""How a step's micro-batches are dealt to data-parallel ranks (pipeline/actors.py): every
rank runs as many micro-batches; a short rank's padding copies its own last micro-batch
(never another rank's teacher) and is marked so no loss is called on it."""

import pytest
import torch

from engine.trainer_common import DUMMY_KEY, padding_loss
from pipeline.actors import deal_micro_batches


def mb(teacher: int, tag: int) -> dict:
    return {"teacher_index": torch.tensor(teacher), "tag": torch.tensor(tag)}


def test_short_share_padded_with_its_own_last_micro_batch():
    # 5 micro-batches over 2 ranks: rank 0 gets t0,t1,t2 (tags 0,2,4); rank 1 gets t0,t1 (tags 1,3)
    mbs = [mb(0, 0), mb(0, 1), mb(1, 2), mb(1, 3), mb(2, 4)]
    shares = deal_micro_batches(mbs, 2)
    assert [len(s) for s in shares] == [3, 3]
    assert [int(m["tag"]) for m in shares[0]] == [0, 2, 4] and all(DUMMY_KEY not in m for m in shares[0])
    pad = shares[1][-1]
    assert DUMMY_KEY in pad and int(pad["tag"]) == 3 and int(pad["teacher_index"]) == 1  # its own teacher
    teachers = [int(m["teacher_index"]) for m in shares[1]]
    assert teachers == sorted(teachers)  # the rank's teacher order holds through the padding
    assert DUMMY_KEY not in mbs[3]  # the real micro-batch is not marked


def test_empty_share_gets_a_padding_batch_and_no_input_is_an_error():
    shares = deal_micro_batches([mb(0, 0)], 3)
    assert [len(s) for s in shares] == [1, 1, 1]
    assert DUMMY_KEY not in shares[0][0] and all(DUMMY_KEY in s[0] for s in shares[1:])
    with pytest.raises(ValueError, match="no micro-batches"):
        deal_micro_batches([], 2)


def test_padding_loss_is_zero_and_reaches_every_parameter():
    hidden = torch.randn(2, 3, 4, requires_grad=True)  # (B, T, H)
    weight = torch.randn(7, 4, requires_grad=True)  # (V, H)
    loss, metrics = padding_loss(hidden, weight, {})
    loss.backward()
    assert float(loss) == 0.0 and metrics == {}
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))
