"""Pass 7 — core canonicalisation: put every core call in the form backends expect.

Done here: a multiplicative decay written ``exp(e)`` becomes ``log_decay = e`` (gates in log
space, as fla's kernels take them; no exp/log round trip), and a complex decay written
``magnitude * expi(phase)`` is split into its log-magnitude and phase inputs, recorded on the core
as the lowering to a real per-key-dim decay plus a data-dependent rotary of q and k. Multi-step
delta cores are marked for the interleaving lowering (T * steps sub-tokens). The rewrites of the
operands themselves (rotary, interleave) are carried out by the backends' lowering, which reads
the ``lowering`` attribute set here.
"""

from __future__ import annotations

import dataclasses
import math

from seqdsl.diagnostics import error
from seqdsl.ir.graph import Graph, Program
from seqdsl.ir.ops import Op
from seqdsl.ir.types import ConstType, TensorType
from seqdsl.passes.infer_shapes import unary_range

#: position of (decay, log_decay) among each core's inputs
_DECAY_POS = {Op.LINEAR: (3, 4), Op.DELTA: (4, 5)}


def _is_none(g: Graph, nid: int) -> bool:
    n = g.node(nid)
    return n.op is Op.CONST and n.attr("value") is None


def canonicalize_graph(g: Graph) -> Graph:
    g = g.copy()
    varying = g.time_varying()
    for node in list(g.nodes()):
        if node.op not in _DECAY_POS:
            continue
        node = g.node(node.id)
        pd, pl = _DECAY_POS[node.op]
        inputs = list(node.inputs)
        lowering = []
        if not _is_none(g, inputs[pd]):
            decay = g.node(inputs[pd])
            if node.attr("decay_kind") == "complex_key":
                magnitude, phase = _split_complex(g, decay)
                mag_t = g.node(magnitude).type
                log_mag = _log_of(g, magnitude, decay, mag_t)
                inputs[pl] = log_mag
                inputs[pd] = _const(g, None, decay.span, node.scope)
                inputs.append(phase)  # the phase rides as an extra, last input
                node = node.with_attrs(extras=("phase",))
                lowering.append("complex decay -> real log decay on 2*key_dim + data-dependent rotary of q, k")
            else:
                inputs[pl] = _log_of(g, inputs[pd], decay, decay.type)
                inputs[pd] = _const(g, None, decay.span, node.scope)
        if node.attr("decay_kind") == "key_value":
            factors = _factored(g, inputs[pl], varying)
            if factors is not None:  # keep A * dt factored: no [T, K, V] tensor in the forward
                inputs[pl] = factors[1]
                inputs.append(factors[0])
                node = node.with_attrs(factored=True, extras=("decay_A",))
                lowering.append("[K, V] decay kept factored as A * dt (A per-token constant)")
        if node.op is Op.DELTA and (node.attr("steps") or 1) > 1:
            lowering.append(f"{node.attr('steps')} Householder steps -> delta over T * steps "
                            "interleaved sub-tokens (gate on the first, read on the last)")
        g.set(node.replace(inputs=tuple(inputs)).with_attrs(log_space=True, lowering=tuple(lowering)))
    return g.prune()


def _factored(g: Graph, nid: int, varying: set[int]) -> tuple[int, int] | None:
    """A [.., K, V] log decay written A * dt, with A constant over time and dt [.., V] varying:
    the selective-SSM form. Returns (A, dt) node ids, or None."""
    node = g.node(nid)
    if node.op is not Op.MUL:
        return None
    out = node.type.sizes
    for a, b in (node.inputs, tuple(reversed(node.inputs))):
        ta, tb = g.node(a).type, g.node(b).type
        if not (isinstance(ta, TensorType) and isinstance(tb, TensorType)):
            continue
        if a not in varying and b in varying and ta.sizes == out and \
                tb.sizes == out[:-2] + out[-1:]:
            return a, b
    return None


def _split_complex(g: Graph, decay) -> tuple[int, int]:
    if decay.op is Op.MUL:
        a, b = (g.node(i) for i in decay.inputs)
        for mag, ph in ((a, b), (b, a)):
            if ph.op is Op.EXPI and isinstance(mag.type, TensorType) and mag.type.dtype == "real":
                return mag.id, ph.inputs[0]
    if decay.op is Op.EXPI:
        return _const(g, 1.0, decay.span, decay.scope), decay.inputs[0]
    raise error(decay.span, "a complex decay must be written magnitude * expi(phase)",
                "e.g. decay = sigmoid(proj(x, d)) * expi(proj(x, d))")


def _const(g: Graph, value, span, scope) -> int:
    return g.add(Op.CONST, (), span, attrs={"value": value}, scope=scope, type=ConstType(value))


def _log_of(g: Graph, nid: int, like, type_) -> int:
    """log(value) without a round trip: log(exp(e)) = e, log(sigmoid(e)) = logsigmoid(e)."""
    node = g.node(nid)
    if node.op is Op.EXP:
        return node.inputs[0]
    if not isinstance(type_, TensorType):  # a constant magnitude
        return _const(g, math.log(type_.value), like.span, like.scope)
    op, src = (Op.LOGSIGMOID, node.inputs[0]) if node.op is Op.SIGMOID else (Op.LOG, nid)
    src_t = g.node(src).type
    return g.add(op, (src,), node.span, scope=node.scope,
                 type=TensorType(type_.shape, "real", unary_range(op, src_t.range)))


def canonicalize_cores(program: Program) -> Program:
    blocks = {name: dataclasses.replace(i, graph=canonicalize_graph(i.graph))
              for name, i in program.blocks.items()}
    return program.replace(stage="canonicalize_cores", blocks=blocks)
