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

import torch

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


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
