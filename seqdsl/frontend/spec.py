"""Loading and validation: AST files → one validated :class:`Spec` (stage 2 of the pipeline).

* resolves ``import "..."`` (relative to the importing file, then the standard library that ships
  in ``seqdsl.specs/std``), detecting circular imports;
* merges definitions into one namespace (duplicates are errors);
* validates structure with pydantic models whose errors keep their source spans;
* evaluates the model's hyper-parameters, applies overrides (CLI ``--set`` / Python keywords),
  and type-checks them against the defaults.
"""

from __future__ import annotations

import importlib.resources
import keyword
import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from seqdsl.diagnostics import (NO_SPAN, Collector, Diagnostic, Span, SpecError, did_you_mean,
                                error, one_of)
from seqdsl.frontend import ast
from seqdsl.frontend.consteval import ConstEvaluator
from seqdsl.frontend.parser import parse, parse_value
from seqdsl.ir.builtins import BUILTINS, INIT_RULES, PATTERN_FUNCTIONS, RESERVED_NAMES
from seqdsl.ir.values import check_number, is_number, show, type_name

STDLIB_PREFIX = "std/"

#: settings a model body may assign, with their meaning (all but `layers` optional)
MODEL_SETTINGS = {
    "layers": "the layer pattern (required)",
    "tie_embeddings": "bool: share the embedding and output head weights (default false)",
    "final_norm": "norm applied before the head: rmsnorm, layernorm, a one-input fn, or none "
                  "(default rmsnorm)",
    "embed_scale": "number: the embedding output is multiplied by it (default 1)",
    "logit_softcap": "number or none: logits = cap * tanh(logits / cap) (default none)",
    "embed_init": "init rule of the embedding (and a tied head) (default normal(std = 0.02))",
}

def _spanned(msg: str, span: Span, hint: str | None = None) -> PydanticCustomError:
    return PydanticCustomError("seqdsl", msg, {"span": span, "hint": hint})


#: words of the .seq language; the grammar lets some of them through where a name is expected
LANGUAGE_KEYWORDS = frozenset({"import", "model", "block", "mixer", "channel", "fn", "shared",
                               "return", "if", "else", "for", "in", "and", "or", "not", "true",
                               "false", "none"})


def check_identifier(name: str, span: Span, what: str) -> None:
    """Names that reach generated Python must be legal, non-shadowing identifiers."""
    if name in LANGUAGE_KEYWORDS:
        raise _spanned(f"'{name}' is a keyword of the language and cannot name a {what}", span)
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise _spanned(f"'{name}' is a Python keyword and cannot name a {what}", span)
    if name.startswith("__"):
        raise _spanned(f"'{name}': names starting with '__' are reserved", span)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)


class HyperParam(_Frozen):
    name: str
    default: Any  # ast.Expr
    span: Span


class DefinitionSpec(_Frozen):
    """A validated block / mixer / channel / fn definition."""

    kind: str
    name: str
    inputs: tuple[str, ...]
    hyper: tuple[HyperParam, ...]
    body: tuple[Any, ...]  # ast statements
    span: Span
    name_span: Span
    input_spans: tuple[Span, ...]

    @model_validator(mode="after")
    def _check(self):
        check_identifier(self.name, self.name_span, self.kind)
        seen: dict[str, Span] = {}
        for name, span in list(zip(self.inputs, self.input_spans)) + \
                [(h.name, h.span) for h in self.hyper]:
            check_identifier(name, span, "parameter")
            if name in seen:
                raise _spanned(f"parameter '{name}' is declared twice in {self.kind} '{self.name}'",
                               span)
            seen[name] = span
            if name in RESERVED_NAMES:
                raise _spanned(f"parameter '{name}' shadows the built-in '{name}' "
                               f"({RESERVED_NAMES[name]})", span, "choose another name")
        for stmt in self.body:
            if isinstance(stmt, ast.Assign):
                for t, span in zip(stmt.targets, stmt.target_spans):
                    check_identifier(t, span, "variable")
                    if t in RESERVED_NAMES:
                        raise _spanned(f"variable '{t}' shadows the built-in '{t}' "
                                       f"({RESERVED_NAMES[t]})", span, "choose another name")
        returns = [s for s in self.body if isinstance(s, ast.Return)]
        shared = [s for s in self.body if isinstance(s, ast.Shared)]
        if shared:
            raise _spanned("'shared' values belong in the model body", shared[0].span)
        if self.kind == "block":
            if self.inputs != ("x",):
                raise _spanned(f"block '{self.name}' takes the residual stream 'x' only; "
                               "other parameters need defaults", self.input_spans[-1]
                               if self.input_spans else self.name_span)
            if returns:
                raise _spanned("a block updates the residual stream 'x' and has no 'return'",
                               returns[0].span, "write 'x = x + mixer(norm(x))'")
            if not any(isinstance(s, ast.Assign) and "x" in s.targets for s in self.body):
                raise _spanned(f"block '{self.name}' never updates the residual stream 'x'",
                               self.name_span, "write 'x = x + mixer(norm(x))'")
        else:
            if not returns:
                raise _spanned(f"{self.kind} '{self.name}' has no 'return'", self.name_span,
                               "end the body with 'return expression'")
            if len(returns) > 1 or self.body[-1] is not returns[0]:
                extra = returns[1] if len(returns) > 1 else self.body[-1]
                raise _spanned("'return' must be the last statement", extra.span)
        return self


class ModelSpec(_Frozen):
    name: str
    hyper: tuple[HyperParam, ...]
    settings: dict[str, Any]  # name -> ast.Expr
    setting_spans: dict[str, Span]
    shared: tuple[Any, ...]  # ast.Shared
    span: Span
    name_span: Span

    @model_validator(mode="after")
    def _check(self):
        check_identifier(self.name, self.name_span, "model")
        names = [h.name for h in self.hyper]
        for h in self.hyper:
            check_identifier(h.name, h.span, "hyper-parameter")
            if h.default is None:
                raise _spanned(f"model hyper-parameter '{h.name}' needs a default value", h.span)
            if h.name in RESERVED_NAMES:
                raise _spanned(f"hyper-parameter '{h.name}' shadows the built-in '{h.name}' "
                               f"({RESERVED_NAMES[h.name]})", h.span)
        for dup in {n for n in names if names.count(n) > 1}:
            raise _spanned(f"hyper-parameter '{dup}' is declared twice",
                           [h.span for h in self.hyper if h.name == dup][1])
        for required, meaning in (("vocab", "the vocabulary size"),
                                  ("d", "the width of the residual stream")):
            if required not in names:
                raise _spanned(f"model '{self.name}' must declare hyper-parameter '{required}' "
                               f"({meaning})", self.name_span,
                               f"model {self.name}({required} = ..., ...) {{ ... }}")
        if "layers" not in self.settings:
            raise _spanned(f"model '{self.name}' has no 'layers = ...' pattern", self.name_span,
                           "e.g. layers = [my_block] * depth")
        for s in self.shared:
            check_identifier(s.name, s.name_span, "shared value")
        return self


class Spec(_Frozen):
    """The validated spec: every definition, the model, and the resolved configuration."""

    path: str
    files: tuple[str, ...]
    model: ModelSpec | None
    definitions: dict[str, DefinitionSpec]
    config: dict[str, Any]           # model hyper-parameters after overrides
    def_overrides: dict[str, dict[str, Any]]  # definition -> parameter -> value
    overrides: dict[str, Any] = {}   # what was overridden, as given ("key" or "definition.key")

    @field_validator("config")
    @classmethod
    def _positive_dims(cls, config):
        for key in ("vocab", "d"):
            if key in config and not (isinstance(config[key], int) and not isinstance(config[key], bool)
                                      and config[key] > 0):
                raise ValueError(f"hyper-parameter '{key}' must be a positive int, "
                                 f"got {config[key]!r}")
        return config


# ---- loading -------------------------------------------------------------------------------


def _stdlib_dir() -> Path:
    return Path(str(importlib.resources.files("seqdsl.specs"))) / "std"


def _resolve_import(imp: ast.Import, importer: str) -> Path:
    if not imp.path.endswith(".seq"):
        raise error(imp.span, f"import paths name .seq files, got \"{imp.path}\"")
    base = Path(importer).parent if not importer.startswith("<") else Path.cwd()
    candidates = [base / imp.path]
    if imp.path.startswith(STDLIB_PREFIX):
        candidates.append(_stdlib_dir() / imp.path[len(STDLIB_PREFIX):])
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise error(imp.span, f"cannot find \"{imp.path}\"",
                "looked in " + ", ".join(str(c) for c in candidates))


def _display_path(p: Path) -> str:
    try:
        rel = os.path.relpath(p)
        return rel if not rel.startswith("..") else str(p)
    except ValueError:  # pragma: no cover - different drives on Windows
        return str(p)


def _read(path: Path, span: Span) -> str:
    """A spec file's text (UTF-8; a leading byte-order mark, as some editors write, dropped)."""
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        before = exc.object[:exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        raise error(Span(_display_path(path), line, col, line, col + 1),
                    f"not UTF-8 text: byte {exc.object[exc.start]:#04x}",
                    "save the file as UTF-8") from None
    except OSError as exc:
        raise error(span, f"cannot read {_display_path(path)}: {exc.strerror or exc}") from None


def load_modules(source: str | os.PathLike, text: str | None = None) -> list[ast.Module]:
    """Parse a file and, transitively, everything it imports. The entry module comes first."""
    if text is None:
        path = Path(source)
        if not path.is_file():
            raise error(Span(str(source), 0, 0, 0, 0),
                        "is a folder, not a spec file" if path.is_dir() else "no such file")
        entry_key = path.resolve()
        entry_name = _display_path(path)
        text = _read(path, Span(str(source), 0, 0, 0, 0))
    else:
        # the text of an existing file (an editor buffer): the file still closes import cycles
        entry_key = Path(source).resolve() if Path(source).is_file() else None
        entry_name = str(source)
    modules: list[ast.Module] = []
    seen: dict[Path, ast.Module] = {}
    collector = Collector()

    def visit(name: str, key: Path | None, body: str, stack: list[tuple[Path | None, ast.Import | None]]):
        module = parse(body, name)
        modules.append(module)
        if key is not None:
            seen[key] = module
        for imp in module.imports:
            with collector.guard():
                target = _resolve_import(imp, name if key is None else str(key))
                chain = [k for k, _ in stack] + [key]
                if target in chain:
                    cycle = [_display_path(k) for k in chain[chain.index(target):] if k] + \
                        [_display_path(target)]
                    raise error(imp.span, "circular import: " + " -> ".join(cycle))
                if target in seen:
                    continue
                visit(_display_path(target), target, _read(target, imp.span), stack + [(key, imp)])

    visit(entry_name, entry_key, text, [])
    collector.raise_if_any()
    return modules


# ---- validation ----------------------------------------------------------------------------


def _definition(d: ast.Definition) -> DefinitionSpec:
    inputs = [p for p in d.params if p.default is None]
    hyper = [p for p in d.params if p.default is not None]
    # the implicit input of mixers, channels and blocks is the residual stream / mixer input x
    if not inputs and d.kind in ("block", "mixer", "channel"):
        input_names, input_spans = ("x",), (d.name_span,)
    else:
        input_names = tuple(p.name for p in inputs)
        input_spans = tuple(p.span for p in inputs)
        if d.kind == "fn" and not inputs:
            raise error(d.name_span, f"fn '{d.name}' declares no tensor input",
                        "parameters without a default are tensor inputs: fn f(x, y, k = 2)")
    if inputs and hyper and d.params.index(inputs[-1]) > d.params.index(hyper[0]):
        raise error(inputs[-1].span, f"tensor input '{inputs[-1].name}' follows a "
                    "hyper-parameter; list tensor inputs first")
    return DefinitionSpec(kind=d.kind, name=d.name, inputs=input_names,
                          hyper=tuple(HyperParam(name=p.name, default=p.default, span=p.span)
                                      for p in hyper),
                          body=d.body, span=d.span, name_span=d.name_span, input_spans=input_spans)


def _model(m: ast.ModelDef) -> ModelSpec:
    settings: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    shared = []
    for s in m.body:
        if isinstance(s, ast.Shared):
            shared.append(s)
        elif isinstance(s, ast.Return):
            raise error(s.span, "a model has no 'return'; it assigns settings such as 'layers'")
        else:
            if len(s.targets) != 1:
                raise error(s.target_spans[1], "model settings are assigned one at a time")
            key = s.targets[0]
            if key not in MODEL_SETTINGS:
                hp = [p.name for p in m.params]
                hint = did_you_mean(key, MODEL_SETTINGS) or (
                    f"hyper-parameters go in the header: model {m.name}({key} = ...)" if key not in hp
                    else None) or ("valid settings: " + one_of(MODEL_SETTINGS))
                raise error(s.target_spans[0], f"unknown model setting '{key}'", hint)
            if key in settings:
                raise error(s.target_spans[0], f"model setting '{key}' is assigned twice")
            settings[key] = s.value
            spans[key] = s.target_spans[0]
    return ModelSpec(name=m.name, hyper=tuple(HyperParam(name=p.name, default=p.default, span=p.span)
                                              for p in m.params),
                     settings=settings, setting_spans=spans, shared=tuple(shared), span=m.span,
                     name_span=m.name_span)


def _from_validation_error(exc: ValidationError, fallback: Span) -> SpecError:
    diags = []
    for e in exc.errors():
        ctx = e.get("ctx") or {}
        span = ctx.get("span", fallback)
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        diags.append(Diagnostic(span, msg, ctx.get("hint")))
    return SpecError(diags)


def _validated(factory, *args, fallback: Span):
    try:
        return factory(*args)
    except ValidationError as exc:
        raise _from_validation_error(exc, fallback) from None


def normalise_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Accept ``{"d": 512, "mamba.expand": 4, "mamba": {"n": 8}}``; strings are parsed as literals."""
    flat: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping):
            for k, v in value.items():
                flat[f"{key}.{k}"] = v
        else:
            flat[key] = value
    for key, value in list(flat.items()):
        if isinstance(value, str):
            flat[key] = parse_value(value, f"--set {key}")
        elif isinstance(value, list):
            flat[key] = tuple(value)
    return flat


def _override_span(key: str, value: Any) -> Span:
    return Span(f"--set {key}={value!r}", 0, 0, 0, 0)


def _check_type(key: str, value: Any, default: Any, span: Span) -> Any:
    """An override must have the type of the default (an int is accepted for a float)."""
    if is_number(value):
        check_number(value, span, f"hyper-parameter '{key}'")
    if default is None:
        return value
    article = "an" if type_name(default)[0] in "aeiou" else "a"
    if value is None:
        raise error(span, f"hyper-parameter '{key}' is {article} {type_name(default)}, got none")
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = is_number(value)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int)
    else:
        ok = type(value) is type(default)
    if not ok:
        raise error(span, f"hyper-parameter '{key}' is {article} {type_name(default)}, "
                    f"got {type_name(value)} {show(value)}")
    return value


def build_spec(modules: list[ast.Module], overrides: Mapping[str, Any] | None = None) -> Spec:
    collector = Collector()
    definitions: dict[str, DefinitionSpec] = {}
    entry = modules[0]
    for module in modules:
        for d in module.definitions:
            with collector.guard():
                if d.name in definitions:
                    first = definitions[d.name]
                    if module is not entry and first.name_span.path == entry.path:
                        # the entry file clashes with an import: point at the user's file
                        raise error(first.name_span, f"duplicate definition of '{d.name}'",
                                    f"already defined at {d.name_span} (imported)")
                    raise error(d.name_span, f"duplicate definition of '{d.name}'",
                                f"first defined at {first.name_span}")
                if d.name in BUILTINS or d.name in INIT_RULES or d.name in PATTERN_FUNCTIONS \
                        or d.name in RESERVED_NAMES:
                    raise error(d.name_span, f"'{d.name}' is a built-in name and cannot be redefined")
                definitions[d.name] = _validated(_definition, d, fallback=d.span)
    model = None
    if len(entry.models) > 1:
        collector.add(entry.models[1].name_span, "a file defines at most one model",
                      f"'{entry.models[0].name}' is defined at {entry.models[0].name_span}")
    if entry.models:
        with collector.guard():
            model = _validated(_model, entry.models[0], fallback=entry.models[0].span)
    collector.raise_if_any()

    flat = normalise_overrides(overrides)
    config: dict[str, Any] = {}
    def_overrides: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        span = _override_span(key, value)
        if "." in key:
            dname, pname = key.split(".", 1)
            d = definitions.get(dname)
            if d is None:
                collector.add(span, f"unknown definition '{dname}'", did_you_mean(dname, definitions))
                continue
            if pname not in [h.name for h in d.hyper]:
                collector.add(span, f"{d.kind} '{dname}' has no hyper-parameter '{pname}'",
                              did_you_mean(pname, [h.name for h in d.hyper]) or
                              ("its hyper-parameters: " + one_of(h.name for h in d.hyper)
                               if d.hyper else f"{d.kind} '{dname}' takes no hyper-parameters"))
                continue
            def_overrides.setdefault(dname, {})[pname] = value
        elif model is None or key not in [h.name for h in model.hyper]:
            names = [h.name for h in model.hyper] if model else []
            collector.add(span, f"unknown hyper-parameter '{key}'" +
                          ("" if model else " (the file defines no model)"),
                          did_you_mean(key, names) or
                          ("use 'definition.parameter' for a definition's hyper-parameter"))
    collector.raise_if_any()

    if model is not None:
        env: dict[str, Any] = {}
        for h in model.hyper:
            with collector.guard():
                default = ConstEvaluator(env, what=f"the default of '{h.name}'").eval(h.default)
                if h.name in flat:
                    value = _check_type(h.name, flat[h.name], default,
                                        _override_span(h.name, flat[h.name]))
                else:
                    value = default
                if h.name in ("vocab", "d") and not (
                        isinstance(value, int) and not isinstance(value, bool) and value > 0):
                    span = _override_span(h.name, flat[h.name]) if h.name in flat \
                        else h.default.span
                    raise error(span, f"hyper-parameter '{h.name}' must be a positive int, "
                                f"got {value!r}")
                env[h.name] = value
        collector.raise_if_any()
        config = env

    # type-check definition overrides against their defaults, evaluated in the model's scope
    for dname, params in def_overrides.items():
        d = definitions[dname]
        env = dict(config)
        for h in d.hyper:
            with collector.guard():
                default = ConstEvaluator(env, what=f"the default of '{h.name}'").eval(h.default) \
                    if not _uses_unknown(h.default, env) else None
                value = params.get(h.name, default)
                if h.name in params:
                    value = _check_type(f"{dname}.{h.name}", value, default,
                                        _override_span(f"{dname}.{h.name}", value))
                env[h.name] = value
    collector.raise_if_any()

    files = tuple(m.path for m in modules)
    try:
        return Spec(path=entry.path, files=files, model=model, definitions=definitions,
                    config=config, def_overrides=def_overrides, overrides=flat)
    except ValidationError as exc:
        raise _from_validation_error(exc, model.span if model else NO_SPAN) from None


def _uses_unknown(expr, env) -> bool:
    """True when a default refers to a name the model scope does not define (e.g. a tensor)."""
    return any(isinstance(e, ast.Name) and e.id not in env and e.id not in INIT_RULES
               for e in ast.walk(expr))


def load_spec(source: str | os.PathLike, text: str | None = None,
              overrides: Mapping[str, Any] | None = None) -> Spec:
    """Parse, import, validate: the frontend's public entry point."""
    return build_spec(load_modules(source, text), overrides)


__all__ = ["Spec", "DefinitionSpec", "ModelSpec", "HyperParam", "load_spec", "load_modules",
           "build_spec", "MODEL_SETTINGS", "normalise_overrides"]
