"""Triton LayerNorm over the channel dimension + GELU, forward and backward.

The kernels are the shared row-norm pair in :mod:`d2v_kernels.kernels._row_norm` (flags: no
residual, ACTIVATION = exact erf or tanh GELU); this module names the launchers for this op.
Channels-last (..., C) and channels-first (B, C, T) inputs are read in place through strides.
"""

from __future__ import annotations

import torch

from d2v_kernels.kernels._row_norm import (
    MAX_CHANNELS,
    forward_launch,
    row_norm_backward,
    row_norm_forward,
    unsupported_reasons,
)

__all__ = [
    "MAX_CHANNELS",
    "layer_norm_gelu_backward",
    "layer_norm_gelu_forward",
    "layer_norm_gelu_inference_launch",
    "layer_norm_gelu_training_launch",
    "unsupported_reasons",
]


def layer_norm_gelu_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    channels_dim: int,
    approximate: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GELU(LayerNorm(x)) over ``channels_dim`` -> (y like x, mean, rstd), stats fp32 of x's shape
    without the channel dim."""
    y, _, mean, rstd = row_norm_forward(x, channels_dim, weight, bias, eps, approximate)
    return y, mean, rstd


def layer_norm_gelu_training_launch(x, weight, bias, channels_dim: int, approximate: str):
    """:func:`layer_norm_gelu_forward` for inputs of this layout, as one launch object:
    ``launch(x, weight, bias, eps, None)`` -> (y, None, mean, rstd)."""
    return forward_launch(x, channels_dim, weight, bias, approximate)


def layer_norm_gelu_inference_launch(x, weight, bias, channels_dim: int, approximate: str):
    """:func:`layer_norm_gelu_forward` without the statistics, for inputs of this layout, as one
    launch object: ``launch(x, weight, bias, eps, None)`` -> (y, None, None, None)."""
    return forward_launch(x, channels_dim, weight, bias, approximate, store_stats=False)


def layer_norm_gelu_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    channels_dim: int,
    approximate: str,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx like x, or written into ``out`` (see row_norm_backward: it may be dy or x), dweight or
    None, dbias or None); dweight/dbias in the parameters' dtypes."""
    dx, dweight, dbias, _, _ = row_norm_backward(dy, x, channels_dim, weight, bias, mean, rstd, approximate, out=out)
    return dx, dweight, dbias
