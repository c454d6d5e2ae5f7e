"""The torch code generator: a lowered Program → one readable PyTorch module.

The generator precomputes a view-model (class names, ``__init__`` lines, ``forward`` lines with
shape comments) and the jinja2 template only lays it out. Each block instance becomes an
``nn.Module`` whose forward is a straight-line transcription of its graph; parameters live in
one container per call scope (``self.mamba.dt_proj``), so names read like hand-written code.
Values are ``[B, T, *per-token shape]`` when they vary over time, and plain per-token tensors
(parameters, shared tables) otherwise.
"""

from __future__ import annotations

import ast
import builtins
import keyword
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from seqdsl import __version__
from seqdsl.ir.builtins import InitRule
from seqdsl.ir.graph import Graph, Program
from seqdsl.ir.ops import ELEMENTWISE_UNARY, Op
from seqdsl.ir.types import TensorType

TEMPLATES = Path(__file__).parent / "templates"

_RESERVED = set(keyword.kwlist) | set(dir(builtins)) | {
    "self", "state", "shared", "new_state", "cu_seqlens", "run", "layer_idx", "torch",
    "nn", "F", "rt", "math", "config", "Config", "Model"}

_UNARY = {Op.NEG: "-{}", Op.SIGMOID: "torch.sigmoid({})", Op.SILU: "F.silu({})",
          Op.RELU: "F.relu({})",
          Op.SOFTPLUS: "F.softplus({})", Op.TANH: "torch.tanh({})", Op.EXP: "torch.exp({})",
          Op.LOG: "torch.log({})", Op.LOGSIGMOID: "F.logsigmoid({})", Op.SQRT: "torch.sqrt({})",
          Op.ABS: "torch.abs({})"}
_BINARY = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.POW: "**"}


class Namespace:
    """Hands out unique, legal Python identifiers that never shadow builtins or generated names."""

    def __init__(self, reserved=()):
        self.taken = set(_RESERVED) | set(reserved)

    def name(self, base: str) -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "t"
        if base[0].isdigit():
            base = "t" + base
        candidate, i = base, 1
        while candidate in self.taken:
            candidate, i = f"{base}_{i}", i + 1
        self.taken.add(candidate)
        return candidate


def camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.split("_") if p) or "Block"


def _literal(v) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (bool, int)) or v is None:
        return repr(v)
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(_literal(i) for i in v) + ("," if len(v) == 1 else "") + ")"
    raise TypeError(f"not a literal: {v!r}")


@dataclass
class ParamInit:
    target: str        # e.g. "self.mamba.A_weight" or "self.mamba.dt_proj.bias"
    rule: InitRule


@dataclass
class ModuleView:
    class_name: str
    doc: str
    spec_ref: str
    init_lines: list[str] = field(default_factory=list)
    forward_lines: list[str] = field(default_factory=list)
    inits: list[ParamInit] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    forward_args: str = ""
    stateful: bool = True  # forward(..., state, shared, layer_idx, ...) -> (out, new_state)


class _GraphEmitter:
    """Emits the __init__ and forward lines for one graph."""

    def __init__(self, g: Graph, owner: str = "self",
                 nodes: list | None = None, inputs: dict[int, str] | None = None):
        self.g = g
        self.ns = Namespace()
        self.owner = owner
        self.vars: dict[int, str] = dict(inputs or {})
        self.ns.taken.update(self.vars.values())
        self.tv: dict[int, bool] = {}
        self.init: list[str] = []
        self.fwd: list[str] = []
        self.inits: list[ParamInit] = []
        self.containers: set[tuple[str, ...]] = set()
        self.attr_ns: dict[tuple[str, ...], Namespace] = {}
        self.nodes = nodes if nodes is not None else list(g.nodes())
        self.states: list[str] = []
        self.fp32: set[int] = set()
        self.current: int | None = None
        self.class_prefix = "Expert"
        self.scope_prefix: tuple[str, ...] = ()  # stripped from attribute paths (sub-modules)
        self.dtype_of = "x"  # a tensor whose dtype is the activation dtype
        self.registry: "ClassRegistry | None" = None
        regions = [n.attr("region") for n in self.nodes if n.op is Op.EXPERTS]
        self.in_region = {n.id for n in self.nodes
                          if any(n.scope[:len(r)] == r for r in regions)}
        self.submodules: dict[tuple[str, ...], dict] = {}  # call scope -> its nodes and interface
        self.in_submodule: dict[int, tuple[str, ...]] = {}

    # -- helpers
    def t(self, nid: int) -> TensorType:
        return self.g.node(nid).type

    def rank(self, nid: int) -> int:
        t = self.t(nid)
        return len(t.shape) if isinstance(t, TensorType) else 0

    def const(self, nid: int):
        return self.g.node(nid).attr("value")

    def ref(self, nid: int) -> str:
        node = self.g.node(nid)
        if node.op is Op.CONST:
            return _literal(node.attr("value"))
        name = self.vars[nid]
        t = node.type
        if self.current in self.fp32 and nid not in self.fp32:
            if isinstance(t, TensorType) and t.dtype == "real":
                return f"{name}.float()"
        elif self.current not in self.fp32 and nid in self.fp32 and self.current is not None \
                and self.g.node(self.current).op not in self._GATES:
            if isinstance(t, TensorType) and t.dtype == "real":
                return f"{name}.to({self.dtype_of}.dtype)"  # back to the activation dtype
        return name

    def varies(self, nid: int) -> bool:
        return self.tv.get(nid, False)

    def attr(self, node) -> str:
        """A parameter-holding attribute path for a node: self.<scope...>.<name>."""
        scope = node.scope[len(self.scope_prefix):]
        for i in range(1, len(scope) + 1):
            if scope[:i] not in self.containers:
                self.containers.add(scope[:i])
                parent = ".".join((self.owner,) + scope[:i - 1])
                self.init.append(f"{parent}.{scope[i - 1]} = nn.Module()")
        ns = self.attr_ns.setdefault(scope, Namespace({"layer_idx"}))
        name = ns.name(node.name or node.op.value)
        return ".".join((self.owner,) + scope + (name,))

    def var(self, node) -> str:
        name = self.ns.name(node.name or f"t{node.id}")
        self.vars[node.id] = name
        return name

    def comment(self, node) -> str:
        t = node.type
        if isinstance(t, TensorType):
            dims = ", ".join(str(d) for d in t.shape)
            lead = "B, T" + (", " if dims else "") if self.varies(node.id) else ""
            return f"  # [{lead}{dims}]" + (" complex" if t.dtype == "complex" else "")
        return ""

    def assign(self, node, expr: str) -> None:
        v = self.var(node)
        self.fwd.append(f"{v} = {expr}{self.comment(node)}")

    def operand(self, nid: int, rank: int) -> str:
        """A reference lifted to ``rank`` per-token dims when it varies over time."""
        r = self.ref(nid)
        if self.varies(nid) and self.rank(nid) < rank:
            return f"rt.lift({r}, {rank})"
        return r

    def timed(self, nid: int, like: str) -> str:
        """A value as [B, T, ...]: time-invariant ones are expanded along batch and time."""
        r = self.ref(nid)
        return r if self.varies(nid) else f"rt.along_time({r}, {like})"

    def state_slot(self, node) -> str:
        scope = node.scope[len(self.scope_prefix):]
        key = ".".join(scope + ((node.name,) if node.name else (node.op.value,)))
        self.states.append(key)
        return key

    # -- precision
    #: ops computed in float32 when they produce a core's gate: cheap, and the difference
    #: between a decay of 1 - 2^-9 and 1 matters (bf16 cannot tell them apart)
    _GATE_MATH = ELEMENTWISE_UNARY | frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.LERP,
                                               Op.EXPI, Op.COMPLEX, Op.REAL, Op.IMAG})
    #: core inputs that are gates or decays: (op, input positions)
    _GATES = {Op.SCAN: (0, 1), Op.LINEAR: (4, 7), Op.DELTA: (3, 5)}

    def _fp32_nodes(self) -> set[int]:
        out: set[int] = set()
        stack = [n.inputs[i] for n in self.nodes if n.op in self._GATES
                 for i in self._GATES[n.op] if i < len(n.inputs)]
        while stack:
            nid = stack.pop()
            node = self.g.node(nid)
            if nid in out or node.op not in self._GATE_MATH:
                continue
            out.add(nid)
            stack.extend(node.inputs)
        return out

    # -- driver
    def split_submodules(self) -> None:
        """Calls of mixers, channels and fns made at this level become modules of their own."""
        depth = len(self.scope_prefix) + 1
        ids = {n.id for n in self.nodes}
        for scope, info in self.g.scopes.items():
            if len(scope) != depth or scope[:-1] != self.scope_prefix or scope[-1].startswith("experts"):
                continue
            inside = [n for n in self.nodes if n.scope[:depth] == scope]
            if not inside:
                continue
            inside_ids = {n.id for n in inside}
            outputs = sorted({n.id for n in inside for u in self.g.users(n.id)
                              if u in ids and u not in inside_ids})
            if len(outputs) != 1:
                continue  # not a plain call (nothing or several values leave it): keep it inline
            inputs = []
            for n in inside:
                for i in n.inputs:
                    if i not in inside_ids and self.g.node(i).op is not Op.CONST and i not in inputs:
                        inputs.append(i)
            self.submodules[scope] = {"nodes": inside, "output": outputs[0], "inputs": inputs,
                                      "info": info}
            for n in inside:
                self.in_submodule[n.id] = scope

    def emit_submodule(self, scope) -> None:
        sub = self.submodules[scope]
        defname, kind, _, declared = sub["info"][:4]
        by_node = {nid: name for name, nid in declared}
        ns = Namespace({"state", "shared", "layer_idx", "cu_seqlens", "run"})
        names = {i: ns.name(by_node.get(i, f"in{k}")) for k, i in enumerate(sub["inputs"])}
        em = _GraphEmitter(self.g, nodes=sub["nodes"], inputs=names)
        em.scope_prefix = scope
        em.registry = self.registry
        em.class_prefix = camel(defname) + "Expert"
        em.dtype_of = next(iter(names.values()), "x")
        for i in sub["inputs"]:
            em.tv[i] = self.varies(i)
        em.split_submodules()
        em.run()
        em.fwd.append(f"return {em.ref(sub['output'])}")
        d = self.registry.program.spec.definitions[defname]
        # a module without state, shared values or the layer index takes just its inputs
        stateful = bool(em.states) or any(n.op in (Op.SHARED, Op.LAYER_INDEX) for n in sub["nodes"])
        view = ModuleView(camel(defname), f"The {kind} `{defname}`.",
                          _spec_ref(d.name_span, self.registry.program.spec.path), em.init, em.fwd,
                          em.inits, em.states, forward_args=", ".join(names.values()),
                          stateful=stateful)
        cls = self.registry.add(view)
        attr = scope[-1]
        self.init.append(f"{self.owner}.{attr} = {cls}()")
        out_node = self.g.node(sub["output"])
        self.tv[sub["output"]] = any(self.varies(i) for i in sub["inputs"])
        args = ", ".join(self.ref(i) for i in sub["inputs"])
        call = f"{self.owner}.{attr}({args}"
        v = self.var(out_node)
        if stateful:
            self.fwd.append(f"{v}, new_state[{attr!r}] = {call}, state.get({attr!r}, {{}}), shared, "
                            f"layer_idx, cu_seqlens, run){self.comment(out_node)}")
            self.states.append(attr)
        else:
            self.fwd.append(f"{v} = {call}){self.comment(out_node)}")

    def run(self) -> None:
        self.fp32 = self._fp32_nodes()
        for node in self.nodes:
            if node.id in self.in_submodule:
                scope = self.in_submodule[node.id]
                if node.id == self.submodules[scope]["output"]:
                    self.current = None
                    self.emit_submodule(scope)
                continue
            if node.id in self.vars or node.id in self.in_region:
                continue
            self.current = node.id
            ins = node.inputs
            self.tv[node.id] = any(self.varies(i) for i in ins) or node.op is Op.INPUT or \
                (node.id in self.vars)
            handler = getattr(self, "op_" + node.op.name.lower(), None)
            if handler is not None:
                handler(node)
            elif node.op is Op.GELU:
                self.assign(node, f"F.gelu({self.ref(ins[0])}, approximate={self.const(ins[1])!r})")
            elif node.op in _UNARY:
                self.assign(node, _UNARY[node.op].format(self.ref(ins[0])))
            elif node.op in _BINARY:
                r = self.rank(node.id)
                a, b = self.operand(ins[0], r), self.operand(ins[1], r)
                self.assign(node, f"{a} {_BINARY[node.op]} {b}")
            else:  # pragma: no cover - every op reaching codegen has an emitter
                raise NotImplementedError(f"torch backend: no emitter for {node.op.value}")

    # -- sources
    def op_const(self, node):
        self.tv[node.id] = False

    def op_input(self, node):
        self.tv[node.id] = True

    def op_output(self, node):
        self.fwd.append(f"return {self.ref(node.inputs[0])}")

    def op_first(self, node):
        self.tv[node.id] = True
        self.assign(node, f"rt.first_token({self.dtype_of}, cu_seqlens, run)")

    def op_layer_index(self, node):
        self.tv[node.id] = False
        self.vars[node.id] = "layer_idx"

    def op_shared(self, node):
        self.tv[node.id] = False
        self.assign(node, f"shared[{node.attr('name')!r}]")

    def op_param(self, node):
        self.tv[node.id] = False
        path = self.attr(node)
        shape = self.const(node.inputs[0])
        shape = shape if isinstance(shape, tuple) else (shape,)
        self.init.append(f"{path} = nn.Parameter(torch.empty({_literal(tuple(shape))}))")
        self.inits.append(ParamInit(path, self.const(node.inputs[1])))
        self.vars[node.id] = path

    def op_arange(self, node):
        self.tv[node.id] = False
        path = self.attr(node)
        parent, name = path.rsplit(".", 1)
        self.init.append(f"{parent}.register_buffer({name!r}, torch.arange("
                         f"{self.const(node.inputs[0])}, dtype=torch.float32), persistent=False)")
        self.vars[node.id] = path

    # -- layers
    def op_proj(self, node):
        x, size, bias, init, bias_init, groups = node.inputs
        fan_in = self.t(x).numel
        out = self.const(size)
        path = self.attr(node)
        if self.const(groups) > 1:
            self.init.append(f"{path} = rt.GroupedLinear({fan_in}, {out}, groups={self.const(groups)}, "
                             f"bias={self.const(bias)})")
        else:
            self.init.append(f"{path} = nn.Linear({fan_in}, {out}, bias={self.const(bias)})")
        if self.const(init) is not None:
            self.inits.append(ParamInit(f"{path}.weight", self.const(init)))
        if self.const(bias_init) is not None:
            self.inits.append(ParamInit(f"{path}.bias", self.const(bias_init)))
        src = self.ref(x)
        if self.rank(x) > 1:
            src = f"{src}.flatten({2 if self.varies(x) else 0})"
        self.assign(node, f"{path}({src})")

    def op_conv1d(self, node):
        x, width, bias, init = node.inputs
        t = self.t(x)
        path = self.attr(node)
        self.init.append(f"{path} = rt.CausalConv1d({t.numel}, {self.const(width)}, "
                         f"bias={self.const(bias)})")
        if self.const(init) is not None:
            self.inits.append(ParamInit(f"{path}.weight", self.const(init)))
        slot = self.state_slot(node)
        src = self.ref(x)
        flat = f"{src}.flatten(2)" if len(t.shape) > 1 else src
        v = self.var(node)
        self.fwd.append(f"{v}, new_state[{slot!r}] = {path}({flat}, state.get({slot!r}), cu_seqlens)")
        if len(t.shape) > 1:
            self.fwd.append(f"{v} = {v}.unflatten(-1, {_literal(t.sizes)}){self.comment(node)}")

    def _norm(self, node, ctor: str, args: str):
        path = self.attr(node)
        self.init.append(f"{path} = rt.{ctor}({args})")
        self.assign(node, f"{path}({self.ref(node.inputs[0])})")

    def op_rmsnorm(self, node):
        x, eps, weight, offset = node.inputs
        extra = f", offset={float(self.const(offset))!r}" if self.const(offset) else ""
        self._norm(node, "RMSNorm", f"{self.t(x).shape[-1].size}, eps={self.const(eps)!r}, "
                                    f"weight={self.const(weight)}{extra}")

    def op_layernorm(self, node):
        x, eps, weight, bias = node.inputs
        self._norm(node, "LayerNorm", f"{self.t(x).shape[-1].size}, eps={self.const(eps)!r}, "
                                      f"weight={self.const(weight)}, bias={self.const(bias)}")

    def op_groupnorm(self, node):
        x, eps, weight = node.inputs
        self._norm(node, "GroupNorm", f"{_literal(self.t(x).sizes)}, eps={self.const(eps)!r}, "
                                      f"weight={self.const(weight)}")

    def op_l2norm(self, node):
        x, eps = node.inputs
        self.assign(node, f"rt.l2norm({self.ref(x)}, eps={self.const(eps)!r})")

    # -- shape
    def op_split(self, node):
        x, parts = node.inputs
        sizes = [t.shape[-1].size for t in node.type.items]
        self.assign(node, f"torch.split({self.ref(x)}, {_literal(tuple(sizes))}, dim=-1)")

    def op_getitem(self, node):
        self.assign(node, f"{self.ref(node.inputs[0])}[{node.attr('index')}]")

    def op_concat(self, node):
        r = self.rank(node.id)
        parts = ", ".join(self.operand(i, r) for i in node.inputs)
        self.assign(node, f"torch.cat([{parts}], dim=-1)")

    def op_heads(self, node):
        dims = node.type.sizes[len(self.t(node.inputs[0]).shape) - 1:]
        self.assign(node, f"{self.ref(node.inputs[0])}.unflatten(-1, {_literal(dims)})")

    def op_flatten(self, node):
        start = 2 if self.varies(node.inputs[0]) else 0
        self.assign(node, f"{self.ref(node.inputs[0])}.flatten({start})")

    def op_index(self, node):
        x, i = node.inputs
        idx = self.ref(i)
        if self.varies(x):
            self.assign(node, f"{self.ref(x)}[:, :, {idx}]")
        else:
            self.assign(node, f"{self.ref(x)}[{idx}]")

    def _dim(self, node, pos) -> int:
        d = self.const(node.inputs[pos])
        return d + 2 if self.varies(node.inputs[0]) and d >= 0 else d

    def op_softmax(self, node):
        self.assign(node, f"torch.softmax({self.ref(node.inputs[0])}, dim={self._dim(node, 1)})")

    def op_cumsum(self, node):
        self.assign(node, f"torch.cumsum({self.ref(node.inputs[0])}, dim={self._dim(node, 1)})")

    def op_sum(self, node):
        self.assign(node, f"torch.sum({self.ref(node.inputs[0])}, dim={self._dim(node, 1)})")

    def op_lerp(self, node):
        r = self.rank(node.id)
        a, b, w = (self.operand(i, r) for i in node.inputs)
        self.assign(node, f"{a} + ({b} - {a}) * {w}")

    # -- complex
    def op_expi(self, node):
        th = self.ref(node.inputs[0])
        self.assign(node, f"torch.polar(torch.ones_like({th}.float()), {th}.float())")

    def op_complex(self, node):
        r = self.rank(node.id)
        a, b = (self.operand(i, r) for i in node.inputs)
        self.assign(node, f"torch.complex(*torch.broadcast_tensors(torch.as_tensor({a}).float(), "
                          f"torch.as_tensor({b}).float()))")

    def op_real(self, node):
        self.assign(node, f"torch.real({self.ref(node.inputs[0])})")

    def op_imag(self, node):
        self.assign(node, f"torch.imag({self.ref(node.inputs[0])})")

    # -- mixture of experts
    def op_route(self, node):
        self.assign(node, f"rt.route({self.ref(node.inputs[0])}, {self.const(node.inputs[1])}, "
                          f"normalize={self.const(node.inputs[2])})")

    def op_experts(self, node):
        """The expert region becomes a class of its own, instantiated once per expert."""
        region = node.attr("region")
        inside = [n for n in self.nodes if n.scope[:len(region)] == region]
        inside_ids = {n.id for n in inside}
        outside_inputs = []
        for n in inside:
            for i in n.inputs:
                src = self.g.node(i)
                if i not in inside_ids and src.op is not Op.CONST and i not in outside_inputs:
                    outside_inputs.append(i)
        out_id = node.inputs[0]
        n_experts = self.t(node.inputs[1]).shape[0].size
        cls = self.class_prefix
        names = {i: f"in{k}" for k, i in enumerate(outside_inputs)}
        sub = _GraphEmitter(self.g, nodes=inside, inputs=names)
        sub.scope_prefix = region
        sub.registry = self.registry
        sub.in_region = set()
        for i in outside_inputs:
            sub.tv[i] = False  # inside an expert, inputs are [N, *S] rows of tokens
        sub.run()
        sub.fwd.append(f"return {sub.ref(out_id)}")
        view = ModuleView(cls, f"One expert (instantiated {n_experts} times).",
                          "", sub.init, sub.fwd, sub.inits, [],
                          forward_args=", ".join(names[i] for i in outside_inputs), stateful=False)
        cls = self.registry.add(view)
        path = self.attr(node.replace(name="experts", scope=node.scope))
        self.init.append(f"{path} = nn.ModuleList([{cls}() for _ in range({n_experts})])")
        args = ", ".join(self.ref(i) for i in outside_inputs)
        self.assign(node, f"rt.mixture({self.ref(node.inputs[1])}, {path}, {args})")

    # -- cores
    def _kernel(self, node) -> str:
        """`, kernel=K.<site>` when a kernel backend generated kernels for this core call."""
        sites = self.registry.kernel_sites if self.registry is not None else None
        name = sites(self.g, node) if sites is not None else None
        return f", kernel=K.{name}" if name else ""

    def _core_qk(self, nid: int, node, head_dim: int) -> str:
        """q or k as [B, T, (steps,) Hk, K]: add a missing head dim. `linear` takes q/k heads
        that each serve H / Hk value heads as they are; `delta` needs them repeated to H."""
        r = self.ref(nid)
        heads, key_heads = node.attr("heads"), node.attr("key_heads")
        has_heads = self.rank(nid) == head_dim  # per-token rank counts (steps,) H, K
        if not has_heads:
            r = f"{r}.unsqueeze({head_dim})"
        shared = key_heads != heads or (not has_heads and heads > 1)
        if shared and node.op is Op.DELTA:
            r = f"rt.repeat_heads({r}, {heads}, dim={head_dim})"
        return r

    def _core_v(self, nid: int, stepped: bool) -> tuple[str, bool]:
        """v as [B, T, (steps,) H, V]; returns it and whether the spec wrote heads."""
        has_heads = self.rank(nid) == (3 if stepped else 2)
        r = self.ref(nid)
        return (r if has_heads else f"{r}.unsqueeze({3 if stepped else 2})"), has_heads

    def op_scan(self, node):
        a, b, _ = node.inputs
        slot = self.state_slot(node)
        r = self.rank(node.id)
        av = self.operand(a, r) if self.varies(a) else \
            f"rt.along_time({self.ref(a)}, {self.ref(b)}, {r})"
        v = self.var(node)
        self.fwd.append(f"{v}, new_state[{slot!r}] = rt.scan({av}, {self.ref(b)}, "
                        f"state.get({slot!r}), cu_seqlens, run{self._kernel(node)})")
        self.fwd.append(f"{v} = {v}.to({self.dtype_of}.dtype){self.comment(node)}")

    def op_linear(self, node):
        q, k, v, _, log_decay, _, _ = node.inputs[:7]
        slot = self.state_slot(node)
        vs, has_heads = self._core_v(v, False)
        qs, ks = self._core_qk(q, node, 2), self._core_qk(k, node, 2)
        kind = node.attr("decay_kind")
        g = "None"
        out = self.var(node)
        scale = repr(node.attr("scale"))
        if node.attr("factored"):  # log decay A * dt with A [(H,) K, V] constant, dt [(H,) V]
            A, dt = self.ref(node.inputs[7]), self.timed(log_decay, vs)
            if not has_heads:
                A, dt = f"{A}.unsqueeze(0)", f"{dt}.unsqueeze(2)"
            call = (f"rt.linear({qs}, {ks}, {vs}, None, {scale}, state.get({slot!r}), cu_seqlens, "
                    f"run, decay_A={A}, decay_dt={dt}{self._kernel(node)})")
            self.fwd.append(f"{out}, new_state[{slot!r}] = {call}")
            if not has_heads:
                self.fwd.append(f"{out} = {out}.squeeze(2){self.comment(node)}")
            return
        if kind != "none":
            g = self.timed(log_decay, vs)
            if not has_heads:  # [B, T] -> [B, T, 1]; [B, T, K(, V)] -> [B, T, 1, K(, V)]
                g = f"{g}.unsqueeze(2)" if self.rank(log_decay) else f"{g}.unsqueeze(-1)"
        if kind == "complex_key":
            phase = self.timed(node.inputs[7], vs)
            if not has_heads:
                phase = f"{phase}.unsqueeze(2)"
            call = (f"rt.linear_complex({qs}, {ks}, {vs}, {g}, {phase}, {scale}, "
                    f"state.get({slot!r}), cu_seqlens, run{self._kernel(node)})")
        else:
            call = (f"rt.linear({qs}, {ks}, {vs}, {g}, {scale}, state.get({slot!r}), cu_seqlens, "
                    f"run{self._kernel(node)})")
        self.fwd.append(f"{out}, new_state[{slot!r}] = {call}")
        if not has_heads:
            self.fwd.append(f"{out} = {out}.squeeze(2){self.comment(node)}")

    def op_delta(self, node):
        q, k, v, beta, _, log_decay, steps, _, _ = node.inputs
        slot = self.state_slot(node)
        stepped = self.rank(k) == self.rank(q) + 1
        vs, has_heads = self._core_v(v, stepped)
        qs = self._core_qk(q, node, 2)
        ks = self._core_qk(k, node, 3 if stepped else 2)
        bs = self.timed(beta, vs)
        g = "None" if node.attr("decay_kind") == "none" else self.timed(log_decay, vs)
        if not has_heads:
            bs = f"{bs}.unsqueeze(-1)"
            g = g if g == "None" else f"{g}.unsqueeze(-1)"
        out = self.var(node)
        self.fwd.append(f"{out}, new_state[{slot!r}] = rt.delta({qs}, {ks}, {vs}, {bs}, {g}, "
                        f"{node.attr('scale')!r}, {self.const(steps)}, state.get({slot!r}), "
                        f"cu_seqlens, run{self._kernel(node)})")
        if not has_heads:
            self.fwd.append(f"{out} = {out}.squeeze(2){self.comment(node)}")

    def op_attention(self, node):
        q, k, v = node.inputs[:3]
        slot = self.state_slot(node)
        theta = repr(float(self.const(node.inputs[5]))) if node.attr("rope") else "None"
        out = self.var(node)
        self.fwd.append(
            f"{out}, new_state[{slot!r}] = rt.attention({self.ref(q)}, {self.ref(k)}, {self.ref(v)}, "
            f"state.get({slot!r}), window={node.attr('window')!r}, scale={node.attr('scale')!r}, "
            f"softcap={node.attr('softcap')!r}, rope_theta={theta}, "
            f"rope_dims={node.attr('rope_dims')!r}, cu_seqlens=cu_seqlens, "
            f"run=run{self._kernel(node)}){self.comment(node)}")


def _spec_ref(span, entry: str) -> str:
    from seqdsl.ir.printer import _relative
    return source_text(f"{_relative(span.path, entry)}:{span.line}")


def source_text(text: str) -> str:
    """Text from outside (a file name, an override) made safe inside a generated comment or
    docstring: characters that are not printable, quotes and backslashes are written as escapes,
    so no name can end a line, a comment or a string of the generated source."""
    return "".join(c if c.isprintable() and c not in '"\\' else
                   '\\"' if c == '"' else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def regenerate_command(spec, extra: str = "") -> str:
    """The ``seqdsl compile`` command line that rebuilds a module, overrides included."""
    import shlex

    from seqdsl.ir.values import show

    def cli_value(v) -> str:        # what --set parses back (a bare word is a string)
        return v if isinstance(v, str) and v.isidentifier() else show(v)

    words = ["seqdsl", "compile", Path(spec.path).name, *extra.split()]
    for key, value in sorted(spec.overrides.items()):
        words += ["--set", f"{key}={cli_value(value)}"]
    return source_text(shlex.join(words))


class ClassRegistry:
    """Every generated class, in definition order, once: a mixer called identically from several
    blocks (same generated code) is one class; different specialisations get numbered names."""

    def __init__(self, program: Program, kernel_sites=None):
        self.program = program
        #: (graph, core node) -> the generated kernel site's name, or None (torch ops only)
        self.kernel_sites = kernel_sites
        self.views: list[ModuleView] = []
        self._by_body: dict[tuple, str] = {}
        self._names = Namespace({"Block"})

    def add(self, view: ModuleView) -> str:
        body = (tuple(view.init_lines), tuple(view.forward_lines), view.forward_args,
                tuple((p.target, p.rule) for p in view.inits), view.doc)
        if body in self._by_body:
            return self._by_body[body]
        view.class_name = self._names.name(view.class_name)
        self._by_body[body] = view.class_name
        self.views.append(view)
        return view.class_name


def _block_view(registry: ClassRegistry, name: str, graph: Graph, doc: str, spec_ref: str,
                class_name: str | None = None) -> str:
    em = _GraphEmitter(graph)
    em.registry = registry
    em.class_prefix = camel(name) + "Expert"
    x_id = graph.inputs[0][1]
    em.vars[x_id] = "x"
    em.tv[x_id] = True
    em.split_submodules()
    em.run()
    view = ModuleView(class_name or camel(name), doc, spec_ref, em.init, em.fwd, em.inits,
                      em.states, forward_args="x")
    return registry.add(view)


def _shared_view(registry: ClassRegistry) -> str | None:
    program = registry.program
    if program.shared is None:
        return None
    g = program.shared
    em = _GraphEmitter(g)
    em.registry = registry
    em.run()
    outputs = ", ".join(f"{n!r}: {em.ref(nid)}" for n, nid in program.shared_outputs.items())
    em.fwd.append(f"return {{{outputs}}}")
    return registry.add(ModuleView("SharedValues", "Cross-layer values, computed once per forward.",
                                   "", em.init, em.fwd, em.inits, [], stateful=False))


def build_view(program: Program, kernel_sites=None) -> dict:
    """The template's view of the program. ``kernel_sites(graph, node)`` names the generated
    kernel site of a core call (a kernel backend passes it); the module then imports ``kernels``."""
    spec = program.spec
    model = spec.model
    registry = ClassRegistry(program, kernel_sites)
    shared = _shared_view(registry)
    class_of: dict[str, str] = {}
    for name, inst in program.blocks.items():
        args = source_text(", ".join(f"{k}={v!r}" for k, v in inst.args))
        doc = f"Block `{inst.block}`" + (f" with {args}" if args else "") + "."
        class_of[name] = _block_view(registry, name, inst.graph, doc,
                                     _spec_ref(inst.span, spec.path))
    norm = None
    if program.final_norm is not None:
        norm = _block_view(registry, "final_norm", program.final_norm,
                           f"The norm before the head ({program.settings.final_norm}).",
                           _spec_ref(model.name_span, spec.path), class_name="FinalNorm")
    layers = [(l.index, class_of[l.instance], l.shared_group) for l in program.layers]
    s = program.settings
    config = [(k, type(v).__name__, _literal(v)) for k, v in spec.config.items()]
    return {
        "version": __version__,
        "spec_path": _spec_ref(model.name_span, spec.path).rsplit(":", 1)[0],
        "regenerate": regenerate_command(spec),
        "model_name": model.name,
        "model_ref": _spec_ref(model.name_span, spec.path),
        "config": config,
        "def_overrides": {k: dict(v) for k, v in spec.def_overrides.items()},
        "shared": shared,
        "modules": registry.views,
        "final_norm": norm,
        "layers": layers,
        "vocab": spec.config["vocab"],
        "d": spec.config["d"],
        "tie": s.tie_embeddings,
        "embed_scale": repr(s.embed_scale),
        "softcap": repr(s.logit_softcap),
        "embed_init": s.embed_init or InitRule("normal", (("std", 0.02),)),
        "kernels": kernel_sites is not None,
    }


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True)


def generate_source(program: Program, kernel_sites=None) -> str:
    """The generated module's source; parsed with ``ast`` before it is returned."""
    source = _env().get_template("model.py.j2").render(**build_view(program, kernel_sites))
    ast.parse(source)
    return source


__all__ = ["generate_source", "Namespace", "build_view"]
