"""Forward speed of the cores: each fast (chunked / parallel) form against its sequential reference
and, where fla ships one, against fla's pure-PyTorch naive chunked function.

Not a test: run `python benchmarks/cores.py [--lengths 512 2048] [--repeats 3]`. B = 1, H = 4,
K = V = 64 (the [K, V]-decay case uses K = 16, Mamba's state size), fp32, no autograd. Reports the
best of the repeats (robust to other load on a shared machine), after one warm-up call, in ms.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from seqdsl import ops

B, H, K, V = 1, 4, 64, 64


def timed(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Best of ``repeats`` timed calls after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def _fla(module: str, name: str):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError:
        return None


def inputs(T: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return dict(
        q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
        k_unit=F.normalize(randn(B, T, H, K), dim=-1),
        k_steps=F.normalize(randn(B, T, 2, H, K), dim=-1), v_steps=randn(B, T, 2, H, V),
        beta=torch.sigmoid(randn(B, T, H)), beta_steps=2 * torch.sigmoid(randn(B, T, 2, H)),
        g_scalar=F.logsigmoid(randn(B, T, H) + 3), g_key=F.logsigmoid(randn(B, T, H, K) + 3),
        q16=randn(B, T, H, 16), k16=randn(B, T, H, 16),
        g_kv=F.logsigmoid(randn(B, T, H, 16, V) + 3),
        phase=randn(B, T, H, K), a=torch.sigmoid(randn(B, T, H * K) + 3), b=randn(B, T, H * K),
        k_kv=randn(B, T, 1, K), v_kv=randn(B, T, 1, V),
        # a Gated DeltaNet gate at the strong end of its init (-A·dt, A·dt from 0.3 to 0.9):
        # chunk sums of about 34-43 over 64 steps, beyond the factor limit (centred factors)
        g_strong=-0.6 * (0.5 + torch.rand(B, T, H, generator=g)),
    )


def cases(x: dict[str, torch.Tensor]):
    """(name, fast, reference, fla naive chunk or None), each a zero-argument callable."""
    q, k, v = x["q"], x["k"], x["v"]
    q1, k1 = q[:, :, :1], k[:, :, :1]     # one q/k head shared by the H value heads (Mamba-2)
    chunk_simple = _fla("fla.ops.simple_gla.naive", "naive_chunk_simple_gla")
    chunk_gated_delta = _fla("fla.ops.gated_delta_rule.naive", "naive_chunk_gated_delta_rule")
    return [
        ("scan [H*K]", lambda: ops.scan(x["a"], x["b"]), lambda: ops.scan_ref(x["a"], x["b"]),
         None),
        ("linear, no decay", lambda: ops.linear(q, k, v), lambda: ops.linear_ref(q, k, v), None),
        ("linear, scalar decay", lambda: ops.linear(q, k, v, x["g_scalar"]),
         lambda: ops.linear_ref(q, k, v, x["g_scalar"]),
         chunk_simple and (lambda: chunk_simple(q, k, v, x["g_scalar"]))),
        ("linear, scalar, shared q/k", lambda: ops.linear(q1, k1, v, x["g_scalar"]),
         lambda: ops.linear_ref(q1, k1, v, x["g_scalar"]),
         chunk_simple and (lambda: chunk_simple(q1.expand_as(q), k1.expand_as(k), v,
                                                x["g_scalar"]))),
        ("linear, [K] decay", lambda: ops.linear(q, k, v, x["g_key"]),
         lambda: ops.linear_ref(q, k, v, x["g_key"]), None),
        ("linear, [K,V] decay (K=16)", lambda: ops.linear(x["q16"], x["k16"], v, x["g_kv"]),
         lambda: ops.linear_ref(x["q16"], x["k16"], v, x["g_kv"]), None),
        ("linear_complex", lambda: ops.linear_complex(q, k, v, x["g_key"], x["phase"]),
         lambda: ops.linear_complex_ref(q, k, v, x["g_key"], x["phase"]), None),
        ("delta, gated", lambda: ops.delta(q, x["k_unit"], v, x["beta"], x["g_scalar"]),
         lambda: ops.delta_ref(q, x["k_unit"], v, x["beta"], x["g_scalar"]),
         chunk_gated_delta and (lambda: chunk_gated_delta(q, x["k_unit"], v, x["g_scalar"],
                                                          x["beta"]))),
        ("delta, gated ~-0.6/step", lambda: ops.delta(q, x["k_unit"], v, x["beta"],
                                                        x["g_strong"]),
         lambda: ops.delta_ref(q, x["k_unit"], v, x["beta"], x["g_strong"]),
         chunk_gated_delta and (lambda: chunk_gated_delta(q, x["k_unit"], v, x["g_strong"],
                                                          x["beta"]))),
        ("delta_interleave, 2 steps",
         lambda: ops.delta_interleave(q, x["k_steps"], x["v_steps"], x["beta_steps"],
                                      x["g_scalar"], steps=2),
         lambda: ops.delta_interleave(q, x["k_steps"], x["v_steps"], x["beta_steps"],
                                      x["g_scalar"], steps=2, reference=True), None),
        ("attention, MQA", lambda: ops.attention(q, x["k_kv"], x["v_kv"]),
         lambda: ops.attention_ref(q, x["k_kv"], x["v_kv"]), None),
        ("attention, MQA, window 128", lambda: ops.attention(q, x["k_kv"], x["v_kv"], window=128),
         lambda: ops.attention_ref(q, x["k_kv"], x["v_kv"], window=128), None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"B={B} H={H} K=V={K}, fp32, forward only, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats} runs")
    header = (f"{'core':28s} {'T':>5s} {'fast ms':>9s} {'ref ms':>9s} {'ref/fast':>9s} "
              f"{'fla ms':>9s} {'fla/fast':>9s}")
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for T in args.lengths:
            for name, fast, ref, fla in cases(inputs(T)):
                t_fast = timed(fast, args.repeats)
                t_ref = timed(ref, args.repeats)
                line = f"{name:28s} {T:5d} {t_fast:9.1f} {t_ref:9.1f} {t_ref / t_fast:8.1f}x"
                if fla is not None:
                    t_fla = timed(fla, args.repeats)
                    line += f" {t_fla:9.1f} {t_fla / t_fast:8.1f}x"
                else:
                    line += f" {'-':>9s} {'-':>9s}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
