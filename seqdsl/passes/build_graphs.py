"""Pass 3 — graph building: one dataflow graph per block instance, plus the shared-values graph.

Mixers, channel mixers and fns are inlined at their call sites; every node remembers the scope of
calls it came from (``("mamba",)``, ``("swiglu_1",)``) and learnable nodes get readable names from
the variables they are assigned to, so backends can emit ``mamba.dt_proj``-style parameters.
Hyper-parameters become CONST nodes (folded by the next pass); nothing is evaluated here.
"""

from __future__ import annotations

import dataclasses

from seqdsl.diagnostics import Collector, error
from seqdsl.frontend import ast
from seqdsl.ir.builtins import BUILTINS, INIT_RULES, REQUIRED
from seqdsl.ir.calls import Signature, bind
from seqdsl.ir.graph import BlockInstance, Graph, Program
from seqdsl.ir.ops import PARAMETRIC, Op
from seqdsl.ir.values import BINOP_OF_TOKEN


class _Builder:
    def __init__(self, program: Program, graph: Graph):
        self.program = program
        self.spec = program.spec
        self.g = graph
        self.global_consts: dict[str, int] = {}
        self.scope_counts: dict[tuple[str, ...], dict[str, int]] = {}
        self.names: dict[tuple[str, ...], set[str]] = {}
        self.call_stack: list[str] = []

    # -- helpers
    def const(self, value, span, sym: str | None = None, scope=()) -> int:
        attrs = {"value": value}
        if sym is not None:
            attrs["sym"] = sym
        return self.g.add(Op.CONST, (), span, attrs=attrs, scope=scope)

    def global_name(self, name: str, span) -> int:
        if name not in self.global_consts:
            self.global_consts[name] = self.const(self.spec.config[name], span, sym=name)
        return self.global_consts[name]

    def child_scope(self, scope: tuple[str, ...], name: str) -> tuple[str, ...]:
        counts = self.scope_counts.setdefault(scope, {})
        n = counts.get(name, 0)
        counts[name] = n + 1
        return scope + (name if n == 0 else f"{name}_{n}",)

    def unique(self, scope: tuple[str, ...], base: str) -> str:
        taken = self.names.setdefault(scope, set())
        name, i = base, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def label(self, first_new: int, root: int, targets: tuple[str, ...], scope) -> None:
        """Name the learnable nodes an assignment created, after its targets."""
        base = "_".join(t for t in targets if t != "x") or None
        for nid in range(first_new, self.g._next):
            if nid not in self.g:
                continue
            node = self.g.node(nid)
            if node.scope != scope or node.name is not None:
                continue
            if node.op in PARAMETRIC:
                if base is None:
                    stem = node.op.value if node.op is not Op.PARAM else "weight"
                elif nid == root:
                    stem = base
                elif base == "out":  # inside a return expression: name by the op
                    stem = node.op.value if node.op is not Op.PARAM else "weight"
                else:
                    stem = f"{base}_{node.op.value}" if node.op is not Op.PARAM else f"{base}_weight"
                self.g.set(node.replace(name=self.unique(scope, stem)))
            elif nid == root and len(targets) == 1 and targets[0] != "x" and not (
                    node.op is Op.CONST and node.attr("sym")):
                self.g.set(node.replace(name=targets[0]))

    # -- expressions
    def expr(self, e: ast.Expr, env: dict[str, int], scope: tuple[str, ...]) -> int:
        if isinstance(e, ast.Number | ast.String | ast.Bool):
            return self.const(e.value, e.span, scope=scope)
        if isinstance(e, ast.NoneLit):
            return self.const(None, e.span, scope=scope)
        if isinstance(e, ast.Name):
            return self.name(e, env, scope)
        if isinstance(e, ast.BinOp):
            a = self.expr(e.left, env, scope)
            b = self.expr(e.right, env, scope)
            return self.g.add(BINOP_OF_TOKEN[e.op], (a, b), e.op_span, scope=scope)
        if isinstance(e, ast.UnaryOp):
            v = self.expr(e.operand, env, scope)
            if e.op == "+":
                return v
            return self.g.add(Op.NEG if e.op == "-" else Op.NOT, (v,), e.span, scope=scope)
        if isinstance(e, ast.IfExp):
            c = self.expr(e.cond, env, scope)
            a = self.expr(e.then, env, scope)
            b = self.expr(e.orelse, env, scope)
            return self.g.add(Op.SELECT, (c, a, b), e.span, scope=scope)
        if isinstance(e, ast.Index):
            v = self.expr(e.value, env, scope)
            i = self.expr(e.index, env, scope)
            return self.g.add(Op.INDEX, (v, i), e.span, scope=scope)
        if isinstance(e, ast.ListExpr):
            items = tuple(self.expr(i, env, scope) for i in e.items)
            return self.g.add(Op.LIST, items, e.span, scope=scope)
        if isinstance(e, ast.Call):
            return self.call(e, env, scope)
        raise error(e.span, "comprehensions are only allowed in the model's layer pattern")

    def name(self, e: ast.Name, env, scope) -> int:
        n = e.id
        if n in env:
            return env[n]
        if n == "layer":
            return self.g.add(Op.LAYER_INDEX, (), e.span, scope=scope)
        if n in self.spec.config:
            return self.global_name(n, e.span)
        if n in self.program.shared_outputs:
            return self.g.add(Op.SHARED, (), e.span, attrs={"name": n}, scope=scope)
        if n in INIT_RULES:
            return self.g.add(Op.INIT, (), e.span, attrs={"rule": n, "keywords": ()}, scope=scope)
        raise error(e.span, f"unknown name '{n}'")  # resolve_names reports these first

    def call(self, e: ast.Call, env, scope) -> int:
        if e.func in INIT_RULES:
            args = tuple(self.expr(a, env, scope) for a in e.args)
            kws = tuple(k.name for k in e.kwargs)
            args += tuple(self.expr(k.value, env, scope) for k in e.kwargs)
            return self.g.add(Op.INIT, args, e.span, attrs={"rule": e.func, "keywords": kws},
                              scope=scope)
        if e.func in self.spec.definitions:
            return self.inline(self.spec.definitions[e.func], e, env, scope)
        b = BUILTINS[e.func]
        bound = bind(Signature.of_builtin(b), e)
        if b.op is Op.EXPERTS:
            return self.experts(e, bound, env, scope)
        inputs = []
        for a in b.args:
            if a.name in bound.args:
                inputs.append(self.expr(bound.args[a.name], env, scope))
            else:
                default = None if a.default is REQUIRED else a.default
                inputs.append(self.const(default, e.func_span, scope=scope))
        inputs += [self.expr(x, env, scope) for x in bound.extra]
        given = tuple(a.name for a in b.args if a.name in bound.args)
        return self.g.add(b.op, tuple(inputs), e.span, attrs={"given": given}, scope=scope)

    def experts(self, e: ast.Call, bound, env, scope) -> int:
        weights = self.expr(bound.args["weights"], env, scope)
        expert_call = bound.args["expert"]
        region = self.child_scope(scope, "experts")
        out = self.inline(self.spec.definitions[expert_call.func], expert_call, env, scope,
                          callee_scope=region)
        return self.g.add(Op.EXPERTS, (out, weights), e.span, attrs={"region": region},
                          scope=scope)

    def inline(self, d, call: ast.Call, env, scope, callee_scope=None) -> int:
        if d.name in self.call_stack:
            raise error(call.func_span, "recursive call: " + " -> ".join(self.call_stack + [d.name]))
        bound = bind(Signature.of_definition(d), call)
        inner_scope = callee_scope or self.child_scope(scope, d.name)
        inner: dict[str, int] = {}
        for name in d.inputs:
            inner[name] = self.expr(bound.args[name], env, scope)
        # the call: definition, kind, call site, and the nodes bound to its tensor inputs
        self.g.scopes[inner_scope] = (d.name, d.kind, call.span,
                                      tuple((name, inner[name]) for name in d.inputs))
        self.hyper(d, inner, inner_scope, lambda h: self.expr(bound.args[h.name], env, scope)
                   if h.name in bound.args else None)
        self.call_stack.append(d.name)
        try:
            return self.body(d, inner, inner_scope)
        finally:
            self.call_stack.pop()

    def hyper(self, d, env: dict[str, int], scope, given) -> None:
        """Bind d's hyper-parameters into env: the value the caller gave (``given(h)`` returns
        its node, or None), else a --set override, else the default built in d's scope."""
        overrides = self.spec.def_overrides.get(d.name, {})
        for h in d.hyper:
            nid = given(h)
            if nid is None and h.name in overrides:
                nid = self.const(overrides[h.name], h.span, sym=h.name, scope=scope)
            env[h.name] = nid if nid is not None else self.default(h, env, scope)

    def default(self, h, env, scope) -> int:
        """Build a hyper-parameter's default; the value is named after the parameter, so dims
        computed from it read symbolically (``[n=16]``, ``[rank=48]``)."""
        first = self.g._next
        nid = self.expr(h.default, env, scope)
        node = self.g.node(nid)
        if nid >= first and node.name is None:
            self.g.set(node.replace(name=h.name))
        return nid

    def final_norm(self, name: str, span, keywords=()) -> Graph:
        """The norm before the head, as a graph over the residual stream."""
        x = self.g.add(Op.INPUT, (), span, name="x")
        self.g.inputs = [("x", x)]
        call = ast.Call(name, (ast.Name("x", span),), tuple(keywords), span, span)
        out = self.call(call, {"x": x}, ())
        self.g.output = self.g.add(Op.OUTPUT, (out,), span)
        return self.g.prune()

    def body(self, d, env: dict[str, int], scope) -> int:
        env = dict(env)
        result = None
        for stmt in d.body:
            first = self.g._next
            if isinstance(stmt, ast.Return):
                result = self.expr(stmt.value, env, scope)
                self.label(first, result, ("out",) if scope else (), scope)
                continue
            value = self.expr(stmt.value, env, scope)
            if len(stmt.targets) == 1:
                env[stmt.targets[0]] = value
            else:
                n = len(stmt.targets)
                for i, (t, span) in enumerate(zip(stmt.targets, stmt.target_spans)):
                    env[t] = self.g.add(Op.GETITEM, (value,), span, attrs={"index": i, "count": n},
                                        scope=scope, name=t)
            self.label(first, value, stmt.targets, scope)
        if d.kind == "block":
            return env["x"]
        return result

    # -- roots
    def block(self, inst: BlockInstance) -> Graph:
        d = self.spec.definitions[inst.block]
        x = self.g.add(Op.INPUT, (), d.name_span, name="x")
        self.g.inputs = [("x", x)]
        env = {"x": x}
        args = dict(inst.args)
        # a value bound in the layer pattern points there (the block's entry), not at the default
        self.hyper(d, env, (), lambda h: self.const(args[h.name], inst.bound_at or h.span,
                                                    sym=h.name)
                   if h.name in args else None)
        out = self.body(d, env, ())
        self.g.output = self.g.add(Op.OUTPUT, (out,), d.name_span)
        return self.g.prune()


def build_graphs(program: Program) -> Program:
    spec = program.spec
    if spec.model is None:
        return program.replace(stage="build_graphs")
    collector = Collector()
    shared_graph = Graph()
    shared_outputs: dict[str, int] = {}
    b = _Builder(program, shared_graph)
    env: dict[str, int] = {}
    for s in spec.model.shared:
        if s.name in program.shared_blocks:
            continue
        with collector.guard():
            first = shared_graph._next
            nid = b.expr(s.value, env, ("shared",))
            b.label(first, nid, (s.name,), ("shared",))
            shared_graph.set(shared_graph.node(nid).replace(name=s.name))
            env[s.name] = nid
            shared_outputs[s.name] = nid
    collector.raise_if_any()
    program = program.replace(shared=shared_graph if shared_outputs else None,
                              shared_outputs=shared_outputs)
    blocks = {}
    for name, inst in program.blocks.items():
        with collector.guard():
            graph = _Builder(program, Graph()).block(inst)
            blocks[name] = dataclasses.replace(inst, graph=graph)
    final_norm = None
    if program.settings.final_norm is not None:
        with collector.guard():
            span = spec.model.setting_spans.get("final_norm", spec.model.name_span)
            given = program.settings.final_norm_call
            final_norm = _Builder(program, Graph()).final_norm(
                program.settings.final_norm, span, given.kwargs if given is not None else ())
    collector.raise_if_any()
    return program.replace(stage="build_graphs", blocks=blocks, final_norm=final_norm)
