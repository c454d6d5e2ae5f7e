"""The built-in functions of the language, their signatures, and the named init rules.

One table drives name resolution (arity, keyword names, "valid arguments are ..." hints), the IR
builder (which op a call becomes) and the language reference in docs/language.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from seqdsl.ir.ops import Op

REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str = "tensor"  # "tensor" (a tensor or a number), "const" (compile-time constant)
    default: object = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Builtin:
    name: str
    op: Op
    args: tuple[Arg, ...]
    doc: str
    variadic: bool = False     # extra positional arguments allowed (concat, min, max)
    category: str = "function"  # "function" | "core" | "const" | "pattern" | "layer"

    def arg(self, name: str) -> Arg | None:
        for a in self.args:
            if a.name == name:
                return a
        return None

    def signature(self) -> str:
        parts = []
        for a in self.args:
            if a.required:
                parts.append(a.name)
            else:
                d = a.default
                text = ("none" if d is None else str(d).lower() if isinstance(d, bool)
                        else f'"{d}"' if isinstance(d, str) else str(d))
                parts.append(f"{a.name}={text}")
        if self.variadic:
            parts.append("...")
        return f"{self.name}({', '.join(parts)})"


def _t(name, default=REQUIRED):
    return Arg(name, "tensor", default)


def _c(name, default=REQUIRED):
    return Arg(name, "const", default)


_UNARY_DOCS = {
    Op.SIGMOID: "logistic sigmoid", Op.SILU: "x * sigmoid(x)", Op.GELU: "GeLU",
    Op.RELU: "max(x, 0)", Op.SOFTPLUS: "log(1 + exp(x))", Op.TANH: "hyperbolic tangent",
    Op.EXP: "exponential", Op.LOG: "natural logarithm", Op.LOGSIGMOID: "log(sigmoid(x))",
    Op.SQRT: "square root", Op.ABS: "absolute value (modulus of a complex value)",
}

_TABLE: list[Builtin] = [
    *(Builtin(op.value, op, (_t("x"),), doc) for op, doc in _UNARY_DOCS.items()
      if op is not Op.GELU),
    Builtin("gelu", Op.GELU, (_t("x"), _c("approximate", "none")),
            'GeLU: exact (erf), or approximate = "tanh"'),
    # constant-only helpers (hyper-parameter arithmetic)
    Builtin("ceil", Op.CEIL, (_c("x"),), "round up to an integer", category="const"),
    Builtin("floor", Op.FLOOR, (_c("x"),), "round down to an integer", category="const"),
    Builtin("round", Op.ROUND, (_c("x"),), "round to the nearest integer", category="const"),
    Builtin("int", Op.TO_INT, (_c("x"),), "convert to an integer", category="const"),
    Builtin("float", Op.TO_FLOAT, (_c("x"),), "convert to a float", category="const"),
    Builtin("bfloat16", Op.TO_BF16, (_c("x"),),
            "a number rounded to bfloat16 precision (to match constants stored in bf16)",
            category="const"),
    Builtin("first", Op.FIRST, (), "1 at the first token of each sequence, 0 elsewhere "
            "(0 everywhere when continuing from a state)"),
    Builtin("min", Op.MIN, (_c("a"), _c("b")), "smallest argument", variadic=True,
            category="const"),
    Builtin("max", Op.MAX, (_c("a"), _c("b")), "largest argument", variadic=True,
            category="const"),
    # complex numbers
    Builtin("expi", Op.EXPI, (_t("theta"),), "exp(i * theta): a unit complex number"),
    Builtin("complex", Op.COMPLEX, (_t("re"), _t("im")), "re + i * im"),
    Builtin("real", Op.REAL, (_t("z"),), "real part"),
    Builtin("imag", Op.IMAG, (_t("z"),), "imaginary part"),
    # shape
    Builtin("split", Op.SPLIT, (_t("x"), _c("parts", 2)),
            "split the last dim into `parts` equal pieces, or pieces of the listed sizes"),
    Builtin("concat", Op.CONCAT, (_t("a"), _t("b")), "concatenate along the last dim",
            variadic=True),
    Builtin("heads", Op.HEADS, (_t("x"), _c("heads"), _c("steps", None)),
            "reshape the last dim [n] into [heads, n / heads], or [steps, heads, n / (steps * heads)]"),
    Builtin("arange", Op.ARANGE, (_c("n"),), "the fixed vector [0, 1, ..., n-1] (per-head constants)"),
    Builtin("lerp", Op.LERP, (_t("a"), _t("b"), _t("w")), "a + (b - a) * w; stays between a and b for w in [0, 1]"),
    Builtin("flatten", Op.FLATTEN, (_t("x"),), "merge all dims into one"),
    # reductions and normalisations
    Builtin("softmax", Op.SOFTMAX, (_t("x"), _c("dim", -1)), "softmax along a dim"),
    Builtin("cumsum", Op.CUMSUM, (_t("x"), _c("dim", -1)), "cumulative sum along a dim"),
    Builtin("sum", Op.SUM, (_t("x"), _c("dim", -1)), "sum along a dim (the dim is removed)"),
    Builtin("rmsnorm", Op.RMSNORM, (_t("x"), _c("eps", 1e-6), _c("weight", True),
                                    _c("offset", 0.0)),
            "RMS norm over the last dim, learnable scale of the last dim's size (the scale is "
            "offset + weight: offset = 1 stores a zero-centred weight)", category="layer"),
    Builtin("layernorm", Op.LAYERNORM, (_t("x"), _c("eps", 1e-5), _c("weight", True),
                                        _c("bias", True)),
            "layer norm over the last dim", category="layer"),
    Builtin("groupnorm", Op.GROUPNORM, (_t("x"), _c("eps", 1e-5), _c("weight", True)),
            "normalise each head (the last dim) separately; scale over all dims", category="layer"),
    Builtin("l2norm", Op.L2NORM, (_t("x"), _c("eps", 1e-6)), "x / ||x|| over the last dim"),
    # learnable layers
    Builtin("proj", Op.PROJ, (_t("x"), _c("size"), _c("bias", False), _c("init", None),
                              _c("bias_init", None), _c("groups", 1)),
            "linear projection of the flattened input to `size` features "
            "(block-diagonal with `groups` > 1)", category="layer"),
    Builtin("conv1d", Op.CONV1D, (_t("x"), _c("width"), _c("bias", True), _c("init", None)),
            "short causal depthwise convolution over time", category="layer"),
    Builtin("param", Op.PARAM, (_c("shape"), _c("init")),
            "a learnable tensor of the given shape, initialised by a named rule", category="layer"),
    # mixture of experts
    Builtin("route", Op.ROUTE, (_t("logits"), _c("top_k"), _c("normalize", True)),
            "top-k routing weights, zero outside the k largest logits: a softmax over those k "
            "(normalize = true), or the softmax over all experts kept at the top k (false)"),
    Builtin("experts", Op.EXPERTS, (_t("expert"), _t("weights")),
            "sum over experts of weights[e] * expert_e(...): `expert` is a call to a channel "
            "mixer or fn, instantiated once per expert (len(weights) copies)"),
    # the cores
    Builtin("scan", Op.SCAN, (_t("a"), _t("b"), _c("state_dtype", "float32")),
            "h_t = a_t * h_{t-1} + b_t, elementwise (real or complex); returns h",
            category="core"),
    Builtin("linear", Op.LINEAR, (_t("q"), _t("k"), _t("v"), _t("decay", None),
                                  _t("log_decay", None), _c("scale", None),
                                  _c("state_dtype", "float32")),
            "S_t = decay_t * S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t", category="core"),
    Builtin("delta", Op.DELTA, (_t("q"), _t("k"), _t("v"), _t("beta"), _t("decay", None),
                                _t("log_decay", None), _c("steps", 1), _c("scale", None),
                                _c("state_dtype", "float32")),
            "S_t = decay_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, `steps` "
            "Householder sub-steps per token", category="core"),
    Builtin("attention", Op.ATTENTION, (_t("q"), _t("k"), _t("v"), _c("window", None),
                                        _c("rope", False), _c("rope_theta", 10000.0),
                                        _c("scale", None), _c("softcap", None),
                                        _c("rope_dims", None)),
            "causal softmax attention, optional sliding window, GQA/MQA, RoPE (on the first "
            "rope_dims dims of each head, all by default)", category="core"),
]

BUILTINS: dict[str, Builtin] = {b.name: b for b in _TABLE}

#: functions only usable in the model's `layers = ...` pattern expression
PATTERN_FUNCTIONS = {
    "range": "range(n): 0, 1, ..., n-1 (for comprehensions)",
    "pattern": 'pattern("MM*", M = block_a, "*" = block_b): a Megatron-style string with a legend',
    "periodic": "periodic(n, base, other, period = p, offset = o): n layers, `other` where "
                "i % p == o, `base` elsewhere",
}

#: names with a fixed meaning inside definitions
RESERVED_NAMES = {"layer": "the index of the current layer (0-based)"}


@dataclass(frozen=True)
class InitSpec:
    name: str
    args: tuple[Arg, ...]
    doc: str


INIT_RULES: dict[str, InitSpec] = {r.name: r for r in [
    InitSpec("zeros", (), "all zeros"),
    InitSpec("ones", (), "all ones"),
    InitSpec("constant", (_c("value"),), "every entry = value"),
    InitSpec("normal", (_c("std", 0.02),), "N(0, std^2)"),
    InitSpec("uniform", (_c("low"), _c("high")), "U(low, high)"),
    InitSpec("xavier", (_c("gain", 1.0),), "Xavier/Glorot uniform with gain"),
    InitSpec("default", (), "PyTorch's default for the layer (kaiming uniform)"),
    InitSpec("log_arange", (_c("low"), _c("high")),
             "log of low..high evenly spaced along the first dim (S4D-real A_log)"),
    InitSpec("log_uniform", (_c("low"), _c("high")), "log of U(low, high)"),
    InitSpec("inv_softplus_log_uniform", (_c("low"), _c("high"), _c("floor", 1e-4)),
             "softplus^-1(dt), dt ~ logU[low, high] clamped below at floor (Mamba's dt bias)"),
    InitSpec("logit_pow_uniform", (_c("low"), _c("high"), _c("power", 1.0)),
             "z with sigmoid(z)^power ~ U(low, high) (RG-LRU's decay)"),
    InitSpec("decay_range", (_c("low"), _c("high")),
             "1 - 2^-(low..high) evenly spaced along the first dim, in log space (RetNet)"),
]}


@dataclass(frozen=True)
class InitRule:
    """A named init rule with its arguments bound (a compile-time constant value)."""

    name: str
    args: tuple[tuple[str, object], ...]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.args)
        return f"{self.name}({inner})"
