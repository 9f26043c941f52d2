"""The eval driver with fake workers: pass@k math, aggregation, the results shape."""

import itertools
import json
import random

import pytest

from pipeline.evaluate import (EvalSet, EvalSettings, compute_pass_at_1, compute_pass_at_k, evaluate_models,
                               model_label, models_to_evaluate, paired_difference)


def _brute_pass_at_k(n, c, k):
    """Fraction of all k-subsets of n samples (c correct) that hold a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 8)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert compute_pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
    # hand-worked: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert compute_pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert compute_pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c/n
    with pytest.raises(ValueError, match="pass@k needs"):
        compute_pass_at_k(3, 4, 1)


def test_pass_at_1_is_mean_of_means():
    # prompt 1: (1 + 0 + 0 + 1) / 4 = 0.5; prompt 2: (0.5 + 0.5 + 1 + 0) / 4 = 0.5 -> 0.5
    assert compute_pass_at_1([[1, 0, 0, 1], [0.5, 0.5, 1, 0]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        compute_pass_at_1([[]])


def _rows(domain, answers):
    return [{"id": f"{domain}-{i}", "domain": domain, "messages": [{"role": "user", "content": f"q{i}"}],
             "reference": {"answer": a}} for i, a in enumerate(answers)]


class FakeModel:
    """Greedy: right on the first `right` prompts. Sampled: sample j is right iff j < right_samples."""

    def __init__(self, right, right_samples):
        self.right, self.right_samples, self.calls = right, right_samples, []

    def __call__(self, es, rows, temperature, n):
        self.calls.append((es.domain, temperature, n))
        out = []
        for i, r in enumerate(rows):
            for j in range(n):
                ok = i < self.right if temperature == 0.0 else j < self.right_samples
                out.append(r["reference"]["answer"] if ok else "wrong")
        return out


def _score(verifier, texts, refs, row_ids=None):
    assert verifier == "exact"
    return [float(t == r["answer"]) for t, r in zip(texts, refs)]


def test_evaluate_models_table_shape_and_values():
    sets = [EvalSet("math", "exact", _rows("math", ["1", "2", "3", "4"])),
            EvalSet("tool", "exact", _rows("tool", ["a", "b"]), environment_name="tool")]
    fakes = {"dir/base": FakeModel(0, 0), "dir/student": FakeModel(2, 1)}
    loaded = []

    def load(model_dir):
        loaded.append(model_dir)
        return fakes[model_dir]

    res = evaluate_models({"base": "dir/base", "student": "dir/student"}, sets, load, _score,
                          EvalSettings(samples=4, temperature=0.7), log=lambda s: None)
    assert loaded == ["dir/base", "dir/student"]  # one model at a time, in order
    assert res["models"] == {"base": {"math": 0.0, "tool": 0.0}, "student": {"math": 0.5, "tool": 1.0}}
    # student sampled: 1 of 4 samples right on every prompt -> pass@1 0.25, pass@4 = 1
    assert res["sampled"]["student"] == {"math": 0.25, "tool": 0.25}
    assert res["pass_at_k"]["student"] == {"math": 1.0, "tool": 1.0}
    assert res["n_eval"] == {"math": 4, "tool": 2}
    assert res["greedy_per_prompt"]["student"] == {"math": [1.0, 1.0, 0.0, 0.0], "tool": [1.0, 1.0]}
    assert fakes["dir/student"].calls == [("math", 0.0, 1), ("math", 0.7, 4), ("tool", 0.0, 1), ("tool", 0.7, 4)]


def test_greedy_only_and_max_prompts():
    sets = [EvalSet("math", "exact", _rows("math", ["1", "2", "3", "4"]))]
    res = evaluate_models({"m": "x"}, sets, lambda d: FakeModel(1, 0), _score,
                          EvalSettings(samples=0, max_prompts=2), log=lambda s: None)
    assert res["models"] == {"m": {"math": 0.5}} and res["sampled"] == {} and res["n_eval"] == {"math": 2}


def test_policy_returning_wrong_count_is_an_error():
    sets = [EvalSet("math", "exact", _rows("math", ["1", "2"]))]
    with pytest.raises(RuntimeError, match="math greedy: the policy returned 1 completions, expected 2"):
        evaluate_models({"m": "x"}, sets, lambda d: (lambda es, rows, t, n: ["1"]), _score,
                        EvalSettings(samples=0), log=lambda s: None)


def test_model_names():
    stages = ["prepare", "sft:math", "grpo:math", "sft:all", "mixed_rl", "opd"]
    assert models_to_evaluate(stages + ["eval"]) == stages
    assert [model_label(s) for s in stages] == ["base", "sft:math", "grpo:math", "sft:all", "mixed_rl", "student"]


def test_interrupted_eval_resumes_without_redoing_models():
    sets = [EvalSet("math", "exact", _rows("math", ["1", "2"]))]
    saved, loaded = {}, []

    def load(model_dir):
        loaded.append(model_dir)
        if model_dir == "dir/b" and len(loaded) == 2:
            raise KeyboardInterrupt  # killed while loading the second model
        return FakeModel(1, 0)

    models = {"a": "dir/a", "b": "dir/b"}
    settings = EvalSettings(samples=0)
    with pytest.raises(KeyboardInterrupt):
        evaluate_models(models, sets, load, _score, settings, log=lambda s: None, on_model=saved.__setitem__)
    assert list(saved) == ["a"]
    res = evaluate_models(models, sets, load, _score, settings, log=lambda s: None, done=dict(saved),
                          on_model=saved.__setitem__)
    assert loaded == ["dir/a", "dir/b", "dir/b"]  # 'a' was not evaluated again
    assert res["models"] == {"a": {"math": 0.5}, "b": {"math": 0.5}} and list(saved) == ["a", "b"]


def test_paired_difference_matches_float64_reference_and_hand_worked():
    import numpy as np

    assert paired_difference([0, 0, 1, 1], [1, 0, 1, 1]) == pytest.approx((0.25, 0.25))  # d=[1,0,0,0]: sd .5 / 2
    rng = random.Random(0)
    a = [float(rng.random() < 0.3) for _ in range(200)]
    b = [float(rng.random() < 0.5) for _ in range(200)]
    d = np.array(b, dtype=np.float64) - np.array(a, dtype=np.float64)
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(d.mean(), abs=1e-12) and se == pytest.approx(d.std(ddof=1) / np.sqrt(200), abs=1e-12)
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1.0], [1.0, 0.0])


def test_paired_difference_of_domain_means_matches_float64_reference():
    import numpy as np

    from pipeline.evaluate import paired_difference_of_domain_means

    rng = random.Random(1)
    a = {d: [float(rng.random() < 0.4) for _ in range(n)] for d, n in (("x", 128), ("y", 64), ("z", 100))}
    b = {d: [float(rng.random() < 0.6) for _ in v] for d, v in a.items()}
    diffs = [np.array(b[d], dtype=np.float64) - np.array(a[d], dtype=np.float64) for d in sorted(a)]
    ref_mean = np.mean([x.mean() for x in diffs])
    ref_se = np.sqrt(sum(x.var(ddof=1) / len(x) for x in diffs)) / len(diffs)
    mean, se = paired_difference_of_domain_means(a, b)
    assert mean == pytest.approx(ref_mean, abs=1e-12) and se == pytest.approx(ref_se, abs=1e-12)
    with pytest.raises(ValueError, match="same domains"):
        paired_difference_of_domain_means({"x": [0.0, 1.0]}, {"y": [0.0, 1.0]})


def test_report_lists_paired_comparisons():
    from pipeline.report import paired_comparisons

    res = {"n_eval": {"math": 4}, "greedy_per_prompt": {"sft:math": {"math": [0, 0, 1, 1]},
                                                        "grpo:math": {"math": [1, 0, 1, 1]}}}
    (line,) = [x for x in paired_comparisons(res) if x.startswith("| math")]
    assert line == "| math | grpo:math vs sft:math | 0.500 | 0.750 | +0.250 | 0.250 | +1.0 | 1.50 |"
    assert paired_comparisons({"n_eval": {"math": 4}}) == []
    res["greedy_per_prompt"].update({"mixed_rl": {"math": [0, 0, 0, 1]}, "student": {"math": [1, 1, 0, 1]}})
    (mean_line,) = [x for x in paired_comparisons(res) if x.startswith("| mean")]
    assert mean_line == "| mean of 1 | student vs mixed_rl | 0.250 | 0.750 | +0.500 | 0.289 | +1.7 | 3.00 |"


def test_report_compares_experts_with_the_shared_sft_they_start_from():
    """With expert_init 'sft:all' there is no sft:<d>: grpo:<d> is compared with sft:all, and
    student vs sft:all is listed once."""
    from pipeline.report import paired_comparisons

    per = {"sft:all": {"math": [0, 0, 1, 1]}, "grpo:math": {"math": [1, 0, 1, 1]}, "student": {"math": [1, 1, 1, 1]}}
    lines = [x for x in paired_comparisons({"n_eval": {"math": 4}, "greedy_per_prompt": per}) if x.startswith("| math")]
    assert [x.split(" | ")[1] for x in lines] == ["grpo:math vs sft:all", "student vs grpo:math", "student vs sft:all"]


def test_eval_keeps_every_completion_with_its_score():
    """Greedy and sampled completions, each with its prompt and score, in the model's entry
    (for eval/samples.jsonl), not in the results table."""
    sets = [EvalSet("math", "exact", _rows("math", ["1", "2"]))]
    entries = {}
    res = evaluate_models({"m": "x"}, sets, lambda d: FakeModel(1, 1), _score, EvalSettings(samples=2),
                          log=lambda s: None, on_model=lambda n, e: entries.update({n: e}))
    got = [(c["kind"], c["row_id"], c["prompt"], c["completion"], c["score"]) for c in entries["m"]["completions"]["math"]]
    assert got == [("greedy", "math-0", "user: q0", "1", 1.0), ("greedy", "math-1", "user: q1", "wrong", 0.0),
                   ("sampled-0", "math-0", "user: q0", "1", 1.0), ("sampled-1", "math-0", "user: q0", "wrong", 0.0),
                   ("sampled-0", "math-1", "user: q1", "2", 1.0), ("sampled-1", "math-1", "user: q1", "wrong", 0.0)]
    assert "completions" not in json.dumps(res)


def test_eval_stage_writes_every_completion_to_samples_jsonl(tmp_path):
    import yaml

    from pipeline.config import load_config
    from pipeline.graph import build_graph, input_hashes
    from pipeline.rundir import RunDir
    from pipeline.stage_context import StageContext
    from pipeline.stage_eval import _log_completions

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": "t", "run_dir": str(tmp_path / "run"),
                                    "domains": [{"name": "math", "verifier": "math",
                                                 "data": {"synthetic": {"generator": "math"}}}],
                                    "logging": {"wandb": "disabled"}}))
    cfg = load_config(path)
    stages = {s.name: s for s in build_graph(cfg)}
    ctx = StageContext(cfg, stages["eval"], RunDir(cfg.run_path), input_hashes(list(stages.values()))["eval"])
    sets = [EvalSet("math", "exact", _rows("math", ["1", "2"]))]
    entries = {}
    res = evaluate_models({"base": "x", "student": "y"}, sets, lambda d: FakeModel(1, 0), _score,
                          EvalSettings(samples=1), log=lambda s: None, on_model=lambda n, e: entries.update({n: e}))
    _log_completions(ctx, entries, res)
    rows = [json.loads(x) for x in (ctx.out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2  # models x prompts x (greedy + 1 sample)
    assert {(r["model"], r["kind"]) for r in rows} == {(m, k) for m in ("base", "student") for k in ("greedy", "sampled-0")}
    assert all(set(r) == {"model", "route", "kind", "row_id", "prompt", "completion", "score"} for r in rows)
    assert not (ctx.out_dir / "metrics.jsonl").exists()
