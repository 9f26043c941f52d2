"""Progress of a run for the console: each running stage's step, rate and ETA (from its
`progress.json`, engine.progress), and an ETA for the whole run from the stages' planned work.

Planned work is each stage's step count from the config (`planned_steps`). A stage not yet
started is timed by the seconds a finished attempt of it took (its manifest, any config),
else by its steps at the rate measured on a stage of the same family in this run; one with
neither is "not yet measured", and the run ETA is then a lower bound (`>=`). The stages are
then laid out as the runner would launch them (graph order, dependencies, at most
`concurrent_stages` at once) to get the time to the last one.
"""

from __future__ import annotations

from pipeline.config import ExperimentConfig

FAMILY = {"sft": "sft", "grpo": "rl", "mixed_rl": "rl", "opd": "opd", "eval": "eval"}


def opd_total_steps(settings, n_teachers: int) -> int:
    """Optimiser steps of the OPD stage: rounds x epochs x ceil(teachers x prompts x samples / mini batch)."""
    per_round = -(-n_teachers * settings.prompts_per_domain * settings.samples_per_prompt // settings.mini_batch_size)
    return settings.rounds * settings.epochs_per_round * per_round


def planned_steps(cfg: ExperimentConfig, stage: str) -> int | None:
    """The steps a stage's progress counts (models for eval); None for the short bookkeeping stages."""
    kind, _, rest = stage.partition(":")
    if kind == "sft":
        return (cfg.student_sft if rest == "all" else cfg.domain(rest).sft).steps
    if kind == "grpo":
        from engine.modes import split_route

        d, mode = split_route(rest)
        return cfg.domain(d).expert_grpo(mode).steps
    if kind == "mixed_rl":
        return cfg.mixed_rl.grpo.steps
    if kind == "opd":
        return opd_total_steps(cfg.opd, len(cfg.teachers()))
    if kind == "eval":
        from pipeline.graph import build_graph
        from pipeline.evaluate import models_to_evaluate

        deps = next(s.deps for s in build_graph(cfg) if s.name == "eval")
        return len(models_to_evaluate(list(deps)))
    return None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe_progress(p: dict) -> str:
    """'step 120/500 (24%), 1.30 step/s, ETA 4m52s' from a progress.json record."""
    unit, total = p.get("unit", "step"), p.get("total")
    text = f"{unit} {p['step']}" + (f"/{total} ({100 * p['step'] / total:.0f}%)" if total else "")
    if p.get("rate"):
        rate = p["rate"]
        text += f", {rate:.2f} {unit}/s" if rate >= 0.1 else f", {1 / rate:.1f} s/{unit}"
    return text + f", ETA {format_duration(p.get('eta_s'))}"


def progress_bar(p: dict, width: int = 20) -> str:
    total = p.get("total") or 0
    filled = int(width * min(1.0, p["step"] / total)) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "] " + describe_progress(p)


def estimate_run(order: list[str], deps: dict[str, tuple[str, ...]], remaining: dict[str, float | None],
                 concurrency: int) -> tuple[float, list[str]]:
    """(seconds until the last stage ends, stages whose time is unknown and counted as 0).

    `remaining[name]` is what is left of each stage (0 for finished ones); stages start in
    graph order once their deps end, at most `concurrency` at a time."""
    unknown = [n for n in order if remaining.get(n) is None]
    end: dict[str, float] = {}
    slots = [0.0] * max(1, concurrency)
    for name in order:
        ready = max([end.get(d, 0.0) for d in deps.get(name, ())] + [0.0])
        i = min(range(len(slots)), key=lambda k: max(slots[k], ready))
        start = max(slots[i], ready)
        end[name] = start + (remaining.get(name) or 0.0)
        slots[i] = end[name]
    return max(end.values(), default=0.0), unknown
