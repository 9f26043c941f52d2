"""How the runner starts a stage process: a Ray task on an embedded cluster, or a Ray job.

Both backends share one small interface, used by `pipeline.runner`:
`start(stage, attempt)`, `wait(timeout) -> [Outcome]`, `cancel_all()`, `close()`,
`log_path(stage)`. A backend only reports how the stage *process* ended; the runner
reads the stage's manifest to tell done / failed apart.

A process that dies never hangs the run: a SIGKILLed stage process shows up as a negative
return code; a Ray worker that dies surfaces as an error from `ray.get`; the stage
process is tied to its Ray worker by PR_SET_PDEATHSIG, so cancelling the task (or killing
the runner) also ends the stage.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.graph import Stage
from pipeline.rundir import RunDir

UPLOAD_EXCLUDES = [".venv", "runs", ".cache", ".git", "wandb", "__pycache__", "*.pyc", ".pytest_cache"]


@dataclass
class Outcome:
    stage: str
    returncode: int | None  # None: the Ray worker or job died without an exit code
    error: str = ""

    def describe(self) -> str:
        if self.returncode is None:
            return f"stage worker died: {self.error}"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = str(-self.returncode)
            return f"stage process killed by signal {name}"
        return f"stage process exited with code {self.returncode}" + (f": {self.error}" if self.error else "")


def stage_argv(config_path: str, stage: str, overrides: list[str]) -> list[str]:
    """The command that runs one stage (what `plan` prints after `ray job submit --`)."""
    return ["python", "-m", "pipeline", "stage", config_path, stage, *overrides]


def default_ray_temp_dir() -> Path:
    """A short directory for Ray's sockets (a unix socket path must stay under 107 bytes)."""
    here = Path.cwd() / ".cache" / "ray"
    if len(str(here)) <= 40:
        return here
    return Path("/tmp") / f"polymath-ray-{os.getuid()}"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_stage_process(argv: list[str], log_path: str, env: dict, cwd: str, header: str) -> int:
    """Body of the Ray task: run the stage process, its output appended to `log_path`."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        log.write(header.encode())
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        return proc.wait()


def _header(stage: str, attempt: int, argv: list[str]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"\n===== {stamp} {stage} attempt {attempt}: {shlex.join(argv)}\n"


class LocalRayBackend:
    """Stage processes launched by Ray tasks on an embedded single-node Ray."""

    def __init__(self, cfg: ExperimentConfig, config_path: str, overrides: list[str], run: RunDir,
                 entrypoint=stage_argv):
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.cfg, self.config_path, self.overrides, self.run = cfg, config_path, overrides, run
        self.entrypoint = entrypoint
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            temp = default_ray_temp_dir()
            temp.mkdir(parents=True, exist_ok=True)
            ray.init(address="local", num_cpus=cfg.resources.num_cpus, num_gpus=cfg.resources.num_gpus,
                     include_dashboard=False, _temp_dir=str(temp), object_store_memory=128 * 1024**2,
                     log_to_driver=False, configure_logging=False)
        self.totals = ray.cluster_resources()
        self.task = ray.remote(run_stage_process)
        self.inflight: dict = {}  # ObjectRef -> (stage name, placement group or None)
        self.ready: list[Outcome] = []

    def log_path(self, stage: str) -> Path:
        return self.run.stage_dir(stage) / "stage.log"

    def _infeasible(self, stage: str) -> str | None:
        res = self.cfg.resources_for(stage)
        for key, need in (("CPU", res.num_cpus * res.trainer_ranks), ("GPU", res.num_gpus * res.trainer_ranks)):
            if need > self.totals.get(key, 0):
                return (f"needs {need:g} {key} ({res.trainer_ranks} rank(s)); the local Ray has "
                        f"{self.totals.get(key, 0):g} (resources.num_cpus / num_gpus)")
        return None

    def start(self, stage: Stage, attempt: int) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        problem = self._infeasible(stage.name)
        if problem:
            self.ready.append(Outcome(stage.name, 1, problem))
            return
        res = self.cfg.resources_for(stage.name)
        argv = self.entrypoint(self.config_path, stage.name, self.overrides)
        argv = [sys.executable if i == 0 and a == "python" else a for i, a in enumerate(argv)]
        log = self.log_path(stage.name)
        env = {"POLYMATH_STAGE_LOG": str(log.resolve()), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(max(1, math.ceil(res.num_cpus)))}  # torch threads = the CPUs held
        env.update(self._ray_env())  # a stage that starts Ray work (rank actors, prefill tasks) joins this Ray
        opts: dict = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_retries": 0}
        pg = None
        bundle = {k: v for k, v in (("CPU", res.num_cpus), ("GPU", res.num_gpus)) if v > 0}
        if res.trainer_ranks > 1 and bundle:
            # One bundle per trainer rank, packed on one node; the stage process (and its
            # rank 0) runs in bundle 0, ranks 1.. in the others (pipeline.actors).
            name = f"polymath-{self.cfg.experiment}-{stage.name}-{attempt}-{os.getpid()}"
            pg = placement_group([bundle] * res.trainer_ranks, strategy="STRICT_PACK", name=name)
            env["POLYMATH_PLACEMENT_GROUP"] = name
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
        ref = self.task.options(**opts).remote(argv, str(log), env, os.getcwd(), _header(stage.name, attempt, argv))
        self.inflight[ref] = (stage.name, pg)

    @staticmethod
    def _ray_env() -> dict[str, str]:
        """How a stage process reaches this Ray: its GCS address and namespace (a named
        placement group is found only in the namespace that made it)."""
        import ray

        ctx = ray.get_runtime_context()
        return {"RAY_ADDRESS": ctx.gcs_address, "RAY_NAMESPACE": ctx.namespace}

    def wait(self, timeout: float) -> list[Outcome]:
        import ray

        out, self.ready = self.ready, []
        if not self.inflight:
            time.sleep(0.05 if out else min(timeout, 0.2))
            return out
        done, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=timeout)
        for ref in done:
            name, pg = self.inflight.pop(ref)
            try:
                out.append(Outcome(name, int(ray.get(ref))))
            except Exception as exc:  # RayTaskError, WorkerCrashedError, TaskCancelledError...
                out.append(Outcome(name, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
            self._release(pg)
        return out

    def _release(self, pg) -> None:
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)

    def cancel_all(self) -> None:
        import ray

        for ref, (_, pg) in list(self.inflight.items()):
            ray.cancel(ref, force=True)
            self._release(pg)
        self.inflight.clear()

    def close(self) -> None:
        import ray

        self.cancel_all()
        if self.owns_ray:
            ray.shutdown()


def portable_config_path(config_path: str) -> str:
    """Relative to the checkout when inside it (the job's working dir is a copy), else absolute."""
    p = Path(config_path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def plugin_env(cfg: ExperimentConfig, config_dir: Path | str = ".") -> tuple[list[str], list[str]]:
    """What a job's runtime env needs for the config's `python_path` directories outside the
    working directory (those inside travel with the uploaded working directory): (the
    packages in them, for `py_modules`: Ray uploads each and puts it on the job's
    PYTHONPATH, so the stage process and the scoring workers it starts import it; the
    directories themselves, for PYTHONPATH: a single-file module in one is found where the
    directory is on storage every node sees, as data files and the run directory must be;
    Ray's job client uploads directories and wheels only)."""
    from pipeline.config import resolve_path

    cwd = Path.cwd().resolve()
    packages: list[str] = []
    dirs: list[str] = []
    for entry in cfg.python_path:
        d = resolve_path(entry, Path(config_dir)).resolve()
        if not d.is_dir() or d == cwd or cwd in d.parents:
            continue
        dirs.append(str(d))
        packages += sorted(str(p) for p in d.iterdir() if (p / "__init__.py").is_file())
    return packages, dirs


def job_request(cfg: ExperimentConfig, run: RunDir, stage: str, argv: list[str],
                config_dir: Path | str = ".") -> dict:
    """What a stage's job asks of Ray's job API (`JobSubmissionClient.submit_job` keywords
    but the metadata's attempt): the upload (the checkout minus `UPLOAD_EXCLUDES` and the
    run directory), the stage's environment, and one rank's CPUs/GPUs for the stage process
    and its rank 0 (it places ranks 1.. itself, pipeline.actors). `plan` prints the same."""
    res = cfg.resources_for(stage)
    root = run.root.resolve()
    excludes = list(UPLOAD_EXCLUDES)
    try:
        excludes.append(str(root.relative_to(Path.cwd().resolve())))
    except ValueError:
        pass
    runtime_env = {"working_dir": ".", "excludes": excludes,
                   "env_vars": {"POLYMATH_STAGE_LOG": str(root / run.stage_dir(stage).name / "stage.log"),
                                "PYTHONUNBUFFERED": "1"}}
    packages, dirs = plugin_env(cfg, config_dir)
    if packages:
        runtime_env["py_modules"] = packages
    if dirs:
        runtime_env["env_vars"]["PYTHONPATH"] = os.pathsep.join(dirs)
    return {"entrypoint": shlex.join(argv),
            "runtime_env": runtime_env,
            "entrypoint_num_cpus": res.num_cpus, "entrypoint_num_gpus": res.num_gpus or None,
            "metadata": {"experiment": cfg.experiment, "stage": stage, "run_dir": str(root)}}


def job_overrides(overrides: list[str], run: RunDir, cfg: ExperimentConfig | None = None,
                  config_dir: Path | str = ".") -> list[str]:
    """A job runs in an uploaded copy of the checkout: the run directory goes by absolute
    path, and `python_path` keeps only the directories inside the checkout (those outside
    reach the job through its runtime env, `plugin_env`, and need not exist on its node)."""
    out = [*overrides, f"run_dir={run.root.resolve()}"]
    if cfg is not None and plugin_env(cfg, config_dir)[1]:
        import json

        from pipeline.config import resolve_path

        outside = set(plugin_env(cfg, config_dir)[1])
        inside = [e for e in cfg.python_path if str(resolve_path(e, Path(config_dir)).resolve()) not in outside]
        out.append(f"python_path={json.dumps(inside)}")
    return out


def submit_command(cfg: ExperimentConfig, config_path: str, stage: str, address: str,
                   overrides: list[str] = ()) -> str:
    """The `ray job submit` line of one stage: exactly what `pipeline run --address` submits."""
    import json

    run = RunDir(cfg.run_path)
    req = job_request(cfg, run, stage, stage_argv(portable_config_path(config_path), stage,
                                                  job_overrides(list(overrides), run, cfg, Path(config_path).parent)),
                      Path(config_path).parent)
    args = ["ray", "job", "submit", "--address", address, "--working-dir", "."]
    args += ["--entrypoint-num-cpus", f"{req['entrypoint_num_cpus']:g}"]
    if req["entrypoint_num_gpus"]:
        args += ["--entrypoint-num-gpus", f"{req['entrypoint_num_gpus']:g}"]
    args += ["--runtime-env-json", json.dumps(req["runtime_env"], sort_keys=True),
             "--metadata-json", json.dumps(req["metadata"], sort_keys=True)]
    return shlex.join(args) + " -- " + req["entrypoint"]


class JobBackend:
    """Each stage is a job of Ray's job API on a running cluster, logs followed locally.

    The run directory is passed to every job as an absolute path (`run_dir=...`), since a
    job runs in an uploaded copy of the checkout: on a multi-node cluster it must be on
    storage every node shares (docs/cluster.md).
    """

    def __init__(self, cfg: ExperimentConfig, config_path: str, overrides: list[str], address: str,
                 run: RunDir, entrypoint=stage_argv):
        from ray.job_submission import JobSubmissionClient

        self.cfg, self.run, self.entrypoint = cfg, run, entrypoint
        self.client = JobSubmissionClient(address)
        self.config_arg = portable_config_path(config_path)
        self.overrides = job_overrides(overrides, run, cfg, Path(config_path).parent)
        self.jobs: dict[str, tuple[str, int]] = {}  # stage -> (submission id, log chars seen)
        self.ready: list[Outcome] = []

    def log_path(self, stage: str) -> Path:
        return self.run.stage_dir(stage) / "stage.log"

    def _metadata(self, stage: str) -> dict[str, str]:
        return {"experiment": self.cfg.experiment, "stage": stage, "run_dir": str(self.run.root.resolve())}

    def _live_job(self, stage: str) -> str | None:
        """A job of this stage and run directory still running (left by a killed runner)."""
        want = self._metadata(stage)
        for job in self.client.list_jobs():
            meta = job.metadata or {}
            if all(meta.get(k) == v for k, v in want.items()) and not job.status.is_terminal():
                return job.submission_id
        return None

    def start(self, stage: Stage, attempt: int) -> None:
        live = self._live_job(stage.name)
        if live is not None:  # never two processes on one stage directory: follow the old one
            print(f"[{stage.name}] following job {live}, still running from an earlier run", flush=True)
            self.jobs[stage.name] = (live, 0)
            return
        argv = self.entrypoint(self.config_arg, stage.name, self.overrides)
        log = self.log_path(stage.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(_header(stage.name, attempt, argv))
        req = job_request(self.cfg, self.run, stage.name, argv, Path(self.config_arg).parent)
        req["metadata"]["attempt"] = str(attempt)
        sid = self.client.submit_job(**req)
        print(f"[{stage.name}] submitted job {sid}", flush=True)
        self.jobs[stage.name] = (sid, 0)

    def _follow(self, stage: str) -> None:
        sid, seen = self.jobs[stage]
        text = self.client.get_job_logs(sid)
        if len(text) > seen:
            new = text[seen:]
            with open(self.log_path(stage), "a") as f:
                f.write(new)
            for line in new.splitlines():
                print(f"  [{stage}] {line}", flush=True)
            self.jobs[stage] = (sid, len(text))

    def wait(self, timeout: float) -> list[Outcome]:
        from ray.job_submission import JobStatus

        out, self.ready = self.ready, []
        time.sleep(timeout)
        for stage, (sid, _) in list(self.jobs.items()):
            status = self.client.get_job_status(sid)
            self._follow(stage)
            if not status.is_terminal():
                continue
            info = self.client.get_job_info(sid)
            del self.jobs[stage]
            code = getattr(info, "driver_exit_code", None)
            if status == JobStatus.SUCCEEDED:
                out.append(Outcome(stage, 0))
            elif status == JobStatus.STOPPED:
                out.append(Outcome(stage, None, f"job {sid} was stopped"))
            else:
                out.append(Outcome(stage, code if code is not None else 1, f"job {sid}: {info.message or 'failed'}"))
        return out

    def cancel_all(self) -> None:
        for sid, _ in self.jobs.values():
            self.client.stop_job(sid)
        self.jobs.clear()

    def close(self) -> None:
        self.cancel_all()
