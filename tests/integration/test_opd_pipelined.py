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


def _run(models, out, rounds, pipelined, checkpoints=None, die_at=None, score_rollouts=None, logger=None, **kw):
    _, student, teachers, heads = models
    torch.set_num_threads(1)
    tok = load_tokenizer(student)
    settings = OPDSettings(rounds=rounds, pipelined=pipelined, **{**KW, **kw})
    trainer = build_trainer(TrainerSettings(lr=settings.lr, seed=0), student)
    if die_at is not None:
        trainer = _DiesAtStep(trainer, die_at)
    refs = [TeacherRef(i, f"grpo:{d}", d, str(t), 1.0) for i, (d, t) in enumerate(zip("ab", teachers))]
    hist = run_opd(settings, trainer=trainer, generator=HFGenerator(student, tok), tokenizer=tok,
                   prompts={d: _rows(d, 40) for d in "ab"}, teachers=refs,
                   domains={d: DomainSpec(verifier="math") for d in "ab"}, out_dir=out, head_paths=heads,
                   load_teacher=lambda p: load_model(p), checkpoints=checkpoints, score_rollouts=score_rollouts,
                   logger=logger)
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

    # the synchronous default samples round 1 from round 0's result (version 1)
    sync = tmp_path / "sync"
    hist_sync, _ = _run(models, sync, rounds=2, pipelined=False)
    assert "staleness_per_round" not in hist_sync
    assert all(s["policy_version"] == 1 for s in _rollouts(sync, 1))
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


class _Log:
    def __init__(self):
        self.records = []

    def log(self, rec, step):
        if "grad_norm" in rec:  # an optimiser step's record (train_round)
            self.records.append({**rec, "step": step})


def _float64_logprobs(model_dir_or_state, student, rollouts, temperature=1.0):
    """Each rollout's response-token log-probs under the given weights, in float64."""
    lm = load_model(student).double().eval()
    if not isinstance(model_dir_or_state, (str, Path)):
        lm.load_state_dict({k: v.double() for k, v in model_dir_or_state.items()})
    out = []
    with torch.no_grad():
        for rec in rollouts:
            ids = torch.tensor([rec["input_ids"]])
            lp = torch.log_softmax(lm(input_ids=ids).logits[0, :-1] / temperature, -1).gather(1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(rec["loss_mask"][1:]) > 0
            out.append((lp[mask], torch.tensor(rec["rollout_logprobs"][1:], dtype=torch.float64)[mask]))
    return out


@pytest.mark.parametrize("pipelined", [True, False])
def test_reward_ratio_is_against_the_weights_that_sampled(models, tmp_path, pipelined):
    """The reward term's behaviour log-probs are the sampler's, kept with its policy version
    in rollouts.jsonl: they equal float64 log-probs of that version's weights. The staleness
    in optimiser steps is logged per step and per round, and equals the schedule's: with
    S steps per round (here 2 mini-batches x epochs_per_round 2 = 4), synchronous rounds'
    samples are up to S - 1 steps old, pipelined rounds' (r >= 1) up to 2S - 1. The ratio
    mean is 1 (to the generator's float error) at a synchronous round's first step."""
    from test_opd import _even_first_token

    _, student, _, _ = models
    ck, log = _Checkpoints(tmp_path / "ck"), _Log()
    out = tmp_path / "run"
    hist, _ = _run(models, out, rounds=3, pipelined=pipelined, checkpoints=ck, score_rollouts=_even_first_token,
                   logger=log, reward_weight=10.0, epochs_per_round=2)
    steps = 4
    want_per_step = [k + (steps if pipelined and r else 0) for r in range(3) for k in range(steps)]
    assert [rec["staleness_steps"] for rec in log.records] == want_per_step
    assert hist["staleness_steps_per_round"] == ([3, 7, 7] if pipelined else [3, 3, 3])
    assert hist["version_steps"] == [0, 4, 8]
    # rollouts' versions and log-probs: the initial weights (version 0) or round 0's result (1)
    versions = {0: 0, 1: 0, 2: 1} if pipelined else {0: 0, 1: 1, 2: 2}
    from safetensors.torch import load_file

    weights = {0: student, 1: load_file(str(ck.saved[0] / "model.safetensors"))}  # round 0's checkpoint: version 1
    for r in (1, 2):
        recs = _rollouts(out, r)
        assert {s["policy_version"] for s in recs} == {versions[r]}
        if versions[r] in weights:
            pairs = _float64_logprobs(weights[versions[r]], student, recs[:6])
            err = max(float((ref - got).abs().max()) for ref, got in pairs)
            assert err < 1e-4, err  # the generator's fp32 log-probs of the weights that sampled
            other = weights[1 - versions[r]]
            far = max(float((ref - got).abs().max()) for ref, got in _float64_logprobs(other, student, recs[:6]))
            assert far > 100 * max(err, 1e-6)  # and not those of the other version
    first = [rec for rec in log.records if rec["staleness_steps"] == 0]
    ratios = [rec["pg_ratio_mean"] for rec in log.records]
    print(f"\npipelined={pipelined}: ratio mean per step {[round(x, 5) for x in ratios]}")
    if not pipelined:
        assert len(first) == 3 and all(abs(rec["pg_ratio_mean"] - 1) < 1e-5 for rec in first)
        assert all(rec["pg_clip_frac_low"] == rec["pg_clip_frac_high"] == 0 for rec in first)
    assert max(abs(x - 1) for x in ratios) > 1e-3  # later steps: the policy has moved since sampling
    assert len(hist["pg_ratio_mean_per_round"]) == len(hist["pg_clip_frac_high_per_round"]) == 3
