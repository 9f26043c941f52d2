"""Seeds as an axis of an experiment: one run directory per seed, and figures over seeds.

`polymath run CONFIG --seeds 0,1,2` (or `seeds: [0, 1, 2]` in the config) runs the graph
once per seed. The config's own `seed` keeps the config's `run_dir`, so the one-seed run
that `make demo` and `tests/quality` make is one of the study's seeds; every other seed
runs in `<run_dir>-seed<N>`. The seed reaches every stage (the tiny base model's init, the
synthetic data draw, data order, sampling), so no stage output is shared between seeds.

`polymath report RUN_DIR RUN_DIR ...` aggregates finished runs: `figures(run)` reads the
figures one run reports (greedy scores, paired differences with their per-prompt standard
errors, student / expert ratios, the held-out KL change, mode comparisons) and
`aggregate` gives each figure per seed and its mean over seeds with standard errors:

- `se_seeds`: the sample standard deviation of the per-seed values / sqrt(n). Each seed
  draws a new trajectory *and* new eval prompts, so this holds both sources of variation.
- `se_prompts`: sqrt(sum of the per-seed paired SEs squared) / n, what the mean's SE would
  be if only the choice of prompts varied.
- `se`: the larger of the two. With three seeds the between-seed standard deviation rests
  on two degrees of freedom and can come out small by chance; the prompt-level SE is a
  floor that is known from 128 prompts per seed.

A claim "b above a" holds over seeds when the mean is above 2 `se` and no seed is below
its own -2 paired SE (no seed contradicts it significantly).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

MARGIN_SE = 2.0
STUDENT_FRACTION = 0.9  # issue 21's bar: the student reaches this fraction of each expert


def seed_run_dir(run_dir: str | os.PathLike, config_seed: int, seed: int) -> str:
    """The run directory of `seed` in an experiment whose config says `run_dir` and `seed`."""
    return str(run_dir) if seed == config_seed else f"{run_dir}-seed{seed}"


def parse_seeds(text: str) -> list[int]:
    """`0,1,2`, `0 1 2` or `0-2` -> [0, 1, 2]; a clear ValueError for anything else."""
    seeds: list[int] = []
    for part in text.replace(",", " ").split():
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            values = range(int(lo), int(hi) + 1) if sep else [int(part)]
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is not a seed (use e.g. 0,1,2 or 0-2)") from None
        if sep and int(hi) < int(lo):
            raise ValueError(f"--seeds: empty range {part!r}")
        seeds += [s for s in values if s not in seeds]
    if not seeds:
        raise ValueError("--seeds: no seed given")
    if any(s < 0 for s in seeds):
        raise ValueError(f"--seeds: seeds are non-negative integers, got {seeds}")
    return seeds


# ------------------------------------------------------------------------------ one run


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _se_of_mean(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def figures(run_dir: str | os.PathLike) -> dict[str, dict]:
    """name -> {"value", "se" (paired per-prompt SE, or None), "kind"} for one finished run.

    kinds: `score` (greedy mean), `diff` (paired difference, b - a), `ratio` (b / a),
    `kl` (held-out KL after - before, paired), `tokens` (an output-token ratio)."""
    from pipeline.evaluate import paired_difference, paired_difference_of_domain_means
    from pipeline.report import comparison_rows, heldout_kl_change, load_results

    run = Path(run_dir)
    results = load_results(run / "eval" / "results.json")
    per = results.get("greedy_per_prompt") or {}
    out: dict[str, dict] = {}
    for model, table in results["models"].items():
        for s, v in table.items():
            xs = (per.get(model) or {}).get(s)
            out[f"score | {model} | {s}"] = {"value": v, "se": _se_of_mean(xs) if xs and len(xs) > 1 else None,
                                             "kind": "score"}
    for row in comparison_rows(results):
        out[f"diff | {row['where']} | {row['second']} - {row['first']}"] = {
            "value": row["diff"], "se": row["se"], "kind": "diff"}
        if row["first"].startswith("grpo:") and row["second"] == "student" and row["mean_first"] > 0:
            out[f"ratio | {row['where']} | student / {row['first']}"] = {
                "value": row["mean_second"] / row["mean_first"], "se": None, "kind": "ratio"}
            # the bar "student >= STUDENT_FRACTION x expert" as a paired difference, with its SE
            a = [STUDENT_FRACTION * x for x in per[row["first"]][row["where"]]]
            diff, se = paired_difference(a, per["student"][row["where"]])
            out[f"diff | {row['where']} | student - {STUDENT_FRACTION} x {row['first']}"] = {
                "value": diff, "se": se, "kind": "diff"}
    # modes: every model's mode comparisons, and the student in each mode against that mode's expert
    from engine.modes import split_route
    from pipeline.report_modes import mode_comparisons, mode_sets

    for d, sets in mode_sets(results).items():
        for c in mode_comparisons(results, d):
            for key in ("think-high - non-think", "think-max - think-high"):
                if key in c:
                    out[f"diff | {d} | {c['model']} {key}"] = {"value": c[key][0], "se": c[key][1], "kind": "diff"}
            if "token_ratio" in c:
                out[f"tokens | {d} | {c['model']} think-max / think-high"] = {
                    "value": c["token_ratio"], "se": None, "kind": "tokens"}
        experts = {split_route(s)[1]: (per.get(f"grpo:{s}") or {}).get(s) for s in sets}  # each in its own mode
        for hi, lo in (("think-high", "non-think"), ("think-max", "think-high")):
            a, b = experts.get(lo), experts.get(hi)
            if a and b and len(a) == len(b) > 1:
                diff, se = paired_difference(a, b)
                out[f"diff | {d} | experts {hi} - {lo}"] = {"value": diff, "se": se, "kind": "diff"}
        for s in sets:
            a, b = (per.get(f"grpo:{s}") or {}).get(s), (per.get("student") or {}).get(s)
            if a and b and len(a) == len(b) > 1:
                diff, se = paired_difference(a, b)
                out[f"diff | {s} | student - grpo:{s}"] = {"value": diff, "se": se, "kind": "diff"}
                if _mean(a) > 0:
                    out[f"ratio | {s} | student / grpo:{s}"] = {"value": _mean(b) / _mean(a), "se": None,
                                                                "kind": "ratio"}
    # experts (each in its own mode) against mixed RL, where the experiment has one (tiny): the ceiling of OPD
    domains = sorted(results.get("n_eval", {}))
    if domains and all((per.get(f"grpo:{d}") or {}).get(d) and (per.get("mixed_rl") or {}).get(d) for d in domains):
        diff, se = paired_difference_of_domain_means({d: per["mixed_rl"][d] for d in domains},
                                                     {d: per[f"grpo:{d}"][d] for d in domains})
        out[f"diff | mean of {len(domains)} | experts - mixed_rl"] = {"value": diff, "se": se, "kind": "diff"}
    for teacher, (before, after, diff, se) in heldout_kl_change(run / "opd" / "heldout_kl.jsonl").items():
        out[f"kl | {teacher} | after - before"] = {"value": diff, "se": se, "kind": "kl"}
        out[f"kl | {teacher} | before"] = {"value": before, "se": None, "kind": "kl_level"}
    return out


def run_facts(run_dir: str | os.PathLike) -> dict:
    """The seed and the machine a run's stages ran on (from the eval or prepare manifest)."""
    run = Path(run_dir)
    facts: dict = {}
    for stage in ("eval", "opd", "prepare"):
        p = run / stage / "manifest.json"
        if p.is_file():
            try:
                env = json.loads(p.read_text()).get("environment") or {}
            except json.JSONDecodeError:
                continue
            if env:
                facts = env
                break
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            facts = {**facts, "seed": (yaml.safe_load(cfg.read_text()) or {}).get("seed")}
        except yaml.YAMLError:
            pass
    return facts


# ------------------------------------------------------------------------------ over seeds


def aggregate(runs: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """{run label: figures(run)} -> {figure: per-seed values, mean, SEs, verdict}; only the
    figures every run has."""
    labels = list(runs)
    common = [k for k in runs[labels[0]] if all(k in runs[r] for r in labels[1:])]
    out = {}
    for name in common:
        vals = [runs[r][name]["value"] for r in labels]
        ses = [runs[r][name]["se"] for r in labels]
        n = len(vals)
        mean = _mean(vals)
        se_seeds = statistics.stdev(vals) / math.sqrt(n) if n > 1 else float("nan")
        se_prompts = math.sqrt(sum(s * s for s in ses)) / n if all(s is not None for s in ses) else None
        se = max(x for x in (se_seeds, se_prompts) if x is not None and not math.isnan(x)) if n > 1 or se_prompts \
            else float("nan")
        row = {"kind": runs[labels[0]][name]["kind"], "per_seed": dict(zip(labels, vals)),
               "per_seed_se": dict(zip(labels, ses)), "mean": mean, "se_seeds": se_seeds,
               "se_prompts": se_prompts, "se": se, "sd_seeds": statistics.stdev(vals) if n > 1 else float("nan"),
               "min": min(vals), "max": max(vals)}
        if row["kind"] in ("diff", "kl"):
            sign = -1.0 if row["kind"] == "kl" else 1.0  # a KL change is claimed negative
            contradicted = [r for r, v, s in zip(labels, vals, ses) if s and sign * v < -MARGIN_SE * s]
            row["z"] = mean / se if se and se > 0 else float("nan")
            row["holds"] = sign * mean > MARGIN_SE * se and not contradicted
            row["contradicted_by"] = contradicted
            known = n > 1 and all(s is not None for s in ses)
            row["single_run_margin"] = single_run_margin([sign * v for v in vals], ses) if known else None
        out[name] = row
    return out


ONE_SIDED = 0.5 * (1 + math.erf(MARGIN_SE / math.sqrt(2)))  # P(Z < 2) = 0.97725: "2 SE" of a normal


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T < t) for Student's t with `df` degrees of freedom."""
    t2 = t * t
    if t2 < df:  # the argument that keeps its precision: x = df / (df + t^2) rounds to 1 near t = 0
        tail = 0.5 * (1.0 - _betainc(0.5, df / 2.0, t2 / (df + t2)))
    else:
        tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t2))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T < t) = p (bisection on the CDF; |error| < 1e-10)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"student_t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > p:
        lo *= 2.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    while hi - lo > 1e-10:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def prediction_factor(n: int, p: float = ONE_SIDED) -> float:
    """k such that one more draw from a normal whose mean and SD are estimated from n draws
    is above mean - k * SD with probability p: the t quantile with n - 1 degrees of freedom
    times sqrt(1 + 1/n) (the new draw's own spread and the estimated mean's). With 4 runs
    k = 3.70, with 10 runs 2.49; the normal's 2 is the limit of many runs."""
    if n < 2:
        raise ValueError("a prediction from the spread needs at least two runs")
    return student_t_quantile(p, n - 1) * math.sqrt(1.0 + 1.0 / n)


def single_run_margin(values: list[float], ses: list[float], cap: float = MARGIN_SE) -> float:
    """The margin m, in a run's own paired SEs, such that one more run (another seed, another
    CPU) has `diff > m * SE` with ~97.7% probability, from the measured runs (`values` signed
    so that the claim is "positive"). One more run is predicted from the n measured ones as
    a normal with their mean and spread, both estimated: its lower 97.7% prediction bound is
    mean - k * sigma with k = `prediction_factor(n)` (Student's t with n - 1 degrees of
    freedom, times sqrt(1 + 1/n)), not the normal's 2, which would take the spread of a
    few runs as known and put ~1 run in 16 below the bound with 4 runs (the stop-41 CI run,
    student - mixed RL at 1.3 SE against a 2-SE margin from 4 seeds, was such a run).
    Two models of how a run's figure spreads, the larger margin of the two:

    - additive: the difference spreads as sigma = max(SD of the per-seed values, RMS of their
      paired SEs) around the mean, its SE is about the RMS SE: m = (mean - k sigma) / RMS SE;
    - scaled (a KL change whose size and SE grow together): z = diff / SE spreads with
      SD max(SD of the per-seed z, 1) around the mean z: m = mean z - k SD.

    Rounded down to a half, capped at `cap`. A bar that the runs hold robustly keeps `cap`
    (2 SE); a weaker one is asserted per run with the margin its spread supports, and its
    full claim is made over seeds (`make experiment`)."""
    if len(values) < 2 or len(ses) != len(values):
        raise ValueError("a margin from the spread needs at least two runs, each with its SE")
    k = prediction_factor(len(values))
    se_rms = math.sqrt(sum(s * s for s in ses) / len(ses))
    edge = statistics.mean(values) - k * max(statistics.stdev(values), se_rms)
    if se_rms == 0:
        return cap if edge > 0 else 0.0
    margins = [edge / se_rms]
    if all(s > 0 for s in ses):
        zs = [v / s for v, s in zip(values, ses)]
        margins.append(statistics.mean(zs) - k * max(statistics.stdev(zs), 1.0))
    return min(cap, math.floor(2 * max(margins)) / 2)


def _cell(v, se=None, digits=3, signed=True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if se is None:
        return f"{v:.{digits}f}"
    return f"{v:+.{digits}f} ± {se:.{digits}f}" if signed else f"{v:.{digits}f} ± {se:.{digits}f}"


def score_table(agg: dict[str, dict]) -> list[str]:
    """Models x eval sets, greedy, each cell the mean ± SE over seeds (markdown lines)."""
    from pipeline.report import _model_rank

    cells = {}
    for name, r in agg.items():
        if r["kind"] == "score":
            _, model, s = name.split(" | ")
            cells.setdefault(model, {})[s] = r
    if not cells:
        return []
    sets = list(dict.fromkeys(s for t in cells.values() for s in t))
    lines = ["## Models x domains (greedy, mean ± SE over seeds)", "",
             "| model | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for model in sorted(cells, key=_model_rank):
        lines.append(f"| {model} | " + " | ".join(
            _cell(cells[model][s]["mean"], cells[model][s]["se"], signed=False) if s in cells[model] else "-"
            for s in sets) + " |")
    return lines


def format_aggregate(agg: dict[str, dict], labels: list[str], facts: dict[str, dict]) -> str:
    """The seeds report (markdown): the machine, then one table per figure kind."""
    lines = [f"# Polymath over {len(labels)} seeds", ""]
    keys = ("cpu_model", "cpu_capability", "torch", "blas", "torch_threads")
    machines = {json.dumps({k: f.get(k) for k in keys}, sort_keys=True) for f in facts.values()}
    lines += ["| run | seed | CPU | vector ISA | torch | BLAS | torch threads |", "|---|---:|---|---|---|---|---:|"]
    for label in labels:
        f = facts.get(label, {})
        lines.append(f"| {label} | {f.get('seed', '-')} | " + " | ".join(str(f.get(k, "-")) for k in keys) + " |")
    if len(machines) > 1:
        lines += ["", "The runs did not all run on the same machine and software (above)."]
    lines += ["", "Mean over seeds ± SE, where SE = max(SE over seeds, per-prompt SE of the mean) (pipeline/seeds.py); "
              "a difference holds when the mean is beyond 2 SE and no seed is significantly (2 of its own paired SE) "
              "on the other side. One-run margin: the margin in a run's own paired SEs that another run clears with "
              "~97.7% probability (the larger of (mean - 2 sigma) / RMS SE, sigma = max(SD over seeds, RMS SE), and mean z - 2 SD of z, "
              "SD at least 1; at most 2; "
              "`single_run_margin`); "
              "tests/quality asserts each bar with it on the one run it makes.", ""]
    lines += score_table(agg) + [""]
    head = " | ".join(labels)
    groups = (("score", "Greedy scores (per seed, mean ± SE)"),
              ("diff", "Paired differences (b - a, greedy, per-prompt paired within a seed)"),
              ("ratio", "Ratios (student / expert)"),
              ("kl", "Held-out KL per prompt, after - before OPD"),
              ("kl_level", "Held-out KL before OPD"),
              ("tokens", "Output-token ratios"))
    for kind, title in groups:
        rows = {k: v for k, v in agg.items() if v["kind"] == kind}
        if not rows:
            continue
        verdict = kind in ("diff", "kl")
        lines += [f"## {title}", "", f"| figure | {head} | mean ± SE | SE seeds | SE prompts |"
                  + (" z | holds | one-run margin (SE) |" if verdict else ""),
                  "|---|" + "---:|" * (len(labels) + 3) + ("---:|---|---:|" if verdict else "")]
        for name, r in rows.items():
            label = name.split(" | ", 1)[1].replace(" | ", ": ")
            seeds = " | ".join(_cell(r["per_seed"][x]) if r["per_seed_se"][x] is None or kind == "score"
                               else f"{r['per_seed'][x]:+.3f} ({r['per_seed_se'][x]:.3f})" for x in labels)
            line = (f"| {label} | {seeds} | {_cell(r['mean'], r['se'], signed=verdict)} | {_cell(r['se_seeds'])} | "
                    f"{_cell(r['se_prompts'])} |")
            if verdict:
                line += f" {r['z']:+.1f} | {'yes' if r['holds'] else 'no'}" + \
                    (f" (contradicted by {', '.join(r['contradicted_by'])})" if r["contradicted_by"] else "") + \
                    f" | {_cell(r.get('single_run_margin'), digits=1)} |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def write_seeds_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> Path:
    """Aggregate finished runs into `<out_dir>/report.md` and `seeds.json` (default: the first
    run directory with `-seeds` appended, its `-seed<N>` suffix removed)."""
    from engine.atomic import atomic_write_json, atomic_write_text

    paths = [Path(p) for p in run_dirs]
    missing = [str(p) for p in paths if not (p / "eval" / "results.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no eval/results.json in {', '.join(missing)}: those runs have not finished")
    labels = [p.name for p in paths]
    if len(set(labels)) != len(labels):
        labels = [str(p) for p in paths]
    per_run = {label: figures(p) for label, p in zip(labels, paths)}
    facts = {label: run_facts(p) for label, p in zip(labels, paths)}
    agg = aggregate(per_run)
    base = paths[0].name.split("-seed")[0]
    out = Path(out_dir) if out_dir else paths[0].parent / f"{base}-seeds"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "seeds.json", {"runs": {label: str(p) for label, p in zip(labels, paths)},
                                           "facts": facts, "figures": agg})
    atomic_write_text(out / "report.md", format_aggregate(agg, labels, facts))
    return out / "report.md"
