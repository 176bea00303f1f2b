"""Triton residual add + LayerNorm over the last dimension, forward and backward.

The kernels are the shared row-norm pair in :mod:`d2v_kernels.kernels._row_norm` (flags:
HAS_RESIDUAL, STORE_SUM for ``return_sum``, HAS_X_SCALE for a per-channel scale of x, no
activation); this module names the launchers for this op. The sum ``x_scale * x + residual`` is
taken in fp32 and normalised unrounded; the stored sum is rounded to x's dtype.
"""

from __future__ import annotations

import torch

from d2v_kernels.kernels._row_norm import (
    MAX_CHANNELS,
    backward_launch,
    forward_launch,
    row_norm_backward,
    row_norm_forward,
    unsupported_reasons,
)

__all__ = [
    "MAX_CHANNELS",
    "add_layer_norm_backward",
    "add_layer_norm_backward_launch",
    "add_layer_norm_forward",
    "add_layer_norm_inference_launch",
    "add_layer_norm_training_launch",
    "unsupported_reasons",
]


def add_layer_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    store_sum: bool,
    x_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """LayerNorm([x_scale *] x + residual) -> (y, the sum or None, mean, rstd), stats fp32 of shape
    x.shape[:-1]."""
    return row_norm_forward(x, -1, weight, bias, eps, None, residual=residual, store_sum=store_sum, x_scale=x_scale)


def add_layer_norm_training_launch(x, residual, weight, bias, store_sum: bool, x_scale=None):
    """:func:`add_layer_norm_forward` for inputs of this layout, as one launch object:
    ``launch(x, weight, bias, eps, residual, x_scale)`` -> (y, sum or None, mean, rstd)."""
    return forward_launch(x, -1, weight, bias, None, residual, store_sum, x_scale=x_scale)


def add_layer_norm_inference_launch(x, residual, weight, bias, store_sum: bool, x_scale=None):
    """:func:`add_layer_norm_forward` without the statistics, for inputs of this layout, as one
    launch object: ``launch(x, weight, bias, eps, residual, x_scale)`` -> (y, sum or None, None, None)."""
    return forward_launch(x, -1, weight, bias, None, residual, store_sum, store_stats=False, x_scale=x_scale)


def add_layer_norm_backward(
    dy: torch.Tensor,
    dsum: torch.Tensor | None,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    x_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dresidual, dweight or None, dbias or None, dx_scale or None). dresidual is the sum's
    gradient, with ``dsum`` (the gradient of the returned sum) added in; without ``x_scale`` it is
    dx itself (the same tensor), with it dx is ``x_scale * dresidual``."""
    dx, dweight, dbias, dx_scale, dresidual = row_norm_backward(
        dy, x, -1, weight, bias, mean, rstd, None, residual=residual, dsum=dsum, x_scale=x_scale
    )
    return dx, dresidual, dweight, dbias, dx_scale


def add_layer_norm_backward_launch(dy, x, residual, weight, bias):
    """:func:`add_layer_norm_backward` (no ``dsum``, no ``x_scale``) for inputs of this layout, as
    one launch object: ``launch(dy, x, weight, bias, mean, rstd, residual, None, None)`` ->
    (dx, dweight or None, dbias or None, None, dresidual: dx itself)."""
    return backward_launch(dy, x, -1, weight, bias, None, residual)
