"""A stable text form of the IR, for ``seqdsl ir`` and snapshot tests.

Stable means: no ids that depend on dict order or memory addresses, no absolute paths, the same
text for the same spec, configuration and seqdsl version.
"""

from __future__ import annotations

import os

from seqdsl.ir.builtins import BUILTINS, REQUIRED, InitRule
from seqdsl.ir.graph import Graph, Program
from seqdsl.ir.ops import Op

_INFIX = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.FLOORDIV: "//", Op.MOD: "%",
          Op.POW: "**", Op.EQ: "==", Op.NE: "!=", Op.LT: "<", Op.LE: "<=", Op.GT: ">",
          Op.GE: ">=", Op.AND: "and", Op.OR: "or"}


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ", ".join(_value(i) for i in v) + "]"
    if isinstance(v, InitRule):
        return repr(v)
    return str(v)


def _operand(g: Graph, nid: int) -> str:
    n = g.node(nid)
    if n.op is Op.CONST:
        v = n.attr("value")
        sym = n.attr("sym")
        return f"{sym}={_value(v)}" if sym and sym != _value(v) else _value(v)
    return f"%{nid}"


def _attrs_text(node) -> str:
    skip = {"given", "value", "sym", "syms", "keywords", "state_shape", "region"}
    items = [(k, v) for k, v in node.attrs if k not in skip]
    if node.op is Op.EXPERTS:
        items.insert(0, ("region", ".".join(node.attr("region"))))
    if not items:
        return ""
    return " {" + ", ".join(f"{k}={_value(v) if not isinstance(v, str) or k != 'region' else v}"
                            for k, v in items) + "}"


def format_node(g: Graph, node) -> str:
    op = node.op
    ins = list(node.inputs)
    b = BUILTINS.get(op.value)
    if op in _INFIX and len(ins) == 2:
        rhs = f"{_operand(g, ins[0])} {_INFIX[op]} {_operand(g, ins[1])}"
    elif op is Op.INPUT:
        rhs = f"input {node.name}"
    elif op is Op.GETITEM:
        rhs = f"{_operand(g, ins[0])}[{node.attr('index')}]"
    elif op is Op.SHARED:
        rhs = f"shared {node.attr('name')}"
    elif op is Op.INIT:
        rhs = f"init {node.attr('rule')}(" + ", ".join(_operand(g, i) for i in ins) + ")"
    elif b is not None:
        parts = []
        for i, nid in enumerate(ins):
            arg = b.args[i] if i < len(b.args) else None
            inner = g.node(nid)
            if arg is not None and inner.op is Op.CONST and not arg.required and \
                    inner.attr("value") == (None if arg.default is REQUIRED else arg.default) and \
                    type(inner.attr("value")) is type(arg.default):
                continue  # an argument left at its default
            text = _operand(g, nid)
            parts.append(text if arg is None or (arg.kind == "tensor" and arg.required)
                         else f"{arg.name}={text}")
        rhs = f"{op.value}(" + ", ".join(parts) + ")"
    else:
        rhs = f"{op.value}(" + ", ".join(_operand(g, i) for i in ins) + ")"
    label = ".".join(node.scope + ((node.name,) if node.name else ()))
    typ = f" : {node.type}" if node.type is not None else ""
    where = f"  # {label}" if label else ""
    return f"%{node.id} = {rhs}{_attrs_text(node)}{typ}{where}"


def format_graph(g: Graph, indent: str = "  ") -> list[str]:
    # constants are printed inline where they are used
    return [indent + format_node(g, n) for n in g.nodes() if n.op is not Op.CONST]


def _layer_runs(program: Program) -> list[str]:
    runs: list[list] = []
    for layer in program.layers:
        label = layer.instance + (f" (shared weights: {layer.shared_group})" if layer.shared_group else "")
        if runs and runs[-1][2] == label and runs[-1][1] == layer.index - 1:
            runs[-1][1] = layer.index
        else:
            runs.append([layer.index, layer.index, label])
    return [f"  {a}: {lab}" if a == b else f"  {a}..{b}: {lab}" for a, b, lab in runs]


def _relative(path: str, entry: str) -> str:
    """Paths relative to the entry spec's folder, so dumps do not depend on the working dir."""
    base = os.path.dirname(os.path.abspath(entry)) if not entry.startswith("<") else os.getcwd()
    try:
        return os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")
    except ValueError:  # pragma: no cover - different drives on Windows
        return path


def format_program(program: Program) -> str:
    spec = program.spec
    out = [f"# seqdsl IR after {program.stage}"]
    if spec.model is None:
        out.append(f"library {os.path.basename(spec.path)}: {len(spec.definitions)} definitions, no model")
        return "\n".join(out) + "\n"
    out.append(f"model {spec.model.name}")
    out.append("config " + ", ".join(f"{k}={_value(v)}" for k, v in spec.config.items()))
    if program.layers:
        s = program.settings
        out.append(f"settings tie_embeddings={_value(s.tie_embeddings)}, "
                   f"final_norm={s.final_norm or 'none'}, embed_scale={s.embed_scale:g}, "
                   f"logit_softcap={_value(s.logit_softcap)}")
        out.append(f"layers {len(program.layers)}")
        out.extend(_layer_runs(program))
    if program.shared is not None:
        out.append("shared")
        out.extend(format_graph(program.shared))
    if program.final_norm is not None:
        out.append("final_norm")
        out.extend(format_graph(program.final_norm))
    for name, inst in program.blocks.items():
        args = ", ".join(f"{k}={_value(v)}" for k, v in inst.args)
        out.append(f"block {name}" + (f" = {inst.block}({args})" if args or name != inst.block else "")
                   + f"  # spec: {_relative(inst.span.path, spec.path)}:{inst.span.line}")
        if inst.graph is not None:
            out.extend(format_graph(inst.graph))
        for st in inst.states:
            shape = "[" + ", ".join(str(d) for d in st.shape) + "]"
            out.append(f"  state {st.kind} {st.name} {shape} {st.dtype}  # {st.detail}")
    return "\n".join(out) + "\n"
