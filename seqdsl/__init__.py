"""seqdsl: a declarative model-compilation DSL for sequence models.

``seqdsl.load(path, **overrides)`` parses, validates and lowers a ``.seq`` spec to the IR
(:class:`seqdsl.ir.graph.Program`). User mistakes raise :class:`SpecError` with source spans.
"""

from __future__ import annotations

import os
from typing import Any

from seqdsl.diagnostics import Diagnostic, SpecError, Span

__version__ = "0.1.0"


def load(source: str | os.PathLike, *, text: str | None = None, until: str | None = None,
         verify: bool = False, **overrides: Any):
    """Compile a spec to the IR. ``overrides`` set hyper-parameters: ``d=512`` for the model's,
    ``**{"mamba.expand": 4}`` or ``mamba={"expand": 4}`` for a definition's defaults."""
    from seqdsl.frontend.spec import load_spec
    from seqdsl.ir.graph import Program
    from seqdsl.ir.verify import verify as verify_ir
    from seqdsl.passes import run_pipeline

    spec = load_spec(source, text=text, overrides=overrides)
    return run_pipeline(Program(spec=spec), until=until, after_each=verify_ir if verify else None)


def compile(source: str | os.PathLike, *, text: str | None = None, backend: str = "torch",
            **overrides: Any):
    """Compile a spec to a generated Python module and import it: ``m.Model``, ``m.Config``.
    Cached by (spec text, seqdsl version, backend, overrides)."""
    from seqdsl.compiler import compile as _compile

    return _compile(source, text=text, backend=backend, **overrides)


__all__ = ["load", "compile", "SpecError", "Diagnostic", "Span", "__version__"]
