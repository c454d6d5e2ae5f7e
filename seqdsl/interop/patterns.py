"""Hybrid layer patterns as other libraries write them, resolved to one list of layer kinds.

Configs describe which layers are attention (or MLP-only, or MoE-only) in many ways. Each
*convention* below reads its own fields and returns the kind of every layer, or None when its
fields are absent. :func:`resolve_kinds` runs all of them: when two conventions are present they
must agree layer by layer — a contradiction is an error naming both fields, never silently
resolved in favour of one.

Kinds: ``"recurrent"`` (the family's token mixer: Mamba, RG-LRU, GatedDeltaNet, ...),
``"attention"``, ``"mlp"`` (a layer with only an MLP) and ``"moe"`` (only a mixture of experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from seqdsl.diagnostics import Span, error

RECURRENT, ATTENTION, MLP, MOE = "recurrent", "attention", "mlp", "moe"

#: the words found in per-layer type lists, by kind
WORDS = {
    "attention": ATTENTION, "full_attention": ATTENTION, "sliding_attention": ATTENTION,
    "attn": ATTENTION, "global": ATTENTION, "local": ATTENTION,
    "recurrent": RECURRENT, "linear_attention": RECURRENT, "mamba": RECURRENT, "mamba2": RECURRENT,
    "ssm": RECURRENT, "conv": RECURRENT,
    "mlp": MLP, "moe": MOE,
}

#: Megatron-LM's hybrid layer pattern characters
MEGATRON = {"M": RECURRENT, "*": ATTENTION, "-": MLP, "E": MOE}


def _span(source: str) -> Span:
    return Span(source, 0, 0, 0, 0)


@dataclass(frozen=True)
class Convention:
    """One way of writing the pattern: the fields it reads and how it turns them into kinds."""

    name: str
    fields: tuple[str, ...]
    resolve: Callable[[dict, int | None, str], list[str] | None]


def _depth(cfg: dict) -> int | None:
    n = cfg.get("num_hidden_layers")
    return n if isinstance(n, int) else None


def _words(field: str):
    def resolve(cfg, depth, source):
        values = cfg.get(field)
        if values is None:
            return None
        if not isinstance(values, list) or not values:
            raise error(_span(source), f"'{field}' must be a non-empty list of layer types")
        out = []
        for i, word in enumerate(values):
            kind = WORDS.get(str(word).lower())
            if kind is None:
                raise error(_span(source), f"'{field}'[{i}] is {word!r}, an unknown layer type",
                            "known layer types: " + ", ".join(sorted(WORDS)))
            out.append(kind)
        return out
    return resolve


def _megatron(field: str):
    def resolve(cfg, depth, source):
        text = cfg.get(field)
        if text is None:
            return None
        chars = [c for c in str(text) if c not in " |"]
        bad = [c for c in chars if c not in MEGATRON]
        if bad:
            raise error(_span(source), f"'{field}' has the character {bad[0]!r}, not a Megatron "
                        "layer symbol", "M = Mamba, * = attention, - = MLP, E = mixture of experts")
        return [MEGATRON[c] for c in chars]
    return resolve


def _tiled(field: str):
    def resolve(cfg, depth, source):
        values = _words(field)(cfg, depth, source)
        if values is None:
            return None
        if depth is None:
            raise error(_span(source), f"'{field}' is tiled over the layers: num_hidden_layers "
                        "is needed")
        return [values[i % len(values)] for i in range(depth)]
    return resolve


def _period(period_field: str, offset_field: str):
    def resolve(cfg, depth, source):
        if period_field not in cfg and offset_field not in cfg:
            return None
        period, offset = cfg.get(period_field), cfg.get(offset_field, 0)
        if not isinstance(period, int) or period < 1 or not isinstance(offset, int) \
                or not 0 <= offset < period:
            raise error(_span(source), f"'{period_field}' = {period!r} and '{offset_field}' = "
                        f"{offset!r} do not describe a period: need 0 <= offset < period")
        if depth is None:
            raise error(_span(source), f"'{period_field}' needs num_hidden_layers")
        return [ATTENTION if i % period == offset else RECURRENT for i in range(depth)]
    return resolve


def _indices(field: str, base: int, path: tuple[str, ...] = ()):
    """A list of attention layer indices, 0-based or 1-based (``base``), maybe nested in a
    sub-dict (``path``)."""

    def resolve(cfg, depth, source):
        node = cfg
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or node.get(field) is None:
            return None
        values = node[field]
        where = ".".join(path + (field,))
        if depth is None:
            raise error(_span(source), f"'{where}' lists layer indices: num_hidden_layers is needed")
        if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
            raise error(_span(source), f"'{where}' must be a list of layer indices")
        for v in values:
            if not base <= v < depth + base:
                raise error(_span(source), f"'{where}' lists layer {v}, outside {base}..{depth - 1 + base} "
                            f"({'1' if base else '0'}-based, {depth} layers)")
        chosen = {v - base for v in values}
        return [ATTENTION if i in chosen else RECURRENT for i in range(depth)]
    return resolve


def _interval(field: str):
    def resolve(cfg, depth, source):
        n = cfg.get(field)
        if n is None:
            return None
        if not isinstance(n, int) or n < 1:
            raise error(_span(source), f"'{field}' must be a positive int, got {n!r}")
        if depth is None:
            raise error(_span(source), f"'{field}' needs num_hidden_layers")
        return [ATTENTION if (i + 1) % n == 0 else RECURRENT for i in range(depth)]
    return resolve


CONVENTIONS: list[Convention] = [
    Convention("explicit list", ("layers_block_type",), _words("layers_block_type")),
    Convention("explicit list", ("layer_types",), _words("layer_types")),
    Convention("Megatron pattern string", ("hybrid_override_pattern",),
               _megatron("hybrid_override_pattern")),
    Convention("Megatron pattern string", ("hybrid_layer_pattern",), _megatron("hybrid_layer_pattern")),
    Convention("tiled block list", ("block_types",), _tiled("block_types")),
    Convention("period and offset", ("attn_layer_period", "attn_layer_offset"),
               _period("attn_layer_period", "attn_layer_offset")),
    Convention("index list", ("attn_layer_indices",), _indices("attn_layer_indices", 0)),
    Convention("index list", ("attn_layer_idx",), _indices("attn_layer_idx", 0)),
    Convention("index list", ("full_attn_idxs",), _indices("full_attn_idxs", 0)),
    Convention("1-based index list", ("linear_attn_config.full_attn_layers",),
               _indices("full_attn_layers", 1, ("linear_attn_config",))),
    Convention("interval", ("full_attention_interval",), _interval("full_attention_interval")),
]


def present(cfg: dict) -> list[Convention]:
    """The conventions whose fields the config has."""
    out = []
    for conv in CONVENTIONS:
        for f in conv.fields:
            node = cfg
            for key in f.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            if node is not None:
                out.append(conv)
                break
    return out


def resolve_kinds(cfg: dict, source: str = "config.json",
                  default: dict | None = None) -> tuple[list[str], list[str]]:
    """The kind of every layer and the fields it was read from.

    ``default``: fields to use when the config has no pattern field at all (a family's defaults).
    Every convention present must agree, and with ``num_hidden_layers`` when that is given.
    """
    depth = _depth(cfg)
    found = present(cfg)
    if not found and default:
        cfg = {**cfg, **default}
        found = present(cfg)
    results: list[tuple[str, list[str]]] = []
    for conv in found:
        kinds = conv.resolve(cfg, depth, source)
        if kinds is not None:
            results.append((" / ".join(f"'{f}'" for f in conv.fields), kinds))
    if not results:
        if depth is None:
            raise error(_span(source), "the config gives neither num_hidden_layers nor a layer "
                        "pattern")
        return [RECURRENT] * depth, []
    first_field, first = results[0]
    if depth is not None and len(first) != depth:
        raise error(_span(source), f"{first_field} describes {len(first)} layers but "
                    f"'num_hidden_layers' is {depth}",
                    "the two fields contradict each other; fix one of them")
    for field, kinds in results[1:]:
        if kinds != first:
            i = next((i for i, (a, b) in enumerate(zip(first, kinds)) if a != b),
                     min(len(first), len(kinds)))
            a = first[i] if i < len(first) else "no layer"
            b = kinds[i] if i < len(kinds) else "no layer"
            raise error(_span(source), f"{first_field} and {field} contradict each other: layer "
                        f"{i} is {a} by the first and {b} by the second",
                        "a config must describe its layer pattern once, or consistently; "
                        "remove or fix one of the fields")
    return first, [f for f, _ in results]


#: fields that state a period: the pattern writer prefers them (8 layers with attention at layer
#: 4 fit `i % 5 == 4` as well as the config's `i % 8 == 4`)
PERIOD_FIELDS = ("attn_layer_period", "expert_layer_period", "full_attention_interval",
                 "decoder_sparse_step")


def period_hints(cfg: dict) -> list[int]:
    hints = [cfg[f] for f in PERIOD_FIELDS if isinstance(cfg.get(f), int) and cfg[f] > 0]
    if isinstance(cfg.get("block_types"), list) and cfg["block_types"]:
        hints.append(len(cfg["block_types"]))
    return hints


def periodic_flags(flags: list[bool], prefer=()) -> tuple[int, int] | None:
    """(period, offset) with flags[i] == (i % period == offset) for every i: a preferred period
    if one fits, else the smallest; None if there is none (all false is not periodic here)."""
    n = len(flags)
    for p in [*prefer, *range(1, n + 1)]:
        ons = [i for i in range(n) if flags[i]]
        if not ons:
            return None
        o = ons[0] % p
        if all(flags[i] == (i % p == o) for i in range(n)):
            return p, o
    return None


__all__ = ["RECURRENT", "ATTENTION", "MLP", "MOE", "CONVENTIONS", "resolve_kinds",
           "periodic_flags", "period_hints", "present"]
