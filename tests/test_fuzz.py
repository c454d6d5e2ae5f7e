"""Fuzzing the frontend: whatever text it is given, the only exception that may escape
``seqdsl.load`` is :class:`SpecError` (a successful compile is fine, and must then be analysable,
as ``seqdsl check`` does).

Inputs: (a) arbitrary text and token soup; (b) random well-formed expressions inside a valid
mixer; (c) mutations of the bundled specs (lines and tokens deleted, duplicated, swapped, inserted,
numbers changed, names replaced, text truncated), compiled with ``text=`` and their original path
so that ``import "std/..."`` still resolves; (d) random hyper-parameter overrides.

Runs are deterministic (derandomized, no example database), in CI and locally alike. Example
counts are sized for well under a minute on two cores in total; ``SEQDSL_FUZZ_SCALE=10`` runs ten
times as many, and ``SEQDSL_FUZZ_RANDOM=1`` draws new examples on every run (to hunt for bugs).

Also here: the ``seqdsl check`` command line reports errors without a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqdsl
from seqdsl import SpecError
from seqdsl.analysis import model_info
from seqdsl.ir.builtins import BUILTINS, INIT_RULES, PATTERN_FUNCTIONS

from conftest import ROOT, SPECS

SCALE = float(os.environ.get("SEQDSL_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("SEQDSL_FUZZ_RANDOM") == "1"  # new examples each run, to hunt for bugs


def fuzz_settings(examples: int):
    # CI and local runs use the same counts; derandomized and database-free, so CI is deterministic
    return settings(max_examples=max(1, int(examples * SCALE)), derandomize=not RANDOM,
                    database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def compiles_or_reports(path: str | Path, text: str) -> None:
    """The property: compiling ``text`` succeeds or raises SpecError with located diagnostics."""
    try:
        program = seqdsl.load(str(path), text=text, verify=True)
    except SpecError as err:
        assert err.diagnostics, "a SpecError without diagnostics"
        err.render()  # rendering a diagnostic never fails either
        return
    except Exception as exc:  # noqa: BLE001 - the point of the test
        tb = "".join(traceback.format_exception(exc))
        raise AssertionError(f"{type(exc).__name__} escaped for {path}:\n{text}\n{tb}") from exc
    if program.spec.model is not None:
        model_info(program)


# ---- the language's vocabulary -----------------------------------------------------------------

KEYWORDS = ["import", "model", "block", "mixer", "channel", "fn", "shared", "return", "if", "else",
            "for", "in", "and", "or", "not", "true", "false", "none"]
PUNCTUATION = ["(", ")", "[", "]", "{", "}", ",", "=", ";", ":", ".", "+", "-", "*", "/", "//",
               "%", "**", "==", "!=", "<", "<=", ">", ">=", "\n", "#", '"', "'"]
NAMES = sorted(set(BUILTINS) | set(INIT_RULES) | set(PATTERN_FUNCTIONS)
               | {"x", "y", "d", "vocab", "depth", "layer", "layers", "heads", "tie_embeddings",
                  "final_norm", "embed_scale", "logit_softcap", "b", "f", "class"})
NUMBERS = ["0", "1", "2", "3", "7", "16", "-1", "0.0", "0.5", "1.5", "1e-9", "1e9", "1e400",
           "1000000000000", ".5", "2."]
STRINGS = ['"MM*"', '"float32"', '"float64"', '"std/mlp.seq"', '""', '"x"']
TOKENS = KEYWORDS + PUNCTUATION + NAMES + NUMBERS + STRINGS

# tokens of a spec, whitespace and comments included, so that "".join(tokens) == text
_TOKEN = re.compile(r'\s+|#[^\n]*|"[^"\n]*"|\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+|\d+(?:[eE][+-]?\d+)?'
                    r'|[A-Za-z_]\w*|\*\*|//|==|!=|<=|>=|.', re.S)
_IDENT = re.compile(r"[A-Za-z_]\w*")
_NUMBER = re.compile(r"\d|\.\d")


def tokens(text: str) -> list[str]:
    out = _TOKEN.findall(text)
    assert "".join(out) == text
    return out


def _small_vocab(text: str) -> str:
    """Mutations may turn `[b] * depth` into `[b] * vocab`: keep such patterns cheap to compile."""
    return re.sub(r"\bvocab = \d+", "vocab = 256", text)


SPEC_FILES = sorted(SPECS.glob("*.seq")) + sorted((SPECS / "std").glob("*.seq"))
SOURCES = {p: _small_vocab(p.read_text()) for p in SPEC_FILES}


def test_fuzz_corpus_compiles():
    """The unmutated corpus compiles, so mutations start from valid specs."""
    assert len(SOURCES) >= 5
    for path, text in SOURCES.items():
        seqdsl.load(str(path), text=text, verify=True)


# ---- (a) arbitrary text ------------------------------------------------------------------------

@fuzz_settings(400)
@given(st.text(max_size=200))
def test_random_text(text):
    compiles_or_reports(SPECS / "fuzz.seq", text)


@fuzz_settings(600)
@given(st.lists(st.sampled_from(TOKENS), max_size=60),
       st.lists(st.sampled_from([" ", "", "\n", "  "]), min_size=60, max_size=60))
def test_token_soup(toks, seps):
    compiles_or_reports(SPECS / "fuzz.seq", "".join(t + s for t, s in zip(toks, seps)))


# ---- (b) random expressions in a valid model ----------------------------------------------------

TEMPLATE = """\
import "std/mlp.seq"
model m(vocab = 64, d = 16, depth = 3) {{
  shared table = param([depth, d], init = zeros)
  shared sb = b
  layers = [sb, b, sb]
}}
block b {{
  x = x + f(rmsnorm(x))
  x = x + swiglu(x)
}}
mixer f(h = 4, n = 2) {{
  y = {expr}
  return proj(y, d)
}}
"""

LEAVES = ["x", "x", "d", "h", "n", "layer", "table", "zeros", "0", "1", "2", "-1", "0.5", "1e9",
          "true", "none", '"float32"', "[d]", "[h, n]", "proj(x, d)", "heads(proj(x, d), h)",
          "sigmoid(proj(x, h))", "split(proj(x, 2 * d))", "swiglu(x, hidden = h)", "sb",
          "experts(swiglu(x), route(proj(x, 4), 2))"]
OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "==", "<", "and", "or"]
FUNCTIONS = sorted(set(BUILTINS) | set(INIT_RULES))


def _params(name: str) -> list[str]:
    b = BUILTINS.get(name)
    return [a.name for a in (b.args if b else INIT_RULES[name].args)]


@st.composite
def _call(draw, children):
    """A call with its required arguments (positionally or by name) and some optional ones."""
    name = draw(st.sampled_from(FUNCTIONS))
    params = _params(name)
    b = BUILTINS.get(name)
    required = [a.name for a in b.args if a.required] if b else []
    n_pos = draw(st.integers(0, len(required)))
    optional = draw(st.lists(st.sampled_from(params), unique=True, max_size=3)) if params else []
    args = [draw(children) for _ in range(n_pos)]
    args += [f"{p} = {draw(children)}" for p in required[n_pos:] + optional
             if p not in required[:n_pos]]
    return f"{name}({', '.join(args)})"


def _extend(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(OPERATORS), children).map(" ".join).map("({})".format),
        children.map("-{}".format),
        children.map("not {}".format),
        _call(children),
        st.tuples(children, children).map("{0[0]}[{0[1]}]".format),
        st.lists(children, max_size=3).map(", ".join).map("[{}]".format),
        st.tuples(children, children, children).map("({0[0]} if {0[1]} else {0[2]})".format),
    )


EXPRESSIONS = st.recursive(st.sampled_from(LEAVES), _extend, max_leaves=8)


@fuzz_settings(600)
@given(EXPRESSIONS)
def test_random_expression(expr):
    """Well-formed but random expressions: they get past the parser to the semantic checks."""
    compiles_or_reports(SPECS / "fuzz.seq", TEMPLATE.format(expr=expr))


# ---- (c) mutations of the bundled specs ---------------------------------------------------------

INTERESTING_NUMBERS = ["0", "1", "2", "3", "7", "16", "-1", "-2", "0.0", "0.5", "1.5", "1e-9",
                       "1e9", "1e400", "1000000000000"]
BUILTIN_NAMES = sorted(set(BUILTINS) | set(INIT_RULES) | set(PATTERN_FUNCTIONS)
                       | {"layer", "x", "d", "none", "true", "if", "for", "shared", "return"})


def _significant(toks: list[str]) -> list[int]:
    return [i for i, t in enumerate(toks) if t.strip() and not t.startswith("#")]


def mutate(data, text: str) -> str:
    kind = data.draw(st.sampled_from([
        "delete-line", "duplicate-line", "swap-lines", "delete-token", "duplicate-token",
        "swap-tokens", "insert-token", "change-number", "replace-name", "truncate"]), label="kind")
    if kind.endswith("line") or kind == "swap-lines":
        lines = text.split("\n")
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        if kind == "delete-line":
            del lines[i]
        elif kind == "duplicate-line":
            lines.insert(i, lines[i])
        else:
            j = data.draw(st.integers(0, len(lines) - 1), label="other line")
            lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines)
    if kind == "truncate":
        return text[:data.draw(st.integers(0, len(text)), label="length")]
    toks = tokens(text)
    sig = _significant(toks)
    if not sig:  # nothing left to mutate
        return text
    if kind == "change-number":
        sig = [i for i in sig if _NUMBER.match(toks[i])] or sig
        toks[data.draw(st.sampled_from(sig), label="number")] = \
            data.draw(st.sampled_from(INTERESTING_NUMBERS), label="value")
    elif kind == "replace-name":
        idents = [i for i in sig if _IDENT.fullmatch(toks[i])]
        i = data.draw(st.sampled_from(idents), label="name")
        pool = sorted({toks[j] for j in idents}) + BUILTIN_NAMES
        toks[i] = data.draw(st.sampled_from(pool), label="replacement")
    else:
        i = data.draw(st.sampled_from(sig), label="token")
        if kind == "delete-token":
            toks[i] = ""
        elif kind == "duplicate-token":
            toks[i] = toks[i] + " " + toks[i]
        elif kind == "swap-tokens":
            j = data.draw(st.sampled_from(sig), label="other token")
            toks[i], toks[j] = toks[j], toks[i]
        else:
            toks[i] = data.draw(st.sampled_from(TOKENS), label="inserted") + " " + toks[i]
    return "".join(toks)


@fuzz_settings(800)
@given(st.data())
def test_mutated_specs(data):
    path = data.draw(st.sampled_from(SPEC_FILES), label="spec")
    text = SOURCES[path]
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        text = mutate(data, text)
    compiles_or_reports(path, text)


# a library file that a model imports: mutated, it must fail as cleanly as a model does
LIBRARIES = sorted((SPECS / "std").glob("*.seq"))
LIBRARY_USERS = {lib.name: [p for p in sorted(SPECS.glob("*.seq"))
                            if f'import "std/{lib.name}"' in p.read_text()] for lib in LIBRARIES}


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mutated_std")


@fuzz_settings(300)
@given(data=st.data())
def test_mutated_imported_library(lib_dir, data):
    lib = data.draw(st.sampled_from([p for p in LIBRARIES if LIBRARY_USERS[p.name]]), label="lib")
    model = data.draw(st.sampled_from(LIBRARY_USERS[lib.name]), label="model")
    text = SOURCES[lib]
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        text = mutate(data, text)
    (lib_dir / "std").mkdir(exist_ok=True)
    for other in LIBRARIES:  # found before the bundled std/ files of the same names
        (lib_dir / "std" / other.name).write_text(text if other == lib else SOURCES[other])
    compiles_or_reports(lib_dir / model.name, SOURCES[model])


# ---- (d) hyper-parameter overrides, as the CLI's --set passes them -----------------------------

OVERRIDE_KEYS = ["d", "vocab", "depth", "dd", "", ".", "mamba.expand", "mamba.n", "mamba.rank",
                 "mamba.nn", "mamba.", "attn.window", "attn.heads", "attn.rope", "rglru.c",
                 "rglru.width", "swiglu.hidden", "nosuch.d", "mamba_block.x"]
OVERRIDE_VALUES = st.one_of(
    st.text(max_size=12),                                   # as typed after --set key=
    st.sampled_from(NUMBERS + STRINGS + ["true", "none", "gelu", "[1, 2]", "(", "2 **", "d"]),
    st.integers(-3, 40), st.floats(allow_nan=True), st.booleans(), st.none(),
    st.lists(st.integers(0, 4), max_size=3),
)


@fuzz_settings(300)
@given(st.sampled_from(["mamba.seq", "griffin.seq"]),
       st.dictionaries(st.sampled_from(OVERRIDE_KEYS), OVERRIDE_VALUES, max_size=2))
def test_random_overrides(name, overrides):
    try:
        program = seqdsl.load(str(SPECS / name), verify=True, **overrides)
    except SpecError as err:
        err.render()
        return
    model_info(program)


# ---- the command line --------------------------------------------------------------------------

BAD_SPEC = """\
model m(vocab = 100, d = 16) {
  layers = [b] * 2
}
block b { x = x + f(x) }
mixer f {
  g = sigmod(proj(x, d))
  return g * x
}
"""


def _seqdsl(*args, cwd, debug=False):
    env = {k: v for k, v in os.environ.items() if k != "SEQDSL_DEBUG"}
    if debug:
        env["SEQDSL_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "seqdsl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_check_reports_errors_without_traceback(tmp_path):
    (tmp_path / "bad.seq").write_text(BAD_SPEC)
    run = _seqdsl("check", "bad.seq", cwd=tmp_path)
    assert run.returncode == 1
    out = run.stdout + run.stderr
    assert "bad.seq:6:7: error: unknown function 'sigmod'" in out
    assert "  g = sigmod(proj(x, d))" in out and "^~~~~~" in out
    assert "hint: did you mean 'sigmoid'?" in out
    assert "1 error" in out
    assert "Traceback" not in out


def test_cli_check_with_debug_shows_traceback(tmp_path):
    (tmp_path / "bad.seq").write_text(BAD_SPEC)
    run = _seqdsl("check", "bad.seq", cwd=tmp_path, debug=True)
    assert run.returncode == 1
    assert "bad.seq:6:7: error:" in run.stderr
    assert "Traceback" in run.stderr


def test_cli_check_bad_override_is_an_error_not_a_crash(tmp_path):
    run = _seqdsl("check", str(SPECS / "mamba.seq"), "--set", "d=abc", cwd=tmp_path)
    assert run.returncode == 1
    assert "error: hyper-parameter 'd' is an int, got string \"abc\"" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr


def test_cli_check_good_spec(tmp_path):
    run = _seqdsl("check", str(SPECS / "mamba.seq"), str(SPECS / "std" / "mlp.seq"),
                  cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "mamba.seq: ok (" in run.stdout and "mlp.seq: ok (library" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


def test_cli_check_mixed_files_fails(tmp_path):
    (tmp_path / "bad.seq").write_text(BAD_SPEC)
    run = _seqdsl("check", str(SPECS / "mamba.seq"), "bad.seq", cwd=tmp_path)
    assert run.returncode == 1
    assert "mamba.seq: ok (" in run.stdout
    assert "bad.seq:6:7: error:" in run.stderr
