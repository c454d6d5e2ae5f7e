"""The interface every code generator implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from seqdsl.ir.graph import Program


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run; strategy selection consults these, never model names."""

    supports_bf16: bool = True
    supports_complex: bool = False
    max_head_dim: int | None = None
    has_gpu: bool = False
    cores: frozenset[str] = frozenset()


class Backend(Protocol):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def generate(self, program: Program) -> dict[str, str]:
        """Return the generated files, relative path -> source text (already ``ast.parse``d)."""
        ...

    def write(self, program: Program, out_dir: Path) -> list[Path]:
        """Write the generated files atomically; nothing is left half-written on error."""
        ...


#: registered backends by name; the torch and triton generators add themselves here
REGISTRY: dict[str, type] = {}
