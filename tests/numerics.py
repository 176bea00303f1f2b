"""Tolerances bounded by eager PyTorch's own error (flash-attention's rule).

A kernel's error against a float64 reference may be at most ``factor`` times the error of eager
PyTorch run in the same dtype against that reference, plus a small absolute floor. In float32 the
bound is about 1e-5 relative.
"""

from __future__ import annotations

import torch

from d2v_kernels.testing import ABS_FLOOR, FP32_RTOL, error_bound, max_abs_err

__all__ = ["ABS_FLOOR", "FP32_RTOL", "assert_close_to_reference", "max_abs_err"]


def assert_close_to_reference(out, ref64, eager, *, factor: float = 2.0, name: str = "output"):
    """``out``: kernel result; ``ref64``: float64 reference; ``eager``: eager in out's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_abs_err(out, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    bound = error_bound(out.dtype, max_abs_err(eager, ref64), scale, factor)
    assert err <= bound, f"{name} ({out.dtype}): max error {err:.3e} > bound {bound:.3e}"
    return err
