"""Run one stage of the graph: dependency checks, skip/resume rule, manifest bookkeeping.

`run_stage` is what every Ray job runs (`python -m pipeline stage CONFIG STAGE`). It
refuses to start before its dependencies are done for the current config, skips a stage
already done for the same input hash, resumes an interrupted one in place (the drivers
continue from their newest complete checkpoint), and moves aside the partial work of a
stage whose inputs changed, so stale checkpoints are never resumed.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from pipeline.attempts import attempt_failed, attempt_succeeded, prepare_attempt, previous_dir, unfinished_dir
from pipeline.config import ExperimentConfig, dump_config
from pipeline.graph import Stage, build_graph, input_hashes
from pipeline.rundir import RunDir, atomic_write_text
from pipeline.stage_context import StageContext


class StageUsageError(Exception):
    """A stage that cannot start as asked: unknown name, or inputs not done (exit 2, no traceback)."""


def setup_environment(run_root: Path) -> None:
    """Keep every cache inside ignored folders; CPU threads. Offline hub access only where
    the environment asks for it (the Makefile sets HF_HUB_OFFLINE for the tiny run)."""
    cache = Path.cwd() / ".cache"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ.setdefault(var, str(run_root / "wandb"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))


def environment_facts(seed: int, numerics: bool = True) -> dict:
    """What makes a stage's numbers reproducible, recorded in its manifest: floating-point
    results differ between CPUs (vector width, BLAS kernels), so a run reproduces bitwise on
    the same machine and software only (docs/DESIGN.md section 14). A stage without tensor
    numerics (`numerics=False`: the report) that has not imported torch names the torch and
    transformers versions from the installed packages' metadata instead of importing them
    (~2 s of CPU) for BLAS and vector-ISA facts that cannot have touched its output."""
    import platform
    import sys

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {"seed": seed, "cpu_model": cpu, "machine": platform.machine(), "cpu_count": os.cpu_count(),
             "python": platform.python_version()}
    if not numerics and "torch" not in sys.modules:
        from importlib.metadata import PackageNotFoundError, version

        for package in ("torch", "transformers"):
            try:
                facts[package] = version(package)
            except PackageNotFoundError:
                pass
        return facts
    import torch

    config = torch.__config__.show()
    blas = next((part.split("=", 1)[1] for part in config.replace(",", " ").split() if part.startswith("BLAS_INFO=")), "?")
    facts.update({"torch": torch.__version__, "blas": blas, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
                  "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                                  if k in os.environ}})
    if torch.cuda.is_available():
        facts["cuda"] = {"device": torch.cuda.get_device_name(0), "version": torch.version.cuda}
    try:
        import transformers

        facts["transformers"] = transformers.__version__
    except ImportError:
        pass
    return facts


def _stage_functions():
    """Stage kind -> the function that runs it, one module per stage (imported only here,
    when a stage runs: `python -m pipeline stage` loads just what its stage needs)."""
    from pipeline import stage_eval, stage_grpo, stage_opd, stage_prepare, stage_report, stage_sft

    return {
        "prepare": stage_prepare.prepare,
        "sft": stage_sft.sft,
        "grpo": stage_grpo.grpo,
        "mixed_rl": stage_grpo.mixed_rl,
        "opd": stage_opd.opd,
        "eval": stage_eval.evaluate_stage,
        "report": stage_report.report,
    }


def run_stage(cfg: ExperimentConfig, config_path: str, name: str, overrides=(), force: bool = False) -> dict:
    stages = {s.name: s for s in build_graph(cfg)}
    if name not in stages:
        raise StageUsageError(f"unknown stage {name!r}; stages: {list(stages)}")
    stage = stages[name]
    hashes = input_hashes(list(stages.values()))
    run = RunDir(cfg.run_path)
    setup_environment(run.root)
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.root / "config.yaml", dump_config(cfg))
    for dep in stage.deps:
        if not run.is_done(dep, hashes[dep]):
            raise StageUsageError(f"stage {name} needs {dep} done for this config first "
                                  f"(run: polymath stage {config_path} {dep})")
    h = hashes[name]
    if run.is_done(name, h) and not force:
        print(f"[{name}] done for input {h}: skipped")
        return run.read_manifest(name)
    how = prepare_attempt(run, name, h, force)
    if how == "restored":
        print(f"[{name}] done for input {h}: restored its earlier output from {previous_dir(run, name).name}")
        return run.read_manifest(name)
    old = run.read_manifest(name)
    if old is not None and old.get("input_hash") != h:  # only the log is left of other attempts
        old = None
    attempt = (old or {}).get("attempt", 0) + 1
    started = time.time()
    run.write_manifest(name, status="running", input_hash=h, started=started, attempt=attempt,
                       deps={d: hashes[d] for d in stage.deps}, inputs=json.loads(json.dumps(stage.inputs)),
                       log=os.environ.get("POLYMATH_STAGE_LOG"), last_failed=None)
    ctx = StageContext(cfg, stage, run, h)
    print(f"[{name}] running (input {h}, attempt {attempt}" + (f", {how}" if how != "in place" else "") + ")",
          flush=True)
    try:
        result = _stage_functions()[stage.kind](ctx) or {}
    except BaseException as exc:
        failure = {"input_hash": h, "attempt": attempt, "error": f"{type(exc).__name__}: {exc}",
                   "log": os.environ.get("POLYMATH_STAGE_LOG"), "ended": time.time()}
        run.write_manifest(name, status="failed", error=failure["error"],
                           traceback=traceback.format_exc(), ended=failure["ended"])
        if attempt_failed(run, name, failure):
            print(f"[{name}] attempt {attempt} failed: the earlier output (input "
                  f"{run.read_manifest(name).get('input_hash')}) is back in place; this attempt's work "
                  f"is in {unfinished_dir(run, name).name}", flush=True)
        raise
    ended = time.time()
    facts = environment_facts(cfg.seed, numerics=stage.kind != "report")  # the report computes no tensors
    manifest = run.write_manifest(name, status="done", ended=ended, seconds=round(ended - started, 2),
                                  outputs=result.get("outputs", {}), metrics=result.get("metrics", {}),
                                  note=result.get("note", ""), environment=facts)
    attempt_succeeded(run, name)
    return manifest
