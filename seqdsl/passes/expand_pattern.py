"""Pass 2 — pattern expansion: the model's `layers = ...` becomes an explicit per-layer list.

Evaluates the pattern (lists, repetition, concatenation, comprehensions, ``pattern("MM*", ...)``,
``periodic(...)``) to a list of block references with bound hyper-parameters, checks each entry,
groups identical (block, arguments) pairs into block instances, and evaluates the other model
settings (tied embeddings, final norm, embedding scale, logit soft-cap).
"""

from __future__ import annotations

import dataclasses

from seqdsl.diagnostics import Collector, SpecError, did_you_mean, error, one_of
from seqdsl.frontend import ast
from seqdsl.frontend.consteval import ConstEvaluator
from seqdsl.ir.builtins import InitRule
from seqdsl.ir.graph import BlockInstance, Layer, ModelSettings, Program
from seqdsl.ir.values import BlockRef, is_number, type_name


def _block_defaults(d, spec) -> dict:
    """A block's hyper-parameter defaults, evaluated in the model's scope (those that can be)."""
    env = dict(spec.config)
    overrides = spec.def_overrides.get(d.name, {})
    out = {}
    for h in d.hyper:
        try:
            value = overrides[h.name] if h.name in overrides else \
                ConstEvaluator(env, what="a default").eval(h.default)
        except SpecError:
            continue  # reported when the block is built
        out[h.name] = env[h.name] = value
    return out


def _flatten(value, span) -> list:
    if isinstance(value, BlockRef):
        return [value]
    if isinstance(value, tuple):
        out = []
        for v in value:
            out.extend(_flatten(v, span))
        return out
    article = "an" if type_name(value)[0] in "aeiou" else "a"
    raise error(span, f"the layer pattern must be a list of blocks, found {article} {type_name(value)}",
                "e.g. layers = [rec, rec, attn] * 4")


def expand_pattern(program: Program) -> Program:
    spec = program.spec
    model = spec.model
    if model is None:
        return program.replace(stage="expand_pattern")
    defs = spec.definitions
    shared_blocks = {s.name: s.value.id for s in model.shared
                     if isinstance(s.value, ast.Name) and s.value.id in defs}

    def classify(name: str, node) -> str | None:
        if name in shared_blocks or (name in defs and defs[name].kind == "block"):
            return "block"
        if name in defs:
            raise error(node.span if not isinstance(node, ast.Call) else node.func_span,
                        f"'{name}' is a {defs[name].kind}; the layer pattern lists blocks",
                        f"wrap it: block {name}_block {{ x = x + {name}(rmsnorm(x)) }}")
        return None

    layers_expr = model.settings["layers"]
    evaluator = ConstEvaluator(spec.config, blocks=classify, what="the layer pattern",
                               block_names=tuple(n for n, d in defs.items() if d.kind == "block")
                               + tuple(shared_blocks))
    refs = _flatten(evaluator.eval(layers_expr), layers_expr.span)
    if not refs:
        raise error(layers_expr.span, "the layer pattern is empty")

    defaults = {name: _block_defaults(d, spec) for name, d in defs.items() if d.kind == "block"}
    collector = Collector()
    group_args: dict[str, tuple] = {}
    instances: dict[tuple, BlockInstance] = {}
    names_by_block: dict[str, int] = {}
    layers = []
    for ref in refs:
        block_name = shared_blocks.get(ref.name, ref.name)
        d = defs[block_name]
        with collector.guard():
            params = {h.name: h for h in d.hyper}
            for k, v in ref.args:
                if k not in params:
                    raise error(ref.span, f"block '{block_name}' has no hyper-parameter '{k}'",
                                did_you_mean(k, params) or
                                (f"its hyper-parameters: {one_of(params)}" if params else
                                 f"block '{block_name}' takes no hyper-parameters"))
            # arguments equal to the default do not make a new instance
            args = tuple((k, v) for k, v in ref.args
                         if not (k in defaults[block_name] and defaults[block_name][k] == v
                                 and type(defaults[block_name][k]) is type(v)))
            if ref.name in shared_blocks:
                first = group_args.setdefault(ref.name, args)
                if first != args:
                    raise error(ref.span, f"shared block '{ref.name}' is used with different "
                                "hyper-parameters; shared weights need one shape",
                                "share one block instance, or use separate blocks")
            ref = BlockRef(ref.name, args, ref.span)
            key = (block_name, ref.args)
            if key not in instances:
                n = names_by_block.get(block_name, 0)
                names_by_block[block_name] = n + 1
                instances[key] = BlockInstance(name=f"{block_name}_{n}", block=block_name,
                                               args=ref.args, span=d.name_span,
                                               bound_at=ref.span if ref.args else None)
            group = ref.name if ref.name in shared_blocks else None
            layers.append(Layer(index=len(layers), instance=instances[key].name, span=ref.span,
                                shared_group=group))
    collector.raise_if_any()
    # a block used with a single argument set keeps its plain name
    rename = {}
    for (block_name, _), inst in instances.items():
        rename[inst.name] = block_name if names_by_block[block_name] == 1 else inst.name
    blocks = {rename[i.name]: dataclasses.replace(i, name=rename[i.name])
              for i in instances.values()}
    layers = tuple(Layer(l.index, rename[l.instance], l.span, l.shared_group) for l in layers)
    return program.replace(stage="expand_pattern", pattern=tuple(refs), layers=layers,
                           blocks=blocks, shared_blocks=shared_blocks,
                           settings=_settings(program))


def _settings(program: Program) -> ModelSettings:
    model = program.spec.model
    ev = ConstEvaluator(program.spec.config, what="a model setting")
    out = ModelSettings()
    collector = Collector()
    for key, expr in model.settings.items():
        if key == "layers":
            continue
        with collector.guard():
            if key == "final_norm":
                if isinstance(expr, ast.NoneLit):
                    out = _replace(out, final_norm=None, final_norm_call=None)
                else:
                    name = expr.func if isinstance(expr, ast.Call) else expr.id
                    out = _replace(out, final_norm=name,
                                   final_norm_call=expr if isinstance(expr, ast.Call) else None)
                continue
            value = ev.eval(expr)
            if key == "tie_embeddings":
                if not isinstance(value, bool):
                    raise error(expr.span, f"tie_embeddings must be true or false, got {type_name(value)}")
                out = _replace(out, tie_embeddings=value)
            elif key == "embed_scale":
                if not is_number(value):
                    raise error(expr.span, f"embed_scale must be a number, got {type_name(value)}")
                out = _replace(out, embed_scale=float(value))
            elif key == "embed_init":
                if not isinstance(value, InitRule):
                    raise error(expr.span, f"embed_init must be an init rule, got {type_name(value)}",
                                "e.g. embed_init = normal(std = 0.02)")
                out = _replace(out, embed_init=value)
            elif key == "logit_softcap":
                if value is not None and (not is_number(value) or value <= 0):
                    raise error(expr.span, f"logit_softcap must be a positive number or none, "
                                f"got {value!r}")
                out = _replace(out, logit_softcap=None if value is None else float(value))
    collector.raise_if_any()
    return out


def _replace(settings: ModelSettings, **kw) -> ModelSettings:
    import dataclasses
    return dataclasses.replace(settings, **kw)
