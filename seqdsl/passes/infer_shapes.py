"""Pass 5 — shape, dtype and range inference, with the checks that need them.

Every node gets a type: a per-token :class:`TensorType` (symbolic dims, real/complex, a value
range), a constant, or a tuple (``split``). Checks made here: broadcasting, projection and split
sizes, head reshapes, the argument shapes of the four cores (and which decay form they take),
beta ranges for the delta rule (the transition's eigenvalue range follows from them), init rules,
channel mixers that would mix time, and that every block keeps the residual stream's shape.
"""

from __future__ import annotations

import dataclasses
import math

from seqdsl.diagnostics import Collector, SpecError, error
from seqdsl.ir.builtins import BUILTINS, InitRule
from seqdsl.ir.graph import BlockInstance, Graph, Program
from seqdsl.ir.ops import (BINARY_ARITH, COMPARE, CONST_ONLY, ELEMENTWISE_UNARY, LOGIC,
                           TIME_MIXING, Op)
from seqdsl.ir.types import (UNBOUNDED, ConstType, Dim, Interval, TensorType, TupleType, broadcast,
                             dim_div, dim_mul, dim_sum, shape_str)
from seqdsl.ir.values import BINOP_OF_TOKEN, is_number, show, type_name

INF = math.inf


# ---- interval arithmetic ---------------------------------------------------------------------

def _mono(f, r: Interval) -> Interval:
    def safe(x):
        try:
            return f(x)
        except (OverflowError, ValueError):
            return INF if x > 0 else -INF
    return Interval(safe(r.lo), safe(r.hi))


def _exp(x):
    return 0.0 if x == -INF else (INF if x == INF or x > 700 else math.exp(x))


def _softplus(x):
    if x == -INF:
        return 0.0
    if x == INF or x > 700:
        return INF
    return math.log1p(math.exp(x)) if x < 30 else x


def _sigmoid(x):
    if x == -INF:
        return 0.0
    if x == INF:
        return 1.0
    return 1 / (1 + math.exp(-x)) if x > -700 else 0.0


def _mul_iv(a: Interval, b: Interval) -> Interval:
    prods = []
    for x in (a.lo, a.hi):
        for y in (b.lo, b.hi):
            prods.append(0.0 if (x == 0 or y == 0) else x * y)
    return Interval(min(prods), max(prods))


def unary_range(op: Op, r: Interval) -> Interval:
    if op is Op.NEG:
        return Interval(-r.hi, -r.lo)
    if op is Op.SIGMOID:
        return _mono(_sigmoid, r)
    if op is Op.EXP:
        return _mono(_exp, r)
    if op is Op.SOFTPLUS:
        return _mono(_softplus, r)
    if op is Op.TANH:
        return _mono(math.tanh, r)
    if op is Op.LOGSIGMOID:
        return _mono(lambda x: -_softplus(-x), r)
    if op is Op.RELU:
        return Interval(max(r.lo, 0.0), max(r.hi, 0.0))
    if op is Op.LOG:
        return Interval(math.log(r.lo) if r.lo > 0 else -INF,
                        (math.log(r.hi) if r.hi != INF else INF) if r.hi > 0 else -INF)
    if op is Op.SQRT:
        return Interval(math.sqrt(max(r.lo, 0.0)), math.sqrt(max(r.hi, 0.0)) if r.hi != INF else INF)
    if op is Op.ABS:
        lo = 0.0 if r.lo <= 0 <= r.hi else min(abs(r.lo), abs(r.hi))
        return Interval(lo, max(abs(r.lo), abs(r.hi)))
    if op is Op.SILU:
        return Interval(-0.2785 if r.lo < -1.28 else r.lo * _sigmoid(r.lo), r.hi if r.hi > 0 else 0.0)
    if op is Op.GELU:
        return Interval(-0.17 if r.lo < 0 else 0.0, r.hi if r.hi > 0 else 0.0)
    return UNBOUNDED


def _binary_range(op: Op, a: Interval, b: Interval) -> Interval:
    if op is Op.ADD:
        return Interval(a.lo + b.lo, a.hi + b.hi)
    if op is Op.SUB:
        return Interval(a.lo - b.hi, a.hi - b.lo)
    if op is Op.MUL:
        return _mul_iv(a, b)
    if op is Op.DIV:
        if b.lo > 0 or b.hi < 0:
            inv = Interval(1 / b.hi if b.hi not in (0, INF, -INF) else (0.0 if b.hi != 0 else -INF),
                           1 / b.lo if b.lo not in (0, INF, -INF) else (0.0 if b.lo != 0 else INF))
            inv = Interval(min(inv.lo, inv.hi), max(inv.lo, inv.hi))
            return _mul_iv(a, inv)
        return UNBOUNDED
    if op is Op.POW and a.lo > 0 and b.lo != -INF and b.hi != INF and a.hi != INF:
        vals = [x ** y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        return Interval(min(vals), max(vals))
    return UNBOUNDED


def _const_range(v) -> Interval:
    return Interval(float(v), float(v))


# ---- the pass --------------------------------------------------------------------------------

class _Infer:
    def __init__(self, program: Program, graph: Graph, shared_types: dict[str, TensorType],
                 instance: BlockInstance | None, is_shared: bool = False):
        self.program = program
        self.g = graph
        self.shared_types = shared_types
        self.instance = instance
        self.d = program.config.get("d")
        self.types: dict[int, object] = {}
        self.shared_graph = is_shared

    # -- accessors with good errors
    def tensor(self, nid: int, what: str) -> TensorType:
        t = self.types[nid]
        if isinstance(t, TensorType):
            return t
        node = self.g.node(nid)
        if isinstance(t, TupleType):
            raise error(node.span, f"{what} is a tuple of {len(t.items)} values",
                        "unpack it first: a, b = split(...)")
        if isinstance(t, ConstType) and is_number(t.value):
            return TensorType((), "real", _const_range(t.value))
        raise error(node.span, f"{what} must be a tensor, got {type_name(t.value) if isinstance(t, ConstType) else t}")

    def const(self, nid: int, what: str, kinds=None, at=None):
        """The compile-time value of node ``nid``, or an error (at its span, or at ``at``)."""
        t = self.types[nid]
        node = self.g.node(nid)
        span = node.span if at is None else at
        if not isinstance(t, ConstType):
            hint = None
            if node.op is Op.LAYER_INDEX or isinstance(t, TensorType) and t.shape == () and \
                    self._depends_on_layer(nid):
                hint = "the layer index is only known at run time; use a pattern comprehension " \
                       "with block hyper-parameters to vary structure by layer"
            raise error(span, f"{what} must be a compile-time constant, got a tensor "
                        f"{t}", hint)
        v = t.value
        if kinds is not None and not any(k(v) for k in kinds):
            names = {_is_int: "an int", _is_num: "a number", _is_bool: "a bool",
                     _is_rule: "an init rule", _is_none: "none", _is_str: "a string",
                     _is_list: "a list"}
            expected = " or ".join(names[k] for k in kinds)
            raise error(node.span, f"{what} must be {expected}, got {type_name(v)} {show(v)}")
        return v

    def _depends_on_layer(self, nid: int) -> bool:
        stack, seen = [nid], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            node = self.g.node(n)
            if node.op is Op.LAYER_INDEX:
                return True
            stack.extend(node.inputs)
        return False

    def dim_of_const(self, nid: int, what: str) -> Dim:
        v = self.const(nid, what, (_is_int,))
        if v <= 0:
            raise error(self.g.node(nid).span, f"{what} must be positive, got {v}")
        node = self.g.node(nid)
        return Dim.of(v, node.attr("sym"))

    # -- driver
    def run(self) -> Graph:
        g = self.g
        for node in list(g.nodes()):
            try:
                t = self.infer(node)
            except SpecError as err:
                raise self._with_call_site(err, node) from None
            self.types[node.id] = t
            g.set(g.node(node.id).replace(type=t))
        return g

    def _with_call_site(self, err: SpecError, node) -> SpecError:
        """An error inside an imported definition (the standard library, another file) also
        names the call in the spec being compiled that led there."""
        entry = self.program.spec.path
        site = next((info for i in range(len(node.scope), 0, -1)
                     if (info := self.g.scopes.get(node.scope[:i])) and info[2].path == entry),
                    None)
        if site is None:
            return err
        where = f"in the call of '{site[0]}' at {site[2]}"
        return SpecError([d if d.span.path == entry else dataclasses.replace(
            d, hint=f"{d.hint}; {where}" if d.hint else where) for d in err.diagnostics])

    def infer(self, node):
        op = node.op
        ins = node.inputs
        if op is Op.INPUT:
            return TensorType((Dim.of(self.d, "d"),))
        if op is Op.CONST:
            return ConstType(node.attr("value"))
        if op is Op.LAYER_INDEX:
            n = len(self.program.layers)
            return TensorType((), "real", Interval(0.0, float(max(n - 1, 0))))
        if op is Op.SHARED:
            return self.shared_types[node.attr("name")]
        if op in (Op.LIST, Op.INIT) or op in CONST_ONLY:
            culprit = next((i for i in ins if not isinstance(self.types[i], ConstType)), None)
            logic = op in COMPARE | LOGIC
            what = {Op.LIST: "a list item", Op.INIT: "an init rule argument"}.get(
                op, f"an operand of '{_SYMBOL.get(op, op.value)}'" if logic
                else f"the argument of {op.value}()")
            # an operator's operand may come from elsewhere (a mixer's input: the caller's
            # argument): point at the operator's own expression
            self.const(culprit if culprit is not None else node.id, what,
                       at=node.span if logic else None)
            raise error(node.span, f"cannot evaluate {op.value}")  # pragma: no cover
        if op is Op.SELECT:
            self.const(ins[0], "a condition")
        if op in BINARY_ARITH:
            return self.arith(node)
        if op in ELEMENTWISE_UNARY:
            x = self.tensor(ins[0], f"the argument of {op.value}()")
            if x.dtype == "complex" and op not in (Op.NEG, Op.EXP, Op.ABS):
                raise error(node.span, f"{op.value}() is not defined for complex values",
                            "apply it to a real part: real(z), imag(z), or abs(z)")
            if op is Op.GELU:
                mode = self.const(ins[1], "gelu's approximate", (_is_str,))
                if mode not in ("none", "tanh"):
                    raise error(self.g.node(ins[1]).span,
                                f"gelu's approximate must be \"none\" or \"tanh\", got \"{mode}\"")
            if op is Op.ABS and x.dtype == "complex":
                return TensorType(x.shape, "real", Interval(0.0, INF))
            return TensorType(x.shape, x.dtype, unary_range(op, x.range)
                              if x.dtype == "real" else UNBOUNDED)
        handler = getattr(self, "op_" + op.name.lower(), None)
        if handler is None:  # pragma: no cover - every op has a rule
            raise error(node.span, f"internal: no shape rule for {op.value}")
        return handler(node)

    # -- rules
    def arith(self, node):
        a_id, b_id = node.inputs
        if node.op in (Op.FLOORDIV, Op.MOD):
            sym = "//" if node.op is Op.FLOORDIV else "%"
            for operand in (a_id, b_id):
                if not isinstance(self.types[operand], ConstType):
                    raise error(node.span, f"'{sym}' works on compile-time constants; an operand "
                                f"is a tensor {self.types[operand]}")
        a = self.tensor(a_id, "the left operand")
        b = self.tensor(b_id, "the right operand")
        shape = broadcast(a.shape, b.shape)
        if shape is None:
            sym = {Op.ADD: "add", Op.SUB: "subtract", Op.MUL: "multiply", Op.DIV: "divide",
                   Op.POW: "raise"}[node.op]
            raise error(node.span, f"cannot {sym} {shape_str(a.shape)} and {shape_str(b.shape)}: "
                        "the shapes do not broadcast",
                        "per-token shapes must match, or one side must be 1 or missing")
        dtype = "complex" if "complex" in (a.dtype, b.dtype) else "real"
        if dtype == "complex" and node.op is Op.POW:
            raise error(node.span, "'**' is not defined for complex values")
        rng = _binary_range(node.op, a.range, b.range) if dtype == "real" else UNBOUNDED
        return TensorType(shape, dtype, rng)

    def op_first(self, node):
        if self.shared_graph:
            raise error(node.span, "first() varies from token to token; a shared value is one "
                        "per model", "use first() inside a block, mixer or fn")
        return TensorType((), "real", Interval(0.0, 1.0))

    def op_select(self, node):  # only reached when the condition did not fold
        raise error(node.span, "the condition must be a compile-time constant")

    def op_lerp(self, node):
        a = self.tensor(node.inputs[0], "lerp's a")
        b = self.tensor(node.inputs[1], "lerp's b")
        w = self.tensor(node.inputs[2], "lerp's w")
        shape = broadcast(broadcast(a.shape, b.shape) or (), w.shape)
        if broadcast(a.shape, b.shape) is None or shape is None:
            raise error(node.span, f"lerp(): shapes {shape_str(a.shape)}, {shape_str(b.shape)} "
                        f"and {shape_str(w.shape)} do not broadcast")
        if "complex" in (a.dtype, b.dtype, w.dtype):
            return TensorType(shape, "complex")
        rng = UNBOUNDED
        if w.range.within(0, 1):
            rng = Interval(min(a.range.lo, b.range.lo), max(a.range.hi, b.range.hi))
        return TensorType(shape, "real", rng)

    def op_arange(self, node):
        n = self.dim_of_const(node.inputs[0], "arange's n")
        return TensorType((n,), "real", Interval(0.0, float(n.size - 1)))

    def op_expi(self, node):
        x = self.real(node.inputs[0], "expi's theta")
        return TensorType(x.shape, "complex")

    def op_complex(self, node):
        a = self.real(node.inputs[0], "the real part")
        b = self.real(node.inputs[1], "the imaginary part")
        shape = broadcast(a.shape, b.shape)
        if shape is None:
            raise error(node.span, f"complex(): {shape_str(a.shape)} and {shape_str(b.shape)} "
                        "do not broadcast")
        return TensorType(shape, "complex")

    def op_real(self, node):
        z = self.tensor(node.inputs[0], "the argument")
        return TensorType(z.shape, "real")

    op_imag = op_real

    def real(self, nid, what) -> TensorType:
        t = self.tensor(nid, what)
        if t.dtype != "real":
            raise error(self.g.node(nid).span, f"{what} must be real, got a complex value")
        return t

    def op_split(self, node):
        x = self.tensor(node.inputs[0], "split's input")
        if not x.shape:
            raise error(node.span, "cannot split a scalar")
        last = x.shape[-1]
        parts = self.const(node.inputs[1], "split's parts", (_is_int, _is_list))
        if isinstance(parts, int):
            if parts < 1 or last.size % parts:
                raise error(node.span, f"cannot split the last dim {last} into {parts} equal parts")
            piece = _strip_factor(last, Dim.of(parts)) or dim_div(last, Dim.of(parts))
            dims = [piece] * parts
        else:
            syms = self.g.node(node.inputs[1]).attr("syms") or tuple(str(p) for p in parts)
            if not all(_is_int(p) and p > 0 for p in parts):
                raise error(self.g.node(node.inputs[1]).span, "split sizes must be positive ints")
            if sum(parts) != last.size:
                raise error(node.span, f"split sizes [{', '.join(syms)}] add up to {sum(parts)}, "
                            f"but the last dim is {last}")
            dims = [Dim.of(p, s) for p, s in zip(parts, syms)]
        return TupleType(tuple(TensorType(x.shape[:-1] + (dm,), x.dtype, x.range) for dm in dims))

    def op_getitem(self, node):
        t = self.types[node.inputs[0]]
        count = node.attr("count")
        if not isinstance(t, TupleType):
            raise error(node.span, f"cannot unpack one value into {count} names",
                        "only split(...) produces several values")
        if len(t.items) != count:
            raise error(node.span, f"split produces {len(t.items)} values but {count} names are "
                        "assigned")
        return t.items[node.attr("index")]

    def op_concat(self, node):
        ts = [self.tensor(i, "a concat input") for i in node.inputs]
        if any(not t.shape for t in ts):
            raise error(node.span, "concat() needs tensors with a last dim")
        first = ts[0]
        for t in ts[1:]:
            if t.shape[:-1] != first.shape[:-1] and tuple(d.size for d in t.shape[:-1]) != \
                    tuple(d.size for d in first.shape[:-1]) or len(t.shape) != len(first.shape):
                raise error(node.span, f"concat: {shape_str(first.shape)} and {shape_str(t.shape)} "
                            "differ in more than the last dim")
        dtype = "complex" if any(t.dtype == "complex" for t in ts) else "real"
        return TensorType(first.shape[:-1] + (dim_sum([t.shape[-1] for t in ts]),), dtype)

    def op_heads(self, node):
        x = self.tensor(node.inputs[0], "heads' input")
        heads = self.dim_of_const(node.inputs[1], "the number of heads")
        steps_v = self.const(node.inputs[2], "steps", (_is_int, _is_none))
        if not x.shape:
            raise error(node.span, "heads() needs a tensor with a last dim")
        last = x.shape[-1]
        groups = [heads]
        if steps_v is not None:
            if steps_v < 1:
                raise error(self.g.node(node.inputs[2]).span, f"steps must be positive, got {steps_v}")
            steps = Dim.of(steps_v, self.g.node(node.inputs[2]).attr("sym"))
            groups = [steps, heads]
        total = math.prod(g.size for g in groups)
        if last.size % total:
            what = " * ".join(str(g) for g in groups)
            raise error(node.span, f"cannot reshape the last dim {last} into {what} heads: "
                        f"{last.size} is not divisible by {total}")
        inner = last
        for grp in groups:
            inner = _strip_factor(inner, grp) or dim_div(inner, grp)
        return TensorType(x.shape[:-1] + tuple(groups) + (inner,), x.dtype, x.range)

    def op_flatten(self, node):
        x = self.tensor(node.inputs[0], "flatten's input")
        d = Dim.of(1)
        for dm in x.shape:
            d = dim_mul(d, dm)
        return TensorType((d,), x.dtype, x.range)

    def op_index(self, node):
        x = self.tensor(node.inputs[0], "the indexed value")
        if not x.shape:
            raise error(node.span, "cannot index a scalar")
        it = self.types[node.inputs[1]]
        rows = x.shape[0]
        if isinstance(it, ConstType):
            i = it.value
            if not _is_int(i):
                raise error(self.g.node(node.inputs[1]).span, f"an index must be an int, got {type_name(i)}")
            if not -rows.size <= i < rows.size:
                raise error(self.g.node(node.inputs[1]).span,
                            f"index {i} is out of range for the first dim {rows}")
        else:
            idx = self.tensor(node.inputs[1], "the index")
            if idx.shape != ():
                raise error(self.g.node(node.inputs[1]).span, "an index must be a single integer")
            if self._depends_on_layer(node.inputs[1]) and idx.range.lo < 0:
                raise error(node.span, f"the index can be negative (its range is {idx.range}): "
                            "a negative layer index would read from the end")
            if self._depends_on_layer(node.inputs[1]) and idx.range.hi >= rows.size:
                raise error(node.span, f"indexing a value with {rows.size} rows by the layer "
                            f"index, but the model has {int(idx.range.hi) + 1} layers",
                            "size the first dim by the number of layers")
        return TensorType(x.shape[1:], x.dtype, x.range)

    def _dim_arg(self, node, pos, x: TensorType) -> int:
        dim = self.const(node.inputs[pos], "dim", (_is_int,))
        if not -len(x.shape) <= dim < len(x.shape):
            raise error(self.g.node(node.inputs[pos]).span,
                        f"dim {dim} is out of range for {shape_str(x.shape)}")
        return dim % len(x.shape)

    def op_softmax(self, node):
        x = self.real(node.inputs[0], "softmax's input")
        self._dim_arg(node, 1, x)
        return TensorType(x.shape, "real", Interval(0.0, 1.0))

    def op_cumsum(self, node):
        x = self.real(node.inputs[0], "cumsum's input")
        dim = self._dim_arg(node, 1, x)
        src = self.g.node(node.inputs[0])
        if src.op is Op.SOFTMAX and self._dim_arg(src, 1, x) == dim:
            return TensorType(x.shape, "real", Interval(0.0, 1.0))  # partial sums of a softmax
        n = x.shape[dim].size
        return TensorType(x.shape, "real", Interval(min(x.range.lo * n, x.range.lo),
                                                    max(x.range.hi * n, x.range.hi)))

    def op_sum(self, node):
        x = self.tensor(node.inputs[0], "sum's input")
        dim = self._dim_arg(node, 1, x)
        return TensorType(x.shape[:dim] + x.shape[dim + 1:], x.dtype)

    def _norm(self, node):
        x = self.real(node.inputs[0], f"{node.op.value}'s input")
        if not x.shape:
            raise error(node.span, f"{node.op.value}() needs a tensor with a last dim")
        eps = self.const(node.inputs[1], "eps", (_is_num,))
        if eps < 0:
            raise error(self.g.node(node.inputs[1]).span, f"eps must be >= 0, got {eps}")
        for pos in range(2, len(node.inputs)):
            name = BUILTINS[node.op.value].args[pos].name
            self.const(node.inputs[pos], name, (_is_num,) if name == "offset" else (_is_bool,))
        if node.op is Op.RMSNORM and self.const(node.inputs[3], "offset", (_is_num,)) != 0 \
                and not self.const(node.inputs[2], "weight", (_is_bool,)):
            raise error(self.g.node(node.inputs[3]).span, "rmsnorm's offset needs weight = true",
                        "the offset is added to the learnable weight; without one, drop it")
        rng = Interval(-1.0, 1.0) if node.op is Op.L2NORM else UNBOUNDED
        return TensorType(x.shape, "real", rng)

    op_rmsnorm = op_layernorm = op_groupnorm = op_l2norm = _norm

    def op_proj(self, node):
        x = self.real(node.inputs[0], "proj's input")
        self._not_const(node, "proj")
        size = self.dim_of_const(node.inputs[1], "proj's size")
        bias = self.const(node.inputs[2], "bias", (_is_bool,))
        init = self.const(node.inputs[3], "init", (_is_rule, _is_none))
        bias_init = self.const(node.inputs[4], "bias_init", (_is_rule, _is_none))
        groups = self.const(node.inputs[5], "groups", (_is_int,))
        if bias_init is not None and not bias:
            raise error(self.g.node(node.inputs[4]).span, "bias_init is given but bias = false",
                        "add bias = true")
        for pos, rule in ((3, init), (4, bias_init)):
            if rule is not None:
                _check_init(rule, (), self.g.node(node.inputs[pos]).span)
        fan_in = x.numel
        if groups < 1 or fan_in % groups or size.size % groups:
            raise error(self.g.node(node.inputs[5]).span, f"groups = {groups} must divide both the "
                        f"input size {fan_in} and the output size {size.size}")
        return TensorType((size,), "real")

    def op_conv1d(self, node):
        x = self.real(node.inputs[0], "conv1d's input")
        self._not_const(node, "conv1d")
        width = self.const(node.inputs[1], "conv1d's width", (_is_int,))
        if width < 1:
            raise error(self.g.node(node.inputs[1]).span, f"conv1d's width must be >= 1, got {width}")
        self.const(node.inputs[2], "bias", (_is_bool,))
        init = self.const(node.inputs[3], "init", (_is_rule, _is_none))
        if init is not None:
            _check_init(init, (), self.g.node(node.inputs[3]).span)
        return TensorType(x.shape, "real")

    def _not_const(self, node, what: str) -> None:
        """A layer's weights are sized by its input, which must be a tensor, not a constant."""
        t = self.types[node.inputs[0]]
        if isinstance(t, ConstType):
            raise error(self.g.node(node.inputs[0]).span,
                        f"{what}'s input must be a tensor, got the constant {t.value!r}")

    def op_param(self, node):
        shape_v = self.const(node.inputs[0], "param's shape", (_is_int, _is_list))
        init = self.const(node.inputs[1], "param's init", (_is_rule,))
        src = self.g.node(node.inputs[0])
        if isinstance(shape_v, int):
            shape_v, syms = (shape_v,), (src.attr("sym") or str(shape_v),)
        else:
            syms = src.attr("syms") or tuple(str(s) for s in shape_v)
        if not shape_v or not all(_is_int(s) and s > 0 for s in shape_v):
            raise error(src.span, f"param's shape must be a non-empty list of positive ints, got {list(shape_v)}")
        _check_init(init, shape_v, self.g.node(node.inputs[1]).span)
        return TensorType(tuple(Dim.of(s, y) for s, y in zip(shape_v, syms)), "real")

    def op_route(self, node):
        logits = self.real(node.inputs[0], "route's logits")
        if len(logits.shape) != 1:
            raise error(node.span, f"route() needs logits of shape [experts], got {shape_str(logits.shape)}")
        k = self.const(node.inputs[1], "top_k", (_is_int,))
        self.const(node.inputs[2], "normalize", (_is_bool,))
        if not 1 <= k <= logits.shape[0].size:
            raise error(self.g.node(node.inputs[1]).span,
                        f"top_k must be between 1 and the number of experts ({logits.shape[0]}), got {k}")
        return TensorType(logits.shape, "real", Interval(0.0, 1.0))

    def op_experts(self, node):
        out = self.tensor(node.inputs[0], "the expert's output")
        w = self.tensor(node.inputs[1], "the routing weights")
        if len(w.shape) != 1:
            raise error(node.span, f"expert weights must have shape [experts], got {shape_str(w.shape)}")
        return out

    # -- cores
    def _heads_of(self, t: TensorType, what: str, node, rank: int) -> tuple[Dim | None, ...]:
        if len(t.shape) not in (rank - 1, rank):
            raise error(node.span, f"{what} must have shape [heads, dim] or [dim], got {shape_str(t.shape)}")
        return t.shape if len(t.shape) == rank else (None,) + t.shape

    def op_scan(self, node):
        a = self.tensor(node.inputs[0], "scan's a")
        b = self.tensor(node.inputs[1], "scan's b")
        self._state_dtype(node, 2)
        shape = broadcast(a.shape, b.shape)
        if shape is None or tuple(d.size for d in shape) != b.sizes:
            raise error(node.span, f"scan: a {shape_str(a.shape)} must broadcast to the state "
                        f"shape of b {shape_str(b.shape)}")
        dtype = "complex" if "complex" in (a.dtype, b.dtype) else "real"
        self._annotate(node, state_shape=b.shape, complex=dtype == "complex", a_range=str(a.range))
        return TensorType(b.shape, dtype)

    def _state_dtype(self, node, pos):
        v = self.const(node.inputs[pos], "state_dtype", (_is_str,))
        if v not in ("float32", "float64"):
            raise error(self.g.node(node.inputs[pos]).span,
                        f"state_dtype must be \"float32\" or \"float64\", got \"{v}\"")
        return v

    def _qkv(self, node, core: str, steps: int | None = None):
        """q/k/v shapes of linear (steps None) and delta (k, v may lead with [steps]).

        q and k are [key_heads, K] or [K]; v is [heads, V] or [V]. The state has ``heads`` (the
        value heads): when q/k have fewer heads (or none), each of their heads serves
        heads / key_heads value heads (grouped B/C in Mamba-2, GVA in Gated DeltaNet).
        Returns q, k, v, H, K, V, has_heads, key_heads.
        """
        q = self.real(node.inputs[0], f"{core}'s q")
        k = self.real(node.inputs[1], f"{core}'s k")
        v = self.real(node.inputs[2], f"{core}'s v")
        if len(q.shape) not in (1, 2):
            raise error(self.g.node(node.inputs[0]).span,
                        f"{core}'s q must have shape [heads, key_dim] or [key_dim], got {shape_str(q.shape)}")
        K = q.shape[-1]
        # with steps sub-steps per token, k and v carry a leading [steps] dim (optional for 1)
        lead = (steps,) if steps is not None and (steps > 1 or len(k.shape) == len(q.shape) + 1) \
            else ()
        want_k = lead + q.sizes
        if k.sizes != want_k:
            exp = ("[steps, " if lead else "[") + ", ".join(str(d) for d in q.shape) + "]"
            raise error(self.g.node(node.inputs[1]).span, f"{core}'s k must have shape {exp}"
                        f"{' (steps = ' + str(steps) + ')' if lead else ''}, got {shape_str(k.shape)}")
        v_rank = len(v.shape) - len(lead)
        if v_rank not in (1, 2) or v.sizes[:len(lead)] != lead:
            exp = ("[steps, " if lead else "[") + "heads, value_dim] or " + \
                ("[steps, " if lead else "[") + "value_dim]"
            raise error(self.g.node(node.inputs[2]).span,
                        f"{core}'s v must have shape {exp}, got {shape_str(v.shape)}")
        key_heads = q.shape[0] if len(q.shape) == 2 else None
        H = v.shape[len(lead)] if v_rank == 2 else None
        if key_heads is not None and H is None:
            raise error(self.g.node(node.inputs[2]).span,
                        f"{core}'s v needs a head dim: q and k have {key_heads} heads")
        if key_heads is not None and H.size % key_heads.size:
            raise error(self.g.node(node.inputs[2]).span,
                        f"{core}'s v has {H} heads, not a multiple of the {key_heads} heads of q and k")
        has_heads = H is not None
        H = H or Dim.of(1)
        V = v.shape[-1]
        return q, k, v, H, K, V, has_heads, (key_heads.size if key_heads is not None else 1)

    def _decay(self, node, core, H, K, V, has_heads: bool, pos_decay, pos_log, allow=("scalar", "key", "key_value")):
        decay_t = self.types[node.inputs[pos_decay]]
        log_t = self.types[node.inputs[pos_log]]
        given = [p for p, t in ((pos_decay, decay_t), (pos_log, log_t))
                 if not (isinstance(t, ConstType) and t.value is None)]
        if len(given) > 1:
            raise error(node.span, f"{core}: give decay or log_decay, not both")
        if not given:
            return "none", None
        pos = given[0]
        d = self.tensor(node.inputs[pos], "the decay")
        head = (H.size,) if has_heads else ()
        forms = {"scalar": head, "key": head + (K.size,), "key_value": head + (K.size, V.size)}
        kind = next((f for f, shp in forms.items() if d.sizes == shp and f in allow), None)
        if kind is None and not has_heads and d.sizes == (1,) and "scalar" in allow:
            kind = "scalar"
        if kind is None:
            hs = "heads, " if has_heads else ""
            options = {"scalar": f"[{hs.rstrip(', ')}]" if has_heads else "[]",
                       "key": f"[{hs}key_dim]", "key_value": f"[{hs}key_dim, value_dim]"}
            listed = ", ".join(f"{options[f]} ({f.replace('_', '-')})" for f in allow)
            raise error(self.g.node(node.inputs[pos]).span,
                        f"{core}'s decay has shape {shape_str(d.shape)}; expected one of {listed}",
                        f"here heads={H.size}, key_dim={K.size}, value_dim={V.size}")
        is_complex = d.dtype == "complex"
        if is_complex and (pos == pos_log or kind != "key"):
            raise error(self.g.node(node.inputs[pos]).span,
                        "a complex decay must be given as decay = magnitude * expi(phase), per key dim")
        if not is_complex:
            lo, hi = (0.0, 1.0) if pos == pos_decay else (-INF, 0.0)
            r = d.range
            if r.hi < lo or r.lo > hi:
                raise error(self.g.node(node.inputs[pos]).span,
                            f"{'decay' if pos == pos_decay else 'log_decay'} lies in {r}, outside "
                            f"{Interval(lo, hi)}: the state would {'grow' if r.lo > hi else 'flip sign'} every step")
        return ("complex_key" if is_complex else kind), d

    def op_linear(self, node):
        q, k, v, H, K, V, has_heads, key_heads = self._qkv(node, "linear")
        kind, d = self._decay(node, "linear", H, K, V, has_heads, 3, 4)
        scale = self.const(node.inputs[5], "scale", (_is_num, _is_none))
        self._state_dtype(node, 6)
        state = (H, K, V)
        self._annotate(node, decay_kind=kind, heads=H.size, key_heads=key_heads, key_dim=K.size,
                       value_dim=V.size, scale=K.size ** -0.5 if scale is None else float(scale),
                       state_shape=state, complex=kind == "complex_key")
        return TensorType(v.shape, "real")

    def op_delta(self, node):
        steps = self.const(node.inputs[6], "steps", (_is_int,))
        if steps < 1:
            raise error(self.g.node(node.inputs[6]).span, f"steps must be >= 1, got {steps}")
        q, k, v, H, K, V, has_heads, key_heads = self._qkv(node, "delta", steps)
        beta = self.real(node.inputs[3], "delta's beta")
        stepped = len(k.shape) == len(q.shape) + 1
        want = ((steps,) if stepped else ()) + ((H.size,) if has_heads else ())
        if beta.sizes != want and not (beta.sizes == (1,) and want == ()):
            exp = "[" + ", ".join((["steps"] if stepped else []) + (["heads"] if has_heads else [])) + "]"
            raise error(self.g.node(node.inputs[3]).span,
                        f"delta's beta must have shape {exp}, one per head"
                        f"{' and step' if stepped else ''}, got {shape_str(beta.shape)}")
        if not beta.range.within(0.0, 2.0):
            raise error(self.g.node(node.inputs[3]).span,
                        f"delta's beta must lie in [0, 2] (eigenvalues of I - beta k k^T in [-1, 1]); "
                        f"its inferred range is {beta.range}",
                        "use sigmoid(...) for beta in (0, 1), or 2 * sigmoid(...) to allow "
                        "negative eigenvalues")
        kind, _ = self._decay(node, "delta", H, K, V, has_heads, 4, 5, allow=("scalar",))
        scale = self.const(node.inputs[7], "scale", (_is_num, _is_none))
        self._state_dtype(node, 8)
        eig = Interval(1.0 - beta.range.hi, 1.0 - beta.range.lo)
        self._annotate(node, decay_kind=kind, heads=H.size, key_heads=key_heads, key_dim=K.size,
                       value_dim=V.size, steps=steps, eigenvalues=str(eig), scale=K.size ** -0.5 if scale is None
                       else float(scale), state_shape=(H, K, V), complex=False)
        return TensorType(v.shape[1:] if stepped else v.shape, "real")

    def op_attention(self, node):
        q = self.real(node.inputs[0], "attention's q")
        k = self.real(node.inputs[1], "attention's k")
        v = self.real(node.inputs[2], "attention's v")
        for t, nm, pos in ((q, "q", 0), (k, "k", 1), (v, "v", 2)):
            if len(t.shape) != 2:
                raise error(self.g.node(node.inputs[pos]).span,
                            f"attention's {nm} must have shape [heads, head_dim], got {shape_str(t.shape)}")
        H, K = q.shape
        Hkv = k.shape[0]
        if k.shape[1].size != K.size:
            raise error(self.g.node(node.inputs[1]).span,
                        f"attention's k head dim {k.shape[1]} differs from q's {K}")
        if v.shape[0].size != Hkv.size:
            raise error(self.g.node(node.inputs[2]).span,
                        f"attention's v has {v.shape[0]} heads but k has {Hkv}")
        if H.size % Hkv.size:
            raise error(node.span, f"query heads {H} must be a multiple of key/value heads {Hkv} (GQA)")
        window = self.const(node.inputs[3], "window", (_is_int, _is_none))
        if window is not None and window < 1:
            raise error(self.g.node(node.inputs[3]).span, f"window must be >= 1 or none, got {window}")
        rope = self.const(node.inputs[4], "rope", (_is_bool,))
        theta = self.const(node.inputs[5], "rope_theta", (_is_num,))
        if rope and K.size % 2:
            raise error(self.g.node(node.inputs[4]).span, f"rope needs an even head dim, got {K}")
        if theta <= 0:
            raise error(self.g.node(node.inputs[5]).span, f"rope_theta must be positive, got {theta}")
        scale = self.const(node.inputs[6], "scale", (_is_num, _is_none))
        softcap = self.const(node.inputs[7], "softcap", (_is_num, _is_none))
        rope_dims = self.const(node.inputs[8], "rope_dims", (_is_int, _is_none))
        if rope_dims is not None and (not rope or rope_dims < 2 or rope_dims % 2 or rope_dims > K.size):
            raise error(self.g.node(node.inputs[8]).span,
                        f"rope_dims must be an even number of dims between 2 and the head dim {K} "
                        f"with rope = true, got {rope_dims}")
        self._annotate(node, heads=H.size, kv_heads=Hkv.size, key_dim=K.size, value_dim=v.shape[1].size,
                       window=window, rope=rope, scale=K.size ** -0.5 if scale is None else float(scale),
                       softcap=softcap, rope_dims=rope_dims, complex=False)
        return TensorType((H, v.shape[1]), "real")

    def _annotate(self, node, **attrs):
        # attributes for later passes and backends, derived from the inferred shapes
        attrs = {k: (tuple(attrs[k]) if isinstance(attrs[k], list) else attrs[k]) for k in attrs}
        self.g.set(self.g.node(node.id).with_attrs(**attrs))

    def op_output(self, node):
        x = self.tensor(node.inputs[0], "the block's result")
        if self.instance is not None and x.sizes != (self.d,):
            src = self.g.node(node.inputs[0])
            raise error(src.span, f"block '{self.instance.block}' must keep the residual stream's "
                        f"shape [d={self.d}], found {x}")
        if self.instance is not None and x.dtype != "real":
            raise error(self.g.node(node.inputs[0]).span,
                        f"block '{self.instance.block}' makes the residual stream complex",
                        "take real(z), imag(z) or abs(z) of a complex value")
        return x


def _strip_factor(total: Dim, factor: Dim) -> Dim | None:
    """``heads * hd`` divided by ``heads`` reads ``hd``: drop a matching top-level factor."""
    if any(c in total.sym for c in "+-/()"):
        return None
    parts = [p.strip() for p in total.sym.split("*")]
    if factor.sym in parts and len(parts) > 1:
        parts.remove(factor.sym)
        return Dim(total.size // factor.size, " * ".join(parts))
    return None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return is_number(v)


def _is_bool(v):
    return isinstance(v, bool)


def _is_rule(v):
    return isinstance(v, InitRule)


#: how the language writes each comparison and logic operator (``Op.EQ.value`` is "eq")
_SYMBOL = {op: token for token, op in BINOP_OF_TOKEN.items()}
_SYMBOL[Op.NOT] = "not"


def _is_none(v):
    return v is None


def _is_str(v):
    return isinstance(v, str)


def _is_list(v):
    return isinstance(v, tuple)


def _check_init(init: InitRule, shape: tuple[int, ...], span) -> None:
    args = dict(init.args)
    if init.name in ("uniform", "log_uniform", "inv_softplus_log_uniform", "logit_pow_uniform",
                     "log_arange", "decay_range") and args["low"] > args["high"]:
        raise error(span, f"init rule {init!r}: low must not exceed high")
    if init.name in ("log_arange", "inv_softplus_log_uniform") and args["low"] <= 0:
        raise error(span, f"init rule {init!r} takes logarithms: low must be > 0")
    if init.name == "log_uniform" and args["low"] < 0:
        raise error(span, f"init rule {init!r} takes logarithms: low must be >= 0")
    if init.name == "logit_pow_uniform" and not (0 < args["low"] and args["high"] < 1):
        raise error(span, f"init rule {init!r}: the range must lie inside (0, 1)")
    for name, positive in (("std", False), ("gain", False), ("floor", False), ("power", True)):
        v = args.get(name)
        if v is not None and (v <= 0 if positive else v < 0):
            bound = "> 0" if positive else ">= 0"
            raise error(span, f"init rule {init!r}: {name} must be {bound}, got {v}")


def _check_channels(g: Graph) -> None:
    """Channel mixers act on each token alone: no core or convolution anywhere inside them."""
    for node in g.nodes():
        if node.op not in TIME_MIXING:
            continue
        for i in range(1, len(node.scope) + 1):
            info = g.scopes.get(node.scope[:i])
            if info and info[1] == "channel":
                raise error(node.span, f"{node.op.value}() mixes information across time, which a "
                            f"channel mixer ('{info[0]}') may not do",
                            f"declare '{info[0]}' as a mixer, or move the {node.op.value} out of it")


def infer_shapes(program: Program) -> Program:
    collector = Collector()
    shared_types: dict[str, TensorType] = {}
    shared = program.shared
    if shared is not None:
        with collector.guard():
            shared = _Infer(program, shared.copy(), {}, None, is_shared=True).run()
            for name, nid in program.shared_outputs.items():
                t = shared.node(nid).type
                if not isinstance(t, TensorType):
                    raise error(shared.node(nid).span, f"shared value '{name}' must be a tensor, got {t}")
                shared_types[name] = t
        collector.raise_if_any()
    blocks = {}
    for name, inst in program.blocks.items():
        with collector.guard():
            g = _Infer(program, inst.graph.copy(), shared_types, inst).run()
            _check_channels(g)
            blocks[name] = dataclasses.replace(inst, graph=g)
    final_norm = program.final_norm
    if final_norm is not None:
        with collector.guard():
            final_norm = _Infer(program, final_norm.copy(), shared_types, None).run()
            out = final_norm.node(final_norm.output).type
            if out.sizes != (program.config["d"],):
                raise error(final_norm.node(final_norm.output).span,
                            f"final_norm must keep the shape [d], found {out}")
    collector.raise_if_any()
    return program.replace(stage="infer_shapes", blocks=blocks, shared=shared,
                           final_norm=final_norm)


__all__ = ["infer_shapes", "SpecError"]
