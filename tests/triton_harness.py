"""Render a Triton kernel template of ``backends/triton/templates`` for one ``KernelSpec`` and load it
as a module, the way the generator's ``kernels.py`` would hold it (header + fragment).

Importing this module sets ``TRITON_INTERPRET=1`` unless the environment already chose: the
kernels then run on CPU tensors (no GPU in CI); ahead-of-time compilation for a GPU target does
not depend on it. With ``TRITON_INTERPRET=0`` on a machine with a GPU the same tests run the
compiled kernels there (:data:`DEVICE`, :func:`on_device`): inputs, references and comparisons
stay on the CPU, only the kernel calls move.
"""

from __future__ import annotations

import ast
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import jinja2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from seqdsl.backends.triton import support as ts  # noqa: E402
from seqdsl.backends.triton.codegen import import_source  # noqa: E402

#: where the kernels run: CPU tensors under the interpreter, else the GPU if there is one (None:
#: neither, the runtime tests skip)
DEVICE = "cpu" if ts.INTERPRET else ("cuda" if torch.cuda.is_available() else None)
runs_kernels = pytest.mark.skipif(
    DEVICE is None, reason="the kernels run on CPU under TRITON_INTERPRET=1, or on a GPU")


def _moved(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_moved(item, device) for item in x)
    if isinstance(x, dict):
        return {key: _moved(item, device) for key, item in x.items()}
    return x


def on_device(fn):
    """``fn`` with its tensor arguments moved to :data:`DEVICE` and its tensor results moved back
    to the CPU (both differentiable, so gradients reach the CPU leaves)."""
    if DEVICE is None:
        pytest.skip("no device runs the kernels: TRITON_INTERPRET=1, or a GPU")

    def run(*args, **kwargs):
        return _moved(fn(*_moved(args, DEVICE), **_moved(kwargs, DEVICE)), "cpu")
    return run

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
    return load_source(render(template, spec, prefix), prefix)


def load_source(source: str, prefix: str):
    """Import generated source as a fresh module, from a file (``triton.jit`` reads the source)."""
    return import_source(source, f"seqdsl_kernels_{prefix}_{abs(hash(source)) % 10**12}", _DIR)


def sm90_report(template: str, spec, prefix: str) -> list[dict]:
    """Compile every kernel the rendered ``template`` registers, at its default configuration, for
    sm90 (no GPU needed) and read its resources with the wheel's cuobjdump: one row per kernel
    (name, REG, STACK, LOCAL, shared bytes, uses_dot, tensor-core instructions in the SASS).

    Run it in a process without ``TRITON_INTERPRET=1``: kernels that ran in the interpreter
    leave triton.language patched for the compiler."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for info in load(template, spec, prefix).REGISTRY.kernels:
        fn = info.fn if isinstance(info.fn, JITFunction) else JITFunction(info.fn.fn)
        signature = dict(info.signature, **{name: "constexpr" for name in info.constexprs})
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=info.constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": info.num_warps, "num_stages": info.num_stages})
        cubin = _DIR / f"{info.name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        res = {key: int(value) for key, value in
               __import__("re").findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
        rows.append(dict(name=info.name, **res, shared=compiled.metadata.shared,
                         uses_dot=info.uses_dot, num_warps=info.num_warps,
                         hgmma=sass.count("HGMMA"), hmma=sass.count("HMMA")))
    return rows
