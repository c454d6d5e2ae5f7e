"""Numerics of the cores in seqdsl.ops.

For every core: the fast (chunked / parallel) form against the sequential reference, both against
a float64 golden (the reference run in float64), and both against the independent pure-PyTorch
references of flash-linear-attention (a test-only dependency, skipped when missing). Invariances:
T = 1, T not a multiple of the chunk, every chunk size agreeing, initial and final states, packed
``cu_seqlens`` equal to a loop over sequences, gradients (initial state included), low precision.
Sizes stay tiny (B <= 2, T <= 100, H <= 4, K, V <= 16) so the file runs in seconds on a CPU.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from seqdsl import ops
from seqdsl.ops.tolerances import TOLERANCES, assert_close, errors

FP32, FP64 = torch.float32, torch.float64
B, H, K, V = 2, 2, 8, 6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=FP32):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _widen(x):
    """float -> float64, complex -> complex128; anything else unchanged."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_complex():
        return x.to(torch.complex128)
    return x.to(FP64) if x.is_floating_point() else x


def _cast(inputs: dict, fn=_widen) -> dict:
    return {name: fn(x) for name, x in inputs.items()}


# ---------------------------------------------------------------------------------------------
# the cores as uniform test cases: make(T, seed) -> (sequence inputs, initial state, options)
# ---------------------------------------------------------------------------------------------

def _qkv(T, seed, K=K, V=V, H=H, B=B):
    return dict(q=_randn(B, T, H, K, seed=seed), k=_randn(B, T, H, K, seed=seed + 1),
                v=_randn(B, T, H, V, seed=seed + 2))


def _log_gate(*shape, seed):
    """Typical log-space gates: logsigmoid of a shifted normal (decays from ~0.3 to ~1)."""
    return F.logsigmoid(_randn(*shape, seed=seed) + 2.0)


def make_scan(T, seed, complex_=False):
    if complex_:
        mag = torch.sigmoid(_randn(B, T, 12, seed=seed) + 2)
        a = torch.polar(mag, _randn(B, T, 12, seed=seed + 1))
        b = torch.complex(_randn(B, T, 12, seed=seed + 2), _randn(B, T, 12, seed=seed + 3))
        h0 = torch.complex(_randn(B, 12, seed=seed + 4), _randn(B, 12, seed=seed + 5))
    else:
        a = torch.sigmoid(_randn(B, T, 12, seed=seed) + 2)
        b, h0 = _randn(B, T, 12, seed=seed + 2), _randn(B, 12, seed=seed + 4)
    return dict(a=a, b=b), h0, {}


def make_linear(T, seed, decay):
    x = _qkv(T, seed)
    shapes = {"none": None, "scalar": (B, T, H), "key": (B, T, H, K), "key_value": (B, T, H, K, V)}
    x["log_decay"] = None if shapes[decay] is None else _log_gate(*shapes[decay], seed=seed + 3)
    return x, _randn(B, H, K, V, seed=seed + 4), {}


def make_complex(T, seed, complex_qk=False):
    x = _qkv(T, seed)
    if complex_qk:
        x["q"] = torch.complex(x["q"], _randn(B, T, H, K, seed=seed + 5))
        x["k"] = torch.complex(x["k"], _randn(B, T, H, K, seed=seed + 6))
    x["log_magnitude"] = _log_gate(B, T, H, K, seed=seed + 3)
    x["phase"] = math.pi * _randn(B, T, H, K, seed=seed + 4)
    h0 = torch.complex(_randn(B, H, K, V, seed=seed + 7), _randn(B, H, K, V, seed=seed + 8))
    return x, h0, {}


def make_delta(T, seed, gated):
    x = _qkv(T, seed)
    x["k"] = F.normalize(x["k"], dim=-1)
    x["beta"] = 2 * torch.sigmoid(_randn(B, T, H, seed=seed + 3))  # (0, 2): negative eigenvalues
    x["log_decay"] = _log_gate(B, T, H, seed=seed + 4) if gated else None
    return x, _randn(B, H, K, V, seed=seed + 5), {}


def make_product(T, seed, steps):
    x = dict(q=_randn(B, T, H, K, seed=seed),
             k=F.normalize(_randn(B, T, steps, H, K, seed=seed + 1), dim=-1),
             v=_randn(B, T, steps, H, V, seed=seed + 2),
             beta=2 * torch.sigmoid(_randn(B, T, steps, H, seed=seed + 3)),
             log_decay=_log_gate(B, T, H, seed=seed + 4))
    return x, _randn(B, H, K, V, seed=seed + 5), {"steps": steps}


def make_attention(T, seed, heads=3, kv_heads=1, **options):
    x = dict(q=_randn(B, T, heads, K, seed=seed), k=_randn(B, T, kv_heads, K, seed=seed + 1),
             v=_randn(B, T, kv_heads, V, seed=seed + 2))
    return x, None, options


def _attention_fast(initial_state=None, output_final_state=False, chunk_size=64, **kw):
    return ops.attention(block_size=chunk_size, **kw), None


def _attention_ref(initial_state=None, output_final_state=False, **kw):
    return ops.attention_ref(**kw), None


def _product_ref(**kw):
    return ops.delta_interleave(reference=True, **kw)


@dataclass
class Case:
    fast: Callable
    ref: Callable
    make: Callable
    chunked: bool = True            # the fast form takes chunk_size
    kwargs: dict = field(default_factory=dict)
    stateful: bool = True           # has an initial / final state


CASES = {
    "scan": Case(ops.scan, ops.scan_ref, make_scan, chunked=False),
    "scan_complex": Case(ops.scan, ops.scan_ref, make_scan, chunked=False,
                         kwargs={"complex_": True}),
    "linear_none": Case(ops.linear, ops.linear_ref, make_linear, kwargs={"decay": "none"}),
    "linear_scalar": Case(ops.linear, ops.linear_ref, make_linear, kwargs={"decay": "scalar"}),
    "linear_key": Case(ops.linear, ops.linear_ref, make_linear, kwargs={"decay": "key"}),
    "linear_key_value": Case(ops.linear, ops.linear_ref, make_linear,
                             kwargs={"decay": "key_value"}),
    "linear_complex": Case(ops.linear_complex, ops.linear_complex_ref, make_complex),
    "linear_complex_qk": Case(ops.linear_complex, ops.linear_complex_ref, make_complex,
                              kwargs={"complex_qk": True}),
    "delta": Case(ops.delta, ops.delta_ref, make_delta, kwargs={"gated": False}),
    "delta_gated": Case(ops.delta, ops.delta_ref, make_delta, kwargs={"gated": True}),
    "delta_steps2": Case(ops.delta_interleave, _product_ref, make_product, kwargs={"steps": 2}),
    "delta_steps3": Case(ops.delta_interleave, _product_ref, make_product, kwargs={"steps": 3}),
    "attention_mqa": Case(_attention_fast, _attention_ref, make_attention, stateful=False),
    "attention_gqa_window_rope_cap": Case(
        _attention_fast, _attention_ref, make_attention, stateful=False,
        kwargs=dict(heads=4, kv_heads=2, window=7, rope_theta=500.0, softcap=3.0)),
}
CHUNKED = [name for name, case in CASES.items() if case.chunked]
STATEFUL = [name for name, case in CASES.items() if case.stateful]


def _run(case: Case, fn: Callable, inputs: dict, h0, options: dict, chunk=None, **kw):
    extra = {} if chunk is None or not case.chunked or fn is case.ref else {"chunk_size": chunk}
    return fn(**inputs, initial_state=h0, output_final_state=h0 is not None, **options, **extra,
              **kw)


def _build(name, T, seed=0):
    case = CASES[name]
    inputs, h0, options = case.make(T, seed, **case.kwargs)
    return case, inputs, h0, options


# ---------------------------------------------------------------------------------------------
# fast vs reference vs float64 golden
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 37, 100])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_matches_reference_and_golden(name, T):
    case, inputs, h0, options = _build(name, T)
    o, S = _run(case, case.fast, inputs, h0, options, chunk=16)
    o_ref, S_ref = _run(case, case.ref, inputs, h0, options)
    o_gold, S_gold = _run(case, case.ref, _cast(inputs), _widen(h0), options)
    o64, S64 = _run(case, case.fast, _cast(inputs), _widen(h0), options, chunk=16)
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    assert_close(o, o_ref, FP32, f"{name} fast vs reference")
    assert_close(o, o_gold, FP32, f"{name} fast vs golden")
    assert_close(o_ref, o_gold, FP32, f"{name} reference vs golden")
    assert_close(o64, o_gold, FP64, f"{name} fast in float64 vs golden")
    if h0 is not None:
        assert S.dtype in (torch.float32, torch.complex64), "final state accumulates in fp32"
        assert_close(S, S_gold, FP32, f"{name} final state vs golden")
        assert_close(S_ref, S_gold, FP32, f"{name} reference final state vs golden")
        assert_close(S64, S_gold, FP64, f"{name} final state in float64 vs golden")


@pytest.mark.parametrize("name", CHUNKED)
def test_every_chunk_size_agrees(name):
    case, inputs, h0, options = _build(name, 100, seed=1)
    o_gold, S_gold = _run(case, case.ref, _cast(inputs), _widen(h0), options)
    for chunk in (8, 16, 32, 64, 128):
        o, S = _run(case, case.fast, inputs, h0, options, chunk=chunk)
        assert_close(o, o_gold, FP32, f"{name} chunk {chunk}")
        if S is not None:
            assert_close(S, S_gold, FP32, f"{name} chunk {chunk} final state")


def test_no_initial_state_and_no_final_state():
    x, _, _ = make_linear(20, 0, "key")
    o, S = ops.linear(**x)
    o_ref, _ = ops.linear_ref(**x)
    assert S is None
    assert_close(o, o_ref, FP32, "linear without states")


@pytest.mark.parametrize("name", STATEFUL)
def test_chunk_by_chunk_with_carried_state_equals_full(name):
    case, inputs, h0, options = _build(name, 60, seed=2)
    o_full, S_full = _run(case, case.fast, inputs, h0, options, chunk=16)
    first = {n: x[:, :25] if isinstance(x, torch.Tensor) else x for n, x in inputs.items()}
    second = {n: x[:, 25:] if isinstance(x, torch.Tensor) else x for n, x in inputs.items()}
    o1, S1 = _run(case, case.fast, first, h0, options, chunk=16)
    o2, S2 = _run(case, case.fast, second, S1, options, chunk=16)
    assert_close(torch.cat([o1, o2], dim=1), o_full, FP32, f"{name} split in two")
    assert_close(S2, S_full, FP32, f"{name} split in two, final state")


# ---------------------------------------------------------------------------------------------
# packed variable-length sequences
# ---------------------------------------------------------------------------------------------

LENGTHS = (13, 1, 37, 29)


def _pack(inputs: dict, lengths) -> dict:
    """Batch row i, first lengths[i] steps -> one packed batch-1 sequence."""
    return {n: torch.cat([x[i:i + 1, :L] for i, L in enumerate(lengths)], dim=1)
            if isinstance(x, torch.Tensor) else x for n, x in inputs.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_cu_seqlens_equals_loop_over_sequences(name):
    case = CASES[name]
    N = len(LENGTHS)
    per_seq = [case.make(max(LENGTHS), seed=10 + i, **case.kwargs) for i in range(N)]
    options = per_seq[0][2]
    # row 0 of each draw: [N, max(LENGTHS), ...] and initial states [N, ...]
    batched = {n: torch.cat([s[0][n][:1] for s in per_seq], dim=0) if per_seq[0][0][n] is not None
               else None for n in per_seq[0][0]}
    h0 = None if per_seq[0][1] is None else torch.cat([s[1][:1] for s in per_seq], dim=0)
    packed = _pack(batched, LENGTHS)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    for fn in (case.fast, case.ref):
        o, S = _run(case, fn, packed, h0, options, chunk=16, cu_seqlens=cu)
        outs, finals = [], []
        for i, L in enumerate(LENGTHS):
            one = {n: x[i:i + 1, :L] if isinstance(x, torch.Tensor) else x
                   for n, x in batched.items()}
            o_i, S_i = _run(case, fn, one, None if h0 is None else h0[i:i + 1], options, chunk=16)
            outs.append(o_i)
            finals.append(S_i)
        assert_close(o, torch.cat(outs, dim=1), FP32, f"{name} packed vs loop")
        if h0 is not None:
            assert S.shape[0] == N
            assert_close(S, torch.cat(finals), FP32, f"{name} packed final states vs loop")


def test_cu_seqlens_with_an_empty_sequence_keeps_its_initial_state():
    x, h0, _ = make_delta(20, 0, gated=True)
    one = {n: v[:1] for n, v in x.items()}
    cu = torch.tensor([0, 8, 8, 20])
    h0 = _randn(3, H, K, V, seed=9)
    o, S = ops.delta(**one, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == one["v"].shape
    assert torch.equal(S[1], h0[1])


# ---------------------------------------------------------------------------------------------
# gradients (non-trivial loss on outputs and final state; initial state included)
# ---------------------------------------------------------------------------------------------

def _weighted_sum(x: torch.Tensor, seed: int) -> torch.Tensor:
    x = torch.view_as_real(x) if x.is_complex() else x
    return (x * _randn(*x.shape, seed=seed).to(x.dtype)).sum()  # same weights in every dtype


def _grads(case, fn, inputs, h0, options, chunk=None):
    leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()
              if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())}
    args = {**inputs, **leaves}
    state = None if h0 is None else h0.clone().requires_grad_(True)
    o, S = _run(case, fn, args, state, options, chunk=chunk)
    loss = _weighted_sum(o, 100) + (0 if S is None else _weighted_sum(S, 101))
    wrt = [*leaves.values()] + ([] if state is None else [state])
    names = [*leaves] + ([] if state is None else ["initial_state"])
    return dict(zip(names, torch.autograd.grad(loss, wrt)))


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_reference(name):
    case, inputs, h0, options = _build(name, 45, seed=3)
    fast = _grads(case, case.fast, inputs, h0, options, chunk=16)
    ref = _grads(case, case.ref, inputs, h0, options)
    gold = _grads(case, case.ref, _cast(inputs), _widen(h0), options)
    if h0 is not None:
        assert "initial_state" in fast
    for n in gold:
        assert_close(fast[n], ref[n], FP32, f"{name} d/d{n} fast vs reference")
        assert_close(fast[n], gold[n], FP32, f"{name} d/d{n} fast vs golden")


# ---------------------------------------------------------------------------------------------
# low precision: fp32 accumulation, outputs in the input dtype
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["scan", "linear_key", "linear_scalar", "delta_gated",
                                  "linear_complex", "attention_gqa_window_rope_cap"])
def test_low_precision_inputs(name, dtype):
    case, inputs, h0, options = _build(name, 64, seed=4)
    low = _cast(inputs, lambda x: x.to(dtype) if isinstance(x, torch.Tensor)
                and x.is_floating_point() else x)
    o, S = _run(case, case.fast, low, h0, options, chunk=16)
    o_gold, S_gold = _run(case, case.ref, _cast(low), _widen(h0), options)
    assert o.dtype == dtype
    assert_close(o, o_gold, dtype, f"{name} in {dtype}")
    if S is not None:
        assert S.dtype in (torch.float32, torch.complex64)
        assert_close(S, S_gold, FP32, f"{name} final state from {dtype} inputs")


# ---------------------------------------------------------------------------------------------
# numerical robustness
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_strong_decays_do_not_overflow(decay):
    """Log decays down to -60 per step (products far below fp32's range): no inf/NaN."""
    x, h0, _ = make_linear(100, 5, decay)
    strong = -60 * torch.rand(x["log_decay"].shape, generator=_gen(6)) ** 3
    x["log_decay"] = torch.where(torch.rand(strong.shape, generator=_gen(7)) < 0.5, strong,
                                 -1e-3 * torch.rand(strong.shape, generator=_gen(8)))
    o, S = ops.linear(**x, initial_state=h0, output_final_state=True, chunk_size=64)
    o_gold, S_gold = ops.linear_ref(**_cast(x), initial_state=_widen(h0), output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert_close(o, o_gold, FP32, f"{decay} strong decay")
    assert_close(S, S_gold, FP32, f"{decay} strong decay final state")
    grads = torch.autograd.grad(ops.linear(**{**x, "q": x["q"].requires_grad_()})[0].sum(),
                                x["q"])
    assert torch.isfinite(grads[0]).all()


def _decay_errors(decay, rate, heads=None):
    """Chunked vs float64 loop for ``decay`` ("key" or "scalar") log decays of about -rate per
    step, q/k cut to ``heads`` heads if given: the outputs, the final state and every gradient,
    through a loss on both, as (name, actual, expected) triples."""
    x, h0, _ = make_linear(70, 15, decay)
    if heads is not None:
        x["q"], x["k"] = x["q"][:, :, :heads].clone(), x["k"][:, :, :heads].clone()
    x["log_decay"] = -rate * (0.5 + torch.rand(x["log_decay"].shape, generator=_gen(16)))
    x = {n: t.requires_grad_() for n, t in x.items()}
    h0.requires_grad_()
    o, S = ops.linear(**x, initial_state=h0, output_final_state=True, chunk_size=64)
    o_gold, S_gold = ops.linear_ref(**_cast(x), initial_state=_widen(h0), output_final_state=True)
    w, w_S = torch.randn(o.shape, generator=_gen(17)), torch.randn(S.shape, generator=_gen(18))
    leaves = [*x.values(), h0]
    grads = torch.autograd.grad((o * w).sum() + (S * w_S).sum(), leaves)
    gold = torch.autograd.grad((o_gold * w.double()).sum() + (S_gold * w_S.double()).sum(), leaves)
    x["initial_state"] = h0
    return [("output", o, o_gold), ("final state", S, S_gold),
            *((f"gradient of {n}", a, b) for n, a, b in zip(x, grads, gold))]


@pytest.mark.parametrize("rate", [1.0, 2.5, 5.0, 12.0])
def test_per_key_decay_sub_chunk_sizes(rate):
    """Per-key log decays of about -rate per step overflow the chunk-wide factors; the intra-chunk
    scores then factor through sub-chunks of 16, 8 or 4 steps, whichever range fits (1.0, 2.5,
    5.0), or fall back to exact pairwise decays (12.0). Outputs, state and every gradient against
    the float64 loop, through a loss on both the output and the final state: the decay's own
    gradient is of order e^{-rate} while its naive form (q·dq - k·dk) cancels O(1) terms, so this
    fails without the strict form plus own writes (it measured 1.2e-5 at -2.5/step, 1.8e-3 at
    -12)."""
    for name, actual, expected in _decay_errors("key", rate):
        assert_close(actual, expected, FP32, f"per-key decay ~{-rate}/step: {name}")


def _gradcheck_chunked(monkeypatch, core, leaves, n_inputs, with_state, second_order=False):
    """``torch.autograd.gradcheck`` (and ``gradgradcheck`` with ``second_order``) of
    ``core(*leaves[:n_inputs], initial_state=leaves[n_inputs] if given,
    output_final_state=with_state)`` at chunk size 4, with segments of 8 steps (the
    time split of :func:`over_segments` exercised: T = 21 runs as 8, 8, 5)."""
    def f(*xs):
        rest = xs[n_inputs:]
        o, S = core(*xs[:n_inputs], initial_state=rest[0] if rest else None,
                    output_final_state=with_state, chunk_size=4)
        return (o, S) if with_state else o

    chunking = importlib.import_module("seqdsl.ops._chunking")
    monkeypatch.setattr(chunking, "SEGMENT_MIN_CHUNKS", 2)
    monkeypatch.setattr(chunking, "SEGMENT_CHUNKS", 1)
    assert torch.autograd.gradcheck(f, leaves)
    if second_order:        # double backward through the decay too (no custom backward)
        assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [1, 2])
def test_fast_forms_leave_their_inputs_unchanged(name, dtype, heads):
    """No fast form writes into its inputs or initial state (in-place work stays on its own
    buffers): one head, where a chunk-layout copy of an input can come back as a view of it,
    and two; fp32 (the base-2 decay path) and float64."""
    case = CASES[name]
    # T a multiple of the chunk: no padding copy before the chunk layout
    x, h0, options = case.make(48, 1, **case.kwargs)
    if heads == 1 and name.startswith(("scan", "attention")):
        pytest.skip("no head dim to narrow (scan), kv heads = 1 already (attention)")

    def head_dim(key):
        if key == "h0":
            return 1
        return 3 if name.startswith("delta_steps") and key in ("k", "v", "beta") else 2

    def to(t, key):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() and not t.is_complex():
            return t
        if heads == 1:
            t = t.narrow(head_dim(key), 0, 1)
        return t.to((torch.complex64 if dtype == torch.float32 else torch.complex128)
                    if t.is_complex() else dtype).contiguous()
    x, h0 = {key: to(t, key) for key, t in x.items()}, to(h0, "h0")
    before = {n: t.clone() for n, t in x.items() if isinstance(t, torch.Tensor)}
    h0_before = None if h0 is None else h0.clone()
    with torch.no_grad():
        _run(case, case.fast, x, h0, options, chunk=16)
    for n, t in before.items():
        assert torch.equal(x[n], t), f"{name}: input {n} modified"
    assert h0 is None or torch.equal(h0, h0_before), f"{name}: initial state modified"


@pytest.mark.parametrize("C, block", [(32, 8), (12, 8)], ids=["blocked", "solve_triangular"])
def test_unit_lower_solve_and_its_backward(C, block):
    """``delta``'s triangular solve ``(I + A)⁻¹ R`` (only A's strictly lower part read) and its
    transposed solve against ``torch.linalg.solve_triangular``, blocked (four diagonal blocks)
    or not; the hand-written backward (blocked backward substitution with the forward's
    diagonal-block inverses) and the double backward (the flipped system) against finite
    differences, float64."""
    delta_mod = importlib.import_module("seqdsl.ops.delta")
    g = _gen(41)
    A = 0.3 * torch.randn(2, C, C, generator=g, dtype=torch.float64)   # upper part: noise
    R = torch.randn(2, C, 3, generator=g, dtype=torch.float64)
    unit = torch.eye(C, dtype=torch.float64) + A.tril(-1)
    expected = torch.linalg.solve_triangular(unit, R, upper=False)
    expected_t = torch.linalg.solve_triangular(unit.mT, R, upper=True)
    assert_close(delta_mod._solve_forward(A, R, block), expected, FP64, "forward solve")
    assert_close(delta_mod._solve_transposed(A, R, block), expected_t, FP64, "transposed solve")
    leaves = (A.clone().requires_grad_(), R.clone().requires_grad_())

    def f(a, r):
        return delta_mod._UnitLowerSolve.apply(a, r, block)

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("C, block", [(8, 4), (4, 16)], ids=["blocked", "solve_triangular"])
@pytest.mark.parametrize("strict, with_state", [(False, True), (True, True), (False, False)])
def test_delta_core_backward_gradcheck(monkeypatch, C, block, strict, with_state):
    """The hand-written backward of `delta`'s chunk core (``_DeltaCore``: the solve, the
    scores' products, the chunk-to-chunk pass and the reads) against finite differences in
    float64, output by output, strict or not, with and without an initial state, with the
    blocked solve (two diagonal blocks) and without; and its double backward (the forward
    recomposed with autograd)."""
    delta_mod = importlib.import_module("seqdsl.ops.delta")
    monkeypatch.setattr(delta_mod, "SOLVE_BLOCK", block)
    n, N, K, V = 3, 2, 3, 2                          # (chunk-major: [n, N, ...])
    q_in, k_out = (_randn(n, N, C, K, seed=s).double() for s in (1, 2))
    P, A = (0.5 * _randn(n, N, C, C, seed=s).double() for s in (3, 4))   # upper parts: noise
    rhs = _randn(n, N, C, V + K, seed=5).double()
    gamma = torch.rand(n, N, 1, 1, generator=_gen(6)).double()
    S0 = _randn(N, K, V, seed=7).double() if with_state else None
    xs = [x.requires_grad_() if x is not None else None
          for x in (q_in, P, A, rhs, k_out, gamma, S0)]
    leaves = [x for x in xs if x is not None]

    def f(*ls):
        it = iter(ls)
        args = [None if x is None else next(it) for x in xs]
        args[1] = args[1].tril()                     # causal scores (A: only read below)
        return delta_mod._DeltaCore.apply(*args, strict)

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("decay", ["none", "scalar", "key"])
@pytest.mark.parametrize("strict, with_state", [(False, True), (True, True), (False, False)])
def test_chunked_form_backward_gradcheck(decay, strict, with_state):
    """The hand-written backward of the chunked `linear` matmul core (``_ChunkedForm``) against
    finite differences in float64, output by output (so each runs with the other's gradient
    absent): no, scalar and per-key chunk decays, strict or not, with and without an initial
    state; and its double backward (the recomposed products)."""
    form = importlib.import_module("seqdsl.ops.linear")._ChunkedForm
    N, n, C, K, V = 2, 3, 4, 3, 2
    q, k = (_randn(N, n, C, K, seed=s).double() for s in (1, 2))
    v = _randn(N, n, C, V, seed=3).double()
    d = {"none": None, "scalar": torch.rand(N, n, 1, 1, generator=_gen(4)).double(),
         "key": torch.rand(N, n, K, 1, generator=_gen(4)).double()}[decay]
    S0 = _randn(N, K, V, seed=5).double() if with_state else None
    xs = [x.requires_grad_() if x is not None else None for x in (q, k, v, d, S0)]
    leaves = [x for x in xs if x is not None]

    def f(*ls):
        it = iter(ls)
        return form.apply(*[None if x is None else next(it) for x in xs], strict)

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("decay, heads", [("key", 2), ("scalar", 2), ("scalar", 1)])
@pytest.mark.parametrize("rate, with_state", [(0.3, True), (12.0, True), (0.3, False)])
def test_decay_gradcheck(monkeypatch, decay, heads, rate, with_state):
    """The decay's gradient (strict form plus own writes, :func:`strict_last_step_apart`)
    against finite differences in float64: per-key and scalar decays, q/k per value head or
    shared by two (``heads`` = 1), several chunks and time segments, the factored (0.3/step)
    and decay-matrix / pairwise (12/step) paths, with and without an initial state, the final
    state used by the loss or not returned."""
    T, H, K, V = 21, 2, 3, 2
    q, k = (_randn(1, T, heads, K, seed=s).double() for s in (1, 2))
    v = _randn(1, T, V, H, seed=3).double().transpose(2, 3)      # not contiguous
    shape = (1, T, H, K) if decay == "key" else (1, T, H)
    g = (-rate * (0.5 + torch.rand(shape, generator=_gen(4)))).double()
    S0 = _randn(1, H, K, V, seed=5).double() if with_state else None
    leaves = [x.requires_grad_() for x in (q, k, v, g, S0) if x is not None]

    _gradcheck_chunked(monkeypatch, ops.linear, leaves, 4, with_state)


@pytest.mark.parametrize("heads", [H, 1])
@pytest.mark.parametrize("rate", [0.1, 1.0, 3.0, 8.0])
def test_scalar_decay_gradients_strong(rate, heads):
    """Scalar log decays of about -rate per step (factored path at 0.1, decay-matrix path from
    -1 on): output, final state and every gradient against the float64 loop, q/k per value
    head or one q/k head shared by all. The decay's gradient measured 8e-6 at -3/step and 1e-4
    at -8/step through plain autograd (a cancellation of the diagonal pairs)."""
    for name, actual, expected in _decay_errors("scalar", rate, heads):
        assert_close(actual, expected, FP32, f"scalar decay ~{-rate}/step: {name}")


@pytest.mark.parametrize("rate", [0.1, 3.0])
def test_scalar_decay_groups_of_value_heads(rate):
    """q/k in two groups, each shared by three value heads (Mamba-2 with ``n_groups`` = 2), a
    scalar decay per value head: within the factor limit (0.1/step: the decay on v and on the
    output, through ``chunked_form``) and beyond it (3/step: centred factors per value head).
    Output, final state and every gradient against the float64 loop, T = 70 at chunk 16."""
    T, Hq, Hv = 70, 2, 6
    x = dict(q=_randn(B, T, Hq, K, seed=1), k=_randn(B, T, Hq, K, seed=2),
             v=_randn(B, T, Hv, V, seed=3),
             log_decay=-rate * (0.5 + torch.rand(B, T, Hv, generator=_gen(4))))
    h0 = _randn(B, Hv, K, V, seed=5).requires_grad_()
    x = {n: t.requires_grad_() for n, t in x.items()}
    o, S = ops.linear(**x, initial_state=h0, output_final_state=True, chunk_size=16)
    o_gold, S_gold = ops.linear_ref(**_cast(x), initial_state=_widen(h0), output_final_state=True)
    w, w_S = torch.randn(o.shape, generator=_gen(6)), torch.randn(S.shape, generator=_gen(7))
    leaves = [*x.values(), h0]
    grads = torch.autograd.grad((o * w).sum() + (S * w_S).sum(), leaves)
    gold = torch.autograd.grad((o_gold * w.double()).sum() + (S_gold * w_S.double()).sum(),
                               leaves)
    assert_close(o, o_gold, FP32, f"groups, ~{-rate}/step: output")
    assert_close(S, S_gold, FP32, f"groups, ~{-rate}/step: final state")
    for name, a, b in zip([*x, "initial_state"], grads, gold):
        assert_close(a, b, FP32, f"groups, ~{-rate}/step: gradient of {name}")


def _strong_gate_gradient(core, rate):
    """(actual, gold) gradient of the gate that ``core`` ('delta': the scalar gate; 'complex':
    the phase) of log decays ~-rate per step, the loss on output and final state."""
    if core == "delta":
        x, h0, _ = make_delta(70, 15, gated=True)
        x["log_decay"] = -rate * (0.5 + torch.rand(x["log_decay"].shape, generator=_gen(16)))
        fast, ref, gate = ops.delta, ops.delta_ref, "log_decay"
    else:
        x, h0, _ = make_complex(70, 15)
        x["log_magnitude"] = -rate * (0.5 + torch.rand(x["phase"].shape, generator=_gen(16)))
        fast, ref, gate = ops.linear_complex, ops.linear_complex_ref, "phase"
    x = {n: t.requires_grad_() for n, t in x.items() if t is not None}
    o, S = fast(**x, initial_state=h0, output_final_state=True)
    o_gold, S_gold = ref(**_cast(x), initial_state=_widen(h0), output_final_state=True)
    w = torch.randn(o.shape, generator=_gen(17))
    grad = torch.autograd.grad((o * w).sum() + S.abs().sum(), x[gate])[0]
    gold = torch.autograd.grad((o_gold * w.double()).sum() + S_gold.abs().sum(), x[gate])[0]
    return grad, gold


@pytest.mark.parametrize("rate", [0.5, 3.0, 8.0])
def test_delta_strong_gate_gradient(rate):
    """delta's gate gradient under strong gates against the float64 loop (loss on output and
    final state): plain autograd measured 1.2e-5 at -3/step and 1.1e-4 at -8/step."""
    grad, gold = _strong_gate_gradient("delta", rate)
    assert_close(grad, gold, FP32, f"delta: gate gradient at ~-{rate}/step")


@pytest.mark.parametrize("gate", [-20.0, -25.0, -30.0])
def test_delta_gate_gradient_on_the_decay_matrix_path(gate):
    """A constant gate this strong takes the decay-matrix form; its gradient (loss on the
    output only, so it is ~e^{gate}) was 7e-4 off at -25/step and 0.18 at -30 while the
    decay matrix's diagonal e^{G_i - G_i} = 1 carried a gradient that cancels only to rounding."""
    B, T, H, K, V = 1, 16, 1, 16, 8
    q, v = _randn(B, T, H, K, seed=1), _randn(B, T, H, V, seed=3)
    k = F.normalize(_randn(B, T, H, K, seed=2), dim=-1)
    beta = 2 * torch.rand(B, T, H, generator=_gen(4))
    w = _randn(B, T, H, V, seed=5).double()

    def grad(fn, dtype, **kw):
        g = torch.full((B, T, H), gate, dtype=dtype, requires_grad=True)
        o, _ = fn(q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), g, **kw)
        return torch.autograd.grad((o.double() * w).sum(), g)[0]

    assert_close(grad(ops.delta, torch.float32, chunk_size=16),
                 grad(ops.delta_ref, torch.float64), FP32, f"delta: gate gradient at {gate}/step")


@pytest.mark.parametrize("rate", [0.2, 0.5, 3.0, 8.0])
def test_complex_strong_decay_phase_gradient(rate):
    """linear_complex's phase gradient under strong decays against the float64 loop (loss on
    output and final state): plain autograd through the lowered form measured 6e-6 at -3/step
    and 3.4e-4 at -8/step. At -0.2/step every chunk stays within the factor limit (the
    chunk-layout training form, ``_chunked_grad``); beyond, the generic lowering."""
    grad, gold = _strong_gate_gradient("complex", rate)
    assert_close(grad, gold, FP32, f"complex: phase gradient at ~-{rate}/step")


@pytest.mark.parametrize("T, complex_qk", [(21, False), (21, True), (1, False)])
@pytest.mark.parametrize("rate, with_state", [(0.3, True), (12.0, True), (0.3, False)])
def test_complex_gradcheck(monkeypatch, T, complex_qk, rate, with_state):
    """linear_complex's gradient path (strict lowered form plus the own writes) against finite
    differences in float64: real and complex q/k, several chunks and segments (or one step),
    mild and strong magnitudes, with and without an initial state."""
    H, K, V = 2, 3, 2
    q, k = (_randn(1, T, H, K, seed=s).double() for s in (1, 2))
    if complex_qk:
        q, k = (torch.complex(x, _randn(1, T, H, K, seed=s).double()) for x, s in ((q, 7), (k, 8)))
    v = _randn(1, T, H, V, seed=3).double()
    lm = (-rate * (0.5 + torch.rand(1, T, H, K, generator=_gen(4)))).double()
    phase = _randn(1, T, H, K, seed=6).double()
    S0 = torch.complex(_randn(1, H, K, V, seed=5), _randn(1, H, K, V, seed=9)).to(
        torch.complex128) if with_state else None
    leaves = [x.requires_grad_() for x in (q, k, v, lm, phase, S0) if x is not None]

    _gradcheck_chunked(monkeypatch, ops.linear_complex, leaves, 5, with_state)


@pytest.mark.parametrize("T", [21, 1])
@pytest.mark.parametrize("rate, with_state", [(0.3, True), (12.0, True), (40.0, True),
                                              (0.3, False)])
def test_delta_gate_gradcheck(monkeypatch, T, rate, with_state):
    """delta's gate gradient (strict form plus own writes) against finite differences in
    float64: several chunks and segments (or one step), the factored (0.3/step), centred
    (12/step: chunks of 4 span up to 72) and decay-matrix (40/step) paths, β in (0, 2), with
    and without an initial state, the final state in the loss or not returned."""
    H, K, V = 2, 3, 2
    q, k = (_randn(1, T, H, K, seed=s).double() for s in (1, 2))
    k = F.normalize(k, dim=-1)
    v = _randn(1, T, H, V, seed=3).double()
    beta = 2 * torch.rand(1, T, H, generator=_gen(6)).double()
    g = (-rate * (0.5 + torch.rand(1, T, H, generator=_gen(4)))).double()
    S0 = _randn(1, H, K, V, seed=5).double() if with_state else None
    leaves = [x.requires_grad_() for x in (q, k, v, beta, g, S0) if x is not None]

    _gradcheck_chunked(monkeypatch, ops.delta, leaves, 5, with_state)


@pytest.mark.parametrize("core, rate", [
    *((core, rate) for core in ("linear key", "linear scalar", "delta", "complex")
      for rate in (0.3, 12.0)),
    ("delta", 40.0)])
def test_decay_double_backward(monkeypatch, core, rate):
    """Second derivatives through a decay that requires a gradient (``gradgradcheck``, float64):
    the exact decay gradients are plain autograd, so double backward works (T = 9 at chunk 4:
    three chunks over two time segments; the final state in the loss). For ``delta``, 12/step
    takes the centred factors, 40/step the decay matrix."""
    T, H, K, V = 9, 2, 3, 2
    q, k = (_randn(1, T, H, K, seed=s).double() for s in (1, 2))
    v = _randn(1, T, H, V, seed=3).double()
    shape = (1, T, H) if core in ("linear scalar", "delta") else (1, T, H, K)
    g = (-rate * (0.5 + torch.rand(shape, generator=_gen(4)))).double()
    S0 = _randn(1, H, K, V, seed=5).double()
    if core.startswith("linear"):
        fn, xs = ops.linear, [q[:, :, :1] if core == "linear scalar" else q,
                              k[:, :, :1] if core == "linear scalar" else k, v, g]
    elif core == "delta":
        beta = 2 * torch.rand(1, T, H, generator=_gen(6)).double()
        fn, xs = ops.delta, [q, F.normalize(k, dim=-1), v, beta, g]
    else:
        fn, xs, S0 = ops.linear_complex, [q, k, v, g, _randn(1, T, H, K, seed=6).double()], \
            S0.to(torch.complex128)
    leaves = [x.requires_grad_() for x in (*xs, S0)]
    _gradcheck_chunked(monkeypatch, fn, leaves, len(xs), True, second_order=True)


def test_delta_strong_gate_no_overflow():
    x, h0, _ = make_delta(100, 5, gated=True)
    x["log_decay"] = -40 * torch.rand(x["log_decay"].shape, generator=_gen(6)) ** 4
    o, S = ops.delta(**x, initial_state=h0, output_final_state=True, chunk_size=64)
    o_gold, S_gold = ops.delta_ref(**_cast(x), initial_state=_widen(h0), output_final_state=True)
    assert_close(o, o_gold, FP32, "delta strong gate")
    assert_close(S, S_gold, FP32, "delta strong gate final state")


@pytest.mark.parametrize("kind", ["growing", "signed_with_zeros"])
def test_scan_exact_for_any_range_of_a(kind):
    T = 40
    if kind == "growing":   # |a| up to 1.5: products reach ~1e7, no division anywhere
        a = 0.5 + torch.rand(B, T, 12, generator=_gen(1))
    else:                   # a in (-1.2, 1.2) with exact zeros (state resets)
        a = 2.4 * torch.rand(B, T, 12, generator=_gen(1)) - 1.2
        a[:, ::7] = 0
    b = _randn(B, T, 12, seed=2)
    h, S = ops.scan(a, b, initial_state=_randn(B, 12, seed=3), output_final_state=True)
    h_gold, S_gold = ops.scan_ref(a.double(), b.double(),
                                  initial_state=_randn(B, 12, seed=3).double(),
                                  output_final_state=True)
    assert_close(h, h_gold, FP32, f"scan {kind}")
    assert_close(S, S_gold, FP32, f"scan {kind} final state")


def test_scan_broadcast_gate():
    a = torch.sigmoid(_randn(B, 30, 3, 1, seed=1))     # one gate per head, shared over 4 channels
    b = _randn(B, 30, 3, 4, seed=2)
    h, _ = ops.scan(a, b)
    h_ref, _ = ops.scan_ref(a.expand_as(b), b)
    assert_close(h, h_ref, FP32, "broadcast gate")


# ---------------------------------------------------------------------------------------------
# independent references: flash-linear-attention's pure-PyTorch naive functions
# ---------------------------------------------------------------------------------------------

def test_scan_vs_fla_hgrn():
    naive = pytest.importorskip("fla.ops.hgrn.naive")
    x, g = _randn(B, 50, 16, seed=1), F.logsigmoid(_randn(B, 50, 16, seed=2))
    h0 = _randn(B, 16, seed=3)
    o_fla, S_fla = naive.naive_recurrent_hgrn(x, g, initial_state=h0, output_final_state=True)
    o, S = ops.scan(g.exp(), x, initial_state=h0, output_final_state=True)
    o_gold, S_gold = ops.scan_ref(g.double().exp(), x.double(), initial_state=h0.double(),
                                  output_final_state=True)
    assert_close(o, o_fla, FP32, "scan vs naive_recurrent_hgrn")
    assert_close(S, S_fla, FP32, "scan final vs naive_recurrent_hgrn")
    assert_close(o_fla, o_gold, FP32, "naive_recurrent_hgrn vs golden")


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_linear_vs_fla_simple_gla(decay):
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    x, h0, _ = make_linear(77, 1, decay)
    g = x["log_decay"] if decay == "scalar" else torch.zeros(B, 77, H)
    o_fla, S_fla = naive.naive_recurrent_simple_gla(x["q"], x["k"], x["v"], g, scale=0.3,
                                                    initial_state=h0.clone(),
                                                    output_final_state=True)
    o, S = ops.linear(**x, scale=0.3, initial_state=h0, output_final_state=True, chunk_size=32)
    assert_close(o, o_fla, FP32, f"linear ({decay}) vs naive_recurrent_simple_gla")
    assert_close(S, S_fla, FP32, f"linear ({decay}) final vs naive_recurrent_simple_gla")


def test_linear_key_decay_vs_fla_gla():
    naive = pytest.importorskip("fla.ops.gla.naive")
    x, h0, _ = make_linear(77, 2, "key")
    o_fla, S_fla = naive.naive_recurrent_gla(x["q"], x["k"], x["v"], x["log_decay"],
                                             initial_state=h0, output_final_state=True)
    o, S = ops.linear(**x, initial_state=h0, output_final_state=True, chunk_size=32)
    assert_close(o, o_fla, FP32, "linear ([K] decay) vs naive_recurrent_gla")
    assert_close(S, S_fla, FP32, "linear ([K] decay) final vs naive_recurrent_gla")


def test_linear_complex_lowering_vs_fla_gla():
    """The lowered real problem, fed to fla's GLA, reproduces the complex recurrence."""
    naive = pytest.importorskip("fla.ops.gla.naive")
    x, _, _ = make_complex(40, 3)
    phi = x["phase"].double().cumsum(1)
    Q = (x["q"].double() * torch.exp(1j * phi))
    Kc = (x["k"].double() * torch.exp(-1j * phi))
    q2 = torch.cat([Q.real, -Q.imag], -1) * math.sqrt(2)   # undo fla's fixed (2K)^-1/2 -> K^-1/2
    k2 = torch.cat([Kc.real, Kc.imag], -1)
    g2 = torch.cat([x["log_magnitude"]] * 2, -1).double()
    o_fla, _ = naive.naive_recurrent_gla(q2, k2, x["v"].double(), g2)
    o_ref, _ = ops.linear_complex_ref(**x)
    o, _ = ops.linear_complex(**x, chunk_size=16)
    assert_close(o_ref, o_fla, FP32, "complex recurrence vs lowered fla GLA")
    assert_close(o, o_fla, FP32, "linear_complex vs lowered fla GLA")


def _mamba_selective_scan_loop(u, delta, A, Bm, C):
    """Mamba-1's selective scan written out per channel e and state n, no einsum:
    x[e,n] = exp(Δ[e] A[e,n]) x[e,n] + Δ[e] B[n] u[e];  y[e] = Σ_n C[n] x[e,n].
    u, delta [B, T, E]; A [E, N]; Bm, C [B, T, N]."""
    Bsz, T, E = u.shape
    N = A.shape[1]
    x = torch.zeros(Bsz, E, N, dtype=u.dtype)
    ys = []
    for t in range(T):
        dA = torch.exp(delta[:, t, :, None] * A[None])              # [B, E, N]
        dBu = delta[:, t, :, None] * Bm[:, t, None, :] * u[:, t, :, None]
        x = dA * x + dBu
        ys.append((x * C[:, t, None, :]).sum(-1))                    # [B, E]
    return torch.stack(ys, 1), x


def test_linear_key_value_decay_is_the_mamba_selective_scan():
    E, N, T = 6, 4, 50
    u, Bm, C = _randn(B, T, E, seed=1), _randn(B, T, N, seed=2), _randn(B, T, N, seed=3)
    delta = F.softplus(_randn(B, T, E, seed=4) - 1)
    A = -torch.arange(1, N + 1, dtype=FP32).repeat(E, 1)             # S4D-real, [E, N]
    y_loop, x_loop = _mamba_selective_scan_loop(u.double(), delta.double(), A.double(),
                                                Bm.double(), C.double())
    # one head; key dim = state n, value dim = channel e
    q, k = C[:, :, None], Bm[:, :, None]                             # [B, T, 1, N]
    v = (delta * u)[:, :, None]                                      # [B, T, 1, E]
    log_decay = (delta[:, :, None, None, :] * A.T[None, None, None])  # [B, T, 1, N, E]
    for fn, kw in ((ops.linear, {"chunk_size": 16}), (ops.linear_ref, {})):
        y, S = fn(q, k, v, log_decay, scale=1.0, output_final_state=True, **kw)
        assert_close(y[:, :, 0], y_loop, FP32, f"{fn.__name__} vs Mamba loop")
        assert_close(S[:, 0], x_loop.transpose(1, 2), FP32, f"{fn.__name__} state vs Mamba loop")


def test_linear_key_value_decay_broadcasts():
    """A [B, T, H, 1, V] decay (one per value dim) broadcasts over the key dim."""
    x, h0, _ = make_linear(40, 3, "none")
    g = _log_gate(B, 40, H, 1, V, seed=9)
    o, S = ops.linear(**{**x, "log_decay": g}, initial_state=h0, output_final_state=True,
                      chunk_size=16)
    o_gold, S_gold = ops.linear_ref(**_cast({**x, "log_decay": g.expand(B, 40, H, K, V)}),
                                    initial_state=_widen(h0), output_final_state=True)
    assert_close(o, o_gold, FP32, "[1, V] decay")
    assert_close(S, S_gold, FP32, "[1, V] decay final state")


def test_delta_vs_fla_gated_delta_rule():
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    x, h0, _ = make_delta(77, 4, gated=True)
    o_fla, S_fla = naive.naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["beta"], x["log_decay"], scale=0.4, initial_state=h0,
        output_final_state=True)
    o, S = ops.delta(**x, scale=0.4, initial_state=h0, output_final_state=True, chunk_size=32)
    assert_close(o, o_fla, FP32, "delta vs naive_recurrent_gated_delta_rule")
    assert_close(S, S_fla, FP32, "delta final vs naive_recurrent_gated_delta_rule")


def test_delta_vs_fla_delta_rule_head_first():
    naive = pytest.importorskip("fla.ops.delta_rule.naive")
    x, h0, _ = make_delta(77, 5, gated=False)
    head_first = {n: v.transpose(1, 2) for n, v in x.items() if v is not None}  # [B, H, T, ...]
    o_fla, S_fla = naive.delta_rule_recurrence(head_first["q"], head_first["k"], head_first["v"],
                                               head_first["beta"], initial_state=h0.clone(),
                                               output_final_state=True)
    o, S = ops.delta(**x, initial_state=h0, output_final_state=True, chunk_size=32)
    assert_close(o, o_fla.transpose(1, 2), FP32, "delta vs delta_rule_recurrence")
    assert_close(S, S_fla, FP32, "delta final vs delta_rule_recurrence")


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_delta_interleave_vs_fla_gated_delta_product(steps, gated):
    naive = pytest.importorskip("fla.ops.gated_delta_product.naive")
    T = 33
    x, h0, _ = make_product(T, 6, steps)
    if not gated:
        x["log_decay"] = None
    leaves = {n: v.clone().requires_grad_() for n, v in x.items() if v is not None}
    s0 = h0.clone().requires_grad_()
    o_fla, S_fla = naive.naive_recurrent_gated_delta_product(
        leaves["q"], leaves["k"].flatten(1, 2), leaves["v"].flatten(1, 2), leaves.get("log_decay"),
        leaves["beta"].flatten(1, 2), scale=K ** -0.5, initial_state=s0,
        output_final_state=True, num_householder=steps)
    o, S = ops.delta_interleave(**{**x, **leaves}, steps=steps, initial_state=s0,
                                output_final_state=True, chunk_size=16)
    assert_close(o, o_fla, FP32, f"delta_interleave x{steps} vs naive gated_delta_product")
    assert_close(S, S_fla, FP32, f"delta_interleave x{steps} final vs naive gated_delta_product")
    wrt = [*leaves.values(), s0]
    g_fla = torch.autograd.grad(_weighted_sum(o_fla, 1) + _weighted_sum(S_fla, 2), wrt)
    g_ours = torch.autograd.grad(_weighted_sum(o, 1) + _weighted_sum(S, 2), wrt)
    for n, a, b in zip([*leaves, "initial_state"], g_ours, g_fla):
        assert_close(a, b, FP32, f"delta_interleave x{steps} d/d{n} vs fla")
    if steps == 1:  # one sub-step is the plain gated delta rule
        plain = {n: v[:, :, 0] if n in ("k", "v", "beta") else v for n, v in x.items()}
        o1, _ = ops.delta(**plain, initial_state=h0, chunk_size=16)
        assert_close(o1, o.detach(), FP32, "steps=1 vs delta")


@pytest.mark.parametrize("window", [None, 1, 7])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (3, 1)])
def test_attention_vs_fla_naive_parallel_attn(heads, window):
    naive = pytest.importorskip("fla.ops.attn.naive")
    x, _, _ = make_attention(70, 7, heads=heads[0], kv_heads=heads[1])
    o_fla, _ = naive.naive_parallel_attn(x["q"], x["k"], x["v"], window_size=window)
    for fn, kw in ((ops.attention, {"block_size": 16}), (ops.attention_ref, {})):
        o = fn(**x, window=window, **kw)
        assert_close(o, o_fla, FP32, f"{fn.__name__} heads={heads} window={window} vs fla")


def test_rope_matches_transformers_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    theta, T, D = 10000.0, 30, 16
    q, k = _randn(B, T, 3, D, seed=1), _randn(B, T, 3, D, seed=2)
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    freqs = torch.arange(T, dtype=torch.float)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[None].expand(B, T, D), emb.sin()[None].expand(B, T, D)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert_close(ops.apply_rope(q, theta), q_hf.transpose(1, 2), FP32, "rope q vs transformers")
    assert_close(ops.apply_rope(k, theta), k_hf.transpose(1, 2), FP32, "rope k vs transformers")


def test_attention_softcap_and_window_against_dense_formula():
    x, _, _ = make_attention(40, 8, heads=2, kv_heads=1)
    q, k, v = (t.double() for t in x.values())
    s = torch.einsum("bihd,bjd->bhij", q, k[:, :, 0]) * K ** -0.5
    s = 2.0 * torch.tanh(s / 2.0)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None]
    s = s.masked_fill((j > i) | (i - j >= 5), float("-inf"))
    expected = torch.einsum("bhij,bjd->bihd", s.softmax(-1), v[:, :, 0])
    o = ops.attention(**x, window=5, softcap=2.0, block_size=16)
    assert_close(o, expected, FP32, "attention vs dense softcap+window formula")


@pytest.mark.parametrize("window", [None, 6])
def test_attention_decode_matches_last_row(window):
    x, _, _ = make_attention(25, 9, heads=4, kv_heads=2)
    theta = 100.0
    full = ops.attention(**x, window=window, softcap=4.0, rope_theta=theta)
    L = 25
    pos = torch.tensor([L - 1])
    q_last = ops.apply_rope(x["q"][:, -1:], theta, positions=pos)[:, 0]
    k_cache = ops.apply_rope(x["k"], theta)
    o = ops.attention_decode(q_last, k_cache, x["v"], window=window, softcap=4.0)
    assert_close(o, full[:, -1], FP32, "decode step vs full attention")


# ---------------------------------------------------------------------------------------------
# the tolerance table itself
# ---------------------------------------------------------------------------------------------

def test_tolerance_table_and_messages():
    assert set(TOLERANCES) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    x = _randn(100, seed=1)
    assert_close(x + 1e-8, x, FP32)
    with pytest.raises(AssertionError, match="relative RMS error .* max-abs error"):
        assert_close(x + 1e-2, x, FP32, "offset")
    y = x.clone()
    y[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(y, x, torch.bfloat16)
    rel, max_abs, _ = errors(2 * x, x)
    assert abs(rel - 1) < 1e-12 and max_abs == pytest.approx(float(x.abs().max()))


# ---- the factored selective-SSM decay (Mamba): log_decay = A * dt, never materialised ---------

@pytest.mark.parametrize("fn", [ops.linear, ops.linear_ref], ids=["chunked", "reference"])
def test_factored_decay_equals_the_materialised_decay(fn):
    g = torch.Generator().manual_seed(7)
    B, T, H, K, V = 2, 37, 2, 4, 6
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    A = -torch.rand(H, K, V, generator=g).requires_grad_()
    dt = torch.rand(B, T, H, V, generator=g).requires_grad_()
    S0 = torch.randn(B, H, K, V, generator=g).requires_grad_()
    o1, S1 = fn(q, k, v, decay_A=A, decay_dt=dt, initial_state=S0, output_final_state=True)
    full = A * dt[:, :, :, None, :]
    o2, S2 = ops.linear_ref(q, k, v, log_decay=full, initial_state=S0, output_final_state=True)
    assert_close(o1, o2, torch.float32, "factored vs materialised output")
    assert_close(S1, S2, torch.float32, "factored vs materialised state")
    w = torch.randn(o1.shape, generator=g)
    grads1 = torch.autograd.grad((o1 * w).sum() + S1.sum(), (A, dt, S0))
    grads2 = torch.autograd.grad((o2 * w).sum() + S2.sum(), (A, dt, S0))
    for a, b, name in zip(grads1, grads2, ("A", "dt", "initial state")):
        assert_close(a, b, torch.float32, f"gradient of {name}")


@pytest.mark.parametrize("core", ["linear_none", "linear_scalar", "linear_key", "delta"])
def test_chunked_forms_over_many_segments(monkeypatch, core):
    """The chunked forms run time in segments of whole chunks, each from the state the last one
    returned: with one chunk per segment and T = 45 (segments of 16, 16 and 13 steps),
    output, final state and gradients (initial state included) against the float64 loop."""
    chunking = importlib.import_module("seqdsl.ops._chunking")
    monkeypatch.setattr(chunking, "SEGMENT_CHUNKS", 1)
    monkeypatch.setattr(chunking, "SEGMENT_MIN_CHUNKS", 1)
    if core == "delta":
        x, h0, _ = make_delta(45, 13, gated=True)
        fast, ref = ops.delta, ops.delta_ref
    else:
        x, h0, _ = make_linear(45, 13, core.split("_")[1])
        fast, ref = ops.linear, ops.linear_ref
    x = {n: t.requires_grad_() for n, t in x.items() if t is not None}
    h0 = h0.requires_grad_()
    o, S = fast(**x, initial_state=h0, output_final_state=True, chunk_size=16)
    o_gold, S_gold = ref(**_cast(x), initial_state=_widen(h0), output_final_state=True)
    assert_close(o, o_gold, FP32, f"{core} over segments")
    assert_close(S, S_gold, FP32, f"{core} over segments: final state")
    w = torch.randn(o.shape, generator=_gen(14))
    leaves = [*x.values(), h0]
    grads = torch.autograd.grad((o * w).sum() + S.square().sum(), leaves)
    gold = torch.autograd.grad((o_gold * w.double()).sum() + S_gold.square().sum(), leaves)
    for a, b, name in zip(grads, gold, [*x, "initial state"]):
        assert_close(a, b, FP32, f"{core} over segments: gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("qk_heads", [H, 1])
def test_complex_inference_form_over_segments(monkeypatch, qk_heads, dtype):
    """Without autograd, ``linear_complex`` runs its own chunk-layout form (the angle summed
    block by block, the magnitude's factors on K keys): with two chunks per segment and
    T = 45 (segments of 16, 16 and 13 steps, the last chunk partial), a log magnitude that
    leaves the factor limit in the second segment only (there the exact per-key form takes
    over, and hands its state on), q/k shared by the value heads or not: output and final
    state against the float64 complex loop and the generic lowering through ``linear``."""
    chunking = importlib.import_module("seqdsl.ops._chunking")
    monkeypatch.setattr(chunking, "SEGMENT_CHUNKS", 2 * B * H)
    monkeypatch.setattr(chunking, "SEGMENT_MIN_CHUNKS", 2)
    x, h0, _ = make_complex(45, 21)
    x["q"], x["k"] = x["q"][:, :, :qk_heads], x["k"][:, :, :qk_heads]
    x["log_magnitude"][:, 16:32] = -5.0           # |G| reaches 40 nats in a chunk of 8 steps
    x = _cast(x, lambda t: t.to(dtype) if isinstance(t, torch.Tensor) else t)
    gold_in = {**x, "q": x["q"].expand(-1, -1, H, -1), "k": x["k"].expand(-1, -1, H, -1)}
    o_gold, S_gold = ops.linear_complex_ref(**_cast(gold_in), initial_state=_widen(h0),
                                            output_final_state=True)
    tol = FP32 if dtype == torch.float32 else FP64
    for state in (h0, None):
        o, S = ops.linear_complex(**x, initial_state=state, output_final_state=True,
                                  chunk_size=8)
        generic = ops.linear_complex(**x, initial_state=state, output_final_state=True,
                                     inner=functools.partial(ops.linear, chunk_size=8))
        if state is None:
            o_gold, S_gold = ops.linear_complex_ref(**_cast(gold_in), output_final_state=True)
        assert o.dtype == dtype and S.dtype == generic[1].dtype
        assert_close(o, o_gold, tol, "inference form vs float64 loop")
        assert_close(S, S_gold, tol, "inference form vs float64 loop: final state")
        assert_close(o, generic[0], tol, "inference form vs the generic lowering")
        assert_close(S, generic[1], tol, "inference form vs the generic lowering: final state")


@pytest.mark.parametrize("gate", ["gate", "strong gate", "very strong gate", "no gate"])
@pytest.mark.parametrize("steps, chunk", [(2, 8), (3, 12)])
def test_interleaved_reads_over_segments(monkeypatch, steps, chunk, gate):
    """Without autograd, ``delta_interleave`` computes the queries' products on each token's last
    sub-step alone (``rows``): with one chunk per segment and T = 45 tokens (segments of
    ``chunk / steps`` tokens, the last partial), a gate of usual strength, one whose chunk sums
    leave the factor limit in some segments but span at most twice it (-9 per token: the
    factors about each chunk's midpoint), one beyond that (-40 per token: the decay-matrix
    path, every row, then the read ones), or none: output and final state against the generic
    lowering (every sub-step through ``delta``) and the float64 loop."""
    chunking = importlib.import_module("seqdsl.ops._chunking")
    monkeypatch.setattr(chunking, "SEGMENT_CHUNKS", 1)
    monkeypatch.setattr(chunking, "SEGMENT_MIN_CHUNKS", 1)
    x, h0, options = make_product(45, 31, steps)
    if gate == "no gate":
        x["log_decay"] = None
    elif gate != "gate":
        x["log_decay"][:, 20:30] = -9.0 if gate == "strong gate" else -40.0
    o, S = ops.delta_interleave(**x, **options, initial_state=h0, output_final_state=True,
                                chunk_size=chunk)
    generic = ops.delta_interleave(**x, **options, initial_state=h0, output_final_state=True,
                                   inner=functools.partial(ops.delta, chunk_size=chunk))
    o_gold, S_gold = _product_ref(**_cast(x), **options, initial_state=_widen(h0),
                                  output_final_state=True)
    assert_close(o, generic[0], FP32, "read rows vs the generic lowering")
    assert_close(S, generic[1], FP32, "read rows vs the generic lowering: final state")
    assert_close(o, o_gold, FP32, "read rows vs float64 loop")
    assert_close(S, S_gold, FP32, "read rows vs float64 loop: final state")


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["no cap", "cap"])
@pytest.mark.parametrize("window", [None, 45, 70], ids=["causal", "window = T", "window > T"])
def test_block_attention_gradients(window, softcap):
    """Causal attention (and windows of at least T) with key and value sizes that differ (as
    here) or a soft cap runs query blocks with a FlashAttention-style backward (rows' logsumexp
    saved, scores recomputed): T = 45 in blocks of 16 (the last one partial), GQA, with and
    without a soft cap. Output and gradients of q, k, v against the float64 reference."""
    _attention_against_the_reference(45, 21, f"block attention, window {window}, cap {softcap}",
                                     window=window, softcap=softcap)


@pytest.mark.parametrize("heads, kv_heads, dtype", [(4, 1, torch.float32), (4, 2, torch.float32),
                                                   (2, 2, torch.float64),
                                                   (4, 2, torch.bfloat16)])
def test_causal_attention_runs_the_fused_kernel(heads, kv_heads, dtype):
    """Causal attention without a cap goes to torch's fused kernel only where it runs the
    blocked (flash) CPU kernel, O(T) memory forward and backward: restricted to that backend,
    the call must not fail (torch would otherwise fall back to dense T x T scores). Output and
    gradients of q, k, v against the float64 reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x, _, _ = make_attention(50, 31, heads=heads, kv_heads=kv_heads)
    # key size = value size, as that kernel needs
    x = {n: t[..., :V].to(dtype).contiguous().requires_grad_() for n, t in x.items()}
    w = torch.randn(B, 50, heads, V, generator=_gen(32))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = ops.attention(**x)
        grads = torch.autograd.grad((o.float() * w).sum(), list(x.values()))
    gold = ops.attention_ref(**_cast(x))
    gold_grads = torch.autograd.grad((gold * w.double()).sum(), list(x.values()))
    assert_close(o, gold, dtype, "fused causal attention")
    for a, b, name in zip(grads, gold_grads, x):
        assert_close(a, b, dtype, f"fused causal attention: gradient of {name}")


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_block_attention_backward_gradcheck(softcap):
    """The query-block loop's hand-written backward against finite differences in float64, with
    and without a cap (``attention`` sends uncapped causal attention to torch's fused kernel
    when key and value sizes agree; the loop serves the rest), blocks of 4 over T = 10."""
    attention = importlib.import_module("seqdsl.ops.attention")
    B_, Hkv, G, T_, K_, V_ = 1, 2, 2, 10, 3, 2
    q = _randn(B_, Hkv, T_, G, K_, seed=1).double().requires_grad_()
    k = _randn(B_, Hkv, T_, K_, seed=2).double().requires_grad_()
    v = _randn(B_, Hkv, T_, V_, seed=3).double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention._BlockAttention.apply(q, k, v, None, softcap, 4), (q, k, v))


def test_block_attention_one_visible_key_has_no_query_gradient():
    """The first query sees one key: its softmax is 1 whatever the logit, so its gradient
    is exactly zero (the backward's row sum comes from p and dp, not from do·o)."""
    x, _, _ = make_attention(40, 23, heads=4, kv_heads=2)
    q = x["q"].requires_grad_()
    o = ops.attention(q, x["k"], x["v"], softcap=4.0, block_size=16)
    (dq,) = torch.autograd.grad((o * torch.randn(o.shape, generator=_gen(24))).sum(), q)
    assert torch.count_nonzero(dq[:, 0]) == 0 and torch.count_nonzero(dq[:, 1:]) > 0


def _attention_against_the_reference(T: int, seed: int, label: str, **options):
    """GQA attention in blocks of 16 (4 query heads, 2 kv heads): output, and the gradients of
    q, k and v through a random projection of it, against the float64 reference."""
    x, _, _ = make_attention(T, seed, heads=4, kv_heads=2)
    x = {name: t.requires_grad_() for name, t in x.items()}
    o = ops.attention(**x, **options, block_size=16)
    gold = ops.attention_ref(**_cast(x), **options)
    assert_close(o, gold, FP32, label)
    w = torch.randn(o.shape, generator=_gen(seed + 1))
    grads = torch.autograd.grad((o * w).sum(), list(x.values()))
    gold_grads = torch.autograd.grad((gold * w.double()).sum(), list(x.values()))
    for a, b, name in zip(grads, gold_grads, x):
        assert_close(a, b, FP32, f"{label}: gradient of {name}")


@pytest.mark.parametrize("window", [1, 5, 40])
def test_banded_sliding_window_over_many_groups(monkeypatch, window):
    """Sliding-window attention batches query blocks against their key bands (one padded,
    unfolded key tensor); with groups of one block and T = 75 (not a multiple of the block),
    every band edge case is crossed: the first blocks' padding keys, the partial last block,
    a window of 1. Output and gradients against the float64 reference."""
    monkeypatch.setattr(importlib.import_module("seqdsl.ops.attention"), "BAND_ELEMENTS", 1)
    _attention_against_the_reference(75, 11, f"banded window {window}", window=window,
                                     softcap=4.0)


@pytest.mark.parametrize("loss", ["output and state", "output", "state"])
@pytest.mark.parametrize("decay", ["materialised", "broadcast over K", "factored"])
@pytest.mark.parametrize("window", [8, 64])
def test_state_decay_over_many_windows(monkeypatch, window, decay, loss):
    """[K, V] decays scan window by window (each a two-level blocked scan from the state entering
    it, with a hand-written backward): with windows of 8 steps (the smallest: one block each),
    T = 150 crosses 19 windows, the last one partial; with 64 (eight blocks of 8 steps each),
    3. Output, final state (with
    and without autograd) and the gradients of q, k, v, the decay and the initial state against
    the float64 loop, for losses that read the output, the final state or both (the backward
    then starts from no output or no state gradient)."""
    B, T, H, K, V = 2, 150, 2, 4, 6
    monkeypatch.setattr(importlib.import_module("seqdsl.ops.linear"), "WINDOW_ELEMENTS",
                        1 if window == 8 else window * B * H * K * V)
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    S0 = torch.randn(B, H, K, V, generator=g)
    if decay == "factored":
        A = -torch.rand(H, K, V, generator=g)
        dt = torch.rand(B, T, H, V, generator=g)
        leaves = dict(A=A, dt=dt)
        args = dict(decay_A=A, decay_dt=dt)
    else:
        shape = (B, T, H, K, V) if decay == "materialised" else (B, T, H, 1, V)
        leaves = dict(log_decay=-torch.rand(*shape, generator=g))
        args = dict(leaves)
    leaves.update(q=q, k=k, v=v, initial_state=S0)
    for x in leaves.values():
        x.requires_grad_()
    before = {n: x.detach().clone() for n, x in leaves.items()}
    o, S = ops.linear(q, k, v, **args, initial_state=S0, output_final_state=True,
                      chunk_size=16)
    gold_decay = (A.double() * dt.double()[:, :, :, None, :] if decay == "factored"
                  else args["log_decay"].double())
    o_gold, S_gold = ops.linear_ref(q.double(), k.double(), v.double(), log_decay=gold_decay,
                                    initial_state=S0.double(), output_final_state=True)
    assert_close(o, o_gold, FP32, "windowed [K, V] decay output")
    assert_close(S, S_gold, FP32, "windowed [K, V] decay final state")
    with torch.no_grad():
        o_, S_ = ops.linear(q, k, v, **args, initial_state=S0, output_final_state=True)
    assert_close(o_, o_gold, FP32, "windowed [K, V] decay output without autograd")
    assert_close(S_, S_gold, FP32, "windowed [K, V] decay final state without autograd")
    w = torch.randn(o.shape, generator=g)

    def objective(o, S):
        terms = {"output": (o * w.to(o.dtype)).sum(), "state": S.square().sum()}
        return sum(value for name, value in terms.items() if name in loss)

    def gradients(o, S):       # q does not reach the final state: its gradient is then zero
        grads = torch.autograd.grad(objective(o, S), list(leaves.values()), allow_unused=True)
        return [torch.zeros_like(x) if d is None else d for d, x in zip(grads, leaves.values())]

    for a, b, name in zip(gradients(o, S), gradients(o_gold, S_gold), leaves):
        assert_close(a, b, FP32, f"windowed [K, V] decay, loss on {loss}: gradient of {name}")
        assert torch.equal(leaves[name], before[name]), f"the backward changed {name}"


@pytest.mark.parametrize("core", ["scan", "linear [K, V] factored", "attention"])
def test_hand_written_backwards_with_cu_seqlens(core):
    """Packed sequences (70 and 90 steps: both the blocked scans and several query blocks)
    through the three hand-written backwards: the gradients of every input, initial states
    included, equal those of a loop over the sequences."""
    g = torch.Generator().manual_seed(31)
    lengths, H, K, V = (70, 90), 2, 4, 20
    total = sum(lengths)
    if core == "scan":
        x = dict(a=torch.sigmoid(torch.randn(1, total, 40, generator=g) + 2),
                 b=torch.randn(1, total, 40, generator=g))
        state = torch.randn(2, 40, generator=g)
        fn, time_args = ops.scan, ("a", "b")
    elif core == "attention":
        x = dict(q=torch.randn(1, total, 4, K, generator=g),
                 k=torch.randn(1, total, 2, K, generator=g),
                 v=torch.randn(1, total, 2, V, generator=g))
        state = None
        fn, time_args = functools.partial(ops.attention, block_size=16), ("q", "k", "v")
    else:
        x = dict(q=torch.randn(1, total, H, K, generator=g),
                 k=torch.randn(1, total, H, K, generator=g),
                 v=torch.randn(1, total, H, V, generator=g),
                 decay_A=-torch.rand(H, K, V, generator=g),
                 decay_dt=torch.rand(1, total, H, V, generator=g))
        state = torch.randn(2, H, K, V, generator=g)
        fn, time_args = ops.linear, ("q", "k", "v", "decay_dt")
    leaves = dict(x) | ({} if state is None else {"initial_state": state})
    for t in leaves.values():
        t.requires_grad_()
    w = torch.randn(1, total, *((40,) if core == "scan" else (4 if core == "attention" else H, V)),
                    generator=g)

    def run(cu=None, part=None, i=None):
        args = {n: (t[:, part] if n in time_args else t) for n, t in x.items()}
        extra = {} if core == "attention" else dict(output_final_state=True)
        if state is not None:
            extra["initial_state"] = state if i is None else state[i:i + 1]
        out = fn(**args, **extra, **({} if cu is None else dict(cu_seqlens=cu)))
        o, S = (out, None) if core == "attention" else out
        loss = (o * w[:, part]).sum()
        return loss if S is None else loss + S.square().sum()

    cu = torch.tensor([0, lengths[0], total])
    packed = torch.autograd.grad(run(cu, slice(None)), list(leaves.values()))
    parts = (slice(0, lengths[0]), slice(lengths[0], total))
    loop = torch.autograd.grad(sum(run(None, p, i) for i, p in enumerate(parts)),
                               list(leaves.values()))
    for a, b, name in zip(packed, loop, leaves):
        assert_close(a, b, FP32, f"{core} packed vs loop: gradient of {name}")


def test_factored_decay_with_cu_seqlens():
    g = torch.Generator().manual_seed(8)
    T, H, K, V = 20, 1, 3, 5
    q, k = torch.randn(1, T, H, K, generator=g), torch.randn(1, T, H, K, generator=g)
    v, dt = torch.randn(1, T, H, V, generator=g), torch.rand(1, T, H, V, generator=g)
    A = -torch.rand(H, K, V, generator=g)
    cu = torch.tensor([0, 7, 20])
    packed, _ = ops.linear(q, k, v, decay_A=A, decay_dt=dt, cu_seqlens=cu)
    pieces = [ops.linear(q[:, a:b], k[:, a:b], v[:, a:b], decay_A=A, decay_dt=dt[:, a:b])[0]
              for a, b in ((0, 7), (7, 20))]
    assert_close(packed, torch.cat(pieces, 1), torch.float32, "cu_seqlens vs loop")


@pytest.mark.parametrize("T", [1, 7, 64, 65, 300, 2000])
def test_blocked_scan_equals_doubling_and_the_loop(T):
    """Blocks of 8 steps: T = 300 makes 38 block summaries (level 2 a blocked scan itself),
    T = 2000 250 (three levels)."""
    g = torch.Generator().manual_seed(T)
    a = torch.rand(2, T, 3, 40, generator=g) * 1.5 - 0.25   # signed, some |a| > 1
    b = torch.randn(2, T, 3, 40, generator=g)
    h0 = torch.randn(2, 3, 40, generator=g)
    blocked = ops.blocked_scan(a, b, h0)
    doubling = ops.associative_scan(a, b, h0)
    loop, _ = ops.scan_ref(a.double(), b.double(), h0.double())
    assert_close(blocked, loop.float(), torch.float32, "blocked vs float64 loop")
    assert_close(doubling, loop.float(), torch.float32, "doubling vs float64 loop")


@pytest.mark.parametrize("T, S", [(40, 8), (300, 64)], ids=["doubling", "blocked"])
def test_scan_outputs_are_contiguous(T, S):
    """Both paths compute in buffers padded along time (the recursive doubling at the front,
    the blocked scan up to whole blocks): what `scan` returns for a batch of several is still
    one contiguous tensor (users `view` outputs)."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, T, S, generator=g), torch.randn(3, T, S, generator=g)
    h, final = ops.scan(a, b, output_final_state=True)
    assert h.is_contiguous()
    loop, _ = ops.scan_ref(a.double(), b.double())
    assert_close(h, loop.float(), torch.float32, "scan vs float64 loop")
    assert_close(final, loop[:, -1].float(), torch.float32, "final state")


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_chunked_outputs_are_contiguous(grad):
    """A length that is not a multiple of the chunk pads time; for a batch of several the
    outputs are still contiguous ``[B, T, H, V]`` tensors, with and without autograd."""
    g = torch.Generator().manual_seed(4)
    B, T, H, K = 2, 70, 2, 8

    def draw(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    q, k, v, ph = (draw(B, T, H, K) for _ in range(4))
    gate = F.logsigmoid(draw(B, T, H) + 3)
    g_key = F.logsigmoid(draw(B, T, H, K) + 3)
    beta, k_unit = torch.sigmoid(draw(B, T, H)), F.normalize(draw(B, T, H, K), dim=-1)
    outs = {"linear": ops.linear(q, k, v)[0], "linear scalar": ops.linear(q, k, v, gate)[0],
            "linear [K]": ops.linear(q, k, v, g_key)[0],
            "linear_complex": ops.linear_complex(q, k, v, g_key, ph)[0],
            "delta": ops.delta(q, k_unit, v, beta, gate)[0],
            "delta_interleave": ops.delta_interleave(
                q, F.normalize(draw(B, T, 2, H, K), dim=-1), draw(B, T, 2, H, K),
                torch.sigmoid(draw(B, T, 2, H)), gate)[0]}
    for name, o in outs.items():
        assert o.shape == (B, T, H, K) and o.is_contiguous(), name


def test_blocked_scan_gradients_with_zero_multipliers():
    """The block products come from one cumprod: its gradient must survive a = 0 exactly."""
    g = torch.Generator().manual_seed(11)
    a = torch.rand(2, 90, 40, generator=g, dtype=FP64)
    a[0, 5, :3] = 0
    a[1, 40:44, 7] = 0
    b = torch.randn(2, 90, 40, generator=g, dtype=FP64)
    h0 = torch.randn(2, 40, generator=g, dtype=FP64)
    w = torch.randn(2, 90, 40, generator=g, dtype=FP64)
    grads = []
    for fn in (ops.blocked_scan, lambda *x: ops.scan_ref(*x)[0]):
        leaves = [x.clone().requires_grad_() for x in (a, b, h0)]
        grads.append(torch.autograd.grad((fn(*leaves) * w).sum(), leaves))
    for fast, ref, name in zip(*grads, ("a", "b", "initial state")):
        assert_close(fast, ref, FP64, f"blocked scan d/d{name}")


@pytest.mark.parametrize("T", [150, 160, 320])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no h0"])
@pytest.mark.parametrize("kind", ["real", "complex", "broadcast gate", "zero multipliers"])
def test_scan_gradients_on_the_blocked_path(kind, with_state, T):
    """States of 40 entries over T = 150 (a partial last block), 160 (whole blocks: the
    scans work in place) or 320 (40 blocks: level 2 a blocked scan too) take the blocked scan and its hand-written backward (a reverse scan of
    the adjoint): gradients of a, b and the initial state against autograd through the float64
    loop, for a complex recurrence (conjugate multipliers), a gate shared over the last dim (its
    gradient summed) and multipliers with exact zeros (state resets); the inputs unchanged."""
    g = torch.Generator().manual_seed(12)
    shape = (2, T, 4, 10)

    def draw(*shape):
        x = torch.randn(*shape, generator=g)
        return torch.complex(x, torch.randn(*shape, generator=g)) if kind == "complex" else x

    a = torch.sigmoid(torch.randn(*shape[:3], 1 if kind == "broadcast gate" else 10,
                                  generator=g) + 2)
    if kind == "complex":
        a = torch.polar(a, torch.randn(a.shape, generator=g))
    if kind == "zero multipliers":
        a[0, 5, :3] = 0
        a[1, 40:44, 2] = 0
    b, w = draw(*shape), draw(*shape)
    leaves = dict(a=a, b=b) | (dict(initial_state=draw(2, 4, 10)) if with_state else {})
    for x in leaves.values():
        x.requires_grad_()
    before = {n: x.detach().clone() for n, x in leaves.items()}
    h, S = ops.scan(**leaves, output_final_state=True)
    wide = {n: x.to(torch.complex128 if x.is_complex() else FP64) for n, x in leaves.items()}
    h_gold, S_gold = ops.scan_ref(**wide, output_final_state=True)
    assert_close(h, h_gold, FP32, f"{kind} scan")

    def loss(h, S):
        return (h * w.to(h.dtype)).sum().real + S.abs().square().sum()

    grads = torch.autograd.grad(loss(h, S), list(leaves.values()))
    gold = torch.autograd.grad(loss(h_gold, S_gold), list(leaves.values()))
    for fast, ref, name in zip(grads, gold, leaves):
        assert fast.shape == leaves[name].shape
        assert_close(fast, ref, FP32, f"{kind} scan d/d{name}")
        assert torch.equal(leaves[name], before[name]), f"the backward changed {name}"


# ---- q/k heads shared by groups of value heads (Mamba-2 n_groups, GQA-style linear attention) -

@pytest.mark.parametrize("qk_heads", [1, 2])
@pytest.mark.parametrize("decay", ["none", "scalar", "scalar_strong", "key", "key_value"])
@pytest.mark.parametrize("fn", [ops.linear, ops.linear_ref], ids=["chunked", "reference"])
def test_linear_shared_qk_heads_equal_repeated_heads(fn, decay, qk_heads):
    """q, k with Hq heads (Hq dividing H) equal q, k repeated to H heads: value head h reads
    q/k head h // (H / Hq). Forward, final state and gradients (q/k gradients summed over the
    group), with an initial state and a length that is not a multiple of the chunk. A strong
    scalar decay (beyond FACTOR_LIMIT within a chunk) takes the grouped form with one ``q kᵀ``
    per q/k head and a decay matrix per value head."""
    Hv, T = 4, 45
    x = _qkv(T, 20, H=Hv)
    x["q"], x["k"] = x["q"][:, :, :qk_heads].clone(), x["k"][:, :, :qk_heads].clone()
    shapes = {"none": None, "scalar": (B, T, Hv), "scalar_strong": (B, T, Hv),
              "key": (B, T, Hv, K), "key_value": (B, T, Hv, K, V)}
    x["log_decay"] = None if shapes[decay] is None else _log_gate(*shapes[decay], seed=23)
    if decay == "scalar_strong":
        x["log_decay"] = x["log_decay"] * 20 - 2.0
    h0 = _randn(B, Hv, K, V, seed=24)
    extra = {"chunk_size": 16} if fn is ops.linear else {}

    def run(q, k, v, log_decay, S0):
        return fn(q, k, v, log_decay, scale=0.3, initial_state=S0, output_final_state=True,
                  **extra)

    def repeat(t):
        return t.repeat_interleave(Hv // qk_heads, dim=2)

    results = []
    for expand in (False, True):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
        S0 = h0.clone().requires_grad_()
        q, k = leaves["q"], leaves["k"]
        o, S = run(repeat(q) if expand else q, repeat(k) if expand else k, leaves["v"],
                   leaves.get("log_decay"), S0)
        loss = _weighted_sum(o, 30) + _weighted_sum(S, 31)
        results.append((o, S, torch.autograd.grad(loss, [*leaves.values(), S0])))
    (o1, S1, g1), (o2, S2, g2) = results
    assert_close(o1, o2, FP32, f"shared q/k ({qk_heads}) vs repeated, {decay}")
    assert_close(S1, S2, FP32, f"shared q/k ({qk_heads}) vs repeated final state, {decay}")
    for a, b in zip(g1, g2):
        assert_close(a, b, FP32, f"shared q/k ({qk_heads}) gradients, {decay}")


def test_linear_shared_qk_heads_must_divide_value_heads():
    x = _qkv(10, 0, H=3)
    with pytest.raises(ValueError, match="divide"):
        ops.linear(x["q"][:, :, :2], x["k"][:, :, :2], x["v"])


@pytest.mark.parametrize("complex_qk", [True, False], ids=["complex q/k", "real q/k"])
@pytest.mark.parametrize("rate", [0.1, 3.0], ids=["within the factor limit", "beyond"])
def test_complex_grouped_qk_heads(complex_qk, rate):
    """q/k shared by groups of value heads (1 < Hq < H), complex or real, on the lowered
    (rotated) form, against the float64 loop: the rotation's per-value-head angles need the
    q/k heads repeated (complex q/k used to fail to broadcast)."""
    B, T, H, Hq, K, V = 1, 70, 4, 2, 8, 8
    q, k = (_randn(B, T, Hq, K, seed=s) for s in (1, 2))
    if complex_qk:
        q, k = (torch.complex(x, _randn(B, T, Hq, K, seed=s)) for x, s in ((q, 7), (k, 8)))
    v = _randn(B, T, H, V, seed=3)
    lm = -rate * torch.rand(B, T, H, K, generator=_gen(4))
    phase = _randn(B, T, H, K, seed=6)
    o, _ = ops.linear_complex(q, k, v, lm, phase, chunk_size=16)
    gold, _ = ops.linear_complex_ref(*_cast(dict(q=q, k=k, v=v, log_magnitude=lm,
                                                 phase=phase)).values())
    assert_close(o, gold, FP32, "linear_complex, grouped q/k heads")


def test_no_time_steps_give_an_empty_output_and_the_initial_state():
    """T = 0 (an empty prompt, an empty batch of packed sequences): every core returns an empty
    output in the output dtype and, as final state, its initial state (zeros without one)."""
    B, H, Kd, Vd = 2, 2, 4, 3
    q, k = torch.randn(B, 0, H, Kd), torch.randn(B, 0, H, Kd)
    v = torch.randn(B, 0, H, Vd, dtype=torch.bfloat16)
    S0 = torch.randn(B, H, Kd, Vd)
    gk, beta = torch.zeros(B, 0, H, Kd), torch.rand(B, 0, H)
    calls = {
        "linear": lambda f, **kw: f(q, k, v, gk, **kw),
        "delta": lambda f, **kw: f(q, k, v, beta, **kw),
        "linear_complex": lambda f, **kw: f(q, k, v, gk, gk, **kw),
    }
    for name, call in calls.items():
        for fn in (getattr(ops, name), getattr(ops, name + "_ref")):
            o, S = call(fn, initial_state=S0 if name != "linear_complex" else None,
                        output_final_state=True)
            assert o.shape == (B, 0, H, Vd) and o.dtype == torch.float32, name
            assert S.shape == (B, H, Kd, Vd), name
            if name == "linear_complex":
                assert S.dtype == torch.complex64 and not S.abs().any()
            else:
                assert torch.equal(S, S0) and S is not S0
    for fn in (ops.scan, ops.scan_ref):
        o, S = fn(torch.rand(B, 0, 5), torch.randn(B, 0, 5), output_final_state=True)
        assert o.shape == (B, 0, 5) and S.shape == (B, 5) and not S.any()
    for fn in (ops.attention, ops.attention_ref):
        assert fn(q, k, v).shape == (B, 0, H, Vd)
    o, S = ops.linear(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 0, 0]),
                      output_final_state=True)
    assert o.shape == (1, 0, H, Vd) and S.shape == (2, H, Kd, Vd)
