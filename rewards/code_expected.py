"""The expected side of a code test, evaluated in the parent by a restricted evaluator.

A sub-expression of a test that names nothing of the program's (only literals,
comprehension variables, a whitelist of pure builtins and `math` functions, and a
whitelist of non-mutating methods of plain values) is *pure*: `'abc'[::-1]`,
`'ab'.upper()`, `[x * x for x in range(4)]`, `dict(a=1)`, `list(range(3))`,
`tuple(sorted({3, 1}))`. `evaluate` computes it here, from the AST, with this process's
own builtins, under a budget of steps and a bound on the size of what it builds, so the
expected value never reaches the program's interpreter and the program cannot change
how it is computed (it used to be evaluated in the child, where the program could
rewrite the harness's list of calls, its encoder or a builtin the expression used).
Anything else in a test (a call of the program's function, a name bound by the program
or the setup) is the candidate's side and runs in the sandbox (`rewards.code_tests`).
"""

from __future__ import annotations

import ast
import math
from typing import Any

MAX_STEPS = 200_000  # AST nodes evaluated (and items iterated) per expression
MAX_SIZE = 100_000  # elements / characters of any value it builds

_BUILTINS: dict[str, Any] = {
    "abs": abs, "round": round, "len": len, "set": set, "frozenset": frozenset, "sorted": sorted,
    "list": list, "tuple": tuple, "dict": dict, "min": min, "max": max, "sum": sum, "str": str, "int": int,
    "float": float, "bool": bool, "complex": complex, "all": all, "any": any, "range": range,
    "reversed": lambda x: list(reversed(x)), "enumerate": lambda *a, **k: list(enumerate(*a, **k)),
    "zip": lambda *a: list(zip(*a)), "chr": chr, "ord": ord, "divmod": divmod, "hex": hex, "oct": oct,
    "bin": bin, "repr": repr, "bytes": bytes,
}
_MATH = {name: getattr(math, name) for name in (
    "isclose", "sqrt", "floor", "ceil", "gcd", "lcm", "log", "log2", "log10", "exp", "fabs", "trunc", "sin",
    "cos", "tan", "asin", "acos", "atan", "atan2", "hypot", "degrees", "radians", "isnan", "isinf", "isfinite",
    "copysign", "fsum", "prod", "pi", "e", "tau", "inf", "nan")}
_MATH_BOUNDED = {"factorial": math.factorial, "comb": math.comb, "perm": math.perm}  # argument <= MAX_SIZE
_METHODS = frozenset((
    # str / bytes
    "upper", "lower", "title", "capitalize", "swapcase", "casefold", "strip", "lstrip", "rstrip", "split",
    "rsplit", "splitlines", "join", "replace", "startswith", "endswith", "find", "rfind", "index", "rindex",
    "count", "isdigit", "isalpha", "isalnum", "isupper", "islower", "isspace", "isnumeric", "isdecimal",
    "istitle", "partition", "rpartition", "removeprefix", "removesuffix", "encode", "decode", "hex",
    "zfill", "center", "ljust", "rjust",
    # dict / set / list / tuple / numbers (none of them mutates)
    "keys", "values", "items", "get", "copy", "union", "intersection", "difference", "symmetric_difference",
    "issubset", "issuperset", "isdisjoint", "bit_length", "is_integer", "conjugate", "as_integer_ratio",
))
_WIDTH_METHODS = frozenset(("zfill", "center", "ljust", "rjust"))
_ATTRS = frozenset(("real", "imag"))
_CMP = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_BIN = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a ** b, ast.BitAnd: lambda a, b: a & b, ast.BitOr: lambda a, b: a | b,
    ast.BitXor: lambda a, b: a ^ b, ast.LShift: lambda a, b: a << b, ast.RShift: lambda a, b: a >> b,
}
_UNARY = {ast.Not: lambda v: not v, ast.USub: lambda v: -v, ast.UAdd: lambda v: +v, ast.Invert: lambda v: ~v}
_COMPS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


class ExpectedValueError(ValueError):
    """A pure expression that this evaluator refuses (too large, too long)."""


def comprehension_names(node: ast.AST) -> set[str]:
    """Names bound by comprehension targets anywhere inside `node`."""
    return _bound_names(node)


def _bound_names(node: ast.AST) -> set[str]:
    """Names bound by comprehension targets anywhere inside `node`."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.comprehension):
            out |= {t.id for t in ast.walk(n.target) if isinstance(t, ast.Name)}
    return out


def is_pure(node: ast.AST) -> bool:
    """Whether `node` can be evaluated here: it names nothing but comprehension variables,
    `_BUILTINS` and `math.<whitelisted>`, and calls only those and `_METHODS` of values."""
    bound = _bound_names(node)
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            if n.id not in bound and n.id not in _BUILTINS and n.id != "math":
                return False
            if not isinstance(n.ctx, ast.Load) and n.id not in bound:
                return False
        elif isinstance(n, ast.Attribute):
            if isinstance(n.value, ast.Name) and n.value.id == "math" and "math" not in bound:
                if n.attr not in _MATH and n.attr not in _MATH_BOUNDED:
                    return False
            elif n.attr not in _METHODS and n.attr not in _ATTRS:
                return False
        elif isinstance(n, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            return False
        elif isinstance(n, ast.FormattedValue) and n.format_spec is not None:
            return False  # '{:999999999}'.format-style widths: not evaluated here
    # a bare `math` (not `math.x`) is not a value here
    parents = {id(c): p for p in ast.walk(node) for c in ast.iter_child_nodes(p)}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id == "math" and "math" not in bound and not isinstance(parents.get(id(n)), ast.Attribute):
            return False
    return True


def evaluate(node: ast.AST) -> Any:
    """The value of the pure expression `node` (`is_pure`), as Python would compute it;
    raises what Python would raise, or ExpectedValueError past the budget or size bound."""
    return _Evaluator().eval(node, {})


class _Evaluator:
    def __init__(self) -> None:
        self.steps = 0

    def _tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise ExpectedValueError(f"expected value takes more than {MAX_STEPS:,} steps to evaluate")

    def _sized(self, v: Any) -> Any:
        if isinstance(v, (str, bytes, list, tuple, set, frozenset, dict)) and len(v) > MAX_SIZE:
            raise ExpectedValueError(f"expected value larger than {MAX_SIZE:,} elements")
        if isinstance(v, range) and len(v) > MAX_SIZE:
            raise ExpectedValueError(f"range of more than {MAX_SIZE:,} elements")
        return v

    def eval(self, node: ast.AST, env: dict[str, Any]) -> Any:  # noqa: C901 - one case per node type
        self._tick()
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id] if node.id in env else _BUILTINS[node.id]
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "math" and "math" not in env:
                return _MATH.get(node.attr) or _bounded_math(node.attr)
            value = self.eval(node.value, env)
            return getattr(value, node.attr)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = self._items(node.elts, env)
            return self._sized({ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items))
        if isinstance(node, ast.Dict):
            out: dict = {}
            for k, v in zip(node.keys, node.values):
                if k is None:
                    out.update(self.eval(v, env))
                else:
                    out[self.eval(k, env)] = self.eval(v, env)
            return self._sized(out)
        if isinstance(node, ast.BinOp):
            a, b = self.eval(node.left, env), self.eval(node.right, env)
            _guard_binop(type(node.op), a, b)
            return self._sized(_BIN[type(node.op)](a, b))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self.eval(node.operand, env))
        if isinstance(node, ast.BoolOp):
            v: Any = None
            for child in node.values:
                v = self.eval(child, env)
                if bool(v) == isinstance(node.op, ast.Or):
                    return v
            return v
        if isinstance(node, ast.Compare):
            left = self.eval(node.left, env)
            for op, child in zip(node.ops, node.comparators):
                right = self.eval(child, env)
                if not _CMP[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body if self.eval(node.test, env) else node.orelse, env)
        if isinstance(node, ast.Subscript):
            return self._sized(self.eval(node.value, env)[self.eval(node.slice, env)])
        if isinstance(node, ast.Slice):
            return slice(*(None if p is None else self.eval(p, env) for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Call):
            return self._call(node, env)
        if isinstance(node, _COMPS):
            return self._comprehension(node, env)
        if isinstance(node, ast.JoinedStr):
            return self._sized("".join(self._fmt(v, env) for v in node.values))
        raise ExpectedValueError(f"{type(node).__name__} is not evaluated in an expected value")

    def _fmt(self, node: ast.AST, env: dict[str, Any]) -> str:
        if isinstance(node, ast.Constant):
            return node.value
        v = self.eval(node.value, env)
        return {-1: format, 115: str, 114: repr, 97: ascii}[node.conversion](v) if node.conversion != -1 else format(v)

    def _items(self, elts: list[ast.expr], env: dict[str, Any]) -> list:
        out: list = []
        for e in elts:
            if isinstance(e, ast.Starred):
                out.extend(self._iterate(self.eval(e.value, env)))
            else:
                out.append(self.eval(e, env))
        return out

    def _iterate(self, iterable: Any) -> list:
        self._sized(iterable)
        items = []
        for x in iterable:
            self._tick()
            items.append(x)
            if len(items) > MAX_SIZE:
                raise ExpectedValueError(f"iteration over more than {MAX_SIZE:,} elements")
        return items

    def _call(self, node: ast.Call, env: dict[str, Any]) -> Any:
        args = self._items(node.args, env)
        kwargs: dict[str, Any] = {}
        for k in node.keywords:
            if k.arg is None:
                kwargs.update(self.eval(k.value, env))
            else:
                kwargs[k.arg] = self.eval(k.value, env)
        f = node.func
        if isinstance(f, ast.Attribute) and not (isinstance(f.value, ast.Name) and f.value.id == "math"
                                                 and "math" not in env):
            receiver = self.eval(f.value, env)
            if f.attr in _WIDTH_METHODS and args and isinstance(args[0], int) and args[0] > MAX_SIZE:
                raise ExpectedValueError(f"{f.attr}({args[0]}) is larger than {MAX_SIZE:,} characters")
            if f.attr == "replace" and isinstance(receiver, (str, bytes)) and len(args) >= 2 \
                    and len(receiver) * max(1, len(args[1])) > MAX_SIZE * 10:
                raise ExpectedValueError("replace() result may be too large")
            return self._sized(getattr(receiver, f.attr)(*args, **kwargs))
        func = self.eval(f, env)
        if func is range:
            return self._sized(range(*args))
        if func in (sum, min, max, sorted, list, tuple, set, frozenset, dict, all, any, str) and args \
                and not isinstance(args[0], (str, bytes, int, float, complex)):
            args = [self._iterate(args[0]) if not isinstance(args[0], dict) else args[0]] + args[1:]
        if func is sum and args and isinstance(args[0], list):
            seqs = [len(x) for x in args[0] if isinstance(x, (list, tuple, str, bytes))]
            if seqs and len(seqs) * sum(seqs) > 100 * MAX_SIZE:  # sum() of sequences copies quadratically
                raise ExpectedValueError("sum() of too many sequences")
        if func is bytes and args and isinstance(args[0], int) and args[0] > MAX_SIZE:
            raise ExpectedValueError(f"bytes({args[0]}) is larger than {MAX_SIZE:,}")
        return self._sized(func(*args, **kwargs))

    def _comprehension(self, node: ast.AST, env: dict[str, Any]) -> Any:
        results: list = []

        def run(gens: list[ast.comprehension], scope: dict[str, Any]) -> None:
            if not gens:
                self._tick()
                if isinstance(node, ast.DictComp):
                    results.append((self.eval(node.key, scope), self.eval(node.value, scope)))
                else:
                    results.append(self.eval(node.elt, scope))
                if len(results) > MAX_SIZE:
                    raise ExpectedValueError(f"comprehension of more than {MAX_SIZE:,} elements")
                return
            g = gens[0]
            for item in self._iterate(self.eval(g.iter, scope)):
                inner = dict(scope)
                _assign(g.target, item, inner)
                if all(self.eval(c, inner) for c in g.ifs):
                    run(gens[1:], inner)

        run(node.generators, env)
        if isinstance(node, ast.DictComp):
            return dict(results)
        if isinstance(node, ast.SetComp):
            return set(results)
        return results  # a list, also for a generator expression (consumed by its caller)


def _assign(target: ast.AST, value: Any, scope: dict[str, Any]) -> None:
    if isinstance(target, ast.Name):
        scope[target.id] = value
    elif isinstance(target, (ast.Tuple, ast.List)):
        values = list(value)
        if len(values) != len(target.elts):
            raise ValueError(f"cannot unpack {len(values)} values into {len(target.elts)} targets")
        for t, v in zip(target.elts, values):
            _assign(t, v, scope)
    else:
        raise ExpectedValueError(f"comprehension target {type(target).__name__} is not evaluated")


def _bounded_math(name: str) -> Any:
    f = _MATH_BOUNDED[name]

    def call(*args: Any) -> Any:
        if any(isinstance(a, int) and a > MAX_SIZE for a in args):
            raise ExpectedValueError(f"math.{name} of more than {MAX_SIZE:,}")
        return f(*args)

    return call


def guard_repeat_and_power(op: type, a: Any, b: Any, *, max_seq: int, max_pow_bits: int,
                           error: type[Exception]) -> None:
    """Refuse `seq * n` longer than `max_seq` elements and `int ** int` wider than
    `max_pow_bits` bits before computing them (raises `error`); shared with code_tests."""
    seq = (str, bytes, list, tuple)
    if op is ast.Mult and ((isinstance(a, seq) and isinstance(b, int)) or (isinstance(b, seq) and isinstance(a, int))):
        s, n = (a, b) if isinstance(a, seq) else (b, a)
        if len(s) * max(n, 0) > max_seq:
            raise error(f"repetition of {len(s)} elements {n} times is too large to evaluate")
    if op is ast.Pow and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 \
            and a.bit_length() * b > max_pow_bits:
        raise error("power too large to evaluate")


def _guard_binop(op: type, a: Any, b: Any) -> None:
    guard_repeat_and_power(op, a, b, max_seq=MAX_SIZE, max_pow_bits=4 * MAX_SIZE, error=ExpectedValueError)
    if op is ast.LShift and isinstance(b, int) and b > 4 * MAX_SIZE:
        raise ExpectedValueError("shift too large to evaluate")
    if op is ast.Mod and isinstance(a, (str, bytes)):
        raise ExpectedValueError("%-formatting is not evaluated in an expected value")
