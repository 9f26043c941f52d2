"""The pure-math modules import only torch and the stdlib: importing them, in a fresh
interpreter, must not load ray, deepspeed, vllm or transformers."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEAVY = ("ray", "deepspeed", "vllm", "transformers")


def loaded_after_import(modules: list[str], watch: tuple[str, ...]) -> list[str]:
    """Import `modules` in a fresh interpreter; return which of `watch` are in sys.modules."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(json.dumps(sorted(h for h in {watch!r} if h in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pure_math_modules_do_not_import_heavy_packages():
    modules = ["experts.advantages", "experts.losses", "engine.logprobs"]
    if (ROOT / "distill" / "kl.py").exists():  # written by another engineer; checked once it exists
        modules.append("distill.kl")
    loaded = loaded_after_import(modules, HEAVY)
    assert loaded == [], f"importing {modules} loaded {loaded}"


def test_the_probe_sees_what_is_imported():
    # guards against a vacuous probe: a module that is imported is reported
    assert loaded_after_import(["csv"], ("csv", "ray")) == ["csv"]
