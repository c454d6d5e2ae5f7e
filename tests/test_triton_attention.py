"""The Triton attention family (backends/triton/templates/attention.py.j2) against the torch forms of
seqdsl.ops.attention: flash forward and backward, packed sequences, decoding, and an sm90 build of
every registered kernel.

The kernels run on CPU through triton's interpreter (TRITON_INTERPRET=1, set here before triton is
imported; fp32 and fp16 only: the interpreter's tl.dot is wrong on bf16). Shapes are tiny, and the
interpreter tiles are 16 x 16, so T=37 crosses tile boundaries and leaves a partial tile.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # noqa: E402  (read when triton is imported)

import jinja2
import pytest
import torch

from seqdsl.backends.triton import support as ts
from seqdsl.backends.triton.kernel_spec import KernelSpec
from seqdsl.ops import attention_decode, attention_ref
from seqdsl.ops.tolerances import assert_close

import triton  # noqa: E402  (after TRITON_INTERPRET)
import triton_harness as th  # noqa: E402  (where the kernels run: DEVICE, on_device)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "backends" / "triton" / "templates"
HEADER = """import math
import torch
import triton
import triton.language as tl
from seqdsl.backends.triton import support as ts
REGISTRY = ts.Registry()
"""

HAVE_NUMPY = importlib.util.find_spec("numpy") is not None  # (the interpreter runs on numpy)

needs_interpreter = pytest.mark.skipif(
    th.DEVICE is None or (ts.INTERPRET and not HAVE_NUMPY),
    reason="runs the kernels on CPU through triton's interpreter (TRITON_INTERPRET=1 before triton "
           "is imported, and numpy), or on a GPU")

# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------

def _env(trim: bool = True) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=trim, lstrip_blocks=trim)


def render_source(spec: KernelSpec, prefix: str, trim: bool = True) -> str:
    return HEADER + _env(trim).get_template("attention.py.j2").render(p=prefix, s=spec,
                                                                      reg="REGISTRY")


@functools.lru_cache(maxsize=None)
def load(spec: KernelSpec, prefix: str = "attn"):
    """The rendered fragment as a module (the harness's file-backed import: triton reads the
    kernels' source back)."""
    src = render_source(spec, prefix)
    ast.parse(src)
    return th.load_source(src, prefix)


def spec(H=2, HKV=0, K=16, V=16, scale=None, window=None, softcap=None) -> KernelSpec:
    return KernelSpec(core="attention", H=H, HKV=HKV, K=K, V=V,
                      scale=K ** -0.5 if scale is None else scale, window=window,
                      softcap=softcap, site="test.attn", spec_ref="test.seq:1")


SPECS = {
    "mha": spec(H=2),
    "gqa": spec(H=4, HKV=2, scale=0.3),
    "mqa": spec(H=3, HKV=1),
    "window": spec(H=2, window=5),
    "softcap": spec(H=4, HKV=2, softcap=30.0),
    # a cap that bites (logits of several c), with a window: the cap's derivative matters
    "softcap_tight": spec(H=2, scale=1.0, softcap=1.5, window=20),
    "nonpow2": spec(H=4, HKV=2, K=24, V=20, scale=0.2, window=9),
}


def inputs(s: KernelSpec, B: int, T: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, s.H, s.K, generator=g).to(dtype)
    k = torch.randn(B, T, s.hkv, s.K, generator=g).to(dtype)
    v = torch.randn(B, T, s.hkv, s.V, generator=g).to(dtype)
    return q, k, v


def reference(s: KernelSpec, q, k, v, cu_seqlens=None):
    return attention_ref(q, k, v, window=s.window, scale=s.scale, softcap=s.softcap,
                         cu_seqlens=cu_seqlens)


def grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


# --------------------------------------------------------------------------------------------
# the rendered source
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mha", "softcap_tight", "nonpow2"])
@pytest.mark.parametrize("trim", [True, False])
def test_rendered_source(name, trim):
    """Parses with and without trim_blocks; every top-level name carries the prefix; every kernel
    opens with a comment; the spec's site and numbers are in the source."""
    s = SPECS[name]
    src = render_source(s, "blk_attn", trim)
    tree = ast.parse(src)
    fragment = ast.parse(src[len(HEADER):])
    names = []
    for node in fragment.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    assert names and all(n.startswith("blk_attn_") for n in names), names
    lines = src.splitlines()
    kernels = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.endswith("kernel")]
    assert len(kernels) == 4
    for fn in kernels:
        first = fn.body[0].lineno - 1
        assert lines[first - 1].strip().startswith("#") or lines[first].strip().startswith("#"), \
            f"{fn.name} has no comment"
    assert "test.attn (test.seq:1)" in src and repr(float(s.scale)) in src
    if trim:
        assert not any(line != line.rstrip() for line in lines), "trailing whitespace"


def test_site_is_only_a_comment():
    """A site or spec_ref with a line break stays inside its comment."""
    s = KernelSpec(core="attention", H=2, K=16, V=16, site="x\nimport os", spec_ref="y\rz")
    src = render_source(s, "p")
    ast.parse(src)
    assert "\nimport os" not in src


# --------------------------------------------------------------------------------------------
# flash forward and backward
# --------------------------------------------------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("name", list(SPECS))
def test_flash_fp32(name):
    """Output and dq, dk, dv against autograd through attention_ref, T=37 (not a tile multiple)."""
    s = SPECS[name]
    m = load(s)
    q, k, v = inputs(s, 2, 37)
    do = torch.randn(2, 37, s.H, s.V, generator=torch.Generator().manual_seed(1))
    got = grads(th.on_device(m.attn_flash), q, k, v, do)
    want = grads(lambda *a: reference(s, *a), q, k, v, do)
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert_close(a, b, torch.float32, f"{name} {what}")


@needs_interpreter
@pytest.mark.parametrize("name", ["gqa", "softcap_tight"])
def test_flash_fp16(name):
    """fp16 in, fp16 out: against the fp32 reference of the same fp16 inputs."""
    s = SPECS[name]
    m = load(s)
    q, k, v = inputs(s, 1, 37, torch.float16)
    do = torch.randn(1, 37, s.H, s.V, generator=torch.Generator().manual_seed(1)).half()
    got = grads(th.on_device(m.attn_flash), q, k, v, do)
    want = grads(lambda *a: reference(s, *(x.float() for x in a)), q, k, v, do.float())
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float16
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert_close(a.float(), b, torch.float16, f"{name} {what}")


@needs_interpreter
@pytest.mark.parametrize("name", ["gqa", "window"])
def test_flash_single_step(name):
    """T=1: one key per query, so the softmax is 1 and dq, dk are 0 up to rounding: the
    kernels form ``dP - D = do·v - do·o`` with ``o`` = v rounded, so each is bounded by a few
    ulps of the V-term dot products, times ``scale·|k|`` (or ``|q|``)."""
    s = SPECS[name]
    q, k, v = inputs(s, 3, 1)
    do = torch.randn(3, 1, s.H, s.V, generator=torch.Generator().manual_seed(1))
    got = grads(th.on_device(load(s).attn_flash), q, k, v, do)
    want = grads(lambda *a: reference(s, *a), q, k, v, do)
    assert_close(got[0], want[0], torch.float32, f"{name} T=1 o")
    assert_close(got[3], want[3], torch.float32, f"{name} T=1 dv")
    eps = torch.finfo(torch.float32).eps
    dots = 4 * s.V * eps * float(do.abs().max() * v.abs().max()) * s.scale
    for what, a, b, other in zip(("dq", "dk"), got[1:3], want[1:3], (k, q)):
        bound = dots * float(other.abs().max())
        assert b.abs().max() == 0 and a.abs().max() <= bound, (
            f"{name} T=1 {what}: max |{what}| {float(a.abs().max()):.3g} > {bound:.3g}")


@needs_interpreter
@pytest.mark.parametrize("name", ["gqa", "nonpow2"])
def test_flash_packed(name):
    """Three packed sequences (5, 17, 9) against one call per sequence; no query sees another
    sequence's keys."""
    s = SPECS[name]
    m = load(s)
    lengths = [5, 17, 9]
    cu = torch.tensor([0, 5, 22, 31])
    q, k, v = inputs(s, 1, sum(lengths))
    do = torch.randn(1, sum(lengths), s.H, s.V, generator=torch.Generator().manual_seed(1))
    got = grads(lambda *a: th.on_device(m.attn_flash)(*a, cu_seqlens=cu), q, k, v, do)

    def per_sequence(q, k, v):
        return torch.cat([reference(s, q[:, a:b], k[:, a:b], v[:, a:b])
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)

    want = grads(per_sequence, q, k, v, do)
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert_close(a, b, torch.float32, f"{name} packed {what}")


def test_flash_rejects_wrong_heads():
    s = SPECS["gqa"]
    m = load(s)
    q, k, v = inputs(SPECS["mha"], 1, 4)
    with pytest.raises(ValueError, match="must end in dims"):
        m.attn_flash(q, k, v)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("name", ["gqa", "window", "softcap_tight", "nonpow2"])
@pytest.mark.parametrize("L", [1, 37])
def test_decode(name, L):
    s = SPECS[name]
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, s.H, s.K, generator=g)
    kc = torch.randn(2, L + 3, s.hkv, s.K, generator=g)[:, 3:]   # a strided view, as a cache slice
    vc = torch.randn(2, L, s.hkv, s.V, generator=g)
    got = th.on_device(load(s).attn_decode)(q, kc, vc)
    want = attention_decode(q, kc, vc, window=s.window, scale=s.scale, softcap=s.softcap)
    assert_close(got, want, torch.float32, f"{name} decode L={L}")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half(dtype):
    """16-bit in and out (the decode kernel has no tl.dot, so bf16 runs under the interpreter)."""
    s = SPECS["window"]
    g = torch.Generator().manual_seed(0)
    q, kc, vc = (torch.randn(*shape, generator=g).to(dtype)
                 for shape in ((2, s.H, s.K), (2, 23, s.hkv, s.K), (2, 23, s.hkv, s.V)))
    got = th.on_device(load(s).attn_decode)(q, kc, vc)
    assert got.dtype == dtype
    want = attention_decode(q.float(), kc.float(), vc.float(), window=s.window, scale=s.scale)
    assert_close(got.float(), want, dtype, f"decode {dtype}")


# --------------------------------------------------------------------------------------------
# ahead-of-time build for Hopper
# --------------------------------------------------------------------------------------------

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

#: realistic head dims for the build (the numeric tests use tiny ones); the padded head dim picks
#: the tiles and warps
BUILD_SPECS = {
    "hd128_gqa": spec(H=32, HKV=8, K=128, V=128),
    "hd80_window_softcap": spec(H=8, HKV=2, K=80, V=80, window=256, softcap=50.0),
}


def build_report(info) -> dict:
    """Compile one registered kernel for sm90: registers, spills, shared memory, tensor cores."""
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(
        triton.compiler.ASTSource(fn=info.fn, signature=info.signature,
                                  constexprs=info.constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": info.num_warps, "num_stages": info.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{info.name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line
                  for item in line.split() if ":" in item)
    return dict(kernel=info.name, uses_dot=info.uses_dot, reg=int(fields["REG"]),
                stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
                shared=compiled.metadata.shared, hgmma="HGMMA" in sass, hmma="HMMA" in sass)


def build_all() -> dict:
    """{spec name: [report per registered kernel]}; needs a process without the interpreter."""
    return {name: [build_report(info) for info in load(s).REGISTRY.kernels]
            for name, s in BUILD_SPECS.items()}


@pytest.fixture(scope="module")
def builds():
    """The build runs in a fresh process: once triton is imported under TRITON_INTERPRET=1, its
    own library functions are interpreted ones, which triton.compile cannot take."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, __file__, "build"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="triton's cuobjdump is not installed")
@pytest.mark.parametrize("name", list(BUILD_SPECS))
def test_build_sm90(builds, name):
    """Every registered kernel compiles for sm90 with no spills; the tl.dot kernels use the
    tensor cores (HGMMA, or HMMA)."""
    reports = builds[name]
    assert [r["kernel"] for r in reports] == ["attn_flash_fwd_kernel", "attn_flash_bwd_dkdv_kernel",
                                              "attn_flash_bwd_dq_kernel", "attn_decode_kernel"]
    for r in reports:
        print(f"{name}: {r}")
        assert r["stack"] == 0 and r["local"] == 0, f"spills: {r}"
        if r["uses_dot"]:
            assert r["hgmma"] or r["hmma"], f"no tensor-core instruction: {r}"


if __name__ == "__main__" and sys.argv[1:] == ["build"]:
    print(json.dumps(build_all()))
