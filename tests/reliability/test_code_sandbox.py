"""Hostile programs against the code sandbox: each is contained and scores 0 with a reason.

After the batch: no process of any sandbox uid is alive, this process has no children
left, nothing was written or deleted outside the sandbox's temporary directory, and the
scoring pool survived every attack (the last, honest item still scores 1).
"""

import os
import pathlib
import re
import shutil
import sys
import time

import pytest

from rewards import score_batch
from rewards.sandbox_isolation import probe

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sandbox_procs import child_pids, leftover_sandbox_processes, new_children  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
REF = {"tests": ["assert sq(2) == 4", "assert sq(3) == 9"]}
OK = "\ndef sq(x):\n    return x * x\n"  # appended to attacks that "succeeded", so success would score 1


def hostile(victim_dir: str, repo_victim_dir: str) -> dict[str, str]:
    victim = os.path.join(victim_dir, "victim.txt")
    repo_victim = os.path.join(repo_victim_dir, "victim.txt")
    return {
        "infinite_loop": "while True:\n    pass" + OK,
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass" + OK,
        "memory_bomb": "x = bytearray(8 * 1024 ** 3)" + OK,
        "huge_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)" + OK,
        "write_outside": f"open({os.path.join(victim_dir, 'evil.txt')!r}, 'w').write('pwned')" + OK,
        "read_secret": "import os\nassert os.environ.get('POLYMATH_FAKE_SECRET') == 'hunter2'" + OK,
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2).close()" + OK,
        # PID 1 of its own namespace: its parent pid is 0, kill(0) hits its own group (the
        # supervisor is root: EPERM) and init ignores it; without `sq` it scores 0 ...
        "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "os_exit_before_tests": "import os\nos._exit(0)" + OK,
        "delete_outside": f"import os\nos.remove({victim!r})" + OK,
        "write_into_repo": f"open({os.path.join(repo_victim_dir, 'evil.txt')!r}, 'w').write('pwned')" + OK,
        "delete_in_repo": f"import os\nos.remove({repo_victim!r})" + OK,
        "sleep_past_limit": "import time\ntime.sleep(60)" + OK,
        "escape_and_linger": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nraise SystemExit(0)" + OK,
    }


@pytest.fixture
def repo_victim_dir():
    """A root-owned directory outside /tmp (inside the repo's ignored .cache) with a victim file."""
    d = ROOT / ".cache" / f"sandbox-victim-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "victim.txt").write_text("keep me")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_hostile_programs_are_contained(tmp_path, monkeypatch, repo_victim_dir):
    children_before = child_pids()
    monkeypatch.setenv("POLYMATH_FAKE_SECRET", "hunter2")
    victim_dir = tmp_path / "outside"
    victim_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(victim_dir, 0o755)
    (victim_dir / "victim.txt").write_text("keep me")
    workers_tmp = tmp_path / "workers"  # the scoring workers' directories (other processes share /tmp)
    workers_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(workers_tmp))

    attacks = hostile(str(victim_dir), str(repo_victim_dir))
    names = list(attacks) + ["honest"]
    codes = list(attacks.values()) + [OK]
    start = time.monotonic()
    results = score_batch("code", codes, [REF] * len(codes), num_workers=2, timeout_s=20, wall_s=2.0, cpu_s=2)
    elapsed = time.monotonic() - start

    by_name = dict(zip(names, results))
    for name in attacks:
        res = by_name[name]
        assert res.score == 0.0, (name, res.info)
        assert res.info.get("reason"), name
    assert by_name["honest"].score == 1.0, by_name["honest"].info
    assert "timeout" in by_name["sleep_past_limit"].info["reason"]
    assert "output limit" in by_name["huge_output"].info["reason"]
    assert "exited with code 0" in by_name["os_exit_before_tests"].info["reason"]
    assert "MemoryError" in by_name["memory_bomb"].info["reason"]
    assert "scoring worker" not in by_name["kill_parent"].info["reason"]  # ... and its worker lives

    assert (victim_dir / "victim.txt").read_text() == "keep me"
    assert not (victim_dir / "evil.txt").exists()
    assert (repo_victim_dir / "victim.txt").read_text() == "keep me"
    assert not (repo_victim_dir / "evil.txt").exists()
    # every host path is read-only in the sandbox; a checkout under /tmp is not even visible
    # (the sandbox's /tmp is its own tmpfs)
    assert re.search("Read-only file system|PermissionError|FileNotFoundError",
                     by_name["write_into_repo"].info["reason"])
    leaked = set(os.listdir(workers_tmp))
    assert not leaked, f"sandbox dirs left behind: {leaked}"
    assert leftover_sandbox_processes() == [], "sandboxed processes survived"
    assert new_children(children_before) == []
    assert elapsed < 60


@pytest.mark.skipif(not probe()["network"], reason="kernel refuses network namespaces here")
def test_network_is_a_namespace_and_reported():
    (res,) = score_batch("code", ["import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)"], [REF])
    assert res.info["network_isolation"] == "namespace"
    # the namespace's own loopback (bubblewrap brings it up) has nothing listening on it
    assert any(why in res.info["reason"] for why in ("Network is unreachable", "OSError", "ConnectionRefusedError"))


@pytest.mark.skipif(not probe()["filesystem"], reason="kernel refuses mount namespaces here")
def test_tmp_writes_land_in_the_sandbox_dir():
    marker = f"polymath-sbx-probe-{os.getpid()}"
    code = f"open('/tmp/{marker}', 'w').write('x')\nimport os\nassert os.getcwd() == '/tmp'" + OK
    (res,) = score_batch("code", [code], [REF])
    assert res.score == 1.0, res.info  # the write succeeded inside the sandbox ...
    assert not os.path.exists(f"/tmp/{marker}")  # ... and did not reach the real /tmp


def test_a_venv_interpreter_under_tmp_still_runs_sandboxed_programs(tmp_path):
    """A checkout under /tmp puts its venv's `python` (a symlink) under /tmp, which the
    sandbox covers with the program's working directory: the sandbox must start the real
    interpreter behind the link (it scored every program 0 with FileNotFoundError before)."""
    import site
    import subprocess
    import sys

    link = tmp_path / "venv-bin" / "python"
    link.parent.mkdir()
    link.symlink_to(os.path.realpath(sys.executable))
    code = ("from rewards import score_batch\n"
            "r = score_batch('code', ['def sq(x):\\n    return x * x\\n'], [{'tests': ['assert sq(3) == 9']}])[0]\n"
            "print(r.score, r.info.get('reason'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    out = subprocess.run([str(link), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "1.0", out.stdout


@pytest.mark.skipif(not probe()["available"], reason="code sandbox unavailable here")
def test_disk_quota_covers_every_writable_dir_together():
    """/tmp, /dev/shm, /var/tmp are one tmpfs of `max_disk_bytes`: filling them all stops
    at the quota with ENOSPC (each file also stays under RLIMIT_FSIZE)."""
    code = ("import errno, os\nn = 0\ntry:\n"
            "    for i in range(40):\n"
            "        d = ('/tmp', '/dev/shm', '/var/tmp')[i % 3]\n"
            "        with open(f'{d}/f{i}', 'wb') as fh:\n"
            "            fh.write(b'x' * (4 << 20))\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    assert e.errno == errno.ENOSPC, e\n"
            "assert 3 <= n < 8, n\n" + OK)
    (res,) = score_batch("code", [code], [REF], max_disk_bytes=24 << 20)
    assert res.score == 1.0, res.info
