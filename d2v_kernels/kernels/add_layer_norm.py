"""Triton residual add + LayerNorm over the last dimension, forward and backward, x optionally
dropped out first (post-LN layers: ``LayerNorm(dropout(x) + residual)``).

The kernels are the shared row-norm pair in :mod:`d2v_kernels.kernels._row_norm` (flags:
HAS_RESIDUAL, STORE_SUM for ``return_sum``, HAS_X_SCALE for a per-channel scale of x,
HAS_DROPOUT, HAS_ROW_SCALE for a per-row-group scale of x, no activation); this module names the
launchers for this op. The sum ``x_scale * row_scale * dropout(x) + residual`` is taken in fp32 and
normalised unrounded; the stored sum is rounded to x's dtype. A row scale is drop path's
per-sample factor: a (B, 1, 1) tensor for a (B, N, C) input (``_row_norm.rows_per_scale``).

Dropout: the keep mask is drawn in the kernels by Philox from a (2,) int64 seed tensor and each
element's (row, channel) (``_row_norm.dropout_tile_keep``), kept elements scaled by 1 / (1 - p);
the backward redraws it from the same seed, so no mask is stored, and writes x's gradient
(``dsum * keep / (1 - p)``, times x_scale) in the LayerNorm backward's pass. Bytes: the
forward's are those of the add + LayerNorm (3T, +T with the sum, T an activation's bytes), the
backward's +T for the residual's gradient written apart from x's; the unfused
``native_dropout`` + kernel moved 2T + T/E more forward and T + T/E more backward (E bytes an
element: the bool mask), in two more launches. With dropout off (``dropout=False``, a constexpr)
the kernels are the same programs as without the feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    "add_layer_norm_dropout_keep",
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
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """LayerNorm([x_scale *] [row_scale *] dropout(x) + residual) -> (y, the sum or None, mean,
    rstd), stats fp32 of shape x.shape[:-1]. Dropout when ``dropout_p`` > 0: keep mask from ``seed``
    ((2,) int64, see :func:`add_layer_norm_dropout_keep`). ``row_scale``: as in
    :func:`~d2v_kernels.kernels._row_norm.row_norm_forward`."""
    return row_norm_forward(
        x, -1, weight, bias, eps, None, residual=residual, store_sum=store_sum, x_scale=x_scale, seed=seed,
        dropout_p=dropout_p, row_scale=row_scale,
    )  # fmt: skip


def add_layer_norm_training_launch(
    x, residual, weight, bias, store_sum: bool, x_scale=None, *, dropout=False, row_scale=None
):
    """:func:`add_layer_norm_forward` for inputs of this layout, as one launch object:
    ``launch(x, weight, bias, eps, residual, x_scale, seed=None, dropout_p=0.0, row_scale=None)`` ->
    (y, sum or None, mean, rstd). ``dropout=True`` makes the dropout variant: every call passes its
    (2,) int64 ``seed`` and ``dropout_p``; without it the two are not read. ``row_scale``, a tensor
    of the layout every call's will have, makes the row-scaled variant: every call passes its own."""
    return forward_launch(
        x, -1, weight, bias, None, residual, store_sum, x_scale=x_scale, dropout=dropout, row_scale=row_scale
    )


def add_layer_norm_inference_launch(x, residual, weight, bias, store_sum: bool, x_scale=None, *, dropout=False):
    """:func:`add_layer_norm_forward` without the statistics, for inputs of this layout, as one
    launch object: ``launch(x, weight, bias, eps, residual, x_scale, seed=None, dropout_p=0.0)`` ->
    (y, sum or None, None, None); ``dropout`` as in :func:`add_layer_norm_training_launch`."""
    return forward_launch(
        x, -1, weight, bias, None, residual, store_sum, store_stats=False, x_scale=x_scale, dropout=dropout
    )


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
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dresidual, dweight or None, dbias or None, dx_scale or None). dresidual is the sum's
    gradient, with ``dsum`` (the gradient of the returned sum) added in; without ``x_scale``,
    ``row_scale`` and dropout it is dx itself (the same tensor), with them dx is ``dresidual
    [* x_scale] [* row_scale] [* keep / (1 - p)]``, the keep mask redrawn from ``seed`` (the
    forward's) when ``dropout_p`` > 0."""
    dx, dweight, dbias, dx_scale, dresidual = row_norm_backward(
        dy, x, -1, weight, bias, mean, rstd, None, residual=residual, dsum=dsum, x_scale=x_scale, seed=seed,
        dropout_p=dropout_p, row_scale=row_scale,
    )  # fmt: skip
    return dx, dresidual, dweight, dbias, dx_scale


def add_layer_norm_backward_launch(dy, x, residual, weight, bias, *, dropout=False, sum_dx=False):
    """:func:`add_layer_norm_backward` (no ``dsum``, no ``x_scale``) for inputs of this layout, as
    one launch object: ``launch(dy, x, weight, bias, mean, rstd, residual, None, None, None, seed=None,
    dropout_p=0.0)`` -> (dx, dweight or None, dbias or None, None, dresidual). Without ``dropout``
    dresidual is dx itself; with it (every call passes the forward's seed and p) it is the sum's
    gradient, written apart, and dx is ``dresidual * keep / (1 - p)``: x's gradient through the
    dropout, in the same kernel. ``sum_dx`` adds a sixth output: dx summed over its rows (every dim
    but the last), (C,) in dx's dtype, reduced in the kernels with dweight and dbias (fp32, a fixed
    order): the bias gradient of the linear layer whose output x is, with no launch of its own."""
    return backward_launch(dy, x, -1, weight, bias, None, residual, dropout=dropout, sum_dx=sum_dx)


def add_layer_norm_dropout_keep(
    seed: torch.Tensor, shape: Sequence[int], dropout_p: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """The keep mask (bool, ``shape``, on ``device``, by default the seed's) that the kernels draw
    for ``seed`` and ``dropout_p`` on an input of that shape (last dim at most ``MAX_CHANNELS``),
    whatever its strides and dtype: for tests and for an eager reference
    (``dropout(x) = x * keep / (1 - p)``).

    Materialised by the training forward kernel itself (x = 1, residual = 0, the sum stored in
    fp32: kept elements hold 1 / (1 - p) > 0, dropped ones 0), so it is the kernels' mask by
    construction, with no kernel of its own to compile."""
    device = seed.device if device is None else torch.device(device)
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    _, total, _, _ = add_layer_norm_forward(
        ones, torch.zeros_like(ones), None, None, 1e-5, True, seed=seed.to(device), dropout_p=float(dropout_p)
    )
    return total != 0
