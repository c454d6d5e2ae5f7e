"""The triton backend on every spec of the library, at a tiny size, under TRITON_INTERPRET=1.

For each spec compiled with ``backend="triton"``: outputs and final states of the Triton path equal
the torch reference path's; gradients of parameters and of the initial state agree; packed
sequences equal a loop; a prefix forward followed by step() calls equals the full forward.
Per-spec tests use short sequences (the interpreter is slow, and below 64 steps the scans take
their step kernels); T = 40 on Mamba crosses the recurrent kernels' checkpoint interval (32), so
the backward restarts from a checkpoint. tests/test_triton_recurrent.py covers the recurrent and
block-scan families per decay kind. The generated kernels are built for sm90 by ``seqdsl kernels`` in a subprocess (the
interpreter must be off there).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import seqdsl  # noqa: E402
from seqdsl.compiler import generate  # noqa: E402
from seqdsl.ops.tolerances import assert_close  # noqa: E402

from conftest import MODEL_SPECS, ROOT, prefix_then_steps, tiny_overrides  # noqa: E402
import triton_harness as th  # noqa: E402  (where the kernels run: th.DEVICE)

pytestmark = th.runs_kernels
interpreter_only = pytest.mark.skipif(not th.ts.INTERPRET,
                                      reason="checks the interpreter's refusal")


def _kernels(module):
    return sys.modules[module.__name__ + ".kernels"]


@pytest.fixture(scope="module", params=MODEL_SPECS, ids=[p.stem for p in MODEL_SPECS])
def compiled(request):
    path = request.param
    module = seqdsl.compile(path, backend="triton", **tiny_overrides(path))
    if not _kernels(module).REGISTRY.kernels:
        pytest.skip(f"{path.stem}: no core with a generated kernel family")
    torch.manual_seed(0)
    return path, module, module.Model().float().to(th.DEVICE)


def _ids(model, B=2, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.embed.num_embeddings, (B, T), generator=g).to(th.DEVICE)


def _tensors(state):
    """The float tensors of a model state (nested dicts; KV caches are (k, v, seen))."""
    if isinstance(state, dict):
        for key in sorted(state):
            yield from _tensors(state[key])
    elif isinstance(state, (list, tuple)):
        for item in state:
            yield from _tensors(item)
    elif isinstance(state, torch.Tensor) and (state.is_floating_point() or state.is_complex()):
        yield state


def _run(model, backend, *args, **kwargs):
    model.backend = backend
    try:
        return model(*args, **kwargs)
    finally:
        model.backend = "auto"


def test_forward_and_final_states_match_the_reference(compiled):
    _, _, model = compiled
    ids = _ids(model, T=21)
    with torch.no_grad():
        fast, fast_state = _run(model, "triton", ids)
        ref, ref_state = model(ids, reference=True)
    assert_close(fast, ref, torch.float32, "triton vs reference logits")
    pairs = list(zip(_tensors(fast_state), _tensors(ref_state), strict=True))
    for i, (a, b) in enumerate(pairs):
        assert_close(a, b, torch.float32, f"final state tensor {i}")


def test_gradients_match_including_the_initial_state(compiled, T=17):
    _, _, model = compiled
    ids = _ids(model, T=T)
    with torch.no_grad():
        _, state0 = model(ids[:, :4], reference=True)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*ids.shape, model.embed.num_embeddings, generator=g).to(ids.device)
    grads = []
    for backend, reference in (("triton", False), ("torch", True)):
        model.zero_grad()
        state = _detach(state0)
        leaves = [t for t in _tensors(state)]
        logits, final = _run(model, backend, ids[:, 4:], state, reference=reference)
        loss = (logits * w[:, 4:]).sum()
        for i, s in enumerate(_tensors(final)):
            s = torch.view_as_real(s) if s.is_complex() else s
            loss = loss + (s * torch.randn(s.shape, generator=torch.Generator().manual_seed(i))
                           .to(s.device)).sum()
        loss.backward()
        named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        named.update({f"initial state {i}": t.grad.clone() for i, t in enumerate(leaves)
                      if t.grad is not None})
        grads.append(named)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(k.startswith("initial state") for k in grads[0])
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], torch.float32, f"grad of {name}",
                     model_gradient=True)


def _detach(state):
    if isinstance(state, dict):
        return {k: _detach(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_detach(v) for v in state]
    if isinstance(state, tuple):
        return tuple(_detach(v) for v in state)
    if isinstance(state, torch.Tensor) and (state.is_floating_point() or state.is_complex()):
        return state.detach().clone().requires_grad_(True)
    return state


@pytest.mark.parametrize("name", ["mamba"])
def test_long_sequences_restart_the_backward_from_checkpoints(name):
    path = ROOT / "specs" / f"{name}.seq"
    module = seqdsl.compile(path, backend="triton", **tiny_overrides(path))
    torch.manual_seed(0)
    test_gradients_match_including_the_initial_state(
        (path, module, module.Model().float().to(th.DEVICE)), T=40)


def test_packed_sequences_equal_a_loop(compiled):
    _, _, model = compiled
    lengths = [5, 9, 3]
    ids = _ids(model, B=1, T=sum(lengths))
    cu = torch.tensor([0, 5, 14, 17], device=th.DEVICE)
    with torch.no_grad():
        packed, _ = _run(model, "triton", ids, cu_seqlens=cu)
        pieces = [_run(model, "triton", ids[:, a:b])[0]
                  for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert_close(packed, torch.cat(pieces, 1), torch.float32, "cu_seqlens vs loop")


def test_prefix_then_steps_equals_full_forward(compiled):
    _, _, model = compiled
    ids = _ids(model, T=9)
    model.backend = "triton"
    try:
        with torch.no_grad():
            full, _ = model(ids)
            stepped = prefix_then_steps(model, ids, 6)
    finally:
        model.backend = "auto"
    assert_close(stepped, full, torch.float32, "prefix + step vs full forward")


def test_auto_backend_runs_torch_on_cpu_tensors_and_triton_on_cuda(compiled):
    _, _, model = compiled
    ids = _ids(model, T=5)
    with torch.no_grad():
        auto, _ = model(ids)
        chosen, _ = _run(model, "triton" if ids.is_cuda else "torch", ids)
    assert torch.equal(auto, chosen)


def test_generated_kernels_are_readable_and_deterministic():
    path = ROOT / "specs" / "gated_deltanet.seq"
    program = seqdsl.load(path, **tiny_overrides(path))
    first, second = generate(program, "triton"), generate(program, "triton")
    assert first == second
    kernels = first["kernels.py"]
    ast.parse(kernels)
    assert kernels.startswith("# Generated by seqdsl") and "do not edit" in kernels.splitlines()[0]
    assert "(gated_deltanet.seq:" in kernels  # the spec line of each site
    # the IR fused the producers of q, k and beta into the kernels: the model no longer computes them
    assert "fused into the kernels: beta = sigmoid(beta); k = l2norm(k); q = l2norm(q)" in kernels
    assert "rt.l2norm" not in first["model.py"] and "kernel=K.gated_deltanet_y" in first["model.py"]


def test_mamba_fuses_dt_and_the_input_scaling():
    path = ROOT / "specs" / "mamba.seq"
    files = generate(seqdsl.load(path, **tiny_overrides(path)), "triton")
    assert "fused into the kernels: dt = softplus(dt); v = dt * v" in files["kernels.py"]
    assert "F.softplus" not in files["model.py"]  # computed in the kernels (and the torch path)


def test_seqdsl_kernels_builds_every_kernel_for_sm90(tmp_path):
    """Every kernel of every spec compiles for Hopper without register spills, and every kernel
    that uses tl.dot uses tensor-core instructions (the command exits 1 otherwise)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "kernels.md"
    result = subprocess.run([sys.executable, "-m", "seqdsl.cli", "kernels",
                             *[str(p) for p in MODEL_SPECS], "--target", "sm90",
                             "--report", str(report)],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert text.count("## ") == len(MODEL_SPECS)
    assert "| ok |" in text


def test_compile_cli_writes_the_kernels_next_to_the_model(tmp_path):
    from seqdsl.cli import main

    assert main(["compile", str(ROOT / "specs" / "hgrn.seq"), "-o", str(tmp_path), "--backend",
                 "triton", "--set", "d=32", "--set", "depth=1", "--set", "vocab=50"]) == 0
    folder = tmp_path / "hgrn"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "__init__.py", "kernels.py",
                                                         "model.py"]
    kernels = (folder / "kernels.py").read_text()
    assert kernels.startswith("# Generated by seqdsl") and "(hgrn.seq:" in kernels
    sys.path.insert(0, str(tmp_path))
    try:
        import hgrn  # noqa: F401  (the written package imports: model.py uses its kernels.py)
        model = hgrn.Model().to(th.DEVICE)
        model.backend = "triton"
        ids = torch.randint(0, 50, (1, 5)).to(th.DEVICE)
        with torch.no_grad():
            out, _ = model(ids)
            ref, _ = model(ids, reference=True)
        assert_close(out, ref, torch.float32, "written package, triton vs reference")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("hgrn", None)
        sys.modules.pop("hgrn.model", None)
        sys.modules.pop("hgrn.kernels", None)


@pytest.mark.parametrize("name", ["mamba", "gated_deltanet", "gla", "transformer"])
def test_fp16_triton_path_is_as_accurate_as_the_torch_path(name):
    """fp16 parameters and activations (the interpreter cannot run bf16 tl.dot): the Triton
    path's error against the fp32 reference is no worse than the torch path's in fp16 (1.5x),
    plus the fp16 tolerance. Two fp16 model paths differ by more than one op's fp16 tolerance
    (errors compound over layers), so they are compared through their distance to fp32."""
    from seqdsl.ops.tolerances import errors, tolerance

    path = ROOT / "specs" / f"{name}.seq"
    module = seqdsl.compile(path, backend="triton", **tiny_overrides(path))
    torch.manual_seed(0)
    model = module.Model().to(th.DEVICE)
    ids = _ids(model, T=21)
    with torch.no_grad():
        ref32, _ = model(ids, reference=True)
        model.half()
        torch16, _ = _run(model, "torch", ids)
        triton16, _ = _run(model, "triton", ids)
    assert triton16.dtype == torch.float16 and torch.isfinite(triton16).all()
    err_triton, err_torch = errors(triton16, ref32)[0], errors(torch16, ref32)[0]
    assert err_triton <= 1.5 * err_torch + tolerance(torch.float16).rel_rms, (err_triton, err_torch)


@interpreter_only
def test_seqdsl_kernels_refuses_to_build_interpreted_kernels(capsys):
    """Under TRITON_INTERPRET=1 the kernels are interpreter functions: no GPU build, exit 2."""
    from seqdsl.cli import main

    assert main(["kernels", "hgrn", "--target", "sm90"]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["hgrn", "mamba"])
def test_generated_kernels_snapshot(name):
    """The generated kernels.py of small specs, kept as reviewed text (tests/snapshots): a change
    of the generator shows up here as a readable diff."""
    from conftest import assert_snapshot

    path = ROOT / "specs" / f"{name}.seq"
    files = generate(seqdsl.load(path, **tiny_overrides(path)), "triton")
    assert_snapshot(f"{name}_tiny_kernels.py.txt", files["kernels.py"])
    assert_snapshot(f"{name}_tiny_triton_model.py.txt", files["model.py"])
