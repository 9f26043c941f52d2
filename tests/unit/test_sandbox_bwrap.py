"""The bubblewrap command line of the code sandbox (rewards/sandbox_bwrap.py), without running it."""

import os
import shutil
import sys

import pytest

from rewards import sandbox_bwrap as sbw

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bwrap", "setpriv", "unshare")),
                                reason="bubblewrap / util-linux not installed")


def _binds(argv: list[str]) -> list[str]:
    """Host paths bound into the sandbox."""
    return [argv[i + 1] for i, a in enumerate(argv) if a in ("--ro-bind", "--bind", "--dev-bind")]


def test_only_system_dirs_the_interpreter_and_devices_are_bound():
    argv = sbw.bwrap_argv(["python", "-c", "pass"], {"PATH": "/usr/bin"}, 1234567, 1 << 20, userns=True)
    allowed = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache", "/dev/")
    install = os.path.realpath(sys.base_prefix)
    for path in _binds(argv):
        assert path.startswith(allowed) or path == install, path
    assert "/work" not in " ".join(_binds(argv)) and "/home" not in _binds(argv)
    tmp = argv.index("/tmp", argv.index("--tmpfs") if "--tmpfs" in argv else 0)
    assert argv[tmp - 1] == "--tmpfs" and argv[argv.index("--size") + 1] == str(1 << 20)
    tail = argv[argv.index("--") + 1:]
    assert tail[0].endswith("setpriv") and "--reuid=1234567" in tail and "--no-new-privs" in tail
    assert any(t.endswith("unshare") for t in tail) and tail[-3:] == ["python", "-c", "pass"]
    assert "--clearenv" in argv and argv[argv.index("--setenv") + 1:argv.index("--setenv") + 3] == ["PATH", "/usr/bin"]


def test_without_a_user_namespace_the_rest_holds_and_probe_falls_back(monkeypatch):
    argv = sbw.bwrap_argv(["python"], {}, 1234567, 1 << 20, userns=False)
    assert not any(a.endswith("unshare") for a in argv) and any(a.endswith("setpriv") for a in argv)
    calls = []

    def fake_probe(uid, userns):
        calls.append(userns)
        return "unshare: unshare failed: Operation not permitted" if userns else None

    monkeypatch.setattr(sbw, "_probe", fake_probe)
    monkeypatch.setattr(sbw, "_own_userns", {})
    assert sbw.probe_error(1234567) is None and calls == [True, False]
    assert sbw.own_user_namespace() is False
    monkeypatch.setattr(sbw, "_probe", lambda uid, userns: "bwrap: no")
    assert sbw.probe_error(1234567) == "bwrap: no"


def test_signal_exits_map_to_negative_codes():
    assert sbw.status_from_bwrap(128 + 9) == -9 and sbw.status_from_bwrap(128 + 24) == -24
    assert sbw.status_from_bwrap(0) == 0 and sbw.status_from_bwrap(1) == 1 and sbw.status_from_bwrap(None) is None
