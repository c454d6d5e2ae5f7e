"""``delta``: the (gated) delta rule, and its multi-step (DeltaProduct) lowering.

    S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,      o_t = scale · S_tᵀ q_t

Shapes (fla layout): ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta [B, T, H]`` in (0, 1), or
(0, 2) to allow negative eigenvalues, ``log_decay g [B, T, H]`` or None (DeltaNet), state
``S [B, H, K, V]``. Equivalent form: ``S = e^g S;  S += β k (v - Sᵀk)ᵀ`` — one online gradient
step on ``½‖Sᵀk - v‖²``.

Parallel strategy: the chunked WY/UT form (DeltaNet paper; fla's ``naive_chunk_gated_delta_rule``).
Multi-step transitions (``steps`` Householder factors per token) lower onto the same core over an
interleaved sequence of length ``T · steps`` (:func:`delta_interleave`).
"""

from __future__ import annotations

import functools

import torch

from ._chunking import (FACTOR_LIMIT, cast, centred_decay_factors, compute_dtype,
                        decay_factors, decay_matrix, default_scale, empty_time, from_chunks,
                        grads_by_recomposition, needs_grad, output_dtype, over_segments,
                        segment_length, strict_last_step_apart, to_chunks, to_chunks_scaled)
from ._varlen import varlen_call

Tensor = torch.Tensor


def _prepare(q, k, v, beta, log_decay, initial_state, scale):
    dtype = compute_dtype(q, k, v, beta, log_decay, initial_state)
    out_dtype = output_dtype(q, k, v)
    q, k, v, beta, log_decay, initial_state = (
        cast(x, dtype) for x in (q, k, v, beta, log_decay, initial_state))
    if log_decay is None:
        log_decay = q.new_zeros(q.shape[:3])
    return q, k, v, beta, log_decay, initial_state, out_dtype, default_scale(scale, q.shape[-1])


@empty_time('kv')
def delta_ref(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None = None,
              scale: float | None = None, initial_state: Tensor | None = None,
              output_final_state: bool = False, cu_seqlens: Tensor | None = None):
    """Sequential reference of :func:`delta`: a loop over time on the ``[B, H, K, V]`` state."""
    if cu_seqlens is not None:
        return varlen_call(delta_ref, cu_seqlens,
                           dict(q=q, k=k, v=v, beta=beta, log_decay=log_decay), scale=scale,
                           initial_state=initial_state, output_final_state=output_final_state)
    q, k, v, beta, g, S, out_dtype, scale = _prepare(q, k, v, beta, log_decay, initial_state, scale)
    B, T, H, K = q.shape
    if S is None:
        S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None, None] * S
        error = v[:, t] - (S * k[:, t, :, :, None]).sum(-2)         # v_t - S_tᵀ k_t: [B, H, V]
        S = S + beta[:, t, :, None, None] * k[:, t, :, :, None] * error[:, :, None, :]
        outs.append((S * q[:, t, :, :, None]).sum(-2))              # S_tᵀ q_t: [B, H, V]
    o = torch.stack(outs, dim=1) * scale
    return o.to(out_dtype), (S if output_final_state else None)


@empty_time('kv')
def delta(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None = None,
          scale: float | None = None, initial_state: Tensor | None = None,
          output_final_state: bool = False, cu_seqlens: Tensor | None = None,
          chunk_size: int = 64):
    """Chunked (WY/UT) gated delta rule.

    Args:
        q, k: ``[B, T, H, K]`` (k usually L2-normalised); v: ``[B, T, H, V]``.
        beta: ``[B, T, H]`` in (0, 2).
        log_decay: ``[B, T, H]`` log of the scalar gate, or None.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``).
        output_final_state: also return ``S_T`` (fp32).
        cu_seqlens: ``[N + 1]``, sequences packed along T with batch 1.
        chunk_size: steps per chunk.
    Returns:
        ``(o [B, T, H, V], final state [B, H, K, V] or None)``.
    """
    if cu_seqlens is not None:
        return varlen_call(delta, cu_seqlens, dict(q=q, k=k, v=v, beta=beta, log_decay=log_decay),
                           scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, chunk_size=chunk_size)
    q, k, v, beta, g, S0, out_dtype, scale = _prepare(q, k, v, beta, log_decay, initial_state,
                                                      scale)
    if needs_grad(g):
        o, S = _with_own_writes(q, k, v, beta, g, S0, chunk_size, scale)
    else:
        o, S = over_segments(_delta_chunked, (q, k, v, beta, g), S0, chunk_size, q.shape[2],
                             scale)
    return o.to(out_dtype), (S if output_final_state else None)


def _with_own_writes(q, k, v, beta, g, S0, chunk, scale):
    """The chunked form with each step's own write, ``scale β_t (q_t·k_t) v_t`` in ``o_t`` and
    ``β_T k_T v_Tᵀ`` in ``S_T``, added outside the gate's factors, for a gate that needs a
    gradient: through the factored gate those terms carry two O(1) contributions to the gate's
    gradient that cancel, where the gradient of a strong gate is of order ``e^{g}`` (relative
    RMS 1e-4 at -8/step). The strict outputs are ``q_in S_prev + P u - P_ii β_i v_i``
    (:func:`_core_forward`), whose backward (:class:`_DeltaCore`) gives ``P_ii`` the gradient
    ``do_i·(u_i - β_i v_i)``, without the own write. The strict pass runs with the last β zeroed
    (:func:`strict_last_step_apart`): it returns ``S' = e^{g_T} S_{T-1}``, and the last step's
    erase and write are applied here: ``S_T = S' + β_T k_T (v_T - S'ᵀk_T)ᵀ``, and
    ``o_T`` loses ``scale β_T (q_T·k_T) S'ᵀk_T``."""
    H = q.shape[2]
    o, S = strict_last_step_apart(_delta_chunked, (q, k, v, beta, g), 3, S0, chunk, H,
                                  (scale, True))
    k_T, v_T, b_T = k[:, -1], v[:, -1], beta[:, -1, :, None]
    kS = torch.einsum("bhk,bhkv->bhv", k_T, S)                      # S'ᵀ k_T: [B, H, V]
    S = S + (b_T * k_T)[..., None] * (v_T - kS)[:, :, None]
    own = (scale * beta * (q * k).sum(-1))[..., None]               # [B, T, H, 1]
    o = o.addcmul(own, v)                    # + scale β_t (q_t·k_t) v_t (o: a view of _DeltaCore's)
    o[:, -1].addcmul_(own[:, -1], kS, value=-1)                     # the last erase
    return o, S


def _delta_chunked(q, k, v, beta, g, S0, chunk, scale=1.0, strict=False, rows=1):
    """WY/UT chunked form. Inside a chunk write the update as ``S_t = e^{g_t} S_{t-1} + k_t u_tᵀ``
    with ``u_t = β_t (v_t - e^{g_t} S_{t-1}ᵀ k_t)``. Unrolling from the state ``S_prev`` entering
    the chunk (``G_i`` = log decay accumulated from the chunk start through i):

        (I + A) u = β v - β e^G k S_prev,   A_ij = β_i e^{G_i - G_j} k_i·k_j  (j < i)
     => u = U - W S_prev,  with  (I + A) [U | W] = [β v | β e^G k]    (one triangular solve)
        o = (q ⊙ e^G) S_prev + (q kᵀ ⊙ e^{G_i - G_j})_{j<=i} u
        S_next = e^{G_C} S_prev + (k ⊙ e^{G_C - G})ᵀ u

    This function forms the decayed operands (``q ⊙ e^G``, the scores ``P``, the system ``A``,
    ``[β v | β e^G k]``, ``k ⊙ e^{G_C - G}`` and ``e^{G_C}``); :func:`_core` does the rest.
    When every ``|G| <= FACTOR_LIMIT`` the decay rides on the rows (:func:`_delta_factored`);
    when every chunk's ``G`` spans at most ``2 · FACTOR_LIMIT`` (gates down to about -0.9 per
    step over a chunk of 64) the scores and the system take it as factors about each chunk's
    midpoint (:func:`centred_decay_factors`); otherwise ``e^{G_i - G_j}`` comes from
    :func:`decay_matrix`. ``strict`` (under autograd,
    for :func:`_with_own_writes`) leaves each step's own write ``scale β_i (q_i·k_i) v_i`` out
    of its output. ``rows`` > 1 (without autograd, for :func:`delta_interleave`): ``q`` holds
    only every ``rows``-th step's query (the last of each group of ``rows``; the others are
    zero and read nothing), ``[B, T / rows, H, K]``, and the output only those steps.
    """
    B, T, H, K = k.shape
    bc, gc = to_chunks(beta, chunk, True), to_chunks(g, chunk, True)            # [n, B, H, C]
    track = needs_grad(q, k, v, beta, g, S0)
    Gd = gc.to(torch.float64).cumsum(-1)             # [n, B, H, C] log decay from the chunk start
    G = Gd.to(q.dtype)
    factors = decay_factors(Gd, q.dtype)
    if factors is not None:
        return _delta_factored(q, k, v, bc, G, factors, S0, chunk, scale, track, strict, rows)
    factors = centred_decay_factors(Gd, q.dtype, span=2 * FACTOR_LIMIT)
    if factors is not None:                          # about each chunk's midpoint m
        e_G = torch.exp(Gd).to(q.dtype)              # (the state's reads: from the start)
        return _delta_factored(q, k, v, bc, G, factors, S0, chunk, scale, track, strict, rows,
                               e_G)
    if rows > 1:                                     # every step's row, then the ones read
        q = torch.stack([*(torch.zeros_like(q),) * (rows - 1), q], dim=2).flatten(1, 2)
        o, S = _delta_chunked(q, k, v, beta, g, S0, chunk, scale, strict)
        return o[:, rows - 1::rows], S

    qc, kc, vc = (to_chunks(x, chunk, True) for x in (q, k, v))
    qc = qc * scale
    _, decay = decay_matrix(gc, q.dtype)             # e^{G_i - G_j} for j <= i, 1 above
    A = kc @ kc.mT
    A = (A.mul_(decay) if not track else A * decay).mul_(bc[..., None]).tril_(-1)
    P = (qc @ kc.mT).tril_()
    P = P.mul_(decay) if not track else P * decay
    e_G = torch.exp(G)
    q_in = qc * e_G[..., None]
    kb = kc * (bc * e_G)[..., None]
    rhs = torch.cat([vc * bc[..., None], kb], dim=-1)
    k_out = kc * torch.exp((Gd[..., -1:] - Gd).to(q.dtype))[..., None]   # decayed to the chunk end
    o, S = _core(q_in, P, A, rhs, k_out, torch.exp(G[..., -1:])[..., None], S0, strict)
    return from_chunks(o, T, True), S


def _delta_factored(q, k, v, bc, G, factors, S0, chunk, scale, track, strict=False, rows=1,
                    e_G=None):
    """:func:`_delta_chunked` with the decay on the rows: ``factors = (e^{G - m}, e^{m - G})``
    with ``m`` = 0 (:func:`decay_factors`) or, when ``e_G = e^G`` is given, ``m`` the midpoint
    of each chunk's range (:func:`centred_decay_factors`), so that ``e^{G_i - G_j}`` is the
    product of a factor on row i and one on row j: no ``[C, C]`` decay pass. With
    ``k̃ = k e^{m - G}`` the scores are ``(q e^{G - m}) k̃ᵀ``, the system
    ``(β e^{G - m} k) k̃ᵀ`` and the keys decayed to the chunk end ``k̃ e^{G_C - m}``; the state
    is read by ``q e^G`` and the solve's right-hand side is ``[β v | β e^G k]`` (with ``m`` = 0
    those two rows are the scores' and the system's own: with a centre they are two more
    scaled copies). Without autograd q, k, β v
    and β e^G k are written straight from the input layout into their chunked buffers, scaled
    on the way (no separate transpose copies). With ``rows`` > 1 (see :func:`_delta_chunked`)
    the queries' products (the scores, their products with ``[U | W]`` and the reads of the
    entering states) run on the ``C / rows`` rows read."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    e_Gm, e_negGm = (f[..., None] for f in factors)                    # [n, B, H, C, 1]
    n = e_Gm.shape[0]
    beta = bc[..., None]
    chunk_decay = torch.exp(G[..., -1])[..., None, None]                 # e^{G_C}: [.., 1, 1]
    centred = e_G is not None
    e_G = e_G[..., None] if centred else e_Gm                            # (no m: one tensor)
    to_end = e_Gm[..., -1:, :] if centred else chunk_decay               # e^{G_C - m}
    if track:
        kc, qc = to_chunks(k, chunk, True), to_chunks(q, chunk, True)
        k_back = kc * e_negGm                        # k_j e^{m - G_j}
        q_in = qc * (e_G * scale)                    # reads the state entering the chunk
        rhs = torch.cat([to_chunks(v, chunk, True) * beta, kc * (beta * e_G)], dim=-1)
        q_m, kb_m = (qc * (e_Gm * scale), kc * (beta * e_Gm)) if centred else (
            q_in, rhs[..., V:])
        A = kb_m @ k_back.mT                         # β_i e^{G_i - G_j} k_i·k_j (read for j < i)
        P = (q_m @ k_back.mT).tril_()                # intra-chunk scores, incl. the diagonal
        k_out = k_back * to_end
    else:
        k_back = to_chunks_scaled(k, chunk, e_negGm, chunk_major=True)
        # [β v | β e^G k] written straight into one buffer; without a centre the triangular
        # system A reads its β e^G k half in place (a strided matrix: no copy)
        rhs = q.new_empty(n, B, H, chunk, V + K)
        to_chunks_scaled(v, chunk, beta, out=rhs[..., :V], chunk_major=True)
        kb = to_chunks_scaled(k, chunk, beta * e_G, out=rhs[..., V:], chunk_major=True)
        kb_m = to_chunks_scaled(k, chunk, beta * e_Gm, chunk_major=True) if centred else kb
        if rows == 1:
            q_in = to_chunks_scaled(q, chunk, e_G * scale, chunk_major=True)
            q_m = (to_chunks_scaled(q, chunk, e_Gm * scale, chunk_major=True) if centred
                   else q_in)
            P = (q_m @ k_back.mT).tril_()
        else:                                        # the read rows r·i + r - 1 of each chunk
            read = slice(rows - 1, None, rows)
            q_in = to_chunks_scaled(q, chunk // rows, e_G[..., read, :] * scale,
                                    chunk_major=True)
            q_m = q_in
            if centred:
                q_m = to_chunks_scaled(q, chunk // rows, e_Gm[..., read, :] * scale,
                                       chunk_major=True)
            P = (q_m @ k_back.mT).mul_(_read_rows_mask(chunk, rows, q_in.dtype, q_in.device))
        A = kb_m @ k_back.mT
        k_out = k_back.mul_(to_end)
    o, S = _core(q_in, P, A, rhs, k_out, chunk_decay, S0, strict)
    return from_chunks(o, T // rows, True), S


@functools.lru_cache(maxsize=16)
def _read_rows_mask(chunk: int, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[C / rows, C]`` causal mask of the read rows: row i (step ``rows·i + rows - 1`` of the
    chunk) scores the steps up to its own. Cached (read only: made once per segment it cost
    2% of a ``delta_interleave`` forward)."""
    steps = torch.arange(chunk, device=device)
    reads = rows * torch.arange(chunk // rows, device=device)[:, None] + rows - 1
    return (steps[None, :] <= reads).to(dtype)


#: rows of the diagonal blocks of the blocked unit-triangular solve
SOLVE_BLOCK = 16


def _core(q_in, P, A, rhs, k_out, gamma, S0, strict):
    """Everything of the chunked form after its decayed operands, over chunk-major
    ``[n, B, H, ...]`` chunks (:func:`to_chunks`' ``chunk_major``): ``q_in [.., R, K]``
    (queries with their decay from the chunk start and the scale), the causal scores
    ``P [.., R, C]``, the system ``A [.., C, C]`` (strictly lower part read),
    ``rhs = [β v | β e^G k] [.., C, V + K]``, the keys decayed to the chunk end
    ``k_out [.., C, K]``, the chunk's decay ``gamma [.., 1, 1]``, ``S0 [B, H, K, V]`` or None.
    Under autograd through :class:`_DeltaCore` (hand-written backward), otherwise
    :func:`_core_forward`. Returns ``(o [n, B, H, R, V], S [B, H, K, V])``."""
    n, B, H = k_out.shape[:3]
    flat = [None if x is None else x.flatten(1, 2) for x in (q_in, P, A, rhs, k_out, gamma)]
    flat.append(None if S0 is None else S0.flatten(0, 1))
    if needs_grad(*flat):
        o, S = _DeltaCore.apply(*flat, strict)
    else:
        o, S, _ = _core_forward(*flat, strict)
    return o.view(n, B, H, *o.shape[2:]), S.view(B, H, *S.shape[1:])


def _core_forward(q_in, P, A, rhs, k_out, gamma, S0, strict, track=False):
    """:func:`_core` on ``[n, N, ...]`` chunks (N = batch × heads): the solve
    ``[U | W] = (I + A)⁻¹ rhs``, then the only loop over chunks, two fused multiply-adds per
    chunk: each step's correction ``u = U - W S_prev`` and the state passed on,
    ``S_next = γ S_prev + k_outᵀ u``; then every chunk's output at once,
    ``o = q_in S_prev + P u`` (less ``p ⊙ β v``, ``p = diag P``, with ``strict``: each step's
    own write left out). (Against forming the transitions ``γ I - k_outᵀ W`` for a loop of one
    product per chunk: 12% faster, measured per segment at T = 2048.) The loop writes ``u``
    and the entering states in place into chunk-major buffers (contiguous per chunk: against
    out-of-place products gathered by ``stack``, the loop and the reads take 0.82 instead of
    1.16 ms per segment of 16 chunks, B·H = 4). ``track``: differentiable ops only (the
    double backward of :class:`_DeltaCore`). Returns ``(o, S, (UW, X, S_prev, u))`` with
    ``X`` the solve's diagonal-block inverses, ``S_prev [n, N, K, V]`` the states entering the
    chunks and ``u [n, N, C, V]``."""
    n, N, C, K = k_out.shape
    V = rhs.shape[-1] - K
    if track:
        UW = _unit_lower_solve(A, rhs)
        U, W = UW.split([V, K], dim=-1)
        S = k_out.new_zeros(N, K, V) if S0 is None else S0
        S_prev, u = [], []
        for U_c, W_c, k_c, g_c in zip(U, W, k_out, gamma):
            S_prev.append(S)
            u.append(torch.baddbmm(U_c, W_c, S, alpha=-1))
            S = torch.baddbmm(S * g_c, k_c.mT, u[-1])
        S_prev, u = torch.stack(S_prev), torch.stack(u)
        o = P @ u + q_in @ S_prev
        if strict:
            o = o - P.diagonal(dim1=-2, dim2=-1)[..., None] * rhs[..., :V]
        return o, S, (UW, None, S_prev, u)
    X = _diag_inverses(A, SOLVE_BLOCK)
    UW = _solve_forward(A, rhs, SOLVE_BLOCK, X)
    U, W = UW.split([V, K], dim=-1)
    u = U.contiguous()                  # (a copy: U - W S_prev in place, UW kept for backward)
    S_prev = k_out.new_empty(n, N, K, V)
    S = S_prev[0].zero_() if S0 is None else S_prev[0].copy_(S0)
    for c in range(n):
        u_c = u[c].baddbmm_(W[c], S, alpha=-1)                          # U - W S_prev
        S = torch.mul(S, gamma[c], out=S_prev[c + 1]) if c + 1 < n else S * gamma[c]
        S.baddbmm_(k_out[c].mT, u_c)                                    # γ S_prev + k_outᵀ u
    o = P @ u                                                            # [n, N, R, V]
    if strict:
        o.sub_(P.diagonal(dim1=-2, dim2=-1)[..., None] * rhs[..., :V])  # p ⊙ β v
    R = o.shape[2]
    o.view(n * N, R, V).baddbmm_(q_in.flatten(0, 1), S_prev.flatten(0, 1))
    return o, S, (UW, X, S_prev, u)


class _DeltaCore(torch.autograd.Function):
    """:func:`_core_forward` with a hand-written backward (autograd through it records some
    50 ops per segment). The chunk reads ``o = q_in S_prev + P u`` (less ``p ⊙ β v`` with
    ``strict``) and writes ``S_next = γ S_prev + k_outᵀ u``, ``u = U - W S_prev``. With
    ``Λ_c = ∂L/∂S_c`` (the state after chunk c; ``Λ_{n-1}`` the final state's gradient) the
    backward runs one reverse loop, two fused multiply-adds per chunk in place,
    ``∂u_c = P_cᵀ do_c + k_out Λ_c`` and ``Λ_{c-1} = γ Λ_c + q_inᵀ do_c - W_cᵀ ∂u_c``
    (``∂S_0`` its last value), then every chunk at once: ``∂q_in = do S_prevᵀ``,
    ``∂P = tril(do uᵀ)``, ``∂k_out = u Λᵀ``, ``∂γ = Σ Λ ⊙ S_prev``, the transposed solve
    ``∂rhs = (I + A)⁻ᵀ [∂u | -∂u S_prevᵀ]`` (with the forward's diagonal-block inverses) and
    ``∂A = -tril(∂rhs [U | W]ᵀ, -1)``; ``strict`` adds ``-do·β v`` to ``∂P``'s diagonal and
    ``-p ⊙ do`` to ``∂(β v)``. Under ``create_graph`` the backward instead recomposes the
    forward with differentiable ops from the saved inputs and differentiates it."""

    @staticmethod
    def forward(ctx, q_in, P, A, rhs, k_out, gamma, S0, strict):
        o, S, (UW, X, S_prev, u) = _core_forward(q_in, P, A, rhs, k_out, gamma, S0, strict)
        ctx.save_for_backward(q_in, P, A, rhs, k_out, gamma, S0, UW, X, S_prev, u)
        ctx.strict = strict
        ctx.set_materialize_grads(False)
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q_in, P, A, rhs, k_out, gamma, S0, UW, X, S_prev, u = ctx.saved_tensors
        if torch.is_grad_enabled():     # double backward: differentiate the plain composition
            return grads_by_recomposition(
                ctx, (q_in, P, A, rhs, k_out, gamma, S0),
                lambda *xs: _core_forward(*xs, ctx.strict, track=True)[:2], (do, dS), 8)
        n, N, C, K = k_out.shape
        V = rhs.shape[-1] - K
        do = u.new_zeros(u.shape) if do is None else do.contiguous()
        du = P.mT @ do                           # [n, N, C, V]: Pᵀ do, then + k_out Λ in place
        # lam[c + 1] = Λ_c (lam[n]: the final state's); lam[c] starts as q_inᵀ do of chunk c
        # and becomes Λ_{c-1} in place
        lam = S_prev.new_empty(n + 1, N, K, V)
        torch.matmul(q_in.mT, do, out=lam[:n])
        lam[n] = 0 if dS is None else dS
        W = UW[..., V:]
        for c in range(n - 1, -1, -1):
            du_c = du[c].baddbmm_(k_out[c], lam[c + 1])                 # Pᵀ do + k_out Λ
            lam[c].addcmul_(gamma[c], lam[c + 1]).baddbmm_(W[c].mT, du_c, alpha=-1)
        dS0 = lam[0] if S0 is not None else None
        lam = lam[1:]
        dq_in = do @ S_prev.mT
        dP = (do @ u.mT).tril_()
        dk_out = u @ lam.mT
        dgamma = (lam * S_prev).sum((-2, -1), keepdim=True)
        drhs = _solve_transposed(A, torch.cat([du, (du @ S_prev.mT).neg_()], dim=-1),
                                 SOLVE_BLOCK, X)
        dA = (drhs @ UW.mT).tril_(-1).neg_()
        if ctx.strict:                   # o also loses p ⊙ β v
            dP.diagonal(dim1=-2, dim2=-1).sub_((do * rhs[..., :V]).sum(-1))
            drhs[..., :V].addcmul_(P.diagonal(dim1=-2, dim2=-1)[..., None], do, value=-1)
        return dq_in, dP, dA, drhs, dk_out, dgamma, dS0, None


def _unit_lower_solve(A: Tensor, rhs: Tensor, block: int = SOLVE_BLOCK) -> Tensor:
    """``(I + A)⁻¹ rhs`` for the strictly lower triangle of ``A`` (:func:`_solve_forward`);
    under autograd through :class:`_UnitLowerSolve`, whose backward is one more such solve."""
    if needs_grad(A, rhs):
        return _UnitLowerSolve.apply(A, rhs, block)
    return _solve_forward(A, rhs, block)


class _UnitLowerSolve(torch.autograd.Function):
    """``Y = (I + A)⁻¹ R`` (``A`` strictly lower, the rest never read) with the backward
    ``∂R = (I + A)⁻ᵀ ∂Y`` and ``∂A = -tril(∂R Yᵀ, -1)``. The transposed system is solved by
    blocked backward substitution (:func:`_solve_transposed`) with the diagonal blocks'
    inverses the forward made. Under ``create_graph`` it is this same Function on flipped
    operands instead (reversing the order of rows and columns makes the transposed system unit
    lower again, ``J (I + A)ᵀ J = I + J Aᵀ J``), so that the backward is made of differentiable
    ops and higher derivatives come for free. (Autograd through the blocked substitution
    recorded its block loop and concatenations: about 3x the solve; the flipped copies of the
    operands cost about 5% of a training step.)"""

    @staticmethod
    def forward(ctx, A, rhs, block):
        X = _diag_inverses(A, block)
        Y = _solve_forward(A, rhs, block, X)
        ctx.save_for_backward(A, Y, *(() if X is None else (X,)))
        ctx.block = block
        return Y

    @staticmethod
    def backward(ctx, dY):
        A, Y, *X = ctx.saved_tensors
        if torch.is_grad_enabled():                  # create_graph: differentiable ops only
            At = A.mT.flip(-2, -1)                   # J Aᵀ J: strictly lower again
            dR = _UnitLowerSolve.apply(At, dY.flip(-2), ctx.block).flip(-2)
            return -(dR @ Y.mT).tril(-1), dR, None
        dR = _solve_transposed(A, dY, ctx.block, X[0] if X else None)
        return (dR @ Y.mT).tril_(-1).neg_(), dR, None


def _diag_inverses(A: Tensor, block: int) -> Tensor | None:
    """The inverses ``X [N, m, block, block]`` of the ``m`` unit lower diagonal blocks of
    ``I + A`` (``A [..., C, C]``, strictly lower part read) as the finite product
    ``(I - D)(I + D²)(I + D⁴)...`` (``D`` nilpotent; all blocks in one batch), or None where
    :func:`_solve_forward` takes ``torch.linalg.solve_triangular`` instead (``C`` not a
    multiple of ``block``, or a single block)."""
    C = A.shape[-1]
    if C % block or C <= block:
        return None
    m = C // block
    # the m diagonal blocks of every matrix, strictly lower parts, inverted together:
    # [N·m, block, block] (the blocks left of them are below the diagonal: read whole)
    D = A.reshape(-1, m, block, m, block).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    D = D.reshape(-1, block, block).tril(-1)
    X, Pw, s = torch.eye(block, dtype=A.dtype, device=A.device) - D, D @ D, 2
    while s < block:
        X = torch.baddbmm(X, X, Pw)                  # X (I + D^s)
        s *= 2
        if s < block:
            Pw = Pw @ Pw
    return X.view(-1, m, block, block)


def _solve_forward(A: Tensor, rhs: Tensor, block: int = SOLVE_BLOCK,
                   X: Tensor | None = None) -> Tensor:
    """``(I + A)⁻¹ rhs`` for the strictly lower triangle of ``A [..., C, C]`` (the diagonal and
    above are never read: no need to mask them), ``rhs [..., C, R]``.

    Blocked forward substitution: with the inverses ``X_i`` of the ``block × block`` diagonal
    blocks (:func:`_diag_inverses`, or ``X`` if given), block row i is
    ``X_i (rhs_i - A_{i,<i} out_{<i})``: a few batched matmuls instead of ``C`` sequential
    substitution steps (measured about 1.7x faster than ``torch.linalg.solve_triangular`` on
    ``[.., 64, 64]`` chunks, same accuracy against a float64 solve).
    """
    C = A.shape[-1]
    X = _diag_inverses(A, block) if X is None else X
    if X is None:
        eye = torch.eye(C, dtype=A.dtype, device=A.device)
        return torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    m = C // block
    # block rows written into one buffer (no cat), the update fused (baddbmm)
    R = rhs.shape[-1]
    out = torch.empty(rhs.shape, dtype=rhs.dtype, device=rhs.device)
    out3, A3, rhs3 = out.view(-1, C, R), A.reshape(-1, C, C), rhs.reshape(-1, C, R)
    for i in range(m):
        rows = slice(i * block, (i + 1) * block)
        r = rhs3[:, rows]
        if i:
            r = torch.baddbmm(r, A3[:, rows, :i * block], out3[:, :i * block], alpha=-1)
        out3[:, rows] = X[:, i] @ r                  # (bmm's out= into a strided slice is slow)
    return out


def _solve_transposed(A: Tensor, rhs: Tensor, block: int = SOLVE_BLOCK,
                      X: Tensor | None = None) -> Tensor:
    """``(I + A)⁻ᵀ rhs``, ``A`` as in :func:`_solve_forward` (strictly lower part read): blocked
    backward substitution, block row i (from the last) being
    ``X_iᵀ (rhs_i - Σ_{l>i} A_{l,i}ᵀ out_l)`` with the diagonal blocks' inverses ``X``
    (:func:`_diag_inverses`, or as given)."""
    C = A.shape[-1]
    X = _diag_inverses(A, block) if X is None else X
    if X is None:
        eye = torch.eye(C, dtype=A.dtype, device=A.device)
        return torch.linalg.solve_triangular((eye + A).mT, rhs, upper=True, unitriangular=True)
    m = C // block
    R = rhs.shape[-1]
    out = torch.empty(rhs.shape, dtype=rhs.dtype, device=rhs.device)
    out3, A3, rhs3 = out.view(-1, C, R), A.reshape(-1, C, C), rhs.reshape(-1, C, R)
    for i in reversed(range(m)):
        rows, below = slice(i * block, (i + 1) * block), slice((i + 1) * block, C)
        r = rhs3[:, rows]
        if i < m - 1:
            r = torch.baddbmm(r, A3[:, below, rows].mT, out3[:, below], alpha=-1)
        out3[:, rows] = X[:, i].mT @ r
    return out


@empty_time('kv')
def delta_interleave(q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                     log_decay: Tensor | None = None, steps: int | None = None,
                     scale: float | None = None, initial_state: Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: Tensor | None = None,
                     chunk_size: int = 64, reference: bool = False, inner=None):
    """Multi-step delta rule (DeltaProduct) by lowering onto :func:`delta`.

    Per token t, with sub-steps j = 1..steps::

        S_{t,0} = exp(g_t) S_{t-1}
        S_{t,j} = (I - β_{t,j} k_{t,j} k_{t,j}ᵀ) S_{t,j-1} + β_{t,j} k_{t,j} v_{t,j}ᵀ
        o_t     = scale · S_{t,steps}ᵀ q_t

    Args:
        q: ``[B, T, H, K]``; k: ``[B, T, steps, H, K]``; v: ``[B, T, steps, H, V]``;
        beta: ``[B, T, steps, H]``; log_decay: ``[B, T, H]`` or None.
        steps: number of sub-steps (checked against ``k.shape[2]``).
        reference: run the sequential :func:`delta_ref` instead of the chunked form.
        inner: run this instead (a function with :func:`delta`'s signature but ``chunk_size``).
        Other arguments as in :func:`delta` (``cu_seqlens`` counts tokens, not sub-steps).
    Lowering: the sub-steps become consecutive rows of a ``T·steps`` sequence; the gate sits on
    the first sub-step of each token, q is zero except on the last, whose output is returned.
    Without autograd (and with ``chunk_size`` a multiple of ``steps``) the chunked form computes
    the queries' products on those last rows alone (:func:`_delta_chunked`'s ``rows``).
    """
    B, T, n, H, K = k.shape
    if steps is not None and steps != n:
        raise ValueError(f"delta_interleave: steps={steps} but k has {n} sub-steps")
    V = v.shape[-1]
    # [B, T, steps, ...] -> [B, T*steps, ...]: row t*steps + j is sub-step j of token t
    k_seq = k.reshape(B, T * n, H, K)
    v_seq = v.reshape(B, T * n, H, V)
    beta_seq = beta.reshape(B, T * n, H)
    g_seq = None
    if log_decay is not None:
        g_seq = torch.cat([log_decay[:, :, None], log_decay.new_zeros(B, T, n - 1, H)], dim=2)
        g_seq = g_seq.reshape(B, T * n, H)
    if (inner is None and not reference and cu_seqlens is None and chunk_size % n == 0
            and not needs_grad(q, k, v, beta, log_decay, initial_state)):
        return _interleaved_reads(q, k_seq, v_seq, beta_seq, g_seq, n, scale, initial_state,
                                  output_final_state, chunk_size)
    q_seq = torch.cat([q.new_zeros(B, T, n - 1, H, K), q[:, :, None]], dim=2)
    q_seq = q_seq.reshape(B, T * n, H, K)
    core, extra = inner, {}
    if core is None:
        core = delta_ref if reference else delta
        extra = {} if reference else {"chunk_size": chunk_size}
    o, S = core(q_seq, k_seq, v_seq, beta_seq, g_seq, scale=default_scale(scale, K),
                initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=None if cu_seqlens is None else cu_seqlens * n, **extra)
    return o.reshape(B, T, n, H, V)[:, :, -1].contiguous(), S    # read after the last sub-step


def _interleaved_reads(q, k, v, beta, g, steps, scale, initial_state, output_final_state, chunk):
    """:func:`delta_interleave` without autograd: the chunked form over the ``T·steps`` rows
    ``k, v, beta, g`` (g None: no gate), reading q ``[B, T, H, K]`` on every ``steps``-th row
    only, in time segments of whole chunks (:func:`segment_length`) carrying the state."""
    B, T, H, K = q.shape
    if g is None:                                    # (_prepare's own zero gate follows q)
        g = beta.new_zeros(k.shape[:3])
    q, k, v, beta, g, S, out_dtype, scale = _prepare(q, k, v, beta, g, initial_state,
                                                     default_scale(scale, K))
    length = segment_length(chunk, B * H)            # rows per segment (whole chunks)
    outs = []
    for q_, k_, v_, b_, g_ in zip(q.split(length // steps, dim=1),
                                  *(x.split(length, dim=1) for x in (k, v, beta, g))):
        o, S = _delta_chunked(q_, k_, v_, b_, g_, S, chunk, scale, rows=steps)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o.to(out_dtype), (S if output_final_state else None)
