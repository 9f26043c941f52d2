"""OPD with the teach phase on Ray tasks (`pipeline.actors.TeacherPrefillPool`): the
stage process never builds a teacher model, not for the round caches and not for the
held-out KL (measured from states the pool prefilled, through the teachers' heads, equal
to the full-forward measurement in fp32); per-teacher task resources are honoured."""

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

from distill.opd import DomainSpec, TeacherRef, measure_heldout_kl, run_opd, teach_round
from engine.episode import RolloutSample
from distill.opd_settings import OPDSettings
from engine.generation import HFGenerator
from engine.model import load_model, load_tokenizer
from engine.trainer import TrainerSettings, build_trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_opd import _rows, models  # noqa: E402,F401  (the fixture)

ROOT = Path(__file__).resolve().parents[2]
KW = dict(prompts_per_domain=4, samples_per_prompt=2, max_new_tokens=8, mini_batch_size=8, micro_batch_size=4,
          lr=3e-3, chunk_size=16, seed=0, heldout_prompts_per_domain=4, eval_prompts_per_round=0)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             _temp_dir=os.path.join(ROOT, ".cache", "ray"))
    yield ray
    ray.shutdown()


@pytest.fixture
def hf_loads(monkeypatch):
    """Every Hugging Face model this process loads (the path asked for)."""
    loads: list[str] = []
    original = transformers.modeling_utils.PreTrainedModel.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        loads.append(str(Path(path).resolve()))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils.PreTrainedModel, "from_pretrained", classmethod(counting))
    return loads


def _heldout():
    return {d: [{**r, "messages": [{"role": "user", "content": f"held-out {r['id']}?"}]} for r in _rows(d, 4)]
            for d in "ab"}


@pytest.mark.slow
def test_opd_with_a_prefill_pool_loads_no_teacher_in_process(ray_local, models, tmp_path, hf_loads):
    from pipeline.actors import TeacherPrefillPool

    _, student, teachers, heads = models
    torch.set_num_threads(1)
    teacher_dirs = {str(Path(t).resolve()) for t in teachers}
    tok = load_tokenizer(student)
    settings = OPDSettings(rounds=2, **KW)
    refs = [TeacherRef(i, f"grpo:{d}", d, str(t), 1.0) for i, (d, t) in enumerate(zip("ab", teachers))]
    domains = {d: DomainSpec(verifier="math") for d in "ab"}
    pool = TeacherPrefillPool(dtype="fp32", device="cpu", num_cpus=1, num_gpus=0, per_teacher={1: (2.0, 0.0)})

    def no_teacher_here(path):
        raise AssertionError(f"the stage process was asked to load teacher {path}")

    hist = run_opd(settings, trainer=build_trainer(TrainerSettings(lr=settings.lr, seed=0), student),
                   generator=HFGenerator(student, tok), tokenizer=tok, prompts={d: _rows(d, 20) for d in "ab"},
                   teachers=refs, domains=domains, out_dir=tmp_path / "run", head_paths=heads,
                   load_teacher=no_teacher_here, heldout=_heldout(), load_student=lambda: load_model(student),
                   prefill=pool)
    assert [k["after_round"] for k in hist["kl_heldout_per_teacher"]] == [0, 1, 2]
    assert hf_loads and not teacher_dirs & set(hf_loads), hf_loads  # only student copies were built here
    assert not (tmp_path / "run" / "heldout-cache").exists()  # the held-out states are deleted after use

    # per-teacher resources: teacher 1's task held 2 CPUs, teacher 0's the pool's 1
    samples = [RolloutSample(input_ids=[5, 6, 7, 8, 9], loss_mask=[0, 0, 1, 1, 1], rollout_logprobs=[0.0] * 5,
                             finish_reason="stop", text="", reference=None, route="ab"[i % 2], sample_id=f"s{i}",
                             teacher_index=i % 2) for i in range(4)]
    stats = teach_round(settings, samples, refs, tmp_path / "cache", load_teacher=no_teacher_here, pad_id=0,
                        prefill=pool)
    assert stats["grpo:a"]["resources"] == {"CPU": 1.0} and stats["grpo:b"]["resources"] == {"CPU": 2.0}
    assert {stats[n]["worker_pid"] for n in stats}.isdisjoint({os.getpid()})

    # the pool's held-out KL equals the full-forward one (fp32 cache: the same logits)
    student_model = load_model(student)
    gen = HFGenerator(student, tok)
    via_pool = measure_heldout_kl(settings, _heldout(), refs, domains, generator=gen, tokenizer=tok,
                                  student=student_model, prefill=pool, head_paths=heads,
                                  cache_dir=tmp_path / "hc", pad_id=tok.pad_token_id)
    in_process = measure_heldout_kl(settings, _heldout(), refs, domains, generator=gen, tokenizer=tok,
                                    student=student_model, load_teacher=lambda p: load_model(p))
    for name in ("grpo:a", "grpo:b"):
        assert via_pool[name]["token_mean"] > 1e-3
        assert via_pool[name]["token_mean"] == pytest.approx(in_process[name]["token_mean"], rel=1e-5)
        assert via_pool[name]["per_prompt"] == pytest.approx(in_process[name]["per_prompt"], rel=1e-5, abs=1e-7)
