"""Seeds as an axis (pipeline/seeds.py): run directories per seed, figures of one run, and
their aggregation over seeds against a float64 reference."""

import json
import math
import random

import numpy as np
import pytest

from pipeline import seeds as S


def test_seed_run_dirs_keep_the_config_seed_in_place():
    assert S.seed_run_dir("runs/tiny", 0, 0) == "runs/tiny"
    assert S.seed_run_dir("runs/tiny", 0, 2) == "runs/tiny-seed2"
    assert S.seed_run_dir("runs/tiny", 3, 0) == "runs/tiny-seed0"


@pytest.mark.parametrize("text,seeds", [("0,1,2", [0, 1, 2]), ("0 1 2", [0, 1, 2]), ("0-3", [0, 1, 2, 3]),
                                        ("5,1,5", [5, 1]), ("0-1,4", [0, 1, 4])])
def test_parse_seeds(text, seeds):
    assert S.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "3-1", "1.5", "-1"])
def test_parse_seeds_rejects(text):
    with pytest.raises(ValueError, match="--seeds"):
        S.parse_seeds(text)


def _results(rng: random.Random, n: int = 40) -> dict:
    """An eval results.json shaped like the tiny experiment's (expert_init sft:all)."""
    domains = ("code", "math")
    models = ["sft:all", "grpo:code", "grpo:math", "mixed_rl", "student"]
    per = {m: {d: [float(rng.random() < 0.3 + 0.1 * i) for _ in range(n)] for d in domains}
           for i, m in enumerate(models)}
    return {"models": {m: {d: sum(v) / n for d, v in t.items()} for m, t in per.items()},
            "greedy_per_prompt": per, "n_eval": {d: n for d in domains}}


def _write_run(tmp_path, name: str, rng: random.Random) -> tuple:
    run = tmp_path / name
    (run / "eval").mkdir(parents=True)
    res = _results(rng)
    (run / "eval" / "results.json").write_text(json.dumps(res))
    (run / "opd").mkdir()
    rows = [{"after_round": r, "grpo:math": [rng.random() for _ in range(20)]} for r in (0, 6)]
    (run / "opd" / "heldout_kl.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (run / "config.yaml").write_text(f"experiment: t\nseed: {len(name)}\n")
    return run, res, rows


def test_figures_of_one_run_match_a_float64_reference(tmp_path):
    run, res, rows = _write_run(tmp_path, "r", random.Random(0))
    f = S.figures(run)
    per = res["greedy_per_prompt"]
    d = np.array(per["grpo:math"]["math"], np.float64) - np.array(per["sft:all"]["math"], np.float64)
    got = f["diff | math | grpo:math - sft:all"]
    assert got["value"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), abs=1e-12)
    ratio = f["ratio | code | student / grpo:code"]["value"]
    assert ratio == pytest.approx(np.mean(per["student"]["code"]) / np.mean(per["grpo:code"]["code"]), abs=1e-12)
    frac = np.array(per["student"]["code"], np.float64) - 0.9 * np.array(per["grpo:code"]["code"], np.float64)
    assert f["diff | code | student - 0.9 x grpo:code"]["value"] == pytest.approx(frac.mean(), abs=1e-12)
    assert f["diff | code | student - 0.9 x grpo:code"]["se"] == pytest.approx(frac.std(ddof=1) / math.sqrt(40))
    assert "diff | mean of 2 | student - mixed_rl" in f and "diff | mean of 2 | experts - mixed_rl" in f
    kl = np.array(rows[1]["grpo:math"]) - np.array(rows[0]["grpo:math"])
    assert f["kl | grpo:math | after - before"]["value"] == pytest.approx(kl.mean(), abs=1e-12)
    assert f["score | student | math"] == {"value": res["models"]["student"]["math"], "kind": "score",
                                           "se": pytest.approx(np.std(per["student"]["math"], ddof=1) / math.sqrt(40))}


def test_aggregate_over_seeds_matches_a_float64_reference():
    rng = np.random.default_rng(1)
    for n in (2, 3, 5):
        vals, ses = rng.normal(0.05, 0.03, n), rng.uniform(0.005, 0.04, n)
        runs = {f"s{i}": {"diff | x | b - a": {"value": float(v), "se": float(s), "kind": "diff"}}
                for i, (v, s) in enumerate(zip(vals, ses))}
        row = S.aggregate(runs)["diff | x | b - a"]
        se_seeds = np.std(vals, ddof=1) / np.sqrt(n)
        se_prompts = np.sqrt(np.sum(ses ** 2)) / n
        assert row["mean"] == pytest.approx(vals.mean(), abs=1e-12)
        assert row["se_seeds"] == pytest.approx(se_seeds, abs=1e-12)
        assert row["se_prompts"] == pytest.approx(se_prompts, abs=1e-12)
        assert row["se"] == pytest.approx(max(se_seeds, se_prompts), abs=1e-12)
        contradicted = [f"s{i}" for i, (v, s) in enumerate(zip(vals, ses)) if v < -2 * s]
        assert row["holds"] == (vals.mean() > 2 * max(se_seeds, se_prompts) and not contradicted)


def test_a_seed_that_contradicts_the_claim_fails_it():
    runs = {"a": {"diff | x | b - a": {"value": 0.30, "se": 0.01, "kind": "diff"}},
            "b": {"diff | x | b - a": {"value": 0.31, "se": 0.01, "kind": "diff"}},
            "c": {"diff | x | b - a": {"value": 0.32, "se": 0.01, "kind": "diff"}},
            "d": {"diff | x | b - a": {"value": -0.05, "se": 0.02, "kind": "diff"}}}
    row = S.aggregate(runs)["diff | x | b - a"]
    assert row["mean"] > 2 * row["se"] and not row["holds"] and row["contradicted_by"] == ["d"]
    # a KL change is claimed downwards
    kl = {k: {"kl | t | after - before": {"value": -0.2 + 0.01 * i, "se": 0.02, "kind": "kl"}} for i, k in
          enumerate("abc")}
    assert S.aggregate(kl)["kl | t | after - before"]["holds"]


def test_seeds_report_over_runs_and_the_cli(tmp_path, capsys):
    from pipeline.cli import main

    rng = random.Random(3)
    runs = [_write_run(tmp_path, name, rng)[0] for name in ("tiny", "tiny-seed1", "tiny-seed2")]
    assert main(["report", *map(str, runs)]) == 0
    out = tmp_path / "tiny-seeds"
    text = (out / "report.md").read_text()
    assert "| math: grpo:math - sft:all |" in text and "| mean of 2: student - mixed_rl |" in text
    data = json.loads((out / "seeds.json").read_text())
    assert set(data["runs"]) == {"tiny", "tiny-seed1", "tiny-seed2"}
    assert data["figures"]["diff | math | grpo:math - sft:all"]["per_seed"].keys() == {"tiny", "tiny-seed1",
                                                                                       "tiny-seed2"}
    (runs[2] / "eval" / "results.json").unlink()
    assert main(["report", *map(str, runs)]) == 2
    assert "tiny-seed2" in capsys.readouterr().err


def test_run_with_seeds_runs_the_graph_once_per_seed(tmp_path, monkeypatch, capsys):
    """`run CONFIG --seeds` calls the runner once per seed with the seed and its run directory
    as overrides (so every stage process gets them), then aggregates."""
    import pipeline.runner
    from pipeline.cli import main

    calls = []
    rng = random.Random(4)

    def fake_run(cfg, config_path, overrides, **kw):
        calls.append((cfg.seed, str(cfg.run_path), list(overrides)))
        run = cfg.run_path
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "results.json").write_text(json.dumps(_results(rng)))
        return 0

    monkeypatch.setattr(pipeline.runner, "run_experiment", fake_run)
    rd = tmp_path / "runs" / "tiny"
    assert main(["run", "configs/tiny.yaml", f"run_dir={rd}", "--seeds", "0,2"]) == 0
    assert calls == [(0, str(rd), [f"run_dir={rd}", "seed=0", f"run_dir={rd}"]),
                     (2, f"{rd}-seed2", [f"run_dir={rd}", "seed=2", f"run_dir={rd}-seed2"])]
    assert (tmp_path / "runs" / "tiny-seeds" / "report.md").is_file()
    assert main(["run", "configs/tiny.yaml", "--seeds", "x"]) == 2


def _t_cdf_reference(t: float, df: int) -> float:
    """P(T < t) by integrating Student's t density (float64 Simpson on a fine grid)."""
    from math import lgamma, pi

    c = np.exp(lgamma((df + 1) / 2) - lgamma(df / 2)) / np.sqrt(df * pi)
    x = np.linspace(0.0, abs(t), 200001)
    f = c * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    h = x[1] - x[0]
    half = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + half if t >= 0 else 0.5 - half


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 9, 30])
@pytest.mark.parametrize("t", [-4.0, -1.3, -0.2, 0.0, 0.7, 2.0, 3.3, 9.0])
def test_student_t_cdf_matches_a_float64_integral(t, df):
    assert S.student_t_cdf(t, df) == pytest.approx(_t_cdf_reference(t, df), abs=1e-9)


@pytest.mark.parametrize("p,df,table", [(0.975, 1, 12.706204736), (0.975, 3, 3.182446305),
                                        (0.975, 5, 2.570581836), (0.99, 10, 2.763769458),
                                        (0.95, 30, 1.697260887), (0.025, 3, -3.182446305), (0.5, 4, 0.0)])
def test_student_t_quantile_matches_tables(p, df, table):
    assert S.student_t_quantile(p, df) == pytest.approx(table, abs=1e-8)
    assert S.student_t_cdf(S.student_t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    with pytest.raises(ValueError):
        S.student_t_quantile(1.0, df)


def test_prediction_factor_covers_one_more_draw():
    """One more draw from the same normal lands below mean - k SD of n earlier draws with
    probability 1 - P(Z < 2) = 2.3%; the normal's k = 2 misses far more often with few draws
    (8.5% with 4), which is how a 2-SE margin from 4 seeds failed a CI run."""
    rng = np.random.default_rng(0)
    for n in (3, 4, 6):
        x, new = rng.normal(size=(100000, n)), rng.normal(size=100000)
        m, sd = x.mean(1), x.std(1, ddof=1)
        assert abs(np.mean(new < m - S.prediction_factor(n) * sd) - (1 - S.ONE_SIDED)) < 0.003, n
        assert np.mean(new < m - 2 * sd) > 0.045, n
    assert S.prediction_factor(4) == pytest.approx(S.student_t_quantile(S.ONE_SIDED, 3) * np.sqrt(1.25))
    assert S.prediction_factor(10**6) == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(ValueError):
        S.prediction_factor(1)


@pytest.mark.parametrize("vals,ses", [([0.17, 0.20, 0.18], [0.037, 0.037, 0.034]),
                                      ([0.10, 0.08, 0.03], [0.046, 0.034, 0.033]),
                                      ([0.12, 0.09, 0.09], [0.014, 0.002, 0.008]),
                                      ([0.05, 0.06], [0.0, 0.0]), ([-0.01, 0.01], [0.0, 0.0]),
                                      ([0.3, -0.2, 0.1], [0.05, 0.05, 0.05]),
                                      ([0.045, 0.061, 0.051, 0.070, 0.052, 0.017], [0.013] * 6)])
def test_single_run_margin_matches_a_float64_reference(vals, ses):
    v, s = np.array(vals, np.float64), np.array(ses, np.float64)
    n = len(v)
    k = _t_quantile_reference(S.ONE_SIDED, n - 1) * np.sqrt(1 + 1 / n)
    rms = np.sqrt(np.mean(s ** 2))
    edge = v.mean() - k * max(v.std(ddof=1), rms)
    if rms == 0:
        ref = 2.0 if edge > 0 else 0.0
    else:
        z = v / s if np.all(s > 0) else None
        best = max(edge / rms, z.mean() - k * max(z.std(ddof=1), 1.0)) if z is not None else edge / rms
        ref = min(2.0, np.floor(2 * best) / 2)
    assert S.single_run_margin(vals, ses) == ref
    with pytest.raises(ValueError):
        S.single_run_margin([3.0], [1.0])


def _t_quantile_reference(p: float, df: int) -> float:
    """Inverts the integrated CDF by bisection."""
    lo, hi = -50.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_reference(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def test_single_run_margin_examples():
    assert S.single_run_margin([0.17, 0.20, 0.18, 0.19, 0.18], [0.030] * 5) == 2.0  # a robust bar keeps 2 SE
    assert S.single_run_margin([0.17, 0.20, 0.18], [0.037, 0.037, 0.034]) == -0.5  # 3 runs promise a fourth little
    assert S.single_run_margin([0.10, 0.08, 0.03], [0.046, 0.034, 0.033]) < 0  # a gain of ~2 SE does not
    assert S.single_run_margin([0.061, 0.020, 0.028, 0.05], [0.010, 0.004, 0.005, 0.008]) == 2.0  # scaled: z 5-6.1
    # student - mixed RL: 4 seeds at 0.045-0.070 (SE 0.013) no longer promise 2 SE to a fifth run
    assert S.single_run_margin([0.045, 0.061, 0.051, 0.070], [0.013] * 4) == 0.5


def test_figures_of_a_modes_run(tmp_path):
    """Each mode's expert in its own mode, paired over the same problems, and the student."""
    rng = random.Random(5)
    modes = ("non-think", "think-high", "think-max")
    per = {f"grpo:math@{m}": {f"math@{k}": [float(rng.random() < 0.2 + 0.3 * j) for _ in range(30)]
                              for j, k in enumerate(modes)} for m in modes}
    per["student"] = {f"math@{k}": [float(rng.random() < 0.5) for _ in range(30)] for k in modes}
    res = {"models": {m: {s: sum(v) / 30 for s, v in t.items()} for m, t in per.items()},
           "greedy_per_prompt": per, "n_eval": {f"math@{k}": 30 for k in modes}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(res))
    f = S.figures(tmp_path)
    a = np.array(per["grpo:math@think-high"]["math@think-high"]) - np.array(per["grpo:math@non-think"]["math@non-think"])
    assert f["diff | math | experts think-high - non-think"]["value"] == pytest.approx(a.mean(), abs=1e-12)
    assert f["diff | math | experts think-high - non-think"]["se"] == pytest.approx(a.std(ddof=1) / math.sqrt(30))
    b = np.array(per["student"]["math@think-max"]) - np.array(per["student"]["math@think-high"])
    assert f["diff | math | student think-max - think-high"]["value"] == pytest.approx(b.mean(), abs=1e-12)


def test_environment_facts_name_the_machine_and_software():
    """What a manifest records to make a run reproducible (CPU, vector ISA, torch/BLAS, threads, seed)."""
    import os

    import torch

    from pipeline.stages import environment_facts

    f = environment_facts(7)
    assert f["seed"] == 7 and f["torch"] == torch.__version__ and f["cpu_count"] == os.cpu_count()
    assert f["cpu_model"] and f["blas"] and f["blas"] != "?"
    assert f["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f["torch_threads"] == torch.get_num_threads() >= 1
    assert "transformers" in f
    json.dumps(f)  # it goes into manifest.json


def test_environment_facts_of_a_stage_without_numerics_do_not_import_torch():
    """The report stage names the software from package metadata, not by importing torch and
    transformers (~2 s of CPU); where torch is loaded anyway, it records everything."""
    import subprocess
    import sys

    import torch
    import transformers

    code = ("import json, sys; from pipeline.stages import environment_facts; "
            "f = environment_facts(7, numerics=False); print(json.dumps([f, 'torch' in sys.modules, "
            "'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    f, torch_loaded, transformers_loaded = json.loads(out.stdout)
    assert not torch_loaded and not transformers_loaded
    assert f["seed"] == 7 and f["torch"] == torch.__version__ and f["transformers"] == transformers.__version__
    assert "blas" not in f
    from pipeline.stages import environment_facts

    assert environment_facts(7, numerics=False)["blas"] != "?"  # torch is loaded in this process
