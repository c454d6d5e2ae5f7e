"""Numerics of the generated chunk kernels on a GPU at model sizes, in every dtype the interpreter
cannot check (bf16) and at the GPU's own tile sizes: outputs, final states and gradients of q, k,
v (β, g) against seqdsl's torch chunked path in fp32 on the same (rounded) inputs.

Not a test (CI has no GPU): `python scripts/gpu_numerics.py [--variants]`. Prints one line per
case: relative RMS errors. --variants also tries other tile shapes of the linear kernels
(chunk_bt, chunk_bk), to tell a kernel's error from a compiler's (see docs).
"""

from __future__ import annotations

import argparse
import sys

import torch

from seqdsl import ops
from seqdsl.ops.tolerances import errors
from seqdsl.backends.triton import support as ts
from seqdsl.backends.triton.codegen import core_call, core_inputs, core_spec, load_site


#: "cuda"; "cpu" under TRITON_INTERPRET=1 (a dry run of this script, not of the GPU)
DEVICE = "cpu" if ts.INTERPRET else "cuda"


def rel(a, b):
    return errors(a, b)[0]


T_DEFAULT = 512


def case(core, decay, D, dtype, extras=None, B=2, T=None, H=4, seed=0, backward=True):
    T = T or T_DEFAULT
    spec = core_spec(core, H=H, K=D, V=D, decay=decay, scale=D ** -0.5)
    spec.extras.update(extras or {})
    tag = "_".join(f"{k}{v}" for k, v in sorted((extras or {}).items())) or "default"
    site = load_site(spec, f"num_{core}_{decay}_{D}_{tag}")
    x = core_inputs(core, decay, B, T, H, D, D, DEVICE, seed)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)

    def rnd(*shape):
        return torch.randn(*shape, device=DEVICE, generator=g)
    x["h0"] = rnd(B, H, D, D)
    x = {n: (t.to(dtype).float() if n in ("q", "k", "v") else t) for n, t in x.items()}
    do, dS = rnd(B, T, H, D), rnd(B, H, D, D)
    results = []
    for fast in (True, False):
        leaves = {n: t.clone().requires_grad_(backward) for n, t in x.items()}
        a = {n: (t.to(dtype) if fast and n in ("q", "k", "v") else t) for n, t in leaves.items()}
        if fast:
            o, S = core_call(site.triton, core, a, initial_state=a["h0"], output_final_state=True)
        else:
            o, S = core_call(ops.delta if core == "delta" else ops.linear, core, a,
                             scale=D ** -0.5, initial_state=a["h0"], output_final_state=True)
        if backward:
            ((o.float() * do).sum() + (S * dS).sum()).backward()
        results.append((o.detach().float(), S.detach(), {n: t.grad for n, t in leaves.items()}))
    (o, S, gr), (o2, S2, gr2) = results
    errs = {"o": rel(o, o2), "S": rel(S, S2)}
    if backward:
        errs.update({f"d{n}": rel(gr[n], gr2[n]) for n in gr})
    print(f"{core:6} {decay:6} K=V={D:<4} {str(dtype)[6:]:8} {tag:22} " +
          " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("scripts/gpu_numerics.py needs a CUDA GPU", file=sys.stderr)
        return 2
    for D in args.dims:
        for core, decay in (("linear", "none"), ("linear", "scalar"), ("linear", "key"),
                            ("delta", "none"), ("delta", "scalar")):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                case(core, decay, D, dtype)
    if args.variants:
        for D in args.dims:
            for decay in ("scalar", "key"):
                for extras in ({"chunk_bt": 32}, {"chunk_bt": 16}, {"chunk_bk": 32},
                               {"chunk_bk": 128}, {"chunk_bv": 32}):
                    case("linear", decay, D, torch.bfloat16, extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
