"""The rollout write-ahead log: records survive a torn tail, damage elsewhere is refused,
logged batches are replayed exactly and only missing ones generated, and the per-step logs
of GRPO are pruned at checkpoints with their counts carried."""

from __future__ import annotations

import random

import pytest

from engine.generation import Completion, SamplingParams, row_seed
from engine.rollout_wal import (RolloutWAL, StepLogs, WALError, in_flight, logged_rollout, read_wal,
                                wal_counts)


class _Tok:
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 0))


class _Gen:
    """Seeded per row like the HF generator; counts its calls."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompt_ids, sampling):
        self.calls += 1
        out = []
        for i, p in enumerate(prompt_ids):
            for j in range(sampling.n):
                rng = random.Random(row_seed(sampling.seed, i, j) ^ sum(p))
                toks = [rng.randrange(1, 50) for _ in range(rng.randrange(1, sampling.max_new_tokens))] + [0]
                out.append(Completion(toks, [-rng.random() / 3 for _ in toks], "stop"))
        return out


PROMPTS = [[5, 6, 7], [8, 9], [1, 2, 3, 4]]


def _sp(seed=3):
    return SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=seed)


def test_logged_batches_are_replayed_exactly_and_only_missing_ones_generated(tmp_path):
    gen, tok = _Gen(), _Tok()
    wal = RolloutWAL(tmp_path / "r.wal")
    first = [logged_rollout(wal, f"k{s}", gen, PROMPTS, _sp(s), tokenizer=tok) for s in range(3)]
    assert gen.calls == 3
    wal.begin("k3")  # a batch in flight when the stage is killed
    wal.close()
    assert in_flight(tmp_path / "r.wal") == ["k3"]

    gen2, wal2 = _Gen(), RolloutWAL(tmp_path / "r.wal")
    again = [logged_rollout(wal2, f"k{s}", gen2, PROMPTS, _sp(s), tokenizer=tok) for s in range(4)]
    assert gen2.calls == 1  # only k3
    assert again[:3] == first  # bit-exact replay (float log-probs round-trip through JSON)
    assert again[3] == logged_rollout(None, "x", _Gen(), PROMPTS, _sp(3), tokenizer=tok)
    assert wal2.counts() == {"generated": 5, "regenerated": 1, "completed": 4, "replayed": 3}
    # different inputs under the same key are not replayed
    other = logged_rollout(wal2, "k0", gen2, PROMPTS[:2], _sp(0), tokenizer=tok)
    assert gen2.calls == 2 and len(other) == 4


def test_torn_last_record_is_cut_and_damage_before_it_refused(tmp_path):
    path = tmp_path / "r.wal"
    wal = RolloutWAL(path)
    logged_rollout(wal, "a", _Gen(), PROMPTS, _sp(1), tokenizer=_Tok())
    logged_rollout(wal, "b", _Gen(), PROMPTS, _sp(2), tokenizer=_Tok())
    wal.close()
    data = path.read_bytes()
    path.write_bytes(data[:-25])  # the kill cut the last record
    records, valid = read_wal(path)
    assert [r["k"] for r in records] == ["a", "a", "b"] and valid < len(data) - 25
    wal = RolloutWAL(path)  # cuts the torn tail off, then appends after it
    assert path.stat().st_size == valid
    gen = _Gen()
    logged_rollout(wal, "a", gen, PROMPTS, _sp(1), tokenizer=_Tok())
    logged_rollout(wal, "b", gen, PROMPTS, _sp(2), tokenizer=_Tok())
    wal.close()
    assert gen.calls == 1 and wal_counts(read_wal(path)[0])["regenerated"] == 1

    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"k":"a"', b'"k":"z"')  # a flipped byte in the middle of the log
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(WALError, match=r"corrupt rollout log .*r\.wal: record 2"):
        RolloutWAL(path)


def test_step_logs_prune_at_checkpoints_and_carry_their_counts(tmp_path):
    logs = StepLogs(tmp_path / "w", carried=None, start_step=0)
    gen = _Gen()
    for step in range(3):
        wal = logs.open(step)
        logged_rollout(wal, "d", gen, PROMPTS, _sp(step), tokenizer=_Tok())
        logs.closed(wal)
    carried = logs.carry(2)
    assert carried["generated"] == 2 and carried["completed"] == 2
    logs.checkpointed(2, carried)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["step-000002.wal"]
    assert logs.counts()["generated"] == 3
    # a resumed stage from the step-2 checkpoint: the carried counts plus the live log
    resumed = StepLogs(tmp_path / "w", carried=carried, start_step=2)
    wal = resumed.open(2)
    logged_rollout(wal, "d", gen, PROMPTS, _sp(2), tokenizer=_Tok())
    resumed.closed(wal)
    assert gen.calls == 3 and resumed.counts() == {"generated": 3, "regenerated": 0, "completed": 3, "replayed": 1}
