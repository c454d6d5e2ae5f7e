"""Helpers shared by the cores: the dtype policy, splitting time into chunks, the stable segment
sum, and per-chunk activation checkpointing.

Layout convention inside the chunked forms: a sequence tensor ``[B, T, H, *rest]`` becomes
``[B, H, n, C, *rest]`` (``n`` chunks of ``C`` steps, time zero-padded at the end), so that
batched matmuls over the last two dims mix positions within one chunk. With ``chunk_major``
it becomes ``[n, B, H, C, *rest]`` instead, for a form whose loop over chunks writes each
chunk's results in place: chunk ``c``'s block ``x[c]`` is then contiguous (an in-place batched
matmul into a batch-strided slice costs about twice one into a contiguous block).
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


def empty_time(state: str | None):
    """Decorate a core so that an input of no time steps (``T = 0``) returns at once: an empty
    output ``[B, 0, H, V]`` (``scan``: ``b``'s shape) in the output dtype, and as final state the
    initial state (or zeros) in the state dtype. ``state`` says the core's layout: ``"scan"``
    (``a, b``: state ``[N, *S]``), ``"kv"`` (``q, k, v``: state ``[N, H, K, V]``), ``"complex"``
    (the same, complex, with a real output) or None (attention: the output only). N is the
    batch, or the number of sequences with ``cu_seqlens``."""
    import functools
    import inspect

    def wrap(fn):
        sig = inspect.signature(fn)
        first_name = next(iter(sig.parameters))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            first = args[0] if args else kwargs[first_name]
            if first.shape[1] != 0:
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            x = bound.arguments
            if state == "scan":
                a, b = x["a"], x["b"]
                batch = b.shape[0]                           # (a may broadcast over it)
                o = b.new_zeros(b.shape, dtype=output_dtype(a, b))
                S_shape, S_dtype = b.shape[2:], compute_dtype(a, b)
            else:
                q, k, v = x["q"], x["k"], x["v"]
                batch = q.shape[0]
                real = [t.real if t.is_complex() else t for t in (q, k, v)]
                o = v.new_zeros((batch, 0, *v.shape[-2:]), dtype=output_dtype(*real))
                if state is None:
                    return o
                S_shape = (v.shape[-2], q.shape[-1], v.shape[-1])
                S_dtype = compute_dtype(*real)
                if state == "complex":
                    S_dtype = torch.complex128 if S_dtype == torch.float64 else torch.complex64
            if not x["output_final_state"]:
                return o, None
            cu = x["cu_seqlens"]
            N = batch if cu is None else len(cu) - 1
            S0 = x["initial_state"]
            S = S0.to(S_dtype).clone() if S0 is not None else \
                o.new_zeros((N, *S_shape), dtype=S_dtype)
            return o, S
        return call
    return wrap


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


def to_chunks(x: Tensor, chunk: int, chunk_major: bool = False) -> Tensor:
    """[B, T, H, *rest] -> [B, H, n, C, *rest] (``chunk_major``: [n, B, H, C, *rest]),
    zero-padding T up to n * C."""
    x = pad_time(x, chunk)
    B, T, H, *rest = x.shape
    if chunk_major:
        x = x.reshape(B, T // chunk, chunk, H, math.prod(rest)).permute(1, 0, 3, 2, 4)
        return x.contiguous().view(T // chunk, B, H, chunk, *rest)
    # one [B, T, H, R] -> [B, H, T, R] transpose copy (faster than the equivalent 5-dim
    # [B, n, C, H] -> [B, H, n, C] copy), then a free view splitting T into n * C
    x = x.reshape(B, T, H, math.prod(rest)).transpose(1, 2).contiguous()  # [B, H, T, R]
    return x.view(B, H, T // chunk, chunk, *rest)


def needs_grad(*xs) -> bool:
    """Whether autograd is recording and any of ``xs`` (None and non-tensors skipped) requires
    a gradient: the test every op makes before choosing its in-place, no-autograd path."""
    return torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in xs)


def to_chunks_scaled(x: Tensor, chunk: int, factor: Tensor, out: Tensor | None = None,
                     chunk_major: bool = False) -> Tensor:
    """``to_chunks(x, chunk, chunk_major) * factor`` in one pass: the product is written
    straight into the chunked layout (the transpose copy and the multiply fused), into ``out``
    if given (any strides, e.g. a slice of a larger buffer). ``factor`` broadcasts against
    ``[B, H, n, C, *rest]`` (``[n, B, H, C, *rest]``). Under autograd (where ``out=`` is not
    allowed) the two steps."""
    if needs_grad(x, factor):
        if out is not None:
            raise ValueError("to_chunks_scaled: no out= under autograd")
        return to_chunks(x, chunk, chunk_major) * factor
    x = pad_time(x, chunk)
    B, T, H, *rest = x.shape
    view = x.view(B, T // chunk, chunk, H, *rest)
    # [B, H, n, C, *rest] or [n, B, H, C, *rest], strided
    view = view.permute(1, 0, 3, 2, *range(4, view.dim())) if chunk_major else view.movedim(3, 1)
    if out is None:
        out = torch.empty(view.shape, dtype=torch.promote_types(x.dtype, factor.dtype),
                          device=x.device)
    return torch.mul(view, factor, out=out)


def from_chunks(x: Tensor, length: int, chunk_major: bool = False) -> Tensor:
    """[B, H, n, C, *rest] (``chunk_major``: [n, B, H, C, *rest]) -> [B, T, H, *rest], dropping
    the padding beyond ``length``."""
    if chunk_major:
        x = x.movedim(0, 2)                               # [B, H, n, C, *rest], strided
    B, H, n, C = x.shape[:4]
    rest = x.shape[4:]
    x = x.movedim(1, 3)                                   # [B, n, C, H, *rest]
    if length == n * C:
        return x.reshape(B, n * C, H, *rest)
    # padded: the whole chunks and the part of the last one copied into one contiguous tensor
    # (slicing the padded copy left a strided view for a batch of several)
    m = length // C
    out = x.new_empty(B, length, H, *rest)
    out[:, :m * C].view(B, m, C, H, *rest).copy_(x[:, :m])
    out[:, m * C:].copy_(x[:, m, :length - m * C])
    return out


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


def decay_matrix(g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The decay matrix of a scalar log decay over a chunk, without the cost of :func:`segsum`.

    ``g [..., C]`` (log decay of each step of a chunk) -> ``(G, D)``: ``G [..., C]`` the inclusive
    cumulative sum in float64, and ``D [..., C, C]`` in ``dtype`` with ``D[i, j] = e^{G_i - G_j}``
    for ``j <= i`` and **1 above the diagonal**: multiply it with a causal (lower-triangular)
    matrix. (Masking after the ``exp`` would cost a pass and an allocation; ``exp(-inf)`` or of
    any exponent below fp32's range takes a slow path.) The differences are exact to working
    precision: ``G = hi + lo`` is split into two ``dtype`` parts and ``(hi_i - hi_j) + lo_i - lo_j``
    rounds relative to the difference itself, not to ``|G|``, so a strong decay (large ``|G|``)
    costs no accuracy near the diagonal. Exponents on and above the diagonal are set to 0
    before the ``exp``: no overflow, and no gradient through the diagonal's ``e^0 = 1``. (Its
    exponent ``G_i - G_i`` would send ``dD_ii`` into a row sum and subtract it from a column
    sum of the differences' gradient: the two cancel only to rounding, about ``1e-7 |dD_ii|`` in
    fp32, which swamped the true gradient of a strong decay, ``~e^{g}``: 18% off at -30 per step.)
    """
    G = g.to(torch.float64).cumsum(-1)
    hi = G.to(dtype)
    lo = (G - hi).to(dtype)
    diff = (hi[..., :, None] - hi[..., None, :]).add_(lo[..., :, None]).sub_(lo[..., None, :])
    return G, diff.tril_(-1).exp_()                      # in place: one [..., C, C] allocation


#: largest ``|G|`` (log decay accumulated from a chunk start) for which :func:`decay_factors`
#: forms ``e^{G_i}`` and ``e^{-G_j}`` separately: their products stay below ``e^{60}`` (no fp32
#: overflow, even above the diagonal before masking) and above ``e^{-60}``
FACTOR_LIMIT = 30.0


def within_factor_limit(G: Tensor, unit: float = 1.0) -> bool:
    """Whether every ``|G|`` (cumulative log decays, in units of ``1 / unit`` nats: ``LOG2E``
    for base-2 logarithms) is within :data:`FACTOR_LIMIT`, so that ``e^G`` and ``e^{-G}`` may
    be formed separately. One scalar check (a host sync: cheap on a CPU, where these forms
    run)."""
    low, high = torch.aminmax(G.detach())
    return max(-float(low), float(high)) <= FACTOR_LIMIT * unit


def decay_factors(G: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """``(e^G, e^{-G})`` in ``dtype`` from the float64 cumulative log decay ``G [..., C]``, or
    None when some ``|G|`` exceeds :data:`FACTOR_LIMIT` (then use :func:`decay_matrix`).

    ``e^{G_i - G_j} = e^{G_i} · e^{-G_j}``: each factor is rounded once from float64, so the
    product is within two ulps of the exact decay: as accurate as :func:`decay_matrix`, without
    any ``[..., C, C]`` pass. The decay then rides on the rows of q and k before their matmul
    (``(q ⊙ e^G)(k ⊙ e^{-G})ᵀ``). :func:`within_factor_limit` decides.
    """
    if not within_factor_limit(G):
        return None
    return torch.exp(G).to(dtype), torch.exp(-G).to(dtype)


def centred_decay_factors(G: Tensor, dtype: torch.dtype, span: float = 4 * FACTOR_LIMIT
                          ) -> tuple[Tensor, Tensor] | None:
    """``(e^{G - m}, e^{m - G})`` in ``dtype`` with ``m`` the midpoint of each row's range
    (``G [..., C]`` float64 cumulative log decays), or None when some row spans more than
    ``span``. ``e^{G_i - G_j} = e^{G_i - m} · e^{m - G_j}`` with every factor within
    ``e^{±span/2}``. The default, ``4 · FACTOR_LIMIT`` (twice the range of
    :func:`decay_factors`), is for a product that scales a causal (lower-triangular, zero above
    the diagonal) matrix one factor at a time, so that ``e^{G_i - G_j}`` itself, up to
    ``e^{4·FACTOR_LIMIT}`` above the diagonal, is never formed. With ``2 · FACTOR_LIMIT`` the
    factors may ride on the rows of a matmul, as those of :func:`decay_factors` do: every
    product stays within ``e^{±2·FACTOR_LIMIT}``, above the diagonal too. Each factor is
    rounded once from float64, as in :func:`decay_factors`."""
    low, high = G.detach().amin(-1, keepdim=True), G.detach().amax(-1, keepdim=True)
    if float((high - low).max()) > span:
        return None
    centred = G - 0.5 * (low + high)      # (m carries no gradient: the product does not read it)
    return torch.exp(centred).to(dtype), torch.exp(-centred).to(dtype)


#: log2(e): ``e^x = 2^{x·log2(e)}``
LOG2E = 1.4426950408889634


def exp_fast(x: Tensor) -> Tensor:
    """``e^x`` as ``2^{x·log2 e}`` in fp32: torch's CPU ``exp2`` runs about 3x faster than its
    ``exp`` (measured on 2^20 entries, AVX-512), and the rounding of ``x·log2 e`` adds a relative
    error of ``|x|·2^-24`` (< 2e-6 for ``|x| <= 30``, the range of every decay factor formed
    here). Float64 (and complex) inputs take ``exp`` itself."""
    if x.dtype != torch.float32:
        return torch.exp(x)
    return torch.exp2(x * LOG2E)


#: chunks (``[C, K]`` blocks over batch × heads × time) in one segment of the chunked forms:
#: 128 blocks of 64 x 64 fp32 are 2 MB per operand, so a segment's temporaries stay in a CPU's
#: L3 cache from one batched op to the next, and their memory is bounded whatever T. (Against
#: 64, once the loops over chunks wrote in place, B·H = 4: 1-26% faster at T = 2048 (the
#: linear and delta cores 4-14%, Mamba-2's shared q/k 26%), -3 to +15% at T = 8192; 256 lost
#: up to 11% at T = 8192.)
SEGMENT_CHUNKS = 128
#: but never fewer chunks of time per segment than this: with many heads a segment of one or two
#: chunks costs more in per-call overhead than the cache saves (Mamba-2, 24 heads: 8% slower)
SEGMENT_MIN_CHUNKS = 8


def segment_length(chunk: int, batch_heads: int) -> int:
    """Steps per time segment of a chunked form over ``batch_heads`` (batch × heads) sequences:
    :data:`SEGMENT_CHUNKS` chunk blocks, at least :data:`SEGMENT_MIN_CHUNKS` chunks of time."""
    return chunk * max(SEGMENT_MIN_CHUNKS, SEGMENT_CHUNKS // batch_heads)


def over_segments(fn: Callable, seqs: tuple, state: Tensor | None, chunk: int, heads: int,
                  *args):
    """``fn(*seqs, state, chunk, *args) -> (o, state)`` over consecutive time segments of whole
    chunks (:data:`SEGMENT_CHUNKS` chunk blocks each, at least :data:`SEGMENT_MIN_CHUNKS`
    chunks of time), each starting from the state the last
    one returned. ``seqs`` are ``[B, T, ...]`` tensors (or None), ``o`` is ``[B, T, ...]``.
    The recurrence is exact across segment boundaries: a chunked form is already a sequence
    of chunk-to-chunk state passes."""
    B, T = next(x for x in seqs if x is not None).shape[:2]
    length = segment_length(chunk, B * heads)
    if T <= length:
        return fn(*seqs, state, chunk, *args)
    # the segments by split: under autograd its backward is one cat, where slicing would have
    # each segment's gradient fill a zeroed copy of the whole input (measured 2.7 ms of a 13 ms
    # forward + backward at T = 2048)
    parts = [(None,) * -(-T // length) if x is None else x.split(length, dim=1) for x in seqs]
    outs = []
    for seg in zip(*parts):
        o, state = fn(*seg, state, chunk, *args)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def strict_last_step_apart(fn: Callable, seqs: tuple, drop: int, state: Tensor | None,
                           chunk: int, heads: int, args: tuple):
    """A chunked form for gradients that are exact under strong decays.

    In every chunked form a query t meets a key s <= t through the weight ``e^{G_t - G_s}``.
    For the diagonal pair (s = t, each step's own write) that weight is exactly 1, but autograd
    through the factored ``e^{G_t}·e^{-G_s}`` (or a rotation ``e^{±iΦ}``) carries two O(1)
    terms that cancel, while the gradient of a strong decay is of order ``e^{g}``: digits are
    lost as the decay grows (about 1e-4 relative RMS at -8/step). Here those pairs never pass
    through a decay factor:

    * ``fn(*seqs, state, chunk, *args)`` runs *strict* (``args`` ends with ``strict=True``:
      its outputs leave the diagonal pairs out) over all T, with the last step of
      ``seqs[drop]`` zeroed: the key of ``linear`` (the last write goes) or β of ``delta``
      (the last erase and write go). Its last step is then the decay alone, so it returns
      every strict output and ``S' = decay_T ⊙ S_{T-1}``;
    * the caller adds the last step's update to ``S'`` directly (and, for an erase, corrects
      ``o_T``), and every step's own write to the outputs.

    Plain autograd on the result has no O(1) cancellation. One segmented pass, where splitting
    off the last step (a pass over T - 1 steps, the last step, a concatenation) measured
    1.04-1.08x slower forward + backward for a scalar-decay ``linear`` at T = 2048 (A/B in
    one process). Returns ``(o, S')``."""
    x = seqs[drop]
    T = x.shape[1]
    # by split and cat: the backward is one split (no zero-filled copy of the whole input)
    zeroed = torch.cat([x.split([T - 1, 1], dim=1)[0], x.new_zeros(x.shape[0], 1, *x.shape[2:])],
                       dim=1)
    seqs = (*seqs[:drop], zeroed, *seqs[drop + 1:])
    return over_segments(fn, seqs, state, chunk, heads, *args)


def cumsum_to_end(x: Tensor, dim: int) -> Tensor:
    """Exclusive reverse cumulative sum: ``out[t] = sum_{s > t} x[s]`` along ``dim``."""
    rev = x.flip(dim).cumsum(dim).flip(dim)               # sum_{s >= t}
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([rev.narrow(dim, 1, x.shape[dim] - 1), zero], dim=dim)


def sub_chunk_size(chunk: int, preferred: int = 16) -> int:
    """Size of the secondary chunks (a divisor of ``chunk``, at most ``preferred``)."""
    return math.gcd(chunk, preferred)


def grads_by_recomposition(ctx, inputs: tuple, compose: Callable, grads_out: tuple,
                           n_args: int) -> tuple:
    """The double backward of a custom ``autograd.Function`` whose first-order backward is
    hand-written: under ``create_graph``, ``compose(*inputs)`` recomputes its outputs from the
    saved tensor ``inputs`` with differentiable ops, and autograd differentiates them against
    ``grads_out`` (None where an output got no gradient) with a graph. Returns the ``n_args``
    gradients a ``backward`` returns: one per input that ``ctx`` wants (None elsewhere), then
    None for the Function's non-tensor arguments."""
    wanted = [i for i, x in enumerate(inputs) if x is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        pairs = [(t, g) for t, g in zip(compose(*inputs), grads_out) if g is not None]
        grads = torch.autograd.grad([t for t, _ in pairs], [inputs[i] for i in wanted],
                                    [g for _, g in pairs], create_graph=True,
                                    allow_unused=True)
    out = [None] * n_args
    for i, g in zip(wanted, grads):
        out[i] = g
    return tuple(out)


def checkpointed(fn: Callable, *args):
    """``fn(*args)``, recomputed in the backward pass instead of storing its intermediates when
    autograd is recording. Keeps the memory of the tiled forms O(tile) with gradients too."""
    if needs_grad(*args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


__all__ = ["compute_dtype", "output_dtype", "cast", "default_scale", "pad_time", "to_chunks",
           "to_chunks_scaled", "from_chunks", "segsum", "decay_matrix", "decay_factors",
           "centred_decay_factors", "empty_time", "FACTOR_LIMIT", "within_factor_limit", "LOG2E",
           "exp_fast",
           "SEGMENT_CHUNKS", "SEGMENT_MIN_CHUNKS", "segment_length", "over_segments",
           "strict_last_step_apart", "cumsum_to_end", "sub_chunk_size", "checkpointed",
           "grads_by_recomposition", "needs_grad"]
