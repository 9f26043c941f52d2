"""Reruns that lose nothing (pipeline.attempts), on the file system alone: which work is
set aside, restored or swapped back in, and that nothing reads set-aside work as current."""

from pipeline.attempts import (attempt_failed, attempt_succeeded, changed_inputs, describe_change, prepare_attempt,
                               previous_dir, unfinished_dir)
from pipeline.report import read_manifests
from pipeline.rundir import RunDir


def _attempt(run, h, status, weights):
    d = run.stage_dir("sft:math")
    d.mkdir(parents=True, exist_ok=True)
    (d / "weights").write_text(weights)
    run.write_manifest("sft:math", status=status, input_hash=h, started=1.0)


def test_failed_rerun_restores_then_a_retry_resumes_and_success_replaces(tmp_path):
    run = RunDir(tmp_path)
    _attempt(run, "h0", "done", "old")
    (run.stage_dir("sft:math") / "stage.log").write_text("attempt 1\n")
    assert prepare_attempt(run, "sft:math", "h1") == "fresh"
    assert (previous_dir(run, "sft:math") / "weights").read_text() == "old"
    assert sorted(p.name for p in run.stage_dir("sft:math").iterdir()) == ["stage.log"]  # the log never moves
    _attempt(run, "h1", "failed", "new, half done")
    assert attempt_failed(run, "sft:math", {"input_hash": "h1", "error": "boom"})
    m = run.read_manifest("sft:math")
    assert (m["status"], m["input_hash"], m["last_failed"]["error"]) == ("done", "h0", "boom")
    assert (run.stage_dir("sft:math") / "weights").read_text() == "old"
    assert (unfinished_dir(run, "sft:math") / "weights").read_text() == "new, half done"
    assert not previous_dir(run, "sft:math").exists()
    assert read_manifests(tmp_path)["sft:math"]["input_hash"] == "h0"  # the report reads the current one
    # the retry of h1 takes its unfinished work back (to resume it), the done h0 goes aside again
    assert prepare_attempt(run, "sft:math", "h1") == "resumed"
    assert (run.stage_dir("sft:math") / "weights").read_text() == "new, half done"
    assert (previous_dir(run, "sft:math") / "weights").read_text() == "old"
    _attempt(run, "h1", "done", "new")
    attempt_succeeded(run, "sft:math")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft-math"]
    assert (run.stage_dir("sft:math") / "stage.log").read_text() == "attempt 1\n"


def test_going_back_to_the_old_config_restores_its_done_work(tmp_path):
    run = RunDir(tmp_path)
    _attempt(run, "h0", "done", "old")
    prepare_attempt(run, "sft:math", "h1")
    _attempt(run, "h1", "running", "killed midway")  # the process died: no restore ran
    assert prepare_attempt(run, "sft:math", "h0") == "restored"
    assert run.is_done("sft:math", "h0") and (run.stage_dir("sft:math") / "weights").read_text() == "old"
    assert (unfinished_dir(run, "sft:math") / "weights").read_text() == "killed midway"
    assert prepare_attempt(run, "sft:math", "h0") == "in place"
    # --force on done work: set aside like a change, restorable if the forced attempt fails
    assert prepare_attempt(run, "sft:math", "h0", force=True) == "fresh"
    assert (previous_dir(run, "sft:math") / "weights").read_text() == "old"


def test_changed_inputs_name_the_dotted_paths():
    old = {"sft": {"lr": 0.003, "steps": 200}, "seed": 0, "trainer": {"backend": "torch"}}
    new = {"sft": {"lr": 0.001, "steps": 200}, "seed": 1, "trainer": {"backend": "torch"}}
    assert changed_inputs(new, old) == ["seed", "sft.lr"]
    manifest = {"input_hash": "x", "inputs": old, "deps": {"prepare": "p0"}}
    assert describe_change(new, {"prepare": "p1"}, manifest) == "seed, sft.lr, after prepare changed"
    assert describe_change(old, {"prepare": "p0"}, {"input_hash": "x", "deps": {"prepare": "p0"}}) == \
        "its config sections (the earlier attempt did not record them)"
