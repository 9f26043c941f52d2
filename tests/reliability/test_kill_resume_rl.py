"""Kill anywhere, RL stages: a GRPO run and an OPD run are SIGKILLed (whole process group)
at seeded random moments after their first checkpoint, restarted in the same directory
until they finish, and must end with bitwise the weights of a run never interrupted.

GRPO: killed twice, each time a random delay after a new checkpoint appeared.
OPD: killed inside round 1's teacher cache write (teacher 1's shards half written,
teacher 0's complete), then inside round 2's training (its cache complete, its round-end
checkpoint not yet written), then run to the end. The runs are `rl_child.py` subprocesses;
the uninterrupted reference runs beside the killed chain to save wall time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.reliability.processes import wait_for

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("rl_child.py")
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_models")
    subprocess.run([sys.executable, str(CHILD), "make_models", str(root), "-"], cwd=ROOT, check=True,
                   capture_output=True, timeout=RUN_TIMEOUT_S)
    return root


def _start(kind: str, models: Path, out: Path, **env) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"log-{time.monotonic_ns()}.txt"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(CHILD), kind, str(models), str(out)], cwd=ROOT,
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log_path = log_path
    return proc


def _sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL the child, its process group and any descendant that left the group."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT_S, poll: float = 0.02):
    return wait_for(pred, proc, what, timeout, on_timeout=lambda: _sigkill(proc), poll=poll,
                    hint=f"; see {proc.args[-1]}/log-*")


def _finish(proc: subprocess.Popen) -> str:
    """Wait for a child to end well; returns the checkpoint it resumed from ('None': fresh)."""
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _sigkill(proc)
        raise
    log = proc.log_path.read_text(errors="replace")
    assert rc == 0, f"child failed ({rc}): {log[-2000:]}"
    return log.split("resume-from: ", 1)[1].split()[0]


def _latest_step(out: Path) -> int | None:
    pointer = out / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return None


def _latest_extra(out: Path) -> dict:
    step = _latest_step(out)
    return json.loads((out / "checkpoints" / f"step-{step}" / "extra_state.json").read_text())


def _differing_tensors(ref: Path, resumed: Path) -> list[str]:
    """Names of the final tensors that differ between the two runs (missing ones count)."""
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "final.safetensors")), load_file(str(resumed / "final.safetensors"))
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]


def _log_and_check(fault_log, kills: list[str], ref: Path, resumed: Path) -> None:
    differ = _differing_tensors(ref, resumed)
    for k in kills:  # a difference anywhere means the kills lost (or repeated) data
        fault_log(k, "recovered" if not differ else "undetected", data_lost=len(differ))
    assert not differ, f"resumed run differs from the uninterrupted one in {differ}"


@pytest.mark.slow
def test_grpo_killed_twice_after_checkpoints_ends_with_the_same_weights(models, tmp_path, fault_log):
    rng = random.Random(9)
    slow = {"POLYMATH_SLOW_STEP_S": "0.4"}  # two optimiser steps per GRPO step: >= 0.8 s to the next one
    ref = _start("grpo", models, tmp_path / "ref", **slow)
    out = tmp_path / "killed"
    start_step, kills = None, []
    for _ in range(2):
        proc = _start("grpo", models, out, **slow)
        target = (start_step or 0) + 1  # a checkpoint newer than the one this attempt resumed from
        _wait_for(lambda: (_latest_step(out) or 0) >= target, proc, f"checkpoint step-{target}")
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)
        _sigkill(proc)
        assert not (out / "final.safetensors").exists(), "the run finished before the kill"
        start_step = _latest_step(out)
        kills.append(f"SIGKILL GRPO {delay:.2f}s after checkpoint step-{target} (latest: step-{start_step})")
    assert _finish(_start("grpo", models, out, **slow)) == f"step-{start_step}"  # resumed, not restarted
    assert _finish(ref) == "None"
    _log_and_check(fault_log, kills, tmp_path / "ref", out)
    assert _latest_extra(out)["step"] == 4


def _teacher_tmp_with_shard(cache: Path, teacher: int) -> bool:
    return any(any(d.glob("shard-*.safetensors")) for d in cache.glob(f".teacher-{teacher:03d}.tmp-*"))


@pytest.mark.slow
def test_opd_killed_mid_cache_write_and_mid_round_ends_with_the_same_weights(models, tmp_path, fault_log):
    rng = random.Random(11)
    slow = {"POLYMATH_SLOW_CACHE_S": "0.25", "POLYMATH_SLOW_STEP_S": "0.4"}
    ref = _start("opd", models, tmp_path / "ref", **slow)
    out = tmp_path / "killed"

    # 1. inside round 1's teacher-1 cache write (teacher 0 published, teacher 1 partial)
    proc = _start("opd", models, out, **slow)
    cache1 = out / "round-1" / "cache"
    _wait_for(lambda: _teacher_tmp_with_shard(cache1, 1), proc, "teacher 1's first shard of round 1")
    time.sleep(rng.uniform(0.0, 0.2))
    _sigkill(proc)
    assert (cache1 / "teacher-000" / "manifest.json").is_file() and not (cache1 / "teacher-001").exists()
    assert _latest_extra(out)["round"] == 1  # round 0's checkpoint is the newest
    kills = ["SIGKILL OPD inside a teacher cache write (round 1, teacher 1)"]

    # 2. inside round 2's training (cache complete, round-end checkpoint not yet written)
    proc = _start("opd", models, out, **slow)
    _wait_for(lambda: (out / "round-2" / "cache" / "teacher-001" / "manifest.json").is_file(), proc,
              "round 2's teacher cache")
    time.sleep(rng.uniform(0.05, 0.4))
    _sigkill(proc)
    assert _latest_extra(out)["round"] == 2 and not (out / "final.safetensors").exists(), "not killed mid-round"
    kills.append("SIGKILL OPD mid-round (round 2 training)")

    resume_from = f"step-{_latest_step(out)}"  # round 1's checkpoint
    assert _finish(_start("opd", models, out, **slow)) == resume_from  # resumed, not restarted
    assert _finish(ref) == "None"
    _log_and_check(fault_log, kills, tmp_path / "ref", out)
    assert _latest_extra(out)["round"] == 3
    # the partial teacher-1 write of the first kill was freed by the rerun's `teach_round`
    assert not sorted(p.name for p in out.glob("round-*/cache/.teacher-*.tmp-*"))


def _in_flight(out: Path, pattern: str) -> list[str]:
    """(log file, key) of rollout batches begun but not finished in the logs under `out`."""
    from engine.rollout_wal import in_flight

    return [f"{p.relative_to(out)}:{k}" for p in sorted(out.glob(pattern)) for k in in_flight(p)]


def _kill_in_rollouts(kind: str, models: Path, out: Path, pattern: str, targets: list[str], rng, env) -> list[str]:
    """One attempt per target: SIGKILL a random moment after the batch `target` is in flight."""
    kills = []
    for target in targets:
        proc = _start(kind, models, out, **env)
        _wait_for(lambda: target in _in_flight(out, pattern), proc, f"rollout batch {target} in flight")
        delay = rng.uniform(0.0, 0.8 * float(env["POLYMATH_SLOW_GEN_S"]))
        time.sleep(delay)
        _sigkill(proc)
        assert _in_flight(out, pattern) == [target], "not killed inside the rollout batch"
        kills.append(f"SIGKILL {kind.upper()} {delay:.2f}s into rollout batch {target}")
    return kills


@pytest.mark.slow
def test_grpo_killed_in_rollouts_three_times_regenerates_only_the_batches_in_flight(models, tmp_path, fault_log):
    """No checkpoint before the end (save_every 4): without the log every restart would
    regenerate every step's rollouts; with it, only the batch each kill interrupted."""
    rng = random.Random(17)
    env = {"POLYMATH_SLOW_GEN_S": "1.0", "POLYMATH_SAVE_EVERY": "4"}
    ref = _start("grpo", models, tmp_path / "ref", **env)
    out = tmp_path / "killed"
    steps = sorted(rng.sample(range(4), 3))
    targets = [f"rollout-wal/step-{s:06d}.wal:seed-{s}/rnd-0/nocomma" for s in steps]
    kills = _kill_in_rollouts("grpo", models, out, "rollout-wal/step-*.wal", targets, rng, env)
    assert _finish(_start("grpo", models, out, **env)) == "None"  # no checkpoint yet: the log did the work
    assert _finish(ref) == "None"
    _log_and_check(fault_log, kills, tmp_path / "ref", out)
    got = json.loads((out / "result.json").read_text())
    assert got["rollout_wal/regenerated"] == 3 and got["rollout_wal/completed"] == 4
    assert got["rollout_wal/generated"] == 4 + 3  # each step's batch generated once, plus the 3 interrupted
    assert json.loads((tmp_path / "ref" / "result.json").read_text())["rollout_wal/regenerated"] == 0
    assert not list(out.glob("rollout-wal/*.wal"))  # pruned at the final checkpoint


@pytest.mark.slow
def test_opd_killed_in_rollouts_three_times_regenerates_only_the_batches_in_flight(models, tmp_path, fault_log):
    rng = random.Random(23)
    env = {"POLYMATH_SLOW_GEN_S": "1.0"}
    ref = _start("opd", models, tmp_path / "ref", **env)
    out = tmp_path / "killed"
    batches = [f"round-{r}/rollouts.wal:r{r}/{d}" for r in range(3) for d in "ab"]
    targets = [batches[i] for i in sorted(rng.sample(range(len(batches)), 3))]
    kills = _kill_in_rollouts("opd", models, out, "round-*/rollouts.wal", targets, rng, env)
    _finish(_start("opd", models, out, **env))
    assert _finish(ref) == "None"
    _log_and_check(fault_log, kills, tmp_path / "ref", out)
    got = json.loads((out / "result.json").read_text())["rollout_wal"]
    assert got["regenerated"] == 3 and got["completed"] == 6 and got["generated"] == 6 + 3
    assert json.loads((tmp_path / "ref" / "result.json").read_text())["rollout_wal"]["regenerated"] == 0
