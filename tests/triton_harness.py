"""Render a Triton kernel template of ``backends/triton/templates`` for one ``KernelSpec`` and load it
as a module, the way the generator's ``kernels.py`` would hold it (header + fragment).

Importing this module sets ``TRITON_INTERPRET=1`` unless the environment already chose: the
kernels then run on CPU tensors (no GPU in CI); ahead-of-time compilation for a GPU target does
not depend on it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import jinja2  # noqa: E402

TEMPLATES = Path(__file__).resolve().parent.parent / "backends" / "triton" / "templates"

#: the generated module's header assumed by every fragment (templates/README.md)
HEADER = """import math
import torch
import triton
import triton.language as tl
from seqdsl.backends.triton import support as ts
REGISTRY = ts.Registry()
"""

_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_DIR = Path(tempfile.mkdtemp(prefix="seqdsl-triton-kernels-"))


def render(template: str, spec, prefix: str) -> str:
    """The module source: header + the template rendered for ``spec`` (checked to parse)."""
    source = HEADER + _ENV.get_template(template).render(p=prefix, s=spec, reg="REGISTRY")
    ast.parse(source)
    return source


def load(template: str, spec, prefix: str):
    """Render and import as a fresh module (written to a file: ``triton.jit`` reads the source)."""
    source = render(template, spec, prefix)
    name = f"seqdsl_kernels_{prefix}_{abs(hash(source)) % 10**12}"
    path = _DIR / f"{name}.py"
    path.write_text(source)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module
