"""Tolerances bounded by eager PyTorch's own error (flash-attention's rule).

A kernel's error against a float64 reference may be at most ``factor`` times the error of eager
PyTorch run in the same dtype against that reference, plus a small absolute floor. In float32 the
bound is about 1e-5 relative.
"""

from __future__ import annotations

import torch

ABS_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-12}
FP32_RTOL = 1e-5


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(out, ref64, eager, *, factor: float = 2.0, name: str = "output"):
    """``out``: kernel result; ``ref64``: float64 reference; ``eager``: eager in out's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_abs_err(out, ref64)
    if out.dtype == torch.float32:
        scale = ref64.abs().max().item() if ref64.numel() else 1.0
        bound = max(FP32_RTOL * max(scale, 1.0), 2.0 * max_abs_err(eager, ref64))
    else:
        bound = factor * max_abs_err(eager, ref64) + ABS_FLOOR[out.dtype]
    assert err <= bound, f"{name} ({out.dtype}): max error {err:.3e} > bound {bound:.3e}"
    return err
