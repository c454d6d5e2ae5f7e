"""Complex per-key-dim decay (GateLoop), lowered onto the real ``linear`` core.

    S_t = diag(a_t) S_{t-1} + k_t v_tᵀ,   a_t = exp(log_magnitude_t) · e^{i·phase_t},
    o_t = scale · Re(S_tᵀ q_t)

Shapes: ``q, k [B, T, H, K]`` (real or complex), ``v [B, T, H, V]`` real,
``log_magnitude, phase [B, T, H, K]`` real, complex state ``S [B, H, K, V]``.

Lowering (a data-dependent rotary): with the cumulative angle ``Φ_t = Σ_{r<=t} phase_r``,
``Q_t = q_t e^{iΦ_t}`` and ``K_s = k_s e^{-iΦ_s}``, the pair term ``Re(Q_t K_s)`` equals the real
dot product ``[Re Q_t, -Im Q_t] · [Re K_s, Im K_s]``. So the output is the real ``linear`` core on
``2K`` key dims with log decay ``[log_magnitude, log_magnitude]``. Its state is
``S' = [Re S̃; Im S̃]`` with ``S̃_t = e^{-iΦ_t} S_t``, which maps complex initial/final states.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

from ._chunking import (LOG2E, compute_dtype, default_scale, from_chunks, needs_grad,
                        output_dtype, pad_time, segment_length, strict_last_step_apart,
                        to_chunks, to_chunks_scaled, within_factor_limit)
from ._varlen import varlen_call
from .linear import (_chunked_per_key, _expand_heads, _rows_decayed_nograd, linear,
                     linear_ref)

Tensor = torch.Tensor


def linear_complex_ref(q: Tensor, k: Tensor, v: Tensor, log_magnitude: Tensor, phase: Tensor,
                       scale: float | None = None, initial_state: Tensor | None = None,
                       output_final_state: bool = False, cu_seqlens: Tensor | None = None):
    """Direct complex recurrence (the sequential :func:`linear_ref` on complex numbers)."""
    o, S = linear_ref(q, k, v, torch.complex(log_magnitude, phase), scale=scale,
                      initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu_seqlens)
    return o.real.to(_real_dtype(q, k, v)), S


def linear_complex(q: Tensor, k: Tensor, v: Tensor, log_magnitude: Tensor, phase: Tensor,
                   scale: float | None = None, initial_state: Tensor | None = None,
                   output_final_state: bool = False, cu_seqlens: Tensor | None = None,
                   chunk_size: int = 64, inner=None):
    """Linear attention with a complex per-key-dim decay, via the real chunked :func:`linear`
    (or ``inner``, any function with :func:`linear`'s signature but ``chunk_size``: a kernel).

    Args:
        q, k: ``[B, T, H, K]`` real or complex; v: ``[B, T, H, V]`` real.
        log_magnitude: ``[B, T, H, K]``, log |a_t| (<= 0 for a contraction).
        phase: ``[B, T, H, K]``, arg a_t in radians.
        scale: defaults to ``K ** -0.5`` (K the complex key size).
        initial_state: complex ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``).
        output_final_state: also return the complex ``S_T`` (complex64).
        cu_seqlens: ``[N + 1]``, sequences packed along T with batch 1 (Φ restarts per sequence).
    Returns:
        ``(o [B, T, H, V] real, final state [B, H, K, V] complex or None)``.
    """
    if cu_seqlens is not None:
        return varlen_call(linear_complex, cu_seqlens,
                           dict(q=q, k=k, v=v, log_magnitude=log_magnitude, phase=phase),
                           scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, chunk_size=chunk_size,
                           inner=inner)
    K = q.shape[-1]
    real = compute_dtype(q.real, k.real, v, log_magnitude, phase)
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    if inner is None and not q.is_complex() and not k.is_complex() and not needs_grad(
            q, k, v, log_magnitude, phase, initial_state):
        o, S = _chunked_nograd(*(x.to(real) for x in (q, k, v, log_magnitude, phase)),
                               initial_state, chunk_size, default_scale(scale, K), cplx)
        return o.to(_real_dtype(q, k, v)), (S if output_final_state else None)
    angle = _cumulative_angle(phase, real)                                   # Φ_t [B, T, H, K]
    cos = torch.cos(angle)
    nsin = torch.sin(angle).neg_()                  # -sin Φ_t (sin's backward reads Φ, not it)
    q2, k2 = _rotate(q, cos, nsin, real, 1.0), _rotate(k, cos, nsin, real, -1.0)  # [B, T, H, 2K]
    rot = torch.complex(cos[:, -1], -nsin[:, -1]).to(cplx)                    # e^{iΦ_T}
    del angle, cos, nsin    # (without autograd: not held while the core runs)
    g2 = torch.cat([log_magnitude, log_magnitude], dim=-1).to(real)        # [B, T, H, 2K]
    S0 = None
    if initial_state is not None:
        S0 = initial_state.to(cplx)
        S0 = torch.cat([S0.real, S0.imag], dim=-2)                         # [B, H, 2K, V]
    scale = default_scale(scale, K)
    if needs_grad(phase, log_magnitude) and (inner is None or _takes_strict(inner)):
        o, S = _strict_with_own_writes(q, k, v.to(real), q2, k2, g2, S0, rot, chunk_size, scale,
                                       inner)
        return o.to(_real_dtype(q, k, v)), (S if output_final_state else None)
    if inner is None:
        inner = functools.partial(linear, chunk_size=chunk_size)
    o, S = inner(q2, k2, v.to(real), g2, scale=scale, initial_state=S0,
                 output_final_state=output_final_state)
    if S is not None:
        # S_T = e^{iΦ_T} (S'_re + i S'_im): [B, H, 2K, V] -> [B, H, K, V] complex
        S = torch.complex(S[..., :K, :], S[..., K:, :]) * rot[..., None]
    return o.to(_real_dtype(q, k, v)), S


def _chunked_nograd(q, k, v, log_magnitude, phase, initial_state, chunk, scale, cplx):
    """The lowered form without autograd, in the chunk layout from the start: the same real
    ``2K``-key per-key form as :func:`linear` runs on ``[Re Q, -Im Q]``, ``[Re K, Im K]`` and
    ``[log_magnitude, log_magnitude]``, with every ``[B, T, H, K]`` pass that the generic
    lowering makes twice (or in another layout) made once:

    * the angle ``Φ`` is summed chunk by chunk in float64 (a cumulative sum along each chunk,
      then one over the chunk totals: several times faster than one along all of T, and as
      exact), reduced to ``[-π, π]`` and cast in one pass, and ``cos Φ``, ``-sin Φ`` are
      taken in the chunk layout;
    * the magnitude's decay factors ``e^{±G}`` are formed on K keys, not on the 2K of the
      duplicated log decay; ``q_in`` (``k_back``) of the real form is ``q e^{G}``
      (``k e^{-G}``) written once into the chunk layout, then its two halves, times
      ``cos Φ`` and ``-sin Φ``, into one ``[.., C, 2K]`` buffer.

    q, k real ``[B, T, H|Hq, K]``, v ``[B, T, H, V]``, log_magnitude and phase ``[B, T, H, K]``
    (all in the compute dtype), initial_state complex ``[B, H, K, V]`` or None. Time runs in
    segments of whole chunks (:func:`segment_length`) carrying the real state and the angle at
    the segment's end. A segment whose accumulated log magnitude leaves the factor
    limit runs the generic exact per-key form on its rotated operands.
    Returns ``(o [B, T, H, V], complex S_T [B, H, K, V])``."""
    q, k, v = _expand_heads(q, k, v)
    B, T, H, K = q.shape
    S = None
    if initial_state is not None:
        S0 = initial_state.to(cplx)
        S = torch.cat([S0.real, S0.imag], dim=-2) * scale     # the scale rides on v and S
    phi = q.new_zeros(B, H, 1, K, dtype=torch.float64)         # Φ entering the segment
    length = segment_length(chunk, B * H)
    outs = []
    for seg in zip(*(x.split(length, dim=1) for x in (q, k, v, log_magnitude, phase))):
        o, S, phi = _segment_nograd(*seg, S, phi, chunk, scale)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    S = S / scale
    rot = torch.polar(torch.ones_like(phi[:, :, 0]), phi[:, :, 0]).to(cplx)    # e^{iΦ_T}
    return o, torch.complex(S[..., :K, :], S[..., K:, :]) * rot[..., None]


def _segment_nograd(q, k, v, g, phase, S, phi, chunk, scale):
    """One segment of :func:`_chunked_nograd`: ``(o, the real state S' (times scale), Φ)``
    at its end, from those entering it (Φ float64 ``[B, H, 1, K]``, in ``[-π, π]``)."""
    B, T, H, K = q.shape
    # Φ in the chunk layout: float64 sums within each chunk, then the chunk totals
    Phi = to_chunks_scaled(phase, chunk, phase.new_ones((), dtype=torch.float64)).cumsum_(3)
    totals = Phi[..., -1, :].clone()                                  # [B, H, n, K]
    entering = _wrap(totals.cumsum(2).sub_(totals).add_(phi))      # Φ before each chunk
    phi_end = _wrap(entering[:, :, -1:] + totals[:, :, -1:])
    n = Phi.shape[2]
    Phi = _wrap(Phi.add_(entering[..., None, :]), out=q.new_empty(Phi.shape))  # (to q's dtype)
    cos, nsin = torch.cos(Phi), torch.sin(Phi).neg_()               # [B, H, n, C, K]
    del Phi
    vc = to_chunks_scaled(v, chunk, v.new_tensor(scale))                       # [B, H, n, C, V]
    base2 = g.dtype == torch.float32                     # e^G = 2^{G log2 e}: one exp2 pass
    G = (to_chunks_scaled(g, chunk, g.new_tensor(LOG2E)) if base2 else to_chunks(g, chunk))
    G = G.cumsum_(3) if base2 else G.cumsum(3)           # log magnitude chunk start -> i
    if not within_factor_limit(G, LOG2E if base2 else 1.0):
        # the exact per-key form on the rotated operands of this segment
        cos, nsin = from_chunks(cos, T), from_chunks(nsin, T)
        q2, k2 = _rotate(q, cos, nsin, q.dtype, 1.0), _rotate(k, cos, nsin, k.dtype, -1.0)
        o, S = _chunked_per_key(q2, k2, v * scale, torch.cat([g, g], dim=-1), S, chunk)
        return o, S, phi_end
    e_G = G.exp2_() if base2 else G.exp_()

    def rows(x, decay):                     # [x e^{±G} cos Φ, -x e^{±G} sin Φ]: [B, H, n, C, 2K]
        x = to_chunks_scaled(x, chunk, decay)
        out = x.new_empty(*x.shape[:-1], 2 * K)
        torch.mul(x, cos, out=out[..., :K])
        torch.mul(x, nsin, out=out[..., K:])
        return out

    q_in, k_back = rows(q, e_G), rows(k, torch.reciprocal(e_G))
    chunk_decay = e_G[..., -1, None, :].expand(B, H, n, 2, K).reshape(B, H, n, 2 * K, 1)
    o, S = _rows_decayed_nograd(q_in, k_back, vc, chunk_decay, S)
    return from_chunks(o, T), S, phi_end


def _wrap(angle: Tensor, out: Tensor | None = None) -> Tensor:
    """``angle - 2π·round(angle / 2π)``, into ``[-π, π]`` (~4x cheaper than torch.remainder;
    differentiable), or written to ``out`` without autograd (e.g. a float32 buffer: the
    rounding to it fused into the last pass)."""
    turns = (angle * (1 / (2 * math.pi))).round_()
    return torch.add(angle, turns, alpha=-2 * math.pi, out=out)


def _cumulative_angle(phase: Tensor, dtype: torch.dtype, chunk: int = 64) -> Tensor:
    """``Φ_t = Σ_{r<=t} phase_r`` along dim 1, reduced to [-π, π], in ``dtype``: summed in
    float64 (fp32 cumulative sums of angles lose absolute precision), then cos and sin may be
    taken in the working dtype (an absolute error of ~1 ulp of π). The float64 temporaries
    live only here. The sum runs within blocks of ``chunk`` steps, then over the block totals
    (a cumulative sum along all of a long dim 1 runs several times slower)."""
    B, T = phase.shape[:2]
    x = pad_time(phase, chunk)
    local = x.view(B, -1, chunk, *x.shape[2:]).cumsum(2, dtype=torch.float64)  # [B, n, C, ..]
    totals = local[:, :, -1]
    entering = _wrap(totals.cumsum(1) - totals)                    # Φ before each block
    return _wrap((local + entering[:, :, None]).flatten(1, 2)[:, :T]).to(dtype)


def _strict_with_own_writes(q, k, v, q2, k2, g2, S0, rot, chunk, scale, inner=None):
    """The lowered form with each step's own write taken out of the rotation, for gradients.

    A step's own write reaches its output as ``Re(q_t·k_t) v_t`` and the final state as
    ``k_T v_Tᵀ``, with neither decay nor rotation; through the lowered form they would carry
    ``e^{±iΦ}`` (and ``e^{±G}``) factors whose derivatives cancel to O(1), while the gradient
    of a strong decay's phase or magnitude is of order ``e^{g}`` (3e-4 relative RMS at
    -8/step). So the strict lowered form runs through :func:`strict_last_step_apart` and
    the own writes are added directly, the last one after the rotation back to the complex
    state. ``inner`` (a kernel taking ``strict``, or None: the torch per-key form) runs the
    strict form wherever a segment has more than one step.
    """
    if inner is None:
        q2, k2, v = _expand_heads(q2, k2, v)
    q, k, _ = _expand_heads(q, k, v)
    _, _, H, K = q.shape

    def strict_form(q2, k2, v, g2, S, chunk, strict):
        if inner is not None and q2.shape[1] > 1:
            return inner(q2, k2, v, g2, scale=scale, initial_state=S, output_final_state=True,
                         strict=strict)
        return _chunked_per_key(*_expand_heads(q2, k2, v), g2, S, chunk, scale, strict)

    o, S = strict_last_step_apart(strict_form, (q2, k2, v, g2), 1, S0, chunk, H, (True,))
    # back to the complex state, then the last write k_T v_Tᵀ outside the rotation
    write = k[:, -1, :, :, None].to(rot.dtype) * v[:, -1, :, None, :]
    S = torch.complex(S[..., :K, :], S[..., K:, :]) * rot[..., None] + write
    own = (q * k).sum(-1)                                            # [B, T, H]
    own = own.real if own.is_complex() else own
    return o.addcmul_((scale * own.to(v.dtype))[..., None], v), S    # + Re(q_t·k_t) v_t


def _takes_strict(fn) -> bool:
    """Whether ``fn`` (an ``inner`` of :func:`linear_complex`) has a ``strict`` parameter."""
    try:
        return "strict" in inspect.signature(fn).parameters
    except (TypeError, ValueError):     # no signature to read (some builtins, C extensions)
        return False


def _rotate(x: Tensor, cos: Tensor, nsin: Tensor, dtype: torch.dtype, sign: float) -> Tensor:
    """``x e^{i·sign·Φ}`` as the real halves ``[Re, -sign·Im]`` on the last dim (``[.., 2K]``):
    ``[Re Q, -Im Q]`` for q (sign +1), ``[Re K, Im K]`` for k (sign -1, the conjugate rotation),
    in real arithmetic, from ``cos Φ`` and ``nsin = -sin Φ``. For a real x both are
    ``[x cos Φ, -x sin Φ]``."""
    if x.is_complex():
        xr, xi = x.real.to(dtype), x.imag.to(dtype)
        re = xr * cos + sign * xi * nsin
        im = xi * cos - sign * xr * nsin
        return torch.cat([re, -sign * im], dim=-1)
    x = x.to(dtype)
    if needs_grad(x, cos, nsin):
        return torch.cat([x * cos, x * nsin], dim=-1)
    K = x.shape[-1]
    # (broadcast: q/k heads shared by value heads meet the angle's per-value-head rows)
    out = x.new_empty(*torch.broadcast_shapes(x.shape, cos.shape)[:-1], 2 * K)
    torch.mul(x, cos, out=out[..., :K])
    torch.mul(x, nsin, out=out[..., K:])
    return out


def _real_dtype(*tensors: Tensor) -> torch.dtype:
    return output_dtype(*(t.real if t.is_complex() else t for t in tensors))
