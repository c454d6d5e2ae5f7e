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


def children(expr: Expr) -> tuple[Expr, ...]:
    """The direct sub-expressions of ``expr``, in source order."""
    if isinstance(expr, BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, UnaryOp):
        return (expr.operand,)
    if isinstance(expr, IfExp):
        return (expr.cond, expr.then, expr.orelse)
    if isinstance(expr, Call):
        return expr.args + tuple(k.value for k in expr.kwargs)
    if isinstance(expr, Index):
        return (expr.value, expr.index)
    if isinstance(expr, ListExpr):
        return expr.items
    if isinstance(expr, Comprehension):
        return (expr.element, expr.iterable)
    return ()


def walk(expr: Expr):
    """Yield ``expr`` and every sub-expression, depth first."""
    yield expr
    for child in children(expr):
        yield from walk(child)
