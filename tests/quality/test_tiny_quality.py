"""The quality bars of the tiny experiment, on the run `make demo` makes (configs/tiny.yaml).

Runs `python -m pipeline run configs/tiny.yaml` as the README's demo command does: on a
fresh checkout that is the whole experiment (~15 minutes on 2 idle cores of an AVX-512
Xeon); after `make demo` every stage is done for its input hash and the run takes seconds.
`POLYMATH_QUALITY_SEED=N` checks the run of seed N instead (`runs/tiny-seedN`).

The claims are made over seeds (docs/seeds.md, `make experiment`): on every domain GRPO
beats the SFT it starts from, the OPD student reaches 0.9 of each expert, its mean over the
domains beats mixed RL's, and the held-out KL to every teacher falls, each by more than 2
standard errors of the mean over seeds; each test first checks that the committed study
still holds its claim. One run is one draw from that spread: floating-point results differ
between CPUs, thread counts and code versions (a one-ulp change at one SFT step gives
another trajectory), so CI's run is another draw. So each bar is asserted here on the one
run with the margin, in that run's own paired SEs, that the study's runs predict for one
more run (`single_run_margin`: the lower bound of a 97.7% prediction interval, Student's t
over the runs; docs/seeds/tiny/seeds.json, the `one-run margin` column of `polymath
report`), at most 2 SE. A bar the runs hold robustly keeps 2 SE; a weaker one (math, whose
GRPO gain of ~+0.06 is about one per-prompt SE of a 128-prompt eval set; the student's
lead over mixed RL, +0.017 to +0.119 a run) is held to what one run can show, and the full
claim stands on the seeds. All comparisons are
paired per prompt (the same 128 held-out prompts, greedy).

- GRPO (issues 5, 21): `grpo:<d>` - its start (`sft:all`, the config's `expert_init`).
- OPD (issue 6): one head resident, one head load per teacher in every step, the held-out
  KL per prompt (the student's samples of the same 128 held-out prompts with the same
  seed, each prompt's mean over its response tokens) lower after training for every
  teacher; the student's greedy score at least STUDENT_FRACTION of each expert's, as the
  paired difference student - STUDENT_FRACTION x expert. The per-prompt mean, not the mean
  over all tokens: KL grows with the position in the response (issue-6 note).
- Unification (issue 21): the student's mean over the domains above mixed RL's (each
  domain's paired SE, combined).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from pipeline.config import load_config
from pipeline.evaluate import paired_difference, paired_difference_of_domain_means
from pipeline.report import heldout_kl_change
from pipeline.seeds import seed_run_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
CFG_SEED = load_config(ROOT / "configs" / "tiny.yaml", check_files=False).seed
# POLYMATH_QUALITY_SEED=N checks the run of another seed (runs/tiny-seedN, as `run --seeds` names it)
SEED = int(os.environ.get("POLYMATH_QUALITY_SEED", CFG_SEED))
RUN = ROOT / seed_run_dir("runs/tiny", CFG_SEED, SEED)
SEED_ARGS = [] if SEED == CFG_SEED else [f"seed={SEED}", f"run_dir={seed_run_dir('runs/tiny', CFG_SEED, SEED)}"]
STUDENT_FRACTION = 0.9  # issue 21's bar
STUDY = json.loads((ROOT / "docs" / "seeds" / "tiny" / "seeds.json").read_text())  # `make experiment`'s seeds report


def margin(figure: str) -> float:
    """The one-run margin (in this run's paired SEs) for a claim of the seeds study; the claim
    itself must hold over the study's runs (mean beyond 2 SE, no run significantly against)."""
    row = STUDY["figures"][figure]
    assert len(row["per_seed"]) >= 3, f"{figure}: the study has {len(row['per_seed'])} seeds"
    assert row["holds"], f"{figure}: the seeds study does not hold this claim (docs/seeds.md)"
    return row["single_run_margin"]
DOMAINS = ("code", "ifeval", "math", "tool")
CFG = load_config(ROOT / "configs" / "tiny.yaml", check_files=False)  # expert_start(d): the SFT each expert starts from

pytestmark = [pytest.mark.slow, pytest.mark.quality]


# sft:all runs on one torch thread, as configs/tiny.yaml says: one and two threads give other
# floating-point sums from step 8 on (measured: loss 3.6301985 against 3.6301987) and so
# another trajectory of the whole experiment, and two threads beside the other pytest worker
# oversubscribe the cores. Resources are outside the stage hashes, so the override is kept
# only to hold this run to one thread even under a config that says otherwise.
RESOURCES = ["resources.stages.sft:all.num_cpus=1"]


@pytest.fixture(scope="module")
def run():
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "configs/tiny.yaml", *RESOURCES, *SEED_ARGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=5400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((RUN / "eval" / "results.json").read_text())
    opd = json.loads((RUN / "opd" / "manifest.json").read_text())["metrics"]
    return results, opd, proc.stdout


def _rerun():
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "configs/tiny.yaml", *RESOURCES, *SEED_ARGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(5400)
def test_every_stage_done_every_model_scored_and_a_rerun_skips_everything(run):
    """The end-to-end checks (formerly a separate shortened run of the same graph): the eval
    table covers every model and domain, the report is written and named on stdout, and a
    second `pipeline run` finds every stage done for its input hash and runs nothing."""
    results, opd, stdout = run
    models = results["models"]
    expected = {"base", "student", "mixed_rl", "sft:all"} | {f"grpo:{d}" for d in DOMAINS} | {CFG.expert_start(d) for d in DOMAINS}
    assert expected <= set(models), sorted(models)
    for name, scores in models.items():
        assert set(scores) == set(DOMAINS), name
        assert all(0.0 <= v <= 1.0 for v in scores.values()), (name, scores)
    rounds = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["opd"]["rounds"]
    assert len(opd["kl_per_teacher"]) == rounds  # one entry per round
    assert opd["cache_bytes_per_token"] > 0
    report = RUN / "report" / "report.md"
    assert report.is_file() and "| student |" in report.read_text().replace("|student|", "| student |")
    assert "report: " in stdout and stdout.split("report: ")[1].split()[0].endswith("report/report.md"), stdout[-2000:]
    second = _rerun()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "running" not in second.stdout.lower().replace("not running", ""), second.stdout[-3000:]


@pytest.mark.timeout(5400)
def test_grpo_beats_sft_by_two_paired_standard_errors_on_every_domain(run):
    results, _, _ = run
    per = results["greedy_per_prompt"]
    rows = {}
    for d in DOMAINS:
        sft, grpo = per[CFG.expert_start(d)][d], per[f"grpo:{d}"][d]
        assert len(sft) == len(grpo) == results["n_eval"][d] >= 100, d
        rows[d] = paired_difference(sft, grpo)
    need = {d: margin(f"diff | {d} | grpo:{d} - {CFG.expert_start(d)}") for d in DOMAINS}
    table = {d: f"{diff:+.3f} +- {se:.3f} (needs > {need[d]:+.1f} SE)" for d, (diff, se) in rows.items()}
    assert all(diff > need[d] * se for d, (diff, se) in rows.items()), f"grpo - its start: {table}"
    # every gain holds over seeds (margin() checks); a run shows it above 0 SE on all but math (docs/seeds.md)
    assert all(m > 0 for d, m in need.items() if d != "math"), need


@pytest.mark.timeout(5400)
def test_opd_heads_heldout_kl_and_student_fraction(run):
    results, opd, _ = run
    assert opd["max_resident_heads"] == 1
    assert opd["head_loads_per_step"] == opd["teachers_per_step"]
    assert all(n == len(DOMAINS) for n in opd["teachers_per_step"])  # every step mixes all teachers
    held = opd["kl_heldout_per_prompt_mean"]
    assert held[0]["after_round"] == 0 and held[-1]["after_round"] == len(opd["kl_per_teacher"])
    change = heldout_kl_change(RUN / "opd" / "heldout_kl.jsonl")
    assert set(change) == {f"grpo:{d}" for d in DOMAINS}
    table = {t: f"{a:.3f} -> {b:.3f} ({diff:+.3f} +- {se:.3f})" for t, (a, b, diff, se) in change.items()}
    need = {t: margin(f"kl | {t} | after - before") for t in change}
    assert all(diff < -need[t] * se for t, (_, _, diff, se) in change.items()), (table, need)
    per = results["greedy_per_prompt"]
    rows = {d: paired_difference([STUDENT_FRACTION * x for x in per[f"grpo:{d}"][d]], per["student"][d]) for d in DOMAINS}
    need = {d: margin(f"diff | {d} | student - {STUDENT_FRACTION} x grpo:{d}") for d in DOMAINS}
    table = {d: f"{diff:+.3f} +- {se:.3f} (needs > {need[d]:+.1f} SE)" for d, (diff, se) in rows.items()}
    assert all(diff > need[d] * se for d, (diff, se) in rows.items()), f"student - {STUDENT_FRACTION} x expert: {table}"


@pytest.mark.timeout(5400)
def test_student_mean_beats_mixed_rl(run):
    """Over the study's runs the student's mean leads mixed RL's by 2 SE of the mean (docs/seeds.md:
    +0.057 +- 0.009 over 9 runs, every run above 0); one run is asserted with the margin their
    spread (+0.017 to +0.119 a run, each with a paired SE of ~0.014) predicts for one more run."""
    results, _, _ = run
    per = results["greedy_per_prompt"]
    diff, se = paired_difference_of_domain_means({d: per["mixed_rl"][d] for d in DOMAINS},
                                                 {d: per["student"][d] for d in DOMAINS})
    need = margin(f"diff | mean of {len(DOMAINS)} | student - mixed_rl")
    assert diff > need * se, f"student - mixed_rl (mean of {len(DOMAINS)}) {diff:+.4f} +- {se:.4f}, needs > {need} SE"
