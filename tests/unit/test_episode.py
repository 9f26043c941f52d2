"""engine.episode: the one rollout path of GRPO, mixed RL, OPD and eval, and the sample
record from rollout to loss (OPD's rollouts.jsonl lines included)."""

from __future__ import annotations

import random

import pytest

from engine.chat import render_row_prompt, tool_call_end_id
from engine.domain_spec import DomainSpec
from engine.episode import OPD_RECORD_KEYS, RolloutSample, roll_out, score_samples, verified_scores
from engine.generation import Completion, SamplingParams, row_seed
from engine.rollout import rollout
from engine.rollout_wal import RolloutWAL
from engine.tokenizer import build_tiny_tokenizer
from rewards import RewardResult
from rewards.failures import VERIFIER_ERROR

TOK = build_tiny_tokenizer()
ROWS = [{"id": f"r{i}", "domain": "math", "mode": "think-high" if i else None, "reference": {"answer": str(i)},
         "messages": [{"role": "user", "content": f"{i}+{i}"}]} for i in range(3)]


class _Gen:
    """Seeded per row; records the sampling params of every call. A turn calls the tool
    (ends at `</tool_call>`) when the context is short, else ends the turn at EOS."""

    def __init__(self):
        self.calls: list[SamplingParams] = []

    def generate(self, prompts, sampling):
        self.calls.append(sampling)
        stop = list(sampling.stop_token_ids)
        out = []
        for i, p in enumerate(prompts):
            for j in range(sampling.n):
                rng = random.Random(row_seed(sampling.seed or 0, i, j) ^ len(p))
                toks = [rng.randrange(40, 60) for _ in range(3)]
                toks += [stop[0]] if stop and len(p) < 60 else [TOK.eos_token_id]
                out.append(Completion(toks, [-rng.random() for _ in toks], "stop"))
        return out


class _Env:
    def execute(self, call_text: str) -> str:
        return "42"


def test_single_turn_samples_are_the_rows_rollouts_in_order():
    gen = _Gen()
    got = roll_out(ROWS, "math", DomainSpec("math"), generator=gen, tokenizer=TOK, n=2, temperature=0.7, top_p=0.9,
                   max_new_tokens=8, max_turns=3, seed=5)
    assert gen.calls == [SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=8, stop_token_ids=[],
                                        seed=5)]  # no environment: no stop at </tool_call>, one turn
    prompts = [render_row_prompt(r, TOK) for r in ROWS]
    trajs = rollout(_Gen(), prompts, gen.calls[0], tokenizer=TOK, max_turns=3)
    assert len(got) == 6
    for k, (s, t) in enumerate(zip(got, trajs)):
        row, p = ROWS[k // 2], len(prompts[k // 2])
        assert s.input_ids == prompts[k // 2] + t.response_ids
        assert s.loss_mask == [0] * p + t.response_mask and s.num_model_tokens == sum(t.response_mask)
        assert s.rollout_logprobs == [0.0] * p + t.rollout_logprobs
        assert (s.text, s.finish_reason, s.reference, s.row_id, s.mode) == (
            t.text, t.finish_reason, row["reference"], row["id"], row["mode"])
        assert (s.route, s.domain, s.max_response_tokens, s.reward, s.sample_id) == ("math", "math", None, 0.0, "")


def test_a_tool_route_stops_at_tool_calls_and_runs_multi_turn_within_its_budget():
    gen = _Gen()
    got = roll_out(ROWS[:1], "tool@think-high", DomainSpec("tool", environment=_Env()), generator=gen, tokenizer=TOK, n=1,
                   temperature=1.0, max_new_tokens=8, max_turns=3, seed=1, max_response_tokens=200)
    assert list(gen.calls[0].stop_token_ids) == [tool_call_end_id(TOK)]
    assert len(gen.calls) > 1  # the tool result was answered in a second turn
    s = got[0]
    assert 0 in s.loss_mask[len(render_row_prompt(ROWS[0], TOK)):]  # the tool's tokens are not trained
    assert (s.route, s.domain, s.max_response_tokens) == ("tool@think-high", "tool", 200)


def test_a_logged_batch_is_replayed_and_a_log_needs_a_key(tmp_path):
    kw = dict(tokenizer=TOK, n=2, temperature=1.0, max_new_tokens=8, max_turns=1, seed=2)
    wal = RolloutWAL(tmp_path / "r.wal")
    first = roll_out(ROWS, "math", DomainSpec("math"), generator=_Gen(), wal=wal, wal_key="k", **kw)
    gen = _Gen()
    again = roll_out(ROWS, "math", DomainSpec("math"), generator=gen, wal=wal, wal_key="k", **kw)
    assert again == first and gen.calls == []
    with pytest.raises(ValueError, match="wal_key"):
        roll_out(ROWS, "math", DomainSpec("math"), generator=_Gen(), wal=wal, **kw)


def _sample(**kw) -> RolloutSample:
    base = dict(input_ids=[1, 2, 3], loss_mask=[0, 1, 1], rollout_logprobs=[0.0, -0.5, -0.25], finish_reason="stop",
                text="x", reference={"answer": "1"}, route="math@think-high", row_id="r1", mode="think-high",
                sample_id="r0-math@think-high-0", teacher_index=2)
    return RolloutSample(**{**base, **kw})


def test_opd_records_keep_their_keys_and_round_trip():
    s = _sample()
    rec = s.to_opd_record()
    assert tuple(rec) == OPD_RECORD_KEYS and rec["domain"] == "math@think-high"  # the route, as always written
    assert RolloutSample.from_opd_record(rec) == s
    pipelined = _sample(policy_version=3)
    assert list(pipelined.to_opd_record())[-1] == "policy_version"
    assert RolloutSample.from_opd_record(pipelined.to_opd_record()) == pipelined
    plain = _sample(route="code", mode=None)
    assert RolloutSample.from_opd_record(plain.to_opd_record()) == plain


def test_a_foreign_opd_record_is_refused_naming_the_line():
    rec = _sample().to_opd_record()
    with pytest.raises(ValueError, match=r"f.jsonl:7.*missing keys \['text'\]"):
        RolloutSample.from_opd_record({k: v for k, v in rec.items() if k != "text"}, "f.jsonl:7")
    with pytest.raises(ValueError, match=r"unknown keys \['prompt_len'\]"):
        RolloutSample.from_opd_record({**rec, "prompt_len": 1})
    with pytest.raises(ValueError, match="must match input_ids"):
        RolloutSample.from_opd_record({**rec, "loss_mask": [0, 1]})


class _Pool:
    def __init__(self, results):
        self.results, self.seen = results, []

    def score(self, verifier, texts, refs):
        self.seen.append((verifier, texts, refs))
        return self.results


def test_scores_come_from_the_routes_verifier_and_a_batch_of_verifier_errors_raises():
    samples = [_sample(text=f"t{i}", reference={"answer": str(i)}) for i in range(2)]
    pool = _Pool([RewardResult(1.0), RewardResult(0.5)])
    assert score_samples(pool, DomainSpec("math"), samples, "here") == [1.0, 0.5]
    assert pool.seen == [("math", ["t0", "t1"], [{"answer": "0"}, {"answer": "1"}])]
    broken = [RewardResult(0.0, {"reason": f"{VERIFIER_ERROR}: no interpreter"})] * 8
    with pytest.raises(RuntimeError, match="GRPO step 3.*'code' verifier raised on all 8"):
        verified_scores(_Pool(broken), "code", ["x"] * 8, [{}] * 8, "GRPO step 3")


def test_verifier_errors_below_the_pools_rate_are_the_rows_zeros_and_marked_on_the_samples():
    mixed = [RewardResult(0.0, {"reason": f"{VERIFIER_ERROR}: OverflowError"})] * 3 + [RewardResult(1.0)] * 5
    samples = [_sample(text=f"t{i}", reference={"answer": str(i)}) for i in range(8)]
    assert score_samples(_Pool(mixed), DomainSpec("tool"), samples, "here") == [0.0] * 3 + [1.0] * 5
    assert [s.scoring_failure is not None for s in samples] == [True] * 3 + [False] * 5
    strict = _Pool(mixed)
    strict.max_error_rate = 0.25  # what ScorerPool(max_error_rate=...) carries from the config
    with pytest.raises(RuntimeError, match="raised on 3 of 8 items"):
        verified_scores(strict, "tool", ["x"] * 8, [{}] * 8, "GRPO step 1")


def test_grpo_step_metrics_count_verifier_errors(monkeypatch):
    from experts import grpo
    from experts.grpo_settings import GRPOSettings

    def fake_round(settings, stream, domains, need, **_):
        failures = [f"{VERIFIER_ERROR}: OverflowError", "timeout: item took longer than 8s", None, None]
        return [[_sample(route="tool", reward=float(i % 2), scoring_failure=f) for i, f in enumerate(failures)]]

    monkeypatch.setattr(grpo, "_sample_round", fake_round)
    settings = GRPOSettings(prompts_per_step=1, group_size=4, dynamic_sampling=False)
    _, stats = grpo.collect_step(settings, None, {}, generator=None, scorer=None, tokenizer=None, step=0)
    assert stats["verifier_errors"] == 1 and stats["scoring_failures"] == 2
