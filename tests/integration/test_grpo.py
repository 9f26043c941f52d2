"""The GRPO driver on a tiny random model: single-turn math, multi-turn tool, resume."""

import json

import pytest
import torch

from engine.checkpoint import CheckpointManager
from engine.domains import get_domain
from engine.generation import HFGenerator
from engine.model import TinySpec, load_tokenizer, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer
from experts.advantages import compute_advantages
from experts.grpo import DomainSpec, run_grpo, with_advantages
from experts.grpo_settings import GRPOSettings
from rewards import ScorerPool

SPEC = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return materialize_tiny(SPEC, tmp_path_factory.mktemp("grpo") / "base", seed=0)


@pytest.fixture(scope="module")
def scorer():
    with ScorerPool(num_workers=1) as pool:
        yield pool


def _trained_samples(s, groups):
    """A step's samples with their advantages, as `run_grpo` makes them."""
    advantages = compute_advantages([[x.reward for x in g] for g in groups], s.advantage)
    return with_advantages(groups, advantages, drop_truncated=s.overlong_filter)


def _no_comma_rows(n):
    """IFEval rows a random model satisfies about 80% of the time: rewards vary in a group."""
    return [{"id": f"nc-{i}", "domain": "nocomma", "messages": [{"role": "user", "content": f"say {i}"}],
             "reference": {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}} for i in range(n)]


def _run(base, out, scorer, domain, steps, checkpoints=None, logger=None, **kw):
    torch.set_num_threads(1)
    tok = load_tokenizer(base)
    s = GRPOSettings(steps=steps, prompts_per_step=4, group_size=4, max_new_tokens=24, micro_batch_size=8,
                     mini_batches_per_step=2, lr=1e-3, save_every=2, seed=0, **kw)
    if domain == "nocomma":
        rows, spec = _no_comma_rows(32), DomainSpec("ifeval", None)
    else:
        dom = get_domain(domain)
        rows, spec = dom.generate("train", 32, seed=0), DomainSpec(dom.verifier, dom.environment())
    trainer = build_trainer(TrainerSettings(lr=s.lr, seed=0), base)
    gen = HFGenerator(base, tok)
    final = run_grpo(s, trainer=trainer, generator=gen, scorer=scorer, tokenizer=tok, train_rows=rows,
                     domains={domain: spec}, out_dir=out, checkpoints=checkpoints, logger=logger)
    return final, trainer


def test_grpo_steps_report_metrics_and_change_the_weights(base, tmp_path, scorer):
    before = build_trainer(TrainerSettings(), base).state_dict()
    final, trainer = _run(base, tmp_path, scorer, "nocomma", steps=2, kl_beta=0.0)
    assert final["step"] == 2
    for key in ("reward_mean", "reward/nocomma", "train/loss", "train/grad_norm", "time/generate_score"):
        assert key in final, key
    assert final["reward_std"] > 0
    after = trainer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_samples_log_keeps_n_completions_per_step_and_changes_nothing(base, tmp_path, scorer):
    """samples.jsonl: 3 of each step's 16 completions with prompt, completion, reward and
    route; the run with the log trains exactly the weights of the run without it."""
    from engine.metrics import MetricsLogger

    log = MetricsLogger(tmp_path / "logged", wandb_mode="disabled", progress=False, samples_per_step=3)
    _, logged = _run(base, tmp_path / "logged", scorer, "nocomma", steps=2, logger=log)
    log.close()
    _, plain = _run(base, tmp_path / "plain", scorer, "nocomma", steps=2)
    a, b = logged.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "logged" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    for r in rows:
        assert {"prompt", "completion", "reward", "route", "row_id", "finish_reason"} <= set(r)
        assert r["route"] == "nocomma" and r["row_id"].startswith("nc-") and 0.0 <= r["reward"] <= 1.0
        assert f"say {r['row_id'][3:]}" in r["prompt"]  # the rendered prompt of its own row
    assert not (tmp_path / "plain" / "samples.jsonl").exists()


def test_tool_domain_runs_multi_turn_episodes(base, tmp_path, scorer):
    final, _ = _run(base, tmp_path, scorer, "tool", steps=1, max_turns=2)
    assert final["step"] == 1 and "reward/tool" in final


def test_resume_matches_an_uninterrupted_run(base, tmp_path, scorer):
    _, full = _run(base, tmp_path / "full", scorer, "nocomma", steps=4)
    ck = CheckpointManager(tmp_path / "part" / "checkpoints", keep_last=2)
    _run(base, tmp_path / "part", scorer, "nocomma", steps=2, checkpoints=ck)  # stopped after step 2
    _, resumed = _run(base, tmp_path / "part", scorer, "nocomma", steps=4, checkpoints=ck)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c) for k, c in build_trainer(TrainerSettings(), base).state_dict().items())
    extra = json.loads((ck.latest() / "extra_state.json").read_text())
    assert extra["step"] == 4


def test_trainer_log_probs_at_the_sampling_temperature_equal_the_generator_s(base, scorer):
    """Sampled at T=0.6: the old log-probs the trainer computes (logits / T, as in verl) equal
    the generator's own per-token log-probs, so the PPO ratio starts at exactly 1."""
    from engine.prompt_stream import PromptStream
    from experts.grpo import collect_step, logprob_temperature
    from experts.rl_batch import build_minibatches

    torch.set_num_threads(1)
    tok = load_tokenizer(base)
    s = GRPOSettings(prompts_per_step=4, group_size=4, max_new_tokens=16, temperature=0.6)
    gen = HFGenerator(base, tok)
    groups, _ = collect_step(s, PromptStream(_no_comma_rows(8), seed=0), {"nocomma": DomainSpec("ifeval")},
                             generator=gen, scorer=scorer, tokenizer=tok, step=0)
    trainer = build_trainer(TrainerSettings(seed=0), base)
    for t, close in ((logprob_temperature(s.temperature), True), (1.0, False)):
        (mb,), = build_minibatches(_trained_samples(s, groups), 1, 64, pad_id=tok.pad_token_id, seed=0,
                                   temperature=t)
        m = mb["loss_mask"] > 0
        gap = (trainer.forward_logprobs(mb) - mb["rollout_logprobs"])[m].abs().max()
        assert (gap < 1e-4) if close else (gap > 1e-2), (t, float(gap))


# ------------------------------------------------------------------ the driver's RL wiring, end to end
class _FakeScorer:
    """Deterministic rewards, so the driver's choices (drop, refill, filter) are checkable:
    1 for a row whose reference says `const`, else the parity of the completion's length."""

    def score(self, name, completions, refs):
        from rewards import RewardResult

        return [RewardResult(1.0 if r.get("const") else float(len(c) % 2)) for c, r in zip(completions, refs)]


class _Spy:
    """The real trainer; records the micro-batches of every optimiser step."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def train_step(self, micro_batches, loss_fn):
        self.steps.append([{k: v.clone() for k, v in mb.items()} for mb in micro_batches])
        return self.inner.train_step(micro_batches, loss_fn)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Log:
    def __init__(self, trainer=None):
        self.records, self.states, self.trainer = [], [], trainer

    def log(self, metrics, step):
        self.records.append(dict(metrics))
        if self.trainer is not None:
            self.states.append(self.trainer.state_dict())


def _rows(n, const_every=0):
    rows = _no_comma_rows(n)
    for i, r in enumerate(rows):
        if const_every and i % const_every == 0:
            r["reference"] = {**r["reference"], "const": True}
            r["messages"] = [{"role": "user", "content": f"const {i}"}]
    return rows


def _drive(base, out, *, steps, scorer, rows=None, domain="nocomma", spec=None, generator=None, reference=None,
           logger=None, trainer=None, **kw):
    torch.set_num_threads(1)
    tok = load_tokenizer(base)
    s = GRPOSettings(**{**dict(steps=steps, prompts_per_step=4, group_size=4, max_new_tokens=16,
                               micro_batch_size=64, lr=1e-3, save_every=100, seed=0), **kw})
    trainer = trainer or _Spy(build_trainer(TrainerSettings(lr=s.lr, seed=0), base))
    if logger is not None and logger.trainer is True:
        logger.trainer = trainer
    final = run_grpo(s, trainer=trainer, generator=generator or HFGenerator(base, tok), scorer=scorer, tokenizer=tok,
                     train_rows=rows if rows is not None else _rows(32), domains={domain: spec or DomainSpec("ifeval")},
                     out_dir=out, reference=reference, logger=logger)
    return final, trainer, tok


def test_sampler_and_trainer_log_probs_agree_under_top_p(base, scorer):
    """top_p = 0.9 (and T = 0.7): the generator samples from the truncated, renormalised
    distribution and reports its log-probs; the trainer, given the batch's top_p, computes
    the same quantity (engine.logprobs), to 1e-5 on every sampled token. Without the
    truncation (the old trainer) they differ by about -log(0.9) per token."""
    from engine.prompt_stream import PromptStream
    from experts.grpo import collect_step, logprob_sampling
    from experts.rl_batch import build_minibatches

    torch.set_num_threads(1)
    tok = load_tokenizer(base)
    s = GRPOSettings(prompts_per_step=4, group_size=4, max_new_tokens=16, temperature=0.7, top_p=0.9)
    groups, _ = collect_step(s, PromptStream(_no_comma_rows(8), seed=0), {"nocomma": DomainSpec("ifeval")},
                             generator=HFGenerator(base, tok), scorer=scorer, tokenizer=tok, step=0)
    trainer = build_trainer(TrainerSettings(seed=0), base)
    samples = _trained_samples(s, groups)
    (mb,), = build_minibatches(samples, 1, 64, pad_id=tok.pad_token_id, seed=0, **logprob_sampling(s))
    assert float(mb["top_p"]) == 0.9
    m = mb["loss_mask"] > 0
    gap = (trainer.forward_logprobs(mb) - mb["rollout_logprobs"])[m].abs()
    assert gap.max() < 1e-5, float(gap.max())
    (plain,), = build_minibatches(samples, 1, 64, pad_id=tok.pad_token_id, seed=0, temperature=0.7)
    assert (trainer.forward_logprobs(plain) - plain["rollout_logprobs"])[m].abs().max() > 1e-2


@pytest.mark.parametrize("perturbed", [True, False])
def test_offpolicy_masking_uses_the_sampler_s_log_probs(base, tmp_path, perturbed):
    """The generator's weights differ from the trainer's (as after a stale sync or a
    different inference kernel): exactly the sequences with negative advantage whose mean
    log(pi_rollout / pi_theta) exceeds delta are masked, through the driver's own loss.
    With identical policies none are."""
    from engine.prompt_stream import PromptStream
    from experts.grpo import GRPOLoss, collect_step, logprob_sampling
    from experts.rl_batch import build_minibatches

    torch.set_num_threads(1)
    tok = load_tokenizer(base)
    gen = HFGenerator(base, tok)
    if perturbed:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in gen.model.parameters():
                # a random tiny model is near-uniform: a large perturbation gives drifts of ~0.1 nat
                p.add_(3.0 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=g))
    s = GRPOSettings(prompts_per_step=8, group_size=4, max_new_tokens=16, offpolicy_mask_delta=0.1)
    groups, _ = collect_step(s, PromptStream(_rows(16), seed=0), {"nocomma": DomainSpec("ifeval")},
                             generator=gen, scorer=_FakeScorer(), tokenizer=tok, step=0)
    trainer = build_trainer(TrainerSettings(seed=0), base)
    (mb,), = build_minibatches(_trained_samples(s, groups), 1, 64, pad_id=tok.pad_token_id, seed=0,
                               **logprob_sampling(s))
    m = mb["loss_mask"]
    drift = ((mb["rollout_logprobs"] - trainer.forward_logprobs(mb)) * m).sum(1) / m.sum(1)  # (B,)
    expect = (mb["advantages"] < 0) & (drift > s.offpolicy_mask_delta)
    metrics = trainer.train_step([mb], GRPOLoss(s))
    assert metrics["offpolicy_masked_seqs"] == int(expect.sum())
    assert metrics["offpolicy_masked_frac"] == pytest.approx(int(expect.sum()) / len(drift))
    if perturbed:
        assert expect.sum() > 0 and ((mb["advantages"] > 0) & (drift > s.offpolicy_mask_delta)).any()
    else:
        assert drift.abs().max() < 1e-5 and metrics["offpolicy_masked_seqs"] == 0


def test_driver_reports_the_offpolicy_mask_rate(base, tmp_path):
    final, _, _ = _drive(base, tmp_path, steps=1, scorer=_FakeScorer(), offpolicy_mask_delta=0.05)
    assert final["train/offpolicy_masked_frac"] == 0.0  # generator synced with the trainer: no drift


def test_reference_kl_moves_and_has_a_gradient(base, tmp_path):
    """kl_beta > 0 with a reference model through run_grpo: the KL metric is 0 at step 1
    (policy == reference, and so is its gradient: the weights after step 1 equal a beta=0
    run's) and positive at step 2, where the weights part from the beta=0 run's: the KL
    term's gradient is nonzero."""
    runs = {}
    for beta in (0.0, 1.0):
        ref = build_trainer(TrainerSettings(seed=0), base) if beta else None
        log = _Log(trainer=True)
        _drive(base, tmp_path / str(beta), steps=2, scorer=_FakeScorer(), reference=ref, logger=log, kl_beta=beta)
        runs[beta] = log
    kl = [r["train/kl"] for r in runs[1.0].records]
    assert kl[0] == pytest.approx(0.0, abs=1e-9) and kl[1] > 1e-6, kl
    (a1, a2), (b1, b2) = runs[0.0].states, runs[1.0].states
    assert all(torch.allclose(a1[k], b1[k], atol=1e-7) for k in a1)
    assert max(float((a2[k] - b2[k]).abs().max()) for k in a2) > 1e-6


def test_dynamic_sampling_drops_all_equal_groups_and_refills(base, tmp_path, monkeypatch):
    """Every second prompt scores 1 for all its samples: its groups are dropped, more prompts
    are sampled to refill the step, the drop is counted, and no dropped prompt is trained on.
    Without dynamic sampling the same prompts do reach the trainer. The random base model
    writes stray `<think>` tokens, which answer-only scoring (engine.reasoning, tested in
    tests/unit/test_reasoning_answer.py) would score 0 before the scorer sees them: here the
    whole completion is the answer, so the fake scorer alone sets the rewards."""
    import engine.reasoning

    monkeypatch.setattr(engine.reasoning, "split_reasoning",
                        lambda text, opened=False, markers=None: engine.reasoning.Split("", text, False))
    log = _Log()
    final, spy, tok = _drive(base, tmp_path / "on", steps=2, scorer=_FakeScorer(), rows=_rows(32, const_every=2),
                             logger=log, dynamic_sampling=True, max_sampling_rounds=4)
    for rec in log.records:
        assert rec["groups_dropped"] >= 1 and rec["sampling_rounds"] >= 2 and 1 <= rec["groups_kept"] <= 4, rec
        assert rec["groups_sampled"] == rec["groups_kept"] + rec["groups_dropped"]
    assert any(rec["groups_kept"] == 4 for rec in log.records)  # refilled to a full step
    trained = [tok.decode(row) for step in spy.steps for mb in step for row in mb["input_ids"].tolist()]
    assert len(trained) == 4 * sum(rec["groups_kept"] for rec in log.records)
    assert not any("const" in t for t in trained)
    # Dr. GRPO's constant of a single-turn domain is its own max_new_tokens (16), not x max_turns
    assert all(mb["max_len"].tolist() == [16.0] * len(mb["input_ids"]) for step in spy.steps for mb in step)
    _, spy_off, _ = _drive(base, tmp_path / "off", steps=1, scorer=_FakeScorer(), rows=_rows(32, const_every=2))
    assert any("const" in tok.decode(row) for mb in spy_off.steps[0] for row in mb["input_ids"].tolist())


def test_overlong_filtering_trains_only_on_finished_samples_and_skips_an_all_truncated_step(base, tmp_path):
    final, spy, tok = _drive(base, tmp_path / "mixed", steps=1, scorer=_FakeScorer(), max_new_tokens=12,
                             prompts_per_step=8, overlong_filter=True)
    assert 0 < final["truncated_frac"] < 1
    rows = [(mb["input_ids"][i], mb["loss_mask"][i]) for mb in spy.steps[0] for i in range(len(mb["input_ids"]))]
    assert len(rows) == final["samples_trained"] == round((1 - final["truncated_frac"]) * 32)
    for ids, mask in rows:  # each trained response ends with EOS: none was cut at max_new_tokens
        last = int(mask.nonzero().max())
        assert int(ids[last]) == tok.eos_token_id
    # every sample truncated: no fallback to training on them, the step is skipped and counted
    before = build_trainer(TrainerSettings(), base).state_dict()
    final, spy, _ = _drive(base, tmp_path / "all", steps=2, scorer=_FakeScorer(), max_new_tokens=2,
                           overlong_filter=True)
    assert final["truncated_frac"] == 1.0 and final["step_skipped"] == 1 and final["steps_skipped"] == 2
    assert spy.steps == [] and "train/loss" not in final
    after = spy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _ScriptedToolCalls:
    """The real generator, except that a turn whose context holds no tool result yet is a
    fixed tool call (a random model never makes one); records every context it is given."""

    def __init__(self, inner, call_ids, result_open_id):
        self.inner, self.call_ids, self.result_open_id, self.contexts = inner, call_ids, result_open_id, []

    def generate(self, prompt_ids, sampling):
        from engine.generation import Completion

        self.contexts.append([list(p) for p in prompt_ids])
        out = self.inner.generate(prompt_ids, sampling)
        call = Completion(list(self.call_ids), [-1.0] * len(self.call_ids), "stop")
        return [c if self.result_open_id in prompt_ids[i // sampling.n] else call for i, c in enumerate(out)]

    def load_weights(self, state):
        self.inner.load_weights(state)


def test_multi_turn_tool_episodes_mask_tool_results_and_continue_the_context(base, tmp_path):
    from engine.chat import encode, tool_result_ids

    torch.set_num_threads(1)
    tok = load_tokenizer(base)
    dom = get_domain("tool")
    rows = dom.generate("train", 16, seed=0)
    call_text = rows[0]["messages"][1]["content"]  # a well-formed call of the tool domain
    call_ids = encode(tok, call_text)
    assert call_ids[-1] == tok.convert_tokens_to_ids("</tool_call>")
    gen = _ScriptedToolCalls(HFGenerator(base, tok), call_ids, tok.convert_tokens_to_ids("<tool_response>"))
    env = dom.environment()
    assert len(call_ids) < 96  # the call fits in one turn
    final, spy, _ = _drive(base, tmp_path, steps=1, scorer=_FakeScorer(), rows=rows, domain="tool",
                           spec=DomainSpec(dom.verifier, env), generator=gen, max_turns=2, max_new_tokens=96)
    result_ids = tool_result_ids(tok, env.execute(call_text))
    assert "error" not in tok.decode(result_ids)  # the tool answered the call
    # turn 2 sees the prompt, the model's call and the tool's result, in that order
    first, second = gen.contexts[0], gen.contexts[1]
    assert len(second) == len(first) * 4
    for k, ctx in enumerate(second):
        assert ctx == first[k // 4] + call_ids + result_ids
    # in training: loss on the model's call and its second turn, none on the tool's tokens
    checked = 0
    for mb in spy.steps[0]:
        for ids, mask in zip(mb["input_ids"].tolist(), mb["loss_mask"].tolist()):
            start = next(i for i in range(len(ids)) if ids[i:i + len(call_ids)] == call_ids)
            end_call, end_result = start + len(call_ids), start + len(call_ids) + len(result_ids)
            assert ids[end_call:end_result] == result_ids
            assert all(mask[start:end_call]) and not any(mask[end_call:end_result]) and not any(mask[:start])
            assert mask[end_result] == 1  # the second turn is trained
            checked += 1
    assert checked == 16 and final["train/grad_norm"] > 0
    # Dr. GRPO's constant of a tool episode: what it can hold, max_new_tokens x max_turns
    assert all(v == 96.0 * 2 for mb in spy.steps[0] for v in mb["max_len"].tolist())
