"""Malformed specs: every user mistake is a SpecError at the right line:col, with a clear message.

Each case is a small spec (or a few files) written to a temporary directory and compiled with
``seqdsl.load(..., verify=True)``. The first diagnostic's file, line, column, message and hint are
checked exactly (``partial=True`` checks a distinctive part of the message instead).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import seqdsl
from seqdsl import SpecError


def spec(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@dataclass(frozen=True)
class Case:
    src: str | dict[str, str | bytes]  # main.seq's text, or {file name: text}, main.seq the entry
    line: int
    col: int
    message: str
    hint: str | None = None  # exact hint; None means the diagnostic has no hint
    file: str = "main.seq"   # the file the first diagnostic points into
    partial: bool = False    # `message` is a distinctive part of the message, not all of it
    overrides: dict = field(default_factory=dict)


def compile_files(tmp_path, monkeypatch, src, **overrides):
    """Write the files into tmp_path and compile main.seq from there (paths read 'main.seq')."""
    files = src if isinstance(src, dict) else {"main.seq": src}
    for name, text in files.items():
        if isinstance(text, bytes):
            (tmp_path / name).write_bytes(text)
        else:
            (tmp_path / name).write_text(spec(text))
    monkeypatch.chdir(tmp_path)
    return seqdsl.load("main.seq", verify=True, **overrides)


HEADER = """\
model m(vocab = 100, d = 16) {
  layers = [b] * 2
}
"""  # lines 1-3 of most cases


CASES = {
    # ---- syntax -------------------------------------------------------------------------------
    "syntax-unclosed-paren": Case(HEADER + spec("""
        block b {
          x = x + f(rmsnorm(x)
        }
        mixer f { return proj(x, d) }
        """), 6, 1, "unexpected '}'; expected ')', ','",
        "the '(' at line 5, column 12 is not closed"),
    "syntax-unclosed-bracket": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b, b
        }
        block b { x = x + proj(x, d) }
        """), 3, 1, "unexpected '}'; expected ',', ']'",
        "the '[' at line 2, column 12 is not closed"),
    "syntax-unclosed-brace": Case(HEADER + spec("""
        block b {
          x = x + f(rmsnorm(x))
        """), 5, 24, "unexpected end of file; expected 'return', 'shared', '}', a name",
        "the '{' at line 4, column 9 is not closed"),
    "syntax-stray-token": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b] * 2 )
        }
        block b { x = x + proj(x, d) }
        """), 2, 20, "unexpected ')'; expected ';', '}'"),
    "syntax-single-quoted-string": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(act = 'gelu') { return proj(x, d) }
        """), 5, 15, "unexpected character \"'\"", "strings use double quotes"),
    "syntax-unterminated-string": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(act = "gelu) { return proj(x, d) }
        """), 5, 15, "unexpected character '\"'", "the string is not closed on this line"),
    "syntax-assign-instead-of-compare": Case(spec("""
        model m(vocab = 100, d = 16, depth = 4) {
          layers = [a if i % 2 = 0 else b for i in range(depth)]
        }
        block a { x = x + proj(x, d) }
        block b { x = x + proj(x, d) }
        """), 2, 24, "unexpected '='; expected", "use '==' to compare; '=' only assigns or "
        "names a keyword argument", partial=True),
    "syntax-missing-operand": Case(HEADER + spec("""
        block b {
          x = x +
        }
        """), 5, 10, "unexpected end of line; expected '(', '+' or '-', '[', 'false', "
        "'none', 'true', a name, a number, ..."),
    "syntax-statement-without-assignment": Case(HEADER + spec("""
        block b {
          x x + proj(x, d)
        }
        """), 5, 5, "unexpected 'x'; expected ',', '='",
        "a statement is 'name = expression', 'shared name = expression' or 'return expression'"),

    "syntax-keyword-as-name": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          if = proj(x, d)
          return if
        }
        """), 6, 3, "unexpected 'if'; expected ';', 'return', 'shared', '}', a name",
        "'if' is a keyword and cannot be used as a name"),
    "syntax-keyword-as-model-name": Case(spec("""
        model none(vocab = 100, d = 16) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 1, 7, "unexpected 'none'; expected a name",
        "'none' is a keyword and cannot be used as a name"),

    "syntax-nested-too-deeply": Case(HEADER + "block b { x = x + proj(" + "-" * 300 + "x, d) }\n",
                                     4, 217, "too deeply nested: more than 200 levels",
                                     "split the expression into several assignments"),

    # ---- names --------------------------------------------------------------------------------
    "unknown-name": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f(heads = 4) {
          y = proj(x, d)
          return y * hedas
        }
        """), 7, 14, "unknown name 'hedas'", "did you mean 'heads'?"),
    "unknown-function": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f {
          g = sigmod(proj(x, d))
          return g * x
        }
        """), 6, 7, "unknown function 'sigmod'", "did you mean 'sigmoid'?"),
    "unknown-init-rule-name": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f { return proj(x, d) * param([d], init = zero) }
        """), 5, 49, "unknown name 'zero'", "did you mean 'zeros'?"),
    "unknown-init-rule-call": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f { return proj(x, d) * param([d], init = normall(0.02)) }
        """), 5, 49, "unknown function 'normall'", "did you mean 'normal'?"),
    "value-called-as-function": Case(HEADER + spec("""
        block b { x = x + proj(x, d(2)) }
        """), 4, 27, "unknown function 'd'", "'d' is a value, not a function"),
    "mixer-used-without-call": Case(HEADER + spec("""
        block b { x = x + f }
        mixer f { return proj(x, d) }
        """), 4, 19, "'f' is a mixer; call it with its input: f(...)"),
    "use-before-assignment": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f {
          y = g * x
          g = sigmoid(proj(x, d))
          return y
        }
        """), 6, 7, "'g' is used before it is assigned", "it is assigned at main.seq:7:3"),
    "pattern-function-in-mixer": Case(HEADER + spec("""
        block b { x = x + proj(x, range(d)) }
        """), 4, 27, "'range' is only available in the model's layer pattern"),
    "python-keyword-as-name": Case(HEADER + spec("""
        block b { x = x + class(x) }
        mixer class { return proj(x, d) }
        """), 5, 7, "'class' is a Python keyword and cannot name a mixer"),
    "python-keyword-as-parameter": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(lambda = 2) { return proj(x, d) * lambda }
        """), 5, 9, "'lambda' is a Python keyword and cannot name a parameter"),
    "reserved-dunder-name": Case(HEADER + spec("""
        block b { x = x + __f(x) }
        mixer __f { return proj(x, d) }
        """), 5, 7, "'__f': names starting with '__' are reserved"),
    "parameter-shadows-layer": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(layer = 2) { return proj(x, d) }
        """), 5, 9, "parameter 'layer' shadows the built-in 'layer' (the index of the current "
        "layer (0-based))", "choose another name"),
    "redefine-builtin": Case(HEADER + spec("""
        block b { x = x + proj(x, d) }
        fn sigmoid(x) { return x }
        """), 5, 4, "'sigmoid' is a built-in name and cannot be redefined"),

    # ---- calls --------------------------------------------------------------------------------
    "too-many-positional-args": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f {
          return sigmoid(x, d)
        }
        """), 6, 21, "function 'sigmoid' takes 1 positional argument, got 2",
        "signature: sigmoid(x)"),
    "missing-required-arg": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f {
          return proj(x)
        }
        """), 6, 10, "function 'proj' needs argument 'size'",
        "signature: proj(x, size, bias=false, init=none, bias_init=none, groups=1)"),
    "unknown-core-keyword": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f {
          a = sigmoid(proj(x, d))
          return scan(a = a, b = x, c = 1)
        }
        """), 7, 29, "core 'scan' has no argument 'c'",
        "valid arguments of core 'scan': 'a', 'b' or 'state_dtype'"),
    "misspelled-core-keyword": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(h = 4) {
          q = heads(proj(x, d), h)
          return proj(attention(q = q, k = q, v = q, windw = 4), d)
        }
        """), 7, 46, "core 'attention' has no argument 'windw'",
        "did you mean 'window'? valid arguments of core 'attention': 'q', 'k', 'v', 'window', "
        "'rope', 'rope_theta', 'scale', 'softcap' or 'rope_dims'"),
    "core-called-positionally": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f {
          return linear(x, 64)
        }
        """), 6, 10, "core 'linear' needs argument 'v'",
        "; for a projection use proj(x, size)", partial=True),
    "unknown-mixer-keyword": Case(HEADER + spec("""
        block b { x = x + f(x, widht = 3) }
        mixer f(width = 4) { return proj(proj(x, width), d) }
        """), 4, 24, "mixer 'f' has no argument 'widht'",
        "did you mean 'width'? valid arguments of mixer 'f': 'x' or 'width'"),
    "argument-given-twice": Case(HEADER + spec("""
        block b { x = x + proj(x, d, size = 4) }
        """), 4, 30, "argument 'size' of function 'proj' is given twice"),
    "block-called-from-mixer": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f { return b(x) }
        """), 5, 18, "'b' is a block; blocks are listed in the model's layers, not called",
        "call a mixer, channel or fn instead"),
    "recursive-definitions": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f { return g(x) }
        fn g(y) { return f(y) }
        """), 6, 18, "recursive call: f -> g -> f",
        "definitions are inlined, so they cannot call themselves"),
    "experts-of-a-tensor": Case(HEADER + spec("""
        block b { x = x + experts(proj(x, d), route(proj(x, 4), 2)) }
        """), 4, 27, "experts() takes a call to a channel mixer or fn as its expert",
        "e.g. experts(swiglu(x, hidden = 2 * d), route(proj(x, 8), 2))"),

    # ---- shapes, dtypes and ranges ------------------------------------------------------------
    "shape-add-d-and-2d": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f {
          a = proj(x, d)
          c = proj(x, 2 * d)
          return a + c
        }
        """), 8, 12, "cannot add [d=16] and [2 * d=32]: the shapes do not broadcast",
        "per-token shapes must match, or one side must be 1 or missing"),
    "shape-split-sizes": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f {
          a, c = split(proj(x, 2 * d), [d, 8])
          return a
        }
        """), 6, 10, "split sizes [d, 8] add up to 24, but the last dim is 2 * d=32"),
    "shape-heads-do-not-divide": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f(heads = 3) {
          q = heads(proj(x, d), heads)
          return proj(q, d)
        }
        """), 6, 7, "cannot reshape the last dim d=16 into heads=3 heads: 16 is not divisible "
        "by 3"),
    "shape-core-qkv-mismatch": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f(heads = 4) {
          q = heads(proj(x, d), heads)
          k = heads(proj(x, 2 * d), heads)
          v = heads(proj(x, d), heads)
          return proj(linear(q = q, k = k, v = v), d)
        }
        """), 7, 7, "linear's k must have shape [heads=4, d / heads=4], got [heads=4, "
        "(2 * d) / heads=8]"),
    "shape-decay": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f(heads = 4) {
          q = heads(proj(x, d), heads)
          k = heads(proj(x, d), heads)
          v = heads(proj(x, d), heads)
          g = sigmoid(proj(x, 3))
          return proj(linear(q = q, k = k, v = v, decay = g), d)
        }
        """), 9, 7, "linear's decay has shape [3]; expected one of [heads] (scalar), "
        "[heads, key_dim] (key), [heads, key_dim, value_dim] (key-value)",
        "here heads=4, key_dim=4, value_dim=4"),
    "decay-out-of-range": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(h = 4) {
          q = heads(proj(x, d), h)
          k = heads(proj(x, d), h)
          v = heads(proj(x, d), h)
          return proj(linear(q = q, k = k, v = v, decay = 2 + sigmoid(proj(x, h))), d)
        }
        """), 9, 53, "decay lies in [2, 3], outside [0, 1]: the state would grow every step"),
    "delta-beta-unbounded": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(h = 4) {
          q = heads(proj(x, d), h)
          k = heads(proj(x, d), h)
          v = heads(proj(x, d), h)
          beta = proj(x, h)
          return proj(delta(q = q, k = k, v = v, beta = beta), d)
        }
        """), 9, 10, "delta's beta must lie in [0, 2] (eigenvalues of I - beta k k^T in "
        "[-1, 1]); its inferred range is [-inf, inf]", "use sigmoid(...) for beta in (0, 1), "
        "or 2 * sigmoid(...) to allow negative eigenvalues"),
    "attention-gqa-heads": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(h = 4, kvh = 3) {
          q = heads(proj(x, h * 4), h)
          k = heads(proj(x, kvh * 4), kvh)
          v = heads(proj(x, kvh * 4), kvh)
          return proj(attention(q = q, k = k, v = v), d)
        }
        """), 9, 15, "query heads h=4 must be a multiple of key/value heads kvh=3 (GQA)"),
    "block-changes-residual-shape": Case(HEADER + spec("""
        block b { x = proj(x, 2 * d) }
        """), 4, 15, "block 'b' must keep the residual stream's shape [d=16], found [2 * d=32]"),
    "block-makes-residual-complex": Case(HEADER + spec("""
        block b { x = x + expi(proj(x, d)) }
        """), 4, 17, "block 'b' makes the residual stream complex",
        "take real(z), imag(z) or abs(z) of a complex value"),
    "complex-sigmoid": Case(HEADER + spec("""
        block b { x = x + real(sigmoid(expi(proj(x, d)))) }
        """), 4, 24, "sigmoid() is not defined for complex values",
        "apply it to a real part: real(z), imag(z), or abs(z)"),
    "split-result-used-as-tensor": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          y = split(proj(x, 2 * d))
          return proj(y, d)
        }
        """), 6, 7, "proj's input is a tuple of 2 values", "unpack it first: a, b = split(...)"),
    "unpacking-count-mismatch": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          a, c, e = split(proj(x, 2 * d))
          return a
        }
        """), 6, 3, "split produces 2 values but 3 names are assigned"),
    "bias-init-without-bias": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          return proj(x, d, bias_init = zeros)
        }
        """), 6, 33, "bias_init is given but bias = false", "add bias = true"),
    "projection-of-a-constant": Case(HEADER + spec("""
        block b { x = x + proj(2, d) }
        """), 4, 24, "proj's input must be a tensor, got the constant 2"),
    "string-as-tensor": Case(HEADER + spec("""
        block b { x = x + "abc" }
        """), 4, 19, "the right operand must be a tensor, got string"),
    "channel-mixer-with-conv": Case(HEADER + spec("""
        block b { x = x + f(x) }
        channel f { return proj(conv1d(x, 4), d) }
        """), 5, 25, "conv1d() mixes information across time, which a channel mixer ('f') "
        "may not do", "declare 'f' as a mixer, or move the conv1d out of it"),
    "channel-mixer-with-core": Case(HEADER + spec("""
        block b { x = x + f(x) }
        channel f {
          a = sigmoid(proj(x, d))
          return scan(a = a, b = x)
        }
        """), 7, 10, "scan() mixes information across time, which a channel mixer ('f') "
        "may not do", "declare 'f' as a mixer, or move the scan out of it"),
    "shared-table-sized-by-wrong-depth": Case(spec("""
        model m(vocab = 100, d = 16, depth = 4) {
          shared lb = param([depth - 1, d], init = zeros)
          layers = [b] * depth
        }
        block b { x = x + f(x) }
        mixer f {
          return proj(x, d) * lb[layer]
        }
        """), 7, 23, "indexing a value with 3 rows by the layer index, but the model has "
        "4 layers", "size the first dim by the number of layers"),
    "constant-division-by-zero": Case(HEADER + spec("""
        block b { x = x + proj(proj(x, d // 0), d) }
        """), 4, 34, "division by zero in a constant expression"),

    # ---- compile-time values and the layer index ----------------------------------------------
    "layer-in-compile-time-condition": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          w = 4 if layer > 0 else 8
          return proj(proj(x, w), d)
        }
        """), 6, 18, "a condition must be a compile-time constant",
        "the layer index is only known at run time; use a pattern comprehension with block "
        "hyper-parameters to vary structure by layer"),
    "layer-in-hyper-parameter-default": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(w = layer + 1) { return proj(x, d) * param([w, d], init = zeros)[0] }
        """), 5, 19, "a list item must be a compile-time constant",
        "the layer index is only known at run time; use a pattern comprehension with block "
        "hyper-parameters to vary structure by layer"),
    "layer-in-init-rule": Case(HEADER + spec("""
        block b { x = x + proj(x, d) * param([d], init = normal(layer)) }
        """), 4, 57, "an init rule argument must be a compile-time constant",
        "the layer index is only known at run time; use a pattern comprehension with block "
        "hyper-parameters to vary structure by layer"),
    "layer-in-shared-value": Case(spec("""
        model m(vocab = 100, d = 16) {
          shared w = param([d], init = zeros) * layer
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) * w }
        """), 2, 41, "'layer' is not available in a shared value: shared values are the same "
        "for every layer", "use it where the value is read, e.g. w[layer]"),
    "shared-defined-twice": Case(spec("""
        model m(vocab = 100, d = 16) {
          shared t = param([d], init = zeros)
          shared t = param([d], init = ones)
          layers = [b]
        }
        block b { x = x + proj(x, d) * t }
        """), 3, 10, "shared value 't' is defined twice", "first defined at main.seq:2:10"),
    "shared-used-before-defined": Case(spec("""
        model m(vocab = 100, d = 16) {
          shared a = t * 2
          shared t = param([d], init = zeros)
          layers = [b]
        }
        block b { x = x + proj(x, d) * a }
        """), 2, 14, "shared value 't' is used before it is defined",
        "it is defined at main.seq:3:10"),
    "shared-block-used-as-value": Case(spec("""
        model m(vocab = 100, d = 16) {
          shared sb = b
          layers = [sb, b]
        }
        block b { x = x + f(x) }
        mixer f { return proj(x, d) * sb }
        """), 6, 31, "'sb' is a shared block; blocks are listed in the model's layers, not used "
        "in expressions"),
    "layer-in-pattern": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b] * layer
        }
        block b { x = x + proj(x, d) }
        """), 2, 18, "'layer' is not known at compile time; it cannot be used in the layer "
        "pattern", "the layer index is only available inside block and mixer bodies"),
    "comprehension-outside-pattern": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          ws = [proj(x, d) for i in range(2)]
          return ws
        }
        """), 6, 8, "comprehensions are only allowed in the model's layer pattern"),

    # ---- layer patterns -----------------------------------------------------------------------
    "pattern-empty": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = []
        }
        block b { x = x + proj(x, d) }
        """), 2, 12, "the layer pattern is empty"),
    "pattern-non-block": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b, 3]
        }
        block b { x = x + proj(x, d) }
        """), 2, 12, "the layer pattern must be a list of blocks, found an int",
        "e.g. layers = [rec, rec, attn] * 4"),
    "pattern-mixer": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b, f]
        }
        block b { x = x + f(x) }
        mixer f { return proj(x, d) }
        """), 2, 16, "'f' is a mixer; the layer pattern lists blocks",
        "wrap it: block f_block { x = x + f(rmsnorm(x)) }"),
    "pattern-unknown-block": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [rec, recc]
        }
        block rec { x = x + proj(x, d) }
        """), 2, 18, "unknown name 'recc' in the layer pattern", "did you mean 'rec'?"),
    "pattern-unknown-block-call": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [bb(w = 2)] * 2
        }
        block b(w = 8) { x = x + proj(proj(x, w), d) }
        """), 2, 13, "unknown function 'bb' in the layer pattern", "did you mean 'b'?"),
    "pattern-legend-character": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = pattern("MM*MX", M = b, "*" = c)
        }
        block b { x = x + proj(x, d) }
        block c { x = x + proj(x, d) }
        """), 2, 25, "character 'X' of the pattern has no legend entry",
        "the legend defines 'M' or '*'"),
    "periodic-offset-not-below-period": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = periodic(8, b, c, period = 4, offset = 4)
        }
        block b { x = x + proj(x, d) }
        block c { x = x + proj(x, d) }
        """), 2, 12, "periodic(): need period > 0 and 0 <= offset < period, got period=4, "
        "offset=4"),
    "periodic-non-block": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = periodic(4, b, 3, period = 2)
        }
        block b { x = x + proj(x, d) }
        """), 2, 27, "periodic(): other must be a block, got int"),
    "pattern-unknown-block-hyper-parameter": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b(widht = 4)] * 2
        }
        block b(width = 8) { x = x + proj(proj(x, width), d) }
        """), 2, 13, "block 'b' has no hyper-parameter 'widht'", "did you mean 'width'?"),
    "pattern-positional-block-hyper-parameter": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b(4)] * 2
        }
        block b(w = 8) { x = x + proj(proj(x, w), d) }
        """), 2, 15, "block hyper-parameters are passed by name", "write b(name = value)"),
    "pattern-too-long": Case(spec("""
        model m(vocab = 100, d = 16, depth = 1000000000000) {
          layers = [b] * depth
        }
        block b { x = x + proj(x, d) }
        """), 2, 16, "a compile-time list would have 1,000,000,000,000 items; the limit is "
        "1,000,000"),
    "constant-power-too-large": Case(spec("""
        model m(vocab = 100, d = 16, depth = 2 ** 100000000) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 1, 40, "constant arithmetic failed: 2 ** 100000000 is too large"),
    "range-step-zero": Case(spec("""
        model m(vocab = 100, d = 16, depth = 4) {
          layers = [b for i in range(0, depth, 0)]
        }
        block b { x = x + proj(x, d) }
        """), 2, 24, "range() step must not be zero"),

    # ---- imports ------------------------------------------------------------------------------
    "circular-import": Case({
        "main.seq": """
            import "lib.seq"
            model m(vocab = 100, d = 16) {
              layers = [b] * 2
            }
            block b { x = x + f(x) }
            """,
        "lib.seq": """
            # a library that (wrongly) imports the model
            import "main.seq"
            mixer f { return proj(x, d) }
            """,
    }, 2, 1, "circular import: main.seq -> lib.seq -> main.seq", file="lib.seq"),
    "missing-import": Case(spec("""
        import "nope.seq"
        model m(vocab = 100, d = 16) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 1, 1, 'cannot find "nope.seq"', partial=True),
    "import-not-utf8": Case({
        "main.seq": """
            import "lib.seq"
            model m(vocab = 100, d = 16) {
              layers = [b] * 2
            }
            block b { x = x + proj(x, d) }
            """,
        "lib.seq": b"mixer f { return x }  # \xff\n",
    }, 1, 25, "not UTF-8 text: byte 0xff", "save the file as UTF-8", file="lib.seq"),
    "byte-order-mark-is-fine-but-an-error-after-it-counts-columns-without-it": Case({
        "main.seq": b"\xef\xbb\xbfmodel m(vocab = 100, d = 16) { layers = [b] }\n"
                    b"block b { x = x + sigmod(x) }\n",
    }, 2, 19, "unknown function 'sigmod'", partial=True),
    "import-without-seq-suffix": Case(spec("""
        import "std/mlp"
        model m(vocab = 100, d = 16) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 1, 1, 'import paths name .seq files, got "std/mlp"'),
    "duplicate-definition-across-import": Case({
        "main.seq": """
            import "lib.seq"
            model m(vocab = 100, d = 16) {
              layers = [b] * 2
            }
            block b { x = x + f(x) }
            mixer f { return proj(x, d) }
            """,
        "lib.seq": """
            # a library
            mixer f { return proj(x, d) }
            """,
    }, 6, 7, "duplicate definition of 'f'", "already defined at lib.seq:2:7 (imported)"),

    # ---- definitions --------------------------------------------------------------------------
    "duplicate-definition": Case(HEADER + spec("""
        block b { x = x + proj(x, d) }
        block b { x = x + proj(x, d) }
        """), 5, 7, "duplicate definition of 'b'", "first defined at main.seq:4:7"),
    "duplicate-parameter": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(n = 2, n = 3) { return proj(x, d) }
        """), 5, 16, "parameter 'n' is declared twice in mixer 'f'"),
    "duplicate-model-hyper-parameter": Case(spec("""
        model m(vocab = 100, d = 16, d = 8) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 1, 30, "hyper-parameter 'd' is declared twice"),
    "block-with-return": Case(HEADER + spec("""
        block b {
          x = x + proj(x, d)
          return x
        }
        """), 6, 3, "a block updates the residual stream 'x' and has no 'return'",
        "write 'x = x + mixer(norm(x))'"),
    "block-never-updates-x": Case(HEADER + spec("""
        block b { y = proj(x, d) }
        """), 4, 7, "block 'b' never updates the residual stream 'x'",
        "write 'x = x + mixer(norm(x))'"),
    "block-with-extra-input": Case(HEADER + spec("""
        block b(x, y) { x = x + proj(y, d) }
        """), 4, 12, "block 'b' takes the residual stream 'x' only; other parameters need "
        "defaults"),
    "mixer-without-return": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          y = proj(x, d)
        }
        """), 5, 7, "mixer 'f' has no 'return'", "end the body with 'return expression'"),
    "return-not-last": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          return proj(x, d)
          y = x
        }
        """), 7, 3, "'return' must be the last statement"),
    "shared-in-definition": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          shared w = param([d], init = zeros)
          return x * w
        }
        """), 6, 3, "'shared' values belong in the model body"),
    "tensor-input-after-hyper-parameter": Case(HEADER + spec("""
        block b { x = x + g(x, x) }
        fn g(a, n = 2, c) { return a * c }
        """), 5, 16, "tensor input 'c' follows a hyper-parameter; list tensor inputs first"),
    "fn-without-input": Case(HEADER + spec("""
        block b { x = x + g() }
        fn g { return 1 }
        """), 5, 4, "fn 'g' declares no tensor input",
        "parameters without a default are tensor inputs: fn f(x, y, k = 2)"),
    "definition-default-of-wrong-type": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f(n = "wide") { return proj(proj(x, n), d) }
        """), 5, 13, "proj's size must be an int, got string \"wide\""),

    # ---- the model ----------------------------------------------------------------------------
    "model-missing-d": Case(spec("""
        model m(vocab = 100) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, 4) }
        """), 1, 7, "model 'm' must declare hyper-parameter 'd' (the width of the residual "
        "stream)", "model m(d = ..., ...) { ... }"),
    "model-missing-vocab": Case(spec("""
        model m(d = 16) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 1, 7, "model 'm' must declare hyper-parameter 'vocab' (the vocabulary size)",
        "model m(vocab = ..., ...) { ... }"),
    "model-missing-layers": Case(spec("""
        model m(vocab = 100, d = 16) {
          tie_embeddings = true
        }
        block b { x = x + proj(x, d) }
        """), 1, 7, "model 'm' has no 'layers = ...' pattern", "e.g. layers = [my_block] * depth"),
    "model-unknown-setting": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b] * 2
          tie_embedings = true
        }
        block b { x = x + proj(x, d) }
        """), 3, 3, "unknown model setting 'tie_embedings'", "did you mean 'tie_embeddings'?"),
    "model-setting-of-wrong-type": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b] * 2
          tie_embeddings = 1
        }
        block b { x = x + proj(x, d) }
        """), 3, 20, "tie_embeddings must be true or false, got int"),
    "model-bad-final-norm": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b] * 2
          final_norm = rmsnrom
        }
        block b { x = x + proj(x, d) }
        """), 3, 16, "final_norm must be rmsnorm, layernorm, a fn of one input, or none; got "
        "rmsnrom", "did you mean 'rmsnorm'?"),
    "model-with-return": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b] * 2
          return 3
        }
        block b { x = x + proj(x, d) }
        """), 3, 3, "a model has no 'return'; it assigns settings such as 'layers'"),
    "two-models": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b] * 2
        }
        model m2(vocab = 100, d = 16) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 4, 7, "a file defines at most one model", "'m' is defined at main.seq:1:7"),
    "model-default-of-wrong-type": Case(spec("""
        model m(vocab = 100, d = "abc") {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 1, 26, "hyper-parameter 'd' must be a positive int, got 'abc'"),
    "model-float-width": Case(spec("""
        model m(vocab = 100, d = 16.0) {
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) }
        """), 1, 26, "hyper-parameter 'd' must be a positive int, got 16.0"),

    # ---- init rules ---------------------------------------------------------------------------
    "init-rule-missing-argument": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f { return proj(x, d) * param([d], init = uniform(0.1)) }
        """), 5, 49, "init rule 'uniform' needs argument 'high'",
        "uniform(low, high): U(low, high)"),
    "init-rule-too-many-arguments": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f { return proj(x, d) * param([d], init = normal(0.1, 0.2)) }
        """), 5, 49, "init rule 'normal' takes 1 argument, got 2", "normal(std=0.02): N(0, std^2)"),
    "init-rule-log-of-zero": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f { return proj(x, d) * param([d], init = log_uniform(-1, 1)) }
        """), 5, 49, "init rule log_uniform(low=-1, high=1) takes logarithms: low must be >= 0"),
    "bias-init-rule-log-of-zero": Case(HEADER + spec("""
        block b { x = x + proj(x, d, bias = true, bias_init = log_arange(0, 16)) }
        """), 4, 55, "init rule log_arange(low=0, high=16) takes logarithms: low must be > 0"),
    # ---- norms ----------------------------------------------------------------------------------
    "rmsnorm-offset-not-a-number": Case(HEADER + spec("""
        block b { x = x + rmsnorm(x, offset = "one") }
        """), 4, 39, "offset must be a number, got string \"one\"", partial=True),
    "rmsnorm-offset-without-weight": Case(HEADER + spec("""
        block b { x = x + rmsnorm(x, weight = false, offset = 1.0) }
        """), 4, 55, "rmsnorm's offset needs weight = true",
        "the offset is added to the learnable weight; without one, drop it"),
    "init-rule-low-above-high": Case(HEADER + spec("""
        block b { x = x + conv1d(x, 4, init = uniform(1, 0)) }
        """), 4, 39, "init rule uniform(low=1, high=0): low must not exceed high"),
    "init-rule-negative-std": Case(HEADER + spec("""
        block b { x = x + proj(x, d, init = normal(std = -1)) }
        """), 4, 37, "init rule normal(std=-1): std must be >= 0, got -1"),
    "init-rule-negative-gain": Case(HEADER + spec("""
        block b { x = x + proj(x, d, init = xavier(gain = -0.5)) }
        """), 4, 37, "init rule xavier(gain=-0.5): gain must be >= 0, got -0.5"),
    "block-argument-of-the-wrong-type": Case(spec("""
        model m(vocab = 100, d = 16) {
          layers = [b(w = "a")]
        }
        block b(w = 2) { x = x + proj(x, d) * w }
        """), 2, 13, "the right operand must be a tensor, got string"),
    "assignment-shadows-the-layer-index": Case(HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          layer = 5
          return proj(x, d) * layer
        }
        """), 6, 3, "variable 'layer' shadows the built-in 'layer' (the index of the current "
        "layer (0-based))", "choose another name"),
    "logic-on-a-mixer-input": Case(HEADER + spec("""
        block b { x = x + f(rmsnorm(x)) }
        mixer f { return proj(x, d) * (x == x) }
        """), 5, 34, "an operand of '==' must be a compile-time constant, got a tensor [d=16]"),
    # ---- numbers generated code cannot hold ------------------------------------------------
    "number-too-large": Case(HEADER + spec("""
        block b { x = x + x * 1e999 }
        """), 4, 23, "the number 1e999 is too large for a float64",
        "numbers must stay within ±1.8e308"),
    "number-underflows": Case(HEADER + spec("""
        block b { x = x + x * 1e-999 }
        """), 4, 23, "the number 1e-999 is too small for a float64: it would be 0",
        "nonzero numbers must be at least about 4.9e-324 in size"),
    "integer-beyond-64-bits": Case(HEADER + spec("""
        block b { x = x + x * 99999999999999999999 }
        """), 4, 23, "does not fit in 64 bits", partial=True),
    "arithmetic-overflows-to-inf": Case(HEADER + spec("""
        block b { x = x + x * (1e308 * 10) }
        """), 4, 30, "the result of this constant arithmetic is not a finite number (inf)",
        "numbers must stay within ±1.8e308 (a float64)"),
    "integer-power-beyond-64-bits": Case(HEADER + spec("""
        block b { x = x + proj(x, d, init = constant(2 ** 200)) }
        """), 4, 48, "the result of this constant arithmetic does not fit in 64 bits",
        partial=True),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_malformed_spec(case: Case, tmp_path, monkeypatch):
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, case.src, **case.overrides)
    first = info.value.first
    got = (first.span.path, first.span.line, first.span.col)
    assert got == (case.file, case.line, case.col), info.value.render()
    if case.partial:
        assert case.message in first.message, info.value.render()
    else:
        assert first.message == case.message, info.value.render()
    if case.partial and case.hint is not None:
        assert first.hint is not None and case.hint in first.hint, info.value.render()
    elif not case.partial:
        assert first.hint == case.hint, info.value.render()


# ---- hyper-parameter overrides (CLI --set / keyword arguments) -------------------------------

OVERRIDE_SPEC = spec("""
    model m(vocab = 100, d = 16, depth = 2) {
      layers = [b] * depth
    }
    block b { x = x + f(x) }
    mixer f(expand = 2) { return proj(proj(x, expand * d), d) }
    """)

OVERRIDES = {
    "string-for-int": ({"d": "abc"}, "--set d='abc'",
                       "hyper-parameter 'd' is an int, got string \"abc\"", None),
    "float-for-int": ({"d": 1.5}, "--set d=1.5",
                      "hyper-parameter 'd' is an int, got float 1.5", None),
    "float-text-for-int": ({"depth": "1.5"}, "--set depth=1.5",
                           "hyper-parameter 'depth' is an int, got float 1.5", None),
    "bool-for-int": ({"vocab": True}, "--set vocab=True",
                     "hyper-parameter 'vocab' is an int, got bool true", None),
    "non-positive-width": ({"d": -4}, "--set d=-4",
                           "hyper-parameter 'd' must be a positive int, got -4", None),
    "unknown-key": ({"dd": 4}, "--set dd=4", "unknown hyper-parameter 'dd'",
                    "did you mean 'd'?"),
    "unknown-definition-key": ({"f.expnd": 3}, "--set f.expnd=3",
                               "mixer 'f' has no hyper-parameter 'expnd'",
                               "did you mean 'expand'?"),
    "unknown-definition": ({"g.expand": 3}, "--set g.expand=3", "unknown definition 'g'", None),
    "definition-override-type": ({"f.expand": "wide"}, "--set f.expand='wide'",
                                 "hyper-parameter 'f.expand' is an int, got string \"wide\"", None),
    "width-beyond-64-bits": ({"d": 2 ** 70}, f"--set d={2 ** 70}",
                             f"hyper-parameter 'd' does not fit in 64 bits ({2 ** 70:.3g})",
                             "integers must stay within ±9223372036854775807 (an int64)"),
    "infinite-float": ({"f.expand": float("inf")}, "--set f.expand=inf",
                       "hyper-parameter 'f.expand' is not a finite number (inf)",
                       "numbers must stay within ±1.8e308 (a float64)"),
    "none-for-int": ({"d": "none"}, "--set d=None", "hyper-parameter 'd' is an int, got none",
                     None),
    "malformed-literal": ({"d": "[1"}, "--set d", "unexpected end of file; expected ',', ']', "
                          "'for'", "the '[' at line 1, column 1 is not closed"),
}


@pytest.mark.parametrize("overrides,path,message,hint", list(OVERRIDES.values()),
                         ids=list(OVERRIDES))
def test_bad_override(overrides, path, message, hint, tmp_path, monkeypatch):
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, OVERRIDE_SPEC, **overrides)
    first = info.value.first
    assert (first.span.path, first.message, first.hint) == (path, message, hint)


def test_good_overrides_compile(tmp_path, monkeypatch):
    program = compile_files(tmp_path, monkeypatch, OVERRIDE_SPEC, d="32", depth=3,
                            **{"f.expand": 4})
    assert program.config["d"] == 32 and len(program.layers) == 3


# ---- several errors, rendering -----------------------------------------------------------------

SEVERAL = spec("""
    model m(vocab = 100, d = 16) {
      layers = [b] * 2
    }
    block b { x = x + f(x) + g(x) }
    mixer f {
      a = sigmod(x)
      return proj(a, dd)
    }
    fn g(y) { return foo(y) }
    mixer h(n = 4) { return proj(x, n) * hh }
    """)


def test_all_independent_errors_are_reported(tmp_path, monkeypatch):
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, SEVERAL)
    got = [(d.span.line, d.span.col, d.message) for d in info.value.diagnostics]
    assert got == [
        (6, 7, "unknown function 'sigmod'"),
        (7, 18, "unknown name 'dd'"),
        (9, 18, "unknown function 'foo'"),
        (10, 38, "unknown name 'hh'"),
    ]


def test_errors_in_several_blocks_are_all_reported(tmp_path, monkeypatch):
    src = spec("""
        model m(vocab = 100, d = 16) {
          layers = [a, b]
        }
        block a { x = x + proj(x, 2 * d) }
        block b { x = x + proj(x, d) * split(x) }
        """)
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, src)
    assert [(d.span.line, d.span.col) for d in info.value.diagnostics] == [(4, 17), (5, 32)]


def test_render_shows_location_source_line_caret_and_hint(tmp_path, monkeypatch):
    src = HEADER + spec("""
        block b { x = x + f(x) }
        mixer f {
          g = sigmod(proj(x, d))
          return g * x
        }
        """)
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, src)
    lines = info.value.render().splitlines()
    assert lines[0] == "main.seq:6:7: error: unknown function 'sigmod'"
    assert lines[1] == " 6 |   g = sigmod(proj(x, d))"
    assert lines[2] == "   |       ^~~~~~"
    assert lines[1].index("sigmod") == lines[2].index("^")
    assert lines[3] == "   = hint: did you mean 'sigmoid'?"
    assert str(info.value) == info.value.render()


def test_render_caret_under_pattern_character(tmp_path, monkeypatch):
    src = spec("""
        model m(vocab = 100, d = 16) {
          layers = pattern("MM*MX", M = b, "*" = c)
        }
        block b { x = x + proj(x, d) }
        block c { x = x + proj(x, d) }
        """)
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, src)
    lines = info.value.render().splitlines()
    assert lines[0].startswith("main.seq:2:25: error: character 'X'")
    assert lines[1][lines[2].index("^")] == "X"
    assert lines[2].rstrip().endswith("^")  # one character wide


def test_render_override_error_has_no_source_line(tmp_path, monkeypatch):
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, OVERRIDE_SPEC, dd=4)
    assert info.value.render().splitlines() == [
        "--set dd=4: error: unknown hyper-parameter 'dd'",
        "   = hint: did you mean 'd'?",
    ]


# ---- valid specs that compiler bugs once rejected ------------------------------------------------

def test_power_operator_parses(tmp_path, monkeypatch):
    program = compile_files(tmp_path, monkeypatch, spec("""
        model m(vocab = 100, d = 2 ** 4, depth = 2) {
          layers = [b] * depth
        }
        block b { x = x + proj(x, d) * 2 ** -1 }
        """))
    assert program.config["d"] == 16


def test_shared_value_with_constant_condition(tmp_path, monkeypatch):
    program = compile_files(tmp_path, monkeypatch, spec("""
        model m(vocab = 100, d = 16, big = false) {
          shared w = param([d], init = ones) if big else param([d], init = zeros)
          layers = [b] * 2
        }
        block b { x = x + proj(x, d) * w }
        """))
    params = [n for n in program.shared.nodes() if n.op.value == "param"]
    assert len(params) == 1  # the untaken branch is gone
    assert program.shared.node(params[0].inputs[1]).attr("value").name == "zeros"


def test_circular_import_of_an_edited_buffer(tmp_path):
    """With text= (an editor's unsaved buffer) the file on disk still closes the cycle."""
    (tmp_path / "lib.seq").write_text('import "main.seq"\nmixer f { return proj(x, d) }\n')
    main = tmp_path / "main.seq"
    main.write_text("# the saved version\n")
    with pytest.raises(SpecError) as info:
        seqdsl.load(main, text='import "lib.seq"\n')
    first = info.value.first
    assert (Path(first.span.path).name, first.span.line, first.span.col) == ("lib.seq", 1, 1)
    assert first.message.startswith("circular import: ")
    assert [Path(p).name for p in first.message[len("circular import: "):].split(" -> ")] == \
        ["main.seq", "lib.seq", "main.seq"]


def test_first_is_not_allowed_in_a_shared_value(tmp_path):
    spec = tmp_path / "m.seq"
    spec.write_text("model m(vocab = 10, d = 8) {\n  shared s = first() * param([d], init = ones)\n"
                    "  layers = [b]\n}\nblock b { x = x + s * x }\n")
    with pytest.raises(seqdsl.SpecError) as info:
        seqdsl.load(spec)
    d = info.value.first
    assert (d.span.line, d.span.col) == (2, 14)
    assert d.message.startswith("first() varies from token to token")


def test_an_error_inside_the_standard_library_names_the_call(tmp_path, monkeypatch):
    """A mistake that only shows inside an imported definition (GQA heads that do not divide)
    is reported where it fails, with a hint naming the user's call that led there."""
    src = spec("""
        import "std/attention.seq"
        model m(vocab = 100, d = 16) { layers = [b] }
        block b { x = x + attn(rmsnorm(x), heads = 2, kv_heads = 3) }
        """)
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, src)
    first = info.value.first
    assert first.span.path.endswith("attention.seq") and "multiple of" in first.message
    assert first.hint == "in the call of 'attn' at main.seq:3:19", info.value.render()


def test_a_long_line_is_shown_as_a_window_around_the_caret(tmp_path, monkeypatch):
    terms = " + ".join(["x * 1.5"] * 60)
    src = ("model m(vocab = 100, d = 16) { layers = [b] }\n"
           f"block b {{ x = {terms} + sigmod(x) + {terms} }}\n")
    with pytest.raises(SpecError) as info:
        compile_files(tmp_path, monkeypatch, src)
    shown = info.value.render().splitlines()
    assert shown[0].startswith("main.seq:2:") and "sigmod" in shown[0]
    assert all(len(line) < 140 for line in shown), shown
    code, caret = shown[1].split("| ", 1)[1], shown[2].split("| ", 1)[1]
    assert code.startswith("...") and code.endswith("...")
    assert code[caret.index("^"):].startswith("sigmod")
