"""``attention``: causal softmax attention with GQA/MQA, sliding window, RoPE and soft-capping.

    o_i = Σ_j softmax_j(cap(scale · q_i·k_j) + mask_ij) v_j,
    mask_ij = 0 if i - window < j <= i else -inf,      cap(x) = c · tanh(x / c)

Shapes (fla layout): ``q [B, T, H, K]``, ``k [B, T, Hkv, K]``, ``v [B, T, Hkv, V]`` with
``H % Hkv == 0``: query head h reads key/value head ``h // (H / Hkv)``. ``window`` counts keys
including the query's own. With ``rope_theta`` q and k are rotated first (half-rotation /
``rotate_half`` convention of Llama in ``transformers``; positions restart per packed sequence).

Strategy: with every earlier key visible and no soft cap, torch's fused
``scaled_dot_product_attention`` (causal; O(T) memory on a CPU, forward and backward);
otherwise blocks of queries, each against only the keys it can see (O(T · block) memory, with
each block recomputed in the backward pass, :class:`_BlockAttention`); with a sliding window
shorter than the sequence, groups of blocks against their key bands in single batched matmuls
(:func:`_banded`).
:func:`attention_ref` loops over query positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._chunking import (checkpointed, compute_dtype, default_scale, empty_time, needs_grad,
                        output_dtype)
from ._varlen import varlen_call

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------

def rope_angles(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin ``[..., T, head_dim]`` at ``positions [..., T]`` for the half-rotation
    convention: frequency ``i`` (of ``head_dim / 2``) is ``theta ** (-2i / head_dim)``,
    repeated for both halves."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype)
                         / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq              # [..., T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)                   # [..., T, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, theta: float, positions: Tensor | None = None) -> Tensor:
    """Rotate ``x [B, T, H, D]`` at ``positions [T]`` (default ``0..T-1``), or ``[B, T]`` (a
    position per row, sequences continued from different lengths): ``x cos + rotate_half(x)
    sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``."""
    T, D = x.shape[1], x.shape[-1]
    if positions is None:
        positions = torch.arange(T, device=x.device)
    cos, sin = rope_angles(positions, D, theta, x.dtype)
    cos, sin = cos[..., None, :], sin[..., None, :]      # [(B,) T, 1, D] against [B, T, H, D]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _prepare(q, k, v, window, scale, rope_theta):
    B, T, H, K = q.shape
    Hkv = k.shape[2]
    if H % Hkv:
        raise ValueError(f"attention: {H} query heads are not a multiple of {Hkv} kv heads")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")
    dtype = compute_dtype(q, k, v)
    out_dtype = output_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if rope_theta is not None:
        q, k = apply_rope(q, rope_theta), apply_rope(k, rope_theta)
    # group query heads by the kv head they read: [B, T, H, K] -> [B, Hkv, G, T, K]
    qg = q.reshape(B, T, Hkv, H // Hkv, K).permute(0, 2, 3, 1, 4)
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)                  # [B, Hkv, T, K|V]
    return qg, kh, vh, out_dtype, default_scale(scale, K)


def _finish(o: Tensor, out_dtype) -> Tensor:
    """[B, Hkv, G, T, V] -> [B, T, H, V]."""
    B, Hkv, G, T, V = o.shape
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, V).to(out_dtype)


def _logits(q: Tensor, k: Tensor, scale: float, softcap: float | None) -> Tensor:
    """Scaled (and soft-capped) scores ``[B, Hkv, G, Tq, Tk]`` of ``q [B, Hkv, G, Tq, K]`` against
    ``k [B, Hkv, Tk, K]``."""
    return _cap((q @ k[:, :, None].mT) * scale, softcap)


def _cap(s: Tensor, softcap: float | None) -> Tensor:
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def _first_visible(i: int, window: int | None) -> int:
    """Index of the oldest key query ``i`` sees."""
    return 0 if window is None else max(0, i - window + 1)


# --------------------------------------------------------------------------------------------
# reference and tiled forms
# --------------------------------------------------------------------------------------------

@empty_time(None)
def attention_ref(q: Tensor, k: Tensor, v: Tensor, window: int | None = None,
                  scale: float | None = None, softcap: float | None = None,
                  cu_seqlens: Tensor | None = None, rope_theta: float | None = None) -> Tensor:
    """Sequential reference of :func:`attention`: one softmax per query position."""
    if cu_seqlens is not None:
        return varlen_call(attention_ref, cu_seqlens, dict(q=q, k=k, v=v), window=window,
                           scale=scale, softcap=softcap, rope_theta=rope_theta)
    qg, kh, vh, out_dtype, scale = _prepare(q, k, v, window, scale, rope_theta)
    outs = []
    for i in range(qg.shape[3]):
        lo = _first_visible(i, window)
        p = torch.softmax(_logits(qg[:, :, :, i:i + 1], kh[:, :, lo:i + 1], scale, softcap), -1)
        outs.append(p @ vh[:, :, None, lo:i + 1])                  # [B, Hkv, G, 1, V]
    return _finish(torch.cat(outs, dim=3), out_dtype)


@empty_time(None)
def attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None,
              scale: float | None = None, softcap: float | None = None,
              cu_seqlens: Tensor | None = None, rope_theta: float | None = None,
              block_size: int = 64) -> Tensor:
    """Causal softmax attention, computed in blocks of ``block_size`` queries.

    Args:
        q: ``[B, T, H, K]``; k: ``[B, T, Hkv, K]``; v: ``[B, T, Hkv, V]``; ``H % Hkv == 0``.
        window: each query sees its last ``window`` keys, itself included (None: all).
        scale: defaults to ``K ** -0.5``.
        softcap: ``c`` for ``c · tanh(logits / c)`` (None: no capping).
        cu_seqlens: ``[N + 1]``, sequences packed along T with batch 1.
        rope_theta: RoPE base; None applies no rotation.
    Returns:
        ``o [B, T, H, V]``.
    """
    if cu_seqlens is not None:
        return varlen_call(attention, cu_seqlens, dict(q=q, k=k, v=v), window=window, scale=scale,
                           softcap=softcap, rope_theta=rope_theta, block_size=block_size)
    qg, kh, vh, out_dtype, scale = _prepare(q, k, v, window, scale, rope_theta)
    B, Hkv, G, T, K = qg.shape
    if softcap is None and (window is None or window >= T) and K == vh.shape[-1]:
        # every earlier key visible and no cap: torch's fused attention, on a CPU a blocked
        # online-softmax kernel with its own backward, O(T) memory in both (measured for MQA at
        # T = 2048: 1.19x faster forward, 1.12-1.2x forward + backward than the block loop)
        o = F.scaled_dot_product_attention(qg.reshape(B, Hkv * G, T, K), kh, vh, is_causal=True,
                                           scale=scale, enable_gqa=G > 1)   # [B, H, T, V]
        return o.transpose(1, 2).reshape(B, T, Hkv * G, -1).to(out_dtype)
    # the G query heads of a kv head side by side, scaled once: [B, Hkv, T, G, K], so that a block
    # of queries is one [Tq·G, K] matrix against the block's keys (no broadcast copies of k, v)
    qt = (qg * scale).transpose(2, 3).contiguous()
    kh, vh = kh.contiguous(), vh.contiguous()                     # [B, Hkv, T, K|V]
    if window is not None and window < T:
        o = _banded(qt, kh, vh, window, softcap, block_size)       # [B, Hkv, T, G, V]
        return o.permute(0, 2, 1, 3, 4).reshape(B, T, Hkv * G, -1).to(out_dtype)
    if needs_grad(qt, kh, vh):
        o = _BlockAttention.apply(qt, kh, vh, window, softcap, block_size)
    else:
        o, _ = _blocks_forward(qt, kh, vh, window, softcap, block_size)
    return o.permute(0, 2, 1, 3, 4).reshape(B, T, Hkv * G, -1).to(out_dtype)


def _blocks(T: int, block: int, window: int | None):
    """``(start, end, lo)`` of each query block: queries ``[start, end)`` see keys ``[lo, end)``."""
    return [(start, min(start + block, T), _first_visible(start, window))
            for start in range(0, T, block)]


def _block_scores(q, k, q_start, k_start, window, softcap):
    """Capped, masked scores ``[B, Hkv, Tq·G, Tk]`` of scaled queries from ``q_start``
    (``q [B, Hkv, Tq, G, K]``) against keys from ``k_start`` (``k [B, Hkv, Tk, K]``), and
    ``tanh`` of the capped logits (for the cap's derivative) or None.

    Only two column ranges can hold hidden keys: those after ``q_start`` (causality) and, with a
    window, the first ``Tq`` (too old for the later queries); the mask is built for them only."""
    B, Hkv, Tq, G, K = q.shape
    Tk = k.shape[2]
    s = q.reshape(B, Hkv, Tq * G, K) @ k.mT
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(s.div_(softcap))
        s = tanh * softcap
    s5 = s.view(B, Hkv, Tq, G, Tk)
    qi = torch.arange(q_start, q_start + Tq, device=q.device)[:, None, None]     # [Tq, 1, 1]
    future = max(0, q_start + 1 - k_start)              # first column some query cannot see yet
    kj = torch.arange(k_start + future, k_start + Tk, device=q.device)
    s5[..., future:].masked_fill_(kj > qi, float("-inf"))
    if window is not None:
        old = min(Tk, max(0, q_start + Tq - window - k_start))   # columns [0, old) may be too old
        kj = torch.arange(k_start, k_start + old, device=q.device)
        s5[..., :old].masked_fill_(qi - kj >= window, float("-inf"))
    return s, tanh


def _softmax_backward(p: Tensor, dp: Tensor) -> Tensor:
    """``p ⊙ (dp - Σ_j p_j dp_j)``, the gradient of the logits from that of the probabilities
    (written over ``dp``). The row sum comes from ``p`` and ``dp`` themselves (not from
    ``do·o``, equal in exact arithmetic): a row with one visible key then gets exactly zero, as
    autograd's softmax backward gives it."""
    return dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p)


def _blocks_forward(q, k, v, window, softcap, block, with_lse=False):
    """Every query block against the keys it can see: q ``[B, Hkv, T, G, K]`` (scaled), k/v
    ``[B, Hkv, T, K|V]`` -> ``(o [B, Hkv, T, G, V], logsumexp of each row's scores
    [B, Hkv, T, G] or None)``."""
    B, Hkv, T, G, _ = q.shape
    outs, lses = [], []
    for start, end, lo in _blocks(T, block, window):
        s, _ = _block_scores(q[:, :, start:end], k[:, :, lo:end], start, lo, window, softcap)
        if with_lse:
            lses.append(torch.logsumexp(s, dim=-1).view(B, Hkv, end - start, G))
        p = torch.softmax(s, dim=-1)
        outs.append((p @ v[:, :, lo:end]).view(B, Hkv, end - start, G, -1))
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if with_lse else None)


class _BlockAttention(torch.autograd.Function):
    """The query-block loop with a FlashAttention-style backward: the forward keeps only the
    output and each row's logsumexp ``L``; the backward recomputes each block's scores ``s``,
    ``p = exp(s - L)``, ``dp = do vᵀ``, and:

        dv += pᵀ do,    ds = p ⊙ (dp - Σ_j p_j dp_j) ⊙ cap',    dq = ds k,    dk += dsᵀ q

    (``cap' = 1 - tanh²`` with a soft cap). Five block matmuls where recomputing the forward
    under autograd takes six, and the gradients of k and v accumulate in place: slicing k and v
    per block under autograd writes each block's gradient into a zero-filled copy of the whole
    tensor (O(T²/block) traffic)."""

    @staticmethod
    def forward(ctx, q, k, v, window, softcap, block):
        o, lse = _blocks_forward(q, k, v, window, softcap, block, with_lse=True)
        ctx.save_for_backward(q, k, v, lse)
        ctx.options = (window, softcap, block)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, lse = ctx.saved_tensors
        window, softcap, block = ctx.options
        B, Hkv, T, G, K = q.shape
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for start, end, lo in _blocks(T, block, window):
            rows = (end - start) * G
            q_b = q[:, :, start:end].reshape(B, Hkv, rows, K)
            do_b = do[:, :, start:end].reshape(B, Hkv, rows, -1)
            s, tanh = _block_scores(q[:, :, start:end], k[:, :, lo:end], start, lo, window,
                                    softcap)
            p = s.sub_(lse[:, :, start:end].reshape(B, Hkv, rows, 1)).exp_()
            dv[:, :, lo:end] += p.mT @ do_b
            ds = _softmax_backward(p, do_b @ v[:, :, lo:end].mT)
            if tanh is not None:
                ds.mul_(1 - tanh.square_())
            dq[:, :, start:end] = (ds @ k[:, :, lo:end]).view(B, Hkv, end - start, G, K)
            dk[:, :, lo:end] += ds.mT @ q_b
        return dq, dk, dv, None, None, None

#: scores ``[.., blocks, block · G, band]`` of one group of query blocks in the banded form
#: (16 MB in fp32): bounds its memory for any window, length and head count
BAND_ELEMENTS = 1 << 22


def _banded(q, k, v, window, softcap, block):
    """Sliding-window attention with every query block of a group in one batched matmul.

    Query block b (queries ``[bC, bC + C)``) can only see the band of ``C + window - 1`` keys
    ``[bC - window + 1, bC + C)``. With ``window - 1`` zero keys in front, the bands are
    overlapping windows of one padded key tensor (``unfold``: views, no copies), and the
    visibility pattern inside a band is the same for every block (``r <= c <= r + window - 1``
    for query row r and band column c), except for the padding keys of the first blocks. So a
    group of blocks is one ``[C·G, K] @ [K, band]`` batched matmul, one softmax and one
    ``[C·G, band] @ [band, V]`` matmul: a few large ops where the block loop of
    :func:`attention` issues a dozen small ones per block. Groups hold at most
    :data:`BAND_ELEMENTS` scores (each recomputed in the backward pass), so memory is
    O(T · (window + C)) per head, as for the block loop.

    q ``[B, Hkv, T, G, K]`` (scaled), k/v ``[B, Hkv, T, K|V]`` -> ``[B, Hkv, T, G, V]``.
    """
    B, Hkv, T, G, K = q.shape
    C, P = block, window - 1
    n = -(-T // C)
    band = C + P
    q = F.pad(q, (0, 0, 0, 0, 0, n * C - T))                      # whole blocks
    k = F.pad(k, (0, 0, P, n * C - T))                            # P zero keys in front
    v = F.pad(v, (0, 0, P, n * C - T))
    r = torch.arange(C, device=q.device)[:, None]
    c = torch.arange(band, device=q.device)[None, :]
    key = torch.arange(n, device=q.device)[:, None, None] * C - P + c      # [n, 1, band]
    visible = (c >= r) & (c <= r + P) & (key >= 0)                          # [n, C, band]
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill_(~visible, float("-inf"))[:, :, None, :]       # [n, C, 1, band]
    per_group = max(1, BAND_ELEMENTS // (B * Hkv * C * G * band))
    outs = []
    for b0 in range(0, n, per_group):
        b1 = min(n, b0 + per_group)
        outs.append(checkpointed(_attend_band, q[:, :, b0 * C:b1 * C],
                                 k[:, :, b0 * C:b1 * C + P], v[:, :, b0 * C:b1 * C + P],
                                 bias[b0:b1], softcap))
    return torch.cat(outs, dim=2)[:, :, :T]


def _attend_band(q, k, v, bias, softcap):
    """One group of ``m`` query blocks: q ``[B, Hkv, m·C, G, K]``, k/v ``[B, Hkv, m·C + P, K|V]``,
    bias ``[m, C, 1, band]`` (0 or -inf) -> ``[B, Hkv, m·C, G, V]``."""
    B, Hkv, _, G, K = q.shape
    m, C, _, band = bias.shape
    kb = k.unfold(2, band, C)                                     # [B, Hkv, m, K, band]
    vb = v.unfold(2, band, C)                                     # [B, Hkv, m, V, band]
    s = _cap(q.reshape(B, Hkv, m, C * G, K) @ kb, softcap).view(B, Hkv, m, C, G, band)
    s = s + bias if needs_grad(s) else s.add_(bias)
    p = torch.softmax(s, dim=-1).view(B, Hkv, m, C * G, band)
    return (p @ vb.mT).view(B, Hkv, m * C, G, -1)


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, window: int | None = None,
                     scale: float | None = None, softcap: float | None = None) -> Tensor:
    """One decoding step: ``q [B, H, K]`` (the newest token, already rotated if RoPE is used —
    see :func:`apply_rope` with ``positions``) against ``k_cache [B, L, Hkv, K]`` and
    ``v_cache [B, L, Hkv, V]`` whose last entry is the newest token. Returns ``[B, H, V]``."""
    L = k_cache.shape[1]
    lo = _first_visible(L - 1, window)
    qg, kh, vh, out_dtype, scale = _prepare(q[:, None], k_cache[:, lo:], v_cache[:, lo:],
                                            window, scale, None)
    p = torch.softmax(_logits(qg, kh, scale, softcap), dim=-1)
    return _finish(p @ vh[:, :, None], out_dtype)[:, 0]
