"""Padding-free training through the drivers: GRPO (`micro_batch_tokens`) and OPD
(`micro_batch_tokens`, `prefill_tokens`) against the right-padded path on tiny random
models, the packed teacher prefill against the padded one, and packed GRPO micro-batches
over two Ray ranks against one padded process.

Tolerances (fp32): the first optimiser step's loss within 1e-6 relative (the same weights
and rollouts; only the attention's summation shapes differ); later steps within 1e-5, since
each starts from weights that already differ by rounding; the final weights' distance, per
tensor, within 1e-3 of how far training moved them (Frobenius norms). Not element-wise:
Adam divides each gradient by its own running scale, so a weight whose gradient is a sum
that nearly cancels moves by a visible fraction of `lr` on rounding alone (seen: 1.6e-5 at
lr 3e-3 in one o_proj entry after four OPD steps)."""


import pytest
import torch

from distill.heads import extract_head
from distill.opd import DomainSpec as OPDDomain, TeacherRef, run_opd
from distill.opd_settings import OPDSettings
from engine.domains import get_domain
from engine.generation import HFGenerator
from engine.model import TinySpec, load_model, load_tokenizer, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer
from experts.grpo import DomainSpec, GRPOLoss, run_grpo
from experts.grpo_settings import GRPOSettings
from rewards import ScorerPool

SPEC = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    student = materialize_tiny(SPEC, root / "student", seed=0)
    teachers = [materialize_tiny(SPEC, root / f"teacher{i}", seed=10 + i) for i in range(2)]
    heads = [str(extract_head(t, root / f"heads/t{i}/head.safetensors")) for i, t in enumerate(teachers)]
    return root, student, teachers, heads


def _close_weights(start: str, a: dict, b: dict) -> None:
    """`a` and `b` (trained from the weights in `start`) apart by at most 1e-3 of a's move."""
    w0 = load_model(start).state_dict()
    for k in a:
        moved = float((a[k] - w0[k]).norm())
        assert float((a[k] - b[k]).norm()) <= 1e-3 * moved + 1e-12, (k, float((a[k] - b[k]).norm()), moved)


def _no_comma_rows(n):
    """IFEval rows a random model satisfies about 80% of the time: rewards vary in a group."""
    return [{"id": f"nc-{i}", "domain": "nocomma", "messages": [{"role": "user", "content": f"say {i}" + "!" * i}],
             "reference": {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}} for i in range(n)]


def _grpo(student, out, scorer, **kw):
    torch.set_num_threads(1)
    tok = load_tokenizer(student)
    s = GRPOSettings(steps=2, prompts_per_step=6, group_size=4, max_new_tokens=24, micro_batch_size=6,
                     mini_batches_per_step=2, lr=1e-3, save_every=2, seed=0, kl_beta=0.05, **kw)
    dom = get_domain("tool")
    rows = [r for pair in zip(_no_comma_rows(16), dom.generate("train", 16, seed=0)) for r in pair]
    domains = {"tool": DomainSpec(dom.verifier, dom.environment()), "nocomma": DomainSpec("ifeval", None)}
    trainer = build_trainer(TrainerSettings(lr=s.lr, seed=0), student)
    reference = build_trainer(TrainerSettings(lr=s.lr, seed=0), student)
    final = run_grpo(s, trainer=trainer, generator=HFGenerator(student, tok), scorer=scorer, tokenizer=tok,
                     train_rows=rows, domains=domains, out_dir=out, reference=reference)
    return final, trainer.state_dict()


def test_grpo_driver_packed_equals_padded(models, tmp_path):
    """Mixed RL over a tool domain and an IFEval-like one (rewards vary), two mini-batches
    per step (old log-probs taken), a KL term (reference log-probs taken): packed and padded
    runs agree step for step."""
    _, student, _, _ = models
    with ScorerPool(num_workers=1) as scorer:
        padded, w_pad = _grpo(student, tmp_path / "padded", scorer)
        packed, w_pack = _grpo(student, tmp_path / "packed", scorer, micro_batch_tokens=256)
    assert packed["reward_mean"] == padded["reward_mean"] and padded["reward_std"] > 0  # the same rollouts
    assert abs(padded["train/loss"]) > 1e-3
    for key in ("train/loss", "train/grad_norm"):  # the step's own figures (others are micro-batch means)
        assert packed[key] == pytest.approx(padded[key], rel=1e-5), key
    assert packed["train/num_micro_batches"] != padded["train/num_micro_batches"]
    _close_weights(student, w_pad, w_pack)


def _even_first_token(samples):
    return [float(s.input_ids[next(i for i, m in enumerate(s.loss_mask) if m)] % 2 == 0) for s in samples]


def _opd(models, out, **kw):
    root, student, teachers, heads = models
    torch.set_num_threads(1)
    tok = load_tokenizer(student)
    settings = OPDSettings(rounds=1, prompts_per_domain=8, samples_per_prompt=2, max_new_tokens=16,
                           mini_batch_size=8, micro_batch_size=3, lr=3e-3, chunk_size=16, seed=0,
                           loss_aggregation="sample_mean", reward_weight=1.0, prefill_batch_size=5, **kw)
    trainer = build_trainer(TrainerSettings(lr=settings.lr, seed=0), student)
    refs = [TeacherRef(i, f"grpo:{d}", d, str(t), 1.0) for i, (d, t) in enumerate(zip("ab", teachers))]
    rows = {d: [{"id": f"{d}-{i}", "domain": d, "messages": [{"role": "user", "content": f"{d} {i}?" * (1 + i % 4)}],
                 "reference": {}} for i in range(16)] for d in "ab"}
    log = _Records()
    hist = run_opd(settings, trainer=trainer, generator=HFGenerator(student, tok), tokenizer=tok, prompts=rows,
                   teachers=refs, domains={d: OPDDomain(verifier="math") for d in "ab"}, out_dir=out,
                   head_paths=heads, load_teacher=lambda p: load_model(p), load_student=lambda: load_model(student),
                   score_rollouts=_even_first_token, logger=log)
    return [r for r in log.records if "loss" in r], hist, trainer.state_dict()


class _Records:
    """A logger that keeps what the driver logs."""

    def __init__(self):
        self.records = []

    def log(self, metrics, step=None):
        self.records.append(dict(metrics))


def test_opd_driver_packed_equals_padded(models, tmp_path):
    """Two teachers, sample-mean aggregation, the reward term (per-sample advantages and
    the sampler's log-probs, clipped ratio), packed prefill and packed training."""
    pad_steps, pad_hist, w_pad = _opd(models, tmp_path / "padded")
    pack_steps, pack_hist, w_pack = _opd(models, tmp_path / "packed", micro_batch_tokens=96, prefill_tokens=200)
    assert len(pad_steps) == len(pack_steps) == 4
    assert pack_hist["reward_per_round"] == pad_hist["reward_per_round"]  # the same rollouts
    assert pack_steps[0]["loss"] == pytest.approx(pad_steps[0]["loss"], rel=1e-6)
    for a, b in zip(pad_steps, pack_steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for k in a:
            if k.startswith("kl/"):
                assert b[k] == pytest.approx(a[k], rel=1e-5), k
    _close_weights(models[1], w_pad, w_pack)


def test_packed_prefill_writes_the_padded_cache(models, tmp_path):
    from distill.cache import CacheReader, write_teacher_cache
    from engine.episode import RolloutSample

    _, _, teachers, _ = models
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(13):
        p, r = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        samples.append(RolloutSample(input_ids=torch.randint(4, 90, (p + r,), generator=g).tolist(),
                                     loss_mask=[0] * p + [1] * r, rollout_logprobs=[0.0] * (p + r),
                                     finish_reason="stop", text="", reference=None, route="a", sample_id=f"s{i}"))
    model = load_model(teachers[0])
    write_teacher_cache(model, 0, "t", samples, tmp_path / "padded", batch_size=4, dtype="fp32")
    stats = write_teacher_cache(model, 0, "t", samples, tmp_path / "packed", dtype="fp32", max_tokens=120)
    assert stats["samples"] == 13
    a, b = CacheReader(tmp_path / "padded"), CacheReader(tmp_path / "packed")
    try:
        for s in samples:
            x, y = a.get(s.sample_id), b.get(s.sample_id)
            assert x.shape == y.shape == (sum(s.loss_mask[1:]), SPEC.hidden_size)
            assert float((x - y).abs().max()) <= 1e-6 * float(x.abs().max())
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_two_ranks_train_packed_grpo_micro_batches_like_one_padded_process(ray_local, models, tmp_path):
    """Old log-probs through the group (rows split over the ranks with their samples) and two
    optimiser steps over 2 ranks on packed micro-batches equal one process on padded ones."""
    from tests.unit.test_packed_rl import _samples
    from experts.rl_batch import build_minibatches
    from pipeline.actors import TrainerGroup

    _, student, _, _ = models
    settings = TrainerSettings(backend="torch", lr=1e-2)
    loss_fn = GRPOLoss(GRPOSettings(loss_agg="seq-mean-token-mean"))
    group = TrainerGroup(settings, student, 2)
    local = build_trainer(settings, student)
    try:
        for step in range(2):
            samples = _samples(20, seed=10 + step)
            kw = dict(num_minibatches=1, pad_id=0, seed=step)
            (packed,) = build_minibatches(samples, micro_batch_size=4, micro_batch_tokens=200, **kw)
            (padded,) = build_minibatches(samples, micro_batch_size=4, **kw)
            assert len(packed) >= 3  # both ranks get micro-batches
            for mb in packed:
                mb["old_logprobs"] = group.forward_logprobs(mb)
            for mb in padded:
                mb["old_logprobs"] = local.forward_logprobs(mb)
            m = group.train_step(packed, loss_fn)
            ref = local.train_step(padded, loss_fn)
            assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), step
            assert m["tokens"] == ref["tokens"]
        _close_weights(student, local.state_dict(), group.state_dict())
    finally:
        group.shutdown()


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_trains_packed_grpo_micro_batches_like_padded_ones(models, stage):
    """The DeepSpeed back-end (one rank, ZeRO 0 and 3): old log-probs and two optimiser steps
    on packed micro-batches equal the same back-end on padded ones."""
    from tests.unit.test_packed_rl import _samples
    from experts.rl_batch import build_minibatches

    _, student, _, _ = models
    settings = TrainerSettings(backend="deepspeed", zero_stage=stage, lr=1e-2)
    loss_fn = GRPOLoss(GRPOSettings(loss_agg="seq-mean-token-sum-norm"))
    packed_tr, padded_tr = build_trainer(settings, student), build_trainer(settings, student)
    for step in range(2):
        samples = _samples(20, seed=20 + step)
        kw = dict(num_minibatches=1, pad_id=0, seed=step)
        (packed,) = build_minibatches(samples, micro_batch_size=4, micro_batch_tokens=200, **kw)
        (padded,) = build_minibatches(samples, micro_batch_size=4, **kw)
        for mb in packed:
            mb["old_logprobs"] = packed_tr.forward_logprobs(mb)
        for mb in padded:
            mb["old_logprobs"] = padded_tr.forward_logprobs(mb)
        m, ref = packed_tr.train_step(packed, loss_fn), padded_tr.train_step(padded, loss_fn)
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), step
        assert m["tokens"] == ref["tokens"]
    _close_weights(student, padded_tr.state_dict(), packed_tr.state_dict())
