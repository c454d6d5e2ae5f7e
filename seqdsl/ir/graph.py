"""The graph IR: frozen nodes in a networkx DiGraph, wrapped; and the Program passes transform.

A :class:`Graph` is the dataflow of one block instance (mixers, channels and fns inlined, each
node tagged with the ``scope`` of calls it came from, so backends can rebuild the module
hierarchy). A :class:`Program` is the whole model: configuration, shared cross-layer values, the
block instances and the explicit per-layer list. Passes never mutate a node or a program; they
return new ones (``Node.replace``, ``Graph.copy``, ``dataclasses.replace``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx

from seqdsl.diagnostics import Span
from seqdsl.ir.ops import Op
from seqdsl.ir.types import Type


@dataclass(frozen=True)
class Node:
    id: int
    op: Op
    inputs: tuple[int, ...]
    span: Span
    attrs: tuple[tuple[str, Any], ...] = ()
    scope: tuple[str, ...] = ()
    name: str | None = None     # readable label: the assigned variable or the parameter's name
    type: Type | None = None

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    def with_attrs(self, **updates: Any) -> "Node":
        merged = dict(self.attrs)
        merged.update(updates)
        return dataclasses.replace(self, attrs=tuple(sorted(merged.items())))

    def replace(self, **changes: Any) -> "Node":
        return dataclasses.replace(self, **changes)


class Graph:
    """Dataflow graph of frozen nodes. Edge ``a -> b`` with ``index=i``: a is b's i-th input."""

    def __init__(self) -> None:
        self._g = nx.DiGraph()
        self._next = 0
        self.inputs: list[tuple[str, int]] = []   # (name, node id) of INPUT nodes, in order
        self.output: int | None = None
        # call scope -> (definition name, its kind, the call's span, ((input name, node id), ...));
        # filled by the builder
        self.scopes: dict[tuple[str, ...], tuple] = {}

    # -- construction
    def add(self, op: Op, inputs: tuple[int, ...] | list[int], span: Span, *,
            attrs: dict[str, Any] | None = None, scope: tuple[str, ...] = (),
            name: str | None = None, type: Type | None = None) -> int:
        nid = self._next
        self._next += 1
        node = Node(nid, op, tuple(inputs), span, tuple(sorted((attrs or {}).items())), scope,
                    name, type)
        self._g.add_node(nid, node=node)
        for i, src in enumerate(node.inputs):
            self._g.add_edge(src, nid)
        return nid

    def set(self, node: Node) -> None:
        """Replace the node with the same id (inputs may change)."""
        old = self.node(node.id)
        if old.inputs != node.inputs:
            for src in set(old.inputs):
                if self._g.has_edge(src, node.id):
                    self._g.remove_edge(src, node.id)
            for src in node.inputs:
                self._g.add_edge(src, node.id)
        self._g.nodes[node.id]["node"] = node

    def remove(self, nid: int) -> None:
        self._g.remove_node(nid)

    def replace_uses(self, old: int, new: int) -> None:
        """Make every user of ``old`` read ``new`` instead."""
        for user in self.users(old):
            n = self.node(user)
            self.set(n.replace(inputs=tuple(new if i == old else i for i in n.inputs)))
        if self.output == old:
            self.output = new

    def copy(self) -> "Graph":
        g = Graph()
        g._g = self._g.copy()
        g._next = self._next
        g.inputs = list(self.inputs)
        g.output = self.output
        g.scopes = dict(self.scopes)
        return g

    # -- queries
    def node(self, nid: int) -> Node:
        return self._g.nodes[nid]["node"]

    def __contains__(self, nid: int) -> bool:
        return nid in self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def ids(self) -> list[int]:
        return sorted(self._g.nodes)

    def nodes(self) -> Iterator[Node]:
        """Nodes in a deterministic topological order (ties broken by id)."""
        for nid in nx.lexicographical_topological_sort(self._g):
            yield self.node(nid)

    def users(self, nid: int) -> list[int]:
        return sorted(self._g.successors(nid))

    def is_acyclic(self) -> bool:
        return nx.is_directed_acyclic_graph(self._g)

    def edges(self) -> list[tuple[int, int]]:
        return list(self._g.edges)

    def live(self) -> set[int]:
        """Nodes the output depends on."""
        if self.output is None:
            return set()
        return nx.ancestors(self._g, self.output) | {self.output}

    def prune(self) -> "Graph":
        """A copy without nodes the output does not depend on (inputs are kept)."""
        g = self.copy()
        keep = g.live() | {nid for _, nid in g.inputs}
        for nid in list(g._g.nodes):
            if nid not in keep:
                g._g.remove_node(nid)
        return g

    def time_varying(self) -> set[int]:
        """Nodes whose value changes from token to token: everything downstream of an INPUT.
        The rest (parameters, constants, shared tables, the layer index) is per-token constant."""
        out: set[int] = set()
        for node in self.nodes():
            if node.op.value in ("input", "first") or any(i in out for i in node.inputs):
                out.add(node.id)
        return out



@dataclass(frozen=True)
class State:
    """One piece of per-sequence memory a layer carries between calls (decoding)."""

    kind: str            # "recurrent" | "conv" | "kv"
    node: int            # the node that owns it (core or conv1d)
    scope: tuple[str, ...]
    name: str
    shape: tuple[Any, ...]   # Dims; for "kv" the first dim is the window (or None: unbounded)
    dtype: str           # "float32", "complex64", ... ; "activation" = the model's dtype
    elements: int        # number of scalars per sequence (kv: per cached token * window)
    bounded: bool = True
    detail: str = ""

    def bytes(self, activation_bytes: int = 2) -> int:
        per = {"float32": 4, "float64": 8, "complex64": 8, "complex128": 16,
               "activation": activation_bytes}[self.dtype]
        return self.elements * per


@dataclass(frozen=True)
class BlockInstance:
    """A block definition with its hyper-parameters bound; one graph per instance."""

    name: str                 # unique, a valid identifier
    block: str                # the definition's name
    args: tuple[tuple[str, Any], ...]
    span: Span
    graph: Graph | None = None
    states: tuple[State, ...] = ()
    bound_at: Span | None = None   # the layer-pattern entry that bound ``args`` (its first use)


@dataclass(frozen=True)
class Layer:
    index: int
    instance: str
    span: Span
    shared_group: str | None = None  # layers with the same group share the block's weights


@dataclass(frozen=True)
class ModelSettings:
    tie_embeddings: bool = False
    final_norm: str | None = "rmsnorm"
    final_norm_call: Any = None  # the setting's call, e.g. rmsnorm(eps = 1e-5): keyword arguments
    embed_scale: float = 1.0
    logit_softcap: float | None = None
    embed_init: Any = None  # an InitRule; None: normal(std = 0.02)


@dataclass(frozen=True)
class Program:
    """Everything the compiler knows about one spec; the object the pass pipeline transforms."""

    spec: Any                                  # seqdsl.frontend.spec.Spec
    stage: str = "parsed"
    settings: ModelSettings = field(default_factory=ModelSettings)
    pattern: tuple[Any, ...] = ()              # BlockRefs after pattern expansion
    layers: tuple[Layer, ...] = ()
    blocks: dict[str, BlockInstance] = field(default_factory=dict)
    shared: Graph | None = None                # shared values: one OUTPUT-less graph
    shared_outputs: dict[str, int] = field(default_factory=dict)
    shared_blocks: dict[str, str] = field(default_factory=dict)  # alias -> block name
    final_norm: Graph | None = None            # x [d] -> normalised x, before the head

    def replace(self, **changes: Any) -> "Program":
        return dataclasses.replace(self, **changes)

    @property
    def config(self) -> dict[str, Any]:
        return self.spec.config

    def graphs(self) -> Iterator[tuple[str, Graph]]:
        if self.shared is not None:
            yield "shared", self.shared
        for name, inst in self.blocks.items():
            if inst.graph is not None:
                yield name, inst.graph
        if self.final_norm is not None:
            yield "final_norm", self.final_norm
