"""The fused recurrent and scan kernel families against the torch reference cores, under the interpreter.

At the model level the chunked kernels serve T > 1 wherever they exist, so these tests call the
recurrent entry points directly: every decay kind of ``linear``, ``delta`` with and without a gate,
fused prologues (the IR's producer chains, forward and backward in registers), several value tiles
(partial sums over tiles), q/k heads shared by value heads, T past one or two checkpoint intervals
(the backward restarts from state checkpoints), an initial state, packed sequences, and gradients of every input.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from seqdsl import ops  # noqa: E402
from seqdsl.backends.triton import support as ts  # noqa: E402
from seqdsl.backends.triton.codegen import CHECKPOINT, _env  # noqa: E402
from seqdsl.backends.triton.kernel_spec import KernelSpec  # noqa: E402
from seqdsl.ops.tolerances import assert_close  # noqa: E402

import triton_harness  # noqa: E402

pytestmark = triton_harness.runs_kernels


def _load(spec: KernelSpec, family: str, prefix: str):
    includes = "".join(f'{{% include "{f}" %}}\n' for f in family.split("+"))
    source = triton_harness.HEADER + _env().from_string(includes).render(p=prefix, s=spec,
                                                                          reg="REGISTRY")
    return triton_harness.load_source(source, prefix)


def _linear_spec(core, decay, H=2, HQ=2, K=8, V=12, prologue=(), BV=8, BVB=4):
    return KernelSpec(core, H=H, K=K, V=V, HQ=HQ, decay=decay, scale=K ** -0.5, prologue=prologue,
                      site="test", spec_ref="test.seq:1",
                      extras={"BK": 8, "BV": BV, "BVB": BVB, "C": CHECKPOINT, "warps": 1,
                              "warps_bwd": 1, "SBT": 16, "SBV": 4, "swarps": 1, "chunk_min_t": 64})


def _inputs(core, decay, B, T, H, HQ, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, T, HQ, K, generator=g), "k": torch.randn(B, T, HQ, K, generator=g),
         "v": torch.randn(B, T, H, V, generator=g)}
    if core == "delta":
        x["beta"] = torch.randn(B, T, H, generator=g)
    if decay == "scalar":
        x["g"] = torch.randn(B, T, H, generator=g)
    elif decay == "key":
        x["g"] = torch.randn(B, T, H, K, generator=g)
    elif decay == "key_value":
        x["g"] = torch.randn(B, T, H, K, V, generator=g)
    elif decay == "factored":
        x["A"] = -torch.rand(H, K, V, generator=g) - 0.1
        x["dt"] = torch.randn(B, T, H, V, generator=g)
    x["h0"] = torch.randn(B, H, K, V, generator=g)
    return x


#: raw inputs -> the operands the reference sees (the spec's producers, as the torch path applies them)
def _reference(core, spec, x, cu_seqlens=None):
    ops_in = ts.apply_prologue(spec.prologue, {n: x.get(n) for n in ("q", "k", "v", "beta", "g", "dt")})
    if "g" in x and not any(n == "g" for n, _ in spec.prologue):
        ops_in["g"] = torch.nn.functional.logsigmoid(x["g"])  # a contraction for the reference too
    h0 = x["h0"]
    if core == "delta":
        q, k = ops_in["q"], ops_in["k"]
        return ops.delta_ref(q, k, ops_in["v"], ops_in["beta"], ops_in.get("g"), scale=spec.scale,
                             initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    return ops.linear_ref(ops_in["q"], ops_in["k"], ops_in["v"], ops_in.get("g"), scale=spec.scale,
                          initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                          decay_A=x.get("A"), decay_dt=ops_in.get("dt"))


def _triton(core, spec, module, prefix, x, cu_seqlens=None, entry="recurrent"):
    g = x.get("g")
    if g is not None and not any(n == "g" for n, _ in spec.prologue):
        g = torch.nn.functional.logsigmoid(g)
    fn = triton_harness.on_device(getattr(module, f"{prefix}_{entry}"))
    args = (x["q"], x["k"], x["v"]) + ((x["beta"],) if core == "delta" else ())
    extra = {"chunked": True} if entry == "chunked" else {}
    return fn(*args, g, initial_state=x["h0"], cu_seqlens=cu_seqlens, decay_A=x.get("A"),
              decay_dt=x.get("dt"), **extra)


def _check(core, decay, prologue=(), H=2, HQ=2, T=CHECKPOINT + 8, B=2, cu_seqlens=None,
           entry="recurrent"):
    spec = _linear_spec(core, decay, H=H, HQ=HQ, prologue=prologue)
    prefix = f"rec_{core}_{decay}_{len(prologue)}_{HQ}_{entry}"
    family = "recurrent.py.j2" + ("+selective_chunk.py.j2" if entry == "chunked" else "")
    module = _load(spec, family, prefix)
    raw = _inputs(core, decay, B, T, H, HQ, spec.K, spec.V)
    if core == "delta" and not any(n == "beta" for n, _ in prologue):
        raw["beta"] = torch.sigmoid(raw["beta"]) * 2  # beta in (0, 2): negative eigenvalues too
    if core == "delta" and not any(n == "k" for n, _ in prologue):
        raw["k"] = torch.nn.functional.normalize(raw["k"], dim=-1)
    if cu_seqlens is not None:
        raw = {n: (t[:1] if n != "h0" and n != "A" else t) for n, t in raw.items()}
        raw["h0"] = torch.randn(len(cu_seqlens) - 1, H, spec.K, spec.V,
                                generator=torch.Generator().manual_seed(7))
    results = []
    for run in (_triton, _reference):
        x = {n: t.clone().requires_grad_(True) for n, t in raw.items()}
        if run is _triton:
            o, S = run(core, spec, module, prefix, x, cu_seqlens, entry)
        else:
            o, S = run(core, spec, x, cu_seqlens)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
        w2 = torch.randn(S.shape, generator=torch.Generator().manual_seed(2))
        ((o * w).sum() + (S * w2).sum()).backward()
        results.append((o, S, {n: t.grad for n, t in x.items()}))
    (o, S, grads), (o_ref, S_ref, grads_ref) = results
    assert_close(o, o_ref, torch.float32, "output")
    assert_close(S, S_ref, torch.float32, "final state")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close(grads[name], grads_ref[name], torch.float32, f"gradient of {name}")


@pytest.mark.parametrize("decay", ["none", "scalar", "key", "key_value", "factored"])
def test_linear_recurrent_every_decay(decay):
    _check("linear", decay)


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_delta_recurrent(decay):
    _check("delta", decay, T=2 * CHECKPOINT + 6 if decay == "scalar" else CHECKPOINT + 8)


def test_linear_recurrent_shared_qk_heads():
    _check("linear", "scalar", H=4, HQ=2, T=20)


def test_fused_prologues_forward_and_backward():
    """Gated DeltaNet's producers: k = l2norm(silu(k)), q = l2norm(q), beta = sigmoid(beta),
    g = logsigmoid(g) computed inside the kernels, differentiated there too."""
    prologue = (("beta", (("sigmoid",),)), ("g", (("logsigmoid",),)),
                ("k", (("silu",), ("l2norm", 1e-6))), ("q", (("l2norm", 1e-6),)))
    _check("delta", "scalar", prologue=prologue, T=40)


def test_fused_mamba_prologue():
    """Mamba's dt = softplus(dt) and v = dt * v, with the [K, V] decay exp(A * dt) factored."""
    _check("linear", "factored", prologue=(("dt", (("softplus",),)), ("v", (("mul_dt",),))), T=40)


def test_chunked_selective_scan():
    """Mamba's [K, V] decay on the chunked scan kernels: blocks of 16 steps, three value tiles,
    the fused dt and input scaling, an initial state, q/k shared by the two value heads."""
    _check("linear", "factored", prologue=(("dt", (("softplus",),)), ("v", (("mul_dt",),))),
           T=33, H=2, HQ=1, entry="chunked")


def test_chunked_selective_scan_packed_sequences():
    _check("linear", "factored", T=25, cu_seqlens=torch.tensor([0, 7, 24, 25]), entry="chunked")


def test_recurrent_packed_sequences():
    _check("delta", "scalar", T=41, cu_seqlens=torch.tensor([0, 7, 40, 41]))


def test_scan_kernel_with_prologue_and_packed_sequences():
    spec = KernelSpec("scan", H=1, K=12, V=12, prologue=(("a", (("sigmoid",),)),),
                      site="test", spec_ref="test.seq:1",
                      extras={"BD": 8, "BT": 16, "warps": 1, "chunk_min_t": 64})
    module = _load(spec, "scan.py.j2", "scan_test")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 45, 3, 4, generator=g), torch.randn(1, 45, 3, 4, generator=g)
    h0 = torch.randn(3, 3, 4, generator=g)
    cu = torch.tensor([0, 9, 44, 45])
    outs = []
    for use_kernel in ("blocks", "steps", False):
        xs = [t.clone().requires_grad_(True) for t in (a, b, h0)]
        if use_kernel:
            h, hT = triton_harness.on_device(module.scan_test_scan)(xs[0], xs[1], initial_state=xs[2], cu_seqlens=cu,
                                          chunked=use_kernel == "blocks")
        else:
            h, hT = ops.scan_ref(torch.sigmoid(xs[0]), xs[1], initial_state=xs[2],
                                 output_final_state=True, cu_seqlens=cu)
        ((h * torch.cos(h)).sum() + hT.square().sum()).backward()
        outs.append((h, hT, [x.grad for x in xs]))
    for form, result in zip(("blocks", "steps"), outs[:2]):
        assert_close(result[0], outs[2][0], torch.float32, f"scan output ({form})")
        assert_close(result[1], outs[2][1], torch.float32, f"scan final state ({form})")
        for name, got, want in zip(("a", "b", "h0"), result[2], outs[2][2]):
            assert_close(got, want, torch.float32, f"scan gradient of {name} ({form})")
