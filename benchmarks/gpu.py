"""GPU speed of the generated Triton chunk kernels against fla's hand-written Triton kernels and
seqdsl's own torch chunked path, all in one process on one GPU.

Not a test, and it needs a CUDA GPU: `python benchmarks/gpu.py [--out benchmarks/GPU_RESULTS.md]`.
For each core (linear with no / scalar / per-key decay, delta with and without a gate) at bf16,
B = 4, H = 16, K = V = 128 (and K = V = 64) and T in --lengths: the median time of the forward and
of forward + backward (triton.testing.do_bench, CUDA events), the ratio fla / seqdsl, and the
output's relative RMS error of each Triton path against seqdsl's torch path in fp32 on the same
inputs (a correctness check of the timed code, not the test suite's tolerance).

The generated kernels come from seqdsl.backends.triton.codegen.load_site: the same templates and
tile choices a compiled model's kernels.py holds for that core call.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from seqdsl import ops
from seqdsl.ops.tolerances import errors
from seqdsl.backends.triton.codegen import core_call, core_inputs, core_spec, load_site

#: (label, seqdsl core, decay, fla function name)
CASES = [
    ("linear, no decay", "linear", "none", "chunk_simple_gla"),
    ("linear, scalar decay (RetNet/Mamba-2)", "linear", "scalar", "chunk_simple_gla"),
    ("linear, per-key decay (GLA)", "linear", "key", "chunk_gla"),
    ("delta, no gate (DeltaNet)", "delta", "none", "chunk_delta_rule"),
    ("delta, scalar gate (Gated DeltaNet)", "delta", "scalar", "chunk_gated_delta_rule"),
]


def inputs(core, decay, B, T, H, K, V, dtype, seed=0):
    x = core_inputs(core, decay, B, T, H, K, V, "cuda", seed)
    return {n: t.to(dtype) if n in ("q", "k", "v") else t for n, t in x.items()}


def seqdsl_fn(site, core):
    return lambda x: core_call(site.triton, core, x, initial_state=None, output_final_state=True)


def torch_fn(core, scale):
    fn = ops.delta if core == "delta" else ops.linear
    return lambda x: core_call(fn, core, x, scale=scale, output_final_state=True)


def fla_fn(name, core, decay, scale):
    try:
        import fla.ops as fo
    except ImportError:
        return None
    fn = getattr(fo, name)

    def run(x):
        if name == "chunk_simple_gla":
            return fn(x["q"], x["k"], x["v"], g=x.get("g"), scale=scale, output_final_state=True)
        if name == "chunk_gla":
            return fn(x["q"], x["k"], x["v"], x["g"], scale=scale, output_final_state=True)
        if name == "chunk_delta_rule":
            return fn(x["q"], x["k"], x["v"], x["beta"], scale=scale, output_final_state=True)
        return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=scale, output_final_state=True)
    return run


def bench(run, x, backward):
    from triton.testing import do_bench

    leaves = {n: t.detach().clone().requires_grad_(backward) for n, t in x.items()}
    do = torch.randn_like(leaves["v"])

    def once():
        o, _ = run(leaves)
        if backward:
            o.backward(do)
    if not backward:
        with torch.no_grad():
            return do_bench(once, warmup=50, rep=200, return_mode="median")
    return do_bench(once, warmup=50, rep=200, grad_to_none=list(leaves.values()),
                    return_mode="median")


def rel(a, b):
    return errors(a, b)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--cases", type=int, nargs="+", default=None,
                    help="indices into CASES (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--torch-up-to", type=int, default=4096,
                    help="time seqdsl's torch path only up to this length (it is the slow one)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: start no new case after this long (fla autotunes each new "
                         "shape), report what was measured")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    B, H = args.batch, args.heads
    rows, start = [], time.perf_counter()
    for D in args.dims:
        for i, (label, core, decay, fla_name) in enumerate(CASES):
            if args.cases is not None and i not in args.cases:
                continue
            if args.budget and time.perf_counter() - start > args.budget:
                print(f"budget of {args.budget} s spent: skipping {label}, K=V={D}", flush=True)
                continue
            site = load_site(core_spec(core, H=H, K=D, V=D, decay=decay, scale=D ** -0.5),
                             f"bench_{core}_{decay}_{D}")
            runs = {"seqdsl": seqdsl_fn(site, core),
                    "fla": fla_fn(fla_name, core, decay, D ** -0.5),
                    "torch": torch_fn(core, D ** -0.5)}
            for T in args.lengths:
                x = inputs(core, decay, B, T, H, D, D, torch.bfloat16)
                with torch.no_grad():
                    ref = runs["torch"]({n: t.float() for n, t in x.items()})[0]
                    err = {n: rel(r(x)[0], ref) for n, r in runs.items()
                           if r is not None and n != "torch"}
                row = {"case": label, "D": D, "T": T, "err": err}
                for name, run in runs.items():
                    if run is None or (name == "torch" and T > args.torch_up_to):
                        continue
                    times = []
                    for backward in (False, True):
                        try:
                            times.append(bench(run, x, backward))
                        except Exception as e:  # a peer that fails here: report it, go on
                            times.append(float("nan"))
                            row.setdefault("notes", []).append(
                                f"{name} {'fwd+bwd' if backward else 'fwd'}, {label}: "
                                f"{type(e).__name__}: {e}"[:240])
                    row[name] = tuple(times)
                rows.append(row)
                print(f"[{time.perf_counter() - start:6.1f} s] " + _line(row), flush=True)
                if args.out:
                    args.out.write_text(_report(rows, B, H, triton.__version__))
    text = _report(rows, B, H, triton.__version__)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def _line(r):
    s = r.get("seqdsl", (float("nan"),) * 2)
    f = r.get("fla", (float("nan"),) * 2)
    t = r.get("torch", (float("nan"),) * 2)
    errs = " ".join(f"{k} {v:.1e}" for k, v in r["err"].items())
    return (f"{r['case']:<40} D={r['D']:<4} T={r['T']:<5} fwd seqdsl {s[0]:7.3f} fla {f[0]:7.3f} "
            f"torch {t[0]:8.3f} | fwd+bwd seqdsl {s[1]:7.3f} fla {f[1]:7.3f} torch {t[1]:8.3f} ms"
            f" | err {errs}")


def _report(rows, B, H, triton_version):
    gpu = torch.cuda.get_device_name()
    out = ["# GPU benchmark: generated Triton chunk kernels vs fla's Triton kernels", "",
           f"{gpu}; torch {torch.__version__}, triton {triton_version}, Python "
           f"{platform.python_version()}. bf16 q, k, v; B = {B}, H = {H}; median of "
           "triton.testing.do_bench (CUDA events). `fla/seqdsl` > 1: seqdsl faster. err: relative "
           "RMS of the output against seqdsl's torch chunked path in fp32 on the same inputs.", "",
           "| case | K=V | T | fwd seqdsl ms | fwd fla ms | fla/seqdsl | fwd torch ms | "
           "fwd+bwd seqdsl ms | fwd+bwd fla ms | fla/seqdsl | fwd+bwd torch ms | err seqdsl | "
           "err fla |", "|" + "---|" * 13]
    for r in rows:
        s = r.get("seqdsl", (float("nan"),) * 2)
        f = r.get("fla", (float("nan"),) * 2)
        t = r.get("torch", (float("nan"),) * 2)
        out.append(f"| {r['case']} | {r['D']} | {r['T']} | {s[0]:.3f} | {f[0]:.3f} | "
                   f"{f[0] / s[0]:.2f} | {t[0]:.3f} | {s[1]:.3f} | {f[1]:.3f} | "
                   f"{f[1] / s[1]:.2f} | "
                   f"{t[1]:.3f} | {r['err'].get('seqdsl', float('nan')):.1e} | "
                   f"{r['err'].get('fla', float('nan')):.1e} |")
    notes = [n for r in rows for n in r.get("notes", [])]
    if notes:
        out += ["", "Failures:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
