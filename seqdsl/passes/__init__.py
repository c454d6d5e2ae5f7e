"""The pass pipeline: one list, one pass per module, applied in order to a Program."""

from __future__ import annotations

from typing import Callable

from seqdsl.ir.graph import Program
from seqdsl.passes.build_graphs import build_graphs
from seqdsl.passes.canonicalize_cores import canonicalize_cores
from seqdsl.passes.expand_pattern import expand_pattern
from seqdsl.passes.fold_constants import fold_constants
from seqdsl.passes.infer_memory import infer_memory
from seqdsl.passes.infer_shapes import infer_shapes
from seqdsl.passes.resolve_names import resolve_names

PIPELINE: list[tuple[str, Callable[[Program], Program]]] = [
    ("resolve_names", resolve_names),            # every name refers to something; arity of calls
    ("expand_pattern", expand_pattern),          # `layers = ...` -> explicit per-layer list
    ("build_graphs", build_graphs),              # one dataflow graph per block instance, calls inlined
    ("fold_constants", fold_constants),          # hyper-parameter arithmetic, conditionals
    ("infer_shapes", infer_shapes),              # per-token shapes, dtypes, ranges; core checks
    ("infer_memory", infer_memory),              # recurrent states, conv tails, KV caches per layer
    ("canonicalize_cores", canonicalize_cores),  # log-space decays, complex/multi-step lowering plan
]

PASS_NAMES = [name for name, _ in PIPELINE]


def run_pipeline(program: Program, until: str | None = None,
                 after_each: Callable[[Program], None] | None = None) -> Program:
    """Apply the passes in order, stopping after ``until`` if given."""
    if until is not None and until not in PASS_NAMES:
        raise ValueError(f"unknown pass {until!r}; passes: {', '.join(PASS_NAMES)}")
    for name, fn in PIPELINE:
        program = fn(program)
        if after_each is not None:
            after_each(program)
        if name == until:
            break
    return program
