"""Data2VecAudio's feature encoder: strided Conv1d -> LayerNorm(C) -> GELU, stacked.

Seven layers in the base config: kernels (10, 3, 3, 3, 3, 2, 2), strides (5, 2, 2, 2, 2, 2, 2),
512 channels, conv without bias, LayerNorm with affine (``feat_extract_norm="layer"``). The op
takes the waveform (B, S) and returns features channels-last (B, T, C).

The ``cuda`` backend is the C++/CUDA extension ``d2v_kernels._C`` (``csrc/``): each layer is one
kernel, conv with the LayerNorm + GELU in its epilogue, channels-last between layers. Its forward
saves nothing but the inputs for the backward, so between a training step's forward and backward
the encoder holds no activation. The backward reruns the forward through the Triton path's nodes
(below), keeping what they keep, and runs their backwards. Where the Triton path cannot take the
input, it reruns the fused forward keeping every layer's output instead and walks the layers down
with torch's convolution, LayerNorm and GELU backward ops.

The ``triton`` backend (the default on CUDA meanwhile) runs layer 0 (conv on the waveform,
LayerNorm, GELU) as one Triton kernel, so the largest activation is written once; then per layer
cuDNN's strided conv and the Triton row-norm LayerNorm + GELU, every activation (B, C, T) in
channels-last strides, so cuDNN runs without transposes. For the backward it keeps one tensor a
layer, the conv output (the LayerNorm's input), and recomputes each activation where a conv's
weight gradient needs it (an elementwise pass; for layer 0 a read of the waveform); layer 0's
backward is one kernel, which recomputes its conv output in registers. With
``D2V_KERNELS_FUSE_CONV01=1`` (opt-in until a GPU has timed it) layers 0 and 1 run as one Triton
kernel, layer 0's activations formed in registers as the A operand of layer 1's implicit GEMM, so
the largest activation never reaches memory (fp16 / bf16).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from d2v_kernels import dispatch
from d2v_kernels._extension import extension_reasons
from d2v_kernels._extension import module as extension_module
from d2v_kernels.ops._checks import (
    KERNEL_DTYPES,
    check_eps,
    check_param_list,
    check_same_device,
    check_tensor,
    layer_norm_compute_dtype,
)
from d2v_kernels.ops._eager import pick, register_autograd
from d2v_kernels.ops.layer_norm_gelu import _kernels as _layer_norm_gelu_kernels
from d2v_kernels.ops.layer_norm_gelu import (
    _layer_norm_gelu_bwd,
    _layer_norm_gelu_bwd_impl,
    _layer_norm_gelu_fwd,
    _layer_norm_gelu_fwd_impl,
    _layer_norm_gelu_triton,
    _triton_available,
)

try:
    from d2v_kernels.kernels import conv_feature_extractor as _conv0_kernels
    from d2v_kernels.kernels._row_norm import row_reasons
except ImportError:  # triton absent: _triton_available() gives the reason
    _conv0_kernels = row_reasons = None

# Limits of the CUDA kernels; they mirror csrc/conv_feature_extractor.h (a GPU test compares).
MAX_CHANNELS = 512
MAX_LAYER0_KERNEL = 32
MAX_LAYER0_STRIDE = 32
MAX_BATCH = 65535
MIN_COMPUTE_CAPABILITY = (8, 0)


def conv_feature_extractor_reference(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    """Eager PyTorch: what ``Data2VecAudioFeatureEncoder`` computes, returned as (B, T, C)."""
    h = wave[:, None]
    conv_biases = conv_biases if conv_biases is not None else [None] * len(conv_weights)
    for w, lw, lb, cb, stride in zip(conv_weights, ln_weights, ln_biases, conv_biases, strides):
        h = F.conv1d(h, w, cb, stride=stride)
        h = F.layer_norm(h.transpose(-2, -1), (h.shape[1],), lw, lb, eps).transpose(-2, -1)
        h = F.gelu(h)
    return h.transpose(1, 2)


def output_length(length: int, kernels, strides) -> int:
    """Frames produced from ``length`` samples (transformers' ``_get_feat_extract_output_lengths``)."""
    for k, s in zip(kernels, strides):
        length = (length - k) // s + 1
    return length


# --------------------------------------------------------------------------------------------
# CUDA extension: torch.library registration, backward, dispatch hooks
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("d2v_kernels::conv_feature_extractor_cuda", mutates_args=(), device_types="cuda")
def _conv_feature_extractor_cuda(
    wave: Tensor,
    conv_weights: list[Tensor],
    ln_weights: list[Tensor],
    ln_biases: list[Tensor],
    conv_biases: list[Tensor],
    strides: list[int],
    eps: float,
) -> Tensor:
    """Fused forward: wave (B, S) -> (B, T, C_last). ``conv_biases`` is [] for bias-free convs."""
    ext = extension_module()
    return ext.forward(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps, False)[0]


@_conv_feature_extractor_cuda.register_fake
def _(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps):
    frames = output_length(wave.shape[1], [w.shape[2] for w in conv_weights], strides)
    return wave.new_empty((wave.shape[0], frames, conv_weights[-1].shape[0]))


@torch.library.custom_op("d2v_kernels::conv_feature_extractor_cuda_layers", mutates_args=(), device_types="cuda")
def _conv_feature_extractor_cuda_layers(
    wave: Tensor,
    conv_weights: list[Tensor],
    ln_weights: list[Tensor],
    ln_biases: list[Tensor],
    conv_biases: list[Tensor],
    strides: list[int],
    eps: float,
) -> list[Tensor]:
    """Fused forward keeping every layer's output [(B, T_i, C_i)] (the backward's recompute)."""
    ext = extension_module()
    return list(ext.forward(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps, True))


@_conv_feature_extractor_cuda_layers.register_fake
def _(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps):
    outputs, length = [], wave.shape[1]
    for w, stride in zip(conv_weights, strides):
        length = (length - w.shape[2]) // stride + 1
        outputs.append(wave.new_empty((wave.shape[0], length, w.shape[0])))
    return outputs


def _layers_backward(
    grad_out, wave, layer_outputs, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps, needs
):
    """Gradients of the stack from the output gradient (B, T, C_last) and every layer's output.

    ``layer_outputs[i]`` is layer i's output (B, T_i, C_i) = layer i + 1's input (the last is not
    used). ``needs`` = (wave, [conv_weights], [ln_weights], [ln_biases], [conv_biases]) flags
    of what requires a gradient. Per layer, from the last: recompute the conv output z, then
    LayerNorm + GELU backward and the conv backward with torch ops. Returns the gradients in
    the same structure (None where not needed).
    """
    need_wave, need_w, need_lw, need_lb, need_cb = needs
    n = len(conv_weights)
    has_bias = bool(conv_biases)
    d_w, d_lw, d_lb = [None] * n, [None] * n, [None] * n
    d_cb = [None] * n if has_bias else []
    layer_needs = [need_w[i] or need_lw[i] or need_lb[i] or (has_bias and need_cb[i]) for i in range(n)]
    lowest = 0 if need_wave else next((i for i in range(n) if layer_needs[i]), n)
    d_wave = None
    dy = grad_out
    for i in reversed(range(lowest, n)):
        w, lw, lb = conv_weights[i], ln_weights[i], ln_biases[i]
        cb = conv_biases[i] if has_bias else None
        channels = w.shape[0]
        x = wave[:, None] if i == 0 else layer_outputs[i - 1].transpose(1, 2)  # (B, C_in, T_in)
        z = F.conv1d(x, w, cb, stride=strides[i]).transpose(1, 2)  # (B, T, C)
        a, mean, rstd = torch.ops.aten.native_layer_norm(z, [channels], lw, lb, eps)
        da = torch.ops.aten.gelu_backward(dy, a)
        dz, d_lw[i], d_lb[i] = torch.ops.aten.native_layer_norm_backward(
            da, z, [channels], mean, rstd, lw, lb, [True, need_lw[i], need_lb[i]]
        )
        need_dx = i > lowest or (i == 0 and need_wave)
        dx, d_w[i], d_bias = torch.ops.aten.convolution_backward(
            dz.transpose(1, 2),
            x,
            w,
            [channels] if cb is not None else None,
            [strides[i]],
            [0],
            [1],
            False,
            [0],
            1,
            [need_dx, need_w[i], cb is not None and need_cb[i]],
        )
        if has_bias:
            d_cb[i] = d_bias
        if need_dx:
            if i == 0:
                d_wave = dx[:, 0]
            else:
                dy = dx.transpose(1, 2)
    return d_wave, d_w, d_lw, d_lb, d_cb


def _setup_context(ctx, inputs, output):
    wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps = inputs
    ctx.num_layers, ctx.has_bias = len(conv_weights), bool(conv_biases)
    ctx.strides, ctx.eps = list(strides), eps
    ctx.needs = (
        ctx.needs_input_grad[0],
        [w.requires_grad for w in conv_weights],
        [p.requires_grad for p in ln_weights],
        [p.requires_grad for p in ln_biases],
        [p.requires_grad for p in conv_biases],
    )
    ctx.save_for_backward(wave, *conv_weights, *ln_weights, *ln_biases, *conv_biases)


def _backward(ctx, grad_out):
    n = ctx.num_layers
    wave, *params = ctx.saved_tensors
    conv_weights, ln_weights, ln_biases = params[:n], params[n : 2 * n], params[2 * n : 3 * n]
    conv_biases = params[3 * n :] if ctx.has_bias else []
    args = (conv_weights, ln_weights, ln_biases, conv_biases)
    if not _triton_nodes_reasons(wave, *args, ctx.strides, ctx.eps):
        d_wave, d_w, d_lw, d_lb, d_cb = _triton_nodes_backward(grad_out, wave, *args, ctx.strides, ctx.eps, ctx.needs)
    else:
        layer_outputs = torch.ops.d2v_kernels.conv_feature_extractor_cuda_layers(wave, *args, ctx.strides, ctx.eps)
        d_wave, d_w, d_lw, d_lb, d_cb = _layers_backward(
            grad_out, wave, layer_outputs, *args, ctx.strides, ctx.eps, ctx.needs
        )
    return d_wave, d_w, d_lw, d_lb, d_cb, None, None


_conv_feature_extractor_cuda.register_autograd(_backward, setup_context=_setup_context)


def _cuda_check(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5) -> list[str]:
    """Why the cuda kernels cannot take this (already validated) input; [] when they can."""
    reasons = []
    dtype = str(wave.dtype).replace("torch.", "")
    if wave.dtype not in KERNEL_DTYPES:
        reasons.append(f"wave is {dtype}; the cuda kernels take float16, bfloat16 or float32")
    params = [(f"conv_weights[{i}]", w) for i, w in enumerate(conv_weights)]
    for name, values in (("ln_weights", ln_weights), ("ln_biases", ln_biases), ("conv_biases", conv_biases or [])):
        params += [(f"{name}[{i}]", p) for i, p in enumerate(values) if p is not None]
    other_dtype = [name for name, p in params if p.dtype != wave.dtype]
    if other_dtype:
        reasons.append(
            f"{', '.join(other_dtype)} not in wave's dtype {dtype}; the cuda kernels take one dtype for all tensors"
        )
    other_device = [name for name, p in params if p.device != wave.device]
    if other_device:
        reasons.append(f"{', '.join(other_device)} not on wave's device {wave.device}")
    for i, w in enumerate(conv_weights):
        if w.shape[0] > MAX_CHANNELS:
            reasons.append(
                f"conv_weights[{i}] has {w.shape[0]} output channels; the cuda kernels take at most {MAX_CHANNELS}"
            )
    if conv_weights[0].shape[2] > MAX_LAYER0_KERNEL:
        reasons.append(f"layer 0 kernel size {conv_weights[0].shape[2]} is above the cuda limit {MAX_LAYER0_KERNEL}")
    if strides[0] > MAX_LAYER0_STRIDE:
        reasons.append(f"layer 0 stride {strides[0]} is above the cuda limit {MAX_LAYER0_STRIDE}")
    if wave.shape[0] > MAX_BATCH:
        reasons.append(f"batch {wave.shape[0]} is above the cuda limit {MAX_BATCH}")
    if wave.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        reasons.append("autocast is enabled: eager follows its per-op casting (cast the model to fp16/bf16 instead)")
    # Skipped while torch.compile traces (the eager call before it has checked the device).
    if wave.device.type == "cuda" and not torch.compiler.is_compiling():
        capability = torch.cuda.get_device_capability(wave.device)
        if capability < MIN_COMPUTE_CAPABILITY:
            reasons.append(
                f"the cuda kernels need compute capability {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}"
                f" or newer, {wave.device} has {capability[0]}.{capability[1]}"
            )
    return reasons


def _run_cuda(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    """The public op's arguments -> the custom op's (None LayerNorm affines become 1 / 0)."""
    channels = [w.shape[0] for w in conv_weights]
    ln_weights = [p if p is not None else wave.new_ones(c) for p, c in zip(ln_weights, channels)]
    ln_biases = [p if p is not None else wave.new_zeros(c) for p, c in zip(ln_biases, channels)]
    if conv_biases is None or all(b is None for b in conv_biases):
        conv_biases = []
    else:
        conv_biases = [b if b is not None else wave.new_zeros(c) for b, c in zip(conv_biases, channels)]
    return torch.ops.d2v_kernels.conv_feature_extractor_cuda(
        wave, list(conv_weights), ln_weights, ln_biases, conv_biases, [int(s) for s in strides], float(eps)
    )


def conv_feature_extractor(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    """Waveform (B, S) -> features (B, T, C) channels-last.

    wave: (B, S) fp16, bf16 or fp32 (fp64 runs eager). conv_weights: per-layer (C_out, C_in, k),
    C_in of layer 0 is 1; ln_weights, ln_biases: per-layer (C_out,); strides: per-layer ints;
    conv_biases: per-layer (C_out,) or None. Returns (B, T, C_last) in wave's dtype, with T as
    :func:`output_length` gives.
    """
    check_tensor("wave", wave, ndim=2)
    if not isinstance(conv_weights, (list, tuple)) or not conv_weights:
        raise ValueError("conv_weights must be a non-empty list of (C_out, C_in, k) tensors")
    n = len(conv_weights)
    ln_weights = check_param_list("ln_weights", ln_weights, n)
    ln_biases = check_param_list("ln_biases", ln_biases, n)
    strides = check_param_list("strides", strides, n)
    if conv_biases is not None:
        conv_biases = check_param_list("conv_biases", conv_biases, n)
    c_in = 1
    for i, w in enumerate(conv_weights):
        check_tensor(f"conv_weights[{i}]", w, ndim=3)
        if w.shape[1] != c_in:
            raise ValueError(f"conv_weights[{i}] must have {c_in} input channels, got shape {tuple(w.shape)}")
        c_out = w.shape[0]
        for name, p in (("ln_weights", ln_weights[i]), ("ln_biases", ln_biases[i])) + (
            (("conv_biases", conv_biases[i]),) if conv_biases is not None else ()
        ):
            if p is None:
                continue
            check_tensor(f"{name}[{i}]", p, ndim=1)
            if p.shape[0] != c_out:
                raise ValueError(f"{name}[{i}] must have shape ({c_out},), got {tuple(p.shape)}")
        s = strides[i]
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"strides[{i}] must be a positive int, got {s!r}")
        c_in = c_out
    check_same_device(wave=wave, **{f"conv_weights[{i}]": w for i, w in enumerate(conv_weights)})
    check_eps(eps)
    frames = output_length(wave.shape[1], [w.shape[2] for w in conv_weights], strides)
    if frames < 1:
        raise ValueError(f"wave has {wave.shape[1]} samples, too few for one output frame of this feature encoder")
    kwargs = dict(strides=list(strides), conv_biases=conv_biases, eps=eps)
    if wave.shape[0] == 0:
        return conv_feature_extractor_reference(wave, conv_weights, ln_weights, ln_biases, **kwargs)
    return dispatch.call(
        "conv_feature_extractor", wave.device, wave, list(conv_weights), ln_weights, ln_biases, **kwargs
    )


# --------------------------------------------------------------------------------------------
# Triton path: layer 0 (conv on the waveform + LayerNorm + GELU) in one Triton kernel, then per
# layer cuDNN's strided conv and the Triton row-norm LayerNorm + GELU reading its output
# channels-first in place (no transposes). Runs where the fused CUDA kernels are not available
# or not enabled.
# --------------------------------------------------------------------------------------------


def _channels_last_empty(like: Tensor, channels: int, frames: int) -> Tensor:
    return like.new_empty((like.shape[0], frames, channels)).transpose(1, 2)


_warned_layout_copy = False
_LAYOUT_COPY_WARNED_ON = ("cuda",)  # devices whose convs return channels-last for channels-last inputs


def _channels_last(z: Tensor) -> Tensor:
    """(B, C, T) with channels-last strides (T * C, 1, C): cuDNN returns that layout for a
    channels-last input on the GPU; a copy only where a backend (the CPU's) returned another,
    warned once on the GPU, where it costs a transpose a layer."""
    global _warned_layout_copy
    if z.stride(1) == 1 or z.shape[1] == 1:
        return z
    if z.device.type in _LAYOUT_COPY_WARNED_ON and not _warned_layout_copy:
        _warned_layout_copy = True
        warnings.warn(
            f"d2v_kernels.conv_feature_extractor: a (B, C, T) activation or gradient of shape {tuple(z.shape)}"
            f" has strides {z.stride()} where channels-last was expected (what cuDNN returns for"
            " channels-last inputs); copying it, a transpose each time",
            stacklevel=2,
        )
    return z.transpose(1, 2).contiguous().transpose(1, 2)


def _conv_output(x: Tensor, weight: Tensor, conv_bias: Tensor | None, stride: int) -> Tensor:
    return _channels_last(F.conv1d(x, weight, conv_bias, stride=stride))


def _conv_backward(x, weight, conv_bias, dz, stride, *, input_grad=True):
    """(dx or None, dweight, dconv_bias or empty) of z = conv1d(x, weight, conv_bias, stride).

    The weight gradient comes first, and x is dropped before dx is allocated: a caller that
    passes a recomputed x without keeping it (``_conv_backward(recompute(), ...)``) frees it
    there. dweight is made contiguous: cuDNN may return it channels-last for channels-last x, and
    a custom op's outputs must have the strides its fake implementation gives (torch.compile
    plans with those). The weight goes to the input gradient in channels-last strides, so cuDNN
    writes dx channels-last, like dz."""
    dweight = torch.nn.grad.conv1d_weight(x, weight.shape, dz, stride=stride).contiguous()
    d_conv_bias = dz.sum(dim=(0, 2), dtype=torch.float32).to(dz.dtype) if conv_bias is not None else x.new_empty(0)
    input_shape = x.shape
    del x
    dx = None
    if input_grad:
        weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
        placeholder = dz.new_empty(1).expand(input_shape)
        dx = torch.ops.aten.convolution_backward(
            dz, placeholder, weight, None, [stride], [0], [1], False, [0], 1, [True, False, False]
        )[0]
    return dx, dweight, d_conv_bias


def _conv0_fwd_impl(
    wave: Tensor,
    weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    stride: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y (B, C, T) in wave's dtype, mean (B, T) fp32, rstd (B, T) fp32)."""
    return _conv0_kernels.conv0_ln_gelu(wave, weight, conv_bias, ln_weight, ln_bias, stride, eps)


_conv0_fwd = torch.library.custom_op("d2v_kernels::conv0_ln_gelu", _conv0_fwd_impl, mutates_args=())


@_conv0_fwd.register_fake
def _(wave, weight, conv_bias, ln_weight, ln_bias, stride, eps):
    frames = (wave.shape[1] - weight.shape[2]) // stride + 1
    mean = wave.new_empty((wave.shape[0], frames), dtype=torch.float32)
    return _channels_last_empty(wave, weight.shape[0], frames), mean, torch.empty_like(mean)


def _conv0_bwd_impl(
    dy: Tensor,
    wave: Tensor,
    weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    stride: int,
    eps: float,
    wave_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dwave or empty, dweight, dconv_bias or empty, dln_weight, dln_bias).

    One kernel where it takes the shape (it recomputes the conv output in registers and stores
    neither it nor its gradient). Otherwise the conv output is recomputed (the kernel's pre-norm
    mode: the values the forward normalised), the LayerNorm + GELU backward is the row-norm
    kernel's, the conv gradients are cuDNN's."""
    if not _conv0_kernels.backward_reasons(weight.shape[0], weight.shape[2]):
        # The kernel's tiles are laid out for channels-last dy (what cuDNN's input gradient and
        # the op's output give): a channels-first one compiles to a program that spills 0.5 to
        # 1.5 KB a thread (ptxas, sm_90), so it is copied instead (never, on the GPU path).
        dy = _channels_last(dy)
        dwave, dweight, d_conv_bias, d_ln_weight, d_ln_bias = _conv0_kernels.conv0_ln_gelu_backward(
            dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, stride, wave_grad=wave_grad
        )
        empty = wave.new_empty(0)
        return (
            dwave if wave_grad else empty,
            dweight,
            d_conv_bias if conv_bias is not None else empty,
            d_ln_weight,
            d_ln_bias,
        )
    h, _, _ = _conv0_kernels.conv0_ln_gelu(wave, weight, conv_bias, ln_weight, ln_bias, stride, eps, pre_norm_only=True)
    dh, d_ln_weight, d_ln_bias = _layer_norm_gelu_kernels.layer_norm_gelu_backward(
        dy, h, ln_weight, ln_bias, mean, rstd, 1, "none"
    )
    # usually no waveform gradient: the waveform is an input, not a parameter
    dwave, dweight, d_conv_bias = _conv_backward(wave[:, None], weight, conv_bias, dh, stride, input_grad=wave_grad)
    dwave = dwave[:, 0] if wave_grad else wave.new_empty(0)
    return dwave, dweight, d_conv_bias, d_ln_weight, d_ln_bias


_conv0_bwd = torch.library.custom_op("d2v_kernels::conv0_ln_gelu_bwd", _conv0_bwd_impl, mutates_args=())


@_conv0_bwd.register_fake
def _(dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, stride, eps, wave_grad):
    return (
        torch.empty_like(wave) if wave_grad else wave.new_empty(0),
        torch.empty_like(weight),
        torch.empty_like(conv_bias) if conv_bias is not None else wave.new_empty(0),
        torch.empty_like(ln_weight),
        torch.empty_like(ln_bias),
    )


def _conv0_setup_context(ctx, inputs, output):
    wave, weight, conv_bias, ln_weight, ln_bias, stride, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd)  # not the (B, C, T) output
    ctx.stride, ctx.eps = stride, eps
    ctx.mark_non_differentiable(mean, rstd)


def _conv0_backward(ctx, dy, _dmean, _drstd):
    wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    wave_grad = ctx.needs_input_grad[0]
    dwave, dweight, d_conv_bias, d_ln_weight, d_ln_bias = pick(
        _conv0_bwd, _conv0_bwd_impl, (dy, wave, weight, conv_bias, ln_weight, ln_bias)
    )(dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, ctx.stride, ctx.eps, wave_grad)
    return (
        dwave if wave_grad else None,
        dweight,
        d_conv_bias if conv_bias is not None else None,
        d_ln_weight,
        d_ln_bias,
        None,
        None,
    )


Conv0LayerNormGeluFunction, _conv0_call = register_autograd(
    _conv0_fwd, "Conv0LayerNormGeluFunction", _conv0_fwd_impl, _conv0_setup_context, _conv0_backward
)


# --- Layer i's LayerNorm + GELU with layer i + 1's conv as one autograd node ---------------------
# The activation between them (the conv's input) is the largest tensor of each layer. Saved, it
# would be kept twice over (the conv output z is saved anyway, for the LayerNorm backward); the
# node saves z alone and the backward recomputes the activation from it (one elementwise pass,
# or for layer 0 one read of the waveform) and frees it before the input gradient is allocated.
# So the Triton path keeps one tensor per layer for the backward, eager keeps four.


def _conv0_conv_fwd_impl(
    wave: Tensor,
    w0: Tensor,
    cb0: Tensor | None,
    g0: Tensor,
    b0: Tensor,
    w1: Tensor,
    cb1: Tensor | None,
    s0: int,
    s1: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Layer 0 (one kernel) then layer 1's conv: (z1 (B, C1, T1) channels-last strides, layer 0's
    mean (B, T0) and rstd fp32)."""
    y0, mean0, rstd0 = _conv0_kernels.conv0_ln_gelu(wave, w0, cb0, g0, b0, s0, eps)
    return _conv_output(y0, w1, cb1, s1), mean0, rstd0


def _conv0_conv_bwd_impl(
    dz1: Tensor,
    wave: Tensor,
    w0: Tensor,
    cb0: Tensor | None,
    g0: Tensor,
    b0: Tensor,
    w1: Tensor,
    cb1: Tensor | None,
    mean0: Tensor,
    rstd0: Tensor,
    s0: int,
    s1: int,
    eps: float,
    wave_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dwave or empty, dw0, dcb0 or empty, dg0, db0, dw1, dcb1 or empty): layer 0's output is
    recomputed for layer 1's weight gradient and freed before its input gradient is formed."""
    # y0 passed without a name: _conv_backward frees it before dy0 is allocated
    dy0, dw1, dcb1 = _conv_backward(_conv0_kernels.conv0_ln_gelu(wave, w0, cb0, g0, b0, s0, eps)[0], w1, cb1, dz1, s1)
    dwave, dw0, dcb0, dg0, db0 = _conv0_bwd_impl(dy0, wave, w0, cb0, g0, b0, mean0, rstd0, s0, eps, wave_grad)
    return dwave, dw0, dcb0, dg0, db0, dw1, dcb1


_conv0_conv_fwd = torch.library.custom_op("d2v_kernels::conv0_ln_gelu_conv", _conv0_conv_fwd_impl, mutates_args=())
_conv0_conv_bwd = torch.library.custom_op("d2v_kernels::conv0_ln_gelu_conv_bwd", _conv0_conv_bwd_impl, mutates_args=())


@_conv0_conv_fwd.register_fake
def _(wave, w0, cb0, g0, b0, w1, cb1, s0, s1, eps):
    frames0 = (wave.shape[1] - w0.shape[2]) // s0 + 1
    frames1 = (frames0 - w1.shape[2]) // s1 + 1
    mean = wave.new_empty((wave.shape[0], frames0), dtype=torch.float32)
    return _channels_last_empty(wave, w1.shape[0], frames1), mean, torch.empty_like(mean)


@_conv0_conv_bwd.register_fake
def _(dz1, wave, w0, cb0, g0, b0, w1, cb1, mean0, rstd0, s0, s1, eps, wave_grad):
    empty = wave.new_empty(0)
    return (
        torch.empty_like(wave) if wave_grad else empty,
        torch.empty_like(w0),
        empty if cb0 is None else torch.empty_like(cb0),
        torch.empty_like(g0),
        torch.empty_like(b0),
        torch.empty_like(w1),
        empty if cb1 is None else torch.empty_like(cb1),
    )


def _conv0_conv_setup_context(ctx, inputs, output):
    wave, w0, cb0, g0, b0, w1, cb1, s0, s1, eps = inputs
    _, mean0, rstd0 = output
    ctx.save_for_backward(wave, w0, cb0, g0, b0, w1, cb1, mean0, rstd0)  # no activation
    ctx.s0, ctx.s1, ctx.eps = s0, s1, eps
    ctx.mark_non_differentiable(mean0, rstd0)


def _conv0_conv_backward(ctx, dz1, _dmean, _drstd):
    saved = ctx.saved_tensors
    cb0, cb1 = saved[2], saved[6]
    wave_grad = ctx.needs_input_grad[0]
    dwave, dw0, dcb0, dg0, db0, dw1, dcb1 = pick(_conv0_conv_bwd, _conv0_conv_bwd_impl, (dz1, *saved))(
        dz1, *saved, ctx.s0, ctx.s1, ctx.eps, wave_grad
    )
    return (
        dwave if wave_grad else None,
        dw0,
        dcb0 if cb0 is not None else None,
        dg0,
        db0,
        dw1,
        dcb1 if cb1 is not None else None,
        None,
        None,
        None,
    )


Conv0LayerNormGeluConvFunction, _conv0_conv_call = register_autograd(
    _conv0_conv_fwd,
    "Conv0LayerNormGeluConvFunction",
    _conv0_conv_fwd_impl,
    _conv0_conv_setup_context,
    _conv0_conv_backward,
)


def _norm_conv_fwd_impl(
    z: Tensor, g: Tensor | None, b: Tensor | None, w: Tensor, cb: Tensor | None, stride: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """GELU(LayerNorm(z)) over the channels of z (B, C, T), then the next layer's conv: (z_next
    (B, C', T') channels-last strides, mean (B, T) and rstd fp32 of z)."""
    y, mean, rstd = _layer_norm_gelu_kernels.layer_norm_gelu_forward(z, g, b, eps, 1, "none")
    return _conv_output(y, w, cb, stride), mean, rstd


def _norm_conv_bwd_impl(
    dz_next: Tensor,
    z: Tensor,
    g: Tensor | None,
    b: Tensor | None,
    w: Tensor,
    cb: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    stride: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dz, dg or empty, db or empty, dw, dcb or empty): the activation is recomputed from z for
    the weight gradient and freed before its gradient is formed."""
    # the activation passed without a name: _conv_backward frees it before dy is allocated
    norm_gelu = _layer_norm_gelu_kernels.layer_norm_gelu_forward
    dy, dw, dcb = _conv_backward(norm_gelu(z, g, b, eps, 1, "none")[0], w, cb, dz_next, stride)
    # dz over dy (this function's own): one activation-sized buffer less at the backward's peak
    out = dy if dy.stride() == z.stride() else None
    dz, dg, db = _layer_norm_gelu_kernels.layer_norm_gelu_backward(dy, z, g, b, mean, rstd, 1, "none", out=out)
    empty = z.new_empty(0)
    return dz, dg if dg is not None else empty, db if db is not None else empty, dw, dcb


_norm_conv_fwd = torch.library.custom_op("d2v_kernels::ln_gelu_conv", _norm_conv_fwd_impl, mutates_args=())
_norm_conv_bwd = torch.library.custom_op("d2v_kernels::ln_gelu_conv_bwd", _norm_conv_bwd_impl, mutates_args=())


@_norm_conv_fwd.register_fake
def _(z, g, b, w, cb, stride, eps):
    frames = (z.shape[2] - w.shape[2]) // stride + 1
    mean = z.new_empty((z.shape[0], z.shape[2]), dtype=torch.float32)
    return _channels_last_empty(z, w.shape[0], frames), mean, torch.empty_like(mean)


@_norm_conv_bwd.register_fake
def _(dz_next, z, g, b, w, cb, mean, rstd, stride, eps):
    empty = z.new_empty(0)
    return (
        torch.empty_like(z),
        empty if g is None else torch.empty_like(g),
        empty if b is None else torch.empty_like(b),
        torch.empty_like(w),
        empty if cb is None else torch.empty_like(cb),
    )


def _norm_conv_setup_context(ctx, inputs, output):
    z, g, b, w, cb, stride, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(z, g, b, w, cb, mean, rstd)  # z, not the activation: recomputed
    ctx.stride, ctx.eps = stride, eps
    ctx.mark_non_differentiable(mean, rstd)


def _norm_conv_backward(ctx, dz_next, _dmean, _drstd):
    saved = ctx.saved_tensors
    g, b, cb = saved[1], saved[2], saved[4]
    dz, dg, db, dw, dcb = pick(_norm_conv_bwd, _norm_conv_bwd_impl, (dz_next, *saved))(
        dz_next, *saved, ctx.stride, ctx.eps
    )
    return (
        dz,
        dg if g is not None else None,
        db if b is not None else None,
        dw,
        dcb if cb is not None else None,
        None,
        None,
    )


LayerNormGeluConvFunction, _norm_conv_call = register_autograd(
    _norm_conv_fwd, "LayerNormGeluConvFunction", _norm_conv_fwd_impl, _norm_conv_setup_context, _norm_conv_backward
)


def _conv01_fwd_impl(
    wave: Tensor,
    w0: Tensor,
    w1: Tensor,
    cb0: Tensor | None,
    cb1: Tensor | None,
    g0: Tensor,
    g1: Tensor,
    b0: Tensor,
    b1: Tensor,
    s0: int,
    s1: int,
    eps: float,
) -> Tensor:
    """Layer 1's output (B, C1, T1) from the wave, layers 0 and 1 in one kernel."""
    return _conv0_kernels.conv01_ln_gelu(wave, [w0, w1], [cb0, cb1], [g0, g1], [b0, b1], (s0, s1), eps)


def _conv01_bwd_impl(
    dy: Tensor,
    wave: Tensor,
    w0: Tensor,
    w1: Tensor,
    cb0: Tensor | None,
    cb1: Tensor | None,
    g0: Tensor,
    g1: Tensor,
    b0: Tensor,
    b1: Tensor,
    s0: int,
    s1: int,
    eps: float,
    wave_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dwave or empty, dw0, dw1, dcb0, dcb1 (empty when absent), dg0, dg1, db0, db1).

    Recomputes layer 0's output (the layer-0 kernel, with its statistics) and layer 1's conv
    output (cuDNN), then walks back: row-norm LayerNorm + GELU backward and cuDNN conv gradients
    for layer 1, the layer-0 backward for layer 0."""
    y0, mean0, rstd0 = _conv0_kernels.conv0_ln_gelu(wave, w0, cb0, g0, b0, s0, eps)
    z1 = _conv_output(y0, w1, cb1, s1)
    mean1, rstd1 = _layer_norm_gelu_kernels.layer_norm_gelu_forward(z1, g1, b1, eps, 1, "none")[1:]
    # dz1 over z1, this function's own recompute
    dz1, dg1, db1 = _layer_norm_gelu_kernels.layer_norm_gelu_backward(dy, z1, g1, b1, mean1, rstd1, 1, "none", out=z1)
    del z1
    # y0 handed over, not kept here: _conv_backward frees it before dy0 is allocated
    conv_input, y0 = [y0], None
    dy0, dw1, dcb1 = _conv_backward(conv_input.pop(), w1, cb1, dz1, s1)
    dwave, dw0, dcb0, dg0, db0 = _conv0_bwd_impl(dy0, wave, w0, cb0, g0, b0, mean0, rstd0, s0, eps, wave_grad)
    return dwave, dw0, dw1, dcb0, dcb1, dg0, dg1, db0, db1


_conv01_fwd = torch.library.custom_op("d2v_kernels::conv01_ln_gelu", _conv01_fwd_impl, mutates_args=())
_conv01_bwd = torch.library.custom_op("d2v_kernels::conv01_ln_gelu_bwd", _conv01_bwd_impl, mutates_args=())


@_conv01_fwd.register_fake
def _(wave, w0, w1, cb0, cb1, g0, g1, b0, b1, s0, s1, eps):
    frames1 = ((wave.shape[1] - w0.shape[2]) // s0 + 1 - w1.shape[2]) // s1 + 1
    return _channels_last_empty(wave, w1.shape[0], frames1)


@_conv01_bwd.register_fake
def _(dy, wave, w0, w1, cb0, cb1, g0, g1, b0, b1, s0, s1, eps, wave_grad):
    empty = wave.new_empty(0)
    return (
        torch.empty_like(wave) if wave_grad else empty,
        torch.empty_like(w0),
        torch.empty_like(w1),
        empty if cb0 is None else torch.empty_like(cb0),
        empty if cb1 is None else torch.empty_like(cb1),
        torch.empty_like(g0),
        torch.empty_like(g1),
        torch.empty_like(b0),
        torch.empty_like(b1),
    )


def _conv01_setup_context(ctx, inputs, output):
    wave, w0, w1, cb0, cb1, g0, g1, b0, b1, s0, s1, eps = inputs
    ctx.save_for_backward(wave, w0, w1, cb0, cb1, g0, g1, b0, b1)  # no activation: all recomputed
    ctx.s0, ctx.s1, ctx.eps = s0, s1, eps


def _conv01_backward(ctx, dy):
    saved = ctx.saved_tensors
    cb0, cb1 = saved[3], saved[4]
    wave_grad = ctx.needs_input_grad[0]
    grads = pick(_conv01_bwd, _conv01_bwd_impl, (dy, *saved))(dy, *saved, ctx.s0, ctx.s1, ctx.eps, wave_grad)
    dwave, dw0, dw1, dcb0, dcb1, dg0, dg1, db0, db1 = grads
    return (
        dwave if wave_grad else None,
        dw0,
        dw1,
        dcb0 if cb0 is not None else None,
        dcb1 if cb1 is not None else None,
        dg0,
        dg1,
        db0,
        db1,
        None,
        None,
        None,
    )


Conv01LayerNormGeluFunction, _conv01_call = register_autograd(
    _conv01_fwd, "Conv01LayerNormGeluFunction", _conv01_fwd_impl, _conv01_setup_context, _conv01_backward
)

# The fused layer 0 + 1 kernel is opt-in until a GPU has timed it against layer 0 alone + cuDNN
# (bench: impl d2v_triton_fused01); its arithmetic is checked everywhere the tests run.
ENV_FUSE_LAYERS_0_1 = "D2V_KERNELS_FUSE_CONV01"
_fuse_override = threading.local()


@contextlib.contextmanager
def fuse_layers_0_1(enabled: bool = True) -> Iterator[None]:
    """Run layers 0 and 1 as one kernel (or not) in this thread, whatever D2V_KERNELS_FUSE_CONV01 says."""
    previous = getattr(_fuse_override, "enabled", None)
    _fuse_override.enabled = bool(enabled)
    try:
        yield
    finally:
        _fuse_override.enabled = previous


def _fuse_layers_0_1_enabled() -> bool:
    enabled = getattr(_fuse_override, "enabled", None)
    return os.environ.get(ENV_FUSE_LAYERS_0_1, "0") == "1" if enabled is None else enabled


def _fuse_layers_0_1(wave, conv_weights, ln_weights, ln_biases, conv_biases) -> bool:
    if len(conv_weights) < 2 or not _fuse_layers_0_1_enabled():
        return False
    if _conv0_kernels is None or torch.is_autocast_enabled(wave.device.type):
        return False
    return not _conv0_kernels.fused01_reasons(wave, conv_weights[:2], conv_biases[:2], ln_weights[:2], ln_biases[:2])


def _conv0_fusable(wave, weight, conv_bias, ln_weight, ln_bias) -> bool:
    """Layer 0 runs as one kernel unless autocast mixes dtypes or its shape is out of the kernel's
    range; the per-layer path (the same backend) takes it otherwise."""
    if _conv0_kernels is None or torch.is_autocast_enabled(wave.device.type):
        return False
    return not _conv0_kernels.unsupported_reasons(wave, weight, conv_bias, ln_weight, ln_bias)


def _run_conv_then_triton_norm(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    n = len(conv_weights)
    conv_biases = conv_biases if conv_biases is not None else [None] * n
    strides, eps = [int(s) for s in strides], float(eps)
    if torch.is_autocast_enabled(wave.device.type):
        return _run_per_layer(wave[:, None], conv_weights, ln_weights, ln_biases, strides, conv_biases, eps)
    w0, lw0, lb0, cb0 = conv_weights[0], ln_weights[0], ln_biases[0], conv_biases[0]
    if _fuse_layers_0_1(wave, conv_weights, ln_weights, ln_biases, conv_biases):
        w1, lw1, lb1, cb1 = conv_weights[1], ln_weights[1], ln_biases[1], conv_biases[1]
        h = _conv01_call(wave, w0, w1, cb0, cb1, lw0, lw1, lb0, lb1, strides[0], strides[1], eps)
        if n == 2:
            return h.transpose(1, 2)
        z, first = _conv_output(h, conv_weights[2], conv_biases[2], strides[2]), 2
    elif _conv0_fusable(wave, w0, cb0, lw0, lb0):
        if n == 1:
            return _conv0_call(wave, w0, cb0, lw0, lb0, strides[0], eps)[0].transpose(1, 2)
        w1, cb1 = conv_weights[1], conv_biases[1]
        z, first = _conv0_conv_call(wave, w0, cb0, lw0, lb0, w1, cb1, strides[0], strides[1], eps)[0], 1
    else:
        z, first = _conv_output(wave[:, None], w0, cb0, strides[0]), 0
    # z is layer `first`'s conv output: each node normalises one layer and runs the next conv.
    for i in range(first, n - 1):
        z = _norm_conv_call(
            z, ln_weights[i], ln_biases[i], conv_weights[i + 1], conv_biases[i + 1], strides[i + 1], eps
        )[0]
    return _layer_norm_gelu_triton(z, ln_weights[-1], ln_biases[-1], eps=eps, channels_dim=1).transpose(1, 2)


def _triton_nodes_backward(grad_out, wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps, needs):
    """Gradients of the stack as :func:`_layers_backward` returns them, by the Triton path's nodes:
    their forwards rerun from the waveform, keeping what their autograd nodes keep (each layer's
    conv output and fp32 row statistics), then their backwards from the last layer down.

    The CUDA extension's backward: its forward saves nothing but the inputs. ``ln_weights`` and
    ``ln_biases`` are tensors (the extension fills None affines); ``conv_biases`` is [] or one per
    layer. Layers below the lowest one with a parameter that needs a gradient are not walked
    unless the waveform needs one. :func:`_triton_nodes_reasons` must be empty for these inputs.
    """
    need_wave, need_w, need_lw, need_lb, need_cb = needs
    n = len(conv_weights)
    has_bias = bool(conv_biases)
    cbs, gs, bs, ss = list(conv_biases) if has_bias else [None] * n, ln_weights, ln_biases, strides
    layer_needs = [need_w[i] or need_lw[i] or need_lb[i] or (has_bias and need_cb[i]) for i in range(n)]
    lowest = 0 if need_wave else next((i for i in range(n) if layer_needs[i]), n)
    run = lambda op, impl: pick(op, impl, (wave, *conv_weights))
    d_w, d_lw, d_lb, d_cb = [None] * n, [None] * n, [None] * n, [None] * n
    dy = grad_out.transpose(1, 2)  # (B, C, T), as the last layer's LayerNorm + GELU gave it
    d_wave = None
    if n == 1 and _conv0_fusable(wave, conv_weights[0], cbs[0], gs[0], bs[0]):
        _, mean, rstd = run(_conv0_fwd, _conv0_fwd_impl)(wave, conv_weights[0], cbs[0], gs[0], bs[0], ss[0], eps)
        d_wave, d_w[0], d_cb[0], d_lw[0], d_lb[0] = run(_conv0_bwd, _conv0_bwd_impl)(
            dy, wave, conv_weights[0], cbs[0], gs[0], bs[0], mean, rstd, ss[0], eps, need_wave
        )
    else:
        # Forward: zs[i] is layer i's conv output (B, C, T) channels-last, stats[i] its (mean, rstd).
        layer0_node = n > 1 and _conv0_fusable(wave, conv_weights[0], cbs[0], gs[0], bs[0])
        if layer0_node:
            z, mean0, rstd0 = run(_conv0_conv_fwd, _conv0_conv_fwd_impl)(
                wave, conv_weights[0], cbs[0], gs[0], bs[0], conv_weights[1], cbs[1], ss[0], ss[1], eps
            )
            first = 1
        else:
            z, first = _conv_output(wave[:, None], conv_weights[0], cbs[0], ss[0]), 0
        zs, stats = {first: z}, {}
        for i in range(first, n - 1):
            z, *stats[i] = run(_norm_conv_fwd, _norm_conv_fwd_impl)(
                zs[i], gs[i], bs[i], conv_weights[i + 1], cbs[i + 1], ss[i + 1], eps
            )
            zs[i + 1] = z
        del z
        _, mean, rstd = run(_layer_norm_gelu_fwd, _layer_norm_gelu_fwd_impl)(zs[n - 1], gs[-1], bs[-1], eps, 1, "none")
        # Backward: each node's gradients, its conv output dropped once used.
        dz, d_lw[-1], d_lb[-1] = run(_layer_norm_gelu_bwd, _layer_norm_gelu_bwd_impl)(
            dy, zs.pop(n - 1), gs[-1], bs[-1], mean, rstd, 1, "none"
        )
        del dy
        for i in reversed(range(max(first, lowest - 1), n - 1)):
            dz, d_lw[i], d_lb[i], d_w[i + 1], d_cb[i + 1] = run(_norm_conv_bwd, _norm_conv_bwd_impl)(
                dz, zs.pop(i), gs[i], bs[i], conv_weights[i + 1], cbs[i + 1], *stats.pop(i), ss[i + 1], eps
            )
        if layer0_node and lowest <= 1:
            d_wave, d_w[0], d_cb[0], d_lw[0], d_lb[0], d_w[1], d_cb[1] = run(_conv0_conv_bwd, _conv0_conv_bwd_impl)(
                dz, wave, conv_weights[0], cbs[0], gs[0], bs[0], conv_weights[1], cbs[1], mean0, rstd0,
                ss[0], ss[1], eps, need_wave,
            )  # fmt: skip
        elif not layer0_node and lowest == 0:
            d_wave, d_w[0], d_cb[0] = _conv_backward(
                wave[:, None], conv_weights[0], cbs[0], dz, ss[0], input_grad=need_wave
            )
            d_wave = d_wave[:, 0] if need_wave else None
    keep = lambda grads, flags: [g if flag else None for g, flag in zip(grads, flags)]
    return (
        d_wave if need_wave else None,
        keep(d_w, need_w),
        keep(d_lw, need_lw),
        keep(d_lb, need_lb),
        keep(d_cb, need_cb) if has_bias else [],
    )


def _triton_nodes_reasons(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps) -> list[str]:
    """Why :func:`_triton_nodes_backward` cannot take these inputs (the triton backend's reasons,
    as if forced); [] when it can."""
    impl = next(i for i in dispatch.implementations("conv_feature_extractor") if i.backend == "triton")
    kwargs = dict(strides=strides, conv_biases=conv_biases or None, eps=eps)
    return dispatch.reasons_for(impl, wave.device, wave, conv_weights, ln_weights, ln_biases, forced=True, **kwargs)


def _run_per_layer(h, conv_weights, ln_weights, ln_biases, strides, conv_biases, eps):
    """Under autocast: each conv as autocast runs it, LayerNorm + GELU in the dtype eager's would use."""
    for w, lw, lb, cb, stride in zip(conv_weights, ln_weights, ln_biases, conv_biases, strides):
        h = F.conv1d(h, w, cb, stride=stride)
        h = h.to(layer_norm_compute_dtype(h.device, h.dtype))  # fp32 under CUDA autocast, as eager
        h = _layer_norm_gelu_triton(h, lw, lb, eps=eps, channels_dim=1)
    return h.transpose(1, 2)


def _triton_composite_reasons(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    reasons = _triton_available()
    if reasons:
        return reasons
    if wave.dtype not in KERNEL_DTYPES:
        return [f"wave has dtype {wave.dtype}; the Triton LayerNorm takes float16, bfloat16, float32"]
    autocast = torch.is_autocast_enabled(wave.device.type)
    for i, (w, lw, lb) in enumerate(zip(conv_weights, ln_weights, ln_biases)):
        if w.dtype != wave.dtype and not autocast:
            reasons.append(f"conv_weights[{i}] has dtype {w.dtype}, wave has {wave.dtype}")
        # The conv output of layer i is what the row-norm kernel normalises, channels-first.
        norm_dtype = layer_norm_compute_dtype(wave.device, wave.dtype)
        reasons += [f"layer {i}: {r}" for r in row_reasons(norm_dtype, w.shape[0], lw, lb)]
    return reasons


dispatch.register("conv_feature_extractor", "eager", conv_feature_extractor_reference, devices=("cpu", "cuda", "meta"))
dispatch.register(
    "conv_feature_extractor",
    "triton",
    _run_conv_then_triton_norm,
    _triton_composite_reasons,
    devices=("cuda",),
    description="layer 0 as one Triton kernel (conv + LayerNorm + GELU), then cuDNN conv + Triton LayerNorm+GELU per layer",
)
dispatch.register(
    "conv_feature_extractor",
    "cuda",
    _run_cuda,
    _cuda_check,
    devices=("cuda",),
    available=extension_reasons,
    description="C++/CUDA extension: strided conv with LayerNorm + GELU epilogue, channels-last",
    opt_in=True,  # correct on the GPU (tests, compute-sanitizer) but slower than the triton backend there
)
