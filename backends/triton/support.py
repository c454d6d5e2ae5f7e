"""What generated Triton code imports at run time (``from seqdsl.backends.triton import support
as ts``): interpreter detection, the kernel registry the ahead-of-time report walks, and the
packed-sequence offsets every kernel takes.

Generated kernels register themselves with :func:`kernel`, giving the argument types and
constexprs of their default configuration, so that :mod:`seqdsl.backends.triton.aot` can compile
each one for a GPU target without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# triton 3.9 warns when this is unset; keep its current default (fused multiply-adds) explicitly
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

#: True under ``TRITON_INTERPRET=1``: kernels run on CPU tensors through triton's interpreter
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelInfo:
    """One generated kernel and its default configuration, for the ahead-of-time build.

    signature: argument name -> triton type (``"*bf16"``, ``"*fp32"``, ``"i32"``, ...) for every
    runtime argument; constexprs: name -> value for every ``tl.constexpr`` argument;
    uses_dot: the kernel calls ``tl.dot`` (the report checks for tensor-core instructions);
    num_warps / num_stages: the launch configuration the launcher uses on a GPU.
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    uses_dot: bool
    site: str
    num_warps: int = 4
    num_stages: int = 2


@dataclass
class Registry:
    kernels: list[KernelInfo] = field(default_factory=list)

    def add(self, info: KernelInfo) -> None:
        self.kernels.append(info)


def kernel(registry: Registry, fn, *, site: str, signature: dict, constexprs: dict,
           uses_dot: bool, num_warps: int = 4, num_stages: int = 2):
    """Record ``fn`` (a ``@triton.jit`` function) in ``registry``; returns ``fn``."""
    registry.add(KernelInfo(fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__, fn,
                            dict(signature), dict(constexprs), uses_dot, site, num_warps,
                            num_stages))
    return fn


def launch_options(num_warps: int, num_stages: int) -> dict:
    """Launch keywords: the fixed configuration on a GPU, nothing under the interpreter."""
    return {} if INTERPRET else {"num_warps": num_warps, "num_stages": num_stages}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands loaded as ``dtype``: fp32 inputs multiply in full
    fp32 ("ieee"; the GPU default, tf32, keeps 10 mantissa bits: about 1e-3 relative error where
    the fp32 torch path has 1e-6), fp16/bf16 use the tensor cores as they are (the flag only
    matters for fp32 operands)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def offsets(cu_seqlens: torch.Tensor | None, batch: int, length: int, device) -> tuple:
    """(offsets int32 [N + 1], N): where each sequence starts in the flattened ``[B * T]`` time
    axis. Without ``cu_seqlens`` the B rows are the N sequences, each of length T."""
    if cu_seqlens is None:
        return (torch.arange(batch + 1, device=device, dtype=torch.int32) * length, batch)
    if batch != 1:
        raise ValueError("with cu_seqlens the batch size must be 1 (sequences packed along time)")
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != length or \
            bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {length}, "
                         f"got {cu_seqlens.tolist()}")
    return cu.contiguous(), cu.numel() - 1


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether a core runs its generated Triton kernels: ``"triton"`` always, ``"torch"``
    never, ``"auto"`` on CUDA tensors (or everywhere under the interpreter when forced)."""
    if backend == "triton":
        return True
    if backend == "torch":
        return False
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return all(t is None or t.is_cuda for t in tensors)



# ---- fused prologues on the torch path -------------------------------------------------------

def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(x)


_PROLOGUE_OPS = {
    "sigmoid": torch.sigmoid,
    "logsigmoid": torch.nn.functional.logsigmoid,
    "softplus": _softplus,
    "silu": torch.nn.functional.silu,
    "exp": torch.exp,
    "neg": torch.neg,
}


def apply_prologue(prologue: tuple, operands: dict) -> dict:
    """The torch path of a fused site: apply each operand's producer chain (innermost first) as
    the IR wrote it, so that the torch ops see the same operands the kernels compute inside."""
    out = dict(operands)
    for name, chain in sorted(prologue, key=lambda item: item[0] != "dt"):  # dt before v
        x = out[name]
        for op, *params in chain:
            if op == "l2norm":
                xf = x.float()
                x = (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + params[0])).to(x.dtype)
            elif op == "mul_dt":
                x = out["dt"].to(x.dtype) * x
            else:
                x = _PROLOGUE_OPS[op](x.float() if name in ("g", "beta", "dt") else x)
        out[name] = x
    return out


@dataclass(frozen=True)
class Site:
    """One core call site of a compiled model: its Triton entry points and, for the torch
    path, its fused prologue (``apply_prologue``)."""

    name: str
    prologue: tuple = ()
    triton: object = None        # the chunked/recurrent entry: the core's ops signature
    decode: object = None        # attention: one query against a KV cache

    def torch_operands(self, **operands) -> dict:
        return apply_prologue(self.prologue, operands) if self.prologue else operands
