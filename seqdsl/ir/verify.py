"""``verify(program)``: the IR's invariants, checked after every pass in the tests.

A failure here is a compiler bug, never a user error, so it raises :class:`IRError` (an
``AssertionError``) naming the graph, the node and the broken invariant.
"""

from __future__ import annotations

from seqdsl.ir.graph import Graph, Program
from seqdsl.ir.ops import CORES, Op
from seqdsl.ir.types import ConstType, TensorType

STAGES = ("parsed", "resolve_names", "expand_pattern", "build_graphs", "fold_constants",
          "infer_shapes", "infer_memory", "canonicalize_cores")


class IRError(AssertionError):
    pass


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise IRError(f"{where}: {msg}")


def _after(program: Program, stage: str) -> bool:
    return STAGES.index(program.stage) >= STAGES.index(stage)


def verify_graph(g: Graph, where: str, program: Program, *, block: bool) -> None:
    _check(g.is_acyclic(), where, "graph has a cycle")
    edges = set(g.edges())
    for node in g.nodes():
        at = f"{where} %{node.id} ({node.op.value})"
        _check(isinstance(node.op, Op), at, "op is not an Op")
        for i in node.inputs:
            _check(i in g, at, f"input %{i} is not in the graph")
            _check((i, node.id) in edges, at, f"missing edge from %{i}")
        _check(node.op is not Op.INPUT or any(nid == node.id for _, nid in g.inputs), at,
               "INPUT node not listed in graph.inputs")
        if _after(program, "fold_constants"):
            _check(node.op not in (Op.LIST, Op.INIT, Op.SELECT), at, "left unfolded")
        if _after(program, "infer_shapes"):
            _check(node.type is not None, at, "has no type")
            if node.op is Op.CONST:
                _check(isinstance(node.type, ConstType), at, "constant without a const type")
            if node.op in CORES:
                _check(isinstance(node.type, TensorType), at, "core result is not a tensor")
                _check(node.attr("heads") is not None or node.op is Op.SCAN, at,
                       "core without shape annotations")
        if _after(program, "canonicalize_cores") and node.op in (Op.LINEAR, Op.DELTA):
            pd = 3 if node.op is Op.LINEAR else 4
            _check(g.node(node.inputs[pd]).attr("value", 0) is None, at,
                   "decay not canonicalised to log space")
            _check(node.attr("log_space") is True, at, "log_space not set")
        if node.op is Op.EXPERTS:
            region = node.attr("region")
            _check(isinstance(region, tuple), at, "EXPERTS without a region")
            for other in g.nodes():
                if other.scope[:len(region)] != region:
                    continue
                for user in g.users(other.id):
                    u = g.node(user)
                    _check(u.scope[:len(region)] == region or user == node.id, at,
                           f"%{other.id} inside the expert region is used outside it by %{user}")
    if block:
        _check(len(g.inputs) == 1 and g.inputs[0][0] == "x", where, "a block has one input 'x'")
        _check(g.output is not None and g.output in g, where, "no output")
        _check(g.node(g.output).op is Op.OUTPUT, where, "output is not an OUTPUT node")
        outputs = [n for n in g.nodes() if n.op is Op.OUTPUT]
        _check(len(outputs) == 1, where, f"{len(outputs)} OUTPUT nodes")


def verify(program: Program) -> None:
    _check(program.stage in STAGES, "program", f"unknown stage {program.stage!r}")
    if program.spec.model is None:
        return
    if _after(program, "expand_pattern"):
        _check(len(program.layers) > 0, "program", "no layers")
        for i, layer in enumerate(program.layers):
            _check(layer.index == i, f"layer {i}", "layer indices are not consecutive")
            _check(layer.instance in program.blocks, f"layer {i}",
                   f"unknown block instance {layer.instance!r}")
        used = {layer.instance for layer in program.layers}
        _check(used == set(program.blocks), "program", "block instances unused by any layer")
    if _after(program, "build_graphs"):
        for name, inst in program.blocks.items():
            _check(inst.graph is not None, f"block {name}", "no graph")
            verify_graph(inst.graph, f"block {name}", program, block=True)
        if program.final_norm is not None:
            verify_graph(program.final_norm, "final_norm", program, block=True)
        if program.shared is not None:
            verify_graph(program.shared, "shared", program, block=False)
            for nm, nid in program.shared_outputs.items():
                _check(nid in program.shared, "shared", f"output {nm!r} missing")
    if _after(program, "infer_memory"):
        for name, inst in program.blocks.items():
            for st in inst.states:
                _check(st.node in inst.graph, f"block {name}", f"state {st.name} has no node")
