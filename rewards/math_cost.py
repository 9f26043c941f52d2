"""Refuse math answers whose evaluation would explode, before sympy sees them.

math-verify hands an answer to sympy, which evaluates numbers exactly and expands
polynomials: `10^{10^{10}}`, `9^{9^{9}}`, `(10^{10})!`, `\\binom{10^9}{10^6}` and
`(x+1)^{100000}` are a dozen characters each and hold a worker until the pool's per-item
timeout (measured: `(x+1)^{1000}` > 20 s, `(x+1)^{100}` 0.6 s, `2^{100000}` 0.01 s).
`explosion(answer)` reads the answer as an arithmetic expression (LaTeX braces,
`\\frac`, `\\binom`, `\\cdot`, `!`, `^` / `**`, implicit products; any other command or
letter is a symbol) and estimates, in floating point (overflow is infinity, never an
exception), the size of every power, factorial and binomial in it:
- a power's exponent above MAX_EXPONENT, or a numeric power with more than MAX_DIGITS
  digits (so a tower of powers is caught at its inner level);
- a power above MAX_SYMBOLIC_EXPONENT of a base that is a sum holding a symbol (an
  expansion of that many terms);
- a factorial of more than MAX_FACTORIAL, or a binomial `\\binom{n}{k}` with
  min(k, n - k) above MAX_FACTORIAL.
Anything it cannot read as arithmetic it leaves to the other guards (length, nesting).
"""

from __future__ import annotations

import ast
import math
import re

MAX_EXPONENT = 100_000
MAX_DIGITS = 100_000  # decimal digits of a numeric power
MAX_SYMBOLIC_EXPONENT = 64  # (x+1)^64 expands in ~0.3 s; ^1000 takes > 20 s
MAX_FACTORIAL = 100_000

_CMD_RE = re.compile(r"\\([a-zA-Z]+)")
_DROP = ("left", "right", "big", "Big", "bigg", "Bigg", "displaystyle", "mathrm", "text", "operatorname")


def _to_python(answer: str) -> str:
    """A Python-syntax reading of a LaTeX arithmetic answer (may not parse; then ignored)."""
    s = answer.replace("$", " ")
    s = _CMD_RE.sub(lambda m: {"cdot": "*", "times": "*", "div": "/", "frac": " _frac", "dfrac": " _frac",
                               "tfrac": " _frac", "binom": " _binom", "dbinom": " _binom", "tbinom": " _binom"}.get(
        m.group(1), " " if m.group(1) in _DROP else f" _sym_{m.group(1)} "), s)
    s = s.replace("{", "(").replace("}", ")").replace("[", "(").replace("]", ")").replace("^", "**")
    for name in ("_frac", "_binom"):  # _frac(a)(b) -> _frac(a,b)
        pos = 0
        while (i := s.find(name + "(", pos)) != -1:
            j = _closing(s, i + len(name))
            pos = i + 1
            if j is not None and s[j + 1:j + 2] == "(":
                s = s[:j] + "," + s[j + 2:]
    return re.sub(r"\)\s*\(", ")*(", s).replace("\\", " ")  # implicit product of groups: (a)(b)


def _closing(s: str, open_at: int) -> int | None:
    """Index of the `)` matching the `(` at `open_at`, or None."""
    depth = 0
    for i in range(open_at, len(s)):
        depth += {"(": 1, ")": -1}.get(s[i], 0)
        if depth == 0:
            return i
    return None


class _Cost:
    def __init__(self) -> None:
        self.reason: str | None = None

    def value(self, node: ast.AST) -> tuple[float | None, bool]:
        """(numeric value or None when it holds a symbol, whether it is a sum/difference)."""
        if self.reason:
            return None, False
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value), False
        if isinstance(node, ast.UnaryOp):
            v, _ = self.value(node.operand)
            return (None if v is None else -v if isinstance(node.op, ast.USub) else v), False
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [self.value(a)[0] for a in node.args]
            if node.func.id == "_fact" and args:
                n = args[0]
                if n is not None and n > MAX_FACTORIAL:
                    self.reason = f"factorial of {n:.3g} (more than {MAX_FACTORIAL:,}) is too costly to evaluate"
                return (math.inf if n is not None and n > 170 else None if n is None else _safe(math.gamma, n + 1)), False
            if node.func.id == "_binom" and len(args) >= 2:
                n, k = args[0], args[1]
                if n is not None and k is not None and min(k, n - k) > MAX_FACTORIAL:
                    self.reason = f"binomial coefficient C({n:.3g}, {k:.3g}) is too costly to evaluate"
                return None, False
            if node.func.id == "_frac" and len(args) >= 2:
                a, b = args[0], args[1]
                return (None if a is None or b is None or b == 0 else _safe(lambda: a / b)), False
            return None, False
        for child in ast.iter_child_nodes(node):
            self.value(child)
        return None, False

    def _binop(self, node: ast.BinOp) -> tuple[float | None, bool]:
        a, a_sum = self.value(node.left)
        b, _ = self.value(node.right)
        if isinstance(node.op, ast.Pow):
            if b is not None and abs(b) > MAX_EXPONENT:
                self.reason = f"power with exponent {b:.3g} (more than {MAX_EXPONENT:,}) is too costly to evaluate"
            elif a is not None and b is not None and abs(a) > 1 and b * math.log10(abs(a)) > MAX_DIGITS:
                self.reason = f"a power of about {b * math.log10(abs(a)):.3g} digits is too costly to evaluate"
            elif a is None and a_sum and b is not None and b > MAX_SYMBOLIC_EXPONENT:
                self.reason = (f"a sum with a symbol to the power {b:.3g} (more than {MAX_SYMBOLIC_EXPONENT}) "
                               "is too costly to expand")
            if a is None or b is None:
                return None, False
            return _safe(lambda: a ** b if a > 0 or float(b).is_integer() else math.nan), False
        if a is None or b is None:
            return None, isinstance(node.op, (ast.Add, ast.Sub))
        op = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
              ast.Div: lambda: a / b if b else math.nan}.get(type(node.op))
        return (None if op is None else _safe(op)), isinstance(node.op, (ast.Add, ast.Sub))


def _safe(f, *args) -> float:
    try:
        return float(f(*args))
    except OverflowError:
        return math.inf
    except (ValueError, ZeroDivisionError, TypeError):
        return math.nan


_FACT_RE = re.compile(r"(\d+(?:\.\d+)?|_sym_\w+|[A-Za-z])\s*!|(\))\s*!")


def _with_factorials(s: str) -> str:
    """`n!` -> `_fact(n)`, `(...)!` -> `_fact(...)` (the group found by matching parentheses)."""
    out = s
    for _ in range(64):
        m = _FACT_RE.search(out)
        if not m:
            return out
        if m.group(1):
            out = out[:m.start()] + f"_fact({m.group(1)})" + out[m.end():]
            continue
        close, depth, i = m.start(2), 0, m.start(2)
        while i >= 0:
            depth += {")": 1, "(": -1}.get(out[i], 0)
            if depth == 0:
                break
            i -= 1
        if i < 0:
            return out
        while i > 0 and (out[i - 1].isalnum() or out[i - 1] == "_"):  # a call: f(x)! -> _fact(f(x))
            i -= 1
        out = out[:i] + "_fact(" + out[i:close + 1] + ")" + out[m.end():]
    return out


def explosion(answer: str) -> str | None:
    """Why evaluating `answer` would explode (a reason), or None. Linear in its length
    for the answers it is given (the caller bounds their length and nesting first)."""
    s = _with_factorials(_to_python(answer))
    s = re.sub(r"(\d|\))\s*(_sym_\w+|[A-Za-z]\b)", r"\1*\2", s)  # 2x, 2\pi
    try:
        tree = ast.parse(s.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    cost = _Cost()
    try:
        cost.value(tree.body)
    except RecursionError:
        return "answer nested too deeply to evaluate"
    return cost.reason
