"""The triton code generator: a lowered Program → the torch module plus ``kernels.py``.

Data flow:

1. :func:`fuse_prologues` (a backend lowering on the IR) moves single-use elementwise producers of
   core operands into the core node's ``prologue`` attribute (``k = l2norm(silu(x))``,
   ``beta = sigmoid(x)``, ``log_decay = logsigmoid(x)``, Mamba's ``v = dt * x`` and
   ``dt = softplus(x)``), so that the kernels compute them in registers instead of reading
   materialised tensors. The IR decides what is fused; the templates only render the chains.
2. :func:`kernel_spec` derives one :class:`KernelSpec` per core node (core, heads, head dims,
   decay kind, scale, steps, window, softcap, prologue, block sizes); equal specs across layers
   share one set of kernels.
3. The torch generator writes the model as usual, passing ``kernel=K.<site>`` to each core call;
   the templates in ``templates/`` render each site's kernels, autograd functions and entry points
   into ``kernels.py``. Both files are ``ast.parse``d before they are returned.
"""

from __future__ import annotations

import ast
import math
from dataclasses import replace
from pathlib import Path

import jinja2

from seqdsl import __version__
from seqdsl.backends.torch.codegen import (Namespace, _literal, _spec_ref, generate_source,
                                          regenerate_command, source_text)
from seqdsl.ir.graph import BlockInstance, Graph, Program
from seqdsl.ir.ops import Op
from seqdsl.ir.types import TensorType

from .kernel_spec import KernelSpec

TEMPLATES = Path(__file__).parent / "templates"

#: elementwise unary ops a kernel can compute on a loaded tile (and differentiate)
FUSIBLE = {Op.SIGMOID: "sigmoid", Op.LOGSIGMOID: "logsigmoid", Op.SOFTPLUS: "softplus",
           Op.SILU: "silu", Op.EXP: "exp", Op.NEG: "neg"}
#: operand positions of each core's node inputs that take a prologue
OPERANDS = {Op.SCAN: {"a": 0, "b": 1},
            Op.LINEAR: {"q": 0, "k": 1, "v": 2, "g": 4},
            Op.DELTA: {"q": 0, "k": 1, "v": 2, "beta": 3, "g": 5}}
#: operands whose whole row (head dim) a program holds, so row ops (l2norm) can fuse
ROW_OPERANDS = ("q", "k")
#: state tile budgets (fp32 entries) of one recurrent program, forward and backward (which holds
#: about three times as many tiles): sized so that no kernel spills registers on sm90
TILE, TILE_BWD = 2048, 1024
#: steps between the recurrent forward's state checkpoints (the backward restarts from them)
CHECKPOINT = 32
#: the chunked selective scan: steps per block, and the [steps, K, V-tile] tile budget
SCAN_STEPS, SCAN_TILE = 16, 2048
#: scans (elementwise and selective) switch from the step kernels to the block-scan kernels at
#: this sequence length: below it there is too little time to parallelise over
CHUNK_MIN_T = 64


# ---- 1. fusion -------------------------------------------------------------------------------

def _operand_positions(node) -> dict[str, int]:
    positions = dict(OPERANDS[node.op])
    if node.attr("factored"):  # the log decay slot holds dt; A rides as an extra input
        positions["dt"] = positions.pop("g")
    if node.op is Op.DELTA and (node.attr("steps") or 1) > 1:
        positions.pop("g")  # the interleaving pads the gate with zeros: fuse nothing into it
    return positions


def _peel(g: Graph, core, name: str, pos: int, positions: dict[str, int]):
    """One fusible producer of ``core``'s input ``pos``, read by the core alone: (op, raw input)."""
    src = g.node(core.inputs[pos])
    if g.users(src.id) != [core.id] or g.output == src.id or not isinstance(src.type, TensorType):
        return None
    ins = [g.node(i) for i in src.inputs]
    if src.op in FUSIBLE and isinstance(ins[0].type, TensorType) and \
            ins[0].type.sizes == src.type.sizes:
        return (FUSIBLE[src.op],), src.inputs[0]
    if src.op is Op.L2NORM and name in ROW_OPERANDS and ins[1].op is Op.CONST and \
            isinstance(ins[0].type, TensorType):
        return ("l2norm", float(ins[1].attr("value"))), src.inputs[0]
    if src.op is Op.MUL and name == "v" and "dt" in positions:
        dt = core.inputs[positions["dt"]]
        for a, b in (src.inputs, tuple(reversed(src.inputs))):
            tb = g.node(b).type
            if a == dt and isinstance(tb, TensorType) and tb.sizes == src.type.sizes:
                return ("mul_dt",), b
    return None


def fuse_prologues(g: Graph) -> Graph:
    """Move single-use elementwise producers of core operands into the cores' ``prologue``."""
    g = g.copy()
    for node in list(g.nodes()):
        if node.op not in OPERANDS or node.attr("decay_kind") == "complex_key" or \
                node.attr("complex"):
            continue
        positions = _operand_positions(node)
        prologue = {}
        for name in sorted(positions, key=lambda n: n != "v"):  # v first: it may read dt
            chain = []
            while True:
                core = g.node(node.id)
                peeled = _peel(g, core, name, positions[name], positions)
                if peeled is None:
                    break
                op, raw = peeled
                old = core.inputs[positions[name]]
                inputs = list(core.inputs)
                inputs[positions[name]] = raw
                g.set(core.replace(inputs=tuple(inputs)))
                if not g.users(old):
                    g.remove(old)
                chain.insert(0, op)
            if chain:
                prologue[name] = tuple(chain)
        if prologue:
            g.set(g.node(node.id).with_attrs(prologue=tuple(sorted(prologue.items()))))
    return g.prune()


def lower_for_kernels(program: Program) -> Program:
    blocks = {name: BlockInstance(i.name, i.block, i.args, i.span, fuse_prologues(i.graph), i.states)
              for name, i in program.blocks.items()}
    return program.replace(blocks=blocks)


# ---- 2. kernel specs -------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _warps(entries: int) -> int:
    return 4 if entries >= 1024 else 2 if entries >= 512 else 1


def kernel_spec(node, site: str, spec_ref: str) -> KernelSpec | None:
    """The kernel specialisation of one core node; None where no kernel family covers it."""
    prologue = node.attr("prologue") or ()
    if node.op is Op.SCAN:
        if node.attr("complex"):
            return None  # complex scans run on the torch path (no kernel family yet)
        D = math.prod(d.size for d in node.attr("state_shape"))
        BD = min(_pow2(D), 64)  # [BT, BD] blocks: a, b, h and the scan's two outputs in registers
        return KernelSpec("scan", H=1, K=D, V=D, prologue=prologue, site=site, spec_ref=spec_ref,
                          extras={"BD": BD, "BT": 32, "warps": 4 if BD >= 64 else 2,
                                  "chunk_min_t": CHUNK_MIN_T})
    if node.op in (Op.LINEAR, Op.DELTA):
        kind = node.attr("decay_kind")
        K = node.attr("key_dim")
        HQ = node.attr("key_heads") if node.op is Op.LINEAR else 0  # delta gets heads repeated
        if kind == "complex_key":  # lowered to a real per-key decay on 2K dims
            kind, K = "key", 2 * K
        if node.attr("factored"):
            kind = "factored"
        return core_spec(node.op.value, H=node.attr("heads"), K=K, V=node.attr("value_dim"),
                         HQ=HQ, decay=kind, scale=float(node.attr("scale")),
                         steps=node.attr("steps") or 1, prologue=prologue, site=site,
                         spec_ref=spec_ref)
    if node.op is Op.ATTENTION:
        return KernelSpec("attention", H=node.attr("heads"), K=node.attr("key_dim"),
                          V=node.attr("value_dim"), HKV=node.attr("kv_heads"),
                          scale=float(node.attr("scale")), window=node.attr("window"),
                          softcap=node.attr("softcap"), site=site, spec_ref=spec_ref)
    return None


def core_spec(core: str, H: int, K: int, V: int, HQ: int = 0, decay: str = "none",
              scale: float = 1.0, steps: int = 1, prologue: tuple = (), site: str = "",
              spec_ref: str = "") -> KernelSpec:
    """The specialisation of a ``linear`` or ``delta`` core with the generator's tile choices:
    what :func:`kernel_spec` derives from an IR node, from plain parameters (benchmarks, tools).
    ``HQ``: q/k heads of ``linear`` (divides ``H``; 0: ``H``); ``delta`` takes ``H`` for both."""
    if core not in ("linear", "delta"):
        raise ValueError(f"core_spec covers the linear and delta cores, not {core!r}")
    BK = _pow2(K)
    BV = min(_pow2(V), max(16, TILE // BK))
    BVB = min(_pow2(V), max(8, TILE_BWD // BK))
    # the chunked selective scan holds [SBT, BK, SBV] tiles (several in the backward)
    SBV = min(_pow2(V), max(4, SCAN_TILE // (SCAN_STEPS * BK)))
    return KernelSpec(core, H=H, K=K, V=V, HQ=(HQ or H) if core == "linear" else H, decay=decay,
                      scale=scale, steps=steps, prologue=prologue, site=site, spec_ref=spec_ref,
                      extras={"BK": BK, "BV": BV, "BVB": BVB, "C": CHECKPOINT,
                              "warps": _warps(BK * BV), "warps_bwd": _warps(BK * BVB),
                              "SBT": SCAN_STEPS, "SBV": SBV, "swarps": 4,
                              "chunk_min_t": CHUNK_MIN_T})


def core_inputs(core: str, decay: str, B: int, T: int, H: int, K: int, V: int,
                device: str = "cpu", seed: int = 0) -> dict:
    """Random fp32 inputs of one ``linear`` / ``delta`` core call, as the GPU benchmark and
    tools draw them: ``q, k [B, T, H, K]``, ``v [B, T, H, V]`` standard normal (``delta``: k
    L2-normalised, ``beta [B, T, H]`` a sigmoid of one); ``g`` the mild log decays trained
    models have, ``logsigmoid(N(0, 1) + 3)``: ``[B, T, H]`` (``decay="scalar"``),
    ``[B, T, H, K]`` (``"key"``), absent (``"none"``). Deterministic in ``seed``."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    x = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V)}
    if core == "delta":
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    if decay in ("scalar", "key"):
        x["g"] = F.logsigmoid(rnd(B, T, H, *((K,) if decay == "key" else ())) + 3)
    return x


def core_call(fn, core: str, x: dict, **kwargs):
    """``fn(q, k, v, [beta,] g, **kwargs)`` on inputs named as :func:`core_inputs` names them
    (``g`` None when absent): a kernel site's ``triton`` entry and ``seqdsl.ops.linear`` /
    ``seqdsl.ops.delta`` alike."""
    beta = (x["beta"],) if core == "delta" else ()
    return fn(x["q"], x["k"], x["v"], *beta, x.get("g"), **kwargs)


class KernelSites:
    """Names each core call's kernel site; equal specialisations share one site."""

    def __init__(self, program: Program):
        self.program = program
        self.sites: dict[KernelSpec, str] = {}     # spec without its location -> site name
        self.specs: dict[str, KernelSpec] = {}     # site name -> spec (first location)
        self._names = Namespace({"REGISTRY", "ts", "tl", "triton", "torch", "math"})

    def __call__(self, graph: Graph, node) -> str | None:
        where = ".".join(node.scope + ((node.name,) if node.name else (node.op.value,)))
        spec = kernel_spec(node, where, _spec_ref(node.span, self.program.spec.path))
        if spec is None:
            return None
        key = replace(spec, site="", spec_ref="")
        if key not in self.sites:
            name = self._names.name("_".join(node.scope[-1:] + ((node.name or node.op.value),)))
            self.sites[key] = name
            self.specs[name] = spec
        return self.sites[key]


# ---- 3. rendering ----------------------------------------------------------------------------

def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["literal"] = _literal
    return env


def _plain_env() -> jinja2.Environment:
    """For the chunk templates, which control their whitespace with ``{%-`` themselves."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _render(spec_path: str, specs: dict[str, KernelSpec], regenerate: str | None = None) -> str:
    spec_path = source_text(spec_path)
    plain = _plain_env()
    chunk = {p: plain.get_template(f"{s.core}_chunk.py.j2").render(p=p, s=s, reg="REGISTRY").strip()
             for p, s in specs.items() if s.chunked}
    source = _env().get_template("kernels.py.j2").render(
        version=__version__, spec_path=spec_path, sites=list(specs.items()), reg="REGISTRY",
        regenerate=regenerate or f"seqdsl compile {spec_path} --backend triton",
        chunk_fragments=chunk)
    ast.parse(source)
    return source


def render_kernels(program: Program, sites: KernelSites) -> str:
    return _render(Path(program.spec.path).name, sites.specs,
                   regenerate_command(program.spec, "--backend triton"))


def site_source(spec: KernelSpec, name: str = "site") -> str:
    """One site's kernels as a module of their own: what ``kernels.py`` holds for ``spec``, with
    the site object under ``name`` (its ``.triton`` entry takes the core's ops signature)."""
    if not name.isidentifier():
        raise ValueError(f"site name must be an identifier, got {name!r}")
    return _render(spec.spec_ref or "<site>", {name: spec})


def import_source(source: str, module_name: str, folder: Path):
    """Execute generated source as the module ``module_name`` (registered in ``sys.modules``),
    from a file written to ``folder`` first: ``triton.jit`` reads a kernel's source from its file."""
    import importlib.util
    import sys

    path = Path(folder) / f"{module_name}.py"
    path.write_text(source)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    return module


_SITE_DIR: Path | None = None


def load_site(spec: KernelSpec, name: str = "site"):
    """Import :func:`site_source` (:func:`import_source`, into a private temporary folder; once
    per distinct source) and return the site object."""
    import hashlib
    import sys
    import tempfile

    global _SITE_DIR
    if _SITE_DIR is None:
        _SITE_DIR = Path(tempfile.mkdtemp(prefix="seqdsl-sites-"))
    source = site_source(spec, name)
    module_name = f"seqdsl_site_{name}_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
    module = sys.modules.get(module_name) or import_source(source, module_name, _SITE_DIR)
    return getattr(module, name)


def generate(program: Program) -> dict[str, str]:
    """model.py (the torch module, calling the kernels) and kernels.py."""
    program = lower_for_kernels(program)
    sites = KernelSites(program)
    model = generate_source(program, kernel_sites=sites)
    return {"model.py": model, "kernels.py": render_kernels(program, sites)}


__all__ = ["fuse_prologues", "kernel_spec", "core_spec", "KernelSites", "generate",
           "render_kernels", "site_source", "import_source", "load_site"]
