"""Golden outputs of every spec in the library (recorded with `seqdsl golden --update`)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from seqdsl import golden  # noqa: E402
from seqdsl.cli import main  # noqa: E402

from conftest import MODEL_SPECS, tiny_overrides  # noqa: E402


@pytest.mark.parametrize("path", MODEL_SPECS, ids=[p.stem for p in MODEL_SPECS])
def test_golden_outputs(path):
    result = golden.check(path)
    assert result.ok, f"{path.name}: {result.message}"
    stored = json.loads(result.path.read_text())["overrides"]
    assert stored == tiny_overrides(path), "golden file recorded with other overrides"


def test_golden_detects_a_change(tmp_path, capsys):
    spec = MODEL_SPECS[0]
    overrides = tiny_overrides(spec)
    target = golden.record(spec, overrides, folder=tmp_path)
    data = json.loads(target.read_text())
    data["logits"][0] += 1.0
    target.write_text(json.dumps(data))
    assert main(["golden", str(spec), "--dir", str(tmp_path)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_missing_golden_file_is_reported(tmp_path, capsys):
    assert main(["golden", str(MODEL_SPECS[0]), "--dir", str(tmp_path)]) == 1
    assert "--update" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["{bad", "[]", "{}", '{"input_ids": [1, 2]}'],
                         ids=["not JSON", "a list", "empty", "no logits"])
def test_a_damaged_golden_file_is_a_mismatch_not_a_traceback(tmp_path, capsys, content):
    spec = MODEL_SPECS[0]
    (tmp_path / f"{spec.stem}.json").write_text(content)
    assert main(["golden", str(spec), "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "is not a golden file of this format" in out and "--update" in out


def test_a_spec_error_comes_before_a_missing_golden_file(tmp_path, capsys):
    bad = tmp_path / "bad.seq"
    bad.write_text("model m(vocab = 10, d = 8) { layers = [b] }\nblock b { x = x + sigmod(x) }\n")
    assert main(["golden", str(bad), "--dir", str(tmp_path)]) == 1
    assert "unknown function 'sigmod'" in capsys.readouterr().err
