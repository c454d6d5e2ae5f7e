"""Readable `.seq` text for an imported config.

Each family has one template, written the way the bundled specs are: the definitions, the
hyper-parameters the config holds as literals (defaults of the model and of each definition), and
the layer pattern in the language's own pattern syntax — `[b] * depth`, `periodic(...)`, a
comprehension over block hyper-parameters, or a Megatron-style `pattern("...")` string when the
layers follow no period.
"""

from __future__ import annotations

from seqdsl.interop.patterns import periodic_flags
from seqdsl.ir.values import show as lit


def _opt(name: str, value, default) -> str:
    """`, name = value` when the value differs from the language's default."""
    return "" if value == default else f", {name} = {lit(value)}"


# ---- layer patterns ------------------------------------------------------------------------------

_CHARS = {(): "M", ("attn",): "*", ("moe",): "E", ("attn", "moe"): "A"}


def _pattern_string(order: list, legend: dict) -> str:
    text = "".join(legend[item][0] for item in order)
    groups = " ".join(text[i:i + 8] for i in range(0, len(text), 8))
    entries = []
    for item in dict.fromkeys(order):
        char, expr = legend[item]
        key = char if char.isalpha() else f'"{char}"'
        entries.append(f"{key} = {expr}")
    return f'pattern("{groups}", {", ".join(entries)})'


def flags_pattern(block: str, flags: dict[str, list[bool]], prefer=()) -> str:
    """One block whose bool hyper-parameters (attn, moe, ...) vary by layer."""
    depth = len(next(iter(flags.values())))
    used = {k: v for k, v in flags.items() if any(v)}
    conds: dict[str, str] = {}
    for k, v in used.items():
        if all(v):
            conds[k] = "true"
            continue
        po = periodic_flags(v, prefer)
        if po is None:
            break
        conds[k] = f"i % {po[0]} == {po[1]}"
    else:
        if not conds:
            return f"[{block}] * depth"
        args = ", ".join(f"{k} = {c}" for k, c in conds.items())
        if all(c == "true" for c in conds.values()):
            return f"[{block}({args})] * depth"
        return f"[{block}({args}) for i in range(depth)]"
    order = [tuple(k for k in used if used[k][i]) for i in range(depth)]
    legend = {}
    spare = iter("BCDFGHIJKLNOPQRSTUVWXYZ")
    for item in dict.fromkeys(order):
        char = _CHARS.get(item) or next(spare)
        expr = block if not item else f"{block}({', '.join(f'{k} = true' for k in item)})"
        legend[item] = (char, expr)
    return _pattern_string(order, legend)


def two_blocks_pattern(base: str, other: str, is_other: list[bool], prefer=()) -> str:
    """Two blocks: `other` where is_other, `base` elsewhere."""
    if not any(is_other):
        return f"[{base}] * depth"
    if all(is_other):
        return f"[{other}] * depth"
    po = periodic_flags(is_other, prefer)
    if po is not None:
        return f"periodic(depth, {base}, {other}, period = {po[0]}, offset = {po[1]})"
    order = [bool(f) for f in is_other]
    return _pattern_string(order, {False: ("M", base), True: ("*", other)})


# ---- templates -------------------------------------------------------------------------------------


def _header(hp: dict) -> str:
    return (f"# Imported by `seqdsl import hf` from a transformers {hp['architecture']} config "
            f"(model_type \"{hp['model_type']}\").\n")


def _dt_init(hp: dict) -> str:
    floor = "" if hp["dt_floor"] == 1e-4 else f", {lit(hp['dt_floor'])}"
    return f"inv_softplus_log_uniform({lit(hp['dt_min'])}, {lit(hp['dt_max'])}{floor})"


def mamba(hp: dict) -> str:
    bias = _opt("bias", hp["bias"], False)
    return _header(hp) + f"""
model mamba(vocab = {hp['vocab']}, d = {hp['d']}, depth = {hp['depth']}) {{
  layers = [mamba_block] * depth
  tie_embeddings = {lit(hp['tie'])}
  final_norm = rmsnorm(eps = {lit(hp['eps'])})
}}

block mamba_block {{ x = x + mamba(rmsnorm(x, eps = {lit(hp['eps'])})) }}

mixer mamba(expand = {hp['expand']}, n = {hp['n']}, conv = {hp['conv']}, rank = {hp['rank']}) {{
  e = expand * d
  u, z = split(proj(x, 2 * e{bias}))
  u = silu(conv1d(u, conv{_opt("bias", hp["conv_bias"], True)}))
  r, B, C = split(proj(u, rank + 2 * n), [rank, n, n])
  dt = softplus(proj(r, e, bias = true, bias_init = {_dt_init(hp)}))
  A = -exp(param([n, e], init = log_arange(1, n)))      # S4D-real
  y = linear(q = C, k = B, v = dt * u, decay = exp(A * dt), scale = 1)
  y = y + param([e], init = ones) * u                    # the D skip connection
  return proj(y * silu(z), d{bias})
}}
"""


def mamba2(hp: dict) -> str:
    g = hp["groups"]
    if g == 1:
        bc = "q = C, k = B"
        norm = f"return proj(rmsnorm_gated_after(flatten(y), z, eps = {lit(hp['eps'])}), d)     # norm(y * silu(z))"
    else:
        bc = "q = heads(C, groups), k = heads(B, groups)"
        norm = (f"y = rmsnorm(heads(flatten(y) * silu(z), groups), eps = {lit(hp['eps'])}, weight = false)"
                f"   # one norm per group\n  return proj(flatten(y) * param([e], init = ones), d)")
    groups_hp = "" if g == 1 else f", groups = {g}"
    gn = "n" if g == 1 else "groups * n"
    return _header(hp) + ('import "std/norms.seq"\n' if g == 1 else "") + f"""
model mamba2(vocab = {hp['vocab']}, d = {hp['d']}, depth = {hp['depth']}) {{
  layers = [mamba2_block] * depth
  tie_embeddings = {lit(hp['tie'])}
  final_norm = rmsnorm(eps = {lit(hp['eps'])})
}}

block mamba2_block {{ x = x + mamba2(rmsnorm(x, eps = {lit(hp['eps'])})) }}

mixer mamba2(expand = {hp['expand']}, n = {hp['n']}, hd = {hp['hd']}, conv = {hp['conv']}{groups_hp}) {{
  e = expand * d
  nh = e // hd
  z = proj(x, e)
  u, B, C = split(silu(conv1d(proj(x, e + 2 * {gn}), conv{_opt("bias", hp["conv_bias"], True)})), [e, {gn}, {gn}])
  dt = softplus(proj(x, nh, bias = true, bias_init = {_dt_init(hp)}))
  A_log = param([nh], init = log_uniform(1, 16))
  D = param([nh], init = ones)
  u = heads(u, nh)
  y = linear({bc}, v = heads(dt, nh) * u, log_decay = -exp(A_log) * dt, scale = 1)
  y = y + heads(D, nh) * u                     # the D skip, one per head
  {norm}
}}
"""


def jamba(hp: dict) -> str:
    eps = lit(hp["eps"])
    moe_line = ("x = x + (moe(h, n_experts = n_experts, top_k = top_k, hidden = hidden, "
                "renormalize = false) if moe\n           else swiglu(h, hidden = hidden))"
                if hp["n_experts"] > 1 else "x = x + swiglu(h, hidden = hidden)")
    experts = (f",\n            n_experts = {hp['n_experts']}, top_k = {hp['top_k']}"
               if hp["n_experts"] > 1 else "")
    block_args = "attn = false, moe = false" if hp["n_experts"] > 1 else "attn = false"
    pb = _opt("bias", hp["bias"], False)
    return _header(hp) + ('import "std/attention.seq"\nimport "std/mlp.seq"\n'
                          + ('import "std/moe.seq"\n' if hp["n_experts"] > 1 else "")) + f"""
model jamba(vocab = {hp['vocab']}, d = {hp['d']}, depth = {hp['depth']}, hidden = {hp['hidden']}, heads = {hp['heads']}, kv_heads = {hp['kv_heads']}{experts}) {{
  layers = {hp['layers']}
  tie_embeddings = {lit(hp['tie'])}
  final_norm = rmsnorm(eps = {eps})
}}

block jamba_layer({block_args}) {{
  h = rmsnorm(x, eps = {eps})
  x = x + (attn(h, heads = heads, kv_heads = kv_heads, rope = false) if attn else jamba_mamba(h))
  h = rmsnorm(x, eps = {eps})
  {moe_line}
}}

# Mamba-1 with Jamba's RMSNorms on the inner dt, B and C.
mixer jamba_mamba(expand = {hp['expand']}, n = {hp['n']}, conv = {hp['conv']}, rank = {hp['rank']}) {{
  e = expand * d
  u, z = split(proj(x, 2 * e{pb}))
  u = silu(conv1d(u, conv{_opt("bias", hp["conv_bias"], True)}))
  r, B, C = split(proj(u, rank + 2 * n), [rank, n, n])
  r = rmsnorm(r, eps = {eps})
  B = rmsnorm(B, eps = {eps})
  C = rmsnorm(C, eps = {eps})
  dt = softplus(proj(r, e, bias = true, bias_init = inv_softplus_log_uniform(0.001, 0.1)))
  A = -exp(param([n, e], init = log_arange(1, n)))      # S4D-real
  y = linear(q = C, k = B, v = dt * u, decay = exp(A * dt), scale = 1)
  y = y + param([e], init = ones) * u                    # the D skip connection
  return proj(y * silu(z), d{pb})
}}
"""


def griffin(hp: dict) -> str:
    norm = f"rmsnorm(x, eps = {lit(hp['eps'])}, offset = 1.0)"     # Gemma's zero-centred scale
    mlp = f"geglu({norm}, hidden = {hp['hidden']}, bias = true, approximate = \"tanh\")"
    kv = "" if hp["kv_heads"] == hp["heads"] else f", kv_heads = {hp['kv_heads']}"
    rope = f", rope_theta = {lit(hp['rope_theta'])}" if hp["rope_theta"] != 10000.0 else ""
    qkv = ", qkv_bias = true" if hp["qkv_bias"] else ""
    hd = "" if hp["hd"] == hp["d"] // hp["heads"] else f", hd = {hp['hd']}"
    return _header(hp) + 'import "std/mlp.seq"\nimport "std/attention.seq"\n' + f"""
model griffin(vocab = {hp['vocab']}, d = {hp['d']}, depth = {hp['depth']}) {{
  layers = {hp['layers']}
  embed_scale = bfloat16(sqrt(d))   # sqrt(d) stored in bf16
  logit_softcap = {lit(hp['softcap'])}
  tie_embeddings = {lit(hp['tie'])}
  final_norm = rmsnorm(eps = {lit(hp['eps'])}, offset = 1.0)
}}

block rec {{
  x = x + rglru({norm})
  x = x + {mlp}
}}

block local(heads = {hp['heads']}, window = {hp['window']}) {{
  h = {norm}
  x = x + attn(h, heads = heads{kv}{hd}, window = window{rope}, rope_dims = {hp['rope_dims']}{qkv}, out_bias = true)
  x = x + {mlp}
}}

mixer rglru(width = {hp['width']}, heads = {hp['heads']}, conv = {hp['conv']}, c = 8.0) {{
  gate = gelu(proj(x, width, bias = true), approximate = "tanh")
  u = conv1d(proj(x, width, bias = true), conv)
  r = sigmoid(proj(u, width, bias = true, groups = heads))   # block-diagonal per head
  i = sigmoid(proj(u, width, bias = true, groups = heads))
  log_a = c * r * logsigmoid(param([width], init = logit_pow_uniform(0.9, 0.999, c)))
  a = exp(log_a)
  h = scan(a = a, b = lerp(sqrt(1 - a * a), 1, first()) * (i * u))
  return proj(h * gate, d, bias = true)
}}
"""


def qwen3_next(hp: dict) -> str:
    eps = lit(hp["eps"])
    norm = f"rmsnorm(x, eps = {eps}, offset = 1.0)"
    moe = hp["n_experts"] > 0 and any(hp["moe_flags"])
    experts = (f", n_experts = {hp['n_experts']},\n"
               f"                 top_k = {hp['top_k']}, expert_hidden = {hp['expert_hidden']}, "
               f"shared_hidden = {hp['shared_hidden']}") if moe else ""
    channel = ("(moe_shared(h) if moe else swiglu(h, hidden = hidden))" if moe
               else "swiglu(h, hidden = hidden)")
    block_args = "attn = false, moe = false" if moe else "attn = false"
    rope = f", rope_theta = {lit(hp['rope_theta'])}" if hp["rope_theta"] != 10000.0 else ""
    text = _header(hp) + 'import "std/mlp.seq"\nimport "std/norms.seq"\n' + f"""
model qwen3_next(vocab = {hp['vocab']}, d = {hp['d']}, depth = {hp['depth']}, hidden = {hp['hidden']}{experts}) {{
  layers = {hp['layers']}
  tie_embeddings = {lit(hp['tie'])}
  final_norm = rmsnorm(eps = {eps}, offset = 1.0)
}}

block qwen3_next_layer({block_args}) {{
  h = {norm}
  x = x + (gated_attn(h) if attn else gated_deltanet(h))
  h = {norm}
  x = x + {channel}
}}

# Softmax attention with a sigmoid output gate (one gate per head and channel, from the query
# projection), zero-centred RMSNorms on each head of q and k, and rotary on part of each head.
mixer gated_attn(heads = {hp['heads']}, kv_heads = {hp['kv_heads']}, hd = {hp['hd']}, rope_dims = {hp['rope_dims']}) {{
  q, gate = split(heads(proj(x, 2 * heads * hd), heads))     # per head: [query, gate]
  q = rmsnorm(q, eps = {eps}, offset = 1.0)
  k = rmsnorm(heads(proj(x, kv_heads * hd), kv_heads), eps = {eps}, offset = 1.0)
  v = heads(proj(x, kv_heads * hd), kv_heads)
  o = attention(q = q, k = k, v = v, rope = true{rope}, rope_dims = rope_dims)
  return proj(o * sigmoid(gate), d)
}}

# Gated DeltaNet: one short conv over [q, k, v], L2-normalised q and k (each key head serves
# value_heads / key_heads value heads), a Mamba-2 gate, output RMSNorm(o) * silu(z).
mixer gated_deltanet(key_heads = {hp['key_heads']}, value_heads = {hp['value_heads']}, key_dim = {hp['key_dim']}, value_dim = {hp['value_dim']}, conv = {hp['conv']}) {{
  dk = key_heads * key_dim
  dv = value_heads * value_dim
  q, k, v = split(silu(conv1d(proj(x, 2 * dk + dv), conv, bias = false)), [dk, dk, dv])
  q = l2norm(heads(q, key_heads))
  k = l2norm(heads(k, key_heads))
  z = heads(proj(x, dv), value_heads)
  beta = sigmoid(proj(x, value_heads))
  dt = softplus(proj(x, value_heads, bias = true, bias_init = ones))
  A_log = param([value_heads], init = log_uniform(0.01, 16))
  y = delta(q = q, k = k, v = heads(v, value_heads), beta = beta, log_decay = -exp(A_log) * dt)
  return proj(gated_rmsnorm(y, z, eps = {eps}), d)
}}
"""
    if moe:
        text += f"""
# Top-k routed SwiGLU experts plus a shared SwiGLU expert behind a sigmoid gate.
channel moe_shared {{
  router = proj(x, n_experts)
  routed = experts(swiglu(x, hidden = expert_hidden), route(router, top_k, normalize = {lit(hp['norm_topk'])}))
  shared_gate = sigmoid(proj(x, 1))
  return routed + shared_gate * swiglu(x, hidden = shared_hidden)
}}
"""
    return text


__all__ = ["lit", "flags_pattern", "two_blocks_pattern", "mamba", "mamba2", "jamba", "griffin",
           "qwen3_next"]
