"""Compile-time values and the arithmetic on them.

Shared by the AST-level evaluator (hyper-parameter defaults, layer patterns) and the IR's constant
folding pass, so both agree on what ``ceil(d / 16)`` or ``2 ** -5`` means.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from seqdsl.diagnostics import Span, error
from seqdsl.ir.builtins import InitRule
from seqdsl.ir.ops import Op


@dataclass(frozen=True)
class BlockRef:
    """One entry of a layer pattern: a block (or shared block) with bound hyper-parameters."""

    name: str
    args: tuple[tuple[str, object], ...]
    span: Span

    def key(self) -> tuple:
        return (self.name, self.args)

    def __repr__(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.args)})"


def type_name(v: object) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "none"
    if isinstance(v, InitRule):
        return "init rule"
    if isinstance(v, BlockRef):
        return "block"
    if isinstance(v, tuple):
        return "list"
    return type(v).__name__


def show(v) -> str:
    """A constant as the language writes it (``true``, ``none``, ``1e-5``, ``"gelu"``,
    ``[1, 2]``): for generated specs and for the values error messages quote."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        text = re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2),
                      repr(v))                              # 1e-05 -> 1e-5
        return text if ("." in text or "e" in text or "inf" in text) else text + ".0"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, tuple):
        return "[" + ", ".join(show(x) for x in v) + "]"
    return str(v)


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: the range of an integer constant: what a 64-bit integer (torch's int64) holds
MAX_INT = 2 ** 63 - 1


def check_number(v, span, what: str = "a constant"):
    """``v`` itself if generated code can hold it: a finite float, an int of 64 bits."""
    if isinstance(v, float) and not math.isfinite(v):
        raise error(span, f"{what} is not a finite number ({v})",
                    "numbers must stay within ±1.8e308 (a float64)")
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
        raise error(span, f"{what} does not fit in 64 bits ({v:.3g})",
                    f"integers must stay within ±{MAX_INT} (an int64)")
    return v


def _arith(fn, name):
    def apply(a, b, span):
        if is_number(a) and is_number(b):
            try:
                r = fn(a, b)
            except ZeroDivisionError:
                raise error(span, "division by zero in a constant expression") from None
            except (OverflowError, ValueError) as exc:
                raise error(span, f"constant arithmetic failed: {exc}") from None
            if isinstance(r, complex):
                raise error(span, "constant arithmetic produced a complex number")
            return check_number(r, span, "the result of this constant arithmetic")
        raise error(span, f"cannot {name} {type_name(a)} and {type_name(b)}")
    return apply


def _add(a, b, span):
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a + b
    if isinstance(a, str) and isinstance(b, str):
        return a + b
    return _arith(operator.add, "add")(a, b, span)


#: the most items a compile-time list (or characters a string) may have, so that a runaway
#: ``[block] * n`` is an error instead of exhausting memory
MAX_ITEMS = 1_000_000

#: the most bits a constant ``a ** b`` of two ints may have
MAX_POW_BITS = 1 << 16


def check_size(n: int, span, what: str = "a compile-time list") -> None:
    if n > MAX_ITEMS:
        raise error(span, f"{what} would have {n:,} items; the limit is {MAX_ITEMS:,}")


def _mul(a, b, span):
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, (tuple, str)) and isinstance(n, int) and not isinstance(n, bool):
            if n < 0:
                raise error(span, f"cannot repeat a {type_name(seq)} a negative number of times")
            check_size(len(seq) * n, span)
            return seq * n
    return _arith(operator.mul, "multiply")(a, b, span)


def _div(a, b, span):
    return _arith(operator.truediv, "divide")(a, b, span)


def _pow(a, b, span):
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and \
            b * (abs(a).bit_length() - 1) > MAX_POW_BITS:
        raise error(span, f"constant arithmetic failed: {a} ** {b} is too large")
    r = _arith(operator.pow, "raise")(a, b, span)
    return r


def _cmp(fn):
    def apply(a, b, span):
        try:
            return bool(fn(a, b))
        except TypeError:
            raise error(span, f"cannot compare {type_name(a)} and {type_name(b)}") from None
    return apply


BINARY: dict[Op, object] = {
    Op.ADD: _add, Op.SUB: _arith(operator.sub, "subtract"), Op.MUL: _mul, Op.DIV: _div,
    Op.FLOORDIV: _arith(operator.floordiv, "floor-divide"), Op.MOD: _arith(operator.mod, "take the remainder of"),
    Op.POW: _pow, Op.EQ: _cmp(operator.eq), Op.NE: _cmp(operator.ne), Op.LT: _cmp(operator.lt),
    Op.LE: _cmp(operator.le), Op.GT: _cmp(operator.gt), Op.GE: _cmp(operator.ge),
}

BINOP_OF_TOKEN = {
    "+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "//": Op.FLOORDIV, "%": Op.MOD,
    "**": Op.POW, "==": Op.EQ, "!=": Op.NE, "<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE,
    "and": Op.AND, "or": Op.OR,
}


def _num1(fn, name):
    def apply(args, span):
        (x,) = args
        if not is_number(x):
            raise error(span, f"{name}() needs a number, got {type_name(x)}")
        try:
            return fn(x)
        except (ValueError, OverflowError) as exc:
            raise error(span, f"{name}({x!r}) is undefined: {exc}") from None
    return apply


def _minmax(fn, name):
    def apply(args, span):
        if not all(is_number(a) for a in args):
            raise error(span, f"{name}() needs numbers")
        return fn(args)
    return apply


def _softplus(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _bf16(x: float) -> float:
    """Round to the nearest bfloat16 (ties to even), as torch does when storing a constant."""
    import struct
    bits = struct.unpack("<I", struct.pack("<f", float(x)))[0]
    bits += 0x7FFF + ((bits >> 16) & 1)
    return struct.unpack("<f", struct.pack("<I", (bits >> 16) << 16))[0]


#: functions of constants, by op
FUNCTIONS: dict[Op, object] = {
    Op.CEIL: _num1(math.ceil, "ceil"), Op.FLOOR: _num1(math.floor, "floor"),
    Op.ROUND: _num1(round, "round"), Op.TO_INT: _num1(int, "int"),
    Op.TO_FLOAT: _num1(float, "float"), Op.TO_BF16: _num1(_bf16, "bfloat16"), Op.SQRT: _num1(math.sqrt, "sqrt"),
    Op.EXP: _num1(math.exp, "exp"), Op.LOG: _num1(math.log, "log"),
    Op.ABS: _num1(abs, "abs"), Op.TANH: _num1(math.tanh, "tanh"),
    Op.SIGMOID: _num1(_sigmoid, "sigmoid"), Op.SILU: _num1(lambda x: x * _sigmoid(x), "silu"),
    Op.SOFTPLUS: _num1(_softplus, "softplus"), Op.RELU: _num1(lambda x: max(x, 0), "relu"),
    Op.GELU: _num1(_gelu, "gelu"), Op.LOGSIGMOID: _num1(lambda x: -_softplus(-x), "logsigmoid"),
    Op.NEG: _num1(operator.neg, "-"),
    Op.MIN: _minmax(min, "min"), Op.MAX: _minmax(max, "max"),
}
