"""One Triton row-norm kernel pair (fwd + bwd) behind ``layer_norm_gelu`` and ``add_layer_norm``.

Every input is read in place as a 3D strided view (B, C, P): B batches, C channels (the norm
axis), P positions, each tensor with its own strides, so channels-last (..., C) and channels-first
(B, C, T) inputs need no transposes or copies. A program owns a tile of BLOCK_P positions of one
batch and all C channels (the whole row sits in registers). Constexpr flags select the variant:

    HAS_RESIDUAL  s = x + residual (summed in fp32) is normalised instead of x
    HAS_X_SCALE   x is scaled per channel first, s = x_scale * x + residual (vision's layer scale);
                  the backward then writes x's and residual's gradients apart and reduces dx_scale
    HAS_ROW_SCALE x is scaled per row group too, by row_scale[row // rows_per_scale] (drop path's
                  per-sample factor: the rows of a sample are consecutive); the backward writes x's
                  and residual's gradients apart, x's (and dx_scale's terms) scaled alike
    STORE_SUM     the forward also writes s (add_layer_norm's return_sum)
    HAS_WEIGHT, HAS_BIAS   optional affine
    ACTIVATION    0: none, 1: exact erf GELU, 2: tanh GELU, applied after the affine
    HAS_DSUM      the backward adds the gradient of the stored sum into dx
    STORE_STATS   the forward writes mean and rstd (the backward's; inference skips them)
    HAS_DROPOUT   x is dropped out first, s = dropout(x) [* x_scale] + residual (post-LN layers):
                  kept elements scaled by 1 / (1 - p), the keep mask drawn in-kernel by Philox
                  from a (2,) int64 seed tensor and the element's (row, channel), never stored;
                  the backward redraws it from the same seed, writes the residual's gradient
                  (the sum's) apart and x's as that times keep / (1 - p)
    SUM_DX        the backward also reduces the column sums of dx (x's gradient as written, before
                  its rounding), the bias gradient of a linear layer whose output x is

Statistics (mean, rstd) are fp32, one per row, saved for the backward; the normalised tensor is
not saved (the backward recomputes it from x). The backward reduces dweight, dbias (and
dx_scale, dx's column sums) in two deterministic stages: each of a fixed number of programs walks
its rows in a fixed order into an fp32 partial row, then one small kernel sums the partials in a
fixed order and casts them to the outputs' dtypes (no atomics, no torch reduction or cast launches).

Bytes per call, in activations of x's size T (E bytes an element, N rows of C): the forward reads
x (and residual) once and writes y (and the sum): 2T, 3T with a residual, +T with the sum, plus
8N for the fp32 statistics when they are stored. The backward reads x (and residual), dy (and the
sum's gradient) once and writes dx (and, with x_scale, the residual's gradient apart): 3T, 4T with
a residual, +T for each of the sum's gradient and x_scale; plus 8N of statistics and, per
parameter gradient, 4 x programs x C of fp32 partials written and read back (2 x 264 x 1024 x 4 B
= 2 MB on an H100 at C = 1024: under 2% of a (8, 499, 768) fp16 call's 25 MB).
Dropout (HAS_DROPOUT) adds 16 bytes of seed a program to the forward and, in the backward, the
residual's gradient written apart from x's: +T. Against ``torch.native_dropout`` before the
kernel (reads x, writes the dropped x and a bool mask: 2T + T/E) and ``native_dropout_backward``
after it (reads the gradient and the mask, writes x's: 2T + T/E), it saves 2T + T/E forward and
T + T/E backward, and two launches.

The launchers keep, per input layout, the view, tiles, grid and integer arguments, and launch the
compiled kernels directly (``_launch.DirectLaunch``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._attention_common import dropout_keep, philox_key
from d2v_kernels.kernels._launch import DirectLaunch, empty_template, operand_key, resident_programs
from d2v_kernels.kernels._tiles import cdiv, next_power_of_2, tiles
from d2v_kernels.kernels._tiles import on_change as on_tiles_change

# One row of the backward must fit 8 warps' registers without spilling (ptxas, sm_90); Data2Vec's
# rows are 512 to 1024. Wider rows run eager, with the reason.
MAX_CHANNELS = 2048
ACTIVATIONS = {None: 0, "none": 1, "tanh": 2}  # None: plain LayerNorm; "none"/"tanh": GELU's approximate
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): exact limits at +-inf (exp overflows to inf or underflows to 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr):
    # Tensors stay left of the constexpr constants: the interpreter mishandles constexpr * tensor.
    # Literals 1/sqrt(2), sqrt(2/pi), 0.044715 (and 1/sqrt(2 pi) below): a module-level constexpr
    # global would be compared by Triton's launcher on every launch (microseconds each).
    if ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 2:
        return 0.5 * z * (1.0 + _tanh((z + z * z * z * 0.044715) * 0.7978845608028654))
    else:
        return z


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr):
    """d activation / dz."""
    if ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 2:
        t = _tanh((z + z * z * z * 0.044715) * 0.7978845608028654)
        du_dz = (1.0 + z * z * (3.0 * 0.044715)) * 0.7978845608028654
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du_dz
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def to_output(x, dtype: tl.constexpr):
    """fp32 -> dtype rounding to nearest even. bf16 is rounded by hand (three integer ops, exact
    on the GPU too) because the interpreter truncates fp32 -> bf16 where the GPU rounds."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tile_offsets(batch, pos, ch, stride_b, stride_c, stride_p):
    """int64 element offsets of a (BLOCK_P, BLOCK_C) tile: large tensors overflow int32."""
    return batch.to(tl.int64) * stride_b + pos.to(tl.int64)[:, None] * stride_p + ch.to(tl.int64)[None, :] * stride_c


@triton.jit
def tile_ptrs(PTR, batch, pos, ch, stride_b, stride_c, stride_p, WIDE_OFFSETS: tl.constexpr):
    """Pointers of a (BLOCK_P, BLOCK_C) tile: a 64-bit base per batch and int32 offsets within it,
    unless the launcher found a batch slice too large for int32 (WIDE_OFFSETS: all int64). The
    int64 offsets of every element cost 18 to 45 registers a thread (ptxas, sm_90), which is what
    keeps a second program off the SM."""
    if WIDE_OFFSETS:
        return PTR + tile_offsets(batch, pos, ch, stride_b, stride_c, stride_p)
    return (PTR + batch.to(tl.int64) * stride_b) + (pos[:, None] * stride_p + ch[None, :] * stride_c)


@triton.jit
def dropout_tile_keep(SEED, batch, pos, ch, n_pos, n_channels, dropout_p):
    """The dropout keep mask of a (BLOCK_P, BLOCK_C) tile (ch from 0): element (row, c), row =
    batch * n_pos + pos its index among x.shape[:-1]'s rows whatever the layout, survives when its
    uniform >= p, drawn with the attention kernels' Philox scheme (``dropout_keep``: one call
    gives channels 4g..4g+3 of a row, counter row * ceil(C / 4) + g, 64-bit) under the key
    seed[0] | seed[1] << 32."""
    row = batch.to(tl.int64) * n_pos + pos
    return dropout_keep(philox_key(SEED, 0), row, ch, n_channels, dropout_p)


@triton.jit
def row_scale_of(RS, batch, pos, pos_mask, n_pos, rows_per_scale):
    """The fp32 row scale of each row of a tile: RS[row // rows_per_scale], row = batch * n_pos +
    pos its index among x.shape[:-1]'s rows (as in :func:`dropout_tile_keep`); 0 past n_pos. In
    int32 (the launcher holds the rows under 2**31): an int64 division costs 35 registers (sm_90)."""
    row = batch * n_pos + pos
    return tl.load(RS + row // rows_per_scale, mask=pos_mask, other=0.0).to(tl.float32)


@triton.jit
def row_norm_fwd_kernel(
    X, RES, W, B, XS, RS, Y, SUM, MEAN, RSTD, SEED,
    n_pos, n_channels, tiles_per_batch,
    stride_x_b, stride_x_c, stride_x_p,
    stride_res_b, stride_res_c, stride_res_p,
    stride_y_b, stride_y_c, stride_y_p,
    stride_sum_b, stride_sum_c, stride_sum_p,
    stride_w, stride_bias, stride_xs, rows_per_scale, eps, dropout_p,
    HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    STORE_STATS: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
):  # fmt: skip
    """Bytes: reads x [+ residual] [+ 16 of seed], writes y [+ sum] [+ 8 a row of statistics];
    the parameters (C values each) and the row scales stay in L2. SEED and dropout_p are read only
    with HAS_DROPOUT, RS and rows_per_scale only with HAS_ROW_SCALE."""
    pid = tl.program_id(0)
    batch = pid // tiles_per_batch
    pos = (pid % tiles_per_batch) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    pos_mask = pos < n_pos
    ch_mask = ch < n_channels
    mask = pos_mask[:, None] & ch_mask[None, :]

    x = tl.load(tile_ptrs(X, batch, pos, ch, stride_x_b, stride_x_c, stride_x_p, WIDE_OFFSETS), mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_tile_keep(SEED, batch, pos, ch, n_pos, n_channels, dropout_p)
        x = tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)
    if HAS_ROW_SCALE:
        x *= row_scale_of(RS, batch, pos, pos_mask, n_pos, rows_per_scale)[:, None]
    if HAS_X_SCALE:
        x *= tl.load(XS + ch * stride_xs, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res_ptrs = tile_ptrs(RES, batch, pos, ch, stride_res_b, stride_res_c, stride_res_p, WIDE_OFFSETS)
        x += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    if STORE_SUM:
        sum_ptrs = tile_ptrs(SUM, batch, pos, ch, stride_sum_b, stride_sum_c, stride_sum_p, WIDE_OFFSETS)
        tl.store(sum_ptrs, to_output(x, SUM.dtype.element_ty), mask=mask)

    mean = tl.sum(x, axis=1) / n_channels
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / n_channels
    rstd = tl.rsqrt(var + eps)
    z = centered * rstd[:, None]
    if HAS_WEIGHT:
        z *= tl.load(W + ch * stride_w, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        z += tl.load(B + ch * stride_bias, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
    y = apply_activation(z, ACTIVATION)
    y_ptrs = tile_ptrs(Y, batch, pos, ch, stride_y_b, stride_y_c, stride_y_p, WIDE_OFFSETS)
    tl.store(y_ptrs, to_output(y, Y.dtype.element_ty), mask=mask)

    if STORE_STATS:
        row = batch.to(tl.int64) * n_pos + pos
        tl.store(MEAN + row, mean, mask=pos_mask)
        tl.store(RSTD + row, rstd, mask=pos_mask)


@triton.jit
def row_norm_bwd_kernel(
    X, RES, W, B, XS, RS, DY, DSUM, MEAN, RSTD, DX, DRES, DW_PARTIAL, DB_PARTIAL, DXS_PARTIAL, DXSUM_PARTIAL, SEED,
    n_pos, n_channels, tiles_per_batch, n_tiles,
    stride_x_b, stride_x_c, stride_x_p,
    stride_res_b, stride_res_c, stride_res_p,
    stride_dy_b, stride_dy_c, stride_dy_p,
    stride_dsum_b, stride_dsum_c, stride_dsum_p,
    stride_dx_b, stride_dx_c, stride_dx_p,
    stride_dres_b, stride_dres_c, stride_dres_p,
    stride_w, stride_bias, stride_xs, rows_per_scale, dropout_p,
    HAS_RESIDUAL: tl.constexpr, HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    HAS_X_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, SUM_DX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
):  # fmt: skip
    """Bytes: reads x [+ residual], dy [+ the sum's gradient] and 8 a row of statistics, writes dx
    [+ the residual's gradient with x_scale, a row scale or dropout], once each (dx in one pass);
    and a partial row per program and parameter gradient (and dx's column sums with SUM_DX). With
    HAS_DROPOUT the keep mask is redrawn from SEED (the forward's), not read."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    ch = tl.arange(0, BLOCK_C)
    ch_mask = ch < n_channels
    if HAS_WEIGHT:
        w = tl.load(W + ch * stride_w, mask=ch_mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(ch_mask, 1.0, 0.0)
    if HAS_BIAS:
        b = tl.load(B + ch * stride_bias, mask=ch_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], tl.float32)
    if HAS_X_SCALE:
        xs = tl.load(XS + ch * stride_xs, mask=ch_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_C], tl.float32)
    dxs_acc = tl.zeros([BLOCK_C], tl.float32)
    dxsum_acc = tl.zeros([BLOCK_C], tl.float32)

    # Program pid takes tiles pid, pid + n_programs, ...: a fixed order, so the partial sums (and
    # dweight, dbias) are the same bits on every run with the same grid.
    for tile in range(pid, n_tiles, n_programs):
        batch = tile // tiles_per_batch
        pos = (tile % tiles_per_batch) * BLOCK_P + tl.arange(0, BLOCK_P)
        pos_mask = pos < n_pos
        mask = pos_mask[:, None] & ch_mask[None, :]

        x = tl.load(
            tile_ptrs(X, batch, pos, ch, stride_x_b, stride_x_c, stride_x_p, WIDE_OFFSETS), mask=mask, other=0.0
        )
        x_in = x.to(tl.float32)
        if HAS_DROPOUT:  # x_in: dropout(x), what the forward summed
            keep = dropout_tile_keep(SEED, batch, pos, ch, n_pos, n_channels, dropout_p)
            x_in = tl.where(keep, x_in * (1.0 / (1.0 - dropout_p)), 0.0)
        if HAS_ROW_SCALE:  # x_in: also scaled by its row's factor (dx_scale's term)
            rs = row_scale_of(RS, batch, pos, pos_mask, n_pos, rows_per_scale)
            x_in = x_in * rs[:, None]
        x = x_in
        if HAS_X_SCALE:
            x = x_in * xs[None, :]
        if HAS_RESIDUAL:
            res_ptrs = tile_ptrs(RES, batch, pos, ch, stride_res_b, stride_res_c, stride_res_p, WIDE_OFFSETS)
            x += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        row = batch.to(tl.int64) * n_pos + pos
        mean = tl.load(MEAN + row, mask=pos_mask, other=0.0)
        rstd = tl.load(RSTD + row, mask=pos_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)

        dy_ptrs = tile_ptrs(DY, batch, pos, ch, stride_dy_b, stride_dy_c, stride_dy_p, WIDE_OFFSETS)
        dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION != 0:
            dz *= activation_grad(xhat * w[None, :] + b[None, :], ACTIVATION)
        if HAS_WEIGHT:
            dw_acc += tl.sum(dz * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dz, axis=0)

        dxhat = dz * w[None, :]
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / n_channels
        mean_dxhat = tl.sum(dxhat, axis=1) / n_channels
        dx = (dxhat - (xhat * mean_dxhat_xhat[:, None] + mean_dxhat[:, None])) * rstd[:, None]
        if HAS_DSUM:
            dsum_ptrs = tile_ptrs(DSUM, batch, pos, ch, stride_dsum_b, stride_dsum_c, stride_dsum_p, WIDE_OFFSETS)
            dx += tl.load(dsum_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_X_SCALE or HAS_DROPOUT or HAS_ROW_SCALE:  # dx is the sum's gradient: the residual's; x's is scaled
            dres_ptrs = tile_ptrs(DRES, batch, pos, ch, stride_dres_b, stride_dres_c, stride_dres_p, WIDE_OFFSETS)
            tl.store(dres_ptrs, to_output(dx, DRES.dtype.element_ty), mask=mask)
        if HAS_X_SCALE:
            dxs_acc += tl.sum(dx * x_in, axis=0)
            dx = dx * xs[None, :]
        if HAS_DROPOUT:
            dx = tl.where(keep, dx * (1.0 / (1.0 - dropout_p)), 0.0)
        if HAS_ROW_SCALE:
            dx = dx * rs[:, None]
        if SUM_DX:  # rows past n_pos hold 0 (rstd, dsum loaded as 0); channels past C are not stored
            dxsum_acc += tl.sum(dx, axis=0)
        dx_ptrs = tile_ptrs(DX, batch, pos, ch, stride_dx_b, stride_dx_c, stride_dx_p, WIDE_OFFSETS)
        tl.store(dx_ptrs, to_output(dx, DX.dtype.element_ty), mask=mask)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * n_channels + ch, dw_acc, mask=ch_mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * n_channels + ch, db_acc, mask=ch_mask)
    if HAS_X_SCALE:
        tl.store(DXS_PARTIAL + pid * n_channels + ch, dxs_acc, mask=ch_mask)
    if SUM_DX:
        tl.store(DXSUM_PARTIAL + pid * n_channels + ch, dxsum_acc, mask=ch_mask)


# The partial sums' reduction: a program per block of channels, rows summed in a fixed order.
PARAM_GRAD_BLOCK_R = 32
PARAM_GRAD_BLOCK_C = 128


@triton.jit
def row_norm_param_grad_kernel(
    DW_PARTIAL, DB_PARTIAL, DXS_PARTIAL, DXSUM_PARTIAL, DW, DB, DXS, DXSUM, n_rows, n_channels,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_X_SCALE: tl.constexpr, SUM_DX: tl.constexpr,
):  # fmt: skip
    """dweight, dbias, dx_scale (in the parameters' dtypes) and dx's column sums (in dx's) = the
    column sums of the fp32 (n_rows, C) partials. Bytes: reads 4 x n_rows x C a gradient, writes C
    values a gradient."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_mask = ch < n_channels
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    dxs = tl.zeros([BLOCK_C], tl.float32)
    dxsum = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, n_rows, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < n_rows) & ch_mask[None, :]
        offsets = rows[:, None] * n_channels + ch[None, :]
        if HAS_WEIGHT:
            dw += tl.sum(tl.load(DW_PARTIAL + offsets, mask=mask, other=0.0), axis=0)
        if HAS_BIAS:
            db += tl.sum(tl.load(DB_PARTIAL + offsets, mask=mask, other=0.0), axis=0)
        if HAS_X_SCALE:
            dxs += tl.sum(tl.load(DXS_PARTIAL + offsets, mask=mask, other=0.0), axis=0)
        if SUM_DX:
            dxsum += tl.sum(tl.load(DXSUM_PARTIAL + offsets, mask=mask, other=0.0), axis=0)
    if HAS_WEIGHT:
        tl.store(DW + ch, to_output(dw, DW.dtype.element_ty), mask=ch_mask)
    if HAS_BIAS:
        tl.store(DB + ch, to_output(db, DB.dtype.element_ty), mask=ch_mask)
    if HAS_X_SCALE:
        tl.store(DXS + ch, to_output(dxs, DXS.dtype.element_ty), mask=ch_mask)
    if SUM_DX:
        tl.store(DXSUM + ch, to_output(dxsum, DXSUM.dtype.element_ty), mask=ch_mask)


# --------------------------------------------------------------------------------------------
# Layout: which (B, C, P) view each tensor is read through
# --------------------------------------------------------------------------------------------


def _collapse(shape: Sequence[int], strides: Sequence[int]) -> tuple[int, int] | None:
    """(size, stride) of consecutive dims read as one index, or None when they cannot be."""
    size = math.prod(shape)
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return size, 0
    for (_, outer_stride), (inner_size, inner_stride) in itertools.pairwise(dims):
        if outer_stride != inner_size * inner_stride:
            return None
    return size, dims[-1][1]


def _groupings(ndim: int, channels_dim: int) -> list[tuple[range, range]]:
    """Candidate (batch dims, position dims) splits of the non-channel dims, best first."""
    if channels_dim < ndim - 1:
        return [(range(channels_dim), range(channels_dim + 1, ndim))]
    splits = [(range(0), range(ndim - 1))]  # every row in one batch: the usual channels-last case
    if ndim >= 3:
        splits.append((range(ndim - 2), range(ndim - 2, ndim - 1)))  # e.g. a (B, T, C) view of (B, C, T)
    return splits


def strided_view(tensors: Sequence[torch.Tensor], channels_dim: int):
    """(B, C, P, [(stride_b, stride_c, stride_p) per tensor]) for one split that reads every tensor
    (all of one shape), or None when no split can."""
    shape = tensors[0].shape
    channels_dim %= len(shape)
    if channels_dim == len(shape) - 1 and all(t.is_contiguous() for t in tensors):
        # The common case, without the general search: rows of C, one after another.
        channels = shape[-1]
        return 1, channels, math.prod(shape[:-1]), [(0, 1, channels)] * len(tensors)
    for batch_dims, pos_dims in _groupings(len(shape), channels_dim):
        strides = []
        for t in tensors:
            batch = _collapse([shape[d] for d in batch_dims], [t.stride(d) for d in batch_dims])
            pos = _collapse([shape[d] for d in pos_dims], [t.stride(d) for d in pos_dims])
            if batch is None or pos is None:
                break
            strides.append((batch[1], t.stride(channels_dim), pos[1]))
        else:
            n_batch = math.prod([shape[d] for d in batch_dims])
            n_pos = math.prod([shape[d] for d in pos_dims])
            return n_batch, shape[channels_dim], n_pos, strides
    return None


def row_reasons(dtype: torch.dtype, channels: int, weight=None, bias=None, x_scale=None) -> list[str]:
    """Why the kernel cannot normalise rows of ``channels`` values of ``dtype`` with these
    parameters, whatever the layout ([] when it can)."""
    reasons = []
    if dtype not in KERNEL_DTYPES:
        reasons.append(f"x has dtype {str(dtype).replace('torch.', '')}; the kernel takes float16, bfloat16, float32")
    for name, p in (("weight", weight), ("bias", bias), ("x_scale", x_scale)):
        if p is not None and p.dtype not in (dtype, torch.float32):
            reasons.append(
                f"{name} has dtype {str(p.dtype).replace('torch.', '')}; the kernel takes x's dtype or float32"
            )
    if channels > MAX_CHANNELS:
        reasons.append(f"{channels} channels > {MAX_CHANNELS}: one row must fit in one program's registers")
    return reasons


def unsupported_reasons(
    x: torch.Tensor, channels_dim: int, weight=None, bias=None, residual=None, x_scale=None
) -> list[str]:
    """Why the row-norm kernel cannot take these inputs ([] when it can)."""
    reasons = row_reasons(x.dtype, x.shape[channels_dim], weight, bias, x_scale)
    tensors = [x] if residual is None else [x, residual]
    if strided_view(tensors, channels_dim) is None:
        names = "x" if residual is None else "x and residual"
        reasons.append(
            f"the strides of {names} {[tuple(t.stride()) for t in tensors]} for shape {tuple(x.shape)} cannot be "
            "read as (batch, channel, position) with one stride each (make them contiguous)"
        )
    return reasons


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


def tile_config(n_channels: int, positions_contiguous: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for a row length and layout.

    Channels-last (channels contiguous): about 4096 elements a tile, several short rows a program.
    Channels-first (positions contiguous): each channel row of the tile is BLOCK_P contiguous
    elements (16, one 32-byte sector in fp16, at C = 512) while the tile stays <= 8192 elements,
    32 per thread at 8 warps, which ptxas compiles without a spill.
    BLOCK_C is at least 64 so that few tiles exist to compile (Data2Vec rows are 512 to 1024).
    Chosen from the H100 reasoning in Triton's and flash-attention's layer norms; to measure on a
    GPU: the tile targets (2048 to 16384 elements) and warps per layout, with
    bench/layer_norm_gelu.py.
    """
    block_c = max(64, next_power_of_2(n_channels))
    if positions_contiguous:
        block_p = max(1, min(8192 // block_c, 64))
    else:
        block_p = max(1, min(4096 // block_c, 64))
    # At most 8 warps: 16 cap a thread at 128 registers, under what a 1024-wide tile needs.
    num_warps = min(8, max(4, block_p * block_c // 1024))
    return block_p, block_c, num_warps


def backward_tile_config(n_channels: int, positions_contiguous: bool, narrow: bool = False) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the backward: the forward's tile, narrowed until each thread
    holds at most 8 values at up to 8 warps (4 with ``narrow``). The backward keeps x, dy, x-hat
    and the activation's derivative live per element; at 8 values a thread ptxas (sm_90) allocates
    74 to 116 registers, so two or three programs share an SM. At 16 values it took 128 to 196,
    one program an SM: 8 warps for a memory-bound loop, far too few loads in flight (bench/NOTES.md
    has the profile that showed it). ``narrow``: the variants that write the residual's gradient
    apart and keep more a row, x_scale or a row scale (vision's layer scale and drop path) and
    dropout (the post-LN layers': the keep mask redrawn), whose 8 values a thread left one program
    an SM (x_scale's with every Triton release, dropout's with the GPU image's 3.6; bench/NOTES.md
    has the ptxas counts); at 4 they take about 64 to 77 registers."""
    per_thread = _BWD_ELEMENTS_PER_THREAD // 2 if narrow else _BWD_ELEMENTS_PER_THREAD
    block_p, block_c, _ = tile_config(n_channels, positions_contiguous)
    while block_p > 1 and block_p * block_c > per_thread * 32 * 8:
        block_p //= 2
    return block_p, block_c, min(8, max(4, block_p * block_c // (per_thread * 32)))


_BWD_ELEMENTS_PER_THREAD = 8


def _launch_config(n_channels: int, x_strides: tuple[int, int, int], n_pos: int) -> tuple[int, int, int]:
    _, stride_c, stride_p = x_strides
    return tile_config(n_channels, positions_contiguous=stride_p == 1 and stride_c != 1 and n_pos > 1)


def _backward_launch_config(
    n_channels: int, x_strides: tuple[int, int, int], n_pos: int, narrow: bool = False
) -> tuple[int, int, int]:
    _, stride_c, stride_p = x_strides
    contiguous = stride_p == 1 and stride_c != 1 and n_pos > 1
    return backward_tile_config(n_channels, contiguous, narrow)


# Persistent programs of the backward per SM, at most: two of 8 warps fill the 64K registers at
# 128 registers a thread (the AOT check holds every variant to it on sm_90). Where a GPU or Triton
# release allocates more, the grid is cut to what fits at once (fit_backward_programs).
BWD_PROGRAMS_PER_SM = 2


def backward_programs(device: torch.device, n_tiles: int, programs_per_sm: int) -> int:
    """Number of programs the backward walks its tiles with (fixed per device and configuration:
    the partial sums, hence dweight and dbias, are the same bits on every run)."""
    if device.type == "cuda":
        return min(n_tiles, programs_per_sm * _multiprocessors(device))
    return min(n_tiles, 4)  # the interpreter


def fit_backward_programs(compiled, num_warps: int, device: torch.device, n_programs: int) -> int:
    """``n_programs`` (from :func:`backward_programs`), cut to what the SMs of ``device`` hold at
    once of ``compiled``: every program resident from the start. Fixed per compiled kernel and
    device, so dweight and dbias stay the same bits run to run."""
    resident = resident_programs(compiled, num_warps, device)
    if resident is None:
        return n_programs
    return max(1, min(n_programs, resident * _multiprocessors(device)))


def _fit_backward_grid(compiled, num_warps: int, device: torch.device, n_programs: int) -> tuple[int]:
    """The backward row launch's ``fit``: its grid from :func:`fit_backward_programs`."""
    return (fit_backward_programs(compiled, num_warps, device, n_programs),)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


# Within one batch slice the kernels index with int32 (``tile_ptrs``); a slice reaching this many
# elements (4 GB in fp16: about 22 minutes of 16 kHz audio at layer 0) takes int64 offsets.
INT32_OFFSET_LIMIT = 2**31 - 1


def wide_offsets(n_channels: int, n_pos: int, strides: Sequence[tuple[int, int, int]]) -> bool:
    """True when some tensor's largest offset within a batch slice does not fit in int32."""
    return any(
        (n_pos - 1) * abs(stride_p) + (n_channels - 1) * abs(stride_c) > INT32_OFFSET_LIMIT
        for _, stride_c, stride_p in strides
    )


_MAX_PLANS = 1024


def _launch_plan(
    direction: str, tensors: Sequence[torch.Tensor | None], channels_dim: int, narrow: bool = False
) -> tuple | None:
    """(n_batch, n_channels, n_pos, stride arguments, (BLOCK_P, BLOCK_C, num_warps), WIDE_OFFSETS) of
    the ``direction`` ("fwd" / "bwd") kernel reading ``tensors`` (in its argument order, x first,
    None for an absent one: its strides are passed as 0), or None when one strided view cannot read
    them all. Default tiles (the backward's narrower with ``narrow``); the caller applies any
    override."""
    view = strided_view([t for t in tensors if t is not None], channels_dim)
    if view is None:
        return None
    n_batch, n_channels, n_pos, strides = view
    present = iter(strides)
    args = tuple(itertools.chain.from_iterable(next(present) if t is not None else (0, 0, 0) for t in tensors))
    if direction == "fwd":
        tile = _launch_config(n_channels, strides[0], n_pos)
    else:
        tile = _backward_launch_config(n_channels, strides[0], n_pos, narrow)
    return n_batch, n_channels, n_pos, args, tile, wide_offsets(n_channels, n_pos, strides)


class _ForwardLaunch:
    """The forward kernel's launch for one layout (x's and every operand's shape, strides, dtype,
    alignment; flags): view, tiles, grid and integer arguments fixed, the compiled kernel launched
    directly. y (and the sum) are ``empty_like(x)``, whose strides follow from x's layout.
    ``dropout``: the kernel drops x out (HAS_DROPOUT); each call then passes its seed and p.
    ``row_scale``: each call passes one of this layout (:func:`rows_per_scale`)."""

    __slots__ = ("_constexprs", "_ints", "_launch", "_stats", "_store_sum")

    def __init__(
        self, x, channels_dim, weight, bias, activation, residual, store_sum, store_stats, x_scale=None, dropout=False,
        row_scale=None,
    ):  # fmt: skip
        y = torch.empty_like(x)
        plan = _launch_plan("fwd", (x, residual, y, y if store_sum else None), channels_dim)
        assert plan is not None, "row_norm_forward: unreadable layout (unsupported_reasons was not checked)"
        n_batch, n_channels, n_pos, stride_args, (block_p, block_c, num_warps), wide = plan
        config = tiles("row_norm_fwd", {"BLOCK_P": block_p, "num_warps": num_warps})
        tiles_per_batch = cdiv(n_pos, config["BLOCK_P"])
        stats_shape = x.shape[:channels_dim] + x.shape[channels_dim + 1 :]
        self._stats = empty_template(stats_shape, torch.float32, x.device) if store_stats else None
        self._store_sum = store_sum
        self._ints = (
            n_pos, n_channels, tiles_per_batch, *stride_args, *_vector_strides(weight, bias, x_scale),
            rows_per_scale(n_batch * n_pos, row_scale),
        )  # fmt: skip
        self._constexprs = (
            residual is not None, store_sum, weight is not None, bias is not None, ACTIVATIONS[activation],
            config["BLOCK_P"], block_c, wide, store_stats, x_scale is not None, dropout, row_scale is not None,
        )  # fmt: skip
        self._launch = DirectLaunch(row_norm_fwd_kernel, (n_batch * tiles_per_batch,), num_warps=config["num_warps"])

    def __call__(self, x, weight, bias, eps, residual, x_scale=None, seed=None, dropout_p=0.0, row_scale=None):
        y = torch.empty_like(x)
        total = torch.empty_like(x) if self._store_sum else None
        mean = rstd = None
        if self._stats is not None:
            mean, rstd = torch.empty_like(self._stats), torch.empty_like(self._stats)
        self._launch(
            x, x if residual is None else residual, x if weight is None else weight, x if bias is None else bias,
            x if x_scale is None else x_scale, x if row_scale is None else row_scale, y, y if total is None else total,
            y if mean is None else mean, y if rstd is None else rstd, x if seed is None else seed, *self._ints, eps,
            dropout_p, *self._constexprs,
        )  # fmt: skip
        return y, total, mean, rstd


class _BackwardLaunch:
    """The backward's launches for one layout: the row kernel, then one kernel that sums the
    per-program dweight/dbias partials in a fixed order and casts them (no torch sum or cast).
    ``dropout``: the forward dropped x out (each call passes the forward's seed and p); the
    residual's gradient is then written apart from x's, as with x_scale and ``row_scale`` (each call
    passes one of this layout, :func:`rows_per_scale`). ``sum_dx``: dx's column sums (in dx's
    dtype) are reduced with the parameters' and returned last, a sixth output."""

    __slots__ = (
        "_constexprs", "_contiguous_grads", "_dx_sum", "_ints", "_launch", "_n_channels", "_partial",
        "_reduce", "_split_dres",
    )  # fmt: skip

    def __init__(
        self, dy, x, channels_dim, weight, bias, activation, residual, dsum, out, x_scale=None, dropout=False,
        sum_dx=False, row_scale=None,
    ):  # fmt: skip
        dx = torch.empty_like(x) if out is None else out
        # (the variants that write the residual's gradient apart are the ones with the narrow tile)
        self._split_dres = x_scale is not None or dropout or row_scale is not None
        dres = torch.empty_like(x) if self._split_dres else None
        self._contiguous_grads = False
        plan = _launch_plan("bwd", (x, residual, dy, dsum, dx, dres), channels_dim, self._split_dres)
        if plan is None:
            self._contiguous_grads = True
            dy, dsum = dy.contiguous(), None if dsum is None else dsum.contiguous()
            plan = _launch_plan("bwd", (x, residual, dy, dsum, dx, dres), channels_dim, self._split_dres)
        assert plan is not None, "row_norm_backward: unreadable layout (unsupported_reasons was not checked)"
        n_batch, n_channels, n_pos, stride_args, (block_p, block_c, num_warps), wide = plan
        default = {"BLOCK_P": block_p, "num_warps": num_warps, "programs_per_sm": BWD_PROGRAMS_PER_SM}
        config = tiles("row_norm_bwd", default)
        tiles_per_batch = cdiv(n_pos, config["BLOCK_P"])
        n_tiles = n_batch * tiles_per_batch
        n_programs = backward_programs(x.device, n_tiles, config["programs_per_sm"])
        self._n_channels = n_channels
        self._partial = empty_template((n_programs, n_channels), torch.float32, x.device)
        self._dx_sum = empty_template((n_channels,), dx.dtype, x.device) if sum_dx else None
        self._ints = (
            n_pos,
            n_channels,
            tiles_per_batch,
            n_tiles,
            *stride_args,
            *_vector_strides(weight, bias, x_scale),
            rows_per_scale(n_batch * n_pos, row_scale),
        )
        self._constexprs = (
            residual is not None, dsum is not None, weight is not None, bias is not None, ACTIVATIONS[activation],
            config["BLOCK_P"], block_c, wide, x_scale is not None, dropout, sum_dx, row_scale is not None,
        )  # fmt: skip
        fit = None
        if x.device.type == "cuda":
            fit = functools.partial(
                _fit_backward_grid, num_warps=config["num_warps"], device=x.device, n_programs=n_programs
            )
        # (a persistent grid: the partials keep a row for every planned program, fit may use fewer)
        self._launch = DirectLaunch(row_norm_bwd_kernel, (n_programs,), fit=fit, num_warps=config["num_warps"])
        self._reduce = None
        if weight is not None or bias is not None or x_scale is not None or sum_dx:
            self._reduce = DirectLaunch(
                row_norm_param_grad_kernel, (cdiv(n_channels, PARAM_GRAD_BLOCK_C),), num_warps=4
            )

    @property
    def n_programs(self) -> int:
        """The programs of the persistent row kernel (as fitted on a GPU, once it has run)."""
        return self._launch.grid[0]

    def __call__(
        self, dy, x, weight, bias, mean, rstd, residual, dsum, out, x_scale=None, seed=None, dropout_p=0.0,
        row_scale=None,
    ):  # fmt: skip
        if self._contiguous_grads:
            dy, dsum = dy.contiguous(), None if dsum is None else dsum.contiguous()
        dx = torch.empty_like(x) if out is None else out
        dres = torch.empty_like(x) if self._split_dres else dx
        partial = self._partial
        # (comprehensions cost a call each: written out, on the hot path)
        dw_partial = mean if weight is None else torch.empty_like(partial)
        db_partial = mean if bias is None else torch.empty_like(partial)
        dxs_partial = mean if x_scale is None else torch.empty_like(partial)
        dx_sum = None if self._dx_sum is None else torch.empty_like(self._dx_sum)
        dxsum_partial = mean if dx_sum is None else torch.empty_like(partial)
        self._launch(
            x, x if residual is None else residual, x if weight is None else weight, x if bias is None else bias,
            x if x_scale is None else x_scale, x if row_scale is None else row_scale, dy, dy if dsum is None else dsum,
            mean, rstd, dx, dres, dw_partial,
            db_partial, dxs_partial, dxsum_partial, mean if seed is None else seed, *self._ints, dropout_p,
            *self._constexprs,
        )  # fmt: skip
        # (empty_like of a 1-D tensor is contiguous: a dense one keeps stride 1, any other gets it)
        dweight = None if weight is None else torch.empty_like(weight)
        dbias = None if bias is None else torch.empty_like(bias)
        dx_scale = None if x_scale is None else torch.empty_like(x_scale)
        if self._reduce is not None:  # (the row launch fixed its grid on its first call)
            self._reduce(
                dw_partial, db_partial, dxs_partial, dxsum_partial, mean if dweight is None else dweight,
                mean if dbias is None else dbias, mean if dx_scale is None else dx_scale,
                mean if dx_sum is None else dx_sum, self._launch.grid[0], self._n_channels, weight is not None, bias is not None,
                PARAM_GRAD_BLOCK_R, PARAM_GRAD_BLOCK_C, x_scale is not None, dx_sum is not None,
            )  # fmt: skip
        if dx_sum is None:
            return dx, dweight, dbias, dx_scale, dres
        return dx, dweight, dbias, dx_scale, dres, dx_sum


def rows_per_scale(n_rows: int, row_scale: torch.Tensor | None) -> int:
    """Rows that share one value of ``row_scale`` (1 without one): row r of the input (its index
    among the non-channel dims, in order) is scaled by ``row_scale.flatten()[r // rows_per_scale]``.
    Raises ValueError unless ``row_scale`` is contiguous with a number of values dividing the rows,
    and the rows are fewer than 2**31 (the kernels index them in int32)."""
    if row_scale is None:
        return 1
    if not row_scale.is_contiguous() or row_scale.numel() == 0 or n_rows % row_scale.numel():
        raise ValueError(
            f"row_scale must be contiguous with a number of values dividing the {n_rows} rows, got shape "
            f"{tuple(row_scale.shape)} and strides {row_scale.stride()}"
        )
    if n_rows > INT32_OFFSET_LIMIT:
        raise ValueError(f"row_scale takes inputs of at most {INT32_OFFSET_LIMIT} rows, got {n_rows}")
    return n_rows // row_scale.numel()


def _vector_strides(*vectors) -> tuple[int, ...]:
    """The strides of the per-channel vectors (weight, bias, x_scale), 0 for an absent one."""
    return tuple(0 if v is None else v.stride(0) for v in vectors)


# Per layout (each input length adds one: bounded); cleared when a tile override starts or ends.
_launches: dict[tuple, _ForwardLaunch | _BackwardLaunch] = {}
on_tiles_change(_launches.clear)


def _cached(key: tuple, make):
    launch = _launches.get(key)
    if launch is None:
        if len(_launches) >= _MAX_PLANS:
            _launches.clear()
        launch = _launches[key] = make()
    return launch


def forward_launch(
    x, channels_dim, weight, bias, activation, residual=None, store_sum=False, store_stats=True, x_scale=None,
    dropout=False, row_scale=None,
) -> _ForwardLaunch:  # fmt: skip
    """The forward's launch for this input's layout (made once, then looked up):
    ``launch(x, weight, bias, eps, residual, x_scale=None, seed=None, dropout_p=0.0, row_scale=None)``
    -> :func:`row_norm_forward`'s result (mean and rstd None without ``store_stats``: inference
    needs no backward). With ``dropout`` every call passes a (2,) int64 ``seed`` and its
    ``dropout_p``; with ``row_scale`` (a tensor of the layout every call's will have: its values
    are not read here) every call passes its row scale."""
    channels_dim %= x.dim()
    key = (
        "fwd", channels_dim, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15, operand_key(residual),
        operand_key(weight), operand_key(bias), activation, store_sum, store_stats, operand_key(x_scale), dropout,
        operand_key(row_scale),
    )  # fmt: skip
    return _cached(
        key,
        lambda: _ForwardLaunch(
            x, channels_dim, weight, bias, activation, residual, store_sum, store_stats, x_scale, dropout, row_scale
        ),
    )


def row_norm_forward(
    x: torch.Tensor,
    channels_dim: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    residual: torch.Tensor | None = None,
    store_sum: bool = False,
    x_scale: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """activation(LayerNorm([x_scale *] [row_scale *] dropout(x) [+ residual])) over ``channels_dim``.

    Returns (y like x, the sum like x or None, mean, rstd); mean and rstd are fp32 of x's shape
    without the channel dim. Dropout when ``dropout_p`` > 0, its keep mask drawn from ``seed``
    ((2,) int64). ``row_scale``: a contiguous tensor of S values, S dividing the number of rows R
    (x's elements over its channels, in order), row r scaled by value r // (R / S): drop path's
    per-sample factor is a (B, 1, 1) row scale of a (B, N, C) input. ``unsupported_reasons`` must
    be empty for these inputs.
    """
    dropout = dropout_p > 0.0
    launch = forward_launch(
        x, channels_dim, weight, bias, activation, residual, store_sum, x_scale=x_scale, dropout=dropout,
        row_scale=row_scale,
    )  # fmt: skip
    return launch(x, weight, bias, eps, residual, x_scale, seed if dropout else None, dropout_p, row_scale)


def row_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    channels_dim: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str | None,
    residual: torch.Tensor | None = None,
    dsum: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of :func:`row_norm_forward`: (dx like x, dweight or None, dbias or None, dx_scale
    or None, dresidual like x).

    dresidual is the sum's gradient (with ``dsum``, the gradient of the stored sum, added in); it
    is dx itself (the same tensor) without ``x_scale``, ``row_scale`` and dropout, and x's gradient
    is ``x_scale * dresidual`` with it, ``dresidual * keep / (1 - p)`` with dropout (the keep mask
    redrawn from ``seed``, the forward's), times each row's scale with ``row_scale`` (the forward's),
    and all of them with all.
    Upstream gradients with a layout the kernel cannot read are made contiguous first. ``out``
    (x's shape and strides) receives dx; it may be dy or x (a program reads a tile's whole rows
    before writing them, no two programs share a row), never a buffer autograd keeps.
    """
    if out is not None and (out.shape != x.shape or out.stride() != x.stride()):
        got = f"got {tuple(out.shape)} and {out.stride()}"
        raise ValueError(f"row_norm_backward: out must have x's shape {tuple(x.shape)} and strides {x.stride()}, {got}")
    dropout = dropout_p > 0.0
    launch = backward_launch(
        dy, x, channels_dim, weight, bias, activation, residual, dsum, out, x_scale, dropout, row_scale=row_scale
    )
    return launch(
        dy, x, weight, bias, mean, rstd, residual, dsum, out, x_scale, seed if dropout else None, dropout_p, row_scale
    )


def backward_launch(
    dy, x, channels_dim, weight, bias, activation, residual=None, dsum=None, out=None, x_scale=None, dropout=False,
    sum_dx=False, row_scale=None,
) -> _BackwardLaunch:  # fmt: skip
    """The backward's launch for this input's layout (made once, then looked up):
    ``launch(dy, x, weight, bias, mean, rstd, residual, dsum, out, x_scale, seed=None, dropout_p=0.0)``
    -> :func:`row_norm_backward`'s result. With ``dropout`` every call passes the forward's seed
    and p; with ``row_scale`` (a tensor of the layout every call's will have) its row scale
    (``launch(..., seed, dropout_p, row_scale)``). With ``sum_dx`` the result has a sixth tensor:
    dx summed over every index but the channel's, (C,) in dx's dtype (the bias gradient of a
    linear layer whose output x is), reduced in fp32 from per-program partials in a fixed order,
    as dweight is."""
    channels_dim %= x.dim()
    key = (
        "bwd", channels_dim, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15, operand_key(residual),
        operand_key(weight), operand_key(bias), activation, operand_key(dy), operand_key(dsum),
        operand_key(out), operand_key(x_scale), dropout, sum_dx, operand_key(row_scale),
    )  # fmt: skip
    return _cached(
        key,
        lambda: _BackwardLaunch(
            dy, x, channels_dim, weight, bias, activation, residual, dsum, out, x_scale, dropout, sum_dx, row_scale
        ),
    )
