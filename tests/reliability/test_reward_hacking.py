"""Reward hacking against the code verifier: every trick scores 0, and nothing is left behind.

Each program below tries to earn a pass without a correct `sq` (the reference's tests
are `sq(2) == 4`, `sq(3) == 9`, `sq(-4) == 16`): patching builtins, reaching the
harness through frames / `gc` / `inspect`, forging results on stdout or on the result
channel, exit tricks, catching BaseException, threads, fork, `__eq__` overrides. All
run in ONE scoring worker, then an honest program in the same worker still scores 1.
Others try to leave something on the host: files in every world-writable directory,
SysV / POSIX shared memory, background processes (setsid, double fork, a setuid
binary). After the batch none of it exists.
"""

import os
import pathlib
import re
import stat
import sys

import pytest

from rewards import ScorerPool
from rewards.sandbox_isolation import probe

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sandbox_procs import child_pids, leftover_sandbox_processes, new_children  # noqa: E402

pytestmark = pytest.mark.skipif(not probe()["available"], reason=f"code sandbox unavailable: {probe()['error']}")

REF = {"tests": ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-4) == 16"]}
HONEST = "def sq(x):\n    return x * x\n"
WRONG = "def sq(x):\n    return x + 1\n"  # passes none of the tests
TAG = f"polymath-hack-{os.getpid()}"
SHM_KEY = 0x5EED0000 + os.getpid() % 0xFFFF
SLEEP_S = 987_654  # a marker duration: any `sleep 987654` left afterwards is a leak

FORGE_LINES = """
def _forge(nonce=""):
    lines = []
    for i in range(3):
        for v in ("true", "4", "9", "16", '{"o":"x"}'):
            lines.append('{"n":"%s","i":%d,"v":%s}' % (nonce, i, v))
        lines.append('{"n":"%s","test":%d,"ok":true,"nonce":"%s"}' % (nonce, i, nonce))
    lines.append('{"n":"%s","stage":"loaded"}' % nonce)
    lines.append('{"n":"%s","stage":"done"}' % nonce)
    return "\\n".join(lines) + "\\n"
"""

HACKS = {
    "builtins_exec_eval": "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
                          "builtins.eval = lambda *a, **k: True\nbuiltins.compile = lambda *a, **k: None\n" + WRONG,
    "builtins_assert_error": "import builtins\nclass E(Exception): pass\nbuiltins.AssertionError = E\n" + WRONG,
    "frames_forge": FORGE_LINES + WRONG + """
import sys
f = sys._getframe()
while f is not None:
    for k, v in list(f.f_locals.items()):
        if k == "nonce" and isinstance(v, str):
            import os
            os.write(3, _forge(v).encode())
        if k == "emit" and callable(v):
            for i in range(3):
                for body in (',"i":%d,"v":true' % i, ',"i":%d,"v":4' % i):
                    try: v(body)
                    except Exception: pass
    f = f.f_back
""",
    "gc_forge": FORGE_LINES + WRONG + """
import gc, os
for o in gc.get_objects():
    if isinstance(o, dict) and "nonce" in o:
        os.write(3, _forge(str(o["nonce"])).encode())
    if isinstance(o, str) and o.startswith('{"n":"'):
        os.write(3, _forge(o[6:38]).encode())
""",
    "inspect_stack_forge": FORGE_LINES + WRONG + """
import inspect, os
for fr in inspect.stack():
    head = fr.frame.f_locals.get("head")
    if isinstance(head, str):
        os.write(3, _forge(head[6:38]).encode())
    fr.frame.f_globals["MAX_REPLY"] = 0
""",
    "forged_stdout": FORGE_LINES + WRONG + "import sys\nprint(_forge())\nprint('PASSED 3/3')\nsys.stdout.flush()",
    "forged_channel_all_values": """
import os, sys
f, nonce = sys._getframe(), None
while f is not None:
    nonce = nonce or f.f_locals.get("nonce")
    f = f.f_back
assert isinstance(nonce, str)
for v in range(-50, 50):
    for i in range(3):
        os.write(3, ('{"n":"%s","i":%d,"v":%d}\\n' % (nonce, i, v)).encode())
def sq(x):
    return 0
""",
    "os_exit_at_load": "import os\nos._exit(0)\n" + HONEST,
    "sys_exit_in_atexit": "import atexit, sys\natexit.register(lambda: sys.exit(0))\n" + WRONG,
    "exit_in_call": "import os\ndef sq(x):\n    os._exit(0)\n",
    "catch_base_exception": "def sq(x):\n    try:\n        raise SystemExit(0)\n    except BaseException:\n        return x + 1\n"
                            "import sys\ntry:\n    sys.exit(0)\nexcept BaseException:\n    pass\n",
    "threads_forge": FORGE_LINES + WRONG + """
import threading, os, time
def spam():
    while True:
        try:
            os.write(3, _forge().encode())
        except OSError:
            return
        time.sleep(0.001)
threading.Thread(target=spam, daemon=False).start()
""",
    "fork_forge": FORGE_LINES + WRONG + """
import os, time
if os.fork() == 0:
    for _ in range(200):
        os.write(3, _forge().encode())
        time.sleep(0.005)
    os._exit(0)
""",
    "eq_override": "class A:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                   "    __hash__ = object.__hash__\ndef sq(x):\n    return A()\n",
    "int_subclass_eq": "class I(int):\n    def __eq__(self, o): return True\n    __hash__ = int.__hash__\n"
                       "def sq(x):\n    return I(0)\n",
    "bool_override": "class B:\n    def __bool__(self): return True\ndef sq(x):\n    return B()\n",
    "patch_json_and_str": "import builtins\nbuiltins.str = lambda *a: '4'\nbuiltins.repr = lambda *a: '4'\n"
                          "int.__repr__  # cannot be patched\n" + WRONG,
    "signal_init": "import os, signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):\n"
                   "    try: os.kill(1, s)\n    except Exception: pass\n" + WRONG,
    "syntax_error_8mb": "x = [" + "1," * (4 << 20) + "\ndef sq(x) return x*x",
}


def _world_writable_dirs() -> list[str]:
    """World-writable directories a program could reach: the usual ones plus a shallow scan."""
    found = set()
    roots = ["/", "/var", "/run", "/dev", "/var/lib", "/var/spool", "/var/cache", "/usr/local"]
    for root in roots:
        try:
            entries = [os.path.join(root, n) for n in os.listdir(root)]
        except OSError:
            continue
        for p in entries + [root]:
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and not p.startswith(("/proc", "/sys")):
                found.add(p)
    return sorted(found)


LEAVE_BEHIND = {
    "files_everywhere": """
import os
dirs = %r
for d in dirs:
    for path in (os.path.join(d, %r), os.path.join(d, ".%s-hidden")):
        try:
            with open(path, "w") as fh:
                fh.write("persist")
        except OSError:
            pass
""" + WRONG,
    "sysv_shm": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
shmid = libc.shmget(%d, 1 << 20, 0o1666)
assert shmid >= 0, ctypes.get_errno()
addr = libc.shmat(shmid, None, 0)
""" + WRONG,
    "posix_shm": "from multiprocessing import shared_memory\n"
                 "m = shared_memory.SharedMemory(name=%r, create=True, size=4096)\n" + WRONG,
    "setsid_daemon": "import os, subprocess\n"
                     "subprocess.Popen(['setsid', 'sleep', '%d'], start_new_session=True)\n"
                     "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execvp('sleep', ['sleep', '%d'])\n"
                     "    os._exit(0)\n" + WRONG,
    "setuid_binary": "import subprocess, shutil\n"
                     "for b in ('su', 'passwd', 'newgrp'):\n    p = shutil.which(b)\n"
                     "    if p:\n        subprocess.Popen([p], stdin=subprocess.PIPE, start_new_session=True)\n"
                     "import time\ntime.sleep(0.3)\n" + WRONG,
}


def _sysv_keys() -> set[int]:
    keys = set()
    for kind in ("shm", "sem", "msg"):
        try:
            lines = pathlib.Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        keys |= {int(line.split()[0]) for line in lines if line.split()}
    return keys


def _leftover_processes() -> list[str]:
    return leftover_sandbox_processes(marker=f"sleep {SLEEP_S}")


def test_reward_hacks_score_zero_and_leave_nothing_behind(fault_log):
    children_before = child_pids()
    dirs = _world_writable_dirs()
    assert "/tmp" in dirs
    programs = dict(HACKS)
    programs["files_everywhere"] = LEAVE_BEHIND["files_everywhere"] % (dirs, TAG, TAG)
    programs["sysv_shm"] = LEAVE_BEHIND["sysv_shm"] % SHM_KEY
    programs["posix_shm"] = LEAVE_BEHIND["posix_shm"] % TAG
    programs["setsid_daemon"] = LEAVE_BEHIND["setsid_daemon"] % (SLEEP_S, SLEEP_S)
    programs["setuid_binary"] = LEAVE_BEHIND["setuid_binary"]
    names = list(programs) + ["honest"]
    keys_before = _sysv_keys()

    with ScorerPool(num_workers=1, timeout_s=60) as pool:
        results = pool.score("code", list(programs.values()) + [HONEST], [REF] * len(names), wall_s=3.0, cpu_s=3)
        workers = [w.proc.pid for w in pool._workers]
        assert len(workers) == 1 and pool._workers[0].proc.poll() is None
        first_worker = workers[0]
        (after,) = pool.score("code", [HONEST], [REF], wall_s=3.0, cpu_s=3)
        assert [w.proc.pid for w in pool._workers] == [first_worker], "the worker was replaced"

    by_name = dict(zip(names, results))
    for name in programs:
        res = by_name[name]
        assert res.score == 0.0, (name, res.info)
        assert "scoring worker" not in res.info.get("reason", ""), (name, res.info)  # same worker throughout
        fault_log(f"code program: {name}", "contained")
    assert by_name["honest"].score == 1.0, by_name["honest"].info
    assert after.score == 1.0, after.info
    # compiled inside the sandbox (its limits stop it), never in the worker
    assert re.search("does not compile|ended before its tests ran", by_name["syntax_error_8mb"].info["reason"])
    for name in ("sysv_shm", "posix_shm", "setsid_daemon", "files_everywhere"):  # they did run
        assert by_name[name].info["reason"].startswith("failed tests"), (name, by_name[name].info)
    assert "results for one call" in by_name["forged_channel_all_values"].info["reason"]

    leaked_files = [os.path.join(d, n) for d in dirs for n in (TAG, f".{TAG}-hidden")
                    if os.path.lexists(os.path.join(d, n))]
    leaked_files += [f"/dev/shm/{TAG}"] if os.path.exists(f"/dev/shm/{TAG}") else []
    assert not leaked_files, leaked_files
    assert SHM_KEY not in _sysv_keys(), "a SysV shared-memory segment outlived the sandbox"
    assert _sysv_keys() <= keys_before | _sysv_keys() - {SHM_KEY}
    assert _leftover_processes() == [], "processes started from the sandbox survived"
    assert new_children(children_before) == []


def test_the_expected_values_never_reach_the_child():
    """A program that dumps every string it can find to stdout never sees `== 4`'s 4 side."""
    spy = ("import gc, sys\nseen = [o for o in gc.get_objects() if isinstance(o, (str, bytes))]\n"
           "f = sys._getframe()\nwhile f:\n    seen += [repr(v) for v in f.f_locals.values()]\n    f = f.f_back\n"
           "print('SPY', [s for s in seen if 'sq(' in str(s)])\n" + WRONG)
    ref = {"tests": ["assert sq(12345) == 152399025", "assert sq(7) in (49, 'x')"]}
    with ScorerPool(num_workers=1) as pool:
        (res,) = pool.score("code", [spy], [ref])
    out = res.info["output_tail"]
    assert "SPY" in out and "sq(12345)" in out  # the calls are there ...
    assert "152399025" not in out and "'x'" not in out  # ... the expected values are not
    assert res.score == 0.0
