"""``linear``: matrix-state linear attention with an optional diagonal decay.

    S_t = A_t ⊙ S_{t-1} + k_t v_tᵀ,     o_t = scale · S_tᵀ q_t,     A_t = exp(log_decay_t)

Shapes (fla layout): ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, state ``S [B, H, K, V]``; q and k
may also have fewer heads ``Hq`` dividing H (shared by groups of value heads, see :func:`linear`).
``log_decay`` (log space, <= 0 for a contraction) is one of

* ``None``                 no decay (plain causal linear attention);
* ``[B, T, H]``            one scalar per head (Mamba-2/SSD, RetNet, Lightning);
* ``[B, T, H, K]``         one per key dim, broadcast over V (GLA, HGRN2, GateLoop after lowering);
* ``[B, T, H, K, V]``      one per state entry (Mamba-1: k = B, v = Δ·x, q = C); size-1 dims
  broadcast, e.g. ``[B, T, H, 1, V]``.

Strategies: the chunked matmul form for the first three (intra-chunk masked ``(q kᵀ ⊙ decay) v``
plus inter-chunk state passing; for no or a scalar decay the Mamba-2 SSD algorithm, all chunks at
once), and for ``[K, V]`` decays a two-level elementwise scan over windows of time (never more
than one window of ``[B, W, H, K, V]`` alive). Complex per-key decays
are lowered onto the real form by :func:`linear_complex`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._chunking import (LOG2E, cast, centred_decay_factors, compute_dtype,
                        cumsum_to_end, decay_factors, decay_matrix, default_scale, empty_time,
                        exp_fast, from_chunks, grads_by_recomposition, needs_grad, output_dtype,
                        over_segments, segsum, strict_last_step_apart, sub_chunk_size, to_chunks,
                        to_chunks_scaled, within_factor_limit)
from ._varlen import varlen_call
from .scan import blocked_scan

Tensor = torch.Tensor


def _prepare(q, k, v, log_decay, initial_state, scale):
    """Cast to the accumulation dtype; return the output dtype and the resolved scale."""
    if log_decay is not None and log_decay.ndim not in (3, 4, 5):
        raise ValueError(f"log_decay must be [B,T,H], [B,T,H,K] or [B,T,H,K,V], got "
                         f"{tuple(log_decay.shape)}")
    dtype = compute_dtype(q, k, v, log_decay, initial_state)
    out_dtype = output_dtype(q, k, v)
    if dtype.is_complex:  # a complex decay or state makes the output complex (reference only)
        out_dtype = torch.promote_types(out_dtype, torch.complex64)
    q, k, v, log_decay, initial_state = (
        cast(x, dtype) for x in (q, k, v, log_decay, initial_state))
    return q, k, v, log_decay, initial_state, out_dtype, default_scale(scale, q.shape[-1])


def _full_time(log_decay: Tensor | None, like: Tensor) -> Tensor | None:
    """Expand a broadcast time dim of a ``[K, V]`` decay (e.g. ``[1, 1, H, K, V]``) to T."""
    if log_decay is None or log_decay.shape[1] == like.shape[1]:
        return log_decay
    return log_decay.expand(log_decay.shape[0], like.shape[1], *log_decay.shape[2:])


def _as_state_decay(log_decay: Tensor | None) -> Tensor | None:
    """Any decay kind -> [B, T, H, K or 1, V or 1], broadcastable against the state."""
    if log_decay is None or log_decay.ndim == 5:
        return log_decay
    if log_decay.ndim == 3:
        return log_decay[..., None, None]
    return log_decay[..., None]


def _check_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int]:
    """(q/k heads, value heads), after checking that the first divides the second."""
    Hq, H = q.shape[2], v.shape[2]
    if k.shape[2] != Hq or H % Hq:
        raise ValueError(f"linear: q/k heads ({Hq}, {k.shape[2]}) must be equal and divide "
                         f"the {H} value heads")
    return Hq, H


def _expand_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k with ``Hq`` heads (``Hq`` dividing v's ``H``) -> H heads: value head h reads q/k head
    ``h // (H / Hq)``. A view when ``Hq`` is 1 (shared q/k), a copy otherwise."""
    Hq, H = _check_heads(q, k, v)
    if Hq == H:
        return q, k, v
    if Hq == 1:
        return q.expand(*q.shape[:2], H, -1), k.expand(*k.shape[:2], H, -1), v
    return q.repeat_interleave(H // Hq, dim=2), k.repeat_interleave(H // Hq, dim=2), v


# --------------------------------------------------------------------------------------------
# sequential reference
# --------------------------------------------------------------------------------------------

def _factored(decay_A: Tensor | None, decay_dt: Tensor | None, dtype) -> tuple | None:
    """The selective-SSM decay ``log_decay[b,t,h,k,v] = A[h,k,v] * dt[b,t,h,v]``, kept factored
    (A: ``[H, K, V]`` or broadcastable, dt: ``[B, T, H, V]``) so that no ``[B, T, H, K, V]``
    tensor exists outside one chunk."""
    if decay_A is None and decay_dt is None:
        return None
    if decay_A is None or decay_dt is None:
        raise ValueError("decay_A and decay_dt go together")
    return decay_A.to(dtype), decay_dt.to(dtype)


@empty_time('kv')
def linear_ref(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None = None,
               scale: float | None = None, initial_state: Tensor | None = None,
               output_final_state: bool = False, cu_seqlens: Tensor | None = None,
               decay_A: Tensor | None = None, decay_dt: Tensor | None = None):
    """Sequential reference of :func:`linear`: a loop over time on the ``[B, H, K, V]`` state.

    Also accepts complex q, k, log_decay and initial state (the output is then complex; the
    GateLoop reference takes its real part), and the factored decay ``decay_A * decay_dt``.
    """
    log_decay = _full_time(log_decay, q)
    if cu_seqlens is not None:
        return varlen_call(linear_ref, cu_seqlens,
                           dict(q=q, k=k, v=v, log_decay=log_decay, decay_dt=decay_dt),
                           scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, decay_A=decay_A)
    q, k, v, g, S, out_dtype, scale = _prepare(q, k, v, log_decay, initial_state, scale)
    factors = _factored(decay_A, decay_dt, q.dtype)
    g = _as_state_decay(g)
    q, k, v = _expand_heads(q, k, v)
    B, T, H, K = q.shape
    if S is None:
        S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        if g is not None:
            S = torch.exp(g[:, t]) * S
        if factors is not None:
            S = torch.exp(factors[0] * factors[1][:, t, :, None, :]) * S
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]   # + k_t v_tᵀ
        outs.append((S * q[:, t, :, :, None]).sum(-2))      # S_tᵀ q_t: [B, H, V]
    o = torch.stack(outs, dim=1) * scale
    return o.to(out_dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------------------------
# chunked forms
# --------------------------------------------------------------------------------------------

@empty_time('kv')
def linear(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None = None,
           scale: float | None = None, initial_state: Tensor | None = None,
           output_final_state: bool = False, cu_seqlens: Tensor | None = None,
           chunk_size: int = 64, decay_A: Tensor | None = None, decay_dt: Tensor | None = None):
    """Chunked linear attention: ``S_t = exp(g_t) ⊙ S_{t-1} + k_t v_tᵀ``, ``o_t = scale·S_tᵀq_t``.

    Args:
        q, k: ``[B, T, H, K]``, or ``[B, T, Hq, K]`` with ``Hq`` dividing H: q/k shared by groups
            of ``H / Hq`` value heads (value head h reads q/k head ``h // (H / Hq)``, as
            ``repeat_interleave`` would lay them out; Mamba-2's ``n_groups``). With no or a
            scalar decay the shared q/k are never repeated: one ``q kᵀ`` per q/k head and the
            state matmuls over all value heads of a group at once.
        v: ``[B, T, H, V]``.
        log_decay: None, ``[B, T, H]``, ``[B, T, H, K]`` or ``[B, T, H, K, V]`` (log space).
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``).
        output_final_state: also return ``S_T`` (fp32).
        cu_seqlens: ``[N + 1]``, sequences packed along T with batch 1.
        chunk_size: steps per chunk.
        decay_A, decay_dt: instead of ``log_decay``, the selective-SSM (Mamba) decay
            ``A[h,k,v] * dt[b,t,h,v]`` kept factored: A ``[H, K, V]``, dt ``[B, T, H, V]``.
    Returns:
        ``(o [B, T, H, V], final state [B, H, K, V] or None)``.
    """
    log_decay = _full_time(log_decay, q)
    if cu_seqlens is not None:
        return varlen_call(linear, cu_seqlens,
                           dict(q=q, k=k, v=v, log_decay=log_decay, decay_dt=decay_dt),
                           scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, chunk_size=chunk_size,
                           decay_A=decay_A)
    q, k, v, g, S0, out_dtype, scale = _prepare(q, k, v, log_decay, initial_state, scale)
    if q.is_complex():
        raise TypeError("linear: complex inputs take linear_complex (lowered to a real form)")
    factors = _factored(decay_A, decay_dt, q.dtype)
    if factors is not None:
        if g is not None:
            raise ValueError("give log_decay or decay_A/decay_dt, not both")
        o, S = _chunk_loop_state_decay(*_expand_heads(q * scale, k, v), factors, S0)
    elif g is not None and g.ndim == 5:
        o, S = _chunk_loop_state_decay(*_expand_heads(q * scale, k, v), g, S0)
    elif g is not None and g.ndim == 4:
        o, S = _with_decay_grad(*_expand_heads(q, k, v), g, S0, chunk_size, scale)
    elif g is not None:
        _check_heads(q, k, v)
        o, S = _with_decay_grad(q, k, v, g, S0, chunk_size, scale)
    else:
        _check_heads(q, k, v)
        o, S = over_segments(_chunked_scalar, (q, k, v, g), S0, chunk_size, v.shape[2], scale)
    return o.to(out_dtype), (S if output_final_state else None)


def _chunked_scalar(q, k, v, g, S0, chunk, scale, strict=False):
    """Chunked form for no decay (``g`` None) or a scalar ``[B, T, H]`` log decay: the Mamba-2
    SSD algorithm, every chunk at once in a few large matmuls (``scale`` applied to the output).

    q, k ``[B, T, Hq, K]`` with ``Hq`` dividing ``H`` (value head h reads q/k head
    ``h // (H / Hq)``), v ``[B, T, H, V]``. Within a chunk, with ``G_i`` the log decay accumulated
    from the chunk start through step i (``G_C``: the chunk total):

      o_i = Σ_{j<=i} e^{G_i - G_j} (q_i·k_j) v_j  +  e^{G_i} q_i S_prev      (intra + inter)
      S   = e^{G_C} S_prev + Σ_j k_j (e^{G_C - G_j} v_j)ᵀ                    (chunk write)

    Every exponent is <= 0 for a contracting decay. The decay being a scalar per step, it sits
    on the value side (``e^{G_C - G_j} v_j``) and on the output (``e^{G_i} (q_i S_prev)``), so
    q and k enter only plain matmuls: ``q kᵀ`` once per q/k head and, when heads share q/k, the
    state matmuls run over all ``r = H / Hq`` value heads at once (``[C, K] @ [K, r·V]``).
    With every ``|G| <= FACTOR_LIMIT`` (the usual case) the decay factors as
    ``e^{G_i}·e^{-G_j}`` (:func:`decay_factors`): with a q/k head per value head it rides on
    the rows, ``(q_i e^{G_i})·(k_j e^{-G_j})``, no ``[C, C]`` pass at all; with q/k shared by
    ``r`` value heads it rides on v and on the output,
    ``o_i = e^{G_i} (Σ_{j<=i} (q_i·k_j) e^{-G_j} v_j + q_i S_prev)``, so that one causal
    ``q kᵀ`` serves all r heads (``[C, C] @ [C, r·V]``) and the products are those of
    :func:`chunked_form`, with its hand-written backward (measured against scaling ``q kᵀ``
    per value head, two ``[r, C, C]`` passes: forward 4-10% faster, forward + backward 15-25%,
    for Mamba-2's 24 heads of K = 128 and for 4 heads of K = 64 at T = 2048). Beyond the
    factor limit the decays are factored about each chunk's midpoint
    (:func:`centred_decay_factors`) on a per-head ``q kᵀ``, or come from
    :func:`decay_matrix` (cumulative sums in float64, so that their differences
    ``G_i - G_j`` carry no cancellation error however strong the decay).
    Large temporaries are updated in place where autograd allows it: on a CPU every fresh
    allocation of a few MB costs page faults comparable to the arithmetic on it. ``strict``
    drops the diagonal pairs ``(q_i·k_i) v_i`` from the output (for :func:`_with_decay_grad`).
    """
    B, T, Hq, K = q.shape
    H, V = v.shape[2:]
    r, C = H // Hq, chunk
    vc = to_chunks(v.reshape(B, T, Hq, r * V), C)                    # [B, Hq, n, C, r·V]
    n = vc.shape[2]
    gc = None if g is None else to_chunks(g.reshape(B, T, Hq, r), C).mT   # [B, Hq, n, r, C]
    factors = None
    if gc is not None:
        G = gc.to(torch.float64).cumsum(-1)                          # [B, Hq, n, r, C]
        factors = decay_factors(G, q.dtype)

    if factors is not None and r == 1:  # the decay on the rows of q and k: no [C, C] pass
        e_G, e_negG = (f.mT for f in factors)                        # [B, Hq, n, C, 1]
        q_in = to_chunks_scaled(q, C, e_G * scale)                   # scale folded in: no pass on o
        k_back = to_chunks_scaled(k, C, e_negG)                      # k_j e^{-G_j}
        if needs_grad(q_in, k_back, vc, S0):    # the same products, with a hand-written backward
            chunk_decay = torch.exp(G[..., -1:].to(q.dtype))          # [B, H, n, 1, 1]
            o, S = chunked_form(q_in, k_back, vc, chunk_decay, S0, strict)
            return from_chunks(o, T), S
        scores = (q_in @ k_back.mT).tril_(-int(strict))              # (q_i·k_j) e^{G_i - G_j}
        # the writes decayed to the chunk end, e^{G_C} Σ_j k_j e^{-G_j} v_jᵀ: the factor e^{G_C}
        # is applied in the state pass, S_c = e^{G_C} (S_{c-1} + Σ_j ...)
        writes = k_back.mT @ vc                                      # [B, Hq, n, K, V]
        chunk_decay = torch.exp(G[..., -1].to(q.dtype))              # [B, Hq, n, 1]
        S_prev, S = _pass_states(chunk_decay.view(B * Hq, n, 1, 1, 1),
                                 writes.view(B * Hq, n, K, 1, V), _group_state(S0, Hq),
                                 decay_after=True)
        # intra + inter in one call: scores v + (q e^G) S_prev, the add fused into the matmul
        o = (scores @ vc).flatten(0, 2)                              # in place: no copy
        o = o.baddbmm_(q_in.flatten(0, 2), S_prev.view(B * Hq * n, K, V)).view(B, Hq, n, C, V)
        o = from_chunks(o, T).reshape(B, T, H, V)
        return o, _ungroup_state(S, B)

    if factors is not None:   # q/k shared by r value heads: the decay on v and the output
        e_G, e_negG = (f.mT[..., None] for f in factors)                 # [B, Hq, n, C, r, 1]
        v_back = (vc.view(B, Hq, n, C, r, V) * e_negG).view(B, Hq, n, C, r * V)
        chunk_decay = torch.exp(G[..., -1].to(q.dtype))[..., None, :, None]   # [.., 1, r, 1]
        chunk_decay = chunk_decay.expand(B, Hq, n, 1, r, V).reshape(B, Hq, n, 1, r * V)
        S0 = None if S0 is None else _group_state(S0, Hq).reshape(B, Hq, K, r * V)
        o, S = chunked_form(to_chunks(q, C) * scale, to_chunks(k, C), v_back, chunk_decay, S0,
                            strict)
        o = (o.view(B, Hq, n, C, r, V) * e_G).view(B, Hq, n, C, r * V)
        return from_chunks(o, T).reshape(B, T, H, V), _ungroup_state(S.view(B * Hq, K, r, V), B)
    if g is None and needs_grad(q, k, v, S0):   # no decay, with a hand-written backward
        S0 = None if S0 is None else _group_state(S0, Hq).reshape(B, Hq, K, r * V)
        o, S = chunked_form(to_chunks(q, C) * scale, to_chunks(k, C), vc, None, S0, strict)
        o = from_chunks(o, T).reshape(B, T, H, V)                    # [B, Hq, n, C, r·V] -> ..
        return o, _ungroup_state(S.view(B * Hq, K, r, V), B)
    qc, kc = to_chunks(q, C), to_chunks(k, C)                        # [B, Hq, n, C, K]
    scores = (qc @ kc.mT).tril_(-int(strict))                        # [B, Hq, n, C, C]
    if g is None:  # no decay: one causal score matrix for all r value heads
        o = scores @ vc                                              # [B, Hq, n, C, r·V]
        writes = kc.mT @ vc                                          # [B, Hq, n, K, r·V]
        S_prev, S = _pass_states(None, writes.view(B * Hq, n, K, r, V), _group_state(S0, Hq))
        o = o.add_(qc @ S_prev.view(B, Hq, n, K, r * V)).mul_(scale)
    else:
        v_heads = vc.view(B, Hq, n, C, r, V).transpose(3, 4)        # [B, Hq, n, r, C, V]
        factors = centred_decay_factors(G, q.dtype)   # strong decays: about each midpoint
        if factors is not None:   # (q kᵀ)_ij e^{G_i - m} e^{m - G_j}, per value head
            e_G, e_negG = factors                                    # [B, Hq, n, r, C]
            P = scores[:, :, :, None] * e_G[..., :, None]            # [B, Hq, n, r, C, C]
            # (each factor finite: the product never forms e^{G_i - G_j} above the diagonal)
            P = P * e_negG[..., None, :] if P.requires_grad else P.mul_(e_negG[..., None, :])
        else:
            G, decay = decay_matrix(gc, q.dtype)          # float64 [.., C], [B, Hq, n, r, C, C]
            # one decay matrix per value head: scores ⊙ decay, in place when there is one
            P = scores.mul_(decay[:, :, :, 0]) if r == 1 else scores[:, :, :, None] * decay
        intra = P.view(B, Hq, n, r, C, C) @ v_heads                  # [B, Hq, n, r, C, V]
        to_end = torch.exp((G[..., -1:] - G).to(q.dtype)).mT[..., None]  # [B, Hq, n, C, r, 1]
        writes = kc.mT @ (vc.view(B, Hq, n, C, r, V) * to_end).view(B, Hq, n, C, r * V)
        chunk_decay = torch.exp(G[..., -1].to(q.dtype))              # [B, Hq, n, r]
        S_prev, S = _pass_states(chunk_decay.view(B * Hq, n, 1, r, 1),
                                 writes.view(B * Hq, n, K, r, V), _group_state(S0, Hq))
        inter = qc @ S_prev.view(B, Hq, n, K, r * V)                 # [B, Hq, n, C, r·V]
        from_start = torch.exp(G.to(q.dtype)).mT[..., None] * scale  # [B, Hq, n, C, r, 1]
        o = inter.view(B, Hq, n, C, r, V).mul_(from_start)
        o = o.add_(intra.transpose(3, 4), alpha=scale)
    o = from_chunks(o.view(B, Hq, n, C, r * V), T).reshape(B, T, H, V)
    return o, _ungroup_state(S, B)


def _group_state(S: Tensor | None, groups: int) -> Tensor | None:
    """``[B, H, K, V]`` -> ``[B·Hq, K, r, V]``: the layout of the grouped state matmuls."""
    if S is None:
        return None
    B, H, K, V = S.shape
    return S.view(B, groups, H // groups, K, V).transpose(2, 3).reshape(B * groups, K, -1, V)


def _ungroup_state(S: Tensor, batch: int) -> Tensor:
    """``[B·Hq, K, r, V]`` -> ``[B, H, K, V]``."""
    N, K, r, V = S.shape
    return S.view(batch, N // batch, K, r, V).transpose(2, 3).reshape(batch, -1, K, V)


def _pass_states(decay: Tensor | None, writes: Tensor, S0: Tensor | None,
                 decay_after: bool = False):
    """The chunk-to-chunk recurrence ``S_c = decay_c ⊙ S_{c-1} + writes_c`` over dim 1 (with
    ``decay_after``: ``S_c = decay_c ⊙ (S_{c-1} + writes_c)``, writes not yet decayed).

    ``writes [N, n, *S]``, ``decay`` broadcastable to it (None: no decay), ``S0 [N, *S]`` or None.
    Returns the states entering each chunk ``[N, n, *S]`` and the final state ``[N, *S]``.
    A sequential loop of n fused multiply-adds: O(n) work where a parallel scan does O(n log n)
    and the Mamba-2 ``exp(segsum) @ writes`` matrix O(n²). Without autograd the entering states
    replace the writes in place (``writes`` is consumed): no second ``[N, n, *S]`` buffer, whose
    first touch alone (page faults) costs about as much as the loop.
    """
    n = writes.shape[1]
    S = torch.zeros_like(writes[:, 0]) if S0 is None else S0
    # per-chunk views by unbind: under autograd its backward is one stack, where n indexing
    # ops would each scatter into a zero-filled copy of the whole tensor
    ws = writes.unbind(1)
    ds = (None,) * n if decay is None else (
        decay.unbind(1) if decay.shape[1] == n else (decay[:, 0],) * n)

    def step(S, c):
        if decay is None:
            return ws[c] + S
        if decay_after:
            return (ws[c] + S).mul_(ds[c])
        return torch.addcmul(ws[c], ds[c], S)

    if needs_grad(writes, S, decay):
        entering = []
        for c in range(n):
            entering.append(S)
            S = step(S, c)
        return torch.stack(entering, dim=1), S
    for c in range(n):  # no autograd: the entering states overwrite the writes in place
        after = step(S, c)
        ws[c].copy_(S)
        S = after
    return writes, S


class _ChunkedForm(torch.autograd.Function):
    """The matmul core shared by the chunked forms whose decay rides on the rows, with a
    hand-written backward (autograd through it records some 40 ops per segment and keeps
    every intermediate). Over ``N`` (batch × heads) and ``n`` chunks of ``C`` steps:

        P_c = tril(q̃_c k̃_cᵀ)          (strictly lower with ``strict``)
        X_c = S_{c-1} + k̃_cᵀ v_c,      S_c = d_c ⊙ X_c           (d: None = no decay)
        o_c = P_c v_c + q̃_c S_{c-1}

    ``q̃ [N, n, C, K]`` carries the decay from the chunk start (and the scale), ``k̃`` the
    inverse decay to it, ``d [N, n, K|1, 1|V]`` is the whole chunk's decay (per key, scalar,
    or per column of v: value heads sharing q/k), ``S_0 [N, K, V]``.
    Backward, with ``Λ_c = ∂L/∂S_c`` (``Λ_n`` the final state's gradient):
    ``Λ_{c-1} = d_c ⊙ Λ_c + q̃_cᵀ do_c`` (one fused multiply-add per chunk, in place),
    ``∂X_c = d_c ⊙ Λ_c``, ``∂d_c = Σ Λ_c ⊙ X_c``, then every chunk at once:
    ``∂P = tril(do vᵀ)``, ``∂q̃ = ∂P k̃ + do S_{c-1}ᵀ``, ``∂k̃ = ∂Pᵀ q̃ + v ∂X_cᵀ``,
    ``∂v = Pᵀ do + k̃ ∂X_c``, ``∂S_0 = Λ_0``. The forward keeps ``P``, the entering states and
    ``X`` (each the size of one ``[N, T, K|C]`` activation). Under ``create_graph`` (a double
    backward, which the decay gradients promise) the backward instead recomposes the same
    products with autograd from the saved inputs and differentiates them."""

    @staticmethod
    def forward(ctx, q, k, v, d, S0, strict):
        N, n, C, K = q.shape
        V = v.shape[-1]
        P = (q @ k.mT).tril_(-int(strict))                           # [N, n, C, C]
        X = k.mT @ v                                                 # writes, then X: [N, n, K, V]
        if S0 is not None:
            X[:, 0].add_(S0)
        for c in range(1, n):                                        # X_c += d_{c-1} ⊙ X_{c-1}
            if d is None:
                X[:, c].add_(X[:, c - 1])
            else:
                X[:, c].addcmul_(d[:, c - 1], X[:, c - 1])
        S_prev = torch.empty_like(X)                                 # S_{c-1} = d_{c-1} ⊙ X_{c-1}
        if S0 is None:
            S_prev[:, 0].zero_()
        else:
            S_prev[:, 0] = S0
        if d is None:
            S_prev[:, 1:] = X[:, :-1]
            S = X[:, -1].clone()                                     # not a view of X
        else:
            torch.mul(X[:, :-1], d[:, :-1], out=S_prev[:, 1:])
            S = X[:, -1] * d[:, -1]
        o = P @ v                  # (a fresh tensor, not a view: the caller may add in place)
        o.view(N * n, C, V).baddbmm_(q.flatten(0, 1), S_prev.flatten(0, 1))
        ctx.save_for_backward(q, k, v, d, S0, P, S_prev, X)
        ctx.strict = strict
        ctx.set_materialize_grads(False)
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, d, S0, P, S_prev, X = ctx.saved_tensors
        if torch.is_grad_enabled():     # double backward: differentiate the plain composition
            return grads_by_recomposition(
                ctx, (q, k, v, d, S0), lambda *xs: _chunked_form_composed(*xs, ctx.strict),
                (do, dS), 6)
        N, n, C, K = q.shape
        # (the gradient arrives in the output's [B, T, H] layout: one copy, not one per product)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        D = q.mT @ do                                                # q̃_cᵀ do_c: [N, n, K, V]
        lam = torch.zeros_like(D[:, 0]) if dS is None else dS
        for c in range(n - 1, -1, -1):                               # Λ_{c-1}, over D in place
            D_c = D[:, c]
            lam = D_c.add_(lam) if d is None else D_c.addcmul_(d[:, c], lam)
        # Λ_c for every chunk: D shifted by one (D[:, c] now holds Λ_{c-1})
        lam_all = torch.cat([D[:, 1:], (torch.zeros_like(D[:, :1]) if dS is None
                                        else dS[:, None])], dim=1)
        dd = None
        if d is not None:
            if ctx.needs_input_grad[3]:
                dd = (lam_all * X).sum_to_size(d.shape)
            dX = lam_all.mul_(d)
        else:
            dX = lam_all
        dP = (do @ v.mT).tril_(-int(ctx.strict))
        # (the products accumulate in place into fresh tensors: no copies)
        dq = (dP @ k).flatten(0, 1).baddbmm_(do.flatten(0, 1),
                                             S_prev.flatten(0, 1).mT).view(q.shape)
        dk = (dP.mT @ q).flatten(0, 1).baddbmm_(v.flatten(0, 1),
                                                dX.flatten(0, 1).mT).view(k.shape)
        dv = (P.mT @ do).flatten(0, 1).baddbmm_(k.flatten(0, 1),
                                                dX.flatten(0, 1)).view(v.shape)
        dS0 = D[:, 0] if S0 is not None else None
        return dq, dk, dv, dd, dS0, None


def _chunked_form_composed(q, k, v, d, S0, strict):
    """:class:`_ChunkedForm`'s forward as plain differentiable ops (for its double backward)."""
    N, n, C, K = q.shape
    writes = k.mT @ v
    S = q.new_zeros(N, K, v.shape[-1]) if S0 is None else S0
    entering = []
    for c, W_c in enumerate(writes.unbind(1)):
        entering.append(S)
        S = S + W_c if d is None else (S + W_c) * d[:, c]
    o = (q @ k.mT).tril(-int(strict)) @ v + q @ torch.stack(entering, dim=1)
    return o, S


def chunked_form(q: Tensor, k: Tensor, v: Tensor, d: Tensor | None, S0: Tensor | None,
                 strict: bool = False) -> tuple[Tensor, Tensor]:
    """:class:`_ChunkedForm` on ``[B, H, n, C, *]`` chunks (``d [B, H, n, K|1, 1|V]`` or None,
    ``S0 [B, H, K, V]`` or None): ``(o [B, H, n, C, V], S [B, H, K, V])``."""
    B, H = q.shape[:2]
    flat = [None if x is None else x.flatten(0, 1) for x in (q, k, v, d, S0)]
    o, S = _ChunkedForm.apply(*flat, strict)
    return o.view(*v.shape), S.view(B, H, *S.shape[1:])


def _with_decay_grad(q, k, v, g, S0, chunk, scale=1.0):
    """A chunked form with a decay (scalar ``[B, T, H]`` or per-key ``[B, T, H, K]``) over
    time segments. When the decay itself needs a gradient, the strict form
    with each step's own write ``scale (q_t·k_t) v_t`` (and ``k_T v_Tᵀ`` in the final state)
    added outside the decay factors (:func:`strict_last_step_apart`): exact decay gradients
    under strong decays. q/k may be shared by groups of value heads (scalar decay only)."""
    per_key = g.ndim == 4
    fn, args = (_chunked_per_key if per_key else _chunked_scalar), (scale,)
    if not needs_grad(g):
        return over_segments(fn, (q, k, v, g), S0, chunk, v.shape[2], *args)
    B, T, Hq, K = q.shape
    H, V = v.shape[2:]
    o, S = strict_last_step_apart(fn, (q, k, v, g), 1, S0, chunk, H, (*args, True))
    # S_T = (e^{g_T} ⊙ S_{T-1}, from the strict pass) + k_T v_Tᵀ
    write = k[:, -1, :, None, :, None] * v[:, -1].view(B, Hq, H // Hq, 1, V)
    own = (q * k).sum(-1)[..., None, None] * scale                   # [B, T, Hq, 1, 1]
    # + scale (q_t·k_t) v_t, in place on the fresh output
    return (_grouped(o, Hq).addcmul_(_grouped(v, Hq), own).view(v.shape),
            S + write.view(B, H, K, V))


def _grouped(x: Tensor, groups: int) -> Tensor:
    """``[B, T, H, ...]`` -> ``[B, T, Hq, H / Hq, ...]``: value heads by the q/k head they read."""
    return x.reshape(*x.shape[:2], groups, x.shape[2] // groups, *x.shape[3:])


def _chunked_per_key(q, k, v, g, S0, chunk, scale=1.0, strict=False):
    """Chunked form for a per-key ``[B, T, H, K]`` log decay.

    Within a chunk, with ``G_i`` the log decay accumulated from the chunk start through step i:
      o_i = Σ_{j<=i} (q_i ⊙ e^{G_i - G_j})·k_j v_j  +  (q_i ⊙ e^{G_i}) S_prev  (intra + inter)
      S   = e^{G_C} ⊙ S_prev + Σ_j (k_j ⊙ e^{G_C - G_j}) v_jᵀ               (state passing)
    When every ``|G|`` is within :data:`FACTOR_LIMIT` (the usual case: gates near 1) the decay
    rides on the rows, ``(q_i ⊙ e^{G_i})·(k_j ⊙ e^{-G_j})``, and the whole chunk is three matmuls
    as for a scalar decay. ``G`` sums at most one chunk of log decays in the compute dtype, so
    ``e^{G_i}·e^{-G_j}`` is off by a few ulps of ``|G| <= FACTOR_LIMIT`` in the exponent:
    ~1e-6 relative in fp32 at the limit, ~1e-7 for usual gates. Otherwise every exponent is
    kept <= 0: the intra-chunk scores come from :func:`_intra_scores_per_key`. The
    chunk-to-chunk recurrence is :func:`_pass_states`. ``scale`` multiplies the output;
    ``strict`` drops the diagonal pairs ``(q_i·k_i) v_i`` from it (for :func:`_with_decay_grad`).

    Without autograd every pass over a ``[B, T, H, K]`` operand that can be folded into another
    is: the scale rides on v's chunk copy (and on the state, which is then ``scale·S``
    throughout), ``log2 e`` on the decay's chunk copy so that ``e^G`` is one ``exp2`` pass, and
    the chunk's decay is applied to the state after the writes (``S = e^{G_C} ⊙ (S_prev +
    Σ_j (k_j e^{-G_j}) v_jᵀ)``, as for a scalar decay) rather than to every key.
    """
    B, T, H, K = q.shape
    track = needs_grad(q, k, v, g, S0)
    on_v = not track and scale != 1.0                     # the scale rides on v and the state
    if on_v:
        vc = to_chunks_scaled(v, chunk, v.new_tensor(scale))                    # [B, H, n, C, V]
        S0 = None if S0 is None else S0 * scale
    else:
        vc = to_chunks(v, chunk)
    n = vc.shape[2]
    base2 = not track and g.dtype == torch.float32        # G in units of log 2: e^G = 2^{G'}
    gc = to_chunks_scaled(g, chunk, g.new_tensor(LOG2E)) if base2 else to_chunks(g, chunk)
    G = gc.cumsum_(3) if base2 else gc.cumsum(3)            # log decay chunk start -> i (incl.)
    if within_factor_limit(G, LOG2E if base2 else 1.0):  # usual: the decay rides on q and k rows
        e_G = G.exp2_() if base2 else exp_fast(G)
        e_negG = torch.reciprocal(e_G)                    # e^{-G} to 1 ulp, for one exp pass
        q_in = to_chunks_scaled(q, chunk, e_G if on_v or scale == 1.0 else e_G * scale)
        k_back = to_chunks_scaled(k, chunk, e_negG)       # k_j e^{-G_j}
        chunk_decay = e_G[..., -1, :, None]               # [B, H, n, K, 1]
        if track:                              # the same products, with a hand-written backward
            o, S = chunked_form(q_in, k_back, vc, chunk_decay, S0, strict)
            return from_chunks(o, T), S
        o, S = _rows_decayed_nograd(q_in, k_back, vc, chunk_decay, S0, strict)
        return from_chunks(o, T), (S / scale if on_v else S)
    else:
        if base2:                                         # (natural units for the exact path)
            gc = to_chunks(g, chunk)
            G = gc.cumsum(3)
        qc, kc = to_chunks(q, chunk), to_chunks(k, chunk)                       # [B,H,n,C,K]
        if not on_v and scale != 1.0:
            qc = qc * scale
        o = _intra_scores_per_key(qc, kc, gc, strict) @ vc                      # [B,H,n,C,V]
        q_in = qc * torch.exp(G)                          # reads the state entering the chunk
        k_out = kc * torch.exp(cumsum_to_end(gc, 3))      # decays each write to the chunk end
        writes = k_out.mT @ vc                            # [B, H, n, K, V] writes of each chunk
        chunk_decay = torch.exp(G[..., -1, :])[..., None]  # [B, H, n, K, 1]
        S_prev, S = _pass_states(chunk_decay.flatten(0, 1), writes.flatten(0, 1),
                                 None if S0 is None else S0.flatten(0, 1))
    o = o.flatten(0, 2).baddbmm_(q_in.flatten(0, 2), S_prev.view(B * H * n, K, -1))
    S = S.view(B, H, K, -1)
    return from_chunks(o.view(B, H, n, chunk, -1), T), (S / scale if on_v else S)


def _rows_decayed_nograd(q_in: Tensor, k_back: Tensor, vc: Tensor, chunk_decay: Tensor,
                        S0: Tensor | None, strict: bool = False) -> tuple[Tensor, Tensor]:
    """The chunked products once the decay rides on the rows, without autograd: ``q_in``
    (``q_i e^{G_i}``), ``k_back`` (``k_j e^{-G_j}``) ``[B, H, n, C, K]``, ``vc [B, H, n, C, V]``,
    ``chunk_decay`` ``e^{G_C}`` ``[B, H, n, K, 1]``, ``S0 [B, H, K, V]`` or None ->
    ``(o [B, H, n, C, V], S [B, H, K, V])``: the intra-chunk scores times v, the writes, the
    chunk-to-chunk pass (each chunk's decay applied after its writes) and the reads of the
    entering states, fused into the scores' output. ``strict`` drops the diagonal pairs."""
    B, H, n, C, K = q_in.shape
    o = (q_in @ k_back.mT).tril_(-int(strict)) @ vc   # Σ_{j<=i} (q_i e^{G_i - G_j})·k_j v_j
    S_prev, S = _pass_states(chunk_decay.flatten(0, 1), (k_back.mT @ vc).flatten(0, 1),
                             None if S0 is None else S0.flatten(0, 1), decay_after=True)
    # (in place: an out-of-place baddbmm copies its input first, about 1.3x the product)
    o = o.flatten(0, 2).baddbmm_(q_in.flatten(0, 2), S_prev.view(B * H * n, K, -1))
    return o.view(B, H, n, C, -1), S.view(B, H, K, -1)


def _intra_scores_per_key(q, k, g, strict=False):
    """Intra-chunk scores ``A[i, j] = Σ_d q_id k_jd e^{G_id - G_jd}`` (j <= i) for per-key decays,
    without the ``exp`` of a large positive number that ``(q e^G)(k e^{-G})ᵀ`` needs.

    The chunk ``[..., C, K]`` is split into ``m`` sub-chunks of ``c`` steps, with ``L`` the log
    decay accumulated inside a sub-chunk and ``Tot`` a sub-chunk's total: ``c`` is the largest of
    16, 8, 4 for which every ``|L| <= FACTOR_LIMIT`` (per-step log decays down to about -7 still
    fit at 4), and then the pairs inside a sub-chunk factor through its start: one matmul
    ``(q e^L)(k e^{-L})ᵀ``. If none fits, the sub-chunks are the largest of those (fewest
    cross-sub-chunk products, measured faster), and column j of their scores takes j itself as
    the reference point: ``e^{L_i - L_j} <= 1`` for the rows
    ``i >= j`` it needs (one ``[..., m, c - j, K]`` product per column, never a ``[c, c, K]``
    tensor). For a key in sub-chunk r before the query's sub-chunk s the decay
    factors through the sub-chunk boundaries into three factors <= 1:
      e^{G_i - G_j} = e^{L_i} · Π_{r<u<s} e^{Tot_u} · e^{Tot_r - L_j}
    so the scores of query sub-chunk s against all earlier keys are one matmul of
    ``q_i e^{L_i}`` with the ``s·c`` keys ``k_j e^{Tot_r - L_j} Π_{r<u<s} e^{Tot_u}`` (only the
    pairs r < s are formed: no ``[m, m, c, K]`` tensor either). ``strict``: zero diagonal
    (pairs j < i only).
    """
    *lead, C, K = q.shape
    tried = []
    for c in sorted({sub_chunk_size(C, size) for size in (16, 8, 4)}, reverse=True):
        L = g.reshape(*lead, C // c, c, K).cumsum(-2)             # [..., m, c, K]
        fits = within_factor_limit(L)
        tried.append((c, L))
        if fits:
            break
    c, L = tried[-1] if fits else tried[0]
    m = C // c
    qs, ks = (x.reshape(*lead, m, c, K) for x in (q, k))          # [..., m, c, K]
    q_dec = qs * exp_fast(L)                                      # sub-chunk start -> i

    if fits:
        # the sub-chunks' own ranges fit: pairs within one sub-chunk factor through its start,
        # (q_i e^{L_i})·(k_j e^{-L_j}), one batched matmul
        diag = (q_dec @ (ks * exp_fast(-L)).mT).tril_()                 # [..., m, c(i), c(j)]
    else:  # pairs within one sub-chunk, column by column
        # L_i - L_j from a float64 L split into two parts (as in decay_matrix): the difference
        # of two rounded cumulative sums of |L| ~ 100s would be off by ~|L|·eps in the exponent
        L64 = g.to(torch.float64).reshape(*lead, m, c, K).cumsum(-2)
        hi = L64.to(q.dtype)
        lo = (L64 - hi).to(q.dtype)
        columns = []
        for j in range(c):
            diff = (hi[..., j:, :] - hi[..., j:j + 1, :]).add_(lo[..., j:, :] - lo[..., j:j + 1, :])
            decay = exp_fast(diff)                                      # [..., m, c - j, K]
            col = (qs[..., j:, :] * decay) @ ks[..., j, :, None]        # [..., m, c - j, 1]
            columns.append(F.pad(col[..., 0], (j, 0)))                  # zeros above the diagonal
        diag = torch.stack(columns, dim=-1)                             # [..., m, c(i), c(j)]
    if strict:
        diag = diag.tril(-1)

    # pairs across sub-chunks: decay factored through the boundaries
    total = L[..., -1, :]                                   # [..., m, K]
    if fits:
        k_dec = ks * torch.exp(total[..., None, :] - L)     # j -> sub-chunk end
    else:  # the same sum, accumulated from the end: no difference of large sums
        k_dec = ks * torch.exp(cumsum_to_end(g.reshape(*lead, m, c, K), -2))
    seg = segsum(total.transpose(-1, -2))                   # [..., K, m, m], Σ_{r<u<=s}
    # Σ_{r<u<s}: row s of the exclusive matrix is row s-1 of the inclusive one
    seg = F.pad(seg, (0, 0, 1, 0), value=-math.inf)[..., :m, :]
    between = torch.exp(seg).movedim(-3, -1)                # [..., m(s), m(r), K]

    # one row block per query sub-chunk s: [cross with sub-chunks r < s | diagonal | zeros]
    rows = []
    for s in range(m):
        keys = k_dec[..., :s, :, :] * between[..., s, :s, None, :]      # [..., s, c, K]
        cross = q_dec[..., s, :, :] @ keys.flatten(-3, -2).mT            # [..., c, s·c]
        rows.append(F.pad(torch.cat([cross, diag[..., s, :, :]], dim=-1), (0, C - (s + 1) * c)))
    return torch.cat(rows, dim=-2)                                       # [..., C, C]


def _chunk_loop_state_decay(q, k, v, g, S0):
    """[K, V] decays: the elementwise scan ``S_t = e^{g_t} ⊙ S_{t-1} + k_t v_tᵀ`` over windows.

    ``g`` is a ``[B, T, H, K|1, V|1]`` log decay or the factors ``(A [H, K, V], dt [B, T, H, V])``.
    Time is cut into windows of ``W`` steps (a power of two, at least 8) holding at most
    :data:`WINDOW_ELEMENTS` state entries ``[B, W, H, K, V]`` where the state allows it (the
    caller's ``chunk_size`` plays no part); each window is one two-level :func:`blocked_scan`
    from the state entering it, and its outputs ``S_tᵀ q_t`` one batched product. So memory is
    O(window · K · V) per head, never O(T · K · V), and the work is a few passes over the window
    in a few dozen ops (a step loop costs one op per step, on a state of a few thousand
    entries: dominated by per-op overhead on a CPU). With autograd each window is one
    :class:`_WindowScan`: its backward recomputes the window's states and runs the adjoint scan
    backwards in time, so no ``[B, T, H, K, V]`` tensor is ever stored either.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if S0 is None else S0
    window = max(8, 2 ** int(math.log2(max(1, WINDOW_ELEMENTS // (B * H * K * V)))))
    A, dt, log_decay = (*g, None) if isinstance(g, tuple) else (None, None, g)
    track = needs_grad(q, k, v, log_decay, A, dt, S)
    # windows by split, not by slicing: a slice's backward writes its gradient into a zero-filled
    # tensor of the whole input (O(T²) over all windows), where split's backward is one cat
    q_, k_, v_, g_, dt_ = ([None] * -(-T // window) if x is None else x.split(window, dim=1)
                           for x in (q, k, v, log_decay, dt))
    outs = []
    for args in zip(q_, k_, v_, g_, dt_):
        args = (*args[:3], S, args[3], A, args[4])
        o, S = _WindowScan.apply(*args) if track else _window_forward(*args)
        outs.append(o)
    return torch.cat(outs, dim=1), S


#: state entries ``[B, W, H, K, V]`` of one window of the ``[K, V]``-decay scan (8 MB in fp32,
#: two or three such buffers alive). Larger windows mean fewer ops (per-op overhead), smaller
#: ones stay in cache; which wins depends on what else loads the machine. Medians of 170
#: interleaved rounds in one process on this (shared) VM, 2^20 / 2^21 / 2^22 entries: with the
#: caches to itself, the [K, V] core case 11.2 / 11.9 / 12.9 ms and the Mamba mixer at T = 2048
#: 154 / 149 / 153 ms; under a neighbour's load 14.5 / 12.6 / 12.4 and 205 / 193 / 172 ms
WINDOW_ELEMENTS = 1 << 21


def _window_decay(k, v, log_decay, A, dt):
    """The decays ``e^{g_t}`` of one window as a contiguous ``[B, W, H, K, V]`` tensor, from
    ``log_decay [B, W, H, K|1, V|1]`` or from the factors ``A [H, K, V]``, ``dt [B, W, H, V]``."""
    shape = (*k.shape, v.shape[-1])
    if log_decay is not None:
        return exp_fast(log_decay).expand(shape).contiguous()
    # operands contiguous first: broadcasting products over strided views (a transposed
    # activation) run several times slower than the copies cost
    dt = dt.contiguous()[:, :, :, None, :]
    if A.dtype == torch.float32:              # e^{A dt} = 2^{(A log2 e) dt}: no extra pass
        return torch.exp2_((A * LOG2E) * dt).expand(shape).contiguous()
    return torch.exp(A * dt).expand(shape).contiguous()


def _window_writes(k, v):
    """``k_t v_tᵀ`` of one window: ``[B, W, H, K, V]``."""
    return k.contiguous()[..., :, None] * v.contiguous()[..., None, :]


def _window_forward(q, k, v, S, log_decay, A, dt):
    """One window without autograd: q, k ``[B, W, H, K]``, v ``[B, W, H, V]``, S ``[B, H, K, V]``
    -> ``(o [B, W, H, V], S at the window end)``: the states by :func:`blocked_scan` (written
    over the decay and write buffers), then ``o_t = S_tᵀ q_t`` in one batched product."""
    states = blocked_scan(_window_decay(k, v, log_decay, A, dt), _window_writes(k, v), S,
                          scratch=True)                             # [B, W, H, K, V]
    o = (q[..., None, :] @ states)[..., 0, :]                      # S_tᵀ q_t: [B, W, H, V]
    return o, states[:, -1].clone()                                # not a view of the window


class _WindowScan(torch.autograd.Function):
    """One window of the ``[K, V]``-decay scan with a hand-written backward (autograd through the
    blocked scan's step loop costs about 20x its forward). With ``a_t = e^{g_t}``, the adjoint
    ``Λ_t = ∂L/∂S_t`` (``S_t`` feeds ``o_t``, ``S_{t+1}`` and, for the last step, the state
    leaving the window) is ``Λ_t = a_{t+1} ⊙ Λ_{t+1} + q_t do_tᵀ`` with ``Λ_W = dS_end``. The
    backward scans ``μ_t = a_t ⊙ Λ_t`` instead, whose multiplier is ``a_t`` itself:

        μ_t = a_t ⊙ μ_{t+1} + a_t ⊙ q_t do_tᵀ,      μ_W = dS_end

    one more :func:`blocked_scan`, backwards in time (no shifted or flipped copies). Then
    ``Λ_t = μ_{t+1} + q_t do_tᵀ`` gives ``dk_t = μ_{t+1} v_t + q_t (do_t·v_t)`` and
    ``dv_t = μ_{t+1}ᵀ k_t + do_t (q_t·k_t)``; ``dq_t = S_t do_t``, ``dS_in = μ_0``, and the
    gradient of the log decay is ``Λ_t ⊙ a_t ⊙ S_{t-1} = μ_t ⊙ S_{t-1}`` (summed over its
    broadcast dims; for the factors, ``dA = Σ X_t dt_t`` and ``d dt_t = Σ_k A ⊙ X_t``). The
    states are recomputed from the saved window inputs, so nothing of size ``[B, W, H, K, V]``
    outlives the window."""

    @staticmethod
    def forward(ctx, q, k, v, S, log_decay, A, dt):
        ctx.save_for_backward(q, k, v, S, log_decay, A, dt)
        ctx.set_materialize_grads(False)
        return _window_forward(q, k, v, S, log_decay, A, dt)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_end):
        q, k, v, S, log_decay, A, dt = ctx.saved_tensors
        if do is None:
            do = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        a = _window_decay(k, v, log_decay, A, dt)                   # [B, W, H, K, V]
        states = blocked_scan(a.clone(), _window_writes(k, v), S, scratch=True)
        # matrix-vector products by einsum: matmul batches them as [K, V] @ [V, 1], 10x slower
        dq = torch.einsum("bthkv,bthv->bthk", states, do)           # S_t do_t
        mu = blocked_scan(a, _window_writes(q, do).mul_(a), dS_end, scratch=True, reverse=True)
        dS = mu[:, 0].clone()
        dk = q * (do * v).sum(-1, keepdim=True)                      # q_t (do_t·v_t)
        dv = do * (q * k).sum(-1, keepdim=True)                      # do_t (q_t·k_t)
        dk[:, :-1] += torch.einsum("bthkv,bthv->bthk", mu[:, 1:], v[:, :-1])
        dv[:, :-1] += torch.einsum("bthk,bthkv->bthv", k[:, :-1], mu[:, 1:])
        if dS_end is not None:
            dk[:, -1] += torch.einsum("bhkv,bhv->bhk", dS_end, v[:, -1])
            dv[:, -1] += torch.einsum("bhk,bhkv->bhv", k[:, -1], dS_end)
        # X_t = μ_t ⊙ S_{t-1}, written over μ
        mu[:, 1:].mul_(states[:, :-1])
        mu[:, 0].mul_(S)
        X = mu
        dlog = dA = ddt = None
        if log_decay is not None:
            dlog = X.sum_to_size(log_decay.shape)
        else:
            # elementwise products and sums (einsum picks a bmm batched over V here: 20x slower)
            if ctx.needs_input_grad[5]:
                dA = (X * dt[:, :, :, None, :]).sum((0, 1)).sum_to_size(A.shape)
            if ctx.needs_input_grad[6]:
                ddt = (X * A).sum(-2)
        return dq, dk, dv, dS, dlog, dA, ddt
