"""The compile-time description of one core call site, from which the templates generate kernels.

The triton code generator derives one :class:`KernelSpec` per core node of the lowered IR (equal
specs across layers share their kernels); the templates read only these fields, never model names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelSpec:
    core: str                     # "scan" | "linear" | "delta" | "attention"
    H: int                        # value heads (linear/delta), query heads (attention), 1 (scan)
    K: int                        # key / query head dim (scan: channels)
    V: int                        # value head dim (scan: channels)
    HQ: int = 0                   # q/k heads of linear/delta (divides H); 0: same as H
    HKV: int = 0                  # key/value heads of attention (divides H); 0: same as H
    decay: str = "none"           # linear/delta: "none" | "scalar" | "key" | "key_value" | "factored"
    scale: float = 1.0            # output scale, baked in
    steps: int = 1                # delta: Householder sub-steps per token (lowered to T * steps)
    window: int | None = None     # attention: sliding window (None: full causal)
    softcap: float | None = None  # attention: c * tanh(s / c)
    complex_scan: bool = False    # scan: complex a, b, h
    #: fused elementwise producers: (operand, (op, ...)) applied inside the kernel, innermost first
    prologue: tuple = ()
    site: str = ""                # e.g. "mamba_block.mamba.y" (comments only)
    spec_ref: str = ""            # e.g. "mamba.seq:30" (comments only)
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def hq(self) -> int:
        return self.HQ or self.H

    @property
    def hkv(self) -> int:
        return self.HKV or self.H

    def prologue_of(self, operand: str) -> list:
        """The fused producer chain of one operand (innermost first); [] when none."""
        for name, chain in self.prologue:
            if name == operand:
                return list(chain)
        return []

    @property
    def prologue_text(self) -> str:
        """e.g. ``k = l2norm(silu(k)); beta = sigmoid(beta)``."""
        parts = []
        for name, chain in self.prologue:
            expr = name
            for op, *params in chain:
                expr = f"dt * {expr}" if op == "mul_dt" else f"{op}({expr})"
            parts.append(f"{name} = {expr}")
        return "; ".join(parts)

    @property
    def chunked(self) -> bool:
        """Whether the chunked (tensor-core) family covers this site for T > 1."""
        return (self.core == "linear" and self.decay in ("none", "scalar", "key")) or \
            (self.core == "delta" and self.decay in ("none", "scalar"))
