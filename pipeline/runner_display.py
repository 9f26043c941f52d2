"""What the runner shows while a run goes: stage events, and the progress of the running
stages (pipeline.progress) as a live table on a terminal or as periodic lines off one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pipeline.config import ExperimentConfig

FINAL = {"done", "skipped", "blocked", "failed", "cancelled"}  # a stage state that no longer changes


class Display:
    """Stage events; on a terminal a live table of every stage with each running stage's
    progress bar; off a terminal a progress line per running stage every `every_s` seconds
    (step, rate, ETA) with the ETA of the whole run (pipeline.progress). `sched` is the
    runner's Scheduler (its stages, states, run directory and concurrency)."""

    def __init__(self, sched, live: bool, log_path: Callable[[str], Path] | None = None,
                 cfg: ExperimentConfig | None = None, every_s: float = 30.0):
        from rich.console import Console

        self.sched = sched
        self.log_path = log_path
        self.cfg = cfg
        self.every_s = every_s
        self.console = Console(highlight=False)
        self.rates: dict[str, float] = {}  # stage family -> latest measured seconds per step
        self.prior = self._prior_seconds()
        self.last_lines = time.time()
        self.lines = live and not self.console.is_terminal
        self.live = None
        if live and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=True)
            self.live.start()

    def _prior_seconds(self) -> dict[str, float]:
        """Seconds a finished attempt of each stage took (any config): the best guess of the next."""
        from pipeline.attempts import previous_dir

        out = {}
        for name in self.sched.order:
            for m in (self.sched.run.read_manifest(name), _json(previous_dir(self.sched.run, name) / "manifest.json")):
                if m and m.get("status") == "done" and m.get("seconds"):
                    out[name] = float(m["seconds"])
                    break
        return out

    def progress(self, name: str) -> dict | None:
        """The running stage's progress.json, if written by this attempt; notes its rate."""
        from engine.progress import FILENAME, read_progress
        from pipeline.progress import FAMILY

        st = self.sched.states[name]
        p = read_progress(self.sched.run.stage_dir(name) / FILENAME)
        if not p or st.started is None or p.get("updated", 0) < st.started:
            return None
        if p.get("rate"):
            self.rates[FAMILY.get(st.name.split(":")[0], st.name)] = 1.0 / p["rate"]
        return p

    def _planned(self, name: str) -> float | None:
        from pipeline.progress import FAMILY, planned_steps

        if name in self.prior:
            return self.prior[name]
        steps = planned_steps(self.cfg, name) if self.cfg is not None else None
        if steps is None:
            return 0.0  # bookkeeping stages (prepare, report): seconds
        family = FAMILY.get(name.split(":")[0], name)
        per_step = self.rates.get(family) or self._finished_rate(family)
        return steps * per_step if per_step else None

    def _finished_rate(self, family: str) -> float | None:
        """Seconds per planned step of this run's finished stages of `family`, start-up
        included (a stage not yet started pays it too); None when none has finished."""
        from pipeline.progress import FAMILY, planned_steps

        spent, steps = 0.0, 0
        for name, st in self.sched.states.items():
            if st.status == "done" and FAMILY.get(name.split(":")[0]) == family and self.cfg is not None:
                n = planned_steps(self.cfg, name)
                if n:
                    spent, steps = spent + st.elapsed(), steps + n
        return spent / steps if steps else None

    def run_eta(self, now: float) -> str:
        from pipeline.progress import estimate_run, format_duration

        remaining: dict[str, float | None] = {}
        for name in self.sched.order:
            st = self.sched.states[name]
            if st.status in FINAL:
                remaining[name] = 0.0
            elif st.status == "running":
                p = self.progress(name)
                if p and p.get("eta_s") is not None:
                    remaining[name] = max(0.0, p["eta_s"] - (now - p["updated"]))
                else:
                    planned = self._planned(name)
                    remaining[name] = None if planned is None else max(0.0, planned - st.elapsed(now))
            else:
                remaining[name] = self._planned(name)
        deps = {n: self.sched.stages[n].deps for n in self.sched.order}
        seconds, unknown = estimate_run(self.sched.order, deps, remaining, self.sched.concurrency)
        if unknown:
            known = f">= {format_duration(seconds)}" if seconds >= 1 else "not yet known"
            return f"ETA {known} (not yet measured: {', '.join(unknown)})"
        return f"ETA {format_duration(seconds)}"

    def _table(self):
        from rich.table import Table
        from rich.text import Text

        from pipeline.progress import progress_bar

        now = time.time()
        table = Table(title=f"stages (run {self.run_eta(now)})", expand=False)
        for col in ("stage", "status", "attempt", "elapsed", "progress / note"):
            table.add_column(col)
        for name in self.sched.order:
            st = self.sched.states[name]
            if st.status == "running":
                p = self.progress(name)
                note = progress_bar(p) if p else "working"
            else:
                note = st.note
            table.add_row(name, st.status, str(st.attempts or ""),  # Text: a bar's [###--] is not markup
                          f"{st.elapsed(now):.0f}s" if st.started else "", Text(note[:90]))
        return table

    def event(self, name: str, what: str, detail: str = "") -> None:
        st = self.sched.states[name]
        took = f" ({st.elapsed():.1f}s)" if st.started and what != "running" else ""
        self.console.print(f"[{name}] {what}{took}" + (f": {detail}" if detail else ""),
                           markup=False, soft_wrap=True)

    def progress_lines(self, now: float) -> list[str]:
        """One line per running stage, then the run's ETA."""
        from pipeline.progress import describe_progress, format_duration, planned_steps

        lines = []
        for name in self.sched.running():
            st = self.sched.states[name]
            p = self.progress(name)
            counted = self.cfg is None or planned_steps(self.cfg, name) is not None
            what = describe_progress(p) if p else "no step finished yet" if counted else "working, no step count"
            lines.append(f"[{name}] {what} (running {format_duration(st.elapsed(now))})")
        return lines + [f"[run] {self.run_eta(now)}"] if lines else []

    def refresh(self) -> None:
        now = time.time()
        if self.live is not None:
            self.live.update(self._table())
        elif self.lines and now - self.last_lines >= self.every_s:
            self.last_lines = now
            for line in self.progress_lines(now):
                self.console.print(line, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
