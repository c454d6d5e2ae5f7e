"""Shared test helpers: paths, the spec library, snapshot comparison and numeric tolerances."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"

#: every model spec of the library (std/ holds library files without a model)
MODEL_SPECS = sorted(SPECS.glob("*.seq"))
LIBRARY_SPECS = sorted((SPECS / "std").glob("*.seq"))


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
