"""Triton kernels for Data2Vec's target accumulation: ``acc += scale * normalised(x)`` in fp32.

acc (B, T, C) fp32 and x (B, T, C) fp16, bf16 or fp32 are read through their strides, so a
transposed channels-first (B, C, T) tensor needs no copy. The
optional padding mask (B, T) is read as bytes (nonzero = a valid frame); a padded frame is neither
read nor written.

    accumulate_rows_kernel      "layer" (NORMALIZE: each frame's row of C channels in registers,
                                mean and biased variance over it) and "none" (the scaled add
                                alone, over blocks of channels). One read of x, one read and
                                write of acc.
    instance_norm_accumulate_kernel
                                "instance": a program per (batch, block of channels) walks time
                                twice: the per-channel count, mean and sum of squared deviations
                                over the valid frames (each tile's exact mean and M2 merged into
                                the running ones by Chan's formula, so no sum-of-squares
                                cancellation), then the scaled add. Two reads of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._launch import DirectLaunch, LaunchCache, operand_key
from d2v_kernels.kernels._row_norm import MAX_CHANNELS, tile_config, tile_ptrs, wide_offsets
from d2v_kernels.kernels._tiles import cdiv

__all__ = ["INSTANCE_TILE", "MAX_CHANNELS", "accumulate_target", "rows_tile", "unsupported_reasons"]

# (BLOCK_P, BLOCK_C, num_warps) of the instance-norm kernel: 32 channels (64 bytes of an fp16 frame,
# 128 of an fp32 one) by 64 frames (128 contiguous bytes of an fp16 channel when x is channels-first);
# C / 32 programs per sample (24 at C = 768) keep the grid wide at Data2Vec's batch sizes.
INSTANCE_TILE = (64, 32, 4)


@triton.jit
def load_frames(
    X, MASK, batch, pos, ch, n_pos, n_channels, stride_x_b, stride_x_c, stride_x_p, stride_mask_b, stride_mask_p,
    HAS_MASK: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
):  # fmt: skip
    """(x, mask, valid) of frames ``pos`` and channels ``ch`` of one sample: x as fp32 (BLOCK_P,
    BLOCK_C), 0 wherever mask is False; valid (BLOCK_P,): inside the sequence and marked valid."""
    valid = pos < n_pos
    if HAS_MASK:
        keep = tl.load(MASK + batch.to(tl.int64) * stride_mask_b + pos * stride_mask_p, mask=valid, other=0)
        valid = valid & (keep != 0)
    mask = valid[:, None] & (ch < n_channels)[None, :]
    x_ptrs = tile_ptrs(X, batch, pos, ch, stride_x_b, stride_x_c, stride_x_p, WIDE_OFFSETS)
    return tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32), mask, valid


@triton.jit
def add_into(ACC, values, mask, batch, pos, ch, stride_acc_b, stride_acc_c, stride_acc_p, WIDE_OFFSETS: tl.constexpr):
    """acc[tile] += values where mask (fp32 read-modify-write; no other program owns the tile)."""
    acc_ptrs = tile_ptrs(ACC, batch, pos, ch, stride_acc_b, stride_acc_c, stride_acc_p, WIDE_OFFSETS)
    tl.store(acc_ptrs, tl.load(acc_ptrs, mask=mask, other=0.0) + values, mask=mask)


@triton.jit
def accumulate_rows_kernel(
    ACC, X, MASK,
    n_pos, n_channels, tiles_per_batch,
    stride_acc_b, stride_acc_c, stride_acc_p, stride_x_b, stride_x_c, stride_x_p, stride_mask_b, stride_mask_p,
    scale, eps,
    NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    batch = pid // tiles_per_batch
    pos = (pid % tiles_per_batch) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x, mask, _ = load_frames(
        X, MASK, batch, pos, ch, n_pos, n_channels, stride_x_b, stride_x_c, stride_x_p, stride_mask_b, stride_mask_p,
        HAS_MASK, WIDE_OFFSETS,
    )  # fmt: skip
    if NORMALIZE:  # the launcher gives one block of channels (BLOCK_C >= n_channels)
        mean = tl.sum(x, axis=1) / n_channels
        centered = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / n_channels
        y = centered * (tl.rsqrt(var + eps) * scale)[:, None]
    else:
        y = x * scale
    add_into(ACC, y, mask, batch, pos, ch, stride_acc_b, stride_acc_c, stride_acc_p, WIDE_OFFSETS)


@triton.jit
def instance_norm_accumulate_kernel(
    ACC, X, MASK,
    n_pos, n_channels,
    stride_acc_b, stride_acc_c, stride_acc_p, stride_x_b, stride_x_c, stride_x_p, stride_mask_b, stride_mask_p,
    scale, eps,
    HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    count = tl.zeros([], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, n_pos, BLOCK_P):
        pos = start + tl.arange(0, BLOCK_P)
        x, mask, valid = load_frames(
            X, MASK, batch, pos, ch, n_pos, n_channels, stride_x_b, stride_x_c, stride_x_p, stride_mask_b,
            stride_mask_p, HAS_MASK, WIDE_OFFSETS,
        )  # fmt: skip
        n_tile = tl.sum(valid.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(n_tile, 1.0)
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        total = count + n_tile
        weight = n_tile / tl.maximum(total, 1.0)
        delta = tile_mean - mean
        mean += delta * weight
        m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * (count * weight)
        count = total
    # A sample without a valid frame has count 0: its frames are all masked below, nothing is added.
    factor = tl.rsqrt(m2 / tl.maximum(count, 1.0) + eps) * scale
    for start in range(0, n_pos, BLOCK_P):
        pos = start + tl.arange(0, BLOCK_P)
        x, mask, _ = load_frames(
            X, MASK, batch, pos, ch, n_pos, n_channels, stride_x_b, stride_x_c, stride_x_p, stride_mask_b,
            stride_mask_p, HAS_MASK, WIDE_OFFSETS,
        )  # fmt: skip
        y = (x - mean[None, :]) * factor[None, :]
        add_into(ACC, y, mask, batch, pos, ch, stride_acc_b, stride_acc_c, stride_acc_p, WIDE_OFFSETS)


# --------------------------------------------------------------------------------------------
# Launch configuration and launchers
# --------------------------------------------------------------------------------------------


def rows_tile(n_channels: int, positions_contiguous: bool, normalize: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the rows kernel: the LayerNorm forward's tile (two fp32
    values live per element there too: x and the output). "none" takes channel blocks of at most
    MAX_CHANNELS, so it has no channel limit."""
    return tile_config(n_channels if normalize else min(n_channels, MAX_CHANNELS), positions_contiguous)


def unsupported_reasons(norm: str, n_channels: int) -> list[str]:
    """Why the kernels cannot take this input ([] when they can): the validated op takes any
    strides and the three kernel dtypes, so only a LayerNorm row too wide for registers."""
    if norm == "layer" and n_channels > MAX_CHANNELS:
        return [f"{n_channels} channels > {MAX_CHANNELS}: one LayerNorm row must fit in one program's registers"]
    return []


class _Launch:
    """One layout's launch (acc's, x's and the mask's shape, strides, dtype, alignment; norm):
    tiles, grid and integer arguments fixed, the compiled kernel launched directly."""

    __slots__ = ("_constexprs", "_ints", "_launch")

    def __init__(self, acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, norm: str):
        n_batch, n_pos, n_channels = acc.shape
        mask_strides = mask.stride() if mask is not None else (0, 0)
        stride_x_b, stride_x_p, stride_x_c = x.stride()
        acc_strides = (acc.stride(0), acc.stride(2), acc.stride(1))
        wide = wide_offsets(n_channels, n_pos, [acc_strides, (stride_x_b, stride_x_c, stride_x_p)])
        positions_contiguous = stride_x_p == 1 and stride_x_c != 1 and n_pos > 1
        has_mask = mask is not None
        if norm == "instance":
            block_p, block_c, num_warps = INSTANCE_TILE
            grid = (n_batch, cdiv(n_channels, block_c))
            self._ints = (n_pos, n_channels, *acc_strides, stride_x_b, stride_x_c, stride_x_p)
            self._constexprs = (has_mask, block_p, block_c, wide)
            kernel = instance_norm_accumulate_kernel
        else:
            normalize = norm == "layer"
            block_p, block_c, num_warps = rows_tile(n_channels, positions_contiguous, normalize)
            tiles_per_batch = cdiv(n_pos, block_p)
            grid = (n_batch * tiles_per_batch, cdiv(n_channels, block_c))
            self._ints = (n_pos, n_channels, tiles_per_batch, *acc_strides, stride_x_b, stride_x_c, stride_x_p)
            self._constexprs = (normalize, has_mask, block_p, block_c, wide)
            kernel = accumulate_rows_kernel
        self._ints += mask_strides
        self._launch = DirectLaunch(kernel, grid, num_warps=num_warps)

    def __call__(self, acc, x, mask, scale: float, eps: float) -> None:
        self._launch(acc, x, acc if mask is None else mask, *self._ints, scale, eps, *self._constexprs)


_launches = LaunchCache()


def accumulate_target(acc: torch.Tensor, x: torch.Tensor, norm: str, scale: float, mask, eps: float) -> None:
    """``acc += scale * normalised(x)`` in place (see the module docstring). ``mask``: None or a
    (B, T) bool / uint8 tensor, nonzero = valid. The op has validated the arguments and
    :func:`unsupported_reasons` is empty."""
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    key = (norm, operand_key(acc), operand_key(x), operand_key(mask), acc.device)
    _launches.get(key, lambda: _Launch(acc, x, mask, norm))(acc, x, mask, scale, eps)
