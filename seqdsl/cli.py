"""The ``seqdsl`` command line.

    seqdsl check FILE...             diagnostics, or "ok" per file (FILE: a path, or a bundled
                                     spec's name such as `mamba`)
    seqdsl ir FILE [--after PASS]    the IR in its stable text form
    seqdsl info FILE                 parameters, decoding memory and FLOPs per token, per layer
    seqdsl compile FILE -o DIR       an importable package (--backend triton: with kernels.py)
    seqdsl kernels FILE...           build the generated Triton kernels for sm90 (no GPU needed)
    seqdsl import hf CONFIG.json     a transformers config as a .seq spec (--weights DIR: and
                                     its checkpoint as a state dict)

User mistakes print ``path:line:col: error: ...`` with the source line and a caret, and exit
with status 1; a Python traceback appears only with ``SEQDSL_DEBUG=1``. Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Sequence

from seqdsl import __version__
from seqdsl.diagnostics import SpecError

EPILOG = "Set SEQDSL_DEBUG=1 to see Python tracebacks for spec errors."


def _debug() -> bool:
    return os.environ.get("SEQDSL_DEBUG", "") not in ("", "0")


def _overrides(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        if "=" not in item:
            raise SystemExit(f"seqdsl: error: --set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _load(path: str, args, until: str | None = None):
    import seqdsl
    return seqdsl.load(path, until=until, **_overrides(args.set))


def _report(err: SpecError) -> None:
    print(err.render(), file=sys.stderr)
    n = len(err.diagnostics)
    print(f"{n} error{'s' if n != 1 else ''}", file=sys.stderr)
    if _debug():
        traceback.print_exc()


def cmd_check(args) -> int:
    from seqdsl.analysis import human, model_info

    failed = 0
    total = 0.0
    for path in args.files:
        start = time.perf_counter()
        try:
            program = _load(path, args)
        except SpecError as err:
            total += time.perf_counter() - start
            _report(err)
            failed += 1
            continue
        total += time.perf_counter() - start
        if program.spec.model is None:
            print(f"{path}: ok (library: {_count(len(program.spec.definitions), 'definition')})")
        else:
            info = model_info(program)
            print(f"{path}: ok ({_count(len(program.layers), 'layer')}, "
                  f"{human(info.total_params)} parameters)")
    if args.time:
        print(f"compiler time: {total * 1000:.1f} ms for {len(args.files)} file(s)")
    return 1 if failed else 0


def cmd_ir(args) -> int:
    from seqdsl.ir.printer import format_program

    try:
        program = _load(args.file, args, until=args.after)
    except SpecError as err:
        _report(err)
        return 1
    sys.stdout.write(format_program(program))
    return 0


def cmd_info(args) -> int:
    from seqdsl.analysis import human, human_bytes, model_info

    try:
        program = _load(args.file, args)
    except SpecError as err:
        _report(err)
        return 1
    if program.spec.model is None:
        print(f"{args.file}: a library file (no model); nothing to report")
        return 0
    info = model_info(program, context=args.context, activation_dtype=args.dtype)
    rows = [("layer", "block", "params", "state/seq", "kv/token", "FLOPs/token")]
    for l in info.layers:
        rows.append((str(l.index), l.block, f"{l.params:,}", human_bytes(l.state_bytes),
                     human_bytes(l.kv_bytes_per_token), human(l.flops)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"model {program.spec.model.name} ({args.file})")
    for i, r in enumerate(rows):
        print("  " + "  ".join(c.rjust(w) if j >= 2 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print()
    print(f"  embedding          {info.embedding_params:,}")
    print(f"  head               {info.head_params:,}" + ("  (tied to the embedding)" if info.head_params == 0 else ""))
    print(f"  final norm         {info.final_norm_params:,}")
    if info.shared_params:
        print(f"  shared values      {info.shared_params:,}")
    print(f"  total parameters   {info.total_params:,} ({human(info.total_params)})")
    print(f"  decoding state     {human_bytes(info.state_bytes)} per sequence "
          f"(recurrent states in their state dtype, conv tails and KV windows in {args.dtype})")
    if info.kv_bytes_per_token:
        print(f"  growing KV cache   {human_bytes(info.kv_bytes_per_token)} per token of context")
    print(f"  forward FLOPs      {human(info.flops_per_token)} per token at context {args.context}")
    if args.states:
        print()
        for name, inst in program.blocks.items():
            for s in inst.states:
                shape = "[" + ", ".join(str(d) for d in s.shape) + "]"
                print(f"  {name}: {s.kind:9s} {s.name} {shape} {s.dtype} — {s.detail}")
    return 0


def cmd_compile(args) -> int:
    from seqdsl.compiler import compile_to_dir

    try:
        target = compile_to_dir(args.file, args.output, backend=args.backend, **_overrides(args.set))
    except SpecError as err:
        _report(err)
        return 1
    print(f"wrote {target}/ (import it with: from {target.name} import Model, Config)")
    return 0


def cmd_kernels(args) -> int:
    from seqdsl.backends.triton import aot
    from seqdsl.compiler import compile as compile_spec

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("seqdsl kernels: unset TRITON_INTERPRET: interpreted kernels cannot be compiled "
              "for a GPU target", file=sys.stderr)
        return 2
    lines: list[str] = []
    failed = 0
    for path in args.files:
        try:
            package = compile_spec(path, backend="triton", **_overrides(args.set))
        except SpecError as err:
            _report(err)
            return 1
        kernels = sys.modules[package.__name__ + ".kernels"]
        source_lines = len(open(kernels.__file__).read().splitlines())
        rows = aot.build_registry(kernels.REGISTRY, args.target)
        bad = [r for r in rows if not r.ok]
        failed += len(bad)
        lines.append(f"## {os.path.basename(path)}: {len(rows)} kernels for {args.target}, "
                     f"{source_lines} lines of generated Triton code"
                     f"{f', {len(bad)} FAILED' if bad else ''}")
        lines.append("")
        lines.extend(aot.table(rows))
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    if failed:
        print(f"seqdsl kernels: {failed} kernel(s) failed to build, spill registers, or lack "
              f"tensor-core instructions where they use tl.dot", file=sys.stderr)
    return 1 if failed else 0


def cmd_golden(args) -> int:
    from seqdsl import golden

    failed = 0
    for path in args.files:
        try:
            if args.update:
                target = golden.record(path, _overrides(args.set), folder=args.dir)
                print(f"{path}: recorded {target}")
                continue
            if args.set:
                print("seqdsl golden: --set is only used with --update (the golden file stores "
                      "its overrides)", file=sys.stderr)
                return 2
            result = golden.check(path, folder=args.dir)
        except SpecError as err:
            _report(err)
            failed += 1
            continue
        print(f"{path}: {'ok' if result.ok else 'MISMATCH'} ({result.message})")
        failed += not result.ok
    return 1 if failed else 0


def cmd_demo(args) -> int:
    """The main job of the quick start: compile a spec, import it, run it, summarise."""
    from seqdsl.analysis import human, human_bytes, model_info

    start = time.perf_counter()
    try:
        program = _load(args.file, args)
        import seqdsl
        module = seqdsl.compile(args.file, **_overrides(args.set))
    except SpecError as err:
        _report(err)
        return 1
    compiled = time.perf_counter() - start
    import torch

    info = model_info(program)
    model_name = program.spec.model.name
    print(f"seqdsl {__version__}: {args.file} -> model '{model_name}' "
          f"({len(program.spec.files)} spec files, compiled and imported in {compiled:.2f} s)")
    kinds: dict[str, int] = {}
    for layer in program.layers:
        kinds[layer.instance] = kinds.get(layer.instance, 0) + 1
    print("  layers      " + ", ".join(f"{n} x {k}" for k, n in kinds.items()))
    cores = sorted({n.op.value for _, g in program.graphs() for n in g.nodes()
                    if n.op.value in ("scan", "linear", "delta", "attention")})
    print(f"  cores       {', '.join(cores)}")
    print(f"  parameters  {info.total_params:,} ({human(info.total_params)})")
    print(f"  memory      {human_bytes(info.state_bytes)} of state per sequence while decoding"
          + (f", plus {human_bytes(info.kv_bytes_per_token)} per token of context"
             if info.kv_bytes_per_token else ""))
    print(f"  compute     {human(info.flops_per_token)} FLOPs per token (context {info.context})")

    torch.manual_seed(0)
    start = time.perf_counter()
    model = module.Model().eval()
    built = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == info.total_params
    prompt = torch.randint(0, program.config["vocab"], (1, args.prompt),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = time.perf_counter()
        logits, _ = model(prompt)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(prompt, args.new_tokens, temperature=0)
        generated = time.perf_counter() - start
    print(f"  model       built with random weights in {built:.2f} s (CPU, float32)")
    print(f"  forward     {args.prompt} tokens in {forward * 1000:.0f} ms; logits "
          f"{tuple(logits.shape)}, mean {logits.mean():.4f}, std {logits.std():.4f}")
    print(f"  generate    {args.new_tokens} tokens (greedy, step() per token) in "
          f"{generated * 1000:.0f} ms: {out[0, args.prompt:].tolist()}")
    return 0


def _write_atomically(path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary file in the same folder, then a rename."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_import_hf(args) -> int:
    """A transformers config (and checkpoint) → a .seq spec (and a converted state dict)."""
    import io
    from pathlib import Path

    import seqdsl
    from seqdsl.interop import convert_state_dict, import_config, read_checkpoint

    try:
        imported = import_config(args.config)
        text = imported.spec_text
        spec_name = f"{imported.name}.seq"
        program = seqdsl.load(spec_name, text=text)   # the spec must check before it is written
        if args.weights is None:
            if args.output is None:
                sys.stdout.write(text)
                return 0
            _write_atomically(args.output, text.encode())
            print(f"wrote {args.output} ({_count(len(program.layers), 'layer')}, from {args.config})")
            return 0
        import torch

        ours = convert_state_dict(imported, read_checkpoint(args.weights), source=args.weights)
        module = seqdsl.compile(spec_name, text=text)
        with torch.device("meta"):  # names and shapes only: no memory for the weights
            expected = {k: tuple(v.shape) for k, v in module.Model().state_dict().items()}
        got = {k: tuple(v.shape) for k, v in ours.items()}
        if got != expected:
            wrong = sorted(set(got) ^ set(expected)) or \
                sorted(k for k in got if got[k] != expected[k])
            raise seqdsl.SpecError(seqdsl.Diagnostic(
                seqdsl.Span(str(args.weights), 0, 0, 0, 0),
                f"the converted weights do not fit the spec: {', '.join(wrong[:6])}",
                "the checkpoint and the config disagree"))
    except SpecError as err:
        _report(err)
        return 1
    out = Path(args.output or ".")
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    _write_atomically(out / spec_name, text.encode())
    _write_atomically(out / "state_dict.pt", buffer.getvalue())
    print(f"wrote {out / spec_name} and {out / 'state_dict.pt'} ({len(ours)} tensors); load with "
          f"seqdsl.compile({str(out / spec_name)!r}).Model().load_state_dict(torch.load(...))")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = _natural(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _natural(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from seqdsl.passes import PASS_NAMES

    parser = argparse.ArgumentParser(
        prog="seqdsl", description="Compile sequence-model specs (.seq files).", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"seqdsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add_set(p):
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a hyper-parameter: d=512 (the model's) or mamba.expand=4 "
                            "(a definition's default); repeatable")

    p = sub.add_parser("check", help="check specs and report errors",
                       description="Parse, validate and lower each FILE; print 'ok' or the errors.",
                       epilog=EPILOG)
    p.add_argument("files", nargs="+", metavar="FILE")
    add_set(p)
    p.add_argument("--time", action="store_true", help="print the compiler time spent")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("ir", help="print the IR of a spec",
                       description="Print the IR in its stable text form, after the last pass or "
                                   "after --after PASS.", epilog=EPILOG)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--after", choices=PASS_NAMES, metavar="PASS",
                   help="stop after this pass: " + ", ".join(PASS_NAMES))
    add_set(p)
    p.set_defaults(func=cmd_ir)

    p = sub.add_parser("info", help="parameters, decoding memory and FLOPs per layer",
                       description="Report parameter counts per layer and in total, the memory a "
                                   "sequence carries while decoding, and forward FLOPs per token, "
                                   "all computed from the IR.", epilog=EPILOG)
    p.add_argument("file", metavar="FILE")
    add_set(p)
    p.add_argument("--context", type=_positive, default=2048, metavar="T",
                   help="context length for attention FLOPs (default 2048)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="activation dtype for conv tails and KV caches (default bfloat16)")
    p.add_argument("--states", action="store_true", help="list every state of every block")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compile", help="generate an importable Python package from a spec",
                       description="Write OUTPUT/<model name>/ with the generated model code, "
                                   "atomically (nothing half-written on error).", epilog=EPILOG)
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", default=".", metavar="DIR",
                   help="folder to write the package into (default: the current folder)")
    p.add_argument("--backend", default="torch", choices=["torch", "triton"],
                   help="code generator: torch modules, or torch modules calling generated Triton kernels")
    add_set(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("kernels", help="build every generated Triton kernel for a GPU target "
                                       "(no GPU needed) and report registers, spills, shared "
                                       "memory and tensor-core use",
                       description="Compile each FILE's generated kernels with triton.compile for "
                                   "the target and read the cubin back with cuobjdump. Exits 1 "
                                   "if a kernel does not build, spills registers, or uses tl.dot "
                                   "without tensor-core instructions.", epilog=EPILOG)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--target", default="sm90", choices=["sm90", "sm89", "sm80"],
                   help="GPU architecture (default: sm90, Hopper)")
    p.add_argument("--report", metavar="FILE", help="also write the tables (markdown) to FILE")
    add_set(p)
    p.set_defaults(func=cmd_kernels)
    p = sub.add_parser("import", help="import a model from another library (hf: transformers)",
                       description="Turn another library's config into a .seq spec, and its "
                                   "checkpoint into a state dict the compiled model loads.",
                       epilog=EPILOG)
    imp = p.add_subparsers(dest="source", metavar="SOURCE")
    imp.required = True
    q = imp.add_parser("hf", help="a transformers config.json (and checkpoint folder)",
                       description="Write the spec for a transformers CONFIG (config.json, or the "
                                   "folder holding it): to stdout, or to -o FILE. With --weights "
                                   "DIR, -o names a folder that receives <model>.seq and "
                                   "state_dict.pt (torch.save of the converted weights).",
                       epilog=EPILOG)
    q.add_argument("config", metavar="CONFIG")
    q.add_argument("-o", "--output", metavar="OUT",
                   help="the spec file (default: stdout); with --weights, a folder (default: .)")
    q.add_argument("--weights", metavar="DIR",
                   help="a checkpoint folder (model.safetensors or pytorch_model.bin) to convert")
    q.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("golden", help="record or check a spec's golden outputs",
                       description="Check each FILE's model outputs (fixed seed and input, "
                                   "reference path) against <spec folder>/golden/<name>.json, or "
                                   "record them with --update. The golden file stores the "
                                   "overrides it was recorded with.", epilog=EPILOG)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--update", action="store_true", help="record instead of checking")
    p.add_argument("--dir", metavar="DIR", help="folder of the golden files (default: golden/ "
                                                 "next to the spec)")
    add_set(p)
    p.set_defaults(func=cmd_golden)

    p = sub.add_parser("demo", help="the quick start's main job: compile a spec, run a forward "
                                    "and a short generation, summarise",
                       epilog=EPILOG)
    p.add_argument("file", metavar="FILE", nargs="?", default="mamba",
                   help="a .seq file or the name of a bundled spec (default: mamba)")
    add_set(p)
    p.add_argument("--prompt", type=_positive, default=32, metavar="T",
                   help="prompt length (default 32)")
    p.add_argument("--new-tokens", type=_natural, default=16, metavar="N",
                   help="tokens to generate (default 16)")
    p.set_defaults(func=cmd_demo)
    return parser


def bundled(path: str) -> str:
    """A FILE argument: the path itself, or a bundled spec named like it (`mamba`, `mamba.seq`)
    when no such file exists, so the commands work from any folder."""
    if os.path.exists(path) or os.sep in path or "/" in path:
        return path
    import importlib.resources
    name = path if path.endswith(".seq") else f"{path}.seq"
    candidate = importlib.resources.files("seqdsl.specs") / name
    return str(candidate) if candidate.is_file() else path


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "file", None):
        args.file = bundled(args.file)
    if getattr(args, "files", None):
        args.files = [bundled(f) for f in args.files]
    try:
        return args.func(args)
    except SpecError as err:  # e.g. a malformed --set value
        _report(err)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except BrokenPipeError:  # e.g. `seqdsl info ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:   # an output path that cannot be written, an unreadable input
        if _debug():
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"seqdsl {args.command}: {where}{err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
