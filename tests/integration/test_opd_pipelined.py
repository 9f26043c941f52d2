"""Pipelined OPD rounds (`opd.pipelined: true`) on tiny random models, CPU: round r+1's
rollouts and teacher cache are made while round r trains, from the weights round r
started from (one round of staleness, recorded per sample and per round); the synchronous
default is covered, unchanged, by test_opd.py."""

import json
import sys
from pathlib import Path

import pytest
import torch

from distill.opd import DomainSpec, TeacherRef, rollout_round, route_teachers, run_opd
from distill.opd_settings import OPDSettings
from engine.generation import HFGenerator
from engine.model import load_model, load_tokenizer
from engine.prompt_stream import PromptStream
from engine.trainer import TrainerSettings, build_trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_opd import _Checkpoints, _rows, models  # noqa: E402,F401  (the fixture)

KW = dict(prompts_per_domain=8, samples_per_prompt=2, max_new_tokens=10, mini_batch_size=16, micro_batch_size=4,
          lr=3e-3, chunk_size=16, seed=0)


class _Interrupt(RuntimeError):
    pass


class _DiesAtStep:
    """A trainer that raises before optimiser step `die_at` (as if the stage were killed there)."""

    def __init__(self, trainer, die_at: int):
        self.trainer, self.die_at, self.steps = trainer, die_at, 0

    def train_step(self, micro_batches, loss_fn):
        self.steps += 1
        if self.steps == self.die_at:
            raise _Interrupt(f"killed before step {self.steps}")
        return self.trainer.train_step(micro_batches, loss_fn)

    def __getattr__(self, name):
        return getattr(self.trainer, name)


def _run(models, out, rounds, pipelined, checkpoints=None, die_at=None):
    _, student, teachers, heads = models
    torch.set_num_threads(1)
    tok = load_tokenizer(student)
    settings = OPDSettings(rounds=rounds, pipelined=pipelined, **KW)
    trainer = build_trainer(TrainerSettings(lr=settings.lr, seed=0), student)
    if die_at is not None:
        trainer = _DiesAtStep(trainer, die_at)
    refs = [TeacherRef(i, f"grpo:{d}", d, str(t), 1.0) for i, (d, t) in enumerate(zip("ab", teachers))]
    hist = run_opd(settings, trainer=trainer, generator=HFGenerator(student, tok), tokenizer=tok,
                   prompts={d: _rows(d, 40) for d in "ab"}, teachers=refs,
                   domains={d: DomainSpec(verifier="math") for d in "ab"}, out_dir=out, head_paths=heads,
                   load_teacher=lambda p: load_model(p), checkpoints=checkpoints)
    return hist, trainer


def _rollouts(out: Path, r: int) -> list[dict]:
    return [json.loads(x) for x in (out / f"round-{r}" / "rollouts.jsonl").read_text().splitlines()]


def test_pipelined_rounds_sample_from_the_previous_weights_and_record_the_staleness(models, tmp_path):
    out = tmp_path / "pipe"
    hist, _ = _run(models, out, rounds=3, pipelined=True)
    assert hist["staleness_per_round"] == [0, 1, 1]
    assert hist["policy_version_per_round"] == [[0], [0], [1]]
    for r, version in ((0, 0), (1, 0), (2, 1)):
        assert {s["policy_version"] for s in _rollouts(out, r)} == {version}
    assert len(hist["time_per_round"]) == 3
    kl = hist["kl_per_teacher"]
    for name in ("grpo:a", "grpo:b"):
        assert kl[2][name] < kl[0][name], kl  # still distilling
    assert hist["max_resident_heads"] == 1 and hist["head_loads_per_step"] == hist["teachers_per_step"]

    # round 1 was sampled from the initial weights: regenerate it from them, token for token
    _, student, _, _ = models
    tok = load_tokenizer(student)
    settings = OPDSettings(rounds=3, pipelined=True, **KW)
    streams = {d: PromptStream(_rows(d, 40), seed=settings.seed + i) for i, d in enumerate("ab")}
    for st in streams.values():
        st.take(settings.prompts_per_domain)  # round 0's prompts
    refs = [TeacherRef(i, f"grpo:{d}", d, "unused", 1.0) for i, d in enumerate("ab")]
    again = rollout_round(settings, streams, {d: DomainSpec(verifier="math") for d in "ab"}, route_teachers(refs),
                          generator=HFGenerator(student, tok), tokenizer=tok, round_idx=1)
    got = _rollouts(out, 1)
    assert [s.input_ids for s in again] == [s["input_ids"] for s in got]
    assert [s.sample_id for s in again] == [s["sample_id"] for s in got]

    # the synchronous default records no versions and samples round 1 from round 0's result
    sync = tmp_path / "sync"
    hist_sync, _ = _run(models, sync, rounds=2, pipelined=False)
    assert "staleness_per_round" not in hist_sync
    assert all("policy_version" not in s for s in _rollouts(sync, 1))
    assert [s["input_ids"] for s in _rollouts(sync, 0)] == [s["input_ids"] for s in _rollouts(out, 0)]
    assert [s["input_ids"] for s in _rollouts(sync, 1)] != [s["input_ids"] for s in got]


def test_pipelined_stage_interrupted_mid_round_resumes_to_the_same_student(models, tmp_path):
    _, full = _run(models, tmp_path / "full", rounds=3, pipelined=True)
    ck = _Checkpoints(tmp_path / "ck")
    out = tmp_path / "part"
    steps_per_round = 2  # 2 domains x 8 prompts x 2 samples / mini-batch 16
    with pytest.raises(_Interrupt):  # inside round 2's training, round 1's checkpoint the newest
        _run(models, out, rounds=3, pipelined=True, checkpoints=ck, die_at=2 * steps_per_round + 2)
    assert len(ck.saved) == 2 and (out / "round-2" / "rollouts.jsonl").is_file()
    hist, resumed = _run(models, out, rounds=3, pipelined=True, checkpoints=ck)
    assert hist["staleness_per_round"] == [0, 1, 1]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_preparing_thread_takes_its_own_share_of_torch_threads():
    """Pipelined rounds split torch's intra-op threads between the training thread and the
    preparing one (a per-thread setting under OpenMP): the background thread sees its own
    count and the caller's is untouched."""
    import torch

    from distill.opd import _Background

    before = torch.get_num_threads()
    assert _Background(torch.get_num_threads, threads=1).result() == 1
    assert torch.get_num_threads() == before
