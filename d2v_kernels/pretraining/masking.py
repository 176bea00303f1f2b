"""The student's masks, drawn from a ``torch.Generator`` so a run (and a resumed run) is reproducible.

- audio: spans over feature frames through transformers' ``_compute_mask_indices`` (what
  ``Data2VecAudioModel`` draws itself when training), within each sample's valid frames;
- vision: BEiT's block-wise masks over the patch grid (rectangles of random area and aspect ratio);
- text: spans of tokens over the non-special, non-padding positions, as fairseq's ``MaskTokensDataset``
  with ``mask_multiple_length`` (every chosen token becomes the mask token: no 80/10/10).

Each returns a (B, L) bool tensor on the generator's device (the CPU by default), True = masked.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.models.data2vec.modeling_data2vec_audio import _compute_mask_indices


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


def _randint(generator: torch.Generator, high: int) -> int:
    """A uniform integer in [0, high]."""
    return int(torch.randint(high + 1, (), generator=generator, device=generator.device).item())


def audio_span_mask(
    batch: int,
    frames: int,
    *,
    mask_prob: float,
    mask_length: int,
    generator: torch.Generator,
    valid: torch.Tensor | None = None,
    min_masks: int = 1,
) -> torch.Tensor:
    """Span masks over (batch, frames), spans of ``mask_length`` starting at about
    ``mask_prob * frames / mask_length`` places per sample (overlaps make the masked share smaller),
    inside the valid frames of ``valid`` (B, frames) when given.

    transformers' ``_compute_mask_indices`` draws from numpy's global generator: it runs here with
    that generator seeded from ``generator`` and its previous state restored afterwards.
    """
    seed = int(torch.randint(2**31 - 1, (), generator=generator, device=generator.device).item())
    state = np.random.get_state()  # noqa: NPY002 (transformers draws from the legacy global generator)
    np.random.seed(seed)  # noqa: NPY002
    try:
        mask = _compute_mask_indices(
            (batch, frames),
            mask_prob=mask_prob,
            mask_length=mask_length,
            attention_mask=None if valid is None else valid.long().cpu(),
            min_masks=min_masks,
        )
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return torch.from_numpy(mask).to(device=generator.device)


def block_mask(
    batch: int,
    height: int,
    width: int,
    *,
    mask_prob: float,
    min_block: int,
    generator: torch.Generator,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """BEiT's block-wise masks over a (height, width) patch grid, flattened to (batch, height * width).

    Rectangles of ``min_block`` patches or more (fewer when fewer remain to mask), aspect ratio
    between ``min_aspect`` and its inverse, are added until ``round(mask_prob * height * width)``
    patches are masked or ten tries in a row add nothing.
    """
    target = max(1, round(mask_prob * height * width))
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    for mask in masks:
        count = 0
        while count < target:
            budget = target - count
            added = 0
            for _ in range(10):
                area = _uniform(generator, min(min_block, budget), budget)
                aspect = math.exp(_uniform(generator, *log_aspect))
                h = round(math.sqrt(area * aspect))
                w = round(math.sqrt(area / aspect))
                if not (0 < h <= height and 0 < w <= width):
                    continue
                top, left = _randint(generator, height - h), _randint(generator, width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    added = new
                    break
            if added == 0:
                break
            count += added
    return masks.flatten(1).to(generator.device)


def token_span_mask(eligible: torch.Tensor, *, mask_prob: float, span: int, generator: torch.Generator) -> torch.Tensor:
    """Spans of ``span`` tokens over the True positions of ``eligible`` (B, T).

    Per sample, ``floor(mask_prob * n / span + u)`` starts (u uniform in [0, 1), at least one when
    n > 0) among its n eligible positions, without replacement; each masks itself and the next
    ``span - 1`` positions that are eligible.
    """
    eligible = eligible.to(device=generator.device, dtype=torch.bool)
    batch, length = eligible.shape
    count = eligible.sum(dim=1)
    jitter = torch.rand(batch, generator=generator, device=generator.device)
    starts_per_row = torch.floor(mask_prob * count / span + jitter).long().clamp(min=1)
    starts_per_row = torch.minimum(starts_per_row, count)
    scores = torch.rand(batch, length, generator=generator, device=generator.device)
    scores = scores.masked_fill(~eligible, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    starts = rank < starts_per_row[:, None]
    mask = starts.clone()
    for offset in range(1, min(span, length)):
        mask[:, offset:] |= starts[:, :-offset]
    return mask & eligible
