"""The abstract syntax tree: frozen dataclasses, every node with a source span.

Produced by :mod:`seqdsl.frontend.parser` from lark's parse tree; consumed by
:mod:`seqdsl.frontend.spec` (validation) and the IR builder. Nodes are never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from seqdsl.diagnostics import Span


# ---- expressions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: int | float
    span: Span


@dataclass(frozen=True)
class String:
    value: str
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class NoneLit:
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / // % ** == != < <= > >= and or
    left: "Expr"
    right: "Expr"
    span: Span
    op_span: Span


@dataclass(frozen=True)
class UnaryOp:
    op: str  # - + not
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class IfExp:
    cond: "Expr"
    then: "Expr"
    orelse: "Expr"
    span: Span


@dataclass(frozen=True)
class Keyword:
    name: str
    value: "Expr"
    span: Span  # span of the keyword's name
    quoted: bool = False  # written as "name" = value (pattern legends)


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...]
    span: Span
    func_span: Span


@dataclass(frozen=True)
class Index:
    value: "Expr"
    index: "Expr"
    span: Span


@dataclass(frozen=True)
class ListExpr:
    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class Comprehension:
    element: "Expr"
    var: str
    iterable: "Expr"
    span: Span
    var_span: Span


Expr = Union[Number, String, Bool, NoneLit, Name, BinOp, UnaryOp, IfExp, Call, Index, ListExpr,
             Comprehension]


# ---- statements and definitions -----------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    targets: tuple[str, ...]
    target_spans: tuple[Span, ...]
    value: Expr
    span: Span


@dataclass(frozen=True)
class Shared:
    name: str
    value: Expr
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Return:
    value: Expr
    span: Span


Stmt = Union[Assign, Shared, Return]


@dataclass(frozen=True)
class Param:
    """A definition parameter: a hyper-parameter when it has a default, else a tensor input."""

    name: str
    default: Expr | None
    span: Span


@dataclass(frozen=True)
class Definition:
    kind: str  # "block" | "mixer" | "channel" | "fn"
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class ModelDef:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Import:
    path: str
    span: Span


@dataclass(frozen=True)
class Module:
    """One parsed .seq file."""

    path: str
    imports: tuple[Import, ...]
    definitions: tuple[Definition, ...]
    models: tuple[ModelDef, ...]


def walk(expr: Expr):
    """Yield ``expr`` and every sub-expression, depth first."""
    yield expr
    if isinstance(expr, BinOp):
        yield from walk(expr.left)
        yield from walk(expr.right)
    elif isinstance(expr, UnaryOp):
        yield from walk(expr.operand)
    elif isinstance(expr, IfExp):
        yield from walk(expr.cond)
        yield from walk(expr.then)
        yield from walk(expr.orelse)
    elif isinstance(expr, Call):
        for a in expr.args:
            yield from walk(a)
        for k in expr.kwargs:
            yield from walk(k.value)
    elif isinstance(expr, Index):
        yield from walk(expr.value)
        yield from walk(expr.index)
    elif isinstance(expr, ListExpr):
        for item in expr.items:
            yield from walk(item)
    elif isinstance(expr, Comprehension):
        yield from walk(expr.element)
        yield from walk(expr.iterable)
