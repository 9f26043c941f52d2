"""The GRPO driver on a tiny random model: single-turn math, multi-turn tool, resume."""

import json

import pytest
import torch

from engine.checkpoint import CheckpointManager
from engine.domains import get_domain
from engine.generation import HFGenerator
from engine.model import TinySpec, load_tokenizer, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer
from experts.grpo import DomainSpec, run_grpo
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


def _no_comma_rows(n):
    """IFEval rows a random model satisfies about 80% of the time: rewards vary in a group."""
    return [{"id": f"nc-{i}", "domain": "nocomma", "messages": [{"role": "user", "content": f"say {i}"}],
             "reference": {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}} for i in range(n)]


def _run(base, out, scorer, domain, steps, checkpoints=None, **kw):
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
                     domains={domain: spec}, out_dir=out, checkpoints=checkpoints)
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
    from experts.grpo import collect_step, compute_advantages, logprob_temperature
    from experts.rl_batch import build_minibatches

    torch.set_num_threads(1)
    tok = load_tokenizer(base)
    s = GRPOSettings(prompts_per_step=4, group_size=4, max_new_tokens=16, temperature=0.6)
    gen = HFGenerator(base, tok)
    groups, _ = collect_step(s, PromptStream(_no_comma_rows(8), seed=0), {"nocomma": DomainSpec("ifeval")},
                             generator=gen, scorer=scorer, tokenizer=tok, step=0)
    trainer = build_trainer(TrainerSettings(seed=0), base)
    for t, close in ((logprob_temperature(s.temperature), True), (1.0, False)):
        (mb,), = build_minibatches(compute_advantages(s, groups), 1, 64, pad_id=tok.pad_token_id, seed=0,
                                   temperature=t)
        m = mb["loss_mask"] > 0
        gap = (trainer.forward_logprobs(mb) - mb["rollout_logprobs"])[m].abs().max()
        assert (gap < 1e-4) if close else (gap > 1e-2), (t, float(gap))
