"""Pass 4 — constant folding: evaluate everything that depends only on hyper-parameters.

Arithmetic on constants, constant-only functions (``ceil``, ``min``...), lists, init rules and
conditionals with a constant condition become CONST nodes. Each folded constant keeps a symbolic
spelling (``2 * e``, ``ceil(d / 16)``) that shape inference turns into readable dims. The untaken
branch of a conditional is removed, with everything only it used.
"""

from __future__ import annotations

import dataclasses

from seqdsl.diagnostics import Collector, error
from seqdsl.frontend.consteval import _rule_signature
from seqdsl.ir.builtins import INIT_RULES, InitRule
from seqdsl.ir.graph import Graph, Program
from seqdsl.ir.ops import BINARY_ARITH, COMPARE, ELEMENTWISE_UNARY, Op
from seqdsl.ir.values import BINARY, FUNCTIONS, is_number, type_name

_SYMBOL = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.FLOORDIV: "//", Op.MOD: "%",
           Op.POW: "**"}


def _sym_of(node) -> str:
    s = node.attr("sym")
    if s is not None:
        return s
    v = node.attr("value")
    return repr(v) if not isinstance(v, str) else f'"{v}"'


def _top_level_ops(s: str) -> set[str]:
    """The binary operators of a symbolic expression outside any parentheses."""
    depth, ops = 0, set()
    for tok in s.split(" "):
        depth += tok.count("(") - tok.count(")")
        if depth == 0 and tok in ("+", "-", "*", "/", "//", "%", "**"):
            ops.add(tok)
    return ops


def _wrap(s: str, op: Op | None = None, right: bool = False) -> str:
    """Parenthesise an operand only where precedence needs it: ``steps * heads * hd``."""
    ops = _top_level_ops(s)
    if not ops:
        return s
    if op in (Op.ADD,) or (op is Op.SUB and not right):
        return s
    if op is Op.SUB and right:
        needs = bool(ops & {"+", "-"})
    elif op is Op.MUL:
        needs = bool(ops & {"+", "-"}) or (right and bool(ops & {"/", "//", "%"}))
    else:
        needs = True
    return f"({s})" if needs else s


def fold_graph(g: Graph, outputs: dict[str, int] | None = None) -> Graph:
    """Fold ``g``; ``outputs`` (the shared graph's named results, which has no single output)
    is updated in place when a folded conditional replaces one of them."""
    g = g.copy()
    for node in list(g.nodes()):
        if node.id not in g:
            continue
        node = g.node(node.id)
        if node.op is Op.CONST and node.name and not node.attr("sym") and \
                not isinstance(node.attr("value"), (InitRule, tuple, str, bool)) and \
                node.attr("value") is not None:
            g.set(node.with_attrs(sym=node.name))  # a named literal: `n = 16` reads as n
            continue
        ins = [g.node(i) for i in node.inputs]
        all_const = all(i.op is Op.CONST for i in ins)
        op = node.op
        value = _NOT_FOLDED = object()
        sym = None
        if op in BINARY_ARITH | COMPARE and all_const:
            a, b = (i.attr("value") for i in ins)
            value = BINARY[op](a, b, node.span)
            if op in BINARY_ARITH and (ins[0].attr("sym") or ins[1].attr("sym")):
                sym = f"{_wrap(_sym_of(ins[0]), op, False)} {_SYMBOL[op]} " \
                      f"{_wrap(_sym_of(ins[1]), op, True)}"
        elif op in (Op.AND, Op.OR) and all_const:
            a, b = (i.attr("value") for i in ins)
            for v, i in ((a, ins[0]), (b, ins[1])):
                if not isinstance(v, bool):
                    raise error(i.span, f"'{op.value}' needs bools, got {type_name(v)}")
            value = (a and b) if op is Op.AND else (a or b)
        elif op is Op.NOT and all_const:
            v = ins[0].attr("value")
            if not isinstance(v, bool):
                raise error(node.span, f"'not' needs a bool, got {type_name(v)}")
            value = not v
        elif op in FUNCTIONS and all_const and ins:
            args = [i.attr("value") for i in ins]
            if op in ELEMENTWISE_UNARY:
                args = args[:1]  # options such as gelu's `approximate` do not change a constant
            value = FUNCTIONS[op](args, node.span)
            if any(i.attr("sym") for i in ins):
                inner = ", ".join(_sym_of(i) for i in ins)
                sym = f"-{_wrap(inner, Op.POW)}" if op is Op.NEG else f"{op.value}({inner})"
        elif op is Op.LIST and all_const:
            value = tuple(i.attr("value") for i in ins)
            node = node.with_attrs(syms=tuple(_sym_of(i) for i in ins))
        elif op is Op.INIT and all_const:
            value = _init_rule(node, [i.attr("value") for i in ins])
        elif op is Op.SELECT and ins[0].op is Op.CONST:
            cond = ins[0].attr("value")
            if not isinstance(cond, bool):
                raise error(ins[0].span, f"a condition must be a bool, got {type_name(cond)}")
            taken = node.inputs[1] if cond else node.inputs[2]
            g.replace_uses(node.id, taken)
            for key, nid in (outputs or {}).items():
                if nid == node.id:
                    outputs[key] = taken
            continue
        elif op is Op.INDEX and all_const:
            seq, idx = (i.attr("value") for i in ins)
            if isinstance(seq, tuple):
                if not isinstance(idx, int) or isinstance(idx, bool):
                    raise error(ins[1].span, f"an index must be an int, got {type_name(idx)}")
                if not -len(seq) <= idx < len(seq):
                    raise error(ins[1].span, f"index {idx} is out of range for a list of {len(seq)}")
                value = seq[idx]
        if value is _NOT_FOLDED:
            continue
        attrs = {"value": value}
        label = node.name
        if label is not None and not isinstance(value, (InitRule, tuple)):
            attrs["sym"] = label
        elif sym is not None:
            attrs["sym"] = sym
        if op is Op.LIST:
            attrs["syms"] = node.attr("syms")
        g.set(node.replace(op=Op.CONST, inputs=(), attrs=tuple(sorted(attrs.items()))))
    if g.output is not None:
        g = g.prune()
    elif outputs is not None:  # keep what the named results depend on (drops untaken branches)
        live, stack = set(), list(outputs.values())
        while stack:
            nid = stack.pop()
            if nid not in live:
                live.add(nid)
                stack.extend(g.node(nid).inputs)
        for nid in g.ids():
            if nid not in live:
                g.remove(nid)
    _check_folded(g)
    return g


def _check_folded(g: Graph) -> None:
    """Lists, init rules and conditions must fold to constants; report what kept one from it."""
    for node in g.nodes():
        if node.op not in (Op.LIST, Op.INIT, Op.SELECT):
            continue
        ins = node.inputs[:1] if node.op is Op.SELECT else node.inputs
        culprit = next((i for i in ins if g.node(i).op is not Op.CONST), node.id)
        what = {Op.LIST: "a list item", Op.INIT: "an init rule argument",
                Op.SELECT: "a condition"}[node.op]
        hint = None
        stack, seen = [culprit], set()
        while stack:
            n = g.node(stack.pop())
            if n.id in seen:
                continue
            seen.add(n.id)
            if n.op is Op.LAYER_INDEX:
                hint = ("the layer index is only known at run time; use a pattern comprehension "
                        "with block hyper-parameters to vary structure by layer")
                break
            stack.extend(n.inputs)
        raise error(g.node(culprit).span, f"{what} must be a compile-time constant", hint)


def _init_rule(node, values) -> InitRule:
    spec = INIT_RULES[node.attr("rule")]
    keywords = node.attr("keywords") or ()
    positional = values[:len(values) - len(keywords)]
    bound: dict[str, object] = {}
    names = [a.name for a in spec.args]
    if len(positional) > len(names):
        raise error(node.span, f"init rule '{spec.name}' takes {len(names)} argument"
                    f"{'s' if len(names) != 1 else ''}, got {len(positional)}",
                    _rule_signature(spec.name))
    for n, v in zip(names, positional):
        bound[n] = v
    for k, v in zip(keywords, values[len(positional):]):
        if k not in names:
            raise error(node.span, f"init rule '{spec.name}' has no argument '{k}'",
                        f"its arguments: {', '.join(names) or 'none'}")
        bound[k] = v
    for a in spec.args:
        if a.name not in bound:
            if a.required:
                raise error(node.span, f"init rule '{spec.name}' needs argument '{a.name}'",
                            _rule_signature(spec.name))
            bound[a.name] = a.default
        if not is_number(bound[a.name]):
            raise error(node.span, f"argument '{a.name}' of init rule '{spec.name}' must be a "
                        f"number, got {type_name(bound[a.name])}")
    return InitRule(spec.name, tuple((a.name, bound[a.name]) for a in spec.args))


def fold_constants(program: Program) -> Program:
    collector = Collector()
    blocks = {}
    shared = program.shared
    shared_outputs = dict(program.shared_outputs)
    if shared is not None:
        with collector.guard():
            shared = fold_graph(shared, shared_outputs)
    for name, inst in program.blocks.items():
        with collector.guard():
            blocks[name] = dataclasses.replace(inst, graph=fold_graph(inst.graph))
    final_norm = program.final_norm
    if final_norm is not None:
        with collector.guard():
            final_norm = fold_graph(final_norm)
    collector.raise_if_any()
    return program.replace(stage="fold_constants", blocks=blocks, shared=shared,
                           shared_outputs=shared_outputs, final_norm=final_norm)
