"""Kill one of two trainer ranks mid-stage: `pipeline run` of an SFT stage with
`trainer_ranks: 2` (torch backend's data parallelism, gloo on CPU, embedded local Ray).

Just after the stage's first checkpoint, the OS process of one trainer rank (a seeded
choice of the two `ray::TrainerRank` worker processes) is SIGKILLed: not `ray.kill`, the
process vanishes mid-step, as on a lost node or an OOM kill. The stage must fail within
`FAIL_WITHIN_S` with an error naming the rank (the surviving rank would otherwise wait in
a gloo all-reduce for 30 minutes), and `pipeline run` rerun in
the same run directory must resume the stage from its newest checkpoint and end with
bitwise the weights of an uninterrupted 2-rank run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.reliability.processes import wait_for
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from test_runner import TINY_MODEL  # noqa: E402

STEPS, SAVE_EVERY = 60, 4  # ~50 ms a step here: the kill lands seconds before the end
FAIL_WITHIN_S = 60.0
RUN_TIMEOUT_S = 600


def _config(tmp_path: Path, name: str) -> Path:
    raw = {
        "experiment": f"rankkill-{name}", "run_dir": str(tmp_path / name), "model": TINY_MODEL,
        "trainer": {"backend": "torch"},
        "domains": [{"name": "math", "data": {"synthetic": {"generator": "math", "train_size": 32, "eval_size": 4}},
                     "verifier": "math",
                     "sft": {"steps": STEPS, "batch_size": 8, "micro_batch_size": 2, "max_length": 48,
                             "save_every": SAVE_EVERY, "keep_last": 2, "lr": 1e-2}}],
        "resources": {"num_cpus": 2, "default": {"num_cpus": 1}, "concurrent_stages": 1, "retries": 0,
                      "stages": {"sft": {"trainer_ranks": 2, "num_cpus": 1}}},
        "logging": {"progress": False, "wandb": "disabled"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(config), "--only", "prepare", "sft:math"]


def _run(config: Path) -> None:
    proc = subprocess.run(_argv(config), cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{_log(config)[-3000:]}"


def _stage_dir(config: Path) -> Path:
    return config.parent / config.stem / "sft-math"


def _log(config: Path) -> str:
    p = _stage_dir(config) / "stage.log"
    return p.read_text(errors="replace") if p.is_file() else ""


def _latest_step(config: Path) -> int:
    try:
        return int((_stage_dir(config) / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


def _manifest(config: Path) -> dict:
    from pipeline.rundir import RunDir

    return RunDir(config.parent / config.stem).read_manifest("sft:math") or {}


def _weights(config: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(_manifest(config)["outputs"]["model"]) / "model.safetensors"))


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT_S):
    return wait_for(pred, proc, what, timeout, on_timeout=lambda: os.killpg(proc.pid, signal.SIGKILL))


def _rank_processes(root_pid: int) -> list[psutil.Process] | None:
    """The two `ray::TrainerRank` worker processes under `pipeline run` (its Ray's workers)."""
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::TrainerRank"):
                found.append(p)
        except psutil.Error:
            continue
    return sorted(found, key=lambda p: p.pid) if len(found) == 2 else None


@pytest.mark.slow
def test_sigkill_of_one_rank_fails_the_stage_promptly_and_the_rerun_resumes_to_the_same_weights(tmp_path, fault_log):
    ref = _config(tmp_path, "ref")
    _run(ref)
    assert _manifest(ref)["status"] == "done"

    killed = _config(tmp_path, "killed")
    proc = subprocess.Popen(_argv(killed), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(lambda: _latest_step(killed) >= SAVE_EVERY, proc, f"checkpoint step-{SAVE_EVERY}")
        ranks = _wait_for(lambda: _rank_processes(proc.pid), proc, "two trainer rank processes")
        rng = random.Random(5)
        victim = rng.choice(ranks)
        time.sleep(rng.uniform(0.0, 0.2))
        victim.kill()  # SIGKILL
        killed_at, killed_after = time.monotonic(), _latest_step(killed)
        try:
            proc.wait(timeout=FAIL_WITHIN_S + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"pipeline run still running {FAIL_WITHIN_S + 30:.0f}s after rank 1 was killed")
        seconds = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = proc.stdout.read().decode(errors="replace")
    m = _manifest(killed)
    assert killed_after < STEPS and m["status"] == "failed", f"not killed mid-stage: {m.get('status')}\n{out[-2000:]}"
    assert proc.returncode != 0
    assert seconds < FAIL_WITHIN_S, f"the stage took {seconds:.1f}s to fail after the kill"
    assert re.search(r"trainer rank [01] failed: .*ActorDied", m["error"]), m["error"][:500]
    rank = re.search(rf"\[trainer rank (\d)/2\] pid {victim.pid}\b", _log(killed))
    fault_log(f"SIGKILL of trainer rank {rank.group(1) if rank else '?'}'s process mid-SFT (2 ranks)", "detected")
    print(f"stage failed {seconds:.1f}s after the kill: {m['error'][:200]}")

    resume_from = _stage_dir(killed) / "checkpoints" / f"step-{_latest_step(killed)}"
    _run(killed)
    m = _manifest(killed)
    assert m["status"] == "done" and m["attempt"] == 2
    log = _log(killed).rsplit("\n===== ", 1)[1]  # the rerun's part (Ray forwards rank output as it comes)
    assert f"] resumed from {resume_from}\n" in log, log[-3000:]
    a, b = _weights(ref), _weights(killed)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    fault_log("rerun after the rank kill", "recovered" if not differ else "undetected", data_lost=len(differ))
    assert not differ, f"resumed 2-rank run differs from the uninterrupted one in {differ}"
