"""Model facts computed from the IR: parameters, decoding memory and FLOPs per token.

Read by ``seqdsl info``; the backends' tests check that the generated model has exactly
:func:`param_count` parameters and carries states of exactly :func:`layer_memory` size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from seqdsl.ir.graph import Graph, Program
from seqdsl.ir.ops import (BINARY_ARITH, ELEMENTWISE_UNARY, NORMS, PARAMETRIC, Op)
from seqdsl.ir.types import TensorType

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _t(g: Graph, nid: int) -> TensorType:
    return g.node(nid).type


def _const(g: Graph, nid: int):
    return g.node(nid).attr("value")


def _expert_factors(g: Graph) -> dict[tuple[str, ...], tuple[int, int]]:
    """Expert region scope -> (number of experts, experts active per token)."""
    out = {}
    for n in g.nodes():
        if n.op is Op.EXPERTS:
            experts = _t(g, n.inputs[1]).shape[0].size
            w = g.node(n.inputs[1])
            active = _const(g, w.inputs[1]) if w.op is Op.ROUTE else experts
            out[n.attr("region")] = (experts, active)
    return out


def _factor(node, regions, which: int) -> int:
    f = 1
    for region, counts in regions.items():
        if node.scope[:len(region)] == region:
            f *= counts[which]
    return f


def node_params(g: Graph, node) -> int:
    op = node.op
    if op not in PARAMETRIC:
        return 0
    out = node.type
    if op is Op.PROJ:
        fan_in = _t(g, node.inputs[0]).numel
        groups = _const(g, node.inputs[5])
        size = out.numel
        return fan_in * size // groups + (size if _const(g, node.inputs[2]) else 0)
    if op is Op.CONV1D:
        n = out.numel
        return n * _const(g, node.inputs[1]) + (n if _const(g, node.inputs[2]) else 0)
    if op is Op.RMSNORM:
        return out.shape[-1].size if _const(g, node.inputs[2]) else 0
    if op is Op.LAYERNORM:
        last = out.shape[-1].size
        return last * (int(bool(_const(g, node.inputs[2]))) + int(bool(_const(g, node.inputs[3]))))
    if op is Op.GROUPNORM:
        return out.numel if _const(g, node.inputs[2]) else 0
    if op is Op.PARAM:
        return out.numel
    return 0  # pragma: no cover


def graph_params(g: Graph) -> int:
    regions = _expert_factors(g)
    return sum(node_params(g, n) * _factor(n, regions, 0) for n in g.nodes())


def node_flops(g: Graph, node, context: int) -> int:
    op = node.op
    out = node.type
    if not isinstance(out, TensorType):
        return 0
    n = out.numel
    if op is Op.PROJ:
        return 2 * _t(g, node.inputs[0]).numel * n // _const(g, node.inputs[5])
    if op is Op.CONV1D:
        return 2 * n * _const(g, node.inputs[1])
    if op in BINARY_ARITH or op in ELEMENTWISE_UNARY or op in (Op.LERP, Op.EXPI, Op.COMPLEX):
        return n
    if op in NORMS:
        return 4 * n
    if op in (Op.SOFTMAX,):
        return 3 * n
    if op in (Op.CUMSUM, Op.SUM, Op.ROUTE):
        return _t(g, node.inputs[0]).numel
    if op is Op.SCAN:
        return 2 * n
    if op is Op.LINEAR:
        hkv = node.attr("heads") * node.attr("key_dim") * node.attr("value_dim")
        k_mult = 2 if node.attr("decay_kind") == "complex_key" else 1
        decay = 0 if node.attr("decay_kind") == "none" else 1
        return (4 + decay) * hkv * k_mult
    if op is Op.DELTA:
        hkv = node.attr("heads") * node.attr("key_dim") * node.attr("value_dim")
        return node.attr("steps") * 5 * hkv + 2 * hkv
    if op is Op.ATTENTION:
        span = min(context, node.attr("window") or context)
        h = node.attr("heads")
        return h * span * (2 * node.attr("key_dim") + 2 * node.attr("value_dim") + 3)
    return 0


def graph_flops(g: Graph, context: int) -> int:
    regions = _expert_factors(g)
    return sum(node_flops(g, n, context) * _factor(n, regions, 1) for n in g.nodes())


@dataclass(frozen=True)
class LayerInfo:
    index: int
    block: str
    params: int          # 0 for a layer that reuses a shared block's weights already counted
    state_bytes: int     # bounded per-sequence memory: recurrent states, conv tails, KV windows
    kv_bytes_per_token: int  # memory that grows with the context (unbounded KV caches)
    flops: int


@dataclass(frozen=True)
class ModelInfo:
    layers: tuple[LayerInfo, ...]
    embedding_params: int
    head_params: int
    final_norm_params: int
    shared_params: int
    context: int
    activation_dtype: str

    @property
    def total_params(self) -> int:
        return (sum(l.params for l in self.layers) + self.embedding_params + self.head_params
                + self.final_norm_params + self.shared_params)

    @property
    def state_bytes(self) -> int:
        return sum(l.state_bytes for l in self.layers)

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(l.kv_bytes_per_token for l in self.layers)

    @property
    def flops_per_token(self) -> int:
        return sum(l.flops for l in self.layers) + self.head_flops

    @property
    def head_flops(self) -> int:
        return 2 * self.embedding_params  # the head multiplies by a [vocab, d] matrix, tied or not


def model_info(program: Program, context: int = 2048, activation_dtype: str = "bfloat16") -> ModelInfo:
    act = DTYPE_BYTES[activation_dtype]
    cfg = program.config
    vocab, d = cfg["vocab"], cfg["d"]
    layers = []
    counted_groups: set[str] = set()
    for layer in program.layers:
        inst = program.blocks[layer.instance]
        params = graph_params(inst.graph)
        if layer.shared_group is not None:
            if layer.shared_group in counted_groups:
                params = 0
            counted_groups.add(layer.shared_group)
        bounded = sum(s.bytes(act) for s in inst.states if s.bounded)
        growing = sum(s.bytes(act) for s in inst.states if not s.bounded)
        layers.append(LayerInfo(layer.index, layer.instance, params, bounded, growing,
                                graph_flops(inst.graph, context)))
    s = program.settings
    norm_params = graph_params(program.final_norm) if program.final_norm is not None else 0
    shared = 0
    if program.shared is not None:
        shared = sum(node_params(program.shared, n) for n in program.shared.nodes())
    return ModelInfo(tuple(layers), vocab * d, 0 if s.tie_embeddings else vocab * d, norm_params,
                     shared, context, activation_dtype)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def human_bytes(n: int) -> str:
    if n == 0:
        return "0 B"
    k = int(math.log(n, 1024)) if n > 0 else 0
    k = min(k, 4)
    return f"{n / 1024 ** k:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][k]}" if k else f"{n} B"
