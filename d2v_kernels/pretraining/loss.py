"""The masked regression loss and the collapse monitors, as fairseq's ``data2vec_audio.py`` /
``data2vec_text.py`` compute them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def regression_loss(
    predictions: torch.Tensor, targets: torch.Tensor, *, beta: float, scale: float | None = None
) -> torch.Tensor:
    """Loss of (M, C) predictions against (M, C) targets, both at the masked positions only, in fp32.

    Per position: L2 (``beta`` 0) or smooth L1 with ``beta``, summed over channels; times ``scale``
    (None: 1/sqrt(C)); averaged over the M positions. fairseq returns the sum with M as its
    sample size and its trainer divides the gradients by M: the same gradients on one process.
    """
    predictions, targets = predictions.float(), targets.float()
    if beta == 0:
        per_position = F.mse_loss(predictions, targets, reduction="none").sum(dim=-1)
    else:
        per_position = F.smooth_l1_loss(predictions, targets, reduction="none", beta=beta).sum(dim=-1)
    if scale is None:
        scale = 1.0 / math.sqrt(predictions.shape[-1])
    return per_position.sum() * (scale / per_position.numel())


@torch.no_grad()
def feature_std(values: torch.Tensor) -> torch.Tensor:
    """fairseq's ``compute_var`` (logged as target_var / pred_var): the mean over channels of each
    channel's standard deviation over the (M, C) positions, sqrt(unbiased variance + 1e-6). A
    collapsing run shows it falling towards 0. Computed on this process's positions only."""
    values = values.float().reshape(-1, values.shape[-1])
    return torch.sqrt(values.var(dim=0) + 1e-6).mean()
