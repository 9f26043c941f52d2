"""No two modules of the packages define a public function of the same name with
different meanings (issue 19: three `compute_token_logprobs`, two `split_rows`).

Walks the AST of every module of the five packages and lists the module-level public
functions (no leading underscore) defined in more than one module. The only names allowed
to repeat are the protocol entries below: one function per module that a registry or a
runner looks up by the same name, with the same signature and meaning in each.
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "experts", "distill", "pipeline", "rewards")

SAME_MEANING = {
    # engine/domains/*.py: each synthetic domain's `draw(rng, split) -> (prompt, row)`, handed
    # to `register_domain(Domain(draw=draw))`
    "draw",
    # each verifier module's `reference_problem(reference) -> reason | None`: why that verifier
    # cannot use a reference, registered with `@register_reference_check(verifier)` and
    # looked up by `rewards.check_reference`
    "reference_problem",
    # a module's command-line entry point (`python -m ...`, the console script, the scorer
    # worker process)
    "main",
}


def public_functions(root: pathlib.Path = ROOT, packages=PACKAGES) -> dict[str, list[str]]:
    """Function name -> the modules that define it at module level (public names only)."""
    found: dict[str, list[str]] = defaultdict(list)
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.parse(path.read_text(), filename=str(path)).body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                    found[node.name].append(str(path.relative_to(root)))
    return found


def repeated_names(found: dict[str, list[str]], allowed=frozenset(SAME_MEANING)) -> dict[str, list[str]]:
    return {name: where for name, where in sorted(found.items()) if len(where) > 1 and name not in allowed}


def test_no_public_function_name_is_defined_twice_with_another_meaning():
    repeated = repeated_names(public_functions())
    assert not repeated, "public functions defined in more than one module:\n" + "\n".join(
        f"  {name}: {', '.join(where)}" for name, where in repeated.items())


def test_the_allow_list_names_only_repeated_protocol_functions():
    """An entry that is no longer repeated is stale (the walk must still see each one)."""
    found = public_functions()
    assert {name for name in SAME_MEANING if len(found.get(name, [])) > 1} == SAME_MEANING


def test_the_walk_finds_a_repeated_name(tmp_path):
    for pkg, body in (("a", "def load(x):\n    return x\n"), ("b", "def load(path):\n    return open(path)\n"),
                      ("c", "def _load():\n    pass\nclass K:\n    def load(self):\n        pass\n")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(body)
    found = public_functions(tmp_path, ("a", "b", "c"))
    assert repeated_names(found) == {"load": ["a/m.py", "b/m.py"]}  # private and method names are not counted
    assert repeated_names(found, frozenset({"load"})) == {}
