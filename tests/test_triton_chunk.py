"""The chunked Triton kernels of the ``linear`` and ``delta`` cores (templates ``linear_chunk.py.j2``,
``delta_chunk.py.j2``): forward, final state and every gradient against the sequential torch
references (and fla's naive recurrences) under ``TRITON_INTERPRET=1``, and an sm90 build of every
registered kernel (no spills, tensor cores where ``tl.dot`` is used).
"""

from __future__ import annotations

import json
import os
import sys
import subprocess

import pytest
import torch

import triton_harness as th  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)
import triton

from seqdsl.backends.triton import support as ts
from seqdsl.backends.triton.kernel_spec import KernelSpec
from seqdsl.ops import assert_close, delta_ref, linear_complex, linear_complex_ref, linear_ref

K, V = 20, 24           # head dims that are not powers of two (masked tiles)
LENGTHS = (5, 17, 9)    # packed sequences of the cu_seqlens tests
_MODULES: dict = {}


def prefix(core, decay, H, HQ, k=K, v=V, extras=None, prologue=()):
    return f"{core}_{decay}_{H}_{HQ}_{k}_{v}" + ("".join(f"_{t}" for t in extras.values()) if extras else "") + \
        ("_p" + "".join(n for n, _ in prologue) if prologue else "")


def module(core: str, decay: str, H: int, HQ: int, k: int = K, v: int = V, extras=None, prologue=()):
    """The rendered kernels of one spec (cached: rendering + import per spec once); ``extras``
    reach the template as ``s.extras``: tile overrides (``chunk_bk``, ``chunk_bv`` of the linear
    template, ``delta_bvb``, ``delta_bvc``, ``delta_bt_interpret`` of the delta one);
    ``prologue`` the fused producers (the IR's ``(operand, chain)`` pairs)."""
    key = (core, decay, H, HQ, k, v, tuple(sorted((extras or {}).items())), prologue)
    if key not in _MODULES:
        spec = KernelSpec(core=core, H=H, HQ=HQ, K=k, V=v, decay=decay, scale=k ** -0.5,
                          prologue=prologue, site=f"test.{core}", spec_ref="test.seq:1",
                          extras=dict(extras or {}))
        _MODULES[key] = th.load(f"{core}_chunk.py.j2", spec,
                                prefix(core, decay, H, HQ, k, v, extras, prologue))
    return _MODULES[key]


def inputs(core, decay, H, HQ, lengths=None, T=37, B=2, h0=True, dtype=torch.float32, seed=0):
    """Random inputs (fp32 leaves of ``dtype`` values), the loss weights and ``cu_seqlens``."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).float()

    cu = None
    if lengths is not None:
        B, T = 1, sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    N = B if cu is None else len(lengths)
    x = {"q": rnd(B, T, HQ, K), "k": rnd(B, T, HQ, K, scale=0.4), "v": rnd(B, T, H, V)}
    if core == "delta":
        x["k"] = torch.nn.functional.normalize(x["k"], dim=-1).to(dtype).float()
        x["beta"] = (torch.rand(B, T, H, generator=gen) * 1.9).to(dtype).float()  # (0, 1.9)
    if decay == "scalar":
        x["g"] = -torch.rand(B, T, H, generator=gen) * 0.7
    elif decay == "key":
        x["g"] = -torch.rand(B, T, H, K, generator=gen) * 0.7
    if h0:
        x["h0"] = torch.randn(N, H, K, V, generator=gen)
    weights = (torch.randn(B, T, H, V, generator=gen), torch.randn(N, H, K, V, generator=gen))
    return x, weights, cu


def run_kernel(core, decay, H, HQ, x, cu, dtype=torch.float32, extras=None, prologue=()):
    """The chunk kernels on ``x`` (raw operands where ``prologue`` fuses producers: torch applies
    only the part the kernels leave to it, ``<prefix>_UNFUSED``, as the generated entry does)."""
    m = module(core, decay, H, HQ, extras=extras, prologue=prologue)
    ins = {n: t.to(dtype) if n in ("q", "k", "v", "beta") else t for n, t in x.items()}
    unfused = getattr(m, prefix(core, decay, H, HQ, extras=extras, prologue=prologue) + "_UNFUSED")
    if unfused:
        ins.update(ts.apply_prologue(unfused, {n: ins.get(n) for n in ("q", "k", "v", "beta", "g")}))
    args = [ins["q"], ins["k"], ins["v"]] + ([ins["beta"]] if core == "delta" else [])
    fn = getattr(m, prefix(core, decay, H, HQ, extras=extras, prologue=prologue) + "_chunk")
    return th.on_device(fn)(*args, ins.get("g"), ins.get("h0"), cu)


def run_ref(core, x, cu):
    r = x["v"].shape[2] // x["q"].shape[2]
    if core == "linear":
        return linear_ref(x["q"], x["k"], x["v"], x.get("g"), scale=K ** -0.5,
                          initial_state=x.get("h0"), output_final_state=True, cu_seqlens=cu)
    q, k = x["q"].repeat_interleave(r, 2), x["k"].repeat_interleave(r, 2)
    return delta_ref(q, k, x["v"], x["beta"], x.get("g"), scale=K ** -0.5,
                     initial_state=x.get("h0"), output_final_state=True, cu_seqlens=cu)


def grads(run, x, weights, final_loss=True):
    """(o, S, {name: grad}) of the loss (o·w).sum() + (S·w2).sum() (or without the S term)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o, S = run(leaves)
    loss = (o.float() * weights[0]).sum() + ((S * weights[1]).sum() if final_loss else 0)
    loss.backward()
    return o.detach(), S.detach(), {n: t.grad for n, t in leaves.items()}


def check(core, decay, H, HQ, lengths=None, T=37, h0=True, final_loss=True, extra_ref=None,
          extras=None, prologue=(), raw=None):
    """Kernels against the references: outputs, final states and the gradients of every input;
    with a ``prologue`` of the raw operands (``raw``: replaced inputs), the references reading
    ``ts.apply_prologue`` of them."""
    x, w, cu = inputs(core, decay, H, HQ, lengths, T=T, h0=h0)
    x = dict(x, **(raw(x) if raw else {}))
    o, S, g = grads(lambda a: run_kernel(core, decay, H, HQ, a, cu, extras=extras, prologue=prologue),
                    x, w, final_loss)

    def fused(a):  # the producers by torch ops, then the reference core
        names = [n for n in ("q", "k", "v", "beta", "g") if n in a]
        return dict(a, **ts.apply_prologue(prologue, {n: a[n] for n in names}))
    refs = [("ref", lambda a: run_ref(core, fused(a), cu))] + ([("fla", extra_ref)] if extra_ref else [])
    for label, ref in refs:
        o2, S2, g2 = grads(ref, x, w, final_loss)
        assert_close(o, o2, torch.float32, f"{label} o")
        assert_close(S, S2, torch.float32, f"{label} final state")
        for name in x:
            if not g2[name].any():  # dg with T = 1 and no state: 0, ours from q·dq - k·dk
                assert float(g[name].abs().max()) < 1e-6, f"{label} d{name} is not 0"
                continue
            assert_close(g[name], g2[name], torch.float32, f"{label} d{name}")


@pytest.mark.parametrize("final_loss", [False, True])
@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_linear_chunk_strong_decay_gradient(decay, final_loss):
    """Log decays of about -8 per step, the loss on the outputs (and the final state): every
    gradient against the float64 loop. The decay's gradient is of order e^{-8}; the backward
    leaves the diagonal pairs out of dG = q ⊙ dq - k ⊙ dk (with them, their O(1) terms cancel:
    measured 1.1e-4 scalar, 6.4e-5 per key), and the last write k_T v_Tᵀ out of both the final
    state's term Σ S_T ⊙ dS_T and k_T ⊙ dk_T (with it: 1.5e-4 scalar, 5.5e-5 per key)."""
    x, w, cu = inputs("linear", decay, 2, 2, T=70)
    x["g"] = -8 * (0.5 + torch.rand(x["g"].shape, generator=torch.Generator().manual_seed(5)))
    o, S, g = grads(lambda a: run_kernel("linear", decay, 2, 2, a, cu), x, w, final_loss)
    xd, wd = {n: t.double() for n, t in x.items()}, tuple(t.double() for t in w)
    o2, _, g2 = grads(lambda a: run_ref("linear", a, cu), xd, wd, final_loss)
    assert_close(o, o2, torch.float32, "o")
    for name in x:
        assert_close(g[name], g2[name], torch.float32, f"d{name}")


@pytest.fixture
def gpu_like_scan(monkeypatch):
    """The interpreter's tl.cumsum rounded another way (summed in float64, then rounded): a GPU's
    parallel scan rounds differently from numpy's sequential fp32 cumsum, and from tl.sum."""
    if th.DEVICE != "cpu":
        pytest.skip("patches triton's interpreter")
    import numpy as np
    from triton.runtime import interpreter

    def cumsum(self, x):
        data = x.handle.data
        wide = np.cumsum(data.astype(np.float64), axis=self.axis)
        return [self.to_tensor(wide.astype(data.dtype), dtype=x.dtype)]
    monkeypatch.setattr(interpreter.ScanOps, "cumsum", cumsum)


@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_linear_chunk_decay_exponents_from_one_rounding(decay, gpu_like_scan):
    """Chunks of 32 at about -8 per step (cumulative log decays to -256) with the cumsum rounded
    unlike the kernels' other sums: every exponent must come from the one cumsum G (its rows for
    G_j, its last row for the chunk's total), else the per-key dg was 7.8e-5 and o 7.4e-6 off
    (measured here; on an H100, dg 1.1e-4)."""
    x, w, cu = inputs("linear", decay, 2, 2, T=70)
    x["g"] = -8 * (0.5 + torch.rand(x["g"].shape, generator=torch.Generator().manual_seed(5)))
    o, S, g = grads(lambda a: run_kernel("linear", decay, 2, 2, a, cu,
                                         extras={"chunk_bt_interpret": 32}), x, w)
    xd, wd = {n: t.double() for n, t in x.items()}, tuple(t.double() for t in w)
    o2, S2, g2 = grads(lambda a: run_ref("linear", a, cu), xd, wd)
    assert_close(o, o2, torch.float32, "o")
    assert_close(S, S2, torch.float32, "final state")
    for name in x:
        assert_close(g[name], g2[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("rate", [0.5, 8.0])
def test_linear_complex_strict_kernel_gradients(rate):
    """linear_complex through the per-key chunk kernels (GateLoop's Triton path), magnitudes of
    about -rate per step: every gradient against the float64 complex loop. The kernels run
    strict (no own writes in the outputs), the own writes are added outside the rotation;
    through the plain kernel the phase's gradient measured 1.4e-4 at -8/step."""
    KC, H = 10, 2
    m = module("linear", "key", H, H, k=2 * KC, v=V)
    chunk = th.on_device(getattr(m, prefix("linear", "key", H, H, k=2 * KC, v=V) + "_chunk"))

    def inner(q, k, v, g, scale=None, initial_state=None, output_final_state=True, strict=False):
        return chunk(q, k, v, g, initial_state, None, strict=strict)

    gen = torch.Generator().manual_seed(0)
    B, T = 2, 70
    x = dict(q=torch.randn(B, T, H, KC, generator=gen),
             k=torch.randn(B, T, H, KC, generator=gen) * 0.4, v=torch.randn(B, T, H, V, generator=gen),
             log_magnitude=-rate * (0.5 + torch.rand(B, T, H, KC, generator=gen)),
             phase=torch.randn(B, T, H, KC, generator=gen),
             initial_state=torch.complex(torch.randn(B, H, KC, V, generator=gen),
                                         torch.randn(B, H, KC, V, generator=gen)))
    w, w_S = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, KC, V, generator=gen)
    out = []
    for run, cast in ((lambda a: linear_complex(**a, scale=(2 * KC) ** -0.5, inner=inner,
                                                output_final_state=True), lambda t: t),
                      (lambda a: linear_complex_ref(**a, scale=(2 * KC) ** -0.5,
                                                    output_final_state=True),
                       lambda t: t.to(torch.complex128 if t.is_complex() else torch.float64))):
        a = {n: cast(t).requires_grad_() for n, t in x.items()}
        o, S = run(a)
        loss = (o * w.to(o.dtype)).sum() + (S.real * w_S.to(o.dtype)).sum() + S.imag.sum()
        out.append(torch.autograd.grad(loss, list(a.values())))
    for name, a, b in zip(x, *out):
        assert_close(a, b, torch.float32, f"d{name} at ~-{rate}/step")


@pytest.mark.parametrize("final_loss", [False, True])
def test_delta_chunk_strong_gate_gradient(final_loss):
    """Gates of about -8 per step (log space), the loss on the outputs (and the final state):
    every gradient against the float64 loop, packed sequences. The gate's gradient is of order
    e^{-8}; the per-chunk form sums only shares that carry their decay (the identity q·dq - v·dv
    over the sequence holds each step's own write twice: 1.3e-4 and 1.6e-4 measured)."""
    x, w, cu = inputs("delta", "scalar", 2, 2, LENGTHS)
    x["g"] = -8 * (0.5 + torch.rand(x["g"].shape, generator=torch.Generator().manual_seed(5)))
    o, S, g = grads(lambda a: run_kernel("delta", "scalar", 2, 2, a, cu), x, w, final_loss)
    xd, wd = {n: t.double() for n, t in x.items()}, tuple(t.double() for t in w)
    o2, _, g2 = grads(lambda a: run_ref("delta", a, cu), xd, wd, final_loss)
    assert_close(o, o2, torch.float32, "o")
    for name in x:
        assert_close(g[name], g2[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("decay", ["none", "scalar", "key"])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_linear_chunk(decay, layout):
    """T = 37 over chunks of 16 (B = 2) or packed lengths (5, 17, 9); 2 q/k heads for 4 value
    heads; initial state; gradients of q, k, v, g and the initial state."""
    check("linear", decay, 4, 2, LENGTHS if layout == "varlen" else None)


@pytest.mark.parametrize("decay", ["none", "scalar", "key"])
def test_linear_chunk_tiles(decay):
    """Key and value tiles of 16 (K = 20, V = 24: two of each, the second partly masked): the
    forward's outputs summed over key tiles, dq/dk/dG per key tile, dv over value tiles; packed
    sequences and a final-state loss (dg's carry)."""
    check("linear", decay, 4, 2, LENGTHS, extras={"chunk_bk": 16, "chunk_bv": 16})


@pytest.mark.parametrize("decay", ["none", "scalar"])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_delta_chunk(decay, layout):
    """As for linear, with β in (0, 1.9): negative eigenvalues of I - β k kᵀ."""
    check("delta", decay, 4, 2, LENGTHS if layout == "varlen" else None)


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_delta_chunk_value_tiles(decay):
    """The chunked backward with its value dimension (24) over two tiles of 16, the second
    masked (the state passes' grid, the per-chunk kernel's loop over tiles and dβ's shares per
    tile), and chunks of 32 (the GPU's for K <= 64; 16 elsewhere under the interpreter); packed
    sequences; no loss on the final state (dS_T = 0, dg without its S_T term)."""
    check("delta", decay, 4, 2, LENGTHS, final_loss=False,
          extras={"delta_bvb": 16, "delta_bvc": 16, "delta_bt_interpret": 32})


def test_delta_chunk_no_initial_state():
    """Gated, T = 37 in chunks of 16, no initial state (dS_0 not returned), both losses."""
    check("delta", "scalar", 2, 2, h0=False)


@pytest.mark.parametrize("core,decay", [("linear", "none"), ("linear", "scalar"),
                                        ("linear", "key"), ("delta", "none"),
                                        ("delta", "scalar")])
def test_single_step_no_state(core, decay):
    """T = 1, no initial state, a loss on o only (no final-state gradient)."""
    check(core, decay, 2, 2, T=1, h0=False, final_loss=False)


def test_linear_key_matches_fla_gla():
    """GLA (per-key decay) against fla's naive recurrence too."""
    from fla.ops.gla.naive import naive_recurrent_gla

    def fla_gla(a):
        return naive_recurrent_gla(a["q"], a["k"], a["v"], a["g"], initial_state=a["h0"],
                                   output_final_state=True)
    check("linear", "key", 2, 2, extra_ref=fla_gla)


def test_gated_delta_matches_fla():
    """Gated delta rule against fla's naive recurrence too (value head h reads q/k head h // 2)."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    def fla_gdn(a):
        q, k = a["q"].repeat_interleave(2, 2), a["k"].repeat_interleave(2, 2)
        return naive_recurrent_gated_delta_rule(q, k, a["v"], a["beta"], a["g"], scale=K ** -0.5,
                                                initial_state=a["h0"], output_final_state=True)
    check("delta", "scalar", 4, 2, extra_ref=fla_gdn)


@pytest.mark.parametrize("core,decay", [("linear", "key"), ("delta", "scalar")])
def test_fp16(core, decay):
    """fp16 q, k, v (β): o in fp16 and gradients within the fp16 tolerance of the fp32 reference."""
    x, w, cu = inputs(core, decay, 4, 2, LENGTHS, dtype=torch.float16)
    o, S, g = grads(lambda a: run_kernel(core, decay, 4, 2, a, cu, torch.float16), x, w)
    o2, S2, g2 = grads(lambda a: run_ref(core, a, cu), x, w)
    assert o.dtype == torch.float16 and S.dtype == torch.float32
    assert_close(o.float(), o2, torch.float16, "o")
    assert_close(S, S2, torch.float16, "final state")
    for name in x:
        assert_close(g[name].float(), g2[name], torch.float16, f"d{name}")


# ---- fused producers (the IR's prologue) -------------------------------------------------

L2 = ("l2norm", 1e-6)
GDN = (("beta", (("sigmoid",),)), ("g", (("logsigmoid",),)), ("k", (("silu",), L2)),
       ("q", (L2,)), ("v", (("silu",),)))  # Gated DeltaNet's (+ a silu on v)


def raw_operands(x, seed=1):
    """Raw (pre-producer) q, k, v, β, g: unnormalised keys, β and the gate's logits anywhere."""
    gen = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(x[n].shape, generator=gen) for n in ("q", "k", "v") if n in x}
    out.update({n: torch.randn(x[n].shape, generator=gen) * 2 for n in ("beta", "g") if n in x})
    return out


@pytest.mark.parametrize("decay,layout", [("scalar", "padded"), ("scalar", "varlen"),
                                          ("none", "varlen")])
def test_delta_chunk_prologue(decay, layout):
    """Every operand's chain in registers, forward and backward (dq, dk, dv, dβ, dg w.r.t. the raw
    operands, dg after the reverse cumsum); varlen: two value tiles of 16 in the backward (dv
    chained back per tile by the per-chunk kernel)."""
    prologue = tuple(p for p in GDN if decay == "scalar" or p[0] != "g")
    extras = {"delta_bvb": 16, "delta_bvc": 16} if layout == "varlen" else None
    check("delta", decay, 4, 2, LENGTHS if layout == "varlen" else None, prologue=prologue,
          raw=raw_operands, extras=extras)


@pytest.mark.parametrize("decay", ["scalar", "key"])
@pytest.mark.parametrize("tiles", [False, True])
def test_linear_chunk_prologue(decay, tiles):
    """GLA-style g = logsigmoid(g), q = silu(q), v = silu(v), k = l2norm(k): in registers where
    one key tile covers K (l2norm included); with key tiles of 16 (K = 20) l2norm stays on the
    torch side (``_UNFUSED``) and the elementwise producers are still fused."""
    prologue = (("g", (("logsigmoid",),)), ("k", (L2,)), ("q", (("silu",),)), ("v", (("silu",),)))
    extras = {"chunk_bk": 16, "chunk_bv": 16} if tiles else None
    m = module("linear", decay, 4, 2, extras=extras, prologue=prologue)
    unfused = getattr(m, prefix("linear", decay, 4, 2, extras=extras, prologue=prologue) + "_UNFUSED")
    assert unfused == ((("k", (L2,)),) if tiles else ())
    check("linear", decay, 4, 2, LENGTHS if tiles else None, prologue=prologue, raw=raw_operands,
          extras=extras)


# ---- ahead-of-time build for Hopper --------------------------------------------------------

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
AOT_SPECS = [("linear", "none"), ("linear", "scalar"), ("linear", "key"), ("delta", "none"),
             ("delta", "scalar")]
AOT_SCRIPT = """
import json, sys
import triton_harness as th
from seqdsl.backends.triton.kernel_spec import KernelSpec
rows = []
for core, decay in json.loads(sys.argv[1]):
    spec = KernelSpec(core=core, H=4, HQ=2, K=64, V=64, decay=decay, scale=0.125, site="test." + core)
    rows += th.sm90_report(core + "_chunk.py.j2", spec, core + "_" + decay)
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def sm90_rows():
    """The sm90 build of every kernel (one subprocess without the interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT, json.dumps(AOT_SPECS)], env=env,
                         cwd=os.path.dirname(__file__), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="needs the cuobjdump of the triton wheel")
def test_kernels_compile_for_sm90(sm90_rows):
    """Every registered kernel at its default configuration (bf16 inputs, fp32 states, K = V =
    64, 4 value heads on 2 q/k heads) compiles for sm90, spills nothing, and uses tensor cores
    (HGMMA/HMMA) where it calls tl.dot."""
    assert len(sm90_rows) == 25  # linear: 17 over the three decays; delta: fwd + 3 backward
    for row in sm90_rows:
        print(row)
        assert row["STACK"] == 0 and row["LOCAL"] == 0, f"spills: {row}"
        if row["uses_dot"]:
            assert row["hgmma"] + row["hmma"] > 0, f"tl.dot without tensor cores: {row}"
