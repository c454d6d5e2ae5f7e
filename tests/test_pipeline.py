"""The pass pipeline on the whole spec library: verify() after every pass, stable IR dumps."""

from __future__ import annotations

import pytest

import seqdsl
from seqdsl.frontend.spec import load_spec
from seqdsl.ir.graph import Program
from seqdsl.ir.ops import CORES, Op
from seqdsl.ir.printer import format_program
from seqdsl.ir.verify import IRError, verify
from seqdsl.passes import PASS_NAMES, PIPELINE, run_pipeline

from conftest import LIBRARY_SPECS, MODEL_SPECS, SPECS, assert_snapshot


def _ids(paths):
    return [p.name for p in paths]


@pytest.mark.parametrize("path", MODEL_SPECS + LIBRARY_SPECS, ids=_ids(MODEL_SPECS + LIBRARY_SPECS))
def test_verify_after_every_pass(path):
    stages = []

    def check(program):
        verify(program)
        stages.append(program.stage)

    program = run_pipeline(Program(spec=load_spec(path)), after_each=check)
    assert stages == PASS_NAMES
    if program.spec.model is not None:
        assert program.layers, "a model has layers"
        assert any(n.op in CORES for _, g in program.graphs() for n in g.nodes()), \
            "every library model mixes time through at least one core"


def test_library_has_the_issue_specs():
    names = {p.stem for p in MODEL_SPECS}
    p0 = {"mamba", "gateloop", "deltaproduct", "hgrn", "griffin"}
    assert p0 <= names


@pytest.mark.parametrize("path", MODEL_SPECS, ids=_ids(MODEL_SPECS))
def test_spec_header_comment(path):
    """Each spec opens with the paper title and its recurrence in a comment, and stays short."""
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# "), f"{path.name} must open with a comment naming the paper"
    assert len(lines) <= 60, f"{path.name} has {len(lines)} lines; specs stay short"


@pytest.mark.parametrize("name", ["mamba", "hgrn", "griffin", "deltaproduct", "gateloop"])
def test_ir_snapshot(name):
    program = seqdsl.load(SPECS / f"{name}.seq")
    assert_snapshot(f"{name}.ir", format_program(program))


@pytest.mark.parametrize("stage", PASS_NAMES)
def test_ir_after_each_pass_is_deterministic(stage):
    a = format_program(seqdsl.load(SPECS / "griffin.seq", until=stage))
    b = format_program(seqdsl.load(SPECS / "griffin.seq", until=stage))
    assert a == b
    assert f"after {stage}" in a


def test_verify_catches_a_broken_graph():
    program = seqdsl.load(SPECS / "mamba.seq")
    graph = program.blocks["mamba_block"].graph.copy()
    victim = next(n for n in graph.nodes() if n.op is Op.PROJ)
    graph.set(victim.replace(type=None))
    broken = program.replace(blocks={"mamba_block": program.blocks["mamba_block"].__class__(
        "mamba_block", "mamba_block", (), victim.span, graph)})
    with pytest.raises(IRError, match="has no type"):
        verify(broken)


def test_overrides_change_shapes_and_symbols():
    program = seqdsl.load(SPECS / "mamba.seq", d=256, depth=2, mamba={"expand": 4})
    text = format_program(program)
    assert "[e=1024]" in text  # e = expand * d = 4 * 256
    assert len(program.layers) == 2


def test_pipeline_is_one_list_of_named_passes():
    assert [name for name, _ in PIPELINE] == PASS_NAMES
    assert all(fn.__name__ == name for name, fn in PIPELINE)
