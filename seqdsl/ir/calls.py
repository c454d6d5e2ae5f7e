"""Binding call arguments to parameters: shared by name resolution and the IR builder."""

from __future__ import annotations

from dataclasses import dataclass

from seqdsl.diagnostics import did_you_mean, error, one_of
from seqdsl.frontend import ast
from seqdsl.ir.builtins import BUILTINS, Builtin


@dataclass(frozen=True)
class Signature:
    """What a callee accepts: ordered parameters, which are required, variadic or not."""

    callee: str        # for messages: "core 'linear'", "mixer 'mamba'", "'proj'"
    params: tuple[str, ...]
    required: frozenset[str]
    variadic: bool = False
    text: str = ""     # a one-line signature for hints

    @staticmethod
    def of_builtin(b: Builtin) -> "Signature":
        kind = "core" if b.category == "core" else "function"
        return Signature(f"{kind} '{b.name}'", tuple(a.name for a in b.args),
                         frozenset(a.name for a in b.args if a.required), b.variadic, b.signature())

    @staticmethod
    def of_definition(d) -> "Signature":
        params = tuple(d.inputs) + tuple(h.name for h in d.hyper)
        text = f"{d.name}({', '.join(list(d.inputs) + [h.name + '=...' for h in d.hyper])})"
        return Signature(f"{d.kind} '{d.name}'", params, frozenset(d.inputs), False, text)


@dataclass(frozen=True)
class Bound:
    args: dict[str, ast.Expr]      # parameter name -> argument expression (given ones only)
    extra: tuple[ast.Expr, ...]    # variadic positional arguments beyond the named ones


def bind(sig: Signature, call: ast.Call) -> Bound:
    args: dict[str, ast.Expr] = {}
    extra: list[ast.Expr] = []
    for i, a in enumerate(call.args):
        if i < len(sig.params):
            args[sig.params[i]] = a
        elif sig.variadic:
            extra.append(a)
        else:
            raise error(a.span, f"{sig.callee} takes {len(sig.params)} positional argument"
                        f"{'s' if len(sig.params) != 1 else ''}, got {len(call.args)}",
                        _core_hint(call) or f"signature: {sig.text}")
    for k in call.kwargs:
        if k.quoted:
            raise error(k.span, "quoted argument names are only allowed in a pattern() legend")
        if k.name not in sig.params:
            hint = did_you_mean(k.name, sig.params)
            valid = f"valid arguments of {sig.callee}: {one_of(sig.params)}" if sig.params else \
                f"{sig.callee} takes no arguments"
            raise error(k.span, f"{sig.callee} has no argument '{k.name}'",
                        f"{hint} {valid}" if hint else valid)
        if k.name in args:
            raise error(k.span, f"argument '{k.name}' of {sig.callee} is given twice")
        args[k.name] = k.value
    missing = [p for p in sig.params if p in sig.required and p not in args]
    if missing:
        # a core called positionally (linear(x, 64)) is more likely a mistaken projection
        raise error(call.func_span, f"{sig.callee} needs argument '{missing[0]}'",
                    (_core_hint(call) if call.args else None) or f"signature: {sig.text}")
    return Bound(args, tuple(extra))


def _core_hint(call: ast.Call) -> str | None:
    b = BUILTINS.get(call.func)
    if b is None or b.category != "core":
        return None
    return (f"core arguments are passed by name: {b.signature()}"
            + ("; for a projection use proj(x, size)" if call.func == "linear" else ""))
