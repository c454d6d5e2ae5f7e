"""Ahead-of-time build of generated kernels for a GPU target, without a GPU.

Each kernel a generated ``kernels.py`` registered (with the argument types and constexprs of its
default configuration) is compiled with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``;
the cubin is read back with the ``cuobjdump`` shipped in the triton wheel for registers, spills
(local memory and stack) and shared memory, and its SASS is searched for tensor-core instructions
(``HGMMA`` on Hopper, ``HMMA`` otherwise).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TARGETS = {"sm90": 90, "sm80": 80, "sm89": 89}


@dataclass(frozen=True)
class KernelBuild:
    site: str
    name: str
    registers: int
    stack: int          # bytes of stack frame (spilled registers live here)
    local: int          # bytes of local memory
    shared: int         # bytes of shared memory (static + triton's dynamic)
    tensor_cores: bool  # HGMMA / HMMA in the SASS
    uses_dot: bool
    error: str = ""

    @property
    def spills(self) -> int:
        return self.stack + self.local

    @property
    def ok(self) -> bool:
        return not self.error and self.spills == 0 and (self.tensor_cores or not self.uses_dot)


def cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():  # pragma: no cover - depends on the triton wheel
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with the triton wheel)")
    return path


def _resources(cubin: bytes) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(cubin)
        tool = str(cuobjdump())
        usage = subprocess.run([tool, "-res-usage", str(f)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", str(f)], capture_output=True, text=True,
                              check=True).stdout
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return fields, sass


def build_kernel(info, target: str = "sm90") -> KernelBuild:
    """Compile one registered kernel for ``target``; errors are reported, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(info.signature)
    signature.update({name: "constexpr" for name in info.constexprs})
    try:
        src = ASTSource(fn=info.fn, signature=signature, constexprs=dict(info.constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32),
                                  options={"num_warps": info.num_warps,
                                           "num_stages": info.num_stages})
        fields, sass = _resources(compiled.asm["cubin"])
    except Exception as exc:  # a kernel that does not build is a row of the report
        return KernelBuild(info.site, info.name, 0, 0, 0, 0, False, info.uses_dot,
                           error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    shared = max(fields.get("SHARED", 0), int(getattr(compiled.metadata, "shared", 0) or 0))
    return KernelBuild(info.site, info.name, fields.get("REG", 0), fields.get("STACK", 0),
                       fields.get("LOCAL", 0), shared,
                       bool(re.search(r"\bH[G]?MMA\b|HGMMA\.|HMMA\.", sass)), info.uses_dot)


def build_registry(registry, target: str = "sm90") -> list[KernelBuild]:
    return [build_kernel(info, target) for info in registry.kernels]


def table(rows: list[KernelBuild]) -> list[str]:
    """Markdown rows: one per kernel."""
    out = ["| site | kernel | registers | spills (B) | shared (B) | tensor cores | status |",
           "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        tc = ("yes" if r.tensor_cores else "NO") if r.uses_dot else ("yes" if r.tensor_cores else "-")
        status = r.error or ("ok" if r.ok else "spills" if r.spills else "no tensor cores")
        out.append(f"| {r.site} | {r.name} | {r.registers} | {r.spills} | {r.shared} | {tc} | {status} |")
    return out
