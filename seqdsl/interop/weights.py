"""Weight conversion between transformers checkpoints and models compiled from imported specs.

Each family is a table of :class:`Rule` s: which of our parameters (names as the generated code
spells them, relative to a layer) come from which of theirs, with a layout transform and its
exact inverse — fused projections split by rows, conv weights, transposed or negated log
parameters, fused expert tensors. Every parameter on both sides must be covered: an unmapped
name is an error, never skipped. Transforms only move, slice, concatenate, reshape or negate
values, so ``export(convert(sd)) == sd`` bit for bit.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from seqdsl.diagnostics import Span, error
from seqdsl.interop.hf_config import Imported, import_config
from seqdsl.interop.patterns import ATTENTION


def _same(*xs):
    return xs


@dataclass(frozen=True)
class Rule:
    """ours <- to_ours(*theirs); theirs <- to_theirs(*ours). Names are relative to a prefix."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Callable[..., tuple] = _same
    to_theirs: Callable[..., tuple] = _same
    optional: bool = False  # theirs may be absent (a tied head a checkpoint leaves out)
    #: rules read instead when theirs are absent: the same weights in another on-disk layout
    #: (transformers fuses experts in memory, its checkpoints keep one tensor per expert)
    alternative: tuple["Rule", ...] = ()

    def at(self, ours_prefix: str, theirs_prefix: str) -> "Rule":
        return Rule(tuple(ours_prefix + n for n in self.ours),
                    tuple(theirs_prefix + n for n in self.theirs),
                    self.to_ours, self.to_theirs, self.optional,
                    tuple(r.at(ours_prefix, theirs_prefix) for r in self.alternative))


def same(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,))


def mapped(ours: str, theirs: str, to_ours, to_theirs) -> Rule:
    return Rule((ours,), (theirs,), lambda t: (to_ours(t),), lambda t: (to_theirs(t),))


def weight_bias(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    out = [same(f"{ours}.weight", f"{theirs}.weight")]
    return out + ([same(f"{ours}.bias", f"{theirs}.bias")] if bias else [])


def rows(theirs: str, ours: list[str], sizes: list[int]) -> Rule:
    """One fused matrix of theirs = our matrices stacked by rows."""
    return Rule(tuple(ours), (theirs,), lambda t: tuple(torch.split(t, sizes, dim=0)),
                lambda *ts: (torch.cat(ts, dim=0),))


def grouped_rows(theirs: str, ours: list[str], groups: int, sizes: list[int]) -> Rule:
    """Theirs interleaves per group: rows [g0: part0 part1 ..., g1: part0 part1 ...]; ours keep
    each part whole: [part0 of g0, g1, ...], [part1 of g0, g1, ...]."""

    def to_ours(t):
        parts = torch.split(t.reshape(groups, sum(sizes), *t.shape[1:]), sizes, dim=1)
        return tuple(p.reshape(groups * p.shape[1], *t.shape[1:]) for p in parts)

    def to_theirs(*ts):
        parts = [p.reshape(groups, p.shape[0] // groups, *p.shape[1:]) for p in ts]
        joined = torch.cat(parts, dim=1)
        return (joined.reshape(groups * joined.shape[1], *joined.shape[2:]),)

    return Rule(tuple(ours), (theirs,), to_ours, to_theirs)


def fused_experts(gate_up: str, down: str, ours: str, n: int, hidden: int) -> Rule:
    """[E, 2 * hidden, d] gate/up and [E, d, hidden] down tensors = one SwiGLU per expert."""
    names = [f"{ours}.experts.{e}.{p}.weight" for e in range(n) for p in ("proj", "proj_2", "out")]

    def to_ours(gu, dn):
        out = []
        for e in range(n):
            out += [gu[e, :hidden], gu[e, hidden:], dn[e]]
        return tuple(out)

    def to_theirs(*ts):
        gu = torch.stack([torch.cat([ts[3 * e], ts[3 * e + 1]], dim=0) for e in range(n)])
        dn = torch.stack([ts[3 * e + 2] for e in range(n)])
        return gu, dn

    base = gate_up.rsplit(".", 1)[0]  # ...experts
    per_expert = tuple(same(f"{ours}.experts.{e}.{o}.weight", f"{base}.{e}.{t}.weight")
                       for e in range(n) for o, t in (("proj", "gate_proj"), ("proj_2", "up_proj"),
                                                      ("out", "down_proj")))
    return Rule(tuple(names), (gate_up, down), to_ours, to_theirs, alternative=per_expert)


def swiglu(ours: str, gate: str, up: str, down: str) -> list[Rule]:
    return [same(f"{ours}.proj.weight", gate), same(f"{ours}.proj_2.weight", up),
            same(f"{ours}.out.weight", down)]


def tied_head(tie: bool, head: str = "lm_head.weight") -> list[Rule]:
    if not tie:
        return [same("head.weight", head)]
    # a tied head is the embedding: nothing of ours to load; exported again as a copy
    return [Rule((), (head,), lambda t: (), None, optional=True)]


# ---- the families --------------------------------------------------------------------------------


def _mamba_mixer(ours: str, hp: dict) -> list[Rule]:
    m = ours
    bias = hp.get("bias", False)
    out = [*weight_bias(f"{m}.u_z_proj", "in_proj", bias),
           *weight_bias(f"{m}.u_conv1d", "conv1d", hp["conv_bias"]),
           same(f"{m}.r_B_C_proj.weight", "x_proj.weight"),
           *weight_bias(f"{m}.dt_proj", "dt_proj"),
           mapped(f"{m}.A_weight", "A_log", lambda a: a.t(), lambda a: a.t()),  # [E, N] <-> [N, E]
           same(f"{m}.y_weight", "D"),
           *weight_bias(f"{m}.out", "out_proj", bias)]
    return out


def _mamba(imp: Imported):
    hp = imp.hp
    top = [same("embed.weight", "backbone.embeddings.weight"),
           same("norm.rmsnorm.weight", "backbone.norm_f.weight"), *tied_head(hp["tie"])]
    layer = [same("rmsnorm.weight", "norm.weight"),
             *[r.at("", "mixer.") for r in _mamba_mixer("mamba", hp)]]
    return top, [("backbone.layers.{i}.", layer)] * hp["depth"]


def _mamba2(imp: Imported):
    hp = imp.hp
    e = hp["expand"] * hp["d"]
    nh, gn = e // hp["hd"], hp["groups"] * hp["n"]
    m = "mamba2"
    norm = (f"{m}.rmsnorm_gated_after.out.weight" if hp["groups"] == 1 else f"{m}.weight")
    layer = [same("rmsnorm.weight", "norm.weight"),
             rows("mixer.in_proj.weight", [f"{m}.z.weight", f"{m}.u_B_C_proj.weight",
                                           f"{m}.dt_proj.weight"], [e, e + 2 * gn, nh]),
             same(f"{m}.dt_proj.bias", "mixer.dt_bias"),
             *weight_bias(f"{m}.u_B_C_conv1d", "mixer.conv1d", hp["conv_bias"]),
             same(f"{m}.A_log", "mixer.A_log"), same(f"{m}.D", "mixer.D"),
             same(norm, "mixer.norm.weight"), same(f"{m}.out.weight", "mixer.out_proj.weight")]
    top = [same("embed.weight", "backbone.embeddings.weight"),
           same("norm.rmsnorm.weight", "backbone.norm_f.weight"), *tied_head(hp["tie"])]
    return top, [("backbone.layers.{i}.", layer)] * hp["depth"]


def _jamba(imp: Imported):
    hp = imp.hp
    top = [same("embed.weight", "model.embed_tokens.weight"),
           same("norm.rmsnorm.weight", "model.final_layernorm.weight"), *tied_head(hp["tie"])]
    mamba = [r.at("", "mamba.") for r in _mamba_mixer("jamba_mamba", hp)] + [
        same("jamba_mamba.r.weight", "mamba.dt_layernorm.weight"),
        same("jamba_mamba.B.weight", "mamba.b_layernorm.weight"),
        same("jamba_mamba.C.weight", "mamba.c_layernorm.weight")]
    attn = [same(f"attn.{o}.weight", f"self_attn.{t}.weight")
            for o, t in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                         ("out", "o_proj"))]
    moe = [same("moe.router.weight", "feed_forward.router.weight"),
           fused_experts("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj",
                         "moe", hp["n_experts"], hp["hidden"])]
    mlp = swiglu("swiglu", "feed_forward.gate_proj.weight", "feed_forward.up_proj.weight",
                 "feed_forward.down_proj.weight")
    norms = [same("h.weight", "input_layernorm.weight"), same("h_2.weight", "pre_ff_layernorm.weight")]
    layers = [("model.layers.{i}.", norms + (attn if kind == ATTENTION else mamba) + (moe if m else mlp))
              for kind, m in zip(imp.kinds, imp.moe)]
    return top, layers


def _griffin(imp: Imported):
    hp = imp.hp
    top = [same("embed.weight", "model.embed_tokens.weight"),
           same("norm.rmsnorm.weight", "model.final_norm.weight"), *tied_head(hp["tie"])]
    mlp = [r for o, t in (("gate_proj", "gate_proj"), ("proj", "up_proj"), ("out", "down_proj"))
           for r in weight_bias(f"geglu.{o}", f"mlp_block.{t}")]
    heads, width = hp["heads"], hp["width"]
    rec = [same("rmsnorm.weight", "temporal_pre_norm.weight"),
           same("rmsnorm_2.weight", "channel_pre_norm.weight"),
           *weight_bias("rglru.gate_proj", "temporal_block.linear_y"),
           *weight_bias("rglru.u_proj", "temporal_block.linear_x"),
           *weight_bias("rglru.u", "temporal_block.conv_1d"),
           *weight_bias("rglru.out", "temporal_block.linear_out"),
           # a = sigmoid(L)^(c r) here, exp(-c r softplus(p)) there: L = -p
           mapped("rglru.log_a_weight", "temporal_block.rg_lru.recurrent_param",
                  torch.neg, torch.neg)]
    for o, t in (("r_proj", "recurrent_gate"), ("i_proj", "input_gate")):
        rec += [same(f"rglru.{o}.weight", f"temporal_block.rg_lru.{t}_weight"),
                mapped(f"rglru.{o}.bias", f"temporal_block.rg_lru.{t}_bias",
                       lambda b: b.flatten(), lambda b: b.reshape(heads, width // heads))]
    attn = [same("h.weight", "temporal_pre_norm.weight"),
            same("rmsnorm.weight", "channel_pre_norm.weight"),
            *[r for n in ("q_proj", "k_proj", "v_proj")
              for r in weight_bias(f"attn.{n}", f"temporal_block.{n}", hp["qkv_bias"])],
            *weight_bias("attn.out", "temporal_block.o_proj")]
    layers = [("model.layers.{i}.", (attn if kind == ATTENTION else rec) + mlp) for kind in imp.kinds]
    return top, layers


def _qwen3_next(imp: Imported):
    hp = imp.hp
    top = [same("embed.weight", "model.embed_tokens.weight"),
           same("norm.rmsnorm.weight", "model.norm.weight"), *tied_head(hp["tie"])]
    kh, vh, kd, vd = hp["key_heads"], hp["value_heads"], hp["key_dim"], hp["value_dim"]
    per = vh // kh  # value heads per key head
    g = "gated_deltanet"
    # transformers fuses [q, k, v, z] and [b, a] per key head; ours keep q|k|v and z apart
    qkvz = grouped_rows("linear_attn.in_proj_qkvz.weight",
                        [f"{g}.q.weight", f"{g}.k.weight", f"{g}.v.weight", f"{g}.z_proj.weight"],
                        kh, [kd, kd, per * vd, per * vd])
    qkv = Rule((f"{g}.q_k_v_proj.weight", f"{g}.z_proj.weight"), qkvz.theirs,
               lambda t: (lambda q, k, v, z: (torch.cat([q, k, v]), z))(*qkvz.to_ours(t)),
               lambda qkv_w, z: qkvz.to_theirs(*torch.split(qkv_w, [kh * kd, kh * kd, vh * vd]), z))
    linear = [qkv,
              grouped_rows("linear_attn.in_proj_ba.weight",
                           [f"{g}.beta_proj.weight", f"{g}.dt_proj.weight"], kh, [per, per]),
              same(f"{g}.dt_proj.bias", "linear_attn.dt_bias"),
              same(f"{g}.A_log", "linear_attn.A_log"),
              same(f"{g}.q_k_v_conv1d.weight", "linear_attn.conv1d.weight"),
              same(f"{g}.gated_rmsnorm.rmsnorm.weight", "linear_attn.norm.weight"),
              same(f"{g}.out.weight", "linear_attn.out_proj.weight")]
    attn = [same("gated_attn.q_gate_proj.weight", "self_attn.q_proj.weight"),
            same("gated_attn.q.weight", "self_attn.q_norm.weight"),
            same("gated_attn.k_proj.weight", "self_attn.k_proj.weight"),
            same("gated_attn.k.weight", "self_attn.k_norm.weight"),
            same("gated_attn.v_proj.weight", "self_attn.v_proj.weight"),
            same("gated_attn.out.weight", "self_attn.o_proj.weight")]
    moe = [same("moe_shared.router.weight", "mlp.gate.weight"),
           fused_experts("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "moe_shared",
                         hp["n_experts"], hp["expert_hidden"]),
           same("moe_shared.shared_gate_proj.weight", "mlp.shared_expert_gate.weight"),
           *swiglu("moe_shared.swiglu", "mlp.shared_expert.gate_proj.weight",
                   "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight")]
    mlp = swiglu("swiglu", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
    norms = [same("h.weight", "input_layernorm.weight"),
             same("h_2.weight", "post_attention_layernorm.weight")]
    layers = [("model.layers.{i}.", norms + (attn if kind == ATTENTION else linear) + (moe if m else mlp))
              for kind, m in zip(imp.kinds, imp.moe)]
    return top, layers


TABLES: dict[str, Callable] = {"mamba": _mamba, "mamba2": _mamba2, "jamba": _jamba,
                               "griffin": _griffin, "qwen3_next": _qwen3_next}


def rules(imp: Imported) -> list[Rule]:
    """Every rule of a model, with full names."""
    top, layers = TABLES[imp.family.name](imp)
    out = list(top)
    for i, (theirs_prefix, layer) in enumerate(layers):
        out += [r.at(f"layers.{i}.", theirs_prefix.format(i=i)) for r in layer]
    return out


# ---- conversion -----------------------------------------------------------------------------------


def _fail(message: str, hint: str | None = None, where: str = "<weights>"):
    raise error(Span(where, 0, 0, 0, 0), message, hint)


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def convert_state_dict(imported: Imported, theirs: dict[str, torch.Tensor],
                       source: str = "<weights>") -> dict[str, torch.Tensor]:
    """A transformers state dict → ours. Every tensor of theirs must be used (``source`` names
    the checkpoint in errors)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules(imported):
        if not all(n in theirs for n in rule.theirs):
            alt = rule.alternative
            if alt and all(n in theirs for r in alt for n in r.theirs):
                for r in alt:
                    out.update(zip(r.ours, r.to_ours(*(theirs[n] for n in r.theirs))))
                    used.update(r.theirs)
            elif not rule.optional:
                missing += [n for n in rule.theirs if n not in theirs]
            continue
        values = rule.to_ours(*(theirs[n] for n in rule.theirs))
        out.update(zip(rule.ours, values))
        used.update(rule.theirs)
    if missing:
        _fail(f"the checkpoint lacks {len(missing)} tensor(s) the {imported.family.architecture} "
              f"config implies: {_listing(missing)}", where=source)
    extra = set(theirs) - used
    if extra:
        _fail(f"{len(extra)} tensor(s) of the checkpoint are not mapped: {_listing(extra)}",
              "the config and the checkpoint disagree, or the family table misses them", source)
    return out


def export_state_dict(imported: Imported, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → the transformers layout (the exact inverse of convert_state_dict)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in rules(imported):
        if rule.to_theirs is None:  # a tied head: a copy of the embedding
            out[rule.theirs[0]] = ours["embed.weight"]
            continue
        missing = [n for n in rule.ours if n not in ours]
        if missing:
            _fail(f"the model lacks {_listing(missing)}, which the "
                  f"{imported.family.architecture} layout needs")
        out.update(zip(rule.theirs, rule.to_theirs(*(ours[n] for n in rule.ours))))
        used.update(rule.ours)
    extra = set(ours) - used
    if extra:
        _fail(f"{len(extra)} parameter(s) of the model are not mapped: {_listing(extra)}")
    return {k: v.contiguous() for k, v in out.items()}


# ---- checkpoints on disk -------------------------------------------------------------------------


def read_checkpoint(folder) -> dict[str, torch.Tensor]:
    """The tensors of a transformers checkpoint folder: model.safetensors (read with the
    `safetensors` package, when it is installed) or pytorch_model.bin, each maybe sharded
    (``*.index.json``)."""
    import json

    folder = Path(folder)
    where = Span(str(folder), 0, 0, 0, 0)
    if not folder.is_dir():
        raise error(where, "not a folder", "--weights takes the folder save_pretrained wrote")

    def load_safetensors(path: Path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise error(Span(str(path), 0, 0, 0, 0), "reading .safetensors needs the "
                        "'safetensors' package", "pip install seqdsl[interop]") from None
        return load_file(str(path))

    def load_bin(path: Path):
        return torch.load(str(path), map_location="cpu", weights_only=True)

    for name, loader in (("model.safetensors", load_safetensors), ("pytorch_model.bin", load_bin)):
        if (folder / name).is_file():
            return dict(loader(folder / name))
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(loader(folder / shard))
            return out
    raise error(where, "no checkpoint found: looked for model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin and pytorch_model.bin.index.json")


# ---- entry points ---------------------------------------------------------------------------------


def _source(source, config):
    """(state dict, config) from a transformers model, or a state dict plus a config."""
    if isinstance(source, torch.nn.Module):
        sd = source.state_dict()
        if config is None:
            config = getattr(source, "config", None)
        return sd, config
    if isinstance(source, dict):
        return source, config
    raise TypeError(f"load_hf: expected a transformers model or a state dict, got {type(source).__name__}")


def _target(target, imported: Imported) -> torch.nn.Module:
    import seqdsl

    if target is None:
        target = seqdsl.compile(f"{imported.name}.seq", text=imported.spec_text)
    if isinstance(target, (str, Path)):
        text = str(target)
        target = (seqdsl.compile(f"{imported.name}.seq", text=text) if "\n" in text
                  else seqdsl.compile(target))
    if isinstance(target, types.ModuleType):
        target = target.Model()
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"load_hf: expected a spec, a compiled module or a model, got "
                        f"{type(target).__name__}")
    return target


def load_hf(target, source, config=None) -> torch.nn.Module:
    """Load a transformers checkpoint into a seqdsl model and return the model.

    target: a seqdsl model, a compiled module (``seqdsl.compile(...)``), a spec path or text, or
    None (the spec imported from the config). source: a transformers model, or a state dict with
    its ``config`` (dict, config.json path or config object). Loading is strict both ways.
    """
    sd, config = _source(source, config)
    if config is None:
        raise TypeError("load_hf: a state dict needs its config (config=...)")
    imported = config if isinstance(config, Imported) else import_config(config)
    model = _target(target, imported)
    ours = convert_state_dict(imported, sd)
    params = model.state_dict()
    for name, value in ours.items():
        if name in params and params[name].shape != value.shape:
            _fail(f"{name}: the checkpoint gives shape {tuple(value.shape)}, the model has "
                  f"{tuple(params[name].shape)}", "the spec and the config disagree")
    model.load_state_dict(ours, strict=True)
    return model


def export_hf(source, config) -> dict[str, torch.Tensor]:
    """A seqdsl model's (or state dict's) weights in the transformers layout of ``config``."""
    imported = config if isinstance(config, Imported) else import_config(config)
    ours = source.state_dict() if isinstance(source, torch.nn.Module) else source
    return export_state_dict(imported, ours)


__all__ = ["Rule", "rules", "convert_state_dict", "export_state_dict", "load_hf", "export_hf",
           "read_checkpoint"]
