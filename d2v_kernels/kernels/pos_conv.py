"""Triton kernels for the positional convolution: grouped Conv1d, LayerNorm (no affine) + GELU.

All activations are channels-last (B, T, C). One layer's forward is two launches (the conv
without the tail, then ``layer_norm_gelu_fwd_kernel``) or, opted into with the op's
``D2V_KERNELS_POS_CONV_ONE_PASS=1`` until a GPU has checked and measured it, one launch of
``grouped_conv1d_kernel`` with ``NORM_TAIL``:

- the implicit-GEMM grouped conv: a program owns BLOCK_T output frames of one batch row and one
  group's CG output channels; its K loop runs over the taps x the group's CG input channels,
  loading shifted x rows (zero outside [0, T), which is the conv's zero padding) and calling
  ``tl.dot`` with fp32 accumulation; it stores the pre-norm rows y (conv + bias);
- the tail: LayerNorm over all C channels + exact GELU needs every group of a frame, which one
  conv program does not compute. Each program counts itself in on its frame block's counter
  (atomic, acquire-release); the last of the block's group programs to arrive normalises the
  block's BLOCK_T rows, whole rows in registers (``layer_norm_gelu_tile``, the row kernel's code),
  and writes h over y (inference) or beside it (training keeps y for the backward). The
  statistics are those of the stored (rounded) rows, computed in two passes over registers.

The same conv kernel without the tail computes the conv's input gradient (a conv of dy with the flipped,
group-transposed weights).

Backward: ``layer_norm_gelu_bwd_kernel`` (recomputes the statistics from the saved pre-norm
row), the conv kernel for dx, and ``grouped_conv1d_weight_grad_kernel`` for dweight and dbias
(one program per (tap, group), deterministic reduction over B x T).

Weights are packed by :func:`pack_weights` to (K, CG, C): ``packed[j, i, g * CG + o]`` is the
weight from input channel ``g * CG + i`` at tap ``j`` to output channel ``g * CG + o``, so the
(input-channel x output-channel) tile of a tap is a row-major slab with contiguous output
channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._launch import DirectLaunch, LaunchCache, fixed_tail
from d2v_kernels.kernels._tiles import cdiv, next_power_of_2, tiles

# Tiles. BLOCK_T = 64 frames is the M of the conv GEMM (one wgmma M per warpgroup on H100);
# the group's channels are padded to a power of two >= 16 (tl.dot's minimum), and the K loop
# takes 16 input channels at a time so CG = 48 wastes nothing along K. To measure on the GPU:
# BLOCK_T 64 vs 128, BLOCK_CI 16 vs 32, num_stages 2-4.
CONV_BLOCK_T = 64
CONV_BLOCK_CI = 16
CONV_WARPS = 4
CONV_STAGES = 3
WGRAD_BLOCK_T = 64
WGRAD_WARPS = 4
WGRAD_STAGES = 3
MAX_GROUP_CHANNELS = 64  # Data2Vec: 48 (base), 64 (large); caps the AOT-compiled variants
# LayerNorm rows: the whole channel row in registers, about 4096 elements per program; rows are
# padded to at least 256 channels so that few variants cover every C (tiny C only in tests).
MAX_CHANNELS = 4096
LN_MIN_BLOCK_C = 256
LN_ELEMENTS_PER_PROGRAM = 4096


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def grouped_conv1d_kernel(
    x_ptr,  # (B, T, C) any strides
    w_ptr,  # packed (K, CG, C), contiguous
    bias_ptr,  # (C,) (zeros for the input-gradient conv: one variant instead of two)
    y_ptr,  # (B, T, C), channel stride 1
    h_ptr,  # NORM_TAIL: (B, T, C) GELU(LayerNorm(y)), y's strides (may be y_ptr: in place)
    counter_ptr,  # NORM_TAIL: int32 (B, cdiv(T, BLOCK_T)), zero; left zero
    T,
    CG,
    K,
    PAD_LEFT,  # output frame t reads input frames t - PAD_LEFT .. t - PAD_LEFT + K - 1
    stride_xb,
    stride_xt,
    stride_xc,
    stride_yb,
    stride_yt,
    C,
    eps,
    DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies the raw bits
    BLOCK_T: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    NORM_TAIL: tl.constexpr,  # the last group program of a frame block normalises its rows
    TAIL_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    group = tl.program_id(1)
    batch = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_ci = tl.arange(0, BLOCK_CI)
    offs_co = tl.arange(0, BLOCK_CO)
    co_mask = offs_co < CG

    x_group = x_ptr + batch * stride_xb + group * CG * stride_xc
    w_group = w_ptr + group * CG
    acc = tl.zeros((BLOCK_T, BLOCK_CO), dtype=tl.float32)
    num_ci_blocks = tl.cdiv(CG, BLOCK_CI)
    # One flat loop over (tap, input-channel block) so the pipeliner sees a single K loop.
    for step in range(0, K * num_ci_blocks):
        tap = step // num_ci_blocks
        ci = (step % num_ci_blocks) * BLOCK_CI + offs_ci
        ci_mask = ci < CG
        rows = offs_t + (tap - PAD_LEFT)
        row_mask = (rows >= 0) & (rows < T)  # zero padding of the conv
        a = tl.load(
            x_group + rows[:, None] * stride_xt + ci[None, :] * stride_xc,
            mask=row_mask[:, None] & ci_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_group + tap * (CG * C) + ci[:, None] * C + offs_co[None, :],
            mask=ci_mask[:, None] & co_mask[None, :],
            other=0.0,
        )
        if UPCAST_OPERANDS:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    bias = tl.load(bias_ptr + group * CG + offs_co, mask=co_mask, other=0.0)
    acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + batch * stride_yb + offs_t[:, None] * stride_yt + (group * CG + offs_co)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & co_mask[None, :])
    if NORM_TAIL:
        # The frame block's rows are complete once all its group programs have stored: each
        # counts itself in (the barrier orders every thread's stores before the release), and the
        # last to arrive (acquire) normalises the block's rows, whole, as the row kernel does.
        tl.debug_barrier()
        counter = counter_ptr + batch * tl.num_programs(0) + pid_t
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            for start in range(0, BLOCK_T, TAIL_ROWS):
                rows = pid_t * BLOCK_T + start + tl.arange(0, TAIL_ROWS)
                layer_norm_gelu_tile(
                    y_ptr + batch * stride_yb,
                    h_ptr + batch * stride_yb,
                    rows,
                    T,
                    C,
                    eps,
                    stride_yt,
                    stride_yt,
                    BLOCK_C,
                    ".cg",  # another program's stores: read through L2
                )
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zero for the next layer


@triton.jit
def layer_norm_gelu_tile(
    y_ptr, h_ptr, rows, n_rows, C, eps, stride_y, stride_h, BLOCK_C: tl.constexpr, CACHE: tl.constexpr
):
    """GELU(LayerNorm(y)) of ``rows`` (those < n_rows), whole rows of C in registers, fp32
    statistics (two passes over the registers: no cancellation at small variance)."""
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
    v = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0, cache_modifier=CACHE)
    v = v.to(tl.float32)
    mean = tl.sum(v, axis=1) / C
    centered = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)
    u = centered * rstd[:, None]
    # literal 1/sqrt(2) and 1/sqrt(2 pi): constexpr globals are compared on every launch
    h = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_gelu_fwd_kernel(
    y_ptr,  # (rows, C) pre-norm, row stride stride_y
    h_ptr,  # (rows, C) output, row stride stride_h (may alias y_ptr: each program reads then writes its rows)
    n_rows,
    C,
    eps,
    stride_y,
    stride_h,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    layer_norm_gelu_tile(y_ptr, h_ptr, rows, n_rows, C, eps, stride_y, stride_h, BLOCK_C, "")


@triton.jit
def layer_norm_gelu_bwd_kernel(
    y_ptr,  # (rows, C) pre-norm saved by the forward
    dh_ptr,  # (rows, C) gradient of the GELU output
    dy_ptr,  # (rows, C) gradient of the pre-norm input (output)
    n_rows,
    C,
    eps,
    stride_y,
    stride_dh,
    stride_dy,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
    v = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Statistics recomputed from the saved row (cheaper than storing them: the row is loaded anyway).
    mean = tl.sum(v, axis=1) / C
    centered = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)
    u = centered * rstd[:, None]
    # d GELU(u) / du = Phi(u) + u * phi(u)
    gelu_grad = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * (0.3989422804014327 * tl.exp(-0.5 * u * u))
    g = tl.where(mask, dh * gelu_grad, 0.0)
    mean_g = tl.sum(g, axis=1) / C
    mean_gu = tl.sum(g * u, axis=1) / C
    dy = rstd[:, None] * (g - mean_g[:, None] - u * mean_gu[:, None])
    tl.store(dy_ptr + rows[:, None] * stride_dy + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_conv1d_weight_grad_kernel(
    x_ptr,  # (B, T, C) layer input, any strides
    dy_ptr,  # (B, T, C) gradient of the conv output, channel stride 1
    dw_ptr,  # packed (K, CG, C) fp32 output
    db_ptr,  # (C,) fp32 output, written by the tap-0 programs
    B,
    T,
    CG,
    PAD_LEFT,
    stride_xb,
    stride_xt,
    stride_xc,
    stride_dyb,
    stride_dyt,
    C,
    DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies the raw bits
    BLOCK_T: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    # dw[tap, i, g*CG + o] = sum_{b, t} x[b, t + tap - PAD_LEFT, g*CG + i] * dy[b, t, g*CG + o]
    tap = tl.program_id(0)
    group = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_ci = tl.arange(0, BLOCK_CI)
    offs_co = tl.arange(0, BLOCK_CO)
    ci_mask = offs_ci < CG
    co_mask = offs_co < CG
    x_group = x_ptr + group * CG * stride_xc
    dy_group = dy_ptr + group * CG
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    num_t_blocks = tl.cdiv(T, BLOCK_T)
    for step in range(0, B * num_t_blocks):
        batch = step // num_t_blocks
        t = (step % num_t_blocks) * BLOCK_T + offs_t
        t_mask = t < T
        rows = t + (tap - PAD_LEFT)
        row_mask = (rows >= 0) & (rows < T) & t_mask
        # x tile loaded transposed: (input channels, frames)
        xt = tl.load(
            x_group + batch * stride_xb + offs_ci[:, None] * stride_xc + rows[None, :] * stride_xt,
            mask=ci_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        dy = tl.load(
            dy_group + batch * stride_dyb + t[:, None] * stride_dyt + offs_co[None, :],
            mask=t_mask[:, None] & co_mask[None, :],
            other=0.0,
        )
        if UPCAST_OPERANDS:
            acc = tl.dot(xt.to(tl.float32), dy.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(xt, dy, acc, input_precision=DOT_PRECISION)
        bias_acc += tl.sum(dy.to(tl.float32), axis=0)
    dw_ptrs = dw_ptr + tap * (CG * C) + offs_ci[:, None] * C + (group * CG + offs_co)[None, :]
    tl.store(dw_ptrs, acc, mask=ci_mask[:, None] & co_mask[None, :])
    if tap == 0:
        tl.store(db_ptr + group * CG + offs_co, bias_acc, mask=co_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _group_block(group_channels: int) -> int:
    return max(16, next_power_of_2(group_channels))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full precision (the fp32 contract is ~1e-5 relative); tf32 only matters for fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_operands(t: torch.Tensor) -> bool:
    # The Triton interpreter (CPU tensors) stores bf16 as uint16 and its tl.dot multiplies the raw
    # bits. Products of bf16 values are exact in fp32, so an fp32 dot with fp32 accumulation is
    # the same arithmetic as the tensor-core bf16 dot. Never taken on the GPU.
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def ln_blocks(channels: int) -> tuple[int, int]:
    block_c = max(LN_MIN_BLOCK_C, next_power_of_2(channels))
    return max(1, LN_ELEMENTS_PER_PROGRAM // block_c), block_c


def ln_warps(block_c: int) -> int:
    return 8 if block_c >= 2048 else 4


def pack_weights(
    weights: Sequence[torch.Tensor], groups: int, *, dtype: torch.dtype, transpose: bool = False
) -> torch.Tensor:
    """Layers' (C, CG, K) conv weights (one shape) -> packed (L, K, CG, C) in ``dtype`` (see module
    docstring); layer l's packed weight is ``[l]``. All layers in one copy: a handful of tensor ops a
    call, not a handful a layer (each costs host time on the eager path). Called inside the custom
    ops, below autograd.

    ``transpose=True`` packs the weights of the input-gradient conv: taps flipped and input /
    output channels swapped inside each group.
    """
    channels, group_channels, k = weights[0].shape
    w = torch.stack(list(weights)).to(dtype)
    w = w.view(len(weights), groups, group_channels, group_channels, k)  # (layer, g, out, in, tap)
    if transpose:
        w = w.flip(-1).transpose(2, 3)  # (layer, g, in -> out, out -> in, flipped tap)
    return w.permute(0, 4, 3, 1, 2).reshape(len(weights), k, group_channels, channels).contiguous()


def unpack_weight_grads(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Layers' packed (L, K, CG, C) gradients -> (L, C, CG, K) in the conv weights' layout."""
    layers, k, group_channels, channels = packed.shape
    grad = packed.view(layers, k, group_channels, groups, group_channels).permute(0, 3, 4, 2, 1)
    return grad.reshape(layers, channels, group_channels, k).contiguous()


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


_conv_launches = LaunchCache()


def grouped_conv1d(x, packed_weight, bias, *, pad_left: int, out=None):
    """Channels-last grouped conv: x (B, T, C) any strides, packed_weight (K, CG, C) (one layer's
    from :func:`pack_weights`), bias (C,) or None. Output frame t reads input frames t - pad_left
    .. t - pad_left + K - 1 (zero outside [0, T)). Returns (B, T, C) in x's dtype (or writes
    ``out``, channel stride 1). fp32 accumulation. The launch is kept per layout and made
    directly on later calls."""
    if bias is None:
        bias = torch.zeros((x.shape[2],), device=x.device, dtype=x.dtype)
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _launch_conv(x, packed_weight, bias, out, out, out, pad_left, None)
    return out


def tail_counters(x: torch.Tensor) -> torch.Tensor:
    """The zeroed int32 counters :func:`grouped_conv1d_layer_norm_gelu` needs for input x; every
    layer of a stack may use the same ones in turn (a launch leaves them zero)."""
    block_t = _conv_config()["BLOCK_T"]
    return torch.zeros((x.shape[0] * cdiv(x.shape[1], block_t),), device=x.device, dtype=torch.int32)


def grouped_conv1d_layer_norm_gelu(
    x, packed_weight, bias, *, pad_left: int, eps: float, counters, out=None, hidden=None
):
    """One layer in one launch: y = :func:`grouped_conv1d` (written to ``out``) and
    h = GELU(LayerNorm(y)) over the channels, no affine (written to ``hidden``, or over y in
    ``out`` when ``hidden`` is None). Returns (y, h). ``counters``: from :func:`tail_counters`.

    The LayerNorm needs every group of a frame, which one conv program does not compute: the
    last of a frame block's group programs to finish normalises the block's rows (read back
    from L2), so each row's statistics come from the whole row, as in the two-launch path."""
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    hidden = out if hidden is None else hidden
    assert hidden.stride() == out.stride() and hidden.dtype == out.dtype
    _launch_conv(x, packed_weight, bias, out, hidden, counters, pad_left, float(eps))
    return out, hidden


def _launch_conv(x, packed_weight, bias, out, hidden, counters, pad_left: int, eps: float | None):
    launch, tail = _conv_launch(x, packed_weight, bias, out, hidden, pad_left, eps)
    launch(x, packed_weight, bias, out, hidden, counters, *tail)


def _conv_launch(x, packed_weight, bias, out, hidden, pad_left: int, eps: float | None):
    key = (
        x.shape, x.stride(), x.dtype, x.device, _aligned(x), packed_weight.shape, packed_weight.stride(),
        packed_weight.dtype, _aligned(packed_weight), bias.dtype, _aligned(bias), out.stride(), out.dtype,
        _aligned(out), _aligned(hidden), pad_left, eps,
    )  # fmt: skip
    return _conv_launches.get(key, lambda: _grouped_conv1d_launch(x, packed_weight, pad_left, out, eps))


def grouped_conv1d_launch(x, packed_weight, bias, out, *, pad_left: int):
    """:func:`grouped_conv1d` with ``out`` for operands of these layouts, as one callable:
    ``launch(x, packed_weight, bias, out)``, for a caller that keeps it for them."""
    launch, tail = _conv_launch(x, packed_weight, bias, out, out, pad_left, None)
    return lambda x, packed_weight, bias, out: launch(x, packed_weight, bias, out, out, out, *tail)


def _conv_config() -> dict:
    return tiles(
        "pos_conv",
        {"BLOCK_T": CONV_BLOCK_T, "BLOCK_CI": CONV_BLOCK_CI, "num_warps": CONV_WARPS, "num_stages": CONV_STAGES},
    )


def _grouped_conv1d_launch(x, packed_weight, pad_left, out, eps):
    batch, frames, channels = x.shape
    k, group_channels, _ = packed_weight.shape
    block_co = _group_block(group_channels)
    config = _conv_config()
    grid = (cdiv(frames, config["BLOCK_T"]), channels // group_channels, batch)
    rows, block_c = ln_blocks(channels) if eps is not None else (1, 16)  # the tail takes the row kernel's tile
    constexprs = {
        "DOT_PRECISION": dot_precision(x.dtype),
        "UPCAST_OPERANDS": _upcast_operands(x),
        "BLOCK_T": config["BLOCK_T"],
        "BLOCK_CI": min(config["BLOCK_CI"], block_co),
        "BLOCK_CO": block_co,
        "NORM_TAIL": eps is not None,
        "TAIL_ROWS": min(rows, config["BLOCK_T"]),
        "BLOCK_C": block_c,
    }
    positional = (frames, group_channels, k, pad_left, *x.stride(), out.stride(0), out.stride(1), channels)
    positional += (1e-5 if eps is None else eps,)
    tail = fixed_tail(grouped_conv1d_kernel, 6, positional, constexprs)
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    return DirectLaunch(grouped_conv1d_kernel, grid, **options), tail


_wgrad_launches = LaunchCache()


def _weight_grad_launch(x, grad_y, group_channels: int, kernel_size: int, pad_left: int):
    batch, frames, channels = x.shape
    block = _group_block(group_channels)
    config = tiles("pos_conv_wgrad", {"BLOCK_T": WGRAD_BLOCK_T, "num_warps": WGRAD_WARPS, "num_stages": WGRAD_STAGES})
    constexprs = {
        "DOT_PRECISION": dot_precision(x.dtype),
        "UPCAST_OPERANDS": _upcast_operands(x),
        "BLOCK_T": config["BLOCK_T"],
        "BLOCK_CI": block,
        "BLOCK_CO": block,
    }
    positional = (batch, frames, group_channels, pad_left, *x.stride(), grad_y.stride(0), grad_y.stride(1), channels)
    tail = fixed_tail(grouped_conv1d_weight_grad_kernel, 4, positional, constexprs)
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    return DirectLaunch(grouped_conv1d_weight_grad_kernel, (kernel_size, channels // group_channels), **options), tail


def grouped_conv1d_weight_grad(x, grad_y, *, group_channels: int, kernel_size: int, pad_left: int, out=None):
    """dweight (packed (K, CG, C), fp32) and dbias ((C,), fp32) of :func:`grouped_conv1d`, or
    written into ``out`` = (dweight, dbias), contiguous fp32 of those shapes.

    x: (B, T, C) the conv's input, any strides; grad_y: (B, T, C), channel stride 1."""
    channels = x.shape[2]
    if out is None:
        out = (
            torch.empty((kernel_size, group_channels, channels), device=x.device, dtype=torch.float32),
            torch.empty((channels,), device=x.device, dtype=torch.float32),
        )
    dw, db = out
    key = (
        x.shape, x.stride(), x.dtype, x.device, _aligned(x), grad_y.shape, grad_y.stride(), grad_y.dtype,
        _aligned(grad_y), _aligned(dw), _aligned(db), group_channels, kernel_size, pad_left,
    )  # fmt: skip
    launch, tail = _wgrad_launches.get(
        key, lambda: _weight_grad_launch(x, grad_y, group_channels, kernel_size, pad_left)
    )
    launch(x, grad_y, dw, db, *tail)
    return dw, db


def _rows(t: torch.Tensor) -> int:
    """Rows of C of a contiguous (..., C) tensor, read in place (row stride C): no view to make."""
    assert t.is_contiguous(), "pos_conv row kernels read contiguous (..., C) tensors"
    return t.numel() // t.shape[-1]


_row_launches = LaunchCache()


def layer_norm_gelu_rows(y, eps: float, *, out=None):
    """GELU(LayerNorm(y)) over the last dim, no affine. y: (..., C) contiguous. ``out`` may be
    ``y`` (in place). Returns a tensor like y. The launch is kept per layout."""
    n_rows = _rows(y)
    out = torch.empty_like(y) if out is None else out
    launch, tail = _row_launch(y, out, n_rows, eps)
    launch(y, out, *tail)
    return out


def _row_launch(y, out, n_rows: int, eps: float):
    key = (y.shape, y.dtype, y.device, _aligned(y), _aligned(out), out.dtype, eps)
    return _row_launches.get(key, lambda: _layer_norm_gelu_rows_launch(y.shape[-1], n_rows, eps))


def layer_norm_gelu_rows_launch(y, eps: float, *, out):
    """:func:`layer_norm_gelu_rows` with ``out`` for operands of these layouts, as one callable:
    ``launch(y, out)``, for a caller that keeps it for them."""
    launch, tail = _row_launch(y, out, _rows(y), eps)
    return lambda y, out: launch(y, out, *tail)


def _layer_norm_gelu_rows_launch(channels: int, n_rows: int, eps: float):
    block_rows, block_c = ln_blocks(channels)
    tail = fixed_tail(
        layer_norm_gelu_fwd_kernel, 2, (n_rows, channels, eps, channels, channels),
        {"BLOCK_ROWS": block_rows, "BLOCK_C": block_c},
    )  # fmt: skip
    return DirectLaunch(layer_norm_gelu_fwd_kernel, (cdiv(n_rows, block_rows),), num_warps=ln_warps(block_c)), tail


_row_backward_launches = LaunchCache()


def _layer_norm_gelu_rows_backward_launch(channels: int, n_rows: int, eps: float):
    block_rows, block_c = ln_blocks(channels)
    tail = fixed_tail(
        layer_norm_gelu_bwd_kernel, 3, (n_rows, channels, eps, channels, channels, channels),
        {"BLOCK_ROWS": block_rows, "BLOCK_C": block_c},
    )  # fmt: skip
    return DirectLaunch(layer_norm_gelu_bwd_kernel, (cdiv(n_rows, block_rows),), num_warps=ln_warps(block_c)), tail


def layer_norm_gelu_rows_backward(y, grad_h, eps: float):
    """Gradient of :func:`layer_norm_gelu_rows` w.r.t. y, in y's dtype (fp32 math).
    y, grad_h: (..., C) contiguous."""
    channels = y.shape[-1]
    n_rows = _rows(y)
    _rows(grad_h)
    dy = torch.empty_like(y)
    key = (y.shape, y.dtype, y.device, _aligned(y), grad_h.dtype, _aligned(grad_h), _aligned(dy), eps)
    launch, tail = _row_backward_launches.get(key, lambda: _layer_norm_gelu_rows_backward_launch(channels, n_rows, eps))
    launch(y, grad_h, dy, *tail)
    return dy
