"""MetricsLogger: one flushed JSON line per step, truncation on resume, wandb optional."""

import json
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
