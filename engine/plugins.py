"""Plug-ins by import path: `package.module:function` wherever a config names an adapter,
a verifier or a tool environment, next to the built-in names.

A config lists the directories that hold the user's modules in `python_path`; every
process that reads the config (validate, the runner, each stage process) puts them on
`sys.path` and on `PYTHONPATH` (`activate`), so the processes a stage starts (scoring
workers, trainer rank actors, vLLM workers) import them too; a Ray job gets them through
its runtime environment (pipeline.launch.job_request). Standard library only.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any, Callable, Sequence

_IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class PluginError(KeyError):
    """An import path that does not name an importable callable (a KeyError, as an unknown
    registry name is); `str()` is the plain message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def is_import_path(name: object) -> bool:
    """Whether `name` looks like `package.module:function` (not a built-in name)."""
    return isinstance(name, str) and ":" in name


def load_object(spec: str, kind: str = "plug-in") -> Callable[..., Any]:
    """The callable `package.module:function` names; a PluginError that says which part
    failed (bad form, module not importable, no such attribute, not callable)."""
    if not _IMPORT_PATH.match(spec):
        raise PluginError(f"{kind} {spec!r}: an import path must look like 'package.module:function'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ModuleNotFoundError, or the module's own import-time error
        where = "" if isinstance(exc, ModuleNotFoundError) else " (it raised while importing)"
        raise PluginError(f"{kind} {spec!r}: cannot import module {module_name!r}{where}: "
                          f"{type(exc).__name__}: {exc}; is its directory in the config's python_path? "
                          f"(sys.path: {sys.path[:6]})") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise PluginError(f"{kind} {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                          f"has no attribute {attr!r}") from None
    if not callable(obj):
        raise PluginError(f"{kind} {spec!r}: {type(obj).__name__} is not callable")
    return obj


def signature_problem(fn: Callable[..., Any], args: Sequence[str], kwargs: Sequence[str] = ()) -> str | None:
    """Why `fn` cannot be called as `fn(<args...>, <kw>=...)`, or None."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: take it as it is
        return None
    try:
        sig.bind(*args, **{k: None for k in kwargs})
    except TypeError as exc:
        call = ", ".join([*args, *(f"{k}=..." for k in kwargs)])
        return f"must be callable as f({call}); {getattr(fn, '__name__', fn)}{sig}: {exc}"
    return None


def activate(dirs: Sequence[str | os.PathLike]) -> None:
    """Put `dirs` first on `sys.path` and on `PYTHONPATH` (for the processes started from
    here), each once."""
    paths = [os.path.abspath(os.fspath(d)) for d in dirs]
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    new = [p for p in paths if p not in current]
    if new:
        os.environ["PYTHONPATH"] = os.pathsep.join(new + current)
