"""Types carried by IR values: per-token tensor shapes over symbolic dims, dtypes, value ranges.

Batch and time are implicit: a ``TensorType`` is the shape of one token's value. Every dim has a
concrete size (under the current configuration) and a symbolic spelling built from the spec's
hyper-parameter names, so messages and IR dumps read ``[heads, hd]`` and checks compare sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Dim:
    size: int
    sym: str  # e.g. "2 * e"; equal to str(size) when the dim has no symbolic name

    def __str__(self) -> str:
        if self.sym == str(self.size) or self.size == 0:  # size 0: unbounded (the context, T)
            return self.sym
        return f"{self.sym}={self.size}"

    @staticmethod
    def of(size: int, sym: str | None = None) -> "Dim":
        return Dim(int(size), sym if sym is not None else str(int(size)))


def _wrap(sym: str) -> str:
    return f"({sym})" if any(c in sym for c in " +-") else sym


def dim_mul(a: Dim, b: Dim) -> Dim:
    if a.size == 1 and a.sym == "1":
        return b
    if b.size == 1 and b.sym == "1":
        return a
    return Dim(a.size * b.size, f"{_wrap(a.sym)} * {_wrap(b.sym)}")


def dim_div(a: Dim, b: Dim) -> Dim:
    return Dim(a.size // b.size, f"{_wrap(a.sym)} / {_wrap(b.sym)}")


def dim_sum(dims: list[Dim]) -> Dim:
    if len(dims) == 1:
        return dims[0]
    syms = [d.sym for d in dims]
    # "n + n" reads better as "2 * n"
    if len(set(syms)) == 1:
        return Dim(sum(d.size for d in dims), f"{len(dims)} * {_wrap(syms[0])}")
    return Dim(sum(d.size for d in dims), " + ".join(syms))


@dataclass(frozen=True)
class Interval:
    """A closed range of real values, possibly infinite; used to check gates and betas."""

    lo: float = -math.inf
    hi: float = math.inf

    def __str__(self) -> str:
        def f(v: float) -> str:
            if v == math.inf:
                return "inf"
            if v == -math.inf:
                return "-inf"
            return f"{v:g}"
        return f"[{f(self.lo)}, {f(self.hi)}]"

    def within(self, lo: float, hi: float) -> bool:
        return self.lo >= lo and self.hi <= hi


UNBOUNDED = Interval()


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "real"  # "real" | "complex"
    range: Interval = UNBOUNDED

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def __str__(self) -> str:
        base = "[" + ", ".join(str(d) for d in self.shape) + "]"
        if self.dtype == "complex":
            base = "complex" + base
        return base


@dataclass(frozen=True)
class ConstType:
    """A compile-time constant; ``value`` is int, float, bool, str, InitRule, tuple or None."""

    value: object

    def __str__(self) -> str:
        return f"const {self.value!r}" if not isinstance(self.value, str) else \
            f'const "{self.value}"'


@dataclass(frozen=True)
class TupleType:
    items: tuple["Type", ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(i) for i in self.items) + ")"


Type = TensorType | ConstType | TupleType


def shape_str(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def broadcast(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    """Numpy-style broadcast of two per-token shapes, or None when they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else None
        db = b[-i] if i <= len(b) else None
        if da is None:
            out.append(db)
        elif db is None:
            out.append(da)
        elif da.size == db.size:
            out.append(da if da.sym != str(da.size) else db)
        elif da.size == 1:
            out.append(db)
        elif db.size == 1:
            out.append(da)
        else:
            return None
    return tuple(reversed(out))
