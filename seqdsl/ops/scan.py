"""``scan``: the elementwise (diagonal) linear recurrence over a vector state.

    h_t = a_t ⊙ h_{t-1} + b_t,        h_0 = initial_state (zero if None)

Shapes: ``b [B, T, *S]``; ``a`` has the same number of dims, each equal or 1 (a per-channel
gate ``[B, T, D]``, a gate shared over a trailing dim ``[B, T, H, 1]``, ...); real or complex.
Output ``h [B, T, *S]`` in the input dtype, final state ``[B, *S]`` in fp32 / complex64 (fp64 /
complex128 for double inputs). Used by HGRN, RG-LRU, minGRU/minLSTM, LRU (complex) — and inside
the ``linear`` core for the state passing between chunks.
"""

from __future__ import annotations

import math

import torch

from ._chunking import cast, compute_dtype, empty_time, needs_grad, output_dtype
from ._varlen import varlen_call

Tensor = torch.Tensor


def associative_scan(a: Tensor, b: Tensor, initial_state: Tensor | None = None) -> Tensor:
    """All prefixes ``h_t`` of ``h_t = a_t h_{t-1} + b_t`` along dim 1, by recursive doubling.

    Each element ``(a_t, b_t)`` is the affine map ``h -> a_t h + b_t``. After the round with
    offset ``d``, element ``t`` is the composition of the maps at ``(t - 2d, t]`` (clipped at 0):
    ``(a_t, b_t) ∘ (a_{t-d}, b_{t-d}) = (a_t a_{t-d}, a_t b_{t-d} + b_t)``. ``ceil(log2 T)``
    rounds of elementwise products; no division, so it is exact for ``a`` of any magnitude
    (including 0). ``a`` may broadcast against ``b`` in every dim but 1 (time).
    """
    if initial_state is not None:
        # fold h_0 into the first input: h_1 = a_1 h_0 + b_1
        first = a[:, :1] * initial_state.unsqueeze(1) + b[:, :1]
        b = torch.cat([first, b[:, 1:]], dim=1)
    T = b.shape[1]
    if T > 2 and not needs_grad(a, b):
        return _doubling_inplace(a, b)
    d = 1
    while d < T:
        b = torch.cat([b[:, :d], a[:, d:] * b[:, :-d] + b[:, d:]], dim=1)
        if 2 * d < T:  # the last round needs no products of a
            a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], dim=1)
        d *= 2
    return b


def _doubling_inplace(a: Tensor, b: Tensor) -> Tensor:
    """:func:`associative_scan`'s rounds without autograd, in two pairs of buffers padded at the
    front of dim 1 with the identity map (``a = 1``, ``b = 0``) as long as the largest offset:
    each round is one ``addcmul`` and one ``mul`` into the other pair (the shifted reads of the
    first ``d`` steps land on the padding), where the composition with ``cat`` takes five ops
    and five allocations (a 32-step scan of ``[1, 32, 256]``: 10 ops instead of 25)."""
    B, T = b.shape[:2]
    P = 1 << (T - 1).bit_length() - 1                 # the largest offset d < T
    bufs = []
    for x, pad in ((a, 1.0), (b, 0.0)):
        pair = []
        for _ in range(2):
            buf = torch.empty((x.shape[0], P + T, *x.shape[2:]), dtype=x.dtype, device=x.device)
            buf[:, :P] = pad
            pair.append(buf)
        pair[0][:, P:] = x
        bufs.append(pair)
    (a0, a1), (b0, b1) = bufs
    d = 1
    while d < T:
        torch.addcmul(b0[:, P:], a0[:, P:], b0[:, P - d:P + T - d], out=b1[:, P:])
        b0, b1 = b1, b0
        if 2 * d < T:                                 # the last round needs no products of a
            torch.mul(a0[:, P:], a0[:, P - d:P + T - d], out=a1[:, P:])
            a0, a1 = a1, a0
        d *= 2
    return b0[:, P:]


#: the fewest entries of ``[B, n, *S]`` per level-1 op (one step of every block) that
#: :func:`blocked_scan` allows while the block length ``C`` (a power of two from 8 to 32) can be
#: shortened: ``C`` is the longest with ``numel / C`` at least this. Below it an op costs about
#: its per-call overhead (a window of Mamba's [1536, 16] state over 64 steps: ``C = 32`` made
#: two blocks, ops of 49k entries; ``C = 16``, 98k entries, ran the mixer 4-6% faster, medians of
#: 30 interleaved rounds), above it the ``C``-step loop costs more ops than it saves
LEVEL1_ENTRIES = 2 ** 16


def blocked_scan(a: Tensor, b: Tensor, initial_state: Tensor | None = None,
                 block: int | None = None, scratch: bool = False,
                 reverse: bool = False) -> Tensor:
    """All prefixes of ``h_t = a_t h_{t-1} + b_t`` along dim 1, in two levels.

    Time is cut into ``n`` blocks of ``C`` steps (default: the longest power of two, from 8 to
    32, that leaves each level-1 op :data:`LEVEL1_ENTRIES` entries or more: per-op overhead
    below, cache-set conflicts of power-of-two strides above). Level 1 runs the
    recurrence inside every block at once (C sequential steps over ``[B, n, *S]``) and takes the
    running product of ``a`` inside each block (without autograd: a loop of multiplies into a
    preallocated buffer, see :func:`_blocked_scan_inplace`); level 2 finds the state
    entering each block by recursive doubling over the n block summaries (:func:`associative_scan`
    on ``[B, n, *S]``); a final elementwise correction adds each block's incoming state. O(T)
    work in about ``C + 2 log2(n)`` sequential ops, where recursive doubling over all of T does
    O(T log T): the faster choice on a CPU once the state has a few dozen entries. No division,
    so exact for ``a`` of any magnitude. ``a`` must have ``b``'s shape. With ``scratch`` (and no
    autograd) ``a`` and ``b`` are the caller's temporaries: the running products and the states
    are written over them (no further buffer of their size). ``reverse`` runs time backwards:
    ``h_t = a_t ⊙ h_{t+1} + b_t`` from ``h_T = initial_state`` (the adjoint of a forward scan;
    without autograd in place, with it by flipping).
    """
    track = needs_grad(a, b, initial_state)
    if reverse and track:
        return blocked_scan(a.flip(1), b.flip(1), initial_state, block).flip(1)
    B, T = b.shape[:2]
    C = block or min(32, max(8, 2 ** int(math.log2(max(1, b.numel() / LEVEL1_ENTRIES)))))
    n = -(-T // C)
    pad = n * C - T
    if pad:  # padded steps keep the state: a = 1, b = 0
        a = torch.cat([a, a.new_ones((B, pad) + a.shape[2:])], dim=1)
        b = torch.cat([b, b.new_zeros((B, pad) + b.shape[2:])], dim=1)
    a = a.reshape((B, n, C) + a.shape[2:])
    b = b.reshape((B, n, C) + b.shape[2:])
    if not track:
        return _blocked_scan_inplace(a, b, initial_state, scratch and not pad, reverse)[:, :T]
    prods = a.cumprod(2)                                  # a_{block start..j}: [B, n, C, *S]
    h = b[:, :, 0]
    local = [h]
    for j in range(1, C):                                 # level 1: inside every block
        h = torch.addcmul(b[:, :, j], a[:, :, j], h)
        local.append(h)
    local = torch.stack(local, dim=2)                     # [B, n, C, *S], from a zero state
    ends = _level2(prods[:, :, -1], local[:, :, -1], initial_state)
    start = torch.zeros_like(ends[:, :1]) if initial_state is None else initial_state[:, None]
    incoming = torch.cat([start, ends[:, :-1]], dim=1).unsqueeze(2)            # [B, n, 1, *S]
    h = torch.addcmul(local, prods, incoming)
    return h.reshape((B, n * C) + h.shape[3:])[:, :T]


def _level2(a: Tensor, b: Tensor, initial_state: Tensor | None) -> Tensor:
    """The states at the ends of the blocks of :func:`blocked_scan` from their summaries
    ``a, b [B, n, *S]``: recursive doubling (``log2 n`` rounds over all n summaries), or from
    :data:`LEVEL1_ENTRIES` summary entries on a blocked scan of them (three levels or more):
    measured without autograd, doubling wins up to 32k entries (0.16 against 0.20 ms for
    ``[1, 128, 256]``), the blocked scan from 64k (0.30 against 0.33 ms for ``[1, 256, 256]``,
    0.59 against 1.94 ms for ``[1, 256, 1536]``)."""
    if b.numel() >= LEVEL1_ENTRIES and b.shape[1] > 32:
        return blocked_scan(a, b, initial_state)
    return associative_scan(a, b, initial_state)


def _blocked_scan_inplace(a: Tensor, b: Tensor, initial_state: Tensor | None,
                          scratch: bool = False, reverse: bool = False) -> Tensor:
    """:func:`blocked_scan` without autograd, on ``a, b [B, n, C, *S]``: the local states and the
    running products of ``a`` are computed step by step in place over copies of ``b`` and ``a``
    (no ``stack`` copy, and no ``cumprod`` along a strided dim, which is several times slower
    than the equivalent loop of ``C`` multiplies), and the incoming states are added in place.
    With ``scratch`` the two buffers are ``b`` and ``a`` themselves. With ``reverse`` the steps
    of a block run from its end, and the blocks from the last (only the ``[B, n, *S]`` block
    summaries are flipped)."""
    B, n, C = b.shape[:3]
    first, steps = (C - 1, range(C - 2, -1, -1)) if reverse else (0, range(1, C))
    if scratch and b.is_contiguous() and a.is_contiguous():
        local, prods = b, a
    else:
        local = b.clone(memory_format=torch.contiguous_format)
        prods = a.clone(memory_format=torch.contiguous_format)
    # in place, step j's own slot read first (b_j, a_j) and then overwritten: the method forms
    # cost about 3 µs less per op than out= into a strided slice (and the two copies above
    # less than that over the C - 1 steps: 0.78 against 0.85 ms for [1, 2048, 256])
    for j in steps:                                       # level 1: inside every block
        done = j + 1 if reverse else j - 1                # the step already computed
        local[:, :, j].addcmul_(prods[:, :, j], local[:, :, done])
        prods[:, :, j].mul_(prods[:, :, done])
    last = C - 1 - first                                  # a block's summary: its last step
    if reverse:                                           # level 2 over the flipped summaries
        ends = _level2(prods[:, :, last].flip(1), local[:, :, last].flip(1),
                       initial_state).flip(1)
        local[:, :-1].addcmul_(prods[:, :-1], ends[:, 1:].unsqueeze(2))
        if initial_state is not None:
            local[:, -1:].addcmul_(prods[:, -1:], initial_state[:, None, None])
    else:                                                 # level 2
        ends = _level2(prods[:, :, last], local[:, :, last], initial_state)
        local[:, 1:].addcmul_(prods[:, 1:], ends[:, :-1].unsqueeze(2))
        if initial_state is not None:
            local[:, :1].addcmul_(prods[:, :1], initial_state[:, None, None])
    return local.reshape((B, n * C) + local.shape[3:])


def _prepare(a: Tensor, b: Tensor, initial_state: Tensor | None):
    if a.ndim != b.ndim:
        raise ValueError(f"scan: a {tuple(a.shape)} and b {tuple(b.shape)} need the same rank")
    torch.broadcast_shapes(a.shape, b.shape)  # raises if not broadcastable
    a = a.expand(*a.shape[:1], b.shape[1], *a.shape[2:])  # time must not broadcast
    dtype = compute_dtype(a, b, initial_state)
    return a.to(dtype), b.to(dtype), cast(initial_state, dtype), output_dtype(a, b)


@empty_time('scan')
def scan(a: Tensor, b: Tensor, initial_state: Tensor | None = None,
         output_final_state: bool = False, cu_seqlens: Tensor | None = None):
    """Parallel elementwise linear recurrence ``h_t = a_t ⊙ h_{t-1} + b_t``: recursive doubling
    for small states, :func:`blocked_scan` for larger ones.

    Args:
        a: multipliers ``[B, T, *S]`` (dims may be 1 except time), real or complex.
        b: inputs ``[B, T, *S]``.
        initial_state: ``[B, *S]`` (``[N, *S]`` with ``cu_seqlens``); gradients flow into it.
        output_final_state: also return ``h_T``.
        cu_seqlens: ``[N + 1]`` cumulative lengths of sequences packed along T (batch 1).
    Returns:
        ``(h [B, T, *S], final [B, *S] or None)``.
    """
    if cu_seqlens is not None:
        a = a.expand(*a.shape[:1], b.shape[1], *a.shape[2:])
        return varlen_call(scan, cu_seqlens, {"a": a, "b": b}, {"a": 1.0},
                           initial_state=initial_state, output_final_state=output_final_state)
    a, b, h0, out_dtype = _prepare(a, b, initial_state)
    # tiny states: recursive doubling (fewest ops); otherwise two levels (O(T) work), measured
    # faster from 32 state entries on (T = 512 .. 8192)
    if b[0, 0].numel() < 32 or b.shape[1] < 64:
        h = associative_scan(a, b, h0)
    elif needs_grad(a, b, h0):
        h = _Scan.apply(a, b, h0)
    else:
        h = blocked_scan(a.expand_as(b), b, h0)
    # (one tensor even where the blocked scan padded time: a copy only then, for a batch)
    return (h.to(out_dtype).contiguous(),
            h[:, -1] if output_final_state else None)


class _Scan(torch.autograd.Function):
    """:func:`blocked_scan` with a hand-written backward (autograd through its step loop costs
    several times its forward). The adjoint of ``h_t = a_t ⊙ h_{t-1} + b_t`` is
    ``Λ_t = dh_t + a*_{t+1} ⊙ Λ_{t+1}`` (``*``: complex conjugate, PyTorch's convention); the
    backward scans ``μ_t = a*_t ⊙ Λ_t``, whose multiplier is ``a*_t`` itself:

        μ_t = a*_t ⊙ μ_{t+1} + a*_t ⊙ dh_t,     μ_T = 0

    (one reverse :func:`blocked_scan`), then ``db_t = Λ_t = μ_{t+1} + dh_t``,
    ``da_t = Λ_t ⊙ h*_{t-1}`` (summed over a's broadcast dims; ``h_{-1}`` the initial state,
    whose gradient is ``μ_0``). The forward runs the in-place scan; the states it returns are
    saved (they are the output)."""

    @staticmethod
    def forward(ctx, a, b, h0):
        h = blocked_scan(a.expand_as(b), b, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        a_adj = a.expand_as(h).conj()
        # the scan's scratch buffer: a copy, never a itself (the caller's graph may need it)
        mu = blocked_scan(a_adj.clone(memory_format=torch.contiguous_format), dh * a_adj, None,
                          scratch=True, reverse=True)
        lam = dh.clone()
        lam[:, :-1] += mu[:, 1:]                                          # Λ_t = dh_t + μ_{t+1}
        da = None
        if ctx.needs_input_grad[0]:
            da = torch.empty_like(lam)
            torch.mul(lam[:, 1:], h[:, :-1].conj(), out=da[:, 1:])
            if h0 is None:
                da[:, 0] = 0
            else:
                torch.mul(lam[:, 0], h0.conj(), out=da[:, 0])
            da = da.sum_to_size(a.shape)
        return da, lam, (mu[:, 0] if ctx.needs_input_grad[2] else None)


@empty_time('scan')
def scan_ref(a: Tensor, b: Tensor, initial_state: Tensor | None = None,
             output_final_state: bool = False, cu_seqlens: Tensor | None = None):
    """Sequential reference of :func:`scan` (same arguments): a plain loop over time."""
    if cu_seqlens is not None:
        a = a.expand(*a.shape[:1], b.shape[1], *a.shape[2:])
        return varlen_call(scan_ref, cu_seqlens, {"a": a, "b": b}, {"a": 1.0},
                           initial_state=initial_state, output_final_state=output_final_state)
    a, b, h, out_dtype = _prepare(a, b, initial_state)
    if h is None:
        h = torch.zeros_like(b[:, 0])
    hs = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1).to(out_dtype), (h if output_final_state else None)
