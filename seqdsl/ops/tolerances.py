"""The one table of numerical tolerances, keyed by dtype, and the comparison every test uses.

Errors (fla style): relative RMS ``‖a - b‖ / ‖b‖`` (the criterion) and max-abs ``max|a - b|``,
also bounded relative to ``max|b|`` so that a few large local errors cannot hide in the RMS.
Complex tensors use the tolerance of their real dtype. Any NaN fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Tolerance:
    rel_rms: float   # bound on ‖a - b‖ / ‖b‖
    max_rel: float   # bound on max|a - b| / max|b|
    #: the same bounds for a whole model's parameter gradients computed by a different
    #: algorithm (kernels vs torch ops): a decay parameter's gradient sums T·B terms that cancel,
    #: and two fp32 evaluation orders of that sum differ by up to ~5e-5 relative (measured; the
    #: fp32 reference itself is 2.6e-5 off a float64 evaluation on DeltaProduct)
    grad_rel_rms: float = 0.0
    grad_max_rel: float = 0.0


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rel_rms=1e-12, max_rel=1e-11, grad_rel_rms=1e-10, grad_max_rel=1e-9),
    torch.float32: Tolerance(rel_rms=1e-5, max_rel=5e-5, grad_rel_rms=1e-4, grad_max_rel=5e-4),
    torch.float16: Tolerance(rel_rms=2e-3, max_rel=1e-2, grad_rel_rms=5e-3, grad_max_rel=2e-2),
    torch.bfloat16: Tolerance(rel_rms=1.5e-2, max_rel=5e-2, grad_rel_rms=3e-2, grad_max_rel=1e-1),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerance for results computed in (or returned in) ``dtype``."""
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    return TOLERANCES[real]


def errors(actual: Tensor, expected: Tensor) -> tuple[float, float, float]:
    """(relative RMS error, max-abs error, max|expected|), computed in float64."""
    a, b = actual.detach(), expected.detach()
    wide = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    a, b = a.to(wide), b.to(wide)
    diff = a - b
    norm = float(b.abs().square().sum().sqrt())
    rel = float(diff.abs().square().sum().sqrt()) / max(norm, 1e-300)
    scale = float(b.abs().max()) if b.numel() else 0.0
    return rel, float(diff.abs().max()) if diff.numel() else 0.0, scale


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "",
                 model_gradient: bool = False) -> None:
    """Fail unless ``actual`` matches ``expected`` within the tolerance of ``dtype`` (its
    ``grad_*`` bounds with ``model_gradient``: a whole model's parameter gradient).

    The message names ``what`` and reports both errors; NaN anywhere fails."""
    label = f"{what}: " if what else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    for name, x in (("actual", actual), ("expected", expected)):
        if torch.isnan(x.detach()).any():
            raise AssertionError(f"{label}NaN in {name} ({int(torch.isnan(x).sum())} entries)")
    tol = tolerance(dtype)
    if model_gradient:
        tol = Tolerance(tol.grad_rel_rms, tol.grad_max_rel)
    rel, max_abs, scale = errors(actual, expected)
    if rel > tol.rel_rms or max_abs > tol.max_rel * max(scale, 1e-300):
        raise AssertionError(
            f"{label}relative RMS error {rel:.3e} (tolerance {tol.rel_rms:.0e}), max-abs error "
            f"{max_abs:.3e} (tolerance {tol.max_rel:.0e} x max|expected| {scale:.3e}) "
            f"for {dtype}")
