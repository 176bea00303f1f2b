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

from d2v_kernels.kernels._row_norm import (
    _activation,
    _activation_grad,
    _backward_programs,
    _tile_offsets,
    _tile_ptrs,
    _to_output,
    _wide_offsets,
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
    wave_row, first_sample, t_mask, W0, CB0, c_start, n_channels0, stride_wave_s, stride_w0_c, stride_w0_k,
    K0: tl.constexpr, HAS_CB0: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Layer 0's conv output for BLOCK_M frames (first samples ``first_sample``) and channels
    c_start .. c_start + BLOCK_K, rounded to OUT_DTYPE as layer 0 writes it; 0 past n_channels0."""
    ch = c_start + tl.arange(0, BLOCK_K)
    ch_mask = ch < n_channels0
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for j in range(K0):
        x = tl.load(wave_row + (first_sample + j) * stride_wave_s, mask=t_mask, other=0.0).to(tl.float32)
        w = tl.load(W0 + ch * stride_w0_c + j * stride_w0_k, mask=ch_mask, other=0.0).to(tl.float32)
        acc += x[:, None] * w[None, :]
    if HAS_CB0:
        acc += tl.load(CB0 + ch, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
    return _to_output(acc, OUT_DTYPE).to(tl.float32)


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
        wave_row, first_sample, t_mask, W, CB, 0, n_channels, stride_wave_s, stride_w_c, stride_w_k,
        KERNEL, HAS_CONV_BIAS, Y.dtype.element_ty, BLOCK_T, BLOCK_C,
    )  # fmt: skip

    offsets = _tile_offsets(batch, t, ch, stride_y_b, stride_y_c, stride_y_t)
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
        y = _activation(z, 1)
        tl.store(Y + offsets, _to_output(y, Y.dtype.element_ty), mask=mask)
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
            wave_row, first_sample, t_mask, W, CB, 0, n_channels, stride_wave_s, stride_w_c, stride_w_k,
            KERNEL, HAS_CONV_BIAS, DY.dtype.element_ty, BLOCK_T, BLOCK_C,
        )  # fmt: skip
        row_base = batch.to(tl.int64) * n_frames
        mean = tl.load(MEAN + row_base + t, mask=t_mask, other=0.0)
        rstd = tl.load(RSTD + row_base + t, mask=t_mask, other=0.0)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        # gamma, beta reloaded per tile (cache hits): registers held across the loop are the limit
        gamma = tl.load(G + ch, mask=ch_mask, other=0.0).to(tl.float32)
        beta = tl.load(BETA + ch, mask=ch_mask, other=0.0).to(tl.float32)
        dy_ptrs = _tile_ptrs(DY, batch, t, ch, stride_dy_b, stride_dy_c, stride_dy_t, WIDE_OFFSETS)
        dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        dz *= _activation_grad(xhat * gamma[None, :] + beta[None, :], 1)
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


@triton.jit
def conv01_ln_gelu_kernel(
    WAVE, W0, CB0, G0, BETA0, W1, CB1, G1, BETA1, Y,
    n_frames1, n_channels0, n_channels1, tiles_per_batch,
    stride_wave_b, stride_wave_s, stride_w0_c, stride_w0_k,
    stride_y_b, stride_y_c, stride_y_t,
    eps0, eps1,
    K0: tl.constexpr, S0: tl.constexpr, K1: tl.constexpr, S1: tl.constexpr,
    HAS_CB0: tl.constexpr, HAS_CB1: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Layers 0 and 1 in one program per BLOCK_M layer-1 frames: layer 0's normalised
    activations are formed in registers, tap by tap and BLOCK_K channels at a time, as the A
    operand of layer 1's implicit GEMM (K = K1 x C0, N = C1 <= BLOCK_N); layer 0's output never
    reaches memory. Per tap, a first pass over the channels gathers the layer-0 LayerNorm
    statistics (Chan's pairwise merge of per-chunk mean and squared deviations), a second forms
    GELU(LN(conv)) and feeds the dot. W1: (K1 * C0, C1), row j * C0 + c is tap j, channel c."""
    dtype = Y.dtype.element_ty
    pid = tl.program_id(0)
    batch = pid // tiles_per_batch
    t1 = (pid % tiles_per_batch) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_mask = t1 < n_frames1
    n = tl.arange(0, BLOCK_N)
    n_mask = n < n_channels1
    wave_row = WAVE + batch.to(tl.int64) * stride_wave_b
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in tl.static_range(K1):
        first_sample = (t1.to(tl.int64) * S1 + tap) * S0  # layer-0 frame t1 * S1 + tap
        count = tl.zeros((BLOCK_M,), dtype=tl.float32)
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c_start in range(0, n_channels0, BLOCK_K):
            h = _conv0_tile(
                wave_row, first_sample, t_mask, W0, CB0, c_start, n_channels0, stride_wave_s, stride_w0_c,
                stride_w0_k, K0, HAS_CB0, dtype, BLOCK_M, BLOCK_K,
            )  # fmt: skip
            k_mask = (c_start + tl.arange(0, BLOCK_K)) < n_channels0
            chunk_count = tl.minimum(n_channels0 - c_start, BLOCK_K).to(tl.float32)
            chunk_mean = tl.sum(h, axis=1) / chunk_count
            deviation = tl.where(k_mask[None, :], h - chunk_mean[:, None], 0.0)
            chunk_m2 = tl.sum(deviation * deviation, axis=1)
            total = count + chunk_count
            delta = chunk_mean - mean
            mean += delta * (chunk_count / total)
            m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
            count = total
        rstd = tl.rsqrt(m2 / n_channels0 + eps0)
        for c_start in range(0, n_channels0, BLOCK_K):
            ch = c_start + tl.arange(0, BLOCK_K)
            k_mask = ch < n_channels0
            h = _conv0_tile(
                wave_row, first_sample, t_mask, W0, CB0, c_start, n_channels0, stride_wave_s, stride_w0_c,
                stride_w0_k, K0, HAS_CB0, dtype, BLOCK_M, BLOCK_K,
            )  # fmt: skip
            gamma = tl.load(G0 + ch, mask=k_mask, other=0.0).to(tl.float32)
            beta = tl.load(BETA0 + ch, mask=k_mask, other=0.0).to(tl.float32)
            z = (h - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            a = tl.where(k_mask[None, :] & t_mask[:, None], _activation(z, 1), 0.0)
            a = _to_output(a, dtype)  # layer 0's output as it would be stored
            rows = (tap * n_channels0 + ch).to(tl.int64)
            w = tl.load(
                W1 + rows[:, None] * n_channels1 + n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            if UPCAST:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, w, input_precision=PRECISION)
    if HAS_CB1:
        acc += tl.load(CB1 + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h1 = _to_output(acc, dtype).to(tl.float32)
    mask = t_mask[:, None] & n_mask[None, :]
    mean1 = tl.sum(tl.where(mask, h1, 0.0), axis=1) / n_channels1
    centered = tl.where(mask, h1 - mean1[:, None], 0.0)
    rstd1 = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_channels1 + eps1)
    gamma1 = tl.load(G1 + n, mask=n_mask, other=0.0).to(tl.float32)
    beta1 = tl.load(BETA1 + n, mask=n_mask, other=0.0).to(tl.float32)
    y = _activation(centered * rstd1[:, None] * gamma1[None, :] + beta1[None, :], 1)
    offsets = _tile_offsets(batch, t1, n, stride_y_b, stride_y_c, stride_y_t)
    tl.store(Y + offsets, _to_output(y, dtype), mask=mask)


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
    (B, T) fp32, rstd (B, T) fp32), T = (S - k) // stride + 1. With ``pre_norm_only`` y is the conv output (rounded to the dtype) and
    mean / rstd are empty."""
    batch, samples = wave.shape
    channels, _, kernel_size = weight.shape
    frames = output_frames(samples, kernel_size, stride)
    # (B, C, T) with channels-last strides: each frame's C values contiguous, the layout the next
    # layer's cuDNN conv runs in without transposing, and whole rows for the LayerNorm.
    y = torch.empty((batch, frames, channels), device=wave.device, dtype=wave.dtype).transpose(1, 2)
    stats_shape = (0,) if pre_norm_only else (batch, frames)
    mean = torch.empty(stats_shape, device=wave.device, dtype=torch.float32)
    rstd = torch.empty(stats_shape, device=wave.device, dtype=torch.float32)
    config = launch_tiles(channels)
    tiles_per_batch = cdiv(frames, config["BLOCK_T"])
    conv_bias, ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (conv_bias, ln_weight, ln_bias))
    conv0_ln_gelu_kernel[(batch * tiles_per_batch,)](
        wave, weight, conv_bias if conv_bias is not None else weight, ln_weight, ln_bias, y, mean, rstd,
        frames, channels, tiles_per_batch,
        *wave.stride(), weight.stride(0), weight.stride(2),
        *y.stride(),
        eps,
        KERNEL=kernel_size, STRIDE=stride, HAS_CONV_BIAS=conv_bias is not None, PRE_NORM_ONLY=pre_norm_only,
        BLOCK_T=config["BLOCK_T"], BLOCK_C=config["BLOCK_C"], num_warps=config["num_warps"],
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
    The conv output is recomputed in registers and neither it nor its gradient is stored."""
    batch, samples = wave.shape
    channels, _, kernel_size = weight.shape
    frames = dy.shape[2]
    config = backward_tiles(channels)
    block_t = config["BLOCK_T"]
    tiles_per_batch = cdiv(frames, block_t)
    n_tiles = batch * tiles_per_batch
    n_programs = _backward_programs(wave.device, n_tiles, config["programs_per_sm"])
    f32 = dict(device=wave.device, dtype=torch.float32)
    dw_partial = torch.empty((n_programs, kernel_size, channels), **f32)
    dg_partial = torch.empty((n_programs, channels), **f32)
    db_partial = torch.empty((n_programs, channels), **f32)
    dcb_partial = torch.empty((n_programs, channels), **f32) if conv_bias is not None else dg_partial
    dframe = torch.empty((batch, frames, kernel_size), **f32) if wave_grad else dg_partial
    mean, rstd = mean.contiguous(), rstd.contiguous()
    conv_bias, ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (conv_bias, ln_weight, ln_bias))
    conv0_ln_gelu_bwd_kernel[(n_programs,)](
        dy, wave, weight, conv_bias if conv_bias is not None else weight, ln_weight, ln_bias, mean, rstd,
        dw_partial, dg_partial, db_partial, dcb_partial, dframe,
        frames, channels, tiles_per_batch, n_tiles,
        *dy.stride(),
        *wave.stride(), weight.stride(0), weight.stride(2),
        KERNEL=kernel_size, STRIDE=stride, HAS_CONV_BIAS=conv_bias is not None, WAVE_GRAD=bool(wave_grad),
        UPCAST=_upcast_dot(wave), FP32_PRECISION=BWD_FP32_PRECISION,
        WIDE_OFFSETS=_wide_offsets(channels, frames, [(0, dy.stride(1), dy.stride(2))]),
        BLOCK_T=block_t, BLOCK_C=config["BLOCK_C"], BLOCK_J=max(16, next_power_of_2(kernel_size)),
        num_warps=config["num_warps"],
    )  # fmt: skip
    dweight = dw_partial.sum(0).t().contiguous().reshape(weight.shape).to(weight.dtype)
    d_ln_weight = dg_partial.sum(0).to(ln_weight.dtype)
    d_ln_bias = db_partial.sum(0).to(ln_bias.dtype)
    d_conv_bias = dcb_partial.sum(0).to(conv_bias.dtype) if conv_bias is not None else None
    dwave = None
    if wave_grad:  # overlap-add: frame t's tap j is sample t * stride + j (fixed order: deterministic)
        dwave = torch.zeros((batch, samples), **f32)
        last = stride * (frames - 1) + 1
        for j in range(kernel_size):
            dwave[:, j : j + last : stride] += dframe[:, :, j]
        dwave = dwave.to(wave.dtype)
    return dwave, dweight, d_conv_bias, d_ln_weight, d_ln_bias


FUSED01_MAX_CHANNELS = 512  # layer 1's output row (BLOCK_N accumulators per frame) in registers
# fp16 / bf16 operands only (fused01_reasons): the dot's input precision setting does not apply.
_FUSED01_DOT_PRECISION = "tf32"


def fused01_reasons(wave, weights, conv_biases, ln_weights, ln_biases) -> list[str]:
    """Why layers 0 and 1 cannot run as one kernel (empty when they can). Lists of two layers."""
    reasons = unsupported_reasons(wave, weights[0], conv_biases[0], ln_weights[0], ln_biases[0])
    if wave.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"wave has dtype {wave.dtype}; the fused layers 0 + 1 take float16, bfloat16 (fp32 spills)")
    for name, t in (("weight", weights[1]), ("conv_bias", conv_biases[1]), ("ln_weight", ln_weights[1])):
        if t is not None and t.dtype != wave.dtype:
            reasons.append(f"layer 1 {name} has dtype {t.dtype}, wave has {wave.dtype}")
    if ln_biases[1].dtype != wave.dtype:
        reasons.append(f"layer 1 ln_bias has dtype {ln_biases[1].dtype}, wave has {wave.dtype}")
    if weights[1].shape[0] > FUSED01_MAX_CHANNELS:
        reasons.append(f"layer 1 has {weights[1].shape[0]} channels > {FUSED01_MAX_CHANNELS}")
    if weights[1].shape[2] > MAX_KERNEL:
        reasons.append(f"layer 1 kernel size {weights[1].shape[2]} > {MAX_KERNEL}")
    return reasons


def _fused01_tiles(channels1: int) -> dict:
    block_n = max(16, next_power_of_2(channels1))
    default = {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
    return tiles("conv01", default) | {"BLOCK_N": block_n}


def conv01_ln_gelu(wave, weights, conv_biases, ln_weights, ln_biases, strides, eps: float) -> torch.Tensor:
    """Layers 0 and 1 in one kernel. wave (B, S); per-layer lists of two: weights (C0, 1, k0) and
    (C1, C0, k1), conv_biases (entries may be None), ln_weights, ln_biases; strides (s0, s1); all
    in wave's dtype -> layer 1's output (B, C1, T1) in wave's dtype, channels-last strides. Layer
    0's output is never stored."""
    batch, samples = wave.shape
    (channels0, _, k0), (channels1, _, k1) = weights[0].shape, weights[1].shape
    frames0 = output_frames(samples, k0, strides[0])
    frames1 = output_frames(frames0, k1, strides[1])
    w1 = weights[1].permute(2, 1, 0).reshape(k1 * channels0, channels1).contiguous()  # (K, N), row tap * C0 + c
    cb0, cb1 = (None if t is None else t.contiguous() for t in conv_biases)
    g0, g1 = (t.contiguous() for t in ln_weights)
    b0, b1 = (t.contiguous() for t in ln_biases)
    # channels-last strides, as the layer-0 kernel's output
    y = torch.empty((batch, frames1, channels1), device=wave.device, dtype=wave.dtype).transpose(1, 2)
    config = _fused01_tiles(channels1)
    tiles_per_batch = cdiv(frames1, config["BLOCK_M"])
    conv01_ln_gelu_kernel[(batch * tiles_per_batch,)](
        wave, weights[0], cb0 if cb0 is not None else g0, g0, b0, w1, cb1 if cb1 is not None else g1, g1, b1, y,
        frames1, channels0, channels1, tiles_per_batch,
        *wave.stride(), weights[0].stride(0), weights[0].stride(2),
        *y.stride(),
        eps, eps,
        K0=k0, S0=strides[0], K1=k1, S1=strides[1], HAS_CB0=cb0 is not None, HAS_CB1=cb1 is not None,
        PRECISION=_FUSED01_DOT_PRECISION, UPCAST=wave.device.type == "cpu" and wave.dtype == torch.bfloat16,
        BLOCK_M=config["BLOCK_M"], BLOCK_K=config["BLOCK_K"], BLOCK_N=config["BLOCK_N"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return y
