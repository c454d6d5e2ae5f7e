"""docs/language.md stays true to the implementation.

* every built-in function, init rule, pattern function and model setting is documented, with the
  signature that ``seqdsl/ir/builtins.py`` gives it (the reference tables are generated from that
  table: a change there must be mirrored in the manual);
* every ```seq block of the manual is a spec (a model, or a library of definitions) that loads;
* every ```seq-error block raises SpecError, and when a ```text block showing the diagnostics
  follows it (starting with ``example.seq:``), the diagnostics are exactly those shown.
  After changing a message on purpose, ``SEQDSL_UPDATE_DOCS=1 pytest tests/test_docs.py``
  rewrites those ```text blocks (review the diff).

Examples are loaded as if they were the file ``docs/example.seq``, so ``import "std/..."``
resolves to the bundled standard library.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import seqdsl
from seqdsl.diagnostics import SpecError
from seqdsl.frontend.spec import MODEL_SETTINGS
from seqdsl.ir.builtins import BUILTINS, INIT_RULES, PATTERN_FUNCTIONS, RESERVED_NAMES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MANUAL = DOCS / "language.md"
EXAMPLE = DOCS / "example.seq"  # never written: examples are loaded from text

_FENCE = re.compile(r"^```([A-Za-z0-9_-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _text() -> str:
    return MANUAL.read_text()


def _blocks() -> list[tuple[str, str, int]]:
    """(tag, body, line of the opening fence) for every fenced block, in order."""
    text = _text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in _FENCE.finditer(text)]


def _examples(tag: str):
    blocks = _blocks()
    out = []
    for i, (t, body, line) in enumerate(blocks):
        if t != tag:
            continue
        shown = None
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text" and \
                blocks[i + 1][1].startswith(EXAMPLE.name + ":"):
            shown = blocks[i + 1][1]
        out.append(pytest.param(body, shown, id=f"line{line}"))
    return out


def _init_signature(name: str) -> str:
    args = [a.name if a.required else f"{a.name}={a.default}" for a in INIT_RULES[name].args]
    return f"{name}({', '.join(args)})"


def test_manual_exists_and_has_examples():
    assert MANUAL.is_file()
    tags = [t for t, _, _ in _blocks()]
    assert tags.count("seq") >= 10 and tags.count("seq-error") >= 3


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_is_documented_with_its_signature(name):
    text = _text()
    assert f"`{name}`" in text, f"builtin {name} is not documented in {MANUAL}"
    sig = BUILTINS[name].signature()
    assert f"`{sig}`" in text, f"the manual should show the signature `{sig}`"


@pytest.mark.parametrize("name", sorted(INIT_RULES))
def test_every_init_rule_is_documented_with_its_signature(name):
    text = _text()
    assert f"`{name}`" in text, f"init rule {name} is not documented in {MANUAL}"
    sig = _init_signature(name)
    assert f"`{sig}`" in text, f"the manual should show the init rule as `{sig}`"


@pytest.mark.parametrize("name", sorted(MODEL_SETTINGS))
def test_every_model_setting_is_documented(name):
    assert f"`{name}`" in _text(), f"model setting {name} is not documented in {MANUAL}"


@pytest.mark.parametrize("name", sorted(PATTERN_FUNCTIONS) + sorted(RESERVED_NAMES))
def test_pattern_functions_and_reserved_names_are_documented(name):
    assert f"`{name}`" in _text()


@pytest.mark.parametrize("body, shown", _examples("seq"))
def test_seq_examples_load(body, shown):
    try:
        seqdsl.load(EXAMPLE, text=body, verify=True)
    except SpecError as err:
        pytest.fail("a ```seq example of the manual does not check:\n" + _render(err))


@pytest.mark.parametrize("body, shown", _examples("seq-error"))
def test_seq_error_examples_fail_as_shown(body, shown):
    with pytest.raises(SpecError) as info:
        seqdsl.load(EXAMPLE, text=body)
    if shown is not None and os.environ.get("SEQDSL_UPDATE_DOCS") != "1":
        assert _render(info.value) == shown.rstrip("\n"), \
            "the diagnostics shown in the manual differ from what seqdsl reports " \
            "(SEQDSL_UPDATE_DOCS=1 rewrites them)"


@pytest.mark.skipif(os.environ.get("SEQDSL_UPDATE_DOCS") != "1",
                    reason="set SEQDSL_UPDATE_DOCS=1 to rewrite the diagnostics shown in the manual")
def test_update_shown_diagnostics():
    text = _text()
    matches = list(_FENCE.finditer(text))
    out, pos = [], 0
    for prev, m in zip(matches, matches[1:]):
        if prev.group(1) != "seq-error" or m.group(1) != "text" or \
                not m.group(2).startswith(EXAMPLE.name + ":"):
            continue
        try:
            seqdsl.load(EXAMPLE, text=prev.group(2))
        except SpecError as err:
            out.append(text[pos:m.start(2)] + _render(err) + "\n")
            pos = m.end(2)
    out.append(text[pos:])
    MANUAL.write_text("".join(out))


def _render(err: SpecError) -> str:
    """The diagnostics as `seqdsl check example.seq` prints them."""
    n = len(err.diagnostics)
    text = err.render().replace(str(EXAMPLE), EXAMPLE.name)
    return f"{text}\n{n} error{'s' if n != 1 else ''}"
