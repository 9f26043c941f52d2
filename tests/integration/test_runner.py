"""The runner on an embedded local Ray: order, concurrency, skip, invalidation, failures.

Most tests launch `fake_stage.py` (the real `run_stage` bookkeeping around fake drivers)
so they test orchestration in seconds; one runs the real `python -m pipeline stage`.
"""

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.graph import build_graph, input_hashes
from pipeline.launch import default_ray_temp_dir
from pipeline.rundir import RunDir
from pipeline.launch import Outcome
from pipeline.runner import Scheduler, run_experiment

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "integration" / "fake_stage.py"
TINY_MODEL = {"base": "tiny", "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                       "intermediate_size": 64, "max_position_embeddings": 128}}


def write_config(tmp_path: Path, domains=("math",), **resources) -> Path:
    raw = {
        "experiment": "runner-test",
        "run_dir": str(tmp_path / "run"),
        "model": TINY_MODEL,
        "domains": [{"name": d, "data": {"synthetic": {"generator": "math", "train_size": 8, "eval_size": 4}},
                     "verifier": "math"} for d in domains],
        "opd": {"student_init": "base"},
        "resources": {"num_cpus": 2, "concurrent_stages": 2, "retries": 0, **resources},
        "logging": {"progress": False, "wandb": "disabled"},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fake(tmp_path: Path, plan: dict | None = None):
    plan_path = "-"
    if plan:
        plan_path = str(tmp_path / "plan.json")
        Path(plan_path).write_text(json.dumps(plan))
    return lambda config, stage, overrides: ["python", str(FAKE), plan_path, config, stage, *overrides]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    temp = default_ray_temp_dir()
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(temp),
             object_store_memory=128 * 1024**2, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)


def _manifests(cfg):
    run = RunDir(cfg.run_path)
    return {s.name: run.read_manifest(s.name) for s in build_graph(cfg)}


def _launch_count(cfg, stage) -> int:
    log = RunDir(cfg.run_path).stage_dir(stage) / "stage.log"
    return log.read_text().count("=====") if log.is_file() else 0


def test_scheduler_respects_deps_and_concurrency(tmp_path):
    """The scheduling rule alone, no processes: a stand-in stage 'runs' by writing its manifest."""
    cfg = load_config(write_config(tmp_path, domains=("math", "code", "tool")))
    stages, run = build_graph(cfg), RunDir(cfg.run_path)
    hashes = input_hashes(stages)
    sched = Scheduler(stages, stages, hashes, run, retries=0, concurrency=2)
    waves = []
    while not sched.finished():
        launched = [n for what, n in sched.next_actions() if what == "launch"]
        assert launched and len(sched.running()) <= 2
        waves.append(launched)
        for name in list(sched.running()):
            run.write_manifest(name, status="done", input_hash=hashes[name])
            sched.complete(Outcome(name, 0))
    # graph order among the ready ones (sft:math, grpo:math, sft:code, ...), two at a time
    assert waves == [["prepare"], ["sft:math", "sft:code"], ["grpo:math", "grpo:code"], ["sft:tool"],
                     ["grpo:tool"], ["opd"], ["eval"], ["report"]]
    # a stage whose process exits 0 without a done manifest is a failure, never a success
    sched = Scheduler(stages, stages, {**hashes, "prepare": "changed"}, run, retries=0, concurrency=2)
    assert sched.next_actions() == [("launch", "prepare")]
    assert sched.complete(Outcome("prepare", 0)) == "failed" and sched.stopping


def test_independent_stages_run_concurrently(tmp_path, ray_local):
    path = write_config(tmp_path, domains=("math", "code"))
    cfg = load_config(path)
    # each expert SFT waits for the other to be running: they finish only if run side by side
    meet = {"sft:math": "meet:sft:code", "sft:code": "meet:sft:math"}
    assert run_experiment(cfg, str(path), [], only=["prepare", "sft:math", "sft:code"],
                          entrypoint=fake(tmp_path, meet)) == 0
    ms = _manifests(cfg)
    assert ms["sft:math"]["status"] == ms["sft:code"]["status"] == "done"
    assert ms["sft:code"]["started"] < ms["sft:math"]["ended"] and ms["sft:math"]["started"] < ms["sft:code"]["ended"]


def test_graph_runs_in_order_then_skips(tmp_path, ray_local, capsys):
    path = write_config(tmp_path)
    cfg = load_config(path)
    assert run_experiment(cfg, str(path), [], entrypoint=fake(tmp_path)) == 0
    ms = _manifests(cfg)
    assert all(m["status"] == "done" for m in ms.values()), {k: m["status"] for k, m in ms.items()}
    for stage in build_graph(cfg):  # every stage started after all its deps ended
        for dep in stage.deps:
            assert ms[stage.name]["started"] >= ms[dep]["ended"], (stage.name, dep)
    assert ms["prepare"]["log"].endswith("prepare/stage.log")
    out = capsys.readouterr().out
    assert "[eval] done" in out and "[report] done" in out
    # the run ends with the report's path and the models x domains table
    assert f"report: {cfg.run_path / 'report' / 'report.md'}" in out
    assert out.rstrip().endswith("| student | **0.500** |")

    # second run: nothing is started
    assert run_experiment(cfg, str(path), [], entrypoint=fake(tmp_path)) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] skipped" in out for s in ms) and "running" not in out
    assert all(_launch_count(cfg, s) == 1 for s in ms)


def test_config_change_reruns_exactly_downstream(tmp_path, ray_local, capsys):
    path = write_config(tmp_path, domains=("math", "code"))
    cfg = load_config(path)
    run, hashes = RunDir(cfg.run_path), input_hashes(build_graph(cfg))
    for name, h in hashes.items():  # a finished run of the unchanged config
        run.write_manifest(name, status="done", input_hash=h, outputs={}, started=1.0, ended=2.0)
    over = ["domains.math.grpo.lr=0.001"]
    cfg2 = load_config(path, over)
    assert run_experiment(cfg2, str(path), over, entrypoint=fake(tmp_path)) == 0
    out = capsys.readouterr().out
    rerun = {s for s in hashes if f"[{s}] running" in out}
    assert rerun == {"grpo:math", "opd", "eval", "report"}
    assert all(m["status"] == "done" for m in _manifests(cfg2).values())


def test_failure_retries_then_stops_with_log_path(tmp_path, ray_local, capsys):
    path = write_config(tmp_path, retries=1)
    cfg = load_config(path)
    # fails once, retried, resumes and finishes
    assert run_experiment(cfg, str(path), [], only=["prepare", "sft:math"],
                          entrypoint=fake(tmp_path, {"sft:math": "fail_once"})) == 0
    m = RunDir(cfg.run_path).read_manifest("sft:math")
    assert m["status"] == "done" and m["attempt"] == 2
    assert "failed, retrying (RuntimeError: fake failure in sft:math)" in capsys.readouterr().out

    # fails every time: retried once, then the run stops, non-zero, error + log path
    code = run_experiment(cfg, str(path), [], entrypoint=fake(tmp_path, {"grpo:math": "fail"}))
    out = capsys.readouterr().out
    assert code == 1
    m = RunDir(cfg.run_path).read_manifest("grpo:math")
    assert m["status"] == "failed" and m["attempt"] == 2
    assert "FAILED: grpo:math: RuntimeError: fake failure in grpo:math" in out
    assert str(RunDir(cfg.run_path).stage_dir("grpo:math") / "stage.log") in out
    assert RunDir(cfg.run_path).read_manifest("opd") is None


def test_killed_stage_process_fails_fast_or_retries(tmp_path, ray_local, capsys):
    path = write_config(tmp_path)
    cfg = load_config(path)
    t0 = time.time()
    code = run_experiment(cfg, str(path), [], only=["prepare"], entrypoint=fake(tmp_path, {"prepare": "die_once"}))
    assert code == 1 and time.time() - t0 < 60
    assert "stage process killed by signal SIGKILL" in capsys.readouterr().out
    assert RunDir(cfg.run_path).read_manifest("prepare")["status"] == "running"  # died without a word
    # with one retry (a fresh run dir) the same death is survived: attempt 2 finishes it
    (tmp_path / "b").mkdir()
    path = write_config(tmp_path / "b", retries=1)
    cfg = load_config(path)
    assert run_experiment(cfg, str(path), [], only=["prepare"], entrypoint=fake(tmp_path, {"prepare": "die_once"})) == 0
    m = RunDir(cfg.run_path).read_manifest("prepare")
    assert m["status"] == "done" and m["attempt"] == 2
    assert "[prepare] failed, retrying (stage process killed by signal SIGKILL)" in capsys.readouterr().out


def test_only_with_missing_deps_is_blocked(tmp_path, ray_local, capsys):
    path = write_config(tmp_path)
    cfg = load_config(path)
    assert run_experiment(cfg, str(path), [], only=["grpo:math"], entrypoint=fake(tmp_path)) == 1
    assert "needs sft:math, which is not selected and not done" in capsys.readouterr().out
    assert run_experiment(cfg, str(path), [], only=["nope"], entrypoint=fake(tmp_path)) == 2


def test_infeasible_resources_fail_instead_of_hanging(tmp_path, ray_local, capsys):
    path = write_config(tmp_path, stages={"sft": {"num_cpus": 1, "trainer_ranks": 4}})
    cfg = load_config(path)
    assert run_experiment(cfg, str(path), [], only=["prepare", "sft:math"], entrypoint=fake(tmp_path)) == 1
    assert "needs 4 CPU (4 rank(s)); the local Ray has 2" in capsys.readouterr().out


def test_placement_group_for_trainer_ranks(tmp_path, ray_local):
    path = write_config(tmp_path, stages={"sft": {"num_cpus": 0.5, "trainer_ranks": 2}})
    cfg = load_config(path)
    assert run_experiment(cfg, str(path), [], only=["prepare", "sft:math"], entrypoint=fake(tmp_path)) == 0
    import ray
    from ray.util import placement_group_table

    env = json.loads((RunDir(cfg.run_path).stage_dir("sft:math") / "env.json").read_text())
    # the stage process is told how to join this Ray (its rank actors take bundles 1..)
    ctx = ray.get_runtime_context()
    assert env["RAY_ADDRESS"] == ctx.gcs_address and env["RAY_NAMESPACE"] == ctx.namespace
    pgs = {pg["name"]: pg for pg in placement_group_table().values()}
    pg = pgs[env["POLYMATH_PLACEMENT_GROUP"]]
    assert pg["strategy"] == "STRICT_PACK" and len(pg["bundles"]) == 2
    assert pg["bundles"][0] == {"CPU": 0.5}
    assert pg["state"] == "REMOVED"  # released when the stage ended


def test_real_prepare_stage_then_skip(tmp_path, ray_local, capsys):
    """The real entrypoint, `python -m pipeline stage CONFIG prepare`, under the runner."""
    path = write_config(tmp_path)
    cfg = load_config(path)
    assert run_experiment(cfg, str(path), [], only=["prepare"]) == 0
    m = RunDir(cfg.run_path).read_manifest("prepare")
    assert m["status"] == "done" and m["input_hash"] == input_hashes(build_graph(cfg))["prepare"]
    assert Path(m["outputs"]["model"], "config.json").is_file()
    assert "[prepare] running (input" in (RunDir(cfg.run_path).stage_dir("prepare") / "stage.log").read_text()
    capsys.readouterr()
    assert run_experiment(cfg, str(path), [], only=["prepare"]) == 0
    assert "[prepare] skipped" in capsys.readouterr().out
    assert _launch_count(cfg, "prepare") == 1


def test_rerun_after_change_keeps_old_output_until_it_succeeds(tmp_path, ray_local, capsys):
    """A changed stage whose new attempt fails leaves the earlier `final` in place and both
    attempts' logs at the printed path; the closing table hides results of the old config;
    a later successful attempt replaces the output."""
    path = write_config(tmp_path)
    cfg = load_config(path)
    run = RunDir(cfg.run_path)
    assert run_experiment(cfg, str(path), [], entrypoint=fake(tmp_path)) == 0
    capsys.readouterr()
    old_hash = run.read_manifest("sft:math")["input_hash"]
    model = Path(run.read_manifest("sft:math")["outputs"]["model"])
    assert (model / "input_hash").read_text() == old_hash

    over = ["domains.math.sft.lr=0.001"]
    cfg2 = load_config(path, over)
    new_hash = input_hashes(build_graph(cfg2))["sft:math"]
    assert run_experiment(cfg2, str(path), over, entrypoint=fake(tmp_path, {"sft:math": "fail"})) == 1
    out = capsys.readouterr().out
    assert "[sft:math] running: try 1, changed: sft.lr (earlier output kept until this succeeds)" in out
    m = run.read_manifest("sft:math")
    assert m["status"] == "done" and m["input_hash"] == old_hash  # the earlier output is back
    assert m["last_failed"]["input_hash"] == new_hash and "fake failure" in m["last_failed"]["error"]
    assert (model / "input_hash").read_text() == old_hash
    assert "FAILED: sft:math: RuntimeError: fake failure in sft:math" in out
    log = run.stage_dir("sft:math") / "stage.log"
    assert f"log: {log}" in out and log.read_text().count("=====") == 2  # both attempts' logs
    assert "fake failure in sft:math" in log.read_text()
    assert "from an earlier config, not shown" in out and "| student |" not in out
    # the old config is still done: nothing to run
    assert run_experiment(cfg, str(path), [], entrypoint=fake(tmp_path)) == 0
    assert "running" not in capsys.readouterr().out

    assert run_experiment(cfg2, str(path), over, entrypoint=fake(tmp_path)) == 0
    m = run.read_manifest("sft:math")
    assert m["status"] == "done" and m["input_hash"] == new_hash and "last_failed" not in {k for k, v in m.items() if v}
    assert (model / "input_hash").read_text() == new_hash
    assert log.read_text().count("=====") == 3
    assert not any(p.name.startswith("sft-math.") for p in run.root.iterdir())  # nothing left aside
    assert capsys.readouterr().out.rstrip().endswith("| student | **0.500** |")


def test_progress_lines_off_a_terminal(tmp_path, ray_local, capsys):
    """A real SFT stage under the runner with stdout captured (not a terminal): progress
    lines with step, rate and ETA, and the run's ETA, every `logging.progress_every_s`."""
    path = write_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["logging"] = {"progress": True, "wandb": "disabled", "progress_every_s": 1.0}
    raw["domains"][0]["sft"] = {"steps": 60, "batch_size": 4, "micro_batch_size": 4, "max_length": 64,
                                "warmup_steps": 0, "save_every": 60}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert run_experiment(cfg, str(path), [], only=["prepare", "sft:math"]) == 0
    out = capsys.readouterr().out
    steps = [ln for ln in out.splitlines() if ln.startswith("[sft:math] step ")]
    assert steps, out
    assert any("/60 (" in ln and "step/s" in ln and "ETA " in ln and "ETA ?" not in ln for ln in steps), steps
    assert "[run] ETA " in out and "[prepare] working, no step count (running " in out
    assert (RunDir(cfg.run_path).stage_dir("sft:math") / "progress.json").is_file()


def test_live_table_shows_progress_bars_and_the_run_eta(tmp_path):
    """The terminal table, no processes: a running stage shows its progress bar (not its
    log's last line), and the title the run's ETA from the stages' planned steps."""
    from rich.console import Console

    from engine.progress import ProgressFile
    from pipeline.runner import Display

    cfg = load_config(write_config(tmp_path))
    stages, run = build_graph(cfg), RunDir(cfg.run_path)
    hashes = input_hashes(stages)
    sched = Scheduler(stages, stages, hashes, run, retries=0, concurrency=1)
    run.write_manifest("prepare", status="done", input_hash=hashes["prepare"])
    sched.next_actions()  # prepare skipped, sft:math launched
    assert sched.running() == ["sft:math"]
    stage_dir = run.stage_dir("sft:math")
    stage_dir.mkdir(parents=True)
    (stage_dir / "stage.log").write_text("some last log line\n")
    pf = ProgressFile(stage_dir, total=200, every_s=0.0)
    pf.update(0)
    pf._first = (0, pf._first[1] - 10.0)  # 50 steps in 10 s: 5 step/s
    pf.update(50)
    display = Display(sched, live=False, cfg=cfg)
    console = Console(record=True, width=200, force_terminal=False)
    console.print(display._table())
    text = console.export_text()
    assert re.search(r"\[#####-{15}\] step 50/200 \(25%\), (4\.9\d|5\.00) step/s, ETA 30s", text), text
    assert "some last log line" not in text
    # the run: sft:math 30 s left, then grpo:math and the rest not measured yet
    assert "stages (run ETA >= 30s (not yet measured: grpo:math, opd, eval)" in text.replace("\n", " ")
    lines = display.progress_lines(time.time())
    assert re.match(r"\[sft:math\] step 50/200 \(25%\), (4\.9\d|5\.00) step/s, ETA 30s \(running ", lines[0])
    assert lines[1].startswith("[run] ETA >= 30s")


def test_run_eta_uses_finished_stages_of_the_same_family(tmp_path):
    """A pending stage is timed by its planned steps at the seconds per step a finished
    stage of its family took: sft:math took 40 s for 200 steps, so sft:code (100 steps)
    is 20 s; grpo and the rest are not measured yet."""
    from pipeline.runner_display import Display

    path = write_config(tmp_path, domains=("math", "code"))
    raw = yaml.safe_load(path.read_text())
    raw["domains"][0]["sft"] = {"steps": 200}
    raw["domains"][1]["sft"] = {"steps": 100}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    stages, run = build_graph(cfg), RunDir(cfg.run_path)
    sched = Scheduler(stages, stages, input_hashes(stages), run, retries=0, concurrency=1)
    for name in ("prepare", "sft:math"):
        sched.states[name].status, sched.states[name].started, sched.states[name].ended = "done", 0.0, 40.0
    display = Display(sched, live=False, cfg=cfg)
    assert display._planned("sft:code") == 20.0
    assert display._planned("grpo:math") is None
    assert display.run_eta(time.time()).startswith("ETA >= 20s (not yet measured: grpo:math, grpo:code, opd, eval")
