"""transformers configs → hyper-parameters, layer pattern and a `.seq` spec.

One reader per family turns the config's fields into the hyper-parameters of the family's spec
template (:mod:`seqdsl.interop.spec_writer`); the layer pattern comes from
:func:`seqdsl.interop.patterns.resolve_kinds`, whatever convention the config uses. Values the
spec cannot express (another activation, a clamp on dt, ...) are errors that name the field,
never silently ignored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from seqdsl.diagnostics import Span, error
from seqdsl.interop import spec_writer
from seqdsl.interop.patterns import ATTENTION, RECURRENT, period_hints, resolve_kinds


@dataclass(frozen=True)
class Family:
    """A transformers model family: how its config reads and which spec template it fills."""

    name: str                    # the spec's model name and the weights table's key
    architecture: str            # transformers' class name
    model_types: tuple[str, ...]
    read: Callable[["_Reader"], dict]
    template: Callable[[dict], str]
    kinds: tuple[str, ...] = (RECURRENT,)     # the layer kinds the family has
    pattern_default: dict = field(default_factory=dict)
    #: (attention per layer, MoE per layer) -> the spec's `layers = ...` expression
    layers: Callable[[list[bool], list[bool], list[int]], str] | None = None


class _Reader:
    """Typed access to a config dict with errors that name the field."""

    def __init__(self, cfg: dict, source: str, family: "Family"):
        self.cfg, self.source, self.family = cfg, source, family

    def fail(self, message: str, hint: str | None = None):
        raise error(Span(self.source, 0, 0, 0, 0), message, hint)

    def get(self, name: str, default: Any = ..., types=(int,)) -> Any:
        if name not in self.cfg or self.cfg[name] is None:
            if default is ...:
                self.fail(f"the config has no '{name}', which a {self.family.architecture} needs")
            return default
        value = self.cfg[name]
        if types and not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            self.fail(f"'{name}' is {value!r}; expected {' or '.join(t.__name__ for t in types)}")
        return value

    def num(self, name, default=...):
        v = float(self.get(name, default, (int, float)))
        if not math.isfinite(v):
            self.fail(f"'{name}' is {v}; a spec holds finite numbers only")
        return v

    def flag(self, name, default=...):
        return self.get(name, default, (bool,))

    def require(self, name: str, allowed, default=None) -> None:
        value = self.cfg.get(name, default)
        allowed = allowed if isinstance(allowed, (list, tuple)) else [allowed]
        if value not in allowed:
            self.fail(f"'{name}' = {value!r} is not supported for {self.family.architecture} "
                      f"(supported: {', '.join(repr(a) for a in allowed)})")

    def rope(self, head_dim: int, default_partial: float) -> tuple[float, int]:
        """(rope_theta, rotary dims of a head), from the top level (transformers 4) or
        rope_parameters; the rotary dims are head_dim · partial_rotary_factor (the family's
        default when the config has none), and must be even."""
        params = self.cfg.get("rope_parameters") or self.cfg.get("rope_scaling") or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            self.fail(f"rope type {rope_type!r} is not supported (only the default rotary)")
        theta = self.cfg.get("rope_theta", params.get("rope_theta", 10000.0))
        partial = self.cfg.get("partial_rotary_factor", params.get("partial_rotary_factor"))
        partial = default_partial if partial is None else partial
        rope_dims = int(head_dim * partial)
        if rope_dims % 2:
            self.fail(f"'partial_rotary_factor' = {partial} gives {rope_dims} rotary dims; "
                      "need an even number")
        return float(theta), rope_dims

    def base(self) -> dict:
        return {"vocab": self.get("vocab_size"), "d": self.get("hidden_size"),
                "depth": self.get("num_hidden_layers"), "architecture": self.family.architecture,
                "model_type": self.cfg.get("model_type", self.family.model_types[0])}


def _rank(r: _Reader, name: str, d: int) -> int:
    value = r.cfg.get(name, "auto")
    if value == "auto":
        return math.ceil(d / 16)
    return r.get(name)


def _read_mamba(r: _Reader) -> dict:
    hp = r.base()
    r.require("hidden_act", "silu", "silu")
    hp.update(n=r.get("state_size"), expand=r.get("expand"), conv=r.get("conv_kernel"),
              rank=_rank(r, "time_step_rank", hp["d"]), eps=r.num("layer_norm_epsilon", 1e-5),
              tie=r.flag("tie_word_embeddings", True), bias=r.flag("use_bias", False),
              conv_bias=r.flag("use_conv_bias", True), dt_min=r.num("time_step_min", 0.001),
              dt_max=r.num("time_step_max", 0.1), dt_floor=r.num("time_step_floor", 1e-4))
    if r.cfg.get("intermediate_size", hp["expand"] * hp["d"]) != hp["expand"] * hp["d"]:
        r.fail(f"'intermediate_size' = {r.cfg['intermediate_size']} contradicts 'expand' * "
               f"'hidden_size' = {hp['expand'] * hp['d']}")
    return hp


def _read_mamba2(r: _Reader) -> dict:
    hp = r.base()
    r.require("hidden_act", "silu", "silu")
    r.require("use_bias", False, False)
    limit = r.cfg.get("time_step_limit", [0.0, float("inf")])
    if limit is not None and (float(limit[0]) != 0.0 or float(limit[1]) != float("inf")):
        r.fail(f"'time_step_limit' = {limit!r} clamps dt, which the spec does not express",
               "only the default (0.0, inf) is supported")
    hp.update(n=r.get("state_size"), expand=r.get("expand"), conv=r.get("conv_kernel"),
              hd=r.get("head_dim"), groups=r.get("n_groups", 1),
              eps=r.num("layer_norm_epsilon", 1e-5), tie=r.flag("tie_word_embeddings", False),
              conv_bias=r.flag("use_conv_bias", True), dt_min=r.num("time_step_min", 0.001),
              dt_max=r.num("time_step_max", 0.1), dt_floor=r.num("time_step_floor", 1e-4))
    e = hp["expand"] * hp["d"]
    heads = r.cfg.get("num_heads")
    if heads is not None and heads * hp["hd"] != e:
        r.fail(f"'num_heads' * 'head_dim' = {heads * hp['hd']} contradicts 'expand' * "
               f"'hidden_size' = {e}", "the heads must cover the inner width")
    if e % hp["hd"] or (e // hp["hd"]) % hp["groups"]:
        r.fail(f"'n_groups' = {hp['groups']} must divide the {e // hp['hd']} heads")
    return hp


def _read_jamba(r: _Reader) -> dict:
    hp = r.base()
    r.require("hidden_act", "silu", "silu")
    hp.update(hidden=r.get("intermediate_size"), heads=r.get("num_attention_heads"),
              kv_heads=r.get("num_key_value_heads", r.cfg.get("num_attention_heads")),
              n_experts=r.get("num_experts", 16), top_k=r.get("num_experts_per_tok", 2),
              n=r.get("mamba_d_state", 16), conv=r.get("mamba_d_conv", 4),
              expand=r.get("mamba_expand", 2), rank=_rank(r, "mamba_dt_rank", r.get("hidden_size")),
              conv_bias=r.flag("mamba_conv_bias", True), bias=r.flag("mamba_proj_bias", False),
              eps=r.num("rms_norm_eps", 1e-6), tie=r.flag("tie_word_embeddings", False))
    period, offset = r.get("expert_layer_period", 2), r.get("expert_layer_offset", 1)
    if not 0 <= offset < period:
        r.fail(f"'expert_layer_offset' = {offset} must be smaller than 'expert_layer_period' = {period}")
    hp["moe_flags"] = [hp["n_experts"] > 1 and i % period == offset for i in range(hp["depth"])]
    return hp


def _read_recurrent_gemma(r: _Reader) -> dict:
    hp = r.base()
    r.require("hidden_activation", "gelu_pytorch_tanh", "gelu_pytorch_tanh")
    heads = r.get("num_attention_heads")
    hd = r.get("head_dim", hp["d"] // heads)
    theta, rope_dims = r.rope(hd, 0.5)
    inter = r.get("intermediate_size")
    if inter % 2:
        r.fail(f"'intermediate_size' = {inter} must be even (the MLP is intermediate_size // 2 wide)")
    hp.update(heads=heads, kv_heads=r.get("num_key_value_heads", heads), hd=hd,
              width=r.get("lru_width", hp["d"]) or hp["d"], window=r.get("attention_window_size"),
              conv=r.get("conv1d_width", 4), softcap=r.num("logits_soft_cap", 30.0),
              eps=r.num("rms_norm_eps", 1e-6), rope_theta=theta, rope_dims=rope_dims,
              hidden=inter // 2, qkv_bias=r.flag("attention_bias", False),
              tie=r.flag("tie_word_embeddings", True))
    return hp


def _read_qwen3_next(r: _Reader) -> dict:
    hp = r.base()
    r.require("hidden_act", "silu", "silu")
    r.require("attention_bias", False, False)
    heads = r.get("num_attention_heads")
    hd = r.get("head_dim", hp["d"] // heads)
    theta, rope_dims = r.rope(hd, 0.25)
    key_heads, value_heads = r.get("linear_num_key_heads"), r.get("linear_num_value_heads")
    if value_heads % key_heads:
        r.fail(f"'linear_num_value_heads' = {value_heads} must be a multiple of "
               f"'linear_num_key_heads' = {key_heads}")
    hp.update(heads=heads, kv_heads=r.get("num_key_value_heads", heads), hd=hd,
              hidden=r.get("intermediate_size"), eps=r.num("rms_norm_eps", 1e-6),
              tie=r.flag("tie_word_embeddings", False), rope_theta=theta, rope_dims=rope_dims,
              conv=r.get("linear_conv_kernel_dim", 4), key_heads=key_heads,
              value_heads=value_heads, key_dim=r.get("linear_key_head_dim"),
              value_dim=r.get("linear_value_head_dim"), n_experts=r.get("num_experts", 0),
              top_k=r.get("num_experts_per_tok", 1), expert_hidden=r.get("moe_intermediate_size", 0),
              shared_hidden=r.get("shared_expert_intermediate_size", 0),
              norm_topk=r.flag("norm_topk_prob", True))
    step = r.get("decoder_sparse_step", 1)
    only = r.cfg.get("mlp_only_layers") or []
    hp["moe_flags"] = [i not in only and hp["n_experts"] > 0 and (i + 1) % step == 0
                       for i in range(hp["depth"])]
    return hp


def _one_block(block: str):
    def write(attn: list[bool], moe: list[bool], prefer: list[int]) -> str:
        return spec_writer.flags_pattern(block, {"attn": attn, **({"moe": moe} if any(moe) else {})},
                                         prefer)
    return write


FAMILIES: list[Family] = [
    Family("mamba", "MambaForCausalLM", ("mamba",), _read_mamba, spec_writer.mamba),
    Family("mamba2", "Mamba2ForCausalLM", ("mamba2",), _read_mamba2, spec_writer.mamba2),
    Family("jamba", "JambaForCausalLM", ("jamba",), _read_jamba, spec_writer.jamba,
           kinds=(RECURRENT, ATTENTION),
           pattern_default={"attn_layer_period": 8, "attn_layer_offset": 4},
           layers=_one_block("jamba_layer")),
    Family("griffin", "RecurrentGemmaForCausalLM", ("recurrent_gemma",), _read_recurrent_gemma,
           spec_writer.griffin, kinds=(RECURRENT, ATTENTION),
           pattern_default={"block_types": ["recurrent", "recurrent", "attention"]},
           layers=lambda attn, moe, prefer: spec_writer.two_blocks_pattern("rec", "local", attn,
                                                                            prefer)),
    Family("qwen3_next", "Qwen3NextForCausalLM", ("qwen3_next",), _read_qwen3_next,
           spec_writer.qwen3_next, kinds=(RECURRENT, ATTENTION),
           pattern_default={"full_attention_interval": 4},
           layers=_one_block("qwen3_next_layer")),
]


def family_of(cfg: dict, source: str = "config.json") -> Family:
    """The family a config belongs to, from `model_type`, else from `architectures`."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    by_type = [f for f in FAMILIES if model_type in f.model_types]
    by_arch = [f for f in FAMILIES if f.architecture in archs]
    if by_type and by_arch and by_type[0] is not by_arch[0]:
        raise error(Span(source, 0, 0, 0, 0), f"'model_type' {model_type!r} and 'architectures' "
                    f"{archs!r} name different families")
    found = by_type or by_arch
    if not found:
        known = ", ".join(f"{f.model_types[0]} ({f.architecture})" for f in FAMILIES)
        raise error(Span(source, 0, 0, 0, 0),
                    f"unsupported model: model_type {model_type!r}, architectures {archs!r}",
                    f"supported: {known}")
    return found[0]


@dataclass
class Imported:
    """An imported config: its family, the spec's hyper-parameters, the layer pattern."""

    family: Family
    config: dict
    hp: dict
    kinds: list[str]          # per layer: "recurrent" or "attention"
    moe: list[bool]           # per layer: a mixture of experts as the channel mixer
    pattern_fields: list[str]  # the config fields the pattern was read from
    source: str = "config.json"

    @property
    def spec_text(self) -> str:
        return self.family.template(self.hp)

    @property
    def name(self) -> str:
        return self.family.name


def _config_dict(config) -> tuple[dict, str]:
    if isinstance(config, dict):
        return dict(config), "config.json"
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise error(Span(str(path), 0, 0, 0, 0), "no such file") from None
        except json.JSONDecodeError as e:
            raise error(Span(str(path), e.lineno, e.colno, e.lineno, e.colno + 1),
                        f"not a JSON config: {e.msg}") from None
        if not isinstance(data, dict):
            raise error(Span(str(path), 0, 0, 0, 0),
                        f"not a transformers config: a JSON {type(data).__name__}, not an object")
        return data, str(path)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict(), f"{type(config).__name__}"
    raise TypeError(f"import_config: expected a dict, a path or a transformers config, "
                    f"got {type(config).__name__}")


def import_config(config, source: str | None = None) -> Imported:
    """Read a transformers config (a dict, a config.json path or folder, or a config object)."""
    cfg, where = _config_dict(config)
    source = source or where
    family = family_of(cfg, source)
    reader = _Reader(cfg, source, family)
    hp = family.read(reader)
    kinds, fields = resolve_kinds(cfg, source, family.pattern_default)
    if len(kinds) != hp["depth"]:  # pragma: no cover - resolve_kinds checks num_hidden_layers
        reader.fail("the layer pattern and num_hidden_layers disagree")
    for i, kind in enumerate(kinds):
        if kind not in family.kinds:
            reader.fail(f"layer {i} is a {kind} layer ({', '.join(fields)}), which a "
                        f"{family.architecture} does not have",
                        f"its layers are: {', '.join(family.kinds)}")
    moe = hp.get("moe_flags", [False] * hp["depth"])
    if family.layers is not None:
        hp["layers"] = family.layers([k == ATTENTION for k in kinds], moe, period_hints(cfg))
    return Imported(family, cfg, hp, kinds, moe, fields, source)


__all__ = ["Family", "FAMILIES", "Imported", "import_config", "family_of"]
