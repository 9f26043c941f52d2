"""The experiment report: `report/report.md` plus PNG plots, built from a run directory.

Reads only files the stages wrote (`eval/results.json`, `<stage>/manifest.json`,
`<stage>/metrics.jsonl`), never the config schema, so `python -m pipeline report RUN_DIR`
works on any run directory, finished or not. Sections: the models x domains table
(greedy, then sampled pass@1), training curves per stage (whichever of loss / reward /
KL / ... each stage logged), OPD per-teacher KL across rounds, and stage timings.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from engine.atomic import atomic_write_text
from pipeline.attempts import is_set_aside
from pipeline.plotting import pyplot, save_png

# Curves are plotted for numeric metric keys matching these, in this order of preference.
CURVE_PATTERNS = ("loss", "reward", "kl", "score", "acc", "entropy", "clip", "grad_norm", "len")
MAX_PANELS = 6
MODEL_ORDER = ("base", "sft:", "grpo:", "sft:all", "mixed_rl", "student")


def load_results(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        results = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"cannot read eval results {p}: {exc}") from exc
    if not isinstance(results.get("models"), dict):
        raise RuntimeError(f"{p}: no 'models' table (expected {{'models': {{model: {{domain: score}}}}}})")
    return results


def _model_rank(name: str) -> tuple[int, str]:
    if name == "sft:all":
        return MODEL_ORDER.index("sft:all"), name
    for i, prefix in enumerate(MODEL_ORDER):
        if name == prefix or (prefix.endswith(":") and name.startswith(prefix)):
            return i, name
    return len(MODEL_ORDER), name


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def format_results_table(results: dict, section: str = "models") -> str:
    """Markdown table, one row per model, one column per domain plus the mean; the best
    score of each column in bold."""
    table = results.get(section) or {}
    if not table:
        return f"(no {section} results)"
    models = sorted(table, key=_model_rank)
    domains = list(dict.fromkeys(d for m in models for d in table[m]))
    rows = {m: [table[m].get(d) for d in domains] for m in models}
    if len(domains) > 1:
        for m, vals in rows.items():
            nums = [v for v in vals if _is_num(v)]
            vals.append(sum(nums) / len(nums) if len(nums) == len(domains) else None)
    cols = domains + ["mean"] if len(domains) > 1 else domains
    best = []
    for j in range(len(cols)):
        column = {rows[m][j] for m in models if _is_num(rows[m][j])}
        best.append(max(column) if len(column) > 1 else None)  # no bold when all are equal
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in models:
        cells = [f"**{_fmt(v)}**" if v is not None and v == best[j] else _fmt(v) for j, v in enumerate(rows[m])]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ run dir


def read_manifests(run_dir: Path) -> dict[str, dict]:
    """stage name -> manifest, in the order the stages started."""
    found = {}
    for p in sorted(run_dir.glob("*/manifest.json")):
        if is_set_aside(p.parent.name):  # an earlier attempt's work kept beside its stage
            continue
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        found[m.get("stage", p.parent.name)] = m
    return dict(sorted(found.items(), key=lambda kv: (kv[1].get("started") or math.inf, kv[0])))


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a killed writer) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_keys(rows: list[dict]) -> list[str]:
    """Numeric keys worth a curve, most wanted first, at most MAX_PANELS."""
    keys = {k for r in rows for k, v in r.items() if _is_num(v) and k not in ("step", "epoch", "time")}

    def rank(k: str) -> tuple[int, str]:
        low = k.lower()
        hits = [i for i, pat in enumerate(CURVE_PATTERNS) if pat in low]
        return (hits[0] if hits else len(CURVE_PATTERNS), k)

    wanted = sorted((k for k in keys if rank(k)[0] < len(CURVE_PATTERNS)), key=rank)
    return wanted[:MAX_PANELS]


def plot_curves(title: str, rows: list[dict], keys: list[str], out: Path) -> None:
    plt = pyplot()
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if _is_num(r.get(key))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, out)
    plt.close(fig)


def plot_opd_kl(kl_per_teacher: list[dict], out: Path) -> None:
    plt = pyplot()
    teachers = list(dict.fromkeys(t for r in kl_per_teacher for t in r))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for t in teachers:
        pts = [(i + 1, r[t]) for i, r in enumerate(kl_per_teacher) if _is_num(r.get(t))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    ax.set_xlabel("OPD round")
    ax.set_ylabel("KL(student || teacher)")
    ax.set_xticks(range(1, len(kl_per_teacher) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("OPD: KL to each teacher on its own domain")
    save_png(fig, out)
    plt.close(fig)


# ------------------------------------------------------------------------------ sections


def _results_section(run_dir: Path) -> list[str]:
    path = run_dir / "eval" / "results.json"
    if not path.is_file():
        return ["## Scores", "", "No `eval/results.json` yet: the eval stage has not finished.", ""]
    res = load_results(path)
    s = res.get("settings", {})
    out = ["## Scores", "", "Greedy decoding (temperature 0), mean verifier score on each domain's "
           "held-out eval set; the best of each column in bold.", "", format_results_table(res, "models"), ""]
    if res.get("sampled"):
        out += [f"Sampled pass@1 over k={s.get('samples', '?')} samples at temperature "
                f"{s.get('temperature', '?')}:", "", format_results_table(res, "sampled"), ""]
    if res.get("pass_at_k"):
        out += [f"pass@{s.get('samples', 'k')} (a sample counts when its score is 1):", "",
                format_results_table(res, "pass_at_k"), ""]
    if res.get("n_eval"):
        out += ["Eval prompts per domain: " + ", ".join(f"{d} {n}" for d, n in res["n_eval"].items()), ""]
    out += paired_comparisons(res)
    return out


def _comparison_row(row: dict) -> str:
    ma, mb, mean, se = row["mean_first"], row["mean_second"], row["diff"], row["se"]
    ratio = f"{mb / ma:.2f}" if ma > 0 else "-"
    return (f"| {row['where']} | {row['second']} vs {row['first']} | {ma:.3f} | {mb:.3f} | {mean:+.3f} | {se:.3f} | "
            f"{mean / se if se > 0 else float('nan'):+.1f} | {ratio} |")


def comparison_rows(res: dict) -> list[dict]:
    """grpo:<d> - its SFT start (sft:<d>, or sft:all with expert_init 'sft:all'), student - grpo:<d>
    and student - sft:all on each domain's own prompts, and student - mixed_rl over the mean of
    the domains, greedy: {where, first, second, mean_first, mean_second, diff (second - first),
    se (paired)}."""
    from pipeline.evaluate import paired_difference, paired_difference_of_domain_means

    per = res.get("greedy_per_prompt") or {}
    rows = []
    for d in sorted(res.get("n_eval", {})):
        start = f"sft:{d}" if f"sft:{d}" in per else "sft:all"  # the expert's start (expert_init)
        for a, b in dict.fromkeys(((start, f"grpo:{d}"), (f"grpo:{d}", "student"), ("sft:all", "student"))):
            sa, sb = per.get(a, {}).get(d), per.get(b, {}).get(d)
            if not sa or not sb or len(sa) != len(sb) or len(sa) < 2:
                continue
            diff, se = paired_difference(sa, sb)
            rows.append({"where": d, "first": a, "second": b, "mean_first": sum(sa) / len(sa),
                         "mean_second": sum(sb) / len(sb), "diff": diff, "se": se})
    domains = sorted(res.get("n_eval", {}))
    student, mixed = per.get("student", {}), per.get("mixed_rl", {})
    if domains and all(len(student.get(d) or []) >= 2 and len(student[d]) == len(mixed.get(d) or []) for d in domains):
        ma, mb = (sum(sum(m[d]) / len(m[d]) for d in domains) / len(domains) for m in (mixed, student))
        diff, se = paired_difference_of_domain_means({d: mixed[d] for d in domains}, {d: student[d] for d in domains})
        rows.append({"where": f"mean of {len(domains)}", "first": "mixed_rl", "second": "student",
                     "mean_first": ma, "mean_second": mb, "diff": diff, "se": se})
    return rows


def paired_comparisons(res: dict) -> list[str]:
    """The report's lines for `comparison_rows`, with the paired standard error (a gap under
    ~2 SE is not distinguishable from noise)."""
    rows = [_comparison_row(r) for r in comparison_rows(res)]
    if not rows:
        return []
    return ["Paired comparisons on each domain's held-out prompts (greedy; SE = standard error of the "
            "per-prompt differences; |diff/SE| < 2 is within noise):", "",
            "| domain | comparison | first | second | diff | SE | diff/SE | second/first |",
            "|---|---|---:|---:|---:|---:|---:|---:|", *rows, ""]


def _curves_section(run_dir: Path, manifests: dict[str, dict], plots: Path) -> list[str]:
    out = ["## Training curves", ""]
    any_plot = False
    for stage, m in manifests.items():
        stage_dir = run_dir / stage.replace(":", "-")
        rows = read_metrics(stage_dir / "metrics.jsonl")
        keys = curve_keys(rows)
        if not keys:
            continue
        png = plots / f"{stage.replace(':', '-')}.png"
        plot_curves(f"{stage} ({len(rows)} steps)", rows, keys, png)
        last = {k: rows[-1][k] for k in keys if _is_num(rows[-1].get(k))}
        out += [f"### {stage}", "", f"![{stage}](plots/{png.name})", "",
                "Last step: " + ", ".join(f"{k} {_fmt(v)}" for k, v in last.items()), ""]
        any_plot = True
    return out if any_plot else out + ["No stage has logged metrics yet.", ""]


def _opd_section(manifests: dict[str, dict], plots: Path, run_dir: Path) -> list[str]:
    kl = ((manifests.get("opd") or {}).get("metrics") or {}).get("kl_per_teacher")
    if not isinstance(kl, list) or not kl or not all(isinstance(r, dict) for r in kl):
        return []
    plot_opd_kl(kl, plots / "opd-kl-per-teacher.png")
    teachers = list(dict.fromkeys(t for r in kl for t in r))
    lines = ["## OPD: per-teacher KL across rounds", "", "![opd kl](plots/opd-kl-per-teacher.png)", "",
             "| round | " + " | ".join(teachers) + " |", "|---|" + "---:|" * len(teachers)]
    lines += [f"| {i} | " + " | ".join(_fmt(r.get(t)) for t in teachers) + " |" for i, r in enumerate(kl, 1)]
    lines.append("")
    metrics = (manifests.get("opd") or {}).get("metrics") or {}
    for key, what in (("kl_heldout_per_teacher", "mean over all response tokens"),
                      ("kl_heldout_per_prompt_mean", "mean over prompts of each prompt's token mean")):
        held = metrics.get(key)
        if not (isinstance(held, list) and held and all(isinstance(r, dict) for r in held)):
            continue
        lines += [f"Held-out KL ({what}): the student's samples of the same held-out prompts with the same "
                  "seed, before training (after round 0) and after the rounds shown:", "",
                  "| after round | " + " | ".join(teachers) + " |", "|---|" + "---:|" * len(teachers)]
        lines += [f"| {r.get('after_round', '?')} | " + " | ".join(_fmt(r.get(t)) for t in teachers) + " |"
                  for r in held]
        lines.append("")
    return lines + _heldout_paired_lines(run_dir / "opd" / "heldout_kl.jsonl")


def heldout_kl_change(path: Path) -> dict[str, tuple[float, float, float, float]]:
    """{teacher: (first, last, last - first, paired SE)} of the per-prompt held-out KL in
    an OPD stage's `heldout_kl.jsonl` (first and last measurement, paired by prompt)."""
    from pipeline.evaluate import paired_difference

    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if len(rows) < 2:
        return {}
    out = {}
    for t in (k for k in rows[0] if k != "after_round"):
        a, b = rows[0].get(t), rows[-1].get(t)
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) >= 2:
            diff, se = paired_difference(a, b)
            out[t] = (sum(a) / len(a), sum(b) / len(b), diff, se)
    return out


def _heldout_paired_lines(path: Path) -> list[str]:
    change = heldout_kl_change(path)
    if not change:
        return []
    lines = ["Held-out KL per prompt, last measurement vs before training (paired by prompt):", "",
             "| teacher | before | after | diff | SE | diff/SE |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {t} | {a:.3f} | {b:.3f} | {d:+.3f} | {se:.3f} | {d / se if se > 0 else float('nan'):+.1f} |"
              for t, (a, b, d, se) in change.items()]
    return lines + [""]


def _timings_section(manifests: dict[str, dict]) -> list[str]:
    lines = ["## Stage timings", "", "| stage | status | seconds | attempts |", "|---|---|---:|---:|"]
    total = 0.0
    for stage, m in manifests.items():
        secs = m.get("seconds")
        total += secs if _is_num(secs) else 0.0
        lines.append(f"| {stage} | {m.get('status', '?')} | {f'{secs:.1f}' if _is_num(secs) else '-'} | "
                     f"{m.get('attempt', '-')} |")
    return lines + ["", f"Total stage time: {total:.1f} s ({total / 60:.1f} min).", ""]


def _sandbox_section(run_dir: Path) -> list[str]:
    """A warning when the run's code completions ran outside the sandbox (`sandbox: unsafe-local`)."""
    cfg = run_dir / "config.yaml"
    try:
        import yaml

        mode = (yaml.safe_load(cfg.read_text()) or {}).get("sandbox") if cfg.is_file() else None
    except (yaml.YAMLError, OSError, AttributeError):
        mode = None
    if mode != "unsafe-local":
        return []
    return ["> **Code sandbox: unsafe-local.** Code completions ran unisolated on the scoring machine "
            "(no namespaces, no throwaway uid); their rewards are not protected against hostile programs.", ""]


def _disk_section(run_dir: Path, manifests: dict[str, dict]) -> list[str]:
    """OPD's peak disk use and cache reads, and the rollout logs' counts of each RL stage."""
    from engine.disk import dir_bytes

    gib = 1024 ** 3
    lines = ["## Disk and rollouts", ""]
    opd = (manifests.get("opd") or {}).get("metrics") or {}
    if _is_num(opd.get("disk_peak_bytes")):
        caches = opd.get("cache_bytes") or []
        kept = sorted(int(d.parent.name.split("-")[1]) for d in (run_dir / "opd").glob("round-*/cache") if d.is_dir())
        lines.append(f"OPD peak disk use: {opd['disk_peak_bytes'] / gib:.3f} GiB (its directory at a round's end, "
                     f"with that round's teacher cache and new checkpoint); round caches "
                     f"{sum(c for c in caches if _is_num(c)) / gib:.3f} GiB written in all, still on disk for "
                     f"rounds {kept or 'none'}.")
        amp = [a for a in opd.get("cache_read_amplification") or [] if _is_num(a)]
        if amp:
            lines.append(f"Teacher cache read per epoch / cache bytes: max {max(amp):.2f} over {len(amp)} rounds.")
    lines.append(f"Run directory now: {dir_bytes(run_dir) / gib:.3f} GiB.")
    rows = []
    for stage, m in manifests.items():
        met = m.get("metrics") or {}
        wal = met.get("rollout_wal") if isinstance(met.get("rollout_wal"), dict) else \
            {k.split("/", 1)[1]: v for k, v in met.items() if k.startswith("rollout_wal/")}
        if wal:
            rows.append(f"| {stage} | {wal.get('completed', '-')} | {wal.get('replayed', '-')} | "
                        f"{wal.get('regenerated', '-')} |")
    if rows:
        lines += ["", "Rollout batches (write-ahead log): finished, replayed after a restart, regenerated "
                  "(in flight when a stage was killed):", "",
                  "| stage | finished | replayed | regenerated |", "|---|---:|---:|---:|", *rows]
    return lines + [""]


def _exports_section(manifests: dict[str, dict], run_dir: Path) -> list[str]:
    """The `final/` directory each model stage exported (transformers / vLLM load them as is)."""
    finals = [(stage, (m.get("outputs") or {}).get("final")) for stage, m in manifests.items()]
    finals = [(stage, path) for stage, path in finals if path]
    if not finals:
        return []
    lines = ["## Exported models", "", "| stage | final/ |", "|---|---|"]
    for stage, path in finals:
        p = Path(path)
        lines.append(f"| {stage} | `{p.relative_to(run_dir) if p.is_relative_to(run_dir) else p}` |")
    return lines + [""]


def _modes_section(run_dir: Path, plots: Path) -> list[str]:
    from pipeline.report_modes import modes_section

    path = run_dir / "eval" / "results.json"
    return modes_section(load_results(path), plots) if path.is_file() else []


def _experiment_name(run_dir: Path) -> str:
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            return str((yaml.safe_load(cfg.read_text()) or {}).get("experiment", run_dir.name))
        except yaml.YAMLError:
            pass
    return run_dir.name


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write `<run_dir>/report/report.md` (+ `report/plots/*.png`); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    manifests = {k: v for k, v in read_manifests(run_dir).items() if k != "report"}
    plots = run_dir / "report" / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = [f"# Polymath report: {_experiment_name(run_dir)}", "", f"Run directory: `{run_dir}`", ""]
    lines += _sandbox_section(run_dir)
    lines += _results_section(run_dir)
    lines += _modes_section(run_dir, plots)
    lines += _curves_section(run_dir, manifests, plots)
    lines += _opd_section(manifests, plots, run_dir)
    lines += _disk_section(run_dir, manifests)
    lines += _exports_section(manifests, run_dir)
    lines += _timings_section(manifests)
    out = run_dir / "report" / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
