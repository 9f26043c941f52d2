"""MetricsLogger: one flushed JSON line per step, truncation on resume, wandb optional."""

import json
import re
import sys
import types

import pytest

from engine.metrics import MetricsLogger


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_rows_are_flushed_per_step(tmp_path):
    log = MetricsLogger(tmp_path, wandb_mode="disabled", progress=False)
    log.log({"loss": 2.5, "lr": 0.1, "grad_norm": float("nan")}, step=1)
    rows = _rows(tmp_path / "metrics.jsonl")  # readable before close: flushed
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 2.5 and rows[0]["grad_norm"] is None
    log.log({"loss": 2.0}, step=2)
    log.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]


def test_truncate_after_drops_repeated_steps_and_torn_line(tmp_path):
    log = MetricsLogger(tmp_path, wandb_mode="disabled", progress=False)
    for s in range(1, 5):
        log.log({"loss": float(s)}, step=s)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a writer killed mid-line
    log = MetricsLogger(tmp_path, wandb_mode="disabled", progress=True, total_steps=6, initial_step=2)
    log.truncate_after(2)
    log.log({"loss": 3.5}, step=3)
    log.close()
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 3.5)]


def test_wandb_failure_only_warns(tmp_path, monkeypatch):
    def broken_init(**kw):
        raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=broken_init))
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.delenv(key, raising=False)
    with pytest.warns(UserWarning, match="wandb \\(offline\\) did not start"):
        log = MetricsLogger(tmp_path, wandb_mode="offline", progress=False)
    log.log({"loss": 1.0}, step=1)
    log.close()
    assert _rows(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0


def test_wandb_dirs_stay_in_run_dir(tmp_path, monkeypatch):
    seen = {}

    class Run:
        def log(self, row, step):
            seen.setdefault("logged", []).append((step, row["loss"]))

        def finish(self):
            seen["finished"] = True

    def fake_init(**kw):
        seen["kw"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake_init))
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.delenv(key, raising=False)
    log = MetricsLogger(tmp_path / "run", wandb_mode="offline", progress=False, run_name="sft:math")
    log.log({"loss": 1.5, "note": "x"}, step=3)
    log.close()
    import os

    assert seen["kw"]["mode"] == "offline" and seen["kw"]["dir"].startswith(str(tmp_path / "run"))
    assert os.environ["WANDB_CACHE_DIR"].startswith(str(tmp_path / "run"))
    assert seen["logged"] == [(3, 1.5)] and seen["finished"]
    with pytest.raises(ValueError, match="wandb_mode"):
        MetricsLogger(tmp_path, wandb_mode="sometimes")


def _offline_runs(root):
    return sorted(p.name for p in (root / "wandb" / "wandb").glob("offline-run-*"))


def test_a_resumed_stage_logs_to_one_wandb_run(tmp_path, monkeypatch):
    """Real wandb, offline: the same run id before and after a resume (one run once
    synced), in the experiment's group with the stage kind as job type; samples and
    metrics after the resume point are dropped, as the steps are redone."""
    pytest.importorskip("wandb")
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.delenv(key, raising=False)
    ident = {"group": "tiny", "job_type": "grpo", "run_id": "grpo-math-0123456789ab"}
    first = MetricsLogger(tmp_path, wandb_mode="offline", progress=False, samples_per_step=2, **ident)
    assert (first._wandb.id, first._wandb.group, first._wandb.job_type) == ("grpo-math-0123456789ab", "tiny", "grpo")
    for step in (1, 2, 3):
        first.log({"loss": float(step)}, step=step)
        first.log_samples([{"prompt": "p", "completion": f"c{step}", "reward": 1.0, "route": "math"}], step=step)
    first.close()  # killed after step 3; the checkpoint is at step 2
    second = MetricsLogger(tmp_path, wandb_mode="offline", progress=False, samples_per_step=2, **ident)
    second.truncate_after(2)
    second.log({"loss": 3.5}, step=3)
    second.log_samples([{"prompt": "p", "completion": "again", "reward": 0.0, "route": "math"}], step=3)
    assert second._wandb.id == first._wandb.id
    second.close()
    runs = _offline_runs(tmp_path)
    # one directory per process, both with the run id; wandb adds "-1" to the second's name when
    # both start within the same second (offline-run-<YYYYmmdd_HHMMSS>-<id>[-N])
    assert len(runs) == 2 and all(re.fullmatch(r"offline-run-\d{8}_\d{6}-grpo-math-0123456789ab(-\d+)?", r)
                                  for r in runs), runs
    samples = _rows(tmp_path / "samples.jsonl")
    assert [(s["step"], s["completion"]) for s in samples] == [(1, "c1"), (2, "c2"), (3, "again")]
    assert set(samples[0]) == {"step", "prompt", "completion", "reward", "route"}
