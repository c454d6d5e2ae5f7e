"""`seqdsl compile` / `seqdsl.compile`: importable packages, atomic writes, the cache."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import seqdsl  # noqa: E402
from seqdsl.cli import main  # noqa: E402

from conftest import SPECS  # noqa: E402

TINY = ["--set", "vocab=50", "--set", "d=16", "--set", "depth=2"]


def test_compile_writes_an_importable_package(tmp_path, capsys):
    assert main(["compile", str(SPECS / "mamba.seq"), "-o", str(tmp_path), *TINY]) == 0
    assert "from mamba import Model, Config" in capsys.readouterr().out
    package = tmp_path / "mamba"
    assert sorted(p.name for p in package.iterdir()) == ["README.md", "__init__.py", "model.py"]
    code = ("import torch; from mamba import Model, Config; m = Model(); "
            "print(m(torch.zeros(1, 3, dtype=torch.long))[0].shape, Config())")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "torch.Size([1, 3, 50])" in run.stdout and "d=16" in run.stdout


def test_a_failed_compile_leaves_nothing_behind(tmp_path, capsys):
    bad = tmp_path / "bad.seq"
    bad.write_text("model m(vocab = 10, d = 8) { layers = [b] }\nblock b { x = x + sigmod(x) }\n")
    out = tmp_path / "out"
    assert main(["compile", str(bad), "-o", str(out)]) == 1
    assert "unknown function 'sigmod'" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_recompiling_replaces_the_package_atomically(tmp_path):
    main(["compile", str(SPECS / "mamba.seq"), "-o", str(tmp_path), *TINY])
    main(["compile", str(SPECS / "mamba.seq"), "-o", str(tmp_path), *TINY[:-2], "--set", "depth=3"])
    text = (tmp_path / "mamba" / "model.py").read_text()
    assert "depth: int = 3" in text
    assert [p.name for p in tmp_path.iterdir()] == ["mamba"]  # no temporary folders left


def test_config_is_checked_against_the_compiled_values():
    module = seqdsl.compile(SPECS / "mamba.seq", vocab=50, d=16, depth=2)
    with pytest.raises(ValueError, match="recompile"):
        module.Model(module.Config(d=32))


def test_in_process_compile_is_cached_and_keyed_by_overrides():
    a = seqdsl.compile(SPECS / "mamba.seq", vocab=50, d=16, depth=2)
    b = seqdsl.compile(SPECS / "mamba.seq", vocab=50, d=16, depth=2)
    c = seqdsl.compile(SPECS / "mamba.seq", vocab=50, d=16, depth=3)
    assert a is b and a is not c
    assert c.Config().depth == 3


def test_tracebacks_from_generated_code_show_source_lines():
    module = seqdsl.compile(SPECS / "mamba.seq", vocab=50, d=16, depth=2)
    model = module.Model()
    with pytest.raises(Exception) as info:
        model(torch.zeros(1, 3, 5, dtype=torch.long))  # wrong rank: fails inside generated code
    frames = [e for e in info.traceback if str(e.path).endswith("model.py")]
    assert frames and all(e.statement is not None for e in frames)  # real source lines


def test_compile_text_in_process():
    text = (SPECS / "hgrn.seq").read_text()
    module = seqdsl.compile(SPECS / "hgrn_copy.seq", text=text, vocab=30, d=8, depth=2)
    logits, state = module.Model()(torch.zeros(2, 4, dtype=torch.long))
    assert logits.shape == (2, 4, 30) and len(state) == 2


def test_text_sources_of_the_same_name_are_cached_apart(tmp_path, monkeypatch):
    """The cache key hashes the text compiled, not a file that happens to share its name."""
    monkeypatch.chdir(tmp_path)
    a = "model m(vocab = 10, d = 8) { layers = [b] }\nblock b { x = x + proj(x, d) }\n"
    b = a.replace("proj(x, d)", "proj(x, d, bias = true)")
    (tmp_path / "m.seq").write_text(a)
    ma = seqdsl.compile("m.seq", text=a)
    mb = seqdsl.compile("m.seq", text=b)
    assert ma is not mb
    assert "layers.0.proj.bias" in mb.Model().state_dict()
    assert "layers.0.proj.bias" not in ma.Model().state_dict()


def _write_many(args):
    from pathlib import Path

    from seqdsl.compiler import _write_atomically
    root, worker, replace = args
    for i in range(25):
        files = {"model.py": f"WORKER, ROUND = {worker}, {i}\n", "pad.txt": "x" * 4096}
        _write_atomically(files, Path(root) / "pkg", replace=replace)
    return worker


@pytest.mark.parametrize("replace", [True, False], ids=["replace (-o DIR)", "keep (cache)"])
def test_concurrent_writers_never_fail_nor_leave_debris(tmp_path, replace):
    """Processes writing one package at once (the compile cache under concurrent compiles,
    `seqdsl compile -o DIR` run twice): every write succeeds, the package ends whole, and no
    temporary folder is left."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert sorted(pool.map(_write_many, [(str(tmp_path), w, replace) for w in range(4)])) \
            == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["model.py", "pad.txt"]
    assert (tmp_path / "pkg" / "model.py").read_text().startswith("WORKER, ROUND = ")
    assert len((tmp_path / "pkg" / "pad.txt").read_text()) == 4096


def test_written_packages_follow_the_umask(tmp_path):
    """Not mkdtemp's 0700: a shared cache is readable by whoever the umask allows."""
    import os

    from seqdsl.compiler import _write_atomically
    old = os.umask(0o022)
    try:
        _write_atomically({"model.py": "\n"}, tmp_path / "pkg")
    finally:
        os.umask(old)
    assert (tmp_path / "pkg").stat().st_mode & 0o777 == 0o755


def test_compile_replaces_only_what_seqdsl_wrote(tmp_path, capsys):
    """`-o DIR` never deletes a user's folder that happens to carry the model's name, nor a file."""
    spec_dir = tmp_path / "mamba"
    spec_dir.mkdir()
    (spec_dir / "NOTES.md").write_text("mine\n")
    assert main(["compile", str(SPECS / "mamba.seq"), "-o", str(tmp_path), *TINY]) == 1
    assert "was not written by seqdsl: not replacing it" in capsys.readouterr().err
    assert [p.name for p in spec_dir.iterdir()] == ["NOTES.md"]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mamba").write_text("a file\n")
    assert main(["compile", str(SPECS / "mamba.seq"), "-o", str(tmp_path / "x"), *TINY]) == 1
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "y" / "mamba"
    empty.mkdir(parents=True)     # an empty folder of that name is fine to fill
    assert main(["compile", str(SPECS / "mamba.seq"), "-o", str(tmp_path / "y"), *TINY]) == 0


def test_unwritable_output_is_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["compile", str(SPECS / "mamba.seq"), "-o", str(tmp_path / "afile"), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("seqdsl compile: ") and "Traceback" not in err


def test_a_model_named_like_an_installed_module_is_refused(tmp_path, capsys):
    spec = tmp_path / "t.seq"
    spec.write_text("model torch(vocab = 10, d = 8) { layers = [b] }\nblock b { x = x + x }\n")
    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == 1
    assert "t.seq:1:7: error: a package named 'torch' would clash" in capsys.readouterr().err
    assert not (tmp_path / "out" / "torch").exists()


def test_odd_file_names_stay_out_of_the_generated_code(tmp_path):
    """Quotes, backslashes and newlines in a spec's file name are escaped in the comments and
    docstrings that name it; the overrides appear in the regenerate line."""
    import ast

    name = 'a"""b\\c\nd.seq'
    (tmp_path / name).write_text((SPECS / "mamba.seq").read_text())
    from seqdsl.compiler import compile_to_dir
    target = compile_to_dir(tmp_path / name, tmp_path / "out", vocab=50, d=16, depth=2)
    text = (target / "model.py").read_text()
    ast.parse(text)
    ast.parse((target / "__init__.py").read_text())
    assert text.splitlines()[1] == ("# Regenerate with: seqdsl compile "
                                    "'a\\\"\\\"\\\"b\\\\c\\nd.seq' --set d=16 --set depth=2 "
                                    "--set vocab=50")
    assert '"""b' not in text


def test_a_constant_scan_multiplier_runs():
    text = ("model m(vocab = 20, d = 8) { layers = [b] }\nblock b { x = x + f(x) }\n"
            "mixer f { return scan(a = 0.5, b = proj(x, d)) }\n")
    model = seqdsl.compile("const_scan.seq", text=text).Model()
    ids = torch.randint(0, 20, (2, 5))
    fast, _ = model(ids)
    ref, _ = model(ids, reference=True)
    assert torch.allclose(fast, ref, atol=1e-5)


@pytest.mark.parametrize("args", [["--prompt", "0"], ["--prompt", "-3"], ["--new-tokens", "-1"]])
def test_demo_checks_its_numbers(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", str(SPECS / "mamba.seq"), *args])
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_a_config_that_is_not_a_json_object_is_an_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[]")
    assert main(["import", "hf", str(tmp_path / "config.json")]) == 1
    assert "not a transformers config: a JSON list" in capsys.readouterr().err


def test_a_whole_model_pickles_into_a_fresh_process(tmp_path):
    """Generated modules have importable names (seqdsl.generated.m<key>.model), so
    torch.save(model) loads in another process from the compile cache."""
    module = seqdsl.compile(SPECS / "mamba.seq", vocab=50, d=16, depth=2)
    assert module.__name__.startswith("seqdsl.generated.m")
    torch.manual_seed(0)
    model = module.Model().eval()
    ids = torch.randint(0, 50, (1, 5))
    torch.save({"model": model, "ids": ids, "logits": model(ids)[0].detach()},
               tmp_path / "whole.pt")
    code = ("import torch; d = torch.load(r'%s', weights_only=False); "
            "print(torch.equal(d['model'](d['ids'])[0], d['logits']))" % (tmp_path / "whole.pt"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr
