"""Safe arithmetic: numbers, + - * / // % **, unary signs and parentheses, nothing else.

The expression is parsed with `ast` and walked by hand: no names, calls, attributes or
subscripts exist in the grammar it accepts, so nothing can reach `__import__`. Powers
and results are bounded before they are computed: `9**9**9` would hold the GIL for
minutes otherwise.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable

from envhub.connectors import ToolOutput
from schemas.sessions import ToolTrace

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000
MAX_INT_BITS = 1024  # about 308 decimal digits
_BINOPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
# What small models write for the operators: × and ÷, ^ for a power (never xor here).
_SPELLINGS = str.maketrans({"×": "*", "÷": "/", "−": "-"})


class CalcError(ValueError):
    """The expression is not one this calculator evaluates; the message is for the model."""


def _check(value: float) -> float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalcError(f"result too large (over {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("result is not a finite number")
    return value


def _power(base: float, exp: float) -> float:
    if abs(exp) > MAX_EXPONENT:
        raise CalcError(f"exponent {exp:g} exceeds the limit of {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0:
        # |base| >= 2**(bits-1): a lower bound on the result's size, known before computing it.
        if (base.bit_length() - 1) * exp > MAX_INT_BITS:
            raise CalcError(f"result too large (over {MAX_INT_BITS} bits)")
    result = base**exp
    if isinstance(result, complex):
        raise CalcError("a fractional power of a negative number is not a real number")
    return result


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalcError(f"unsupported constant {node.value!r}")
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check(_power(left, right))
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise CalcError(f"unsupported operator {type(node.op).__name__}")
        return _check(op(left, right))
    raise CalcError(f"unsupported expression element {type(node).__name__}: only numbers and + - * / // % **")


def format_number(value: float) -> str:
    """Integers as digits; floats to 12 significant digits, integral ones without '.0' (what a model copies)."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.12g}"


def evaluate(expression: str) -> str:
    """The value of `expression` as text; CalcError says what is wrong with it."""
    expr = expression.strip().translate(_SPELLINGS).replace("^", "**")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError) as err:  # ValueError: a NUL byte
        raise CalcError(f"not an arithmetic expression: {getattr(err, 'msg', err)}") from None
    except (RecursionError, MemoryError):
        raise CalcError("expression nested too deeply") from None
    try:
        return format_number(_eval(tree))
    except ZeroDivisionError:
        raise CalcError("division by zero") from None
    except OverflowError:
        raise CalcError("result too large") from None
    except RecursionError:
        raise CalcError("expression nested too deeply") from None


class Calculator:
    """The `calculator` tool."""

    name = "calculator"

    async def call(self, args: str, turn_index: int) -> ToolOutput:
        started = time.monotonic()
        try:
            text, error = evaluate(args), ""
        except CalcError as err:
            text, error = f"error: {err}", str(err)
        trace = ToolTrace(
            turn_index=turn_index,
            tool=self.name,
            ok=not error,
            error=error,
            latency_ms=(time.monotonic() - started) * 1000,
        )
        return ToolOutput(text, trace)

    async def aclose(self) -> None:
        pass
