"""Layer 0 of the audio feature encoder in one Triton kernel: Conv1d(1 -> C, k, stride) on the
waveform, LayerNorm over the C channels (affine), exact GELU.

Layer 0's output (B, C, S / stride) is the largest activation of the model (512 x 32000 per 10 s
of audio). Unfused, the conv writes it, the LayerNorm + GELU reads it and writes it again. Here a
program owns BLOCK_T frames of one batch and all C channels: it reads the BLOCK_T * stride + k
samples it needs, forms the conv in fp32 registers, normalises and writes the output once.

The conv output is rounded to the output dtype before the LayerNorm, as the eager module's conv
writes it, so the statistics describe exactly the values the backward recomputes (in its kernel,
or with ``PRE_NORM_ONLY`` for the unfused backward of rows wider than it takes).

Output layout: (B, C, T) with channels-last strides (each frame's channels contiguous), written
through strides: what the next layer's cuDNN conv reads without transposing.

The backward (``conv0_ln_gelu_bwd_kernel``) is one kernel too: it recomputes the conv output in
registers, runs the LayerNorm + GELU backward and reduces the weight, LayerNorm and (optionally)
waveform gradients from dh held in registers; neither the conv output nor its gradient is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._launch import DirectLaunch, LaunchCache, empty_template, fixed_tail, operand_key
from d2v_kernels.kernels._row_norm import (
    activation_grad,
    apply_activation,
    backward_programs,
    tile_offsets,
    tile_ptrs,
    to_output,
    wide_offsets,
)
from d2v_kernels.kernels._tiles import cdiv, next_power_of_2, tiles

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CHANNELS = 2048  # one frame's channels per program row, BLOCK_T rows in registers
MAX_KERNEL = 64  # the taps are unrolled
# Forward tile: 4096 values, 32 fp32 a thread at 4 warps. Fewer warps a tile, fewer shuffles in the
# row reductions (sm_90 SASS a value: 8 x 512 at 4 warps 3.5, 16 x 512 at 8 warps 8.0; bench/NOTES.md).
ELEMENTS_PER_PROGRAM, _FORWARD_WARPS = 4096, 4
_GELU_EXACT = 1


@triton.jit
def _conv0_tile(
    wave_row, first_sample, t_mask, W, CB, n_channels, stride_wave_s, stride_w_c, stride_w_k,
    KERNEL: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Layer 0's conv output for BLOCK_T frames (first samples ``first_sample``) and all channels,
    rounded to OUT_DTYPE as layer 0 writes it; 0 past n_channels."""
    ch = tl.arange(0, BLOCK_C)
    ch_mask = ch < n_channels
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in range(KERNEL):
        x = tl.load(wave_row + (first_sample + j) * stride_wave_s, mask=t_mask, other=0.0).to(tl.float32)
        w = tl.load(W + ch * stride_w_c + j * stride_w_k, mask=ch_mask, other=0.0).to(tl.float32)
        acc += x[:, None] * w[None, :]
    if HAS_CONV_BIAS:
        acc += tl.load(CB + ch, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
    return to_output(acc, OUT_DTYPE).to(tl.float32)


@triton.jit
def conv0_ln_gelu_kernel(
    WAVE, W, CB, G, BETA, Y, MEAN, RSTD,
    n_frames, n_channels, tiles_per_batch,
    stride_wave_b, stride_wave_s, stride_w_c, stride_w_k,
    stride_y_b, stride_y_c, stride_y_t,
    eps,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, PRE_NORM_ONLY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    batch = pid // tiles_per_batch
    t = (pid % tiles_per_batch) * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = tl.arange(0, BLOCK_C)
    t_mask = t < n_frames
    ch_mask = ch < n_channels
    mask = t_mask[:, None] & ch_mask[None, :]

    # Frame t reads samples t * STRIDE + j, j < KERNEL: all inside the wave for t < n_frames. The
    # conv output is rounded to the output dtype (eager's conv rounds it there too).
    wave_row = WAVE + batch.to(tl.int64) * stride_wave_b
    first_sample = t.to(tl.int64) * STRIDE
    h = _conv0_tile(
        wave_row, first_sample, t_mask, W, CB, n_channels, stride_wave_s, stride_w_c, stride_w_k,
        KERNEL, HAS_CONV_BIAS, Y.dtype.element_ty, BLOCK_T, BLOCK_C,
    )  # fmt: skip

    offsets = tile_offsets(batch, t, ch, stride_y_b, stride_y_c, stride_y_t)
    if PRE_NORM_ONLY:
        tl.store(Y + offsets, h.to(Y.dtype.element_ty), mask=mask)
    else:
        mean = tl.sum(tl.where(mask, h, 0.0), axis=1) / n_channels
        centered = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / n_channels
        rstd = tl.rsqrt(var + eps)
        gamma = tl.load(G + ch, mask=ch_mask, other=0.0).to(tl.float32)
        beta = tl.load(BETA + ch, mask=ch_mask, other=0.0).to(tl.float32)
        z = centered * rstd[:, None] * gamma[None, :] + beta[None, :]
        y = apply_activation(z, 1)
        tl.store(Y + offsets, to_output(y, Y.dtype.element_ty), mask=mask)
        row = batch.to(tl.int64) * n_frames + t
        tl.store(MEAN + row, mean, mask=t_mask)
        tl.store(RSTD + row, rstd, mask=t_mask)


@triton.jit
def conv0_ln_gelu_bwd_kernel(
    DY, WAVE, W, CB, G, BETA, MEAN, RSTD, DW_PARTIAL, DG_PARTIAL, DB_PARTIAL, DCB_PARTIAL, DFRAME,
    n_frames, n_channels, tiles_per_batch, n_tiles,
    stride_dy_b, stride_dy_c, stride_dy_t,
    stride_wave_b, stride_wave_s, stride_w_c, stride_w_k,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, WAVE_GRAD: tl.constexpr,
    UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Layer 0's whole backward from dy (B, C, T) alone: per tile the conv output h is recomputed
    from the wave (K multiply-adds a value), then LayerNorm + GELU backward gives dh in fp32
    registers, which feeds the parameter gradients and is never stored. Persistent programs walk
    tiles pid, pid + n_programs, ... in a fixed order into fp32 partials (summed with torch: no
    atomics, the same bits every run):
        DW_PARTIAL (P, KERNEL, C): dweight[c, j] = sum_t dh[t, c] * wave[t * STRIDE + j]
        DG_PARTIAL, DB_PARTIAL, DCB_PARTIAL (P, C): d ln_weight, d ln_bias, d conv_bias
    With WAVE_GRAD, DFRAME (B, T, KERNEL) gets each frame's sample gradients
    sum_c dh[t, c] * w[c, j]; the launcher overlap-adds them into the waveform's gradient."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    ch = tl.arange(0, BLOCK_C)
    ch_mask = ch < n_channels
    taps = tl.arange(0, BLOCK_J)
    tap_mask = taps < KERNEL
    dw_acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
    dg_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dcb_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(pid, n_tiles, n_programs):
        batch = tile // tiles_per_batch
        t = (tile % tiles_per_batch) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < n_frames
        mask = t_mask[:, None] & ch_mask[None, :]
        # int32 offsets within a batch row / slice, 64-bit bases (int64 per element costs registers)
        wave_row = WAVE + batch.to(tl.int64) * stride_wave_b
        first_sample = t * STRIDE
        h = _conv0_tile(
            wave_row, first_sample, t_mask, W, CB, n_channels, stride_wave_s, stride_w_c, stride_w_k,
            KERNEL, HAS_CONV_BIAS, DY.dtype.element_ty, BLOCK_T, BLOCK_C,
        )  # fmt: skip
        row_base = batch.to(tl.int64) * n_frames
        mean = tl.load(MEAN + row_base + t, mask=t_mask, other=0.0)
        rstd = tl.load(RSTD + row_base + t, mask=t_mask, other=0.0)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        # gamma, beta reloaded per tile (cache hits): registers held across the loop are the limit
        gamma = tl.load(G + ch, mask=ch_mask, other=0.0).to(tl.float32)
        beta = tl.load(BETA + ch, mask=ch_mask, other=0.0).to(tl.float32)
        dy_ptrs = tile_ptrs(DY, batch, t, ch, stride_dy_b, stride_dy_c, stride_dy_t, WIDE_OFFSETS)
        dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        dz *= activation_grad(xhat * gamma[None, :] + beta[None, :], 1)
        dg_acc += tl.sum(dz * xhat, axis=0)
        db_acc += tl.sum(dz, axis=0)
        dxhat = dz * gamma[None, :]
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / n_channels
        mean_dxhat = tl.sum(dxhat, axis=1) / n_channels
        dh = (dxhat - (xhat * mean_dxhat_xhat[:, None] + mean_dxhat[:, None])) * rstd[:, None]
        dh = tl.where(mask, dh, 0.0)
        if HAS_CONV_BIAS:
            dcb_acc += tl.sum(dh, axis=0)
        # samples[t, j] = wave[t * STRIDE + j]: the conv's im2col rows of this tile, taps padded to BLOCK_J
        sample_mask = t_mask[:, None] & tap_mask[None, :]
        sample_ptrs = wave_row + (first_sample[:, None] + taps[None, :]) * stride_wave_s
        samples = tl.load(sample_ptrs, mask=sample_mask, other=0.0).to(tl.float32)
        if UPCAST:  # fp32 operands, exact products (the interpreter's bf16 dot, or fp32 data)
            dw_acc += tl.dot(tl.trans(samples), dh, input_precision=FP32_PRECISION)
        else:  # dh rounded to the data's dtype (as eager's dh is), products exact, fp32 sums
            dw_acc += tl.dot(tl.trans(samples).to(DY.dtype.element_ty), dh.to(DY.dtype.element_ty))
        if WAVE_GRAD:  # dframe[t, j] = sum_c dh[t, c] * w[c, j], a row reduction per tap
            for j in range(KERNEL):
                w_j = tl.load(W + ch * stride_w_c + j * stride_w_k, mask=ch_mask, other=0.0).to(tl.float32)
                tl.store(DFRAME + (row_base + t) * KERNEL + j, tl.sum(dh * w_j[None, :], axis=1), mask=t_mask)
    dw_ptrs = DW_PARTIAL + (pid * KERNEL + taps[:, None]) * n_channels + ch[None, :]
    tl.store(dw_ptrs, dw_acc, mask=tap_mask[:, None] & ch_mask[None, :])
    tl.store(DG_PARTIAL + pid * n_channels + ch, dg_acc, mask=ch_mask)
    tl.store(DB_PARTIAL + pid * n_channels + ch, db_acc, mask=ch_mask)
    if HAS_CONV_BIAS:
        tl.store(DCB_PARTIAL + pid * n_channels + ch, dcb_acc, mask=ch_mask)


def output_frames(samples: int, kernel_size: int, stride: int) -> int:
    return (samples - kernel_size) // stride + 1


def unsupported_reasons(wave, weight, conv_bias, ln_weight, ln_bias) -> list[str]:
    """Why the fused layer-0 kernel cannot take these (empty when it can)."""
    reasons = []
    if wave.dtype not in KERNEL_DTYPES:
        reasons.append(f"wave has dtype {wave.dtype}; the kernel takes float16, bfloat16, float32")
    for name, t in (("weight", weight), ("conv_bias", conv_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and t.dtype != wave.dtype:
            reasons.append(f"layer 0 {name} has dtype {t.dtype}, wave has {wave.dtype}")
    channels, in_channels, kernel_size = weight.shape
    if in_channels != 1:
        reasons.append(f"layer 0 has {in_channels} input channels; the kernel reads a waveform (1)")
    return reasons + _size_reasons(channels, kernel_size, MAX_CHANNELS, MAX_KERNEL)


def _size_reasons(channels: int, kernel_size: int, max_channels: int, max_kernel: int, what: str = "") -> list[str]:
    reasons = []
    if channels > max_channels:
        reasons.append(f"layer 0 has {channels} channels > {max_channels}{what}")
    if kernel_size > max_kernel:
        reasons.append(f"layer 0 kernel size {kernel_size} > {max_kernel}{what}")
    return reasons


def launch_tiles(channels: int) -> dict:
    block_c = max(16, next_power_of_2(channels))
    block_t = max(1, min(64, ELEMENTS_PER_PROGRAM // block_c))
    return tiles("conv0", {"BLOCK_T": block_t, "num_warps": _FORWARD_WARPS}) | {"BLOCK_C": block_c}


def conv0_ln_gelu(wave, weight, conv_bias, ln_weight, ln_bias, stride: int, eps: float, *, pre_norm_only=False):
    """wave (B, S), weight (C, 1, k), conv_bias (C,) or None, ln_weight / ln_bias (C,), all of
    wave's dtype -> (y (B, C, T) in wave's dtype with channels-last strides (T * C, 1, C), mean
    (B, T) fp32, rstd (B, T) fp32), T = (S - k) // stride + 1. With ``pre_norm_only`` y is the conv
    output (rounded to the dtype) and mean / rstd are empty. The launch is kept per layout."""
    key = (
        wave.device, operand_key(wave), operand_key(weight), operand_key(conv_bias), operand_key(ln_weight),
        operand_key(ln_bias), stride, pre_norm_only,
    )  # fmt: skip
    make = lambda: Conv0Launch(wave, weight, conv_bias, ln_weight, ln_bias, stride, pre_norm_only=pre_norm_only)
    return _forward_launches.get(key, make)(wave, weight, conv_bias, ln_weight, ln_bias, eps)


_forward_launches = LaunchCache()


class Conv0Launch:
    """:func:`conv0_ln_gelu` on inputs of one layout (the waveform's and the parameters' shapes,
    strides, dtypes and alignment; the stride): tiles, grid and integer arguments fixed, the
    compiled kernel launched directly. ``launch(wave, weight, conv_bias, ln_weight, ln_bias, eps)``
    -> (y (B, C, T) with channels-last strides, mean, rstd). Without ``keep_stats`` (inference:
    nothing reads them) one scratch buffer takes both statistics and is returned as each."""

    __slots__ = ("_constexprs", "_contiguous", "_ints", "_launch", "_shared_stats", "_stats", "_y")

    def __init__(
        self, wave, weight, conv_bias, ln_weight, ln_bias, stride: int, *, pre_norm_only=False, keep_stats=True
    ):
        batch, samples = wave.shape
        channels, _, kernel_size = weight.shape
        frames = output_frames(samples, kernel_size, stride)
        self._y = empty_template((batch, frames, channels), wave.dtype, wave.device)
        stats_shape = (0,) if pre_norm_only else (batch, frames)
        self._stats = empty_template(stats_shape, torch.float32, wave.device)
        self._shared_stats = not pre_norm_only and not keep_stats
        # (B, C, T) with channels-last strides: each frame's C values contiguous, the layout the next
        # layer's cuDNN conv runs in without transposing, and whole rows for the LayerNorm.
        y = torch.empty_like(self._y).transpose(1, 2)
        config = launch_tiles(channels)
        tiles_per_batch = cdiv(frames, config["BLOCK_T"])
        self._contiguous = any(t is not None and not t.is_contiguous() for t in (conv_bias, ln_weight, ln_bias))
        positional = (
            frames, channels, tiles_per_batch, *wave.stride(), weight.stride(0), weight.stride(2), *y.stride()
        )  # fmt: skip
        constexprs = {
            "KERNEL": kernel_size, "STRIDE": stride, "HAS_CONV_BIAS": conv_bias is not None,
            "PRE_NORM_ONLY": pre_norm_only, "BLOCK_T": config["BLOCK_T"], "BLOCK_C": config["BLOCK_C"],
        }  # fmt: skip
        tail = fixed_tail(conv0_ln_gelu_kernel, 8, (*positional, None), constexprs)
        # eps, between the integers and the constexprs, is given per call
        self._ints, self._constexprs = tail[: len(positional)], tail[len(positional) + 1 :]
        self._launch = DirectLaunch(conv0_ln_gelu_kernel, (batch * tiles_per_batch,), num_warps=config["num_warps"])

    def __call__(self, wave, weight, conv_bias, ln_weight, ln_bias, eps: float):
        if self._contiguous:
            conv_bias, ln_weight, ln_bias = (
                None if t is None else t.contiguous() for t in (conv_bias, ln_weight, ln_bias)
            )
        y = torch.empty_like(self._y).transpose(1, 2)
        if self._shared_stats:
            mean = rstd = torch.empty_like(self._stats)
        else:
            mean, rstd = torch.empty_like(self._stats), torch.empty_like(self._stats)
        self._launch(
            wave, weight, conv_bias if conv_bias is not None else weight, ln_weight, ln_bias, y, mean, rstd,
            *self._ints, eps, *self._constexprs,
        )  # fmt: skip
        return y, mean, rstd


# The fused backward holds a (BLOCK_T, C) tile of several fp32 values and the (taps, C) weight
# gradient in registers; wider rows (1024 spills 0.7 to 1.4 KB at any warp count, sm_90) or
# longer kernels take the unfused backward (recompute h, row-norm backward, cuDNN's conv gradients).
BWD_MAX_CHANNELS = 512
BWD_MAX_KERNEL = 16
BWD_MIN_BLOCK_T = 16  # BLOCK_T is the reduction length of the weight-gradient dot: at least 16
# Persistent programs per SM of the fused backward: one, as its 8 warps of 255 registers fill the
# register file (ptxas, sm_90).
_BWD_PROGRAMS_PER_SM = 1


# fp32 data: the weight gradient's dot in three tf32 passes (fp32-accurate products, tensor cores)
BWD_FP32_PRECISION = "tf32x3"


def _upcast_dot(wave) -> bool:
    """fp32 operands for the weight-gradient dot: fp32 data, or bf16 on the CPU interpreter (whose
    dot takes no bf16)."""
    return wave.dtype == torch.float32 or (wave.device.type == "cpu" and wave.dtype == torch.bfloat16)


def backward_reasons(channels: int, kernel_size: int) -> list[str]:
    """Why layer 0's backward cannot run as one kernel (empty when it can)."""
    return _size_reasons(channels, kernel_size, BWD_MAX_CHANNELS, BWD_MAX_KERNEL, " (fused backward)")


def backward_tiles(channels: int) -> dict:
    default = {"BLOCK_T": BWD_MIN_BLOCK_T, "num_warps": 8, "programs_per_sm": _BWD_PROGRAMS_PER_SM}
    config = tiles("conv0_bwd", default)
    if config["BLOCK_T"] < BWD_MIN_BLOCK_T:
        raise ValueError(f"conv0_bwd: BLOCK_T must be at least {BWD_MIN_BLOCK_T}, got {config['BLOCK_T']}")
    return config | {"BLOCK_C": max(16, next_power_of_2(channels))}


def conv0_ln_gelu_backward(dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, stride: int, *, wave_grad):
    """Layer 0's backward as one kernel. dy (B, C, T) any strides; wave (B, S); weight (C, 1, k);
    conv_bias (C,) or None; ln_weight, ln_bias (C,); all in wave's dtype; mean, rstd (B, T) fp32
    from the forward. Returns (dwave (B, S) or None, dweight, dconv_bias or None, dln_weight,
    dln_bias), each in its parameter's dtype, reduced in fp32 in a fixed order (deterministic).
    The conv output is recomputed in registers and neither it nor its gradient is stored. The
    launch is kept per layout."""
    wave_grad = bool(wave_grad)
    key = (
        wave.device, operand_key(dy), operand_key(wave), operand_key(weight), operand_key(conv_bias),
        operand_key(ln_weight), operand_key(ln_bias), operand_key(mean), operand_key(rstd), stride, wave_grad,
    )  # fmt: skip
    make = lambda: Conv0BackwardLaunch(dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, stride, wave_grad)
    return _backward_launches.get(key, make)(dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd)


_backward_launches = LaunchCache()


class Conv0BackwardLaunch:
    """:func:`conv0_ln_gelu_backward` on inputs of one layout (dy's, the waveform's, the
    parameters' and the statistics' shapes, strides, dtypes and alignment; the stride; whether the
    waveform gets a gradient): tiles, programs, grid and integer arguments fixed, the compiled
    kernel launched directly. ``launch(dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd)``
    -> :func:`conv0_ln_gelu_backward`'s result."""

    __slots__ = ("_contiguous", "_launch", "_n_programs", "_samples", "_stride", "_tail", "_wave_grad")

    def __init__(self, dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, stride: int, wave_grad: bool):
        batch, self._samples = wave.shape
        channels, _, kernel_size = weight.shape
        frames = dy.shape[2]
        config = backward_tiles(channels)
        block_t = config["BLOCK_T"]
        tiles_per_batch = cdiv(frames, block_t)
        n_tiles = batch * tiles_per_batch
        self._n_programs = backward_programs(wave.device, n_tiles, config["programs_per_sm"])
        self._stride, self._wave_grad = stride, wave_grad
        self._contiguous = any(
            t is not None and not t.is_contiguous() for t in (conv_bias, ln_weight, ln_bias, mean, rstd)
        )
        positional = (
            frames, channels, tiles_per_batch, n_tiles, *dy.stride(), *wave.stride(), weight.stride(0),
            weight.stride(2),
        )  # fmt: skip
        constexprs = {
            "KERNEL": kernel_size, "STRIDE": stride, "HAS_CONV_BIAS": conv_bias is not None, "WAVE_GRAD": wave_grad,
            "UPCAST": _upcast_dot(wave), "FP32_PRECISION": BWD_FP32_PRECISION,
            "WIDE_OFFSETS": wide_offsets(channels, frames, [(0, dy.stride(1), dy.stride(2))]),
            "BLOCK_T": block_t, "BLOCK_C": config["BLOCK_C"], "BLOCK_J": max(16, next_power_of_2(kernel_size)),
        }  # fmt: skip
        self._tail = fixed_tail(conv0_ln_gelu_bwd_kernel, 13, positional, constexprs)
        self._launch = DirectLaunch(conv0_ln_gelu_bwd_kernel, (self._n_programs,), num_warps=config["num_warps"])

    def __call__(self, dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd):
        if self._contiguous:
            conv_bias, ln_weight, ln_bias, mean, rstd = (
                None if t is None else t.contiguous() for t in (conv_bias, ln_weight, ln_bias, mean, rstd)
            )
        batch, frames, kernel_size = dy.shape[0], dy.shape[2], weight.shape[2]
        n_programs, channels = self._n_programs, weight.shape[0]
        f32 = dict(device=wave.device, dtype=torch.float32)
        dw_partial = torch.empty((n_programs, kernel_size, channels), **f32)
        dg_partial = torch.empty((n_programs, channels), **f32)
        db_partial = torch.empty((n_programs, channels), **f32)
        dcb_partial = torch.empty((n_programs, channels), **f32) if conv_bias is not None else dg_partial
        dframe = torch.empty((batch, frames, kernel_size), **f32) if self._wave_grad else dg_partial
        self._launch(
            dy, wave, weight, conv_bias if conv_bias is not None else weight, ln_weight, ln_bias, mean, rstd,
            dw_partial, dg_partial, db_partial, dcb_partial, dframe, *self._tail,
        )  # fmt: skip
        dweight = dw_partial.sum(0).t().contiguous().reshape(weight.shape).to(weight.dtype)
        d_ln_weight = dg_partial.sum(0).to(ln_weight.dtype)
        d_ln_bias = db_partial.sum(0).to(ln_bias.dtype)
        d_conv_bias = dcb_partial.sum(0).to(conv_bias.dtype) if conv_bias is not None else None
        dwave = None
        if self._wave_grad:  # overlap-add: frame t's tap j is sample t * stride + j (fixed order: deterministic)
            stride = self._stride
            dwave = torch.zeros((batch, self._samples), **f32)
            last = stride * (frames - 1) + 1
            for j in range(kernel_size):
                dwave[:, j : j + last : stride] += dframe[:, :, j]
            dwave = dwave.to(wave.dtype)
        return dwave, dweight, d_conv_bias, d_ln_weight, d_ln_bias
