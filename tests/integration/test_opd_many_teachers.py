"""OPD with twelve teachers, one per (domain, mode) route (4 domains x non-think,
think-high, think-max), as DeepSeek-V4 merges more than ten: the one-resident-head design
holds at that count (max_resident_heads 1, at most one head load per teacher in a step),
each sample goes to its route's teacher, and the held-out KL falls for every teacher.

Teachers are perturbed copies of one tiny model (each its own weights and head); the
student starts from a different random model, so every teacher's KL has room to fall.
Each route's prompts are rendered in its mode (think-max rows carry the instruction,
non-think prompts end in an empty <think></think>)."""

import json

import pytest
import torch

from distill.heads import extract_head
from distill.opd import DomainSpec, TeacherRef, run_opd
from distill.opd_settings import OPDSettings
from engine.generation import HFGenerator
from engine.model import TinySpec, load_model, load_tokenizer, materialize_tiny, save_model_dir
from engine.modes import ModeSettings, expand_modes, route_key
from engine.trainer import TrainerSettings, build_trainer
from tests.integration.test_opd import _Checkpoints

SPEC = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
DOMAINS = ("a", "b", "c", "d")
MODES = {"non-think": ModeSettings(max_new_tokens=6), "think-high": ModeSettings(max_new_tokens=8),
         "think-max": ModeSettings(max_new_tokens=10)}


def _rows(domain, n, split):
    base = [{"id": f"{domain}-{split}-{i}", "domain": domain, "reference": {},
             "messages": [{"role": "user", "content": f"{domain} {split} {i}?"}]} for i in range(n)]
    return expand_modes(base, MODES)


@pytest.mark.slow
def test_twelve_teachers_one_head_resident_and_heldout_kl_falls_for_each(tmp_path):
    torch.set_num_threads(1)
    student = materialize_tiny(SPEC, tmp_path / "student", seed=0)
    base = materialize_tiny(SPEC, tmp_path / "teacher-base", seed=7)
    tok = load_tokenizer(student)
    refs, heads = [], []
    routes = [(d, m) for d in DOMAINS for m in MODES]
    for i, (d, m) in enumerate(routes):
        model = load_model(base)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
        path = save_model_dir(model, tok, tmp_path / f"teacher-{i}")
        refs.append(TeacherRef(i, f"grpo:{route_key(d, m)}", d, str(path), 1.0, m))
        heads.append(str(extract_head(path, tmp_path / f"heads/t{i}/head.safetensors")))
    assert len(refs) >= 10
    rows = {d: _rows(d, 12, "train") for d in DOMAINS}
    held = {d: _rows(d, 4, "eval") for d in DOMAINS}
    prompts = {t.route: [r for r in rows[t.domain] if r["mode"] == t.mode] for t in refs}
    heldout = {t.route: [r for r in held[t.domain] if r["mode"] == t.mode] for t in refs}
    domains = {t.route: DomainSpec(verifier="math", max_new_tokens=MODES[t.mode].max_new_tokens) for t in refs}
    settings = OPDSettings(rounds=3, prompts_per_domain=4, samples_per_prompt=2, mini_batch_size=48,
                           micro_batch_size=4, lr=3e-3, chunk_size=16, seed=0, heldout_prompts_per_domain=4,
                           heldout_every=3)
    trainer = build_trainer(TrainerSettings(lr=settings.lr, seed=0), student)
    hist = run_opd(settings, trainer=trainer, generator=HFGenerator(student, tok), tokenizer=tok, prompts=prompts,
                   teachers=refs, domains=domains, out_dir=tmp_path / "run", head_paths=heads,
                   load_teacher=lambda p: load_model(p), checkpoints=_Checkpoints(tmp_path / "ckpt"),
                   heldout=heldout, load_student=lambda: load_model(student))

    assert hist["max_resident_heads"] == 1
    assert len(hist["head_loads_per_step"]) == len(hist["teachers_per_step"]) == 3 * 2  # 96 samples / 48
    assert all(loads <= n for loads, n in zip(hist["head_loads_per_step"], hist["teachers_per_step"]))
    assert max(hist["teachers_per_step"]) >= 10  # a step really mixes ten or more teachers
    samples = [json.loads(x) for x in (tmp_path / "run/round-0/rollouts.jsonl").read_text().splitlines()]
    for t in refs:  # routed by (domain, mode), and at that mode's budget
        mine = [s for s in samples if s["teacher_index"] == t.index]
        assert mine and {s["domain"] for s in mine} == {t.route}
        assert max(sum(s["loss_mask"]) for s in mine) <= MODES[t.mode].max_new_tokens
    nonthink = next(s for s in samples if s["domain"] == "a@non-think")
    assert "<think></think>" in tok.decode(nonthink["input_ids"][:nonthink["loss_mask"].index(1)])
    before, after = hist["kl_heldout_per_teacher"][0], hist["kl_heldout_per_teacher"][-1]
    assert before["after_round"] == 0 and after["after_round"] == 3
    for t in refs:
        assert after[t.name] < before[t.name], (t.name, before[t.name], after[t.name])
