"""CPU benchmark: seqdsl's chunked cores and generated layers against their peers, same process.

Not a test. Run ``python benchmarks/cpu.py [--quick] [--processes N]``; prints tables and
writes ``benchmarks/RESULTS.md`` (not with ``--quick``). Every number is the best of several
runs after a warm-up, in milliseconds, taken over ``ROUNDS`` rounds that interleave all cases
(the minimum is what the code costs; the other runs measure the neighbours on a shared
machine), for the fast path, the reference and the peer alike, and every comparison is a ratio
of times measured in one process on this machine; with ``--processes N``, in each of N fresh
processes, keeping each case's best (whole processes differ by up to 1.3x on a shared virtual
machine):

* cores: chunked form vs the sequential reference (``*_ref``) vs fla's naive chunk functions,
  forward and forward+backward;
* roofline: the `linear` core with a scalar decay, as a fraction of the FLOP rate ``torch.bmm``
  reaches on matrices of the chunked algorithm's sizes;
* layers: generated blocks vs transformers' CPU paths (``MambaMixer`` slow path, ``Mamba2Mixer``
  torch path, RecurrentGemma's recurrent block), forward, and forward+backward (a training
  step's gradients of the input and every parameter) at the shortest length;
* peak memory of every core's chunked forward: the rise of the resident high-water mark in a fresh
  interpreter;
* floors that no implementation on this machine can beat: causal attention's products at the
  best matmul rate measured and its softmax's exponentials at the best ``torch.exp`` rate; for
  each layer, its dense projections alone, and those plus one decay exponential per token and
  decayed state entry.

The script re-executes itself with glibc malloc settings that keep large buffers mapped
(``STABLE_MALLOC``); page faults from fresh allocations otherwise dominate some rows. It times
every fast path (and fla's chunked peers) before any sequential reference or step-loop peer:
after those loops' thousands of small tensors, large-buffer calls run up to 2x slower for a
while, which would charge our rows (and the chunked peers) for the references' habits.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

import seqdsl
from seqdsl import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cores  # noqa: E402  (the core cases, shared with benchmarks/cores.py)

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


bench = cores.timed       # best of the repeats after a warm-up, in ms


def fwd_bwd(fn, tensors):
    """``fn`` then the backward pass of a loss on its output (gradients of every input)."""
    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        for t in tensors:
            t.grad = None
    return run


# ---- cores: the cases of benchmarks/cores.py ---------------------------------------------------

def core_times(lengths, repeats, backward: bool = False, references: bool = False):
    """``{(name, T): (fast, fla naive chunk)}`` in ms for every core case, or with
    ``references`` ``{(name, T): reference}``: the forward alone (no autograd), or with
    ``backward`` the forward and the backward pass of a loss on the output, every
    floating-point input requiring its gradient. Fast paths and peers run in rounds over all
    cases (a burst of load hits one round), keeping each one's best time."""
    times = {}
    with torch.set_grad_enabled(backward):
        for T in lengths:
            x = cores.inputs(T)
            leaves = [t.requires_grad_() for t in x.values()] if backward else []

            def timed(fn, runs, warmup=1):
                return bench(fwd_bwd(fn, leaves) if backward else fn, runs, warmup)

            cases = cores.cases(x)
            if references:
                for name, _, ref, _ in cases:
                    times[name, T] = min(timed(ref, 1, 0) for _ in range(2))
                continue
            for _ in range(ROUNDS):
                for name, fast, _, peer in cases:
                    new = (timed(fast, repeats),
                           timed(peer, repeats) if peer is not None else float("nan"))
                    old = times.get((name, T), new)
                    times[name, T] = tuple(min(a, b) if a == a else a for a, b in zip(old, new))
    return times


#: every case is timed in this many rounds, interleaved with the others, keeping its best time:
#: load on this shared machine comes in bursts of seconds that double some timings
ROUNDS = 5


def roofline(T: int = 2048, chunk: int = 64, repeats: int = 5):
    """Chunked `linear` with a scalar decay as a fraction of torch.bmm's FLOP rate."""
    x = cores.inputs(T)
    q, k, v, gs = x["q"], x["k"], x["v"], x["g_scalar"]
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    with torch.no_grad():
        t = bench(lambda: ops.linear(q, k, v, log_decay=gs, chunk_size=chunk), repeats) / 1000
    # intra-chunk q k^T and (masked) scores @ v, state readout q S and state update k^T v
    flops = 2 * H * T * (chunk * K + chunk * V + 2 * K * V)
    return flops / t, bmm_rate(H * (T // chunk), chunk, K, repeats)


def bmm_rate(n: int, rows: int, K: int, repeats: int) -> float:
    """FLOP/s of ``torch.bmm`` on ``n`` products ``[rows, K] @ [K, rows]``."""
    a, b = torch.randn(n, rows, K), torch.randn(n, K, rows)
    return 2 * n * rows * rows * K / (bench(lambda: torch.bmm(a, b), repeats) / 1000)


#: run in a fresh interpreter by :func:`peak_memory`: the rise of the resident-set high-water
#: mark across one chunked forward of a core case, every input already allocated (and nothing
#: larger before)
_PEAK_SNIPPET = """
import sys
import torch
sys.path.insert(0, {bench_dir!r})
import cores
def fast(T):
    return next(f for name, f, _, _ in cores.cases(cores.inputs(T)) if name == {name!r})
with torch.no_grad():  # one-time costs (thread pools, BLAS buffers) on a short input first
    fast(128)()
run = fast({T})
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:   # resets the high-water mark to the current RSS
    f.write("5")
before = kib("VmRSS:")
with torch.no_grad():
    run()
print((kib("VmHWM:") - before) * 1024)
"""


#: glibc malloc settings under which the resident set follows live memory: every block of
#: 128 KiB or more is its own mapping, returned to the system when freed (under
#: ``STABLE_MALLOC`` freed blocks stay in the heap, and growing temporaries, such as the score
#: blocks of causal attention, fragment it: the high-water mark then counts the allocator's
#: retention, not what the forward holds)
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peak_memory(name: str, T: int) -> int:
    """Peak bytes the chunked forward of core case ``name`` (of ``cores.cases``) adds on top
    of its inputs: the rise of the resident high-water mark (Linux ``VmHWM``, reset through
    ``/proc/self/clear_refs``) in a fresh interpreter, whose heap holds no freed pages that
    would hide the rise (``ru_maxrss`` would not do: Linux carries it across ``exec``)."""
    import subprocess
    code = _PEAK_SNIPPET.format(T=T, name=name, bench_dir=str(Path(__file__).resolve().parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, **LIVE_MALLOC})
    return int(out.stdout.strip().splitlines()[-1])


def peak_table(lengths) -> list[str]:
    """Markdown rows: each core's peak memory beyond its inputs at each T, in MiB and per
    ``T·H·(K+V)·4`` bytes (the size of q, k and v in fp32: O(T·(K+V)) per head when that
    ratio stays flat as T grows)."""
    names = [name for name, *_ in cores.cases(cores.inputs(8))]
    rows = ["| core | " + " | ".join(f"T={T}: MiB, x T*H*(K+V)*4" for T in lengths) + " |",
            "|---|" + "---|" * len(lengths)]
    for name in names:
        cells = []
        for T in lengths:
            peak = peak_memory(name, T)
            per = T * cores.H * (cores.K + cores.V) * 4
            cells.append(f"{peak / 2**20:.1f}, {peak / per:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


# ---- layers ----------------------------------------------------------------------------------

def _mixer_only(spec: str, mixer: str, **overrides):
    """A one-layer model whose block is just `x + mixer(x)`: the unit transformers' mixer
    classes implement (no norm, no MLP)."""
    text = (f'import "{spec}"\nmodel bench(vocab = 100, d = 64) {{ layers = [b] }}\n'
            f"block b {{ x = x + {mixer}(x) }}\n")
    module = seqdsl.compile(SPECS / "_bench.seq", text=text, **overrides)
    torch.manual_seed(0)
    return module.Model().eval().layers[0]


def layer_cases(lengths):
    """(name, T, ours, peer, leaves, module, decays) for every layer comparison: two
    zero-argument callables, the tensors a training step differentiates (the input and both
    layers' parameters), our layer's module (for :func:`projection_time`), and how many decay
    factors ``e^{..}`` the layer's recurrence takes per token (Mamba: one per state entry,
    ``e^{Δ A}`` of ``[d_inner, d_state]``; Mamba-2: one per head; RG-LRU: one per channel),
    each an exponential any exact forward evaluates (for :func:`exp_rate`'s floor)."""
    import transformers as tf
    mamba_cfg = tf.MambaConfig(hidden_size=768, state_size=16, expand=2, conv_kernel=4,
                               num_hidden_layers=1, vocab_size=100)
    hf_mamba = tf.models.mamba.modeling_mamba.MambaMixer(mamba_cfg, layer_idx=0).eval()
    ours_mamba = _mixer_only("mamba.seq", "mamba", d=768)
    m2_cfg = tf.Mamba2Config(hidden_size=768, state_size=128, expand=2, head_dim=64, n_groups=1,
                             num_heads=24, conv_kernel=4, num_hidden_layers=1, vocab_size=100)
    hf_mamba2 = tf.models.mamba2.modeling_mamba2.Mamba2Mixer(m2_cfg, layer_idx=0).eval()
    ours_mamba2 = _mixer_only("mamba2.seq", "mamba2", d=768)
    rg_cfg = tf.RecurrentGemmaConfig(hidden_size=1024, lru_width=1024, num_attention_heads=8,
                                     num_hidden_layers=1, vocab_size=100,
                                     block_types=["recurrent"])
    hf_rg = tf.models.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRecurrentBlock(
        rg_cfg, layer_idx=0).eval()
    ours_rg = _mixer_only("griffin.seq", "rglru", d=1024, **{"rglru.heads": 8})

    def ours(block, x):
        return lambda: block(x, {}, None, 0)

    def leaves(x, *modules):
        return [x] + [p for m in modules for p in m.parameters()]

    cases = []
    for T in lengths:
        x, xr = torch.randn(1, T, 768).requires_grad_(), torch.randn(1, T, 1024).requires_grad_()
        pos = torch.arange(T)[None]
        cases += [
            ("Mamba mixer vs MambaMixer (CPU path)", T, ours(ours_mamba, x),
             lambda x=x: hf_mamba(x), leaves(x, ours_mamba, hf_mamba), ours_mamba,
             mamba_cfg.intermediate_size * mamba_cfg.state_size),
            ("Mamba-2 mixer vs Mamba2Mixer (torch path)", T, ours(ours_mamba2, x),
             lambda x=x: hf_mamba2(x), leaves(x, ours_mamba2, hf_mamba2), ours_mamba2,
             m2_cfg.num_heads),
            ("Griffin RG-LRU mixer vs RecurrentGemma recurrent block", T, ours(ours_rg, xr),
             lambda xr=xr, pos=pos: hf_rg(xr, pos, None, use_cache=False),
             leaves(xr, ours_rg, hf_rg), ours_rg, rg_cfg.lru_width),
        ]
    return cases


def projection_time(fn, module, repeats: int = 2) -> float:
    """Time (ms, best of :data:`ROUNDS`) of the dense projections alone that ``fn`` (a forward
    of ``module``) runs: every ``nn.Linear`` call recorded by a hook, then replayed on fresh
    inputs of the recorded shapes. Both layers of a comparison run these same matrix products,
    so ``peer / projections`` bounds the speed-up any recurrence could buy (Amdahl)."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, _: calls.append((m, args[0].shape)))
             for m in module.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    replay = [(m, torch.randn(shape)) for m, shape in calls]

    def run():
        for m, x in replay:
            torch.nn.functional.linear(x, m.weight, m.bias)
    with torch.no_grad():
        return min(bench(run, repeats) for _ in range(ROUNDS))


def exp_rate(repeats: int = 3) -> float:
    """The best rate (exponentials per second) of ``torch.exp`` in fp32 on this machine, into
    a preallocated buffer, over sizes from 16k entries (in cache) to 4M: a floor on the cost
    of the exponentials a recurrence's decays or a softmax must evaluate, however fused."""
    best = 0.0
    for log2n in range(14, 23, 2):
        x = torch.randn(2 ** log2n)
        y = torch.empty_like(x)
        reps = max(1, 2 ** 22 // x.numel())

        def run(x=x, y=y, reps=reps):
            for _ in range(reps):
                torch.exp(x, out=y)
        best = max(best, reps * x.numel() / (bench(run, repeats) / 1e3))
    return best


def attention_floor(T: int, repeats: int = 3) -> tuple[float, float]:
    """``(FLOPs, best matmul rate)`` of causal attention for the MQA core case at length T: the
    ``q kᵀ`` and ``p v`` products over the causal half only (``2·2·H·K·T²/2``), and the best
    FLOP rate of ``torch.bmm`` / ``torch.mm`` on this machine over the block shapes a blocked
    attention uses (64 to 512 rows). ``FLOPs / rate`` is a floor on any exact attention
    forward built from these products, whatever its blocking."""
    x = cores.inputs(T)
    H, K = x["q"].shape[2], x["q"].shape[3]
    flops = 2 * H * K * T * T
    rate = max(bmm_rate(max(1, H * T // rows), rows, K, repeats) for rows in (64, 128, 256, 512))
    a, b = torch.randn(H * T, K), torch.randn(K, T)
    rate = max(rate, 2 * H * T * T * K / (bench(lambda: a @ b, repeats) / 1e3))
    return flops, rate


#: glibc malloc settings that keep multi-MB buffers mapped between calls: without them, page
#: faults from fresh allocations make the same measurement vary up to 2x from run to run
STABLE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def measure(lengths, repeats) -> dict:
    """Every timing of one process: ``{table: {(name, T): ms or (ms, ms)}}``, and the roofline."""
    # Order matters on a CPU: the sequential references and the peers' step loops create
    # thousands of small tensors, after which large-buffer calls run up to 2x slower for a
    # while (allocator state). So every fast path is timed first, the references and the
    # peers' step loops last.
    torch.manual_seed(0)
    out = {"fwd": core_times(lengths, repeats)}
    layers = layer_cases(lengths)
    with torch.no_grad():
        out["ours"] = {(name, T): min(bench(fn, 2) for _ in range(ROUNDS))
                       for name, T, fn, *_ in layers}
    out["roofline"] = {("linear", 2048): roofline(repeats=repeats)}
    out["projections"] = {(name, T): projection_time(fn, module)
                          for name, T, fn, _, _, module, _ in layers}
    out["attention_floor"] = {("attention", T): attention_floor(T) for T in lengths
                              if T <= 2048}
    out["exp_rate"] = {("exp", 0): exp_rate(repeats)}
    out["decays"] = {(name, T): decays for name, T, *_, decays in layers}
    with_ref = [T for T in lengths if T <= 2048]
    out["fwd_ref"] = core_times(with_ref, repeats, references=True)
    with torch.no_grad():
        out["peers"] = {(name, T): min(bench(fn, 1) for _ in range(ROUNDS))
                        for name, T, _, fn, *_ in layers}
    out["bwd"] = core_times(lengths[:2], 2, backward=True)
    out["bwd_ref"] = core_times([T for T in lengths[:2] if T <= 2048], 2, backward=True,
                                references=True)
    # training steps last (after them, the peers' forward ran up to 8x slower in one process),
    # at the shortest length only: MambaMixer's step loop under autograd takes about 20 s per
    # forward + backward at T = 512
    train = [case for case in layers if case[1] == lengths[0]]
    out["ours_bwd"] = {(name, T): min(bench(fwd_bwd(fn, x), 1) for _ in range(ROUNDS))
                       for name, T, fn, _, x, *_ in train}
    out["peers_bwd"] = {(name, T): bench(fwd_bwd(fn, x), 2, warmup=0)
                        for name, T, _, fn, x, *_ in train}
    return out


def _best(a, b, pick=min):
    """The better of two measurements of one case, per entry of a tuple, ignoring a missing
    (nan) one: ``pick=min`` for times, ``pick=max`` for rates (the roofline)."""
    if isinstance(a, (tuple, list)):
        return tuple(_best(x, y, pick) for x, y in zip(a, b))
    return b if a != a else a if b != b else pick(a, b)


def measure_processes(lengths, repeats, processes: int, quick: bool) -> dict:
    """:func:`measure` in ``processes`` fresh interpreters, keeping each case's best: on this
    kind of shared virtual machine a whole process can run 1.3x slower than the next one for
    the same code (the Mamba layer: 156 or 210 ms at T = 2048, run after run), which rounds
    inside one process cannot see."""
    import json
    import subprocess
    import tempfile
    merged: dict = {}
    for _ in range(processes):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "--child", f.name,
                            *(["--quick"] if quick else [])], check=True, env=os.environ)
            data = json.loads(Path(f.name).read_text())
        for table, rows in data.items():
            # rates: higher is better (the roofline: measured rate and bmm's; the attention
            # floor: a FLOP count and the best matmul rate; the exp rate; the decay counts are
            # constants)
            pick = max if table in ("roofline", "attention_floor", "exp_rate") else min
            mine = merged.setdefault(table, {})
            for name, T, value in rows:
                key, value = (name, int(T)), tuple(value) if isinstance(value, list) else value
                mine[key] = _best(mine[key], value, pick) if key in mine else value
    return merged


def main():
    if any(os.environ.get(k) != v for k, v in STABLE_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STABLE_MALLOC})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="T = 512 only, fewer repeats; prints, leaves RESULTS.md alone")
    parser.add_argument("--processes", type=int, default=1,
                        help="measure in this many fresh processes, keeping each case's best")
    parser.add_argument("--child", help=argparse.SUPPRESS)   # (a worker: JSON to this path)
    args = parser.parse_args()
    lengths = [512] if args.quick else [512, 2048, 8192]
    repeats = 2 if args.quick else 3
    if args.child:
        import json
        data = {table: [(name, T, v) for (name, T), v in rows.items()]
                for table, rows in measure(lengths, repeats).items()}
        Path(args.child).write_text(json.dumps(data))
        return
    if args.processes > 1:
        m = measure_processes(lengths, repeats, args.processes, args.quick)
    else:
        m = measure(lengths, repeats)
    peaks = peak_table([2048] if args.quick else [2048, 8192])
    best_of = f", best of {args.processes} processes" if args.processes > 1 else ""
    lines = [f"# CPU benchmark ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}{best_of})", ""]

    def ms(v):
        return "–" if v != v else f"{v:.1f}"  # nan: not measured

    def ratio(a, b):
        return "–" if a != a or b != b else f"{a / b:.1f}x"

    for title, fast_peer, refs in (("forward", m["fwd"], m["fwd_ref"]),
                                   ("forward + backward", m["bwd"], m["bwd_ref"])):
        lines += [f"## Cores, {title} (B=1, H=4, K=V=64), ms", "",
                  "| core | T | fast | reference | fla naive chunk | vs reference | vs fla |",
                  "|---|---|---|---|---|---|---|"]
        for (name, T), (fast, peer) in fast_peer.items():
            ref = refs.get((name, T), float("nan"))
            lines.append(f"| {name} | {T} | {ms(fast)} | {ms(ref)} | {ms(peer)} | "
                         f"{ratio(ref, fast)} | {ratio(peer, fast)} |")
        lines.append("")
    achieved, rate = m["roofline"]["linear", 2048]
    lines += [f"Roofline, `linear` with scalar decay at T=2048: {achieved / 1e9:.1f} GFLOP/s of "
              f"{rate / 1e9:.1f} GFLOP/s (torch.bmm on the same shapes) = {achieved / rate:.0%}.",
              "",
              "## Peak memory of each chunked forward beyond its inputs (B=1, H=4, K=V=64)", "",
              *peaks, ""]
    exps_per_s = m["exp_rate"]["exp", 0]
    for (_, T), (flops, rate) in m["attention_floor"].items():
        floor = flops / rate * 1e3
        # every causal score is exponentiated once: H·T(T+1)/2 of them
        exps = cores.H * T * (T + 1) / 2 / exps_per_s * 1e3
        ref = m["fwd_ref"].get(("attention, MQA", T), float("nan"))
        lines.append(f"Floor, `attention` MQA at T={T}: {flops / 1e9:.2f} GFLOP of causal "
                     f"products at the best matmul rate measured ({rate / 1e9:.0f} GFLOP/s) take "
                     f"{floor:.1f} ms, and the softmax's {cores.H * T * (T + 1) // 2 / 1e6:.1f}M "
                     f"exponentials at the best exp rate measured ({exps_per_s / 1e9:.1f}G/s) "
                     f"{exps:.2f} ms more, so no exact forward of these products is more than "
                     f"{ratio(ref, floor)} faster than the sequential reference, nor more than "
                     f"{ratio(ref, floor + exps)} with its exponentials.")
    lines.append("")
    for title, ours, peers in (("forward", m["ours"], m["peers"]),
                               ("forward + backward", m["ours_bwd"], m["peers_bwd"])):
        forward = title == "forward"
        lines += [f"## Layers, {title} (B=1), ms", ""]
        if forward:
            lines += ["*projections*: the layer's dense `nn.Linear` products alone (the peer runs "
                      "the same ones); *ceiling*: peer / projections, the largest speed-up "
                      "that any recurrence, however fast, could give; *with decays*: peer / "
                      "(projections + the recurrence's decay exponentials, one per token and "
                      f"decayed state entry, at the best exp rate measured: "
                      f"{exps_per_s / 1e9:.1f}G/s), the largest any exact recurrence could "
                      "give.", ""]
        lines += ["| layer vs peer | T | seqdsl | peer | speed-up |"
                  + (" projections | ceiling | with decays |" if forward else ""),
                  "|---|---|---|---|---|" + ("---|---|---|" if forward else "")]
        for (name, T), fast in ours.items():
            peer = peers[name, T]
            row = f"| {name} | {T} | {fast:.1f} | {peer:.1f} | {peer / fast:.1f}x |"
            if forward:
                proj = m["projections"][name, T]
                exps = T * m["decays"][name, T] / exps_per_s * 1e3
                row += f" {proj:.1f} | {peer / proj:.1f}x | {peer / (proj + exps):.1f}x |"
            lines.append(row)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.quick:   # a quick look does not replace the full table
        (Path(__file__).parent / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
