"""The run's progress arithmetic: the progress file's rate and ETA, the text of a progress
line, and the whole run's ETA laid out over dependencies and concurrency (worked by hand)."""

import time

from engine.progress import ProgressFile, read_progress
from pipeline.progress import describe_progress, estimate_run, format_duration, progress_bar


def test_progress_file_measures_rate_from_its_first_update(tmp_path, monkeypatch):
    clock = iter([90.0, 100.0, 110.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    pf = ProgressFile(tmp_path, total=300, every_s=0.0)
    pf.update(100)  # a resumed stage: steps 0..99 were done by an earlier attempt
    assert read_progress(tmp_path / "progress.json")["rate"] is None
    pf.update(120)  # 20 steps in 10 s: 2 step/s, 180 left: 90 s
    p = read_progress(tmp_path / "progress.json")
    assert (p["step"], p["total"], p["rate"], p["eta_s"]) == (120, 300, 2.0, 90.0)


def test_a_fresh_stage_counts_from_its_start(tmp_path, monkeypatch):
    clock = iter([0.0, 5.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    pf = ProgressFile(tmp_path, total=2, every_s=0.0)
    pf.update(1)  # the first step took 5 s: 0.2 step/s, one left: 5 s
    p = read_progress(tmp_path / "progress.json")
    assert (p["rate"], p["eta_s"]) == (0.2, 5.0)


def test_progress_line_and_bar():
    p = {"step": 120, "total": 500, "unit": "step", "rate": 1.3, "eta_s": 292.3}
    assert describe_progress(p) == "step 120/500 (24%), 1.30 step/s, ETA 4m52s"
    slow = {"step": 2, "total": 9, "unit": "model", "rate": 1 / 75, "eta_s": 525}
    assert describe_progress(slow) == "model 2/9 (22%), 75.0 s/model, ETA 8m45s"
    assert progress_bar(p, width=10).startswith("[##--------] step 120/500")
    assert format_duration(3725) == "1h02m" and format_duration(None) == "?"


def test_run_eta_follows_dependencies_and_concurrency():
    # a -> (b, c) -> d; two at a time: a 10, then b 30 and c 20 side by side, d 5 after b: 45
    order, deps = ["a", "b", "c", "d"], {"b": ("a",), "c": ("a",), "d": ("b", "c")}
    assert estimate_run(order, deps, {"a": 10, "b": 30, "c": 20, "d": 5}, concurrency=2) == (45.0, [])
    # one at a time: 10 + 30 + 20 + 5
    assert estimate_run(order, deps, {"a": 10, "b": 30, "c": 20, "d": 5}, concurrency=1) == (65.0, [])
    # an unmeasured stage counts as 0 and is named
    assert estimate_run(order, deps, {"a": 0, "b": 30, "c": None, "d": 5}, concurrency=2) == (35.0, ["c"])
