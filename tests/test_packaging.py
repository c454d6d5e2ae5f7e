"""A plain (non-editable) install ships the grammar, the standard library and the templates."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("seqdsl-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "seqdsl/grammar/seq.lark" in names
    assert "seqdsl/specs/std/mlp.seq" in names
    assert "seqdsl/specs/mamba.seq" in names
    assert "seqdsl/backends/base.py" in names
    assert any(n.startswith("seqdsl/backends/torch/templates/") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    # every package of the source tree ships
    for init in (ROOT / "seqdsl").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} is missing from the wheel (add it to pyproject.toml)"


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    user = tmp_path / "work"
    user.mkdir()
    (user / "tiny.seq").write_text(
        '# a user spec importing the standard library\nimport "std/mlp.seq"\n'
        "model tiny(vocab = 100, d = 32) { layers = [b] * 2 }\n"
        "block b { x = x + swiglu(rmsnorm(x)) }\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    code = ("import seqdsl, importlib.resources as r, sys; print(seqdsl.__file__); "
            "import seqdsl.runtime, seqdsl.ops, seqdsl.backends.torch.codegen; "
            "p = r.files('seqdsl.specs') / 'mamba.seq'; "
            "from seqdsl.cli import main; sys.exit(main(['check', str(p), 'tiny.seq']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=user, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    first = run.stdout.splitlines()[0]
    assert first.startswith(str(site)), f"imported the checkout, not the wheel: {first}"
    assert "tiny.seq: ok" in run.stdout and "mamba.seq: ok" in run.stdout
