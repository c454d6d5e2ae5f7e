"""Pass 1 — name resolution: every name in every definition refers to something.

Checks, on the validated spec and for *all* definitions (used or not): names are defined before
use, calls name a builtin / init rule / definition and bind their arguments (arity, keyword names),
blocks are not called from expressions, definitions do not call themselves, and the model's
settings and shared values refer to valid things. Reports every error found, not just the first.
"""

from __future__ import annotations

from seqdsl.diagnostics import Collector, SpecError, did_you_mean, error
from seqdsl.frontend import ast
from seqdsl.ir.builtins import BUILTINS, INIT_RULES, PATTERN_FUNCTIONS, RESERVED_NAMES
from seqdsl.ir.calls import Signature, bind
from seqdsl.ir.graph import Program

#: builtin norms a model may use as `final_norm`
FINAL_NORMS = ("rmsnorm", "layernorm")


class _Resolver:
    def __init__(self, program: Program, collector: Collector):
        self.spec = program.spec
        self.defs = self.spec.definitions
        self.globals = set(self.spec.config)
        self.shared = {s.name for s in self.spec.model.shared} if self.spec.model else set()
        self.shared_blocks = {s.name for s in self.spec.model.shared
                              if isinstance(s.value, ast.Name) and s.value.id in self.defs} \
            if self.spec.model else set()
        self.has_model = self.spec.model is not None
        self.collector = collector
        self.calls: dict[str, list[tuple[str, ast.Call]]] = {}

    # -- expressions
    def expr(self, e: ast.Expr, env: set[str], where: str) -> None:
        if isinstance(e, ast.Name):
            self.name(e, env)
        elif isinstance(e, ast.Call):
            self.call(e, env, where)
        elif isinstance(e, ast.Comprehension):
            raise error(e.span, "comprehensions are only allowed in the model's layer pattern")
        else:
            for child in ast.children(e):  # calls and comprehensions are handled above
                self.expr(child, env, where)

    def name(self, e: ast.Name, env: set[str]) -> None:
        n = e.id
        if n in self.shared_blocks and n not in env:
            raise error(e.span, f"'{n}' is a shared block; blocks are listed in the model's "
                        "layers, not used in expressions")
        if n in env or n in self.globals or n in self.shared or n in RESERVED_NAMES \
                or n in INIT_RULES:
            return
        if n in self.defs:
            d = self.defs[n]
            raise error(e.span, f"'{n}' is a {d.kind}; call it with its input: {n}(...)")
        if n in BUILTINS:
            raise error(e.span, f"'{n}' is a function; call it: {BUILTINS[n].signature()}")
        if not self.has_model:
            return  # a library file: free names are the importing model's hyper-parameters
        visible = set(env) | self.globals | self.shared | set(RESERVED_NAMES) | set(INIT_RULES)
        raise error(e.span, f"unknown name '{n}'", did_you_mean(n, visible))

    def call(self, e: ast.Call, env: set[str], where: str) -> None:
        f = e.func
        if f in self.defs:
            d = self.defs[f]
            if d.kind == "block":
                raise error(e.func_span, f"'{f}' is a block; blocks are listed in the model's "
                            "layers, not called", "call a mixer, channel or fn instead")
            bind(Signature.of_definition(d), e)
            self.calls.setdefault(where, []).append((f, e))
        elif f in BUILTINS:
            b = BUILTINS[f]
            bound = bind(Signature.of_builtin(b), e)
            if b.name == "experts":
                expert = bound.args.get("expert")
                if not (isinstance(expert, ast.Call) and expert.func in self.defs
                        and self.defs[expert.func].kind in ("channel", "fn")):
                    raise error(expert.span if expert is not None else e.span,
                                "experts() takes a call to a channel mixer or fn as its expert",
                                "e.g. experts(swiglu(x, hidden = 2 * d), route(proj(x, 8), 2))")
        elif f in INIT_RULES:
            pass  # arity is checked when the rule is evaluated
        elif f in self.shared_blocks:
            raise error(e.func_span, f"'{f}' is a shared block; blocks are listed in the model's "
                        "layers, not called", "call a mixer, channel or fn instead")
        elif f in PATTERN_FUNCTIONS:
            raise error(e.func_span, f"'{f}' is only available in the model's layer pattern")
        else:
            names = list(BUILTINS) + list(self.defs) + list(INIT_RULES)
            hint = did_you_mean(f, names)
            if f in env or f in self.globals:
                hint = f"'{f}' is a value, not a function"
            raise error(e.func_span, f"unknown function '{f}'", hint)
        for a in e.args:
            self.expr(a, env, where)
        for k in e.kwargs:
            self.expr(k.value, env, where)

    # -- definitions
    def definition(self, d) -> None:
        env = set(d.inputs)
        for h in d.hyper:
            with self.collector.guard():
                self.expr(h.default, env, d.name)
            env.add(h.name)
        assigned_later = {t: s for s in d.body if isinstance(s, ast.Assign) for t in s.targets}
        for stmt in d.body:
            with self.collector.guard():
                try:
                    self.expr(stmt.value, env, d.name)
                except SpecError as exc:
                    # point out use-before-assignment, which reads better than "unknown name"
                    msg = exc.diagnostics
                    if msg[0].message.startswith("unknown name '"):
                        name = msg[0].message.split("'")[1]
                        if name in assigned_later:
                            raise error(msg[0].span, f"'{name}' is used before it is assigned",
                                        f"it is assigned at {assigned_later[name].span}") from None
                    raise
            if isinstance(stmt, ast.Assign):
                env.update(stmt.targets)

    def model(self) -> None:
        m = self.spec.model
        if m is None:
            return
        env: set[str] = set()
        first: dict[str, ast.Shared] = {}
        defined = {s.name: s for s in m.shared}
        for s in m.shared:
            with self.collector.guard():
                if s.name in first:
                    raise error(s.name_span, f"shared value '{s.name}' is defined twice",
                                f"first defined at {first[s.name].name_span}")
                first[s.name] = s
                if s.name in self.spec.config:
                    raise error(s.name_span, f"shared value '{s.name}' has the name of a "
                                "hyper-parameter")
                if s.name in self.defs and self.defs[s.name].kind != "block":
                    raise error(s.name_span, f"'{s.name}' is already a {self.defs[s.name].kind}")
                if isinstance(s.value, ast.Name) and s.value.id in self.defs:
                    if self.defs[s.value.id].kind != "block":
                        raise error(s.value.span, f"only blocks and tensors can be shared; "
                                    f"'{s.value.id}' is a {self.defs[s.value.id].kind}")
                else:
                    for e in ast.walk(s.value):
                        if isinstance(e, ast.Name) and e.id in RESERVED_NAMES:
                            raise error(e.span, f"'{e.id}' is not available in a shared "
                                        "value: shared values are the same for every layer",
                                        f"use it where the value is read, e.g. {s.name}[{e.id}]")
                        if isinstance(e, ast.Name) and e.id in defined and e.id not in env:
                            raise error(e.span, f"shared value '{e.id}' is used before it is "
                                        "defined", f"it is defined at {defined[e.id].name_span}")
                    self.expr(s.value, env, "<shared>")
            env.add(s.name)
        norm = m.settings.get("final_norm")
        if norm is not None and not isinstance(norm, ast.NoneLit):
            with self.collector.guard():
                # a name, or a call with keyword arguments only: rmsnorm(eps = 1e-5)
                name = norm.func if isinstance(norm, ast.Call) and not norm.args else \
                    norm.id if isinstance(norm, ast.Name) else None
                ok = name is not None and (
                    name in FINAL_NORMS or (name in self.defs and self.defs[name].kind == "fn"
                                            and len(self.defs[name].inputs) == 1))
                if ok and isinstance(norm, ast.Call):  # check the keywords as for a call on x
                    x = ast.Name("x", norm.span)
                    self.call(ast.Call(name, (x,), norm.kwargs, norm.span, norm.func_span),
                              {"x"}, "<final_norm>")
                if not ok:
                    got = name or ("an expression" if not isinstance(norm, ast.Name) else norm.id)
                    raise error(norm.span, f"final_norm must be rmsnorm, layernorm, a fn of one "
                                f"input, or none; got {got}",
                                did_you_mean(got, list(FINAL_NORMS)) if isinstance(norm, ast.Name) else None)

    def recursion(self) -> None:
        """A definition may not call itself, directly or through others."""
        graph = {k: [f for f, _ in v] for k, v in self.calls.items()}
        sites = {k: v for k, v in self.calls.items()}
        state: dict[str, int] = {}

        def visit(n: str, path: list[str]) -> None:
            state[n] = 1
            for callee, call in sites.get(n, []):
                if state.get(callee) == 1:
                    cycle = path[path.index(callee):] + [callee] if callee in path else [n, callee]
                    raise error(call.func_span, "recursive call: " + " -> ".join(cycle),
                                "definitions are inlined, so they cannot call themselves")
                if state.get(callee) is None:
                    visit(callee, path + [callee])
            state[n] = 2

        for name in sorted(graph):
            if state.get(name) is None:
                with self.collector.guard():
                    visit(name, [name])


def resolve_names(program: Program) -> Program:
    collector = Collector()
    r = _Resolver(program, collector)
    for d in program.spec.definitions.values():
        r.definition(d)
    r.model()
    r.recursion()
    collector.raise_if_any()
    return program.replace(stage="resolve_names")


__all__ = ["resolve_names", "FINAL_NORMS"]
