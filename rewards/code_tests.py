"""Code tests judged outside the untrusted interpreter: plans, a plain-value codec, verdicts.

A test `assert <expr>` is split with `ast` into a *plan*: every sub-expression that names
nothing of the program's (the expected side: `'abc'[::-1]`, `list(range(3))`, a
comprehension) is evaluated here by `rewards.code_expected`; the verdict structure
(comparisons, `and` / `or` / `not`, arithmetic, displays, a few pure builtins such as
`abs`, `len`, `set`, `sorted`, `math.isclose`) and every constant stay in this process;
only the maximal sub-expressions that need the program (`f(2)`, `sorted(f(x))[0]`,
a name) become *calls*, whose source is all the sandboxed child receives. The child
evaluates each call and sends back its value encoded by `encode` (JSON of plain values
only: None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, range;
anything else becomes an opaque marker that equals nothing and has no truth value).
`decode` rebuilds the value here from this process's own types, so no object of the
program (an `__eq__` that is always true, a patched builtin) survives, and `verdict`
evaluates the plan on those values. The expected values never leave this process: a
forged reply passes only if it carries the right value, which is solving the test.

What a plan cannot protect: a test whose verdict is the truth value of a child call
(`assert is_valid(f(x))` with `is_valid` from `setup`, or `assert f(3)`) is decided by
the value the child returns, which the program controls; write such tests as
comparisons (`assert is_valid(f(x)) == True` still evaluates `is_valid` in the child,
`assert f(x) == 7` does not). An expected side made only of names bound by `setup`
(`assert f(2) == K`, `== expected(3)`) is a *setup expression*: `code_reward` evaluates it
in a sandboxed run of the setup alone (no program), so rebinding `K` changes nothing; a
sub-expression mixing the setup's names with the program's (`is_valid(f(x))`) is a call.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from typing import Any

from rewards import code_expected

MAX_DEPTH = 100  # nesting of a decoded value
MAX_SEQ = 100_000  # elements a parent-side repetition (`[0] * n`) may build
MAX_POW_BITS = 4096

_CMP = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_BIN = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
def _numeric_sum(items: Any, start: Any = 0) -> Any:
    """`sum` of numbers only (summing lists of lists is quadratic)."""
    items = list(items)
    if not all(isinstance(x, (int, float, complex)) for x in items + [start]):
        raise TypeError("sum() of non-numbers is not evaluated")
    return sum(items, start)


_FUNCS = {
    "abs": abs, "round": round, "len": len, "set": set, "frozenset": frozenset, "sorted": sorted,
    "list": list, "tuple": tuple, "min": min, "max": max, "sum": _numeric_sum, "str": str, "int": int,
    "float": float, "bool": bool, "all": all, "any": any, "isclose": math.isclose, "complex": complex,
}
_FUNC_KWARGS = {"round": set(), "sorted": {"reverse"}, "isclose": {"rel_tol", "abs_tol"}}
_MATH_CONSTS = {"pi": math.pi, "e": math.e, "inf": math.inf, "nan": math.nan, "tau": math.tau}


class Opaque:
    """A child value that is not plain: equal only to itself, no truth value, no order."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __bool__(self) -> bool:
        raise TypeError(f"the program returned a {self.type_name!r} object, not a plain value")

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


class TestPlan:
    """One test: `calls` (sources the child evaluates), `setup_exprs` (expected values a
    run of the setup alone evaluates) and `root` (the verdict, kept here)."""

    def __init__(self, source: str, root: tuple, calls: list[str], setup_exprs: list[str] | None = None) -> None:
        self.source, self.root, self.calls, self.setup_exprs = source, root, calls, setup_exprs or []


class _SetupSide:
    """The names the setup binds, and the expected-side expressions made only of them."""

    def __init__(self, bound: frozenset[str]) -> None:
        self.bound, self.exprs = bound, []

    def covers(self, node: ast.AST) -> bool:
        if not self.bound:
            return False
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - code_expected.comprehension_names(node)
        return bool(names & self.bound) and all(n in self.bound or code_expected.is_pure(ast.Name(n, ast.Load()))
                                                for n in names) and _plain_expression(node)


def _plain_expression(node: ast.AST) -> bool:
    """No lambdas, walrus or the like: an expression, not a statement in disguise."""
    return not any(isinstance(n, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom))
                   for n in ast.walk(node))


def setup_names(setup: str) -> frozenset[str]:
    """Names the setup code binds at its top level (assignments, defs, classes, imports,
    loop and with targets); empty for no setup or one that does not parse."""
    try:
        tree = ast.parse(setup or "")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()
    out: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(stmt.name)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in stmt.names if a.name != "*"}
        else:
            targets = []
            if isinstance(stmt, ast.Assign):
                targets = stmt.targets
            elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
                targets = [stmt.target]
            elif isinstance(stmt, (ast.For, ast.AsyncFor)):
                targets = [stmt.target]
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                targets = [i.optional_vars for i in stmt.items if i.optional_vars is not None]
            for t in targets:
                out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return frozenset(out)


def parse_test(source: str, setup_bound: frozenset[str] = frozenset()) -> TestPlan:
    """The plan of `assert <expr>[, msg]`; ValueError for anything else. `setup_bound`:
    the names the reference's setup binds (`setup_names`); an expected-side expression
    made of them (and pure parts) is evaluated in a run of the setup alone."""
    try:
        tree = ast.parse(source, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"code test {source!r:.120} does not parse: {exc}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise ValueError(f"code test must be one `assert <expression>` statement, got {source!r:.120}")
    calls: list[str] = []
    env = _SetupSide(setup_bound)
    try:
        root = _plan(tree.body[0].test, calls, env)
    except RecursionError:
        raise ValueError(f"code test {source!r:.120} is nested too deeply") from None
    return TestPlan(source, _shift_setup(root, len(calls)), calls, env.exprs)


def _shift_setup(node: Any, offset: int) -> Any:
    """`node` with each ('setup', j) made ('setup', offset + j): setup values follow the calls' replies."""
    if isinstance(node, tuple) and node and node[0] == "setup":
        return ("setup", offset + node[1])
    if isinstance(node, tuple) and node and node[0] in ("pure", "const"):
        return node
    if isinstance(node, tuple):
        return tuple(_shift_setup(x, offset) for x in node)
    if isinstance(node, list):
        return [_shift_setup(x, offset) for x in node]
    if isinstance(node, dict):
        return {k: _shift_setup(v, offset) for k, v in node.items()}
    return node


def _func_name(node: ast.Call) -> str | None:
    f = node.func
    if isinstance(f, ast.Name) and f.id in _FUNCS:
        return f.id
    if isinstance(f, ast.Attribute) and f.attr == "isclose" and isinstance(f.value, ast.Name) and f.value.id == "math":
        return "isclose"
    return None


def _parent_call(node: ast.Call) -> str | None:
    name = _func_name(node)
    if name is None or any(isinstance(a, ast.Starred) for a in node.args):
        return None
    if any(k.arg is None or k.arg not in _FUNC_KWARGS.get(name, set()) for k in node.keywords):
        return None
    return name


def _plan(node: ast.expr, calls: list[str], env: "_SetupSide") -> tuple:
    """('const', v) | ('pure', node) | ('call', i) | (kind, ...children) for the parts evaluated here."""
    if isinstance(node, ast.Constant):
        return ("const", node.value)
    if code_expected.is_pure(node):  # the expected side: evaluated here, never in the child
        return ("pure", node)
    if env.covers(node):  # the expected side built from the setup's names: a clean run of the setup alone
        env.exprs.append(ast.unparse(node))
        return ("setup", len(env.exprs) - 1)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math" \
            and node.attr in _MATH_CONSTS:
        return ("const", _MATH_CONSTS[node.attr])
    if isinstance(node, ast.Compare):
        return ("cmp", _plan(node.left, calls, env), [(type(op), _plan(c, calls, env)) for op, c in zip(node.ops, node.comparators)])
    if isinstance(node, ast.BoolOp):
        return ("and" if isinstance(node.op, ast.And) else "or", [_plan(v, calls, env) for v in node.values])
    if isinstance(node, ast.UnaryOp):
        return ("unary", type(node.op), _plan(node.operand, calls, env))
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        return ("bin", type(node.op), _plan(node.left, calls, env), _plan(node.right, calls, env))
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and not any(isinstance(e, ast.Starred) for e in node.elts):
        return (type(node).__name__.lower(), [_plan(e, calls, env) for e in node.elts])
    if isinstance(node, ast.Dict) and None not in node.keys:
        return ("dict", [(_plan(k, calls, env), _plan(v, calls, env)) for k, v in zip(node.keys, node.values)])
    if isinstance(node, ast.IfExp):
        return ("if", _plan(node.test, calls, env), _plan(node.body, calls, env), _plan(node.orelse, calls, env))
    if isinstance(node, ast.Call):
        name = _parent_call(node)
        if name is not None:
            return ("func", name, [_plan(a, calls, env) for a in node.args], {k.arg: _plan(k.value, calls, env) for k in node.keywords})
    calls.append(ast.unparse(node))
    return ("call", len(calls) - 1)


def _guard_size(op: type, a: Any, b: Any) -> None:
    if op in (ast.Mod, ast.Div, ast.FloorDiv, ast.Pow) and not all(isinstance(x, (int, float, complex)) for x in (a, b)):
        raise TypeError(f"{op.__name__} of non-numbers is not evaluated")  # e.g. '%999999999d' % 1
    code_expected.guard_repeat_and_power(op, a, b, max_seq=MAX_SEQ, max_pow_bits=MAX_POW_BITS, error=ValueError)


def evaluate_plan_node(node: tuple, values: list[Any]) -> Any:
    """The value of a plan node given the decoded child `values`; raises like Python would."""
    kind = node[0]
    if kind == "const":
        return node[1]
    if kind == "pure":
        return code_expected.evaluate(node[1])
    if kind == "setup":
        v = values[node[1]]  # after the calls' replies (`verdict`)
        if isinstance(v, _Failed):
            raise v.error
        return v
    if kind == "call":
        v = values[node[1]]
        if isinstance(v, _Failed):
            raise v.error
        return v
    if kind == "cmp":
        left = evaluate_plan_node(node[1], values)
        for op, child in node[2]:
            right = evaluate_plan_node(child, values)
            if not _truth(_CMP[op](left, right)):
                return False
            left = right
        return True
    if kind == "and":
        out: Any = True
        for child in node[1]:
            out = evaluate_plan_node(child, values)
            if not _truth(out):
                return out
        return out
    if kind == "or":
        out = False
        for child in node[1]:
            out = evaluate_plan_node(child, values)
            if _truth(out):
                return out
        return out
    if kind == "unary":
        v = evaluate_plan_node(node[2], values)
        return {ast.Not: lambda x: not _truth(x), ast.USub: operator.neg, ast.UAdd: operator.pos,
                ast.Invert: operator.invert}[node[1]](v)
    if kind == "bin":
        a, b = evaluate_plan_node(node[2], values), evaluate_plan_node(node[3], values)
        _guard_size(node[1], a, b)
        return _BIN[node[1]](a, b)
    if kind in ("list", "tuple", "set"):
        items = [evaluate_plan_node(c, values) for c in node[1]]
        return {"list": list, "tuple": tuple, "set": set}[kind](items)
    if kind == "dict":
        return {evaluate_plan_node(k, values): evaluate_plan_node(v, values) for k, v in node[1]}
    if kind == "if":
        return evaluate_plan_node(node[2] if _truth(evaluate_plan_node(node[1], values)) else node[3], values)
    if kind == "func":
        args = [evaluate_plan_node(a, values) for a in node[2]]
        kwargs = {k: evaluate_plan_node(v, values) for k, v in node[3].items()}
        for a in args:
            if isinstance(a, Opaque):
                raise TypeError(f"{node[1]}() of a non-plain value {a!r}")
        return _FUNCS[node[1]](*args, **kwargs)
    raise AssertionError(f"unknown plan node {kind!r}")  # pragma: no cover


def _truth(v: Any) -> bool:
    return bool(v)  # an Opaque raises TypeError


class _Failed:
    """A call that raised in the child (or whose reply was unusable)."""

    def __init__(self, message: str) -> None:
        self.error = ChildError(message)


class ChildError(Exception):
    pass


def verdict(plan: TestPlan, replies: list[Any], setup_values: list[Any] = ()) -> tuple[bool, str | None]:
    """(passed, why not) for a plan given one decoded reply per call (a `_Failed` or a
    value) and one per `plan.setup_exprs` (from the run of the setup alone)."""
    try:
        ok = _truth(evaluate_plan_node(plan.root, list(replies) + list(setup_values)))
    except ChildError as exc:
        return False, str(exc)
    except (Exception, RecursionError) as exc:  # a comparison of unusable values: a failed test
        return False, f"{type(exc).__name__}: {exc}"[:500]
    return ok, None if ok else "AssertionError"


def failed(message: str) -> _Failed:
    return _Failed(message)


def decode(text: str) -> Any:
    """The plain value encoded by the child's `encode` (ValueError for anything else)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"unreadable value: {type(exc).__name__}") from None
    return _decode(obj, 0)


def decode_obj(obj: Any) -> Any:
    """The plain value of an already-parsed JSON object from the child's `encode`."""
    try:
        return _decode(obj, 0)
    except RecursionError:
        raise ValueError("value nested too deeply") from None


def _decode(o: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    if isinstance(o, list):
        return [_decode(x, depth + 1) for x in o]
    if isinstance(o, dict) and len(o) == 1:
        (tag, v), = o.items()
        try:
            if tag == "x" and isinstance(v, str):
                return bytes.fromhex(v).decode("utf-8", "surrogatepass")
            if tag == "f" and isinstance(v, str) and len(v) <= 40:
                return float(v)
            if tag == "t" and isinstance(v, list):
                return tuple(_decode(x, depth + 1) for x in v)
            if tag in ("s", "z") and isinstance(v, list):
                return (set if tag == "s" else frozenset)(_decode(x, depth + 1) for x in v)
            if tag == "d" and isinstance(v, list):
                out = {}
                for pair in v:
                    if not (isinstance(pair, list) and len(pair) == 2):
                        raise ValueError("bad dict item")
                    out[_decode(pair[0], depth + 1)] = _decode(pair[1], depth + 1)
                return out
            if tag == "c" and isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and len(x) <= 40 for x in v):
                return complex(float(v[0]), float(v[1]))
            if tag == "b" and isinstance(v, str):
                return bytes.fromhex(v)
            if tag == "r" and isinstance(v, list) and len(v) == 3 and all(type(x) is int for x in v) and v[2]:
                return range(*v)
            if tag == "o":
                name = _decode(v, depth + 1) if isinstance(v, dict) else v
                return Opaque(name[:100] if isinstance(name, str) else "?")
        except (TypeError, UnicodeDecodeError) as exc:  # an unhashable key / element, bad text
            raise ValueError(f"bad value: {exc}") from None
    raise ValueError("not an encoded plain value")


# The child's encoder, shipped into the sandbox as source (no imports: `json` and
# `traceback` would double the interpreter's start-up time). It writes JSON text; strings
# travel as hex of their UTF-8 ("x"), floats as their repr ("f").
ENCODER_SOURCE = r'''
def _s(x):
    return '{"x":"' + str.encode(x, "utf-8", "surrogatepass").hex() + '"}'

def _f(x):
    return '"' + float.__repr__(x) + '"'

def _encode(x, depth=0):
    if depth > 100:
        raise ValueError("value nested too deeply")
    t = type(x)
    if x is None:
        return "null"
    if t is bool:
        return "true" if x else "false"
    if t is int:
        return int.__repr__(x)
    if t is float:
        return '{"f":' + _f(x) + '}'
    if t is str:
        return _s(x)
    if t is list:
        return "[" + ",".join([_encode(v, depth + 1) for v in list.__iter__(x)]) + "]"
    if t is tuple:
        return '{"t":[' + ",".join([_encode(v, depth + 1) for v in tuple.__iter__(x)]) + "]}"
    if t is set or t is frozenset:
        return '{"' + ("s" if t is set else "z") + '":[' + ",".join([_encode(v, depth + 1) for v in t.__iter__(x)]) + "]}"
    if t is dict:
        return '{"d":[' + ",".join(["[" + _encode(k, depth + 1) + "," + _encode(v, depth + 1) + "]"
                                    for k, v in dict.items(x)]) + "]}"
    if t is complex:
        return '{"c":[' + _f(x.real) + "," + _f(x.imag) + "]}"
    if t is bytes:
        return '{"b":"' + bytes.hex(x) + '"}'
    if t is range:
        return '{"r":[' + int.__repr__(x.start) + "," + int.__repr__(x.stop) + "," + int.__repr__(x.step) + "]}"
    return '{"o":' + _s(str(type.__getattribute__(t, "__qualname__"))[:100]) + "}"
'''
