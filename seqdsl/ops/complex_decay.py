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

from ._chunking import (LOG2E, compute_dtype, default_scale, empty_time, exp_fast,
                        from_chunks, grads_by_recomposition, needs_grad, output_dtype, pad_time,
                        segment_length, strict_last_step_apart, to_chunks, to_chunks_scaled,
                        within_factor_limit)
from ._varlen import varlen_call
from .linear import (_chunked_per_key, _expand_heads, _rows_decayed_nograd, chunked_form,
                     linear, linear_ref)

Tensor = torch.Tensor


@empty_time('complex')
def linear_complex_ref(q: Tensor, k: Tensor, v: Tensor, log_magnitude: Tensor, phase: Tensor,
                       scale: float | None = None, initial_state: Tensor | None = None,
                       output_final_state: bool = False, cu_seqlens: Tensor | None = None):
    """Direct complex recurrence (the sequential :func:`linear_ref` on complex numbers)."""
    real = compute_dtype(q.real, k.real, v, log_magnitude, phase)   # (no bf16 complex)
    o, S = linear_ref(q, k, v, torch.complex(log_magnitude.to(real), phase.to(real)), scale=scale,
                      initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu_seqlens)
    return o.real.to(_real_dtype(q, k, v)), S


@empty_time('complex')
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
    if inner is None and not q.is_complex() and not k.is_complex():
        out = _chunked_grad(*(x.to(real) for x in (q, k, v, log_magnitude, phase)),
                            initial_state, chunk_size, default_scale(scale, K), cplx)
        if out is not None:
            return out[0].to(_real_dtype(q, k, v)), (out[1] if output_final_state else None)
    angle = _cumulative_angle(phase, real)                                   # Φ_t [B, T, H, K]
    cos = torch.cos(angle)
    nsin = torch.sin(angle).neg_()                  # -sin Φ_t (sin's backward reads Φ, not it)
    q, k = _per_value_head(q, cos), _per_value_head(k, cos)
    q2, k2 = _rotate(q, cos, nsin, real, 1.0), _rotate(k, cos, nsin, real, -1.0)  # [B, T, H, 2K]
    rot = torch.complex(cos[:, -1], -nsin[:, -1]).to(cplx)                    # e^{iΦ_T}
    del angle, cos, nsin    # (without autograd: not held while the core runs)
    g2 = torch.cat([log_magnitude, log_magnitude], dim=-1).to(real)        # [B, T, H, 2K]
    S0 = _real_state(initial_state, cplx)                                  # [B, H, 2K, V]
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
        S = _complex_state(S, rot)
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
    S = _real_state(initial_state, cplx)
    if S is not None:
        S = S * scale                                          # the scale rides on v and S
    phi = q.new_zeros(B, H, 1, K, dtype=torch.float64)         # Φ entering the segment
    length = segment_length(chunk, B * H)
    outs = []
    for seg in zip(*(x.split(length, dim=1) for x in (q, k, v, log_magnitude, phase))):
        o, S, phi = _segment_nograd(*seg, S, phi, chunk, scale)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    S = S / scale
    rot = torch.polar(torch.ones_like(phi[:, :, 0]), phi[:, :, 0]).to(cplx)    # e^{iΦ_T}
    return o, _complex_state(S, rot)


def _segment_nograd(q, k, v, g, phase, S, phi, chunk, scale):
    """One segment of :func:`_chunked_nograd`: ``(o, the real state S' (times scale), Φ)``
    at its end, from those entering it (Φ float64 ``[B, H, 1, K]``, in ``[-π, π]``)."""
    B, T, H, K = q.shape
    cos, nsin, phi_end = _chunk_angle(phase, chunk, q.dtype, phi)  # [B, H, n, C, K]
    n = cos.shape[2]
    vc = to_chunks_scaled(v, chunk, v.new_tensor(scale))                       # [B, H, n, C, V]
    base2 = g.dtype == torch.float32                     # e^G = 2^{G log2 e}: one exp2 pass
    G = (to_chunks_scaled(g, chunk, g.new_tensor(LOG2E)) if base2 else to_chunks(g, chunk))
    G = G.cumsum_(3) if base2 else G.cumsum(3)           # log magnitude chunk start -> i
    if not within_factor_limit(G, LOG2E if base2 else 1.0):
        # the exact per-key form on the rotated operands of this segment
        cos, nsin = from_chunks(cos, T), from_chunks(nsin, T)
        q, k = _per_value_head(q, cos), _per_value_head(k, cos)
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


def _chunked_grad(q, k, v, log_magnitude, phase, initial_state, chunk, scale, cplx):
    """The lowered form under autograd, in the chunk layout from the start, or None when some
    chunk's accumulated log magnitude leaves the factor limit (then the generic lowering runs).

    Strict, with each step's own write added outside the rotation and the decay (see
    :func:`_strict_with_own_writes`): the rotated, decayed rows ``q_in``, ``k_back`` of the
    real ``2K`` form (the last step's key zeroed) come from :class:`_RotatedRows` (a
    hand-written backward: the autograd graph of the generic lowering holds some 40
    ``[B, T, H, 2K]``-sized ops), the chunk products from :func:`chunked_form`, in time
    segments of whole chunks. q, k real, all in the compute dtype. Returns
    ``(o [B, T, H, V], complex S_T [B, H, K, V])``."""
    q, k, v = _expand_heads(q, k, v)
    B, T, H, K = q.shape
    G = to_chunks(log_magnitude, chunk).cumsum(3)       # log magnitude chunk start -> i
    if not within_factor_limit(G):
        return None
    q_in, k_back = _RotatedRows.apply(q, k, G, phase, chunk, scale)      # [B, H, n, C, 2K]
    e_end = torch.exp(G[..., -1, :])                                     # [B, H, n, K]
    chunk_decay = torch.cat([e_end, e_end], dim=-1)[..., None]          # [B, H, n, 2K, 1]
    S = _real_state(initial_state, cplx)                                 # [B, H, 2K, V]
    per = segment_length(chunk, B * H) // chunk                          # chunks per segment
    outs = []
    for seg in zip(*(x.split(per, dim=2) for x in (q_in, k_back, to_chunks(v, chunk),
                                                   chunk_decay))):
        o, S = chunked_form(*seg, S, strict=True)
        outs.append(o)
    o = from_chunks(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2), T)
    # S' = e^{G_T} ⊙ S_{T-1} (the last key was zeroed): rotate back, add the last write
    phi_end = phase.to(torch.float64).sum(1)                             # Φ_T [B, H, K]
    rot = torch.complex(torch.cos(phi_end), torch.sin(phi_end)).to(cplx)
    S = _complex_state(S, rot) + k[:, -1, :, :, None].to(cplx) * v[:, -1, :, None, :]
    own = (q * k).sum(-1, keepdim=True) * scale                          # [B, T, H, 1]
    return o + own * v, S                                                # + Re(q_t·k_t) v_t


class _RotatedRows(torch.autograd.Function):
    """The rows of :func:`_chunked_grad`'s real ``2K`` form in the chunk layout, from
    ``q, k, phase [B, T, H, K]`` and the log magnitude accumulated from each chunk start
    ``G [B, H, n, C, K]``:

        q_in   = scale · q e^{G} [cos Φ, -sin Φ],    k_back = k e^{-G} [cos Φ, -sin Φ]

    with ``Φ`` the cumulative phase over all T (summed in float64 within each chunk, then over
    the chunk totals, reduced to ``[-π, π]``) and the last step's key zeroed. Backward, with
    ``(a, b)``, ``(c, d)`` the halves of ``∂q_in``, ``∂k_back`` and ``q̂ = scale q e^G``,
    ``k̂ = k e^{-G}``: ``X_q = a cos Φ - b sin Φ``, ``Y_q = -a sin Φ - b cos Φ`` (likewise
    ``X_k``, ``Y_k``), ``∂q = scale e^G X_q``, ``∂k = e^{-G} X_k``,
    ``∂G = q̂ ⊙ X_q - k̂ ⊙ X_k``, and ``∂phase`` the reverse cumulative sum over T (in float64)
    of ``∂Φ = q̂ ⊙ Y_q + k̂ ⊙ Y_k``. Under ``create_graph`` the rows are recomposed with
    differentiable ops and differentiated."""

    @staticmethod
    def forward(ctx, q, k, G, phase, chunk, scale):
        cos, nsin, _ = _chunk_angle(phase, chunk, q.dtype)              # [B, H, n, C, K]
        e_G = exp_fast(G)
        qd = to_chunks_scaled(q, chunk, e_G * scale)                     # q̂
        kd = to_chunks_scaled(k, chunk, torch.reciprocal(e_G))           # k̂
        T = q.shape[1]
        kd[:, :, (T - 1) // chunk, (T - 1) % chunk] = 0                  # the last key
        q_in, k_back = (torch.cat([x * cos, x * nsin], dim=-1) for x in (qd, kd))
        ctx.save_for_backward(q, k, G, phase, e_G, qd, kd, cos, nsin)
        ctx.chunk, ctx.scale = chunk, scale
        ctx.set_materialize_grads(False)
        return q_in, k_back

    @staticmethod
    def backward(ctx, dq_in, dk_back):
        q, k, G, phase, e_G, qd, kd, cos, nsin = ctx.saved_tensors
        if torch.is_grad_enabled():     # double backward: differentiate the plain composition
            return grads_by_recomposition(
                ctx, (q, k, G, phase),
                lambda *xs: _rotated_rows_composed(*xs, ctx.chunk, ctx.scale), (dq_in, dk_back),
                6)
        B, T, H, K = q.shape
        dG = torch.zeros_like(G)
        dphi = torch.zeros_like(G)
        dq = dk = None
        for x, dx, scale_, sign in ((qd, dq_in, ctx.scale, 1.0), (kd, dk_back, 1.0, -1.0)):
            if dx is None:
                continue
            a, b = dx[..., :K], dx[..., K:]
            X = torch.addcmul(a * cos, b, nsin)                          # a cos Φ - b sin Φ
            Y = torch.addcmul(a * nsin, b, cos, value=-1)                # -a sin Φ - b cos Φ
            dG.addcmul_(x, X, value=sign)
            dphi.addcmul_(x, Y)
            if sign > 0:
                dq = from_chunks(X.mul_(e_G).mul_(scale_), T)
            else:
                X[:, :, (T - 1) // ctx.chunk, (T - 1) % ctx.chunk] = 0    # (the last key)
                dk = from_chunks(X.div_(e_G), T)
        # ∂phase_r = Σ_{t >= r} ∂Φ_t: within each chunk, then the later chunks' totals
        rev = dphi.to(torch.float64).flip(3).cumsum(3).flip(3)           # [B, H, n, C, K]
        totals = rev[..., 0, :]
        later = totals.flip(2).cumsum(2).flip(2) - totals                # [B, H, n, K]
        dphase = from_chunks(rev.add_(later[..., None, :]), T).to(phase.dtype)
        return dq, dk, dG, dphase, None, None


def _rotated_rows_composed(q, k, G, phase, chunk, scale):
    """:class:`_RotatedRows`' forward as plain differentiable ops (for its double backward)."""
    T = q.shape[1]
    angle = to_chunks(_cumulative_angle(phase, q.dtype, chunk), chunk)
    cos, nsin = torch.cos(angle), -torch.sin(angle)
    keep = torch.ones(to_chunks(q[..., :1], chunk).shape[2:4], dtype=q.dtype)
    keep[(T - 1) // chunk, (T - 1) % chunk] = 0                          # the last key
    qd = to_chunks(q, chunk) * (torch.exp(G) * scale)
    kd = to_chunks(k, chunk) * torch.exp(-G) * keep[:, :, None]
    return [torch.cat([x * cos, x * nsin], dim=-1) for x in (qd, kd)]


def _real_state(initial_state: Tensor | None, cplx: torch.dtype) -> Tensor | None:
    """A complex state ``S [B, H, K, V]`` as the lowered form's real state ``[Re S; Im S]``
    ``[B, H, 2K, V]`` (``S̃_0 = S_0``: no rotation yet), or None."""
    if initial_state is None:
        return None
    S0 = initial_state.to(cplx)
    return torch.cat([S0.real, S0.imag], dim=-2)


def _complex_state(S: Tensor, rot: Tensor) -> Tensor:
    """The lowered form's real state ``S' = [Re S̃; Im S̃]`` ``[B, H, 2K, V]`` back to the
    complex ``S_T = e^{iΦ_T} S̃_T`` ``[B, H, K, V]``, with ``rot = e^{iΦ_T}`` ``[B, H, K]``."""
    K = S.shape[-2] // 2
    return torch.complex(S[..., :K, :], S[..., K:, :]) * rot[..., None]


def _chunk_angle(phase: Tensor, chunk: int, dtype: torch.dtype, phi: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(cos Φ, -sin Φ)`` in the chunk layout ``[B, H, n, C, K]`` and ``dtype``, and ``Φ`` at
    the end (float64 ``[B, H, 1, K]``, in ``[-π, π]``), with ``Φ_t = phi + Σ_{r<=t} phase_r``
    (``phi`` float64 ``[B, H, 1, K]``, or 0) summed in float64 within each chunk, then over the
    chunk totals (reduced to ``[-π, π]``). The cosine and sine are taken in float64 (``Φ`` within
    ``π`` plus one chunk's sum: exact range reduction), each rounded once into ``dtype`` on the
    way out, from ``-Φ`` (``cos(-Φ) = cos Φ``, ``sin(-Φ) = -sin Φ``: no pass to negate): 4
    passes where reducing ``Φ`` to ``[-π, π]`` first and taking them in ``dtype`` made 7
    (1.3x faster)."""
    Phi = to_chunks_scaled(phase, chunk, phase.new_ones((), dtype=torch.float64)).cumsum_(3)
    totals = Phi[..., -1, :].clone()                                  # [B, H, n, K]
    entering = totals.cumsum(2).sub_(totals)                          # Φ before each chunk
    entering = _wrap(entering if phi is None else entering.add_(phi))
    phi_end = _wrap(entering[:, :, -1:] + totals[:, :, -1:])
    neg = torch.sub(entering.neg_()[..., None, :], Phi, out=Phi)      # -Φ, in place
    cos, nsin = (torch.empty(Phi.shape, dtype=dtype, device=phase.device) for _ in range(2))
    return torch.cos(neg, out=cos), torch.sin(neg, out=nsin), phi_end


def _wrap(angle: Tensor) -> Tensor:
    """``angle - 2π·round(angle / 2π)``, into ``[-π, π]`` (~4x cheaper than torch.remainder;
    differentiable)."""
    turns = (angle * (1 / (2 * math.pi))).round_()
    return torch.add(angle, turns, alpha=-2 * math.pi)


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
    S = _complex_state(S, rot) + write
    own = (q * k).sum(-1)                                            # [B, T, H]
    own = own.real if own.is_complex() else own
    return o.addcmul_((scale * own.to(v.dtype))[..., None], v), S    # + Re(q_t·k_t) v_t


def _takes_strict(fn) -> bool:
    """Whether ``fn`` (an ``inner`` of :func:`linear_complex`) has a ``strict`` parameter."""
    try:
        return "strict" in inspect.signature(fn).parameters
    except (TypeError, ValueError):     # no signature to read (some builtins, C extensions)
        return False


def _per_value_head(x: Tensor, angle: Tensor) -> Tensor:
    """q or k ``[B, T, Hq, K]`` shared by groups of value heads, repeated to the angle's
    ``H`` heads (value head h reads q/k head ``h // (H / Hq)``) where ``1 < Hq < H``; one
    shared head (``Hq = 1``) broadcasts as it is."""
    Hq, H = x.shape[2], angle.shape[2]
    return x.repeat_interleave(H // Hq, dim=2) if 1 < Hq < H else x


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
