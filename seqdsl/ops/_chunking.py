"""Helpers shared by the cores: the dtype policy, splitting time into chunks, the stable segment
sum, and per-chunk activation checkpointing.

Layout convention inside the chunked forms: a sequence tensor ``[B, T, H, *rest]`` becomes
``[B, H, n, C, *rest]`` (``n`` chunks of ``C`` steps, time zero-padded at the end), so that
batched matmuls over the last two dims mix positions within one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.utils.checkpoint

Tensor = torch.Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype states accumulate in: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs, and
    complex64 / complex128 when any input is complex."""
    dtypes = [t.dtype for t in tensors if t is not None]
    wide = any(d in (torch.float64, torch.complex128) for d in dtypes)
    if any(d.is_complex for d in dtypes):
        return torch.complex128 if wide else torch.complex64
    return torch.float64 if wide else torch.float32


def output_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype outputs are returned in: the promotion of the input dtypes (no upcast)."""
    dtypes = [t.dtype for t in tensors if t is not None]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def cast(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype)


def default_scale(scale: float | None, head_dim: int) -> float:
    return head_dim ** -0.5 if scale is None else scale


def pad_time(x: Tensor, multiple: int, dim: int = 1, value: float = 0.0) -> Tensor:
    """Pad dimension ``dim`` at the end with ``value`` up to a multiple of ``multiple``."""
    pad = -x.shape[dim] % multiple
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def to_chunks(x: Tensor, chunk: int) -> Tensor:
    """[B, T, H, *rest] -> [B, H, n, C, *rest], zero-padding T up to n * C."""
    x = pad_time(x, chunk)
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // chunk, chunk, H, *x.shape[3:])  # [B, n, C, H, *rest]
    return x.movedim(3, 1).contiguous()                   # [B, H, n, C, *rest]


def from_chunks(x: Tensor, length: int) -> Tensor:
    """[B, H, n, C, *rest] -> [B, T, H, *rest], dropping the padding beyond ``length``."""
    B, H, n, C = x.shape[:4]
    x = x.movedim(1, 3)                                   # [B, n, C, H, *rest]
    return x.reshape(B, n * C, H, *x.shape[4:])[:, :length]


def segsum(x: Tensor) -> Tensor:
    """Stable segment sum over the last dim (the Mamba-2 ``ssd_minimal`` trick).

    ``x [..., L] -> out [..., L, L]`` with ``out[..., i, j] = sum_{j < t <= i} x[..., t]`` for
    ``i >= j`` and ``-inf`` above the diagonal, so ``exp(out)`` is the causal decay matrix.
    It is a masked cumulative sum, not a difference of two cumulative sums, so there is no
    cancellation and no ``exp`` of a positive number.
    """
    L = x.shape[-1]
    strict = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1)
    rep = x.unsqueeze(-1).expand(*x.shape, L)             # rep[..., i, j] = x[..., i]
    out = rep.masked_fill(~strict, 0).cumsum(-2)          # sum over j < t <= i
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~causal, -math.inf)


def cumsum_to_end(x: Tensor, dim: int) -> Tensor:
    """Exclusive reverse cumulative sum: ``out[t] = sum_{s > t} x[s]`` along ``dim``."""
    rev = x.flip(dim).cumsum(dim).flip(dim)               # sum_{s >= t}
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([rev.narrow(dim, 1, x.shape[dim] - 1), zero], dim=dim)


def sub_chunk_size(chunk: int, preferred: int = 16) -> int:
    """Size of the secondary chunks (a divisor of ``chunk``, at most ``preferred``)."""
    return math.gcd(chunk, preferred)


def checkpointed(fn: Callable, *args):
    """``fn(*args)``, recomputed in the backward pass instead of storing its intermediates when
    autograd is recording. Keeps the memory of the tiled forms O(tile) with gradients too."""
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, Tensor) and a.requires_grad for a in args)
    if needs_grad:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


__all__ = ["compute_dtype", "output_dtype", "cast", "default_scale", "pad_time", "to_chunks",
           "from_chunks", "segsum", "cumsum_to_end", "sub_chunk_size", "checkpointed"]
