"""No model name in the compiler's logic: every architecture is expressed with general concepts.

Scans seqdsl/ and backends/: identifiers (names, attributes, functions, classes, arguments) and
string constants used in logic (comparisons, membership tests, dict keys, match cases) must not
name a model. Comments, docstrings and help text may.
"""

from __future__ import annotations

import ast
import re

import pytest

from conftest import ROOT

MODEL_NAMES = re.compile(
    r"mamba|gateloop|deltaproduct|delta_?net|hgrn|griffin|hawk|min_?gru|min_?lstm|retnet|"
    r"\bgla\b|samba|jamba|llama|rg_?lru|rwkv|titans|qwen|gemma|zamba|bamba|nemotron|falcon",
    re.IGNORECASE)

#: seqdsl/interop/ is exempt: the importers are, by design, tables keyed by other libraries'
#: model names (model_type, architectures, parameter names); the compiler may not use them
INTEROP = ROOT / "seqdsl" / "interop"
SOURCES = sorted(p for d in ("seqdsl", "backends") for p in (ROOT / d).rglob("*.py")
                 if INTEROP not in p.parents)


def _logic_strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                for sub in ast.walk(operand):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        yield sub
        elif isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    yield key
        elif isinstance(node, ast.match_case):
            for sub in ast.walk(node.pattern):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub


def _identifiers(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node, node.id
        elif isinstance(node, ast.Attribute):
            yield node, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.name
        elif isinstance(node, ast.arg):
            yield node, node.arg


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_model_name_in_logic(path):
    tree = ast.parse(path.read_text())
    found = [f"{path.name}:{n.lineno}: identifier {name!r}" for n, name in _identifiers(tree)
             if MODEL_NAMES.search(name)]
    found += [f"{path.name}:{c.lineno}: string {c.value!r} used in logic"
              for c in _logic_strings(tree) if MODEL_NAMES.search(c.value)]
    assert not found, "model names in compiler logic:\n" + "\n".join(found)


def test_the_scan_would_find_a_special_case(tmp_path):
    bad = ast.parse('if spec.name == "mamba":\n    use_selective_scan = True\n')
    assert any(MODEL_NAMES.search(c.value) for c in _logic_strings(bad))
