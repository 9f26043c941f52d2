"""The OPD driver on tiny random models: two teachers, three rounds, CPU."""

import json

import pytest
import torch

from distill.heads import extract_head
from distill.opd import DomainSpec, TeacherRef, run_opd
from distill.opd_settings import OPDSettings
from engine.generation import HFGenerator
from engine.model import TinySpec, load_model, load_tokenizer, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer

SPEC = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def _rows(domain, n):
    return [{"id": f"{domain}-{i}", "domain": domain,
             "messages": [{"role": "user", "content": f"{domain} {i}?"}], "reference": {}} for i in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd")
    student = materialize_tiny(SPEC, root / "student", seed=0)
    teachers = [materialize_tiny(SPEC, root / f"teacher{i}", seed=10 + i) for i in range(2)]
    heads = [str(extract_head(t, root / f"heads/t{i}/head.safetensors")) for i, t in enumerate(teachers)]
    return root, student, teachers, heads


class _Checkpoints:
    """Minimal latest-wins checkpoint store for the driver test."""

    def __init__(self, root):
        self.root = root
        self.saved = []

    def latest(self):
        return self.saved[-1] if self.saved else None

    def save(self, trainer, step, extra):
        path = self.root / f"step-{step}"
        trainer.save_checkpoint(path, extra)
        self.saved.append(path)


def _run(models, out, rounds, checkpoints=None, heldout=None, teachers=None, heads=None, score_rollouts=None,
         logger=None, **kw):
    root, student, default_teachers, default_heads = models
    teachers, heads = teachers or default_teachers, heads or default_heads
    torch.set_num_threads(1)
    tok = load_tokenizer(student)
    settings = OPDSettings(rounds=rounds, prompts_per_domain=8, samples_per_prompt=2, max_new_tokens=10,
                           mini_batch_size=16, micro_batch_size=4, lr=3e-3, chunk_size=16, seed=0, **kw)
    trainer = build_trainer(TrainerSettings(lr=settings.lr, seed=0), student)
    gen = HFGenerator(student, tok)
    refs = [TeacherRef(i, f"grpo:{d}", d, str(t), 1.0) for i, (d, t) in enumerate(zip("ab", teachers))]
    domains = {d: DomainSpec(verifier="math") for d in "ab"}
    hist = run_opd(settings, trainer=trainer, generator=gen, tokenizer=tok,
                   prompts={d: _rows(d, 40) for d in "ab"}, teachers=refs, domains=domains, out_dir=out,
                   head_paths=heads, load_teacher=lambda p: load_model(p), checkpoints=checkpoints,
                   heldout=heldout, load_student=lambda: load_model(student), score_rollouts=score_rollouts,
                   logger=logger)
    return hist, trainer


def test_heldout_kl_is_measured_before_and_every_k_rounds_and_falls(models, tmp_path):
    heldout = {d: [{**r, "messages": [{"role": "user", "content": f"held-out {r['id']}?"}]} for r in _rows(d, 12)]
               for d in "ab"}
    hist, _ = _run(models, tmp_path / "run", rounds=3, heldout=heldout, heldout_prompts_per_domain=12,
                   heldout_every=2)
    kl, per_prompt_mean = hist["kl_heldout_per_teacher"], hist["kl_heldout_per_prompt_mean"]
    assert [k["after_round"] for k in kl] == [0, 2, 3]  # before training, every 2nd round, the last
    assert [k["after_round"] for k in per_prompt_mean] == [0, 2, 3]
    for name in ("grpo:a", "grpo:b"):
        assert kl[-1][name] < kl[0][name], kl
        assert per_prompt_mean[-1][name] < per_prompt_mean[0][name], per_prompt_mean
    lines = [json.loads(x) for x in (tmp_path / "run" / "heldout_kl.jsonl").read_text().splitlines()]
    assert [x["after_round"] for x in lines] == [0, 2, 3]
    for x, m in zip(lines, per_prompt_mean):
        assert len(x["grpo:a"]) == 12 and sum(x["grpo:a"]) / 12 == pytest.approx(m["grpo:a"])
    assert "heldout_per_prompt" not in hist  # the per-prompt lists stay out of the manifest


def test_heldout_kl_equals_a_float64_reference_and_is_zero_against_itself(models):
    from distill.opd import _domain_rollouts, heldout_seed, measure_heldout_kl

    root, student, teachers, _ = models
    torch.set_num_threads(1)
    tok = load_tokenizer(student)
    settings = OPDSettings(max_new_tokens=10, seed=3)
    rows = {"a": _rows("a", 6)}
    spec = {"a": DomainSpec(verifier="math")}
    gen = HFGenerator(student, tok)
    s_model = load_model(student)
    for teacher_dir, zero in ((str(teachers[0]), False), (str(student), True)):
        ref = [TeacherRef(0, "t", "a", teacher_dir, 1.0)]
        res = measure_heldout_kl(settings, rows, ref, spec, generator=gen, tokenizer=tok, student=s_model,
                                 load_teacher=lambda p: load_model(p))["t"]
        got = res["token_mean"]
        # the same samples (fixed seed), the divergence in float64 from full logits
        samples = _domain_rollouts(settings, rows["a"], "a", spec["a"], 0, generator=gen, tokenizer=tok, n=1,
                                   seed=heldout_seed(settings), id_prefix="x")
        t_model = load_model(teacher_dir)
        total, n, per_prompt = 0.0, 0, []
        with torch.no_grad():
            for smp in samples:
                ids = torch.tensor([smp.input_ids])
                mask = torch.tensor(smp.loss_mask[1:]) > 0
                ls = torch.log_softmax(s_model(input_ids=ids).logits[0, :-1][mask].double(), -1)
                lt = torch.log_softmax(t_model(input_ids=ids).logits[0, :-1][mask].double(), -1)
                kl = (ls.exp() * (ls - lt)).sum(-1)
                total += float(kl.sum())
                n += int(mask.sum())
                per_prompt.append(float(kl.mean()))
        if zero:
            assert abs(got) < 1e-6 and max(abs(x) for x in res["per_prompt"]) < 1e-6
        else:
            assert got > 1e-3 and got == pytest.approx(total / n, rel=1e-4)
            assert res["per_prompt"] == pytest.approx(per_prompt, rel=1e-4, abs=1e-7)


def test_kl_falls_heads_resident_one_at_a_time(models, tmp_path):
    hist, _ = _run(models, tmp_path / "run", rounds=3)
    kl = hist["kl_per_teacher"]
    assert len(kl) == 3
    for name in ("grpo:a", "grpo:b"):
        assert kl[2][name] < kl[0][name], kl  # the student moves toward each teacher
    assert hist["max_resident_heads"] == 1
    assert hist["head_loads_per_step"] == hist["teachers_per_step"]  # one load per teacher per step
    assert all(n == 2 for n in hist["teachers_per_step"])  # every step mixes both domains
    assert 64 * 4 <= hist["cache_bytes_per_token"] < 64 * 4 * 1.02  # fp32 hidden 64 + shard headers
    rollouts = [json.loads(x) for x in (tmp_path / "run/round-0/rollouts.jsonl").read_text().splitlines()]
    assert {r["teacher_index"] for r in rollouts if r["domain"] == "a"} == {0}


def test_samples_log_keeps_n_completions_per_round_with_their_teacher(models, tmp_path):
    from engine.metrics import MetricsLogger

    log = MetricsLogger(tmp_path / "run", wandb_mode="disabled", progress=False, samples_per_step=4)
    _run(models, tmp_path / "run", rounds=1, logger=log)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["step"] for r in rows} == {2}  # one round of 32 samples: 2 steps of 16
    assert {r["route"] for r in rows} == {"a", "b"}  # spread over the round: both domains
    for r in rows:
        assert r["teacher"] == "ab".index(r["route"]) and r["reward"] is None  # no reward term here
        assert r["prompt"] and r["row_id"].startswith(r["route"] + "-") and "completion" in r


def test_resume_after_an_interrupted_round_gives_the_same_student(models, tmp_path):
    _, full = _run(models, tmp_path / "full", rounds=2)
    ck = _Checkpoints(tmp_path / "ck")
    _run(models, tmp_path / "part", rounds=1, checkpoints=ck)  # stops after round 0, as if killed
    # round 1's rollouts exist but its training never finished: the rerun redoes it
    _, resumed = _run(models, tmp_path / "part", rounds=2, checkpoints=ck)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_round_caches_removed_after_their_checkpoint_and_disk_reported(models, tmp_path):
    out = tmp_path / "run"
    hist, _ = _run(models, out, rounds=3, checkpoints=_Checkpoints(tmp_path / "ck"), keep_caches=1)
    assert not (out / "round-0" / "cache").exists() and not (out / "round-1" / "cache").exists()
    assert (out / "round-2" / "cache" / "teacher-001" / "manifest.json").is_file()  # the newest, kept
    assert all((out / f"round-{r}" / "rollouts.jsonl").is_file() for r in range(3))  # rollouts are kept
    assert not list(out.glob("round-*/rollouts.wal"))  # the logs go once the rollouts are in their file
    assert len(hist["cache_bytes"]) == 3 and min(hist["cache_bytes"]) > 0
    # the peak is measured with the round's cache on disk (no checkpoints in `out` here)
    assert max(hist["cache_bytes"]) <= hist["disk_peak_bytes"] < sum(hist["cache_bytes"])
    assert all(1.0 <= a <= 1.1 for a in hist["cache_read_amplification"])
    assert hist["rollout_wal"] == {"generated": 6, "regenerated": 0, "completed": 6, "replayed": 0}


def test_kl_allocation_moves_prompts_to_the_larger_gap_and_resumes_to_the_same_student(models, tmp_path):
    root, student, teachers, heads = models
    # teacher b is the student's own start: a far smaller gap than teacher a's
    kw = dict(allocation="kl", allocation_floor=0.25, teachers=[teachers[0], student],
              heads=[heads[0], str(extract_head(student, tmp_path / "head-b.safetensors"))])
    hist, full = _run(models, tmp_path / "full", rounds=3, **kw)
    counts = hist["prompts_per_round"]
    assert counts[0] == {"a": 8, "b": 8}  # no KL before round 0: the plain split
    for r in (1, 2):  # then the teacher further from the student (round r - 1's KL) gets more
        kl = hist["kl_per_teacher"][r - 1]
        assert kl["grpo:a"] > 2 * kl["grpo:b"], kl
        assert counts[r]["a"] > counts[r]["b"] >= 2 and counts[r]["a"] + counts[r]["b"] == 16, (counts, kl)
        rollouts = [json.loads(x) for x in (tmp_path / f"full/round-{r}/rollouts.jsonl").read_text().splitlines()]
        assert {d: sum(1 for x in rollouts if x["domain"] == d) for d in "ab"} == {d: 2 * counts[r][d] for d in "ab"}
    assert all(n == 2 for n in hist["teachers_per_step"])  # every step still mixes both teachers
    ck = _Checkpoints(tmp_path / "ck")
    _run(models, tmp_path / "part", rounds=2, checkpoints=ck, **kw)  # killed after round 1
    resumed_hist, resumed = _run(models, tmp_path / "part", rounds=3, checkpoints=ck, **kw)
    assert resumed_hist["prompts_per_round"] == counts
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _even_first_token(samples):
    """A stand-in verifier: 1 where the response starts with an even token id."""
    return [float(s.input_ids[s.loss_mask.index(1)] % 2 == 0) for s in samples]


def _even_mass(model_dir, trainer, prompts):
    """The student's probability of an even first response token, mean over `prompts`."""
    from engine.chat import render_row_prompt

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    model.load_state_dict(trainer.state_dict())
    with torch.no_grad():
        p = [torch.softmax(model(torch.tensor([render_row_prompt(r, tok)])).logits[0, -1], -1) for r in prompts]
    return float(sum(pi[0::2].sum() for pi in p) / len(p))


def test_reward_term_moves_the_student_toward_the_reward_and_resumes_from_logged_rewards(models, tmp_path):
    """MOPD: with `reward_weight` the student's rollouts are scored, each sample's advantage
    is its reward z-scored within its prompt's group and kept in rollouts.jsonl, and the
    policy-gradient term moves the student toward the reward, beyond distillation alone; a
    stage that finds a round's scored rollouts on disk trains on their logged advantages."""
    _, student, _, _ = models
    _, base = _run(models, tmp_path / "kl", rounds=3)
    hist, full = _run(models, tmp_path / "full", rounds=3, score_rollouts=_even_first_token, reward_weight=10.0)
    prompts = _rows("a", 40)[:16] + _rows("b", 40)[:16]
    assert _even_mass(student, full, prompts) > _even_mass(student, base, prompts) + 0.02  # 0.531 against 0.499
    assert len(hist["reward_per_round"]) == 3 and set(hist["reward_per_round"][0]) == {"a", "b"}
    recs = [json.loads(x) for x in (tmp_path / "full/round-0/rollouts.jsonl").read_text().splitlines()]
    assert any(r["advantage"] != 0 for r in recs)
    for g in range(0, len(recs), 2):  # z-scored within each prompt's two samples: 0 or +-1/sqrt(2)
        first, second = recs[g], recs[g + 1]
        assert first["row_id"] == second["row_id"] and first["domain"] == second["domain"]
        want = 0.0 if first["reward"] == second["reward"] else (1 if first["reward"] > second["reward"] else -1) * 0.5 ** 0.5
        assert first["advantage"] == pytest.approx(want, abs=1e-3) and second["advantage"] == pytest.approx(-want, abs=1e-3)
    ck = _Checkpoints(tmp_path / "ck")
    _run(models, tmp_path / "part", rounds=2, checkpoints=ck, score_rollouts=_even_first_token, reward_weight=10.0)
    # killed after round 1's checkpoint with round 2's rollouts already written
    (tmp_path / "part/round-2").mkdir()
    (tmp_path / "part/round-2/rollouts.jsonl").write_bytes((tmp_path / "full/round-2/rollouts.jsonl").read_bytes())
    calls = []
    _, resumed = _run(models, tmp_path / "part", rounds=3, checkpoints=ck, reward_weight=10.0,
                      score_rollouts=lambda smp: calls.append(len(smp)) or _even_first_token(smp))
    assert calls == []  # round 2's rewards came from its rollouts.jsonl, not a new scoring
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="score_rollouts"):
        _run(models, tmp_path / "none", rounds=1, reward_weight=10.0)
