"""Shared test helpers: paths, the spec library, snapshot comparison and numeric tolerances."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# compiled modules go to a private cache, not the user's ~/.cache
os.environ.setdefault("SEQDSL_CACHE", tempfile.mkdtemp(prefix="seqdsl-test-cache-"))
# generated Triton kernels run on CPU tensors through triton's interpreter (set before any kernel
# module is imported: @triton.jit reads it when it wraps a function)
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"

#: every model spec of the library (std/ holds library files without a model)
MODEL_SPECS = sorted(SPECS.glob("*.seq"))
LIBRARY_SPECS = sorted((SPECS / "std").glob("*.seq"))


#: hyper-parameters that make each spec tiny (the spec's defaults are full-size models)
COMMON = {"vocab": 61, "d": 40, "depth": 2}
TINY = {
    "mamba2": {"mamba2.n": 8, "mamba2.hd": 8},
    "gateloop": {"gateloop.heads": 2},
    "deltaproduct": {"deltaproduct.heads": 2, "deltaproduct.hd": 8},
    "deltanet": {"deltanet.heads": 2},
    "deltanet_swa": {"window": 4, "deltanet.heads": 2},
    "gated_deltanet": {"gated_deltanet.heads": 2, "gated_deltanet.hd": 8},
    "gla": {"gla.heads": 2},
    "griffin": {"depth": 3, "rglru.heads": 2},
    "hawk": {"rglru.heads": 2},
    "hgrn2": {"hgrn2.expand_ratio": 8},
    "retnet": {"retention.heads": 2},
    "samba": {"window": 4},
    "transformer": {"heads": 4, "kv_heads": 2, "hidden": 48},
    "jamba": {"depth": 8, "hidden": 48},
}


def tiny_overrides(path) -> dict:
    import seqdsl

    program = seqdsl.load(path)
    out = {k: v for k, v in COMMON.items() if k in program.config}
    for key, value in TINY.get(path.stem, {}).items():
        if "." in key:
            dname, pname = key.split(".")
            d = program.spec.definitions.get(dname)
            if d is None or pname not in [h.name for h in d.hyper]:
                continue  # the spec spells this differently; its default is used
        out[key] = value
    return out


def prefix_then_steps(model, ids, prefix: int):
    """Logits of a forward over ids[:, :prefix] followed by one step() per remaining token."""
    logits, state = model(ids[:, :prefix])
    outs = [logits]
    for t in range(prefix, ids.shape[1]):
        step_logits, state = model.step(ids[:, t], state)
        outs.append(step_logits[:, None])
    import torch
    return torch.cat(outs, 1)


def assert_greedy_matches(ours, hf, ids, prompt: int = 5, new_tokens: int = 20) -> None:
    """Greedy decoding through our step(): every generated token must be the transformers
    model's argmax given the tokens before it (one full forward of theirs checks them all;
    transformers' own generate() is not the oracle: its Jamba cache path on CPU disagrees with
    its full forward)."""
    import torch
    with torch.no_grad():
        mine = ours.generate(ids[:, :prompt], max_new_tokens=new_tokens, temperature=0)
        theirs = hf(mine).logits.argmax(-1)
    assert mine.shape == (ids.shape[0], prompt + new_tokens)
    assert torch.equal(mine[:, prompt:], theirs[:, prompt - 1:-1])


def assert_snapshot(name: str, text: str) -> None:
    """Compare with tests/snapshots/NAME; SEQDSL_UPDATE_SNAPSHOTS=1 rewrites the file."""
    path = SNAPSHOTS / name
    if os.environ.get("SEQDSL_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        if os.environ.get("CI") and not path.exists():
            pytest.fail(f"snapshot {name} is missing; run with SEQDSL_UPDATE_SNAPSHOTS=1 and commit it")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    expected = path.read_text()
    assert text == expected, f"snapshot {name} differs; run with SEQDSL_UPDATE_SNAPSHOTS=1 to update"
