"""The closed set of IR operations, and the named groups of ops that passes match on."""

from __future__ import annotations

import enum


class Op(enum.Enum):
    # sources
    INPUT = "input"            # a tensor input of the graph (the residual stream x of a block)
    CONST = "const"            # a compile-time constant (number, bool, string, init rule, none)
    PARAM = "param"            # a learnable tensor: param(shape, init=...)
    SHARED = "shared"          # reads a cross-layer shared value by name
    LAYER_INDEX = "layer"      # the index of the layer this block instance runs as
    FIRST = "first"            # 1 at the first token of each sequence, 0 elsewhere
    # arithmetic (elementwise, broadcasting)
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    FLOORDIV = "floordiv"
    MOD = "mod"
    POW = "pow"
    NEG = "neg"
    # comparisons and logic (constants only)
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    AND = "and"
    OR = "or"
    NOT = "not"
    SELECT = "select"          # cond ? a : b with a constant condition
    LIST = "list"              # a list of constants (shapes, split sizes)
    INIT = "init"              # a named init rule applied to constant arguments
    ARANGE = "arange"          # the constant vector 0, 1, ..., n-1 (not learnable)
    # elementwise functions
    SIGMOID = "sigmoid"
    SILU = "silu"
    GELU = "gelu"
    RELU = "relu"
    SOFTPLUS = "softplus"
    TANH = "tanh"
    EXP = "exp"
    LOG = "log"
    LOGSIGMOID = "logsigmoid"
    SQRT = "sqrt"
    ABS = "abs"
    LERP = "lerp"
    # constant-only functions
    CEIL = "ceil"
    FLOOR = "floor"
    ROUND = "round"
    MIN = "min"
    MAX = "max"
    TO_INT = "int"
    TO_FLOAT = "float"
    TO_BF16 = "bfloat16"       # a constant rounded to bfloat16 precision
    # complex numbers
    EXPI = "expi"
    COMPLEX = "complex"
    REAL = "real"
    IMAG = "imag"
    # shape
    SPLIT = "split"
    GETITEM = "getitem"        # picks one output of a multi-output op (split)
    CONCAT = "concat"
    HEADS = "heads"
    FLATTEN = "flatten"
    INDEX = "index"            # t[i] along the first dim
    # reductions / normalisations over a dim
    SOFTMAX = "softmax"
    CUMSUM = "cumsum"
    SUM = "sum"
    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"
    GROUPNORM = "groupnorm"
    L2NORM = "l2norm"
    # learnable layers
    PROJ = "proj"
    CONV1D = "conv1d"
    # mixture of experts
    ROUTE = "route"
    EXPERTS = "experts"
    # the cores: the only ops that mix information across time (with CONV1D)
    SCAN = "scan"
    LINEAR = "linear"
    DELTA = "delta"
    ATTENTION = "attention"
    # graph result
    OUTPUT = "output"

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Op.{self.name}"


BINARY_ARITH = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.FLOORDIV, Op.MOD, Op.POW})
COMPARE = frozenset({Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE})
LOGIC = frozenset({Op.AND, Op.OR, Op.NOT})
ELEMENTWISE_UNARY = frozenset({Op.NEG, Op.SIGMOID, Op.SILU, Op.GELU, Op.RELU, Op.SOFTPLUS,
                               Op.TANH, Op.EXP, Op.LOG, Op.LOGSIGMOID, Op.SQRT, Op.ABS})
CONST_ONLY = frozenset({Op.CEIL, Op.FLOOR, Op.ROUND, Op.MIN, Op.MAX, Op.TO_INT, Op.TO_FLOAT,
                        Op.TO_BF16}) \
    | COMPARE | LOGIC
COMPLEX_OPS = frozenset({Op.EXPI, Op.COMPLEX, Op.REAL, Op.IMAG})
SHAPE_OPS = frozenset({Op.SPLIT, Op.GETITEM, Op.CONCAT, Op.HEADS, Op.FLATTEN, Op.INDEX})
NORMS = frozenset({Op.RMSNORM, Op.LAYERNORM, Op.GROUPNORM, Op.L2NORM})
REDUCTIONS = frozenset({Op.SOFTMAX, Op.CUMSUM, Op.SUM})
CORES = frozenset({Op.SCAN, Op.LINEAR, Op.DELTA, Op.ATTENTION})
#: ops that mix information across time steps; forbidden in channel mixers
TIME_MIXING = CORES | {Op.CONV1D}
#: ops that own learnable weights
PARAMETRIC = frozenset({Op.PARAM, Op.PROJ, Op.CONV1D, Op.RMSNORM, Op.LAYERNORM, Op.GROUPNORM})
SOURCES = frozenset({Op.INPUT, Op.CONST, Op.SHARED, Op.LAYER_INDEX})
#: ops whose result must fold to a compile-time constant
CONST_RESULT = CONST_ONLY | {Op.LIST, Op.INIT}
