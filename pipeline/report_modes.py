"""The report's reasoning-modes section: per (domain, mode) eval set (`math@think-high`),
each model's greedy score and mean output tokens, the mode comparisons DeepSeek-V4
reports (think-high vs non-think, think-max vs think-high: paired score difference with
its standard error, and the output-token ratio), the OPD student in each mode against
that mode's expert, and a plot of score vs output tokens per mode."""

from __future__ import annotations

from pathlib import Path

from engine.modes import MODES, split_route


def mode_sets(results: dict) -> dict[str, list[str]]:
    """domain -> its eval sets with a mode, in MODES order."""
    names = {s for table in results.get("models", {}).values() for s in table}
    out: dict[str, list[str]] = {}
    for s in sorted(names):
        d, m = split_route(s)
        if m is not None:
            out.setdefault(d, []).append(s)
    return {d: sorted(v, key=lambda s: MODES.index(split_route(s)[1])) for d, v in out.items()}


def mode_comparisons(results: dict, domain: str) -> list[dict]:
    """Per model: think-high - non-think and think-max - think-high (paired over the same
    problems: each mode's rows are the same problems in the same order) and the
    think-max / think-high output-token ratio, where the model has both sets."""
    from pipeline.evaluate import paired_difference

    per_prompt = results.get("greedy_per_prompt", {})
    tokens = results.get("output_tokens", {})
    out = []
    for model, table in results.get("models", {}).items():
        row = {"model": model}
        for hi, lo in (("think-high", "non-think"), ("think-max", "think-high")):
            a, b = per_prompt.get(model, {}).get(f"{domain}@{lo}"), per_prompt.get(model, {}).get(f"{domain}@{hi}")
            if a and b and len(a) == len(b) and len(a) > 1:
                row[f"{hi} - {lo}"] = paired_difference(a, b)
        th, tm = tokens.get(model, {}).get(f"{domain}@think-high"), tokens.get(model, {}).get(f"{domain}@think-max")
        if th and tm:
            row["token_ratio"] = tm / th
        if len(row) > 1:
            out.append(row)
    return out


def plot_score_vs_tokens(results: dict, sets: list[str], out: Path) -> None:
    from pipeline.plotting import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    markers = "osD^v<>pP*X"
    models = list(results.get("models", {}))
    for s in sets:
        pts = [(results["output_tokens"][m][s], results["models"][m][s], m) for m in models
               if s in results.get("output_tokens", {}).get(m, {}) and s in results["models"][m]]
        for k, (x, y, m) in enumerate(pts):
            ax.scatter([x], [y], marker=markers[models.index(m) % len(markers)], color=f"C{sets.index(s)}",
                       label=split_route(s)[1] if k == 0 else None)
            ax.annotate(m, (x, y), fontsize=6, alpha=0.7)
    ax.set_xlabel("mean output tokens (greedy)")
    ax.set_ylabel("greedy score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="mode")
    ax.set_title(f"{split_route(sets[0])[0]}: score vs output tokens per mode")
    save_png(fig, out)
    plt.close(fig)


def modes_section(results: dict, plots: Path) -> list[str]:
    """Markdown lines (and plots) for every domain with modes; [] when there is none."""
    by_domain = mode_sets(results)
    if not by_domain:
        return []
    lines = ["## Reasoning modes", ""]
    tokens = results.get("output_tokens", {})
    for d, sets in by_domain.items():
        lines += [f"### {d}", "", "Greedy score / mean output tokens per mode:", "",
                  "| model | " + " | ".join(split_route(s)[1] for s in sets) + " |",
                  "|---|" + "---|" * len(sets)]
        for m, table in results["models"].items():
            cells = []
            for s in sets:
                sc, tk = table.get(s), tokens.get(m, {}).get(s)
                cells.append("-" if sc is None else f"{sc:.3f} / {tk:.1f}" if tk is not None else f"{sc:.3f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        comps = mode_comparisons(results, d)
        if comps:
            lines += ["Paired differences over the same problems (mean, SE; > 2 SE is distinguishable from noise) "
                      "and the think-max / think-high output-token ratio:", "",
                      "| model | think-high - non-think | think-max - think-high | tokens max/high |",
                      "|---|---|---|---|"]
            for c in comps:
                def fmt(key):
                    return f"{c[key][0]:+.3f} ({c[key][1]:.3f})" if key in c else "-"
                ratio = f"{c['token_ratio']:.2f}" if "token_ratio" in c else "-"
                lines.append(f"| {c['model']} | {fmt('think-high - non-think')} | {fmt('think-max - think-high')} | "
                             f"{ratio} |")
            lines.append("")
        if "student" in results["models"]:
            from pipeline.evaluate import paired_difference

            rows = []
            for s in sets:
                a = results.get("greedy_per_prompt", {}).get(f"grpo:{s}", {}).get(s)
                b = results.get("greedy_per_prompt", {}).get("student", {}).get(s)
                if a and b and len(a) == len(b) > 1:
                    mean, se = paired_difference(a, b)
                    rows.append(f"| {split_route(s)[1]} | {mean:+.3f} | {se:.3f} |")
            if rows:
                lines += ["OPD student - the mode's expert (`grpo:<domain>@<mode>`), greedy, paired:", "",
                          "| mode | difference | SE |", "|---|---|---|", *rows, ""]
        if tokens:
            name = f"modes_{d}.png"
            plot_score_vs_tokens(results, sets, plots / name)
            lines += [f"![score vs output tokens]({Path('plots') / name})", ""]
    return lines
