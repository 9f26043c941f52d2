"""Run a whole experiment: the stage graph in dependency order, as Ray work.

Every stage runs in its own process, `python -m pipeline stage CONFIG STAGE [overrides]`
(the command `plan` prints), so a stage starts clean and its output goes to
`<stage dir>/stage.log`. Without `address` the processes are launched by Ray tasks on an
embedded local Ray (`ray.init(address="local")`), each holding the stage's CPUs/GPUs (a
placement group when it has several trainer ranks); with `address` each is a job of
Ray's job API on a running cluster. Either way this module decides only *when* a stage
runs; `pipeline.stages.run_stage` decides whether it has work to do and how to resume.

Rules: a stage done for its current input hash is skipped without starting anything;
independent stages run concurrently up to `resources.concurrent_stages`; a failed stage
(including a killed process) is retried up to `resources.retries` times and then stops
the run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.attempts import describe_change
from pipeline.config import ExperimentConfig
from pipeline.graph import Stage, build_graph, input_hashes, select
from pipeline.launch import JobBackend, LocalRayBackend, Outcome, stage_argv
from pipeline.rundir import RunDir
from pipeline.runner_display import FINAL, Display


@dataclass
class StageState:
    name: str
    status: str = "pending"  # pending | running | + FINAL
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    note: str = ""

    def elapsed(self, now: float | None = None) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or now or time.time()) - self.started


class Scheduler:
    """Decides what to launch next from the stage states and the manifests; knows no Ray."""

    def __init__(self, stages: list[Stage], selected: list[Stage], hashes: dict[str, str],
                 run: RunDir, retries: int, concurrency: int):
        self.order = [s.name for s in selected]
        self.stages = {s.name: s for s in stages}
        self.hashes = hashes
        self.run = run
        self.retries = retries
        self.concurrency = concurrency
        self.states = {n: StageState(n) for n in self.order}
        self.stopping = False

    def running(self) -> list[str]:
        return [n for n in self.order if self.states[n].status == "running"]

    def finished(self) -> bool:
        return all(self.states[n].status in FINAL for n in self.order)

    def _dep_problem(self, name: str) -> tuple[str, str] | None:
        """('wait', dep) while a dep is in flight, ('blocked', reason) when it cannot come."""
        for dep in self.stages[name].deps:
            st = self.states.get(dep)
            if st is None:  # not selected: must already be done for this config
                if not self.run.is_done(dep, self.hashes[dep]):
                    return "blocked", f"needs {dep}, which is not selected and not done for this config"
            elif st.status in ("blocked", "failed", "cancelled"):
                return "blocked", f"needs {dep} ({st.status})"
            elif st.status not in ("done", "skipped"):
                return "wait", dep
        return None

    def next_actions(self) -> list[tuple[str, str]]:
        """Advance pending stages: [('skipped'|'blocked'|'launch', name)], in graph order."""
        actions = []
        for name in self.order:
            st = self.states[name]
            if st.status != "pending":
                continue
            if self.stopping:
                st.status, st.note = "cancelled", "run stopped after a failure"
                continue
            problem = self._dep_problem(name)
            if problem and problem[0] == "wait":
                continue
            if problem:
                st.status, st.note = "blocked", problem[1]
                actions.append(("blocked", name))
            elif self.run.is_done(name, self.hashes[name]):
                st.status, st.note = "skipped", "done for this input hash"
                actions.append(("skipped", name))
            elif len(self.running()) < self.concurrency:
                st.status, st.attempts, st.started, st.ended = "running", st.attempts + 1, time.time(), None
                actions.append(("launch", name))
        return actions

    def resumable(self, name: str) -> str:
        """'' or a description of the interrupted attempt a launch will resume."""
        m = self.run.read_manifest(name) or {}
        if m.get("input_hash") == self.hashes[name] and m.get("status") in ("running", "failed"):
            return f"interrupted attempt {m.get('attempt', '?')} ({m['status']})"
        return ""

    def changed(self, name: str) -> str:
        """'' or which inputs changed since the stage's recorded attempt (its work is set aside)."""
        m = self.run.read_manifest(name)
        if not m or m.get("input_hash") == self.hashes[name]:
            return ""
        stage = self.stages[name]
        return describe_change(stage.inputs, {d: self.hashes[d] for d in stage.deps}, m) or "inputs changed"

    def complete(self, outcome: Outcome) -> str:
        """Classify a finished stage process from its manifest; returns the new status."""
        st = self.states[outcome.stage]
        st.ended = time.time()
        manifest = self.run.read_manifest(outcome.stage) or {}
        same_input = manifest.get("input_hash") == self.hashes[outcome.stage]
        if outcome.returncode == 0 and same_input and manifest.get("status") == "done":
            st.status, st.note = "done", str(manifest.get("note") or "")  # e.g. prepare's skipped bad rows
        else:
            raised = (outcome.returncode or 0) > 0 and same_input and manifest.get("status") == "failed"
            reason = manifest.get("error") if raised else None  # else: killed, no word from the stage
            restored = manifest.get("last_failed") or {}  # failed, and the earlier output is back
            if (outcome.returncode or 0) > 0 and restored.get("input_hash") == self.hashes[outcome.stage]:
                reason = restored.get("error")
            st.note = reason or outcome.describe()
            bad_input = outcome.returncode == 2 and bool(reason)  # config/data error: a retry cannot help
            if st.attempts <= self.retries and not self.stopping and not bad_input:
                st.status = "pending"  # retried: run_stage resumes it in place
                return "retry"
            st.status = "failed"
            self.stopping = True
        return st.status


# ------------------------------------------------------------------------------ main loop


def _drive(sched: Scheduler, backend, display: Display) -> None:
    while not sched.finished():
        for what, name in sched.next_actions():
            if what == "launch":
                attempt = sched.states[name].attempts
                resumes, changed = sched.resumable(name), sched.changed(name)
                display.event(name, "running", f"try {attempt}" + (f", resumes {resumes}" if resumes else "")
                              + (f", changed: {changed} (earlier output kept until this succeeds)" if changed else "")
                              + f", log {backend.log_path(name)}")
                backend.start(sched.stages[name], attempt)
            elif what == "skipped":
                display.event(name, "skipped", sched.states[name].note)
            else:
                display.event(name, "blocked", sched.states[name].note)
        if sched.finished():
            break
        for outcome in backend.wait(timeout=1.0):
            status = sched.complete(outcome)
            st = sched.states[outcome.stage]
            label = {"retry": f"failed, retrying ({st.note})"}.get(status, status)
            display.event(outcome.stage, label, st.note if status in ("failed", "done") else "")
            if status == "failed":
                for other in sched.running():
                    sched.states[other].status, sched.states[other].note = "cancelled", "run stopped after a failure"
                    sched.states[other].ended = time.time()
                    display.event(other, "cancelled")
                backend.cancel_all()
        display.refresh()


def summarize(sched: Scheduler, run: RunDir) -> tuple[str, int]:
    """The closing summary and the exit code (non-zero on a failed or blocked stage)."""
    lines = ["", f"run directory: {run.root}", f"{'stage':<14} {'status':<14} {'time':>8}  note"]
    for name in sched.order:
        st = sched.states[name]
        secs = f"{st.elapsed():.1f}s" if st.started else "-"
        lines.append(f"{name:<14} {st.status:<14} {secs:>8}  {st.note}".rstrip())
    failed = [n for n in sched.order if sched.states[n].status == "failed"]
    unmet = [n for n in sched.order if sched.states[n].status == "blocked" and "not selected" in sched.states[n].note]
    for n in failed:
        lines.append(f"FAILED: {n}: {sched.states[n].note}\n  log: {run.stage_dir(n) / 'stage.log'}")
    lines += _results_lines(run, sched.hashes)
    return "\n".join(lines), 1 if failed or unmet else 0


def _results_lines(run: RunDir, hashes: dict[str, str]) -> list[str]:
    """The eval table, only when the eval stage is done for the current config."""
    results = run.root / "eval" / "results.json"
    if not results.is_file():
        return []
    if not run.is_done("eval", hashes.get("eval", "")):
        return ["", f"eval results in {results} are from an earlier config, not shown "
                    f"(eval is not done for input {hashes.get('eval')})"]
    from pipeline.report import format_results_table, load_results

    lines = []
    report = run.root / "report" / "report.md"
    if report.is_file() and run.is_done("report", hashes.get("report", "")):
        lines.append(f"report: {report}")
    lines += ["", "greedy score, models x domains:", format_results_table(load_results(results), "models")]
    return lines


def run_experiment(cfg: ExperimentConfig, config_path: str, overrides: list[str] = (),
                   address: str | None = None, only: list[str] | None = None, start: str | None = None,
                   entrypoint: Callable[[str, str, list[str]], list[str]] = stage_argv) -> int:
    """Run the selected stages of `cfg`'s graph; returns the process exit code.

    `entrypoint(config_path, stage, overrides) -> argv` is the command that runs one
    stage (tests substitute a fake stage; the default is `python -m pipeline stage`).
    """
    stages = build_graph(cfg)
    try:
        selected = select(stages, only, start)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hashes = input_hashes(stages)
    run = RunDir(cfg.run_path)
    run.root.mkdir(parents=True, exist_ok=True)
    sched = Scheduler(stages, selected, hashes, run, cfg.resources.retries, cfg.resources.concurrent_stages)
    backend = (JobBackend(cfg, config_path, list(overrides), address, run, entrypoint) if address
               else LocalRayBackend(cfg, config_path, list(overrides), run, entrypoint))
    display = Display(sched, live=cfg.logging.progress, log_path=backend.log_path, cfg=cfg,
                      every_s=cfg.logging.progress_every_s)
    try:
        _drive(sched, backend, display)
    finally:
        display.close()
        backend.close()
    text, code = summarize(sched, run)
    print(text, flush=True)
    return code

