"""A real local Ray head: `ray job submit` of one stage, and the runner's `--address` mode.

The head binds 127.0.0.1 on free ports with token authentication (a token of its own, in
the test's temp dir). Teardown kills exactly the processes this test started (the
session of `ray start`) instead of `ray stop`, which would stop every Ray on the machine.
All Ray clients run as subprocesses, so this process never caches the head's token.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow  # a Ray head takes 5-20 s to start on the shared 2 cores

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from test_runner import TINY_MODEL  # noqa: E402


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_session(sid: int) -> None:
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                proc.send_signal(signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue


@pytest.fixture(scope="module")
def ray_head():
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's unix sockets live here
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    gcs, dash, client, agent, agent_grpc, nm, om, metrics, renv = _free_ports(9)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
           "--port", str(gcs), "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--node-manager-port", str(nm), "--object-manager-port", str(om), "--metrics-export-port",
           str(metrics), "--runtime-env-agent-port", str(renv), "--disable-usage-stats"]
    start = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        out, _ = start.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        start.kill()
        out = "ray start timed out"
    address = f"http://127.0.0.1:{dash}"
    if start.returncode != 0 or not _dashboard_up(address, env):
        _kill_session(start.pid)
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip(f"cannot start a local Ray head with its dashboard here: {out[-600:]}")
    yield {"address": address, "env": env, "temp": temp}
    _kill_session(start.pid)
    time.sleep(1.0)  # let the killed processes release their files
    shutil.rmtree(temp, ignore_errors=True)


def _dashboard_up(address: str, env: dict, wait_s: float = 30.0) -> bool:
    probe = ("from ray.job_submission import JobSubmissionClient as C; import sys; "
             "C(sys.argv[1]).list_jobs()")
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True).returncode == 0:
            return True
        time.sleep(1.0)
    return False


def _config(tmp_path: Path) -> Path:
    raw = {"experiment": "jobtest", "run_dir": str(tmp_path / "run"), "model": TINY_MODEL,
           "domains": [{"name": "math", "data": {"synthetic": {"generator": "math", "train_size": 8,
                                                               "eval_size": 4}}, "verifier": "math"}],
           "opd": {"student_init": "base"}, "logging": {"progress": False, "wandb": "disabled"},
           "resources": {"num_cpus": 2, "stages": {"sft": {"num_cpus": 1, "trainer_ranks": 2}}}}
    raw["domains"][0]["sft"] = {"steps": 2, "batch_size": 4, "micro_batch_size": 1, "max_length": 48, "save_every": 2}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage.replace(":", "-") / "manifest.json").read_text())


def test_plan_submit_lines_run_stages_with_two_trainer_ranks(ray_head, tmp_path):
    """The `ray job submit` lines `plan` prints, run as printed: prepare, then sft:math on two
    trainer ranks (the job holds one rank's CPU; its stage process joins the cluster and
    places rank 1 in a placement group of its own)."""
    config = _config(tmp_path)
    plan = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(config), "--address", ray_head["address"]],
                          cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, check=True).stdout
    lines = {ln.split(" -- ")[1].split()[5]: ln.strip() for ln in plan.splitlines() if "ray job submit" in ln}
    for stage in ("prepare", "sft:math"):
        cmd = lines[stage].replace("ray job submit", f"{VENV_BIN / 'ray'} job submit", 1)
        proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=ray_head["env"], capture_output=True, text=True,
                              timeout=420)
        assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = _manifest(tmp_path / "run", "prepare")
    assert m["status"] == "done"
    assert Path(m["outputs"]["model"], "config.json").is_file()
    assert Path(m["outputs"]["data:math:eval"]).is_file()
    sft = _manifest(tmp_path / "run", "sft:math")
    assert sft["status"] == "done" and sft["metrics"]["steps"] == 2
    assert "--entrypoint-num-cpus 1 " in lines["sft:math"]


def _run_cli(ray_head, config: Path, *args, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", "run", str(config), "--address", ray_head["address"], *args]
    return subprocess.run(cmd, cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=timeout)


def test_runner_address_mode_submits_follows_and_skips(ray_head, tmp_path):
    config = _config(tmp_path)
    proc = _run_cli(ray_head, config, "--only", "prepare")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[prepare] submitted job" in proc.stdout
    assert "  [prepare] [prepare] running (input" in proc.stdout  # the job's log, followed
    m = _manifest(tmp_path / "run", "prepare")
    assert m["status"] == "done" and m["log"] == str(tmp_path / "run" / "prepare" / "stage.log")
    assert "[prepare] running (input" in (tmp_path / "run" / "prepare" / "stage.log").read_text()
    again = _run_cli(ray_head, config, "--only", "prepare")
    assert again.returncode == 0 and "[prepare] skipped" in again.stdout and "submitted" not in again.stdout


RUNNER = """
import sys
sys.path.insert(0, {integration!r})
from pathlib import Path
from test_runner import fake
from pipeline.config import load_config
from pipeline.runner import run_experiment
cfg = load_config({config!r})
sys.exit(run_experiment(cfg, {config!r}, [], address={address!r}, only={only!r},
                        entrypoint=fake(Path({tmp!r}), {plan!r})))
"""


def _fake_runner(ray_head, tmp_path: Path, plan: dict, only=("prepare", "sft:math")) -> list[str]:
    config = _config(tmp_path)
    code = RUNNER.format(integration=str(ROOT / "tests" / "integration"), config=str(config), tmp=str(tmp_path),
                         plan=plan, address=ray_head["address"], only=list(only))
    return [sys.executable, "-c", code]


def _run_fake(ray_head, tmp_path: Path, plan: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_fake_runner(ray_head, tmp_path, plan, **kw), cwd=ROOT, env=ray_head["env"],
                          capture_output=True, text=True, timeout=240)


def test_runner_address_mode_failure(ray_head, tmp_path):
    (tmp_path / "b").mkdir()
    proc = _run_fake(ray_head, tmp_path / "b", {"prepare": "fail"})
    assert proc.returncode == 1
    assert "FAILED: prepare: RuntimeError: fake failure in prepare" in proc.stdout
    assert "sft:math       cancelled" in proc.stdout or "sft:math       blocked" in proc.stdout


def test_rerun_follows_a_job_left_running(ray_head, tmp_path):
    """A killed runner leaves its job running on the cluster; the rerun follows that job
    instead of starting a second process on the same stage directory."""
    plan = {"prepare": "gate:4"}
    first = subprocess.Popen(_fake_runner(ray_head, tmp_path, plan, only=["prepare"]), cwd=ROOT, env=ray_head["env"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage_dir = tmp_path / "run" / "prepare"
    deadline = time.time() + 120
    while not ((stage_dir / "steps.log").is_file() and (stage_dir / "steps.log").read_text().strip()):
        assert first.poll() is None and time.time() < deadline, "the job did not start"
        time.sleep(0.3)
    first.kill()
    first.wait()
    out = tmp_path / "rerun.log"
    with open(out, "w") as f:
        rerun = subprocess.Popen(_fake_runner(ray_head, tmp_path, plan, only=["prepare"]), cwd=ROOT,
                                 env=ray_head["env"], stdout=f, stderr=subprocess.STDOUT)
    while "[prepare] following job" not in out.read_text():
        assert rerun.poll() is None and time.time() < deadline, out.read_text()[-3000:]
        time.sleep(0.3)
    (stage_dir / "go").touch()  # the old job (still gated at step 1) may now finish
    assert rerun.wait(timeout=120) == 0, out.read_text()[-3000:]
    assert "submitted job" not in out.read_text()
    m = _manifest(tmp_path / "run", "prepare")
    assert m["status"] == "done" and m["attempt"] == 1
    assert [line.split() for line in (stage_dir / "steps.log").read_text().splitlines()] == \
        [["1", str(i)] for i in range(4)]


def test_job_imports_a_user_module_outside_the_checkout(ray_head, tmp_path):
    """The user's adapter and verifier (configs/examples/my_project/my_verifiers.py) in a
    package of their own outside the checkout: `pipeline run --address` submits `prepare`
    as a Ray job whose runtime env uploads the package (py_modules); the job's stage reads
    the calc rows through the user's adapter and checks them against the user's verifier."""
    example = ROOT / "configs" / "examples" / "my_project"
    mine = tmp_path / "my_code"
    (mine / "my_pkg").mkdir(parents=True)
    (mine / "my_pkg" / "__init__.py").write_text("")
    shutil.copy(example / "my_verifiers.py", mine / "my_pkg" / "plugins.py")
    raw = yaml.safe_load((example / "my_project.yaml").read_text())
    raw.update(experiment="jobplugins", run_dir=str(tmp_path / "run"), python_path=[str(mine)], model=TINY_MODEL)
    raw["domains"] = [{**raw["domains"][1], "verifier": "my_pkg.plugins:last_number",
                       "environment": "my_pkg.plugins:calculator",
                       "data": {"train": str(example / "calc_train.jsonl"), "eval": str(example / "calc_eval.jsonl"),
                                "adapter": "my_pkg.plugins:calc_row"}}]
    raw["opd"] = {"student_init": "base"}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    plan = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(config), "--address", ray_head["address"]],
                          cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, check=True).stdout
    assert f'"py_modules": ["{mine / "my_pkg"}"]' in plan
    proc = _run_cli(ray_head, config, "--only", "prepare")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = _manifest(tmp_path / "run", "prepare")
    assert m["status"] == "done" and m["metrics"]["rows"] == {"calc": {"train": 4, "eval": 2}}
    row = json.loads(Path(m["outputs"]["data:calc:train"]).read_text().splitlines()[0])
    assert row["id"] == "calc-0" and "<invoke name=\"add\">" in row["messages"][-1]["content"]


def test_job_grpo_stage_scores_with_a_user_verifier_outside_the_checkout(ray_head, tmp_path):
    """prepare, sft:math and grpo:math each as a Ray job (`run --address`), the user's
    grader (tests/fixtures/fragile_grader/grader.py) in a package of their own outside the
    checkout, uploaded with the job (py_modules). The GRPO job's scoring workers run it:
    the row whose gold answer is "twelve" gets the NameError only the user's code raises,
    the row whose gold is "9**9**9" its declared 3 s limit, and the stage finishes."""
    fixture = ROOT / "tests" / "fixtures" / "fragile_grader"
    mine = tmp_path / "my_code"
    (mine / "my_grading").mkdir(parents=True)
    (mine / "my_grading" / "__init__.py").write_text("")
    shutil.copy(fixture / "grader.py", mine / "my_grading" / "grader.py")
    raw = yaml.safe_load((fixture / "project.yaml").read_text())
    raw.update(run_dir=str(tmp_path / "run"), python_path=[str(mine)])
    dom = raw["domains"][0]
    dom["verifier"] = "my_grading.grader:expression_answer"
    dom["data"].update(train=str(fixture / "train.jsonl"), eval=str(fixture / "eval.jsonl"))
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = _run_cli(ray_head, config, "--only", "prepare", "sft:math", "grpo:math", timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[grpo:math] submitted job" in proc.stdout
    m = _manifest(tmp_path / "run", "grpo:math")
    assert m["status"] == "done"
    assert {k: v for k, v in m["metrics"].items() if k.startswith("scoring/")} == {
        "scoring/completions": 8, "scoring/failed": 4, "scoring/verifier_errors": 2, "scoring/timeouts": 2}
    log = (tmp_path / "run" / "grpo-math" / "stage.log").read_text()
    assert ("row 'q-raises' scored 0 without a verdict from verifier 'my_grading.grader:expression_answer': "
            "verifier error: NameError: name 'twelve' is not defined") in log
    assert "row 'q-hangs' scored 0 without a verdict from verifier 'my_grading.grader:expression_answer': " \
           "timeout: item took longer than 3s" in log
