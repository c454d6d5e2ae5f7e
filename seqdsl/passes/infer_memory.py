"""Pass 6 — memory inference: what each layer must carry between calls when decoding.

Memory is a first-class part of a model: per block instance this pass lists every recurrent state
(the cores' states, accumulated in float32 unless ``state_dtype`` says otherwise), every short
convolution's tail (the last ``width - 1`` inputs) and every attention KV cache (bounded by the
sliding window, or growing with the context). ``seqdsl info`` and the backends read them.
"""

from __future__ import annotations

import dataclasses
import math

from seqdsl.ir.graph import Program, State
from seqdsl.ir.ops import Op
from seqdsl.ir.types import Dim, TensorType


def _state_dtype(graph, node) -> str:
    base = graph.node(node.inputs[_DTYPE_POS[node.op]]).attr("value")
    if node.attr("complex"):
        return "complex64" if base == "float32" else "complex128"
    return base


_DTYPE_POS = {Op.SCAN: 2, Op.LINEAR: 6, Op.DELTA: 8}


def _label(node) -> str:
    return ".".join(node.scope + ((node.name,) if node.name else (node.op.value,)))


def states_of(graph) -> tuple[State, ...]:
    out = []
    for node in graph.nodes():
        if node.op in (Op.SCAN, Op.LINEAR, Op.DELTA):
            shape = tuple(node.attr("state_shape"))
            detail = node.attr("decay_kind") or ""
            if node.op is Op.DELTA:
                detail = f"eigenvalues in {node.attr('eigenvalues')}, steps={node.attr('steps')}"
            out.append(State("recurrent", node.id, node.scope, _label(node), shape,
                             _state_dtype(graph, node), math.prod(d.size for d in shape),
                             True, f"{node.op.value} core" + (f", {detail}" if detail else "")))
        elif node.op is Op.CONV1D:
            x = graph.node(node.inputs[0]).type
            width = graph.node(node.inputs[1]).attr("value")
            assert isinstance(x, TensorType)
            shape = (Dim.of(width - 1, "width - 1"),) + x.shape
            out.append(State("conv", node.id, node.scope, _label(node), shape, "activation",
                             (width - 1) * x.numel, True, f"conv1d tail, width {width}"))
        elif node.op is Op.ATTENTION:
            window = node.attr("window")
            per_token = node.attr("kv_heads") * (node.attr("key_dim") + node.attr("value_dim"))
            # between calls a windowed layer keeps the last window - 1 keys and values: the next
            # token attends to those and to itself
            first = Dim.of(window - 1, "window - 1") if window else Dim(0, "T")
            shape = (first, Dim.of(node.attr("kv_heads")),
                     Dim.of(node.attr("key_dim") + node.attr("value_dim"), "key_dim + value_dim"))
            out.append(State("kv", node.id, node.scope, _label(node), shape, "activation",
                             per_token * (window - 1 if window else 1), window is not None,
                             f"KV cache, {'window ' + str(window) if window else 'grows with the context'}"))
    return tuple(out)


def infer_memory(program: Program) -> Program:
    blocks = {name: dataclasses.replace(i, states=states_of(i.graph))
              for name, i in program.blocks.items()}
    return program.replace(stage="infer_memory", blocks=blocks)
