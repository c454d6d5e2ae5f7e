"""Golden outputs: record a spec's model outputs once, check them on every change.

``seqdsl golden FILE --update`` compiles the spec (with the overrides given, which are stored),
initialises the model from a fixed seed, runs the sequential reference path on a fixed input and
writes the logits to ``<spec folder>/golden/<name>.json``. ``seqdsl golden FILE`` recomputes and
compares, reporting relative RMS and max-abs errors. A change in the language, the compiler, the
generated code or the cores that alters a model's numerics shows up here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
REL_TOL = 1e-4  # fp32 reference path; allows for BLAS differences between machines


@dataclass
class GoldenResult:
    path: Path
    ok: bool
    rel_rms: float
    max_abs: float
    message: str


def golden_path(spec_path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    spec_path = Path(spec_path)
    base = Path(folder) if folder is not None else spec_path.parent / "golden"
    return base / f"{spec_path.stem}.json"


def _compute(spec_path, overrides: dict[str, Any], seed: int, batch: int, length: int):
    import torch

    import seqdsl

    module = seqdsl.compile(spec_path, **overrides)
    torch.manual_seed(seed)
    model = module.Model().float().eval()
    vocab = model.embed.num_embeddings
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    with torch.no_grad():
        logits, _ = model(ids, reference=True)
    return ids, logits


def record(spec_path, overrides: dict[str, Any] | None = None, folder=None, seed: int = 0,
           batch: int = 2, length: int = 8) -> Path:
    from seqdsl import __version__

    overrides = dict(overrides or {})
    ids, logits = _compute(spec_path, overrides, seed, batch, length)
    target = golden_path(spec_path, folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FORMAT, "spec": Path(spec_path).name, "recorded_with": f"seqdsl {__version__}",
        "overrides": overrides, "seed": seed, "input_ids": ids.tolist(),
        "logits_shape": list(logits.shape),
        "logits": [float(f"{v:.7g}") for v in logits.flatten().tolist()],
    }
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    os.replace(tmp, target)
    return target


def check(spec_path, folder=None) -> GoldenResult:
    import torch

    target = golden_path(spec_path, folder)
    if not target.is_file():
        import seqdsl
        seqdsl.load(spec_path)            # a spec error first: it is what needs fixing
        return GoldenResult(target, False, float("nan"), float("nan"),
                            f"no golden file {target}; record one with --update")
    try:
        data = json.loads(target.read_text())
        ids = torch.tensor(data["input_ids"], dtype=torch.long)
        overrides, seed = dict(data["overrides"]), int(data["seed"])
        expected = torch.tensor(data["logits"]).reshape(data["logits_shape"])
        if ids.dim() != 2:
            raise ValueError("input_ids is not a [batch, length] table")
    except (ValueError, TypeError, KeyError, RuntimeError, UnicodeDecodeError) as exc:
        what = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        return GoldenResult(target, False, float("nan"), float("nan"),
                            f"{target} is not a golden file of this format ({what}); "
                            "record it again with --update")
    ids2, logits = _compute(spec_path, overrides, seed, *ids.shape)
    if not torch.equal(ids, ids2):
        return GoldenResult(target, False, float("nan"), float("nan"),
                            "the fixed input differs: the random generator changed")
    if tuple(logits.shape) != tuple(expected.shape):
        return GoldenResult(target, False, float("nan"), float("nan"),
                            f"logits shape {tuple(logits.shape)} != golden {tuple(expected.shape)}")
    diff = (logits.double() - expected.double())
    rel = (diff.norm() / expected.double().norm().clamp_min(1e-30)).item()
    max_abs = diff.abs().max().item()
    ok = bool(torch.isfinite(logits).all()) and rel <= REL_TOL
    msg = f"relative RMS error {rel:.2e}, max abs error {max_abs:.2e} (tolerance {REL_TOL:.0e})"
    return GoldenResult(target, ok, rel, max_abs, msg)
