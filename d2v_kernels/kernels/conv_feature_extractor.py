"""Layer 0 of the audio feature encoder in one Triton kernel: Conv1d(1 -> C, k, stride) on the
waveform, LayerNorm over the C channels (affine), exact GELU.

Layer 0's output (B, C, S / stride) is the largest activation of the model (512 x 32000 per 10 s
of audio). Unfused, the conv writes it, the LayerNorm + GELU reads it and writes it again. Here a
program owns BLOCK_T frames of one batch and all C channels: it reads the BLOCK_T * stride + k
samples it needs, forms the conv in fp32 registers, normalises and writes the output once.

The conv output is rounded to the output dtype before the LayerNorm, as the eager module's conv
writes it, so the statistics describe exactly the values that ``PRE_NORM_ONLY`` (the backward's
recompute) stores; the backward then runs the row-norm LayerNorm + GELU backward on them and
cuDNN's convolution backward for the weight and waveform gradients.

Output layout: channels-first (B, C, T) through strides, what the next layer's cuDNN conv reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._row_norm import _activation, _to_output
from d2v_kernels.kernels._tiles import tiles
from d2v_kernels.kernels.aot import AotVariant

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CHANNELS = 2048  # one frame's channels per program row, BLOCK_T rows in registers
MAX_KERNEL = 64  # the taps are unrolled
ELEMENTS_PER_PROGRAM = 8192  # BLOCK_T * BLOCK_C: 32 fp32 per thread at 8 warps
_GELU_EXACT = 1


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

    # Frame t reads samples t * STRIDE + j, j < KERNEL: all inside the wave for t < n_frames.
    wave_row = WAVE + batch.to(tl.int64) * stride_wave_b
    first_sample = t.to(tl.int64) * STRIDE
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in range(KERNEL):
        x = tl.load(wave_row + (first_sample + j) * stride_wave_s, mask=t_mask, other=0.0).to(tl.float32)
        w = tl.load(W + ch * stride_w_c + j * stride_w_k, mask=ch_mask, other=0.0).to(tl.float32)
        acc += x[:, None] * w[None, :]
    if HAS_CONV_BIAS:
        acc += tl.load(CB + ch, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
    # The conv output as the output dtype holds it (eager's conv rounds it there too).
    h = _to_output(acc, Y.dtype.element_ty).to(tl.float32)

    offsets = (
        batch.to(tl.int64) * stride_y_b + ch.to(tl.int64)[None, :] * stride_y_c + t.to(tl.int64)[:, None] * stride_y_t
    )
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
    if channels > MAX_CHANNELS:
        reasons.append(f"layer 0 has {channels} channels > {MAX_CHANNELS}")
    if kernel_size > MAX_KERNEL:
        reasons.append(f"layer 0 kernel size {kernel_size} > {MAX_KERNEL}")
    return reasons


def _launch_tiles(channels: int) -> dict:
    block_c = max(16, triton.next_power_of_2(channels))
    block_t = max(1, min(64, ELEMENTS_PER_PROGRAM // block_c))
    return tiles("conv0", {"BLOCK_T": block_t, "num_warps": 8 if block_t * block_c >= 4096 else 4}) | {
        "BLOCK_C": block_c
    }


def conv0_ln_gelu(wave, weight, conv_bias, ln_weight, ln_bias, stride: int, eps: float, *, pre_norm_only=False):
    """wave (B, S), weight (C, 1, k), conv_bias (C,) or None, ln_weight / ln_bias (C,), all of
    wave's dtype -> (y (B, C, T) in wave's dtype, mean (B, T) fp32, rstd (B, T) fp32), T =
    (S - k) // stride + 1. With ``pre_norm_only`` y is the conv output (rounded to the dtype) and
    mean / rstd are empty."""
    batch, samples = wave.shape
    channels, _, kernel_size = weight.shape
    frames = output_frames(samples, kernel_size, stride)
    y = torch.empty((batch, channels, frames), device=wave.device, dtype=wave.dtype)
    stats_shape = (0,) if pre_norm_only else (batch, frames)
    mean = torch.empty(stats_shape, device=wave.device, dtype=torch.float32)
    rstd = torch.empty(stats_shape, device=wave.device, dtype=torch.float32)
    config = _launch_tiles(channels)
    tiles_per_batch = triton.cdiv(frames, config["BLOCK_T"])
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


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTERS = ("WAVE", "W", "CB", "G", "BETA", "Y")
_INTS = (
    "n_frames",
    "n_channels",
    "tiles_per_batch",
    "stride_wave_b",
    "stride_wave_s",
    "stride_w_c",
    "stride_w_k",
    "stride_y_b",
    "stride_y_c",
    "stride_y_t",
)


def aot_variants() -> list[AotVariant]:
    """Data2Vec's layer 0 (512 channels, k=10, stride 5): every dtype, with and without conv bias,
    forward and pre-norm recompute; and the widest row the launcher takes, in fp16."""
    variants = []
    combos = [(dtype, 512, bias, pre) for dtype in KERNEL_DTYPES for bias in (False, True) for pre in (False, True)]
    combos += [(torch.float16, MAX_CHANNELS, False, False)]
    for dtype, channels, bias, pre_norm_only in combos:
        config = _launch_tiles(channels)
        types = dict.fromkeys(_POINTERS, "*" + _TRITON_TYPES[dtype]) | {"MEAN": "*fp32", "RSTD": "*fp32"}
        types |= dict.fromkeys(_INTS, "i32") | {"eps": "fp32"}
        constexprs = {
            "KERNEL": 10,
            "STRIDE": 5,
            "HAS_CONV_BIAS": bias,
            "PRE_NORM_ONLY": pre_norm_only,
            "BLOCK_T": config["BLOCK_T"],
            "BLOCK_C": config["BLOCK_C"],
        }
        types |= dict.fromkeys(constexprs, "constexpr")
        types = {arg: types[arg] for arg in conv0_ln_gelu_kernel.arg_names}
        name = f"conv0_{_TRITON_TYPES[dtype]}_c{channels}_bias{int(bias)}_pre{int(pre_norm_only)}"
        variants.append(AotVariant(name, conv0_ln_gelu_kernel, types, constexprs, config["num_warps"], 1))
    return variants
