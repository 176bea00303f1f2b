"""Data2VecAudio's feature encoder: strided Conv1d -> LayerNorm(C) -> GELU, stacked.

Seven layers in the base config: kernels (10, 3, 3, 3, 3, 2, 2), strides (5, 2, 2, 2, 2, 2, 2),
512 channels, conv without bias, LayerNorm with affine (``feat_extract_norm="layer"``). The op
takes the waveform (B, S) and returns features channels-last (B, T, C).

The ``cuda`` backend is the C++/CUDA extension ``d2v_kernels._C`` (``csrc/``): each layer is one
kernel, conv with the LayerNorm + GELU in its epilogue, channels-last between layers. Its forward
saves nothing but the inputs for the backward, so between a training step's forward and backward
the encoder holds no activation. The backward reruns the forward through the Triton path's nodes
(``ops/_conv_feature_extractor_triton.py``), keeping what they keep, and runs their backwards.
Where the Triton path cannot take the input, it reruns the fused forward keeping every layer's
output instead and walks the layers down with torch's convolution, LayerNorm and GELU backward ops.

The ``triton`` backend (the default on CUDA meanwhile; ``ops/_conv_feature_extractor_triton.py``)
runs layer 0 (conv on the waveform, LayerNorm, GELU) as one Triton kernel, so the largest activation
is written once; then per layer cuDNN's strided conv and the Triton row-norm LayerNorm + GELU, every
activation (B, C, T) in channels-last strides, so cuDNN runs without transposes. For the backward it
keeps one tensor a layer, the conv output (the LayerNorm's input), and recomputes each activation
where a conv's weight gradient needs it (an elementwise pass; for layer 0 a read of the waveform);
layer 0's backward is one kernel, which recomputes its conv output in registers. Eager training
records the stack as one autograd node (one Function apply and one Python backward a step);
traced calls one custom op a layer.
"""

from __future__ import annotations

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
)
from d2v_kernels.ops._conv_feature_extractor_triton import (
    run_conv_then_triton_norm,
    triton_composite_reasons,
    triton_inference_plan,
    triton_nodes_backward,
    triton_training_plan,
)
from d2v_kernels.ops._eager import runs_eagerly
from d2v_kernels.ops._plan import layout_key, lookup, needs_grad, plan_cache, plans_enabled, recorder, store

__all__ = ["conv_feature_extractor", "conv_feature_extractor_reference", "output_length"]

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


def _triton_nodes_reasons(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps) -> list[str]:
    """Why :func:`triton_nodes_backward` cannot take these inputs (the triton backend's reasons,
    as if forced); [] when it can."""
    impl = next(i for i in dispatch.implementations("conv_feature_extractor") if i.backend == "triton")
    kwargs = dict(strides=strides, conv_biases=conv_biases or None, eps=eps)
    return dispatch.reasons_for(impl, wave.device, wave, conv_weights, ln_weights, ln_biases, forced=True, **kwargs)


def _backward(ctx, grad_out):
    n = ctx.num_layers
    wave, *params = ctx.saved_tensors
    conv_weights, ln_weights, ln_biases = params[:n], params[n : 2 * n], params[2 * n : 3 * n]
    conv_biases = params[3 * n :] if ctx.has_bias else []
    args = (conv_weights, ln_weights, ln_biases, conv_biases)
    if not _triton_nodes_reasons(wave, *args, ctx.strides, ctx.eps):
        d_wave, d_w, d_lw, d_lb, d_cb = triton_nodes_backward(grad_out, wave, *args, ctx.strides, ctx.eps, ctx.needs)
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
    key = None
    if (
        plans_enabled()
        and type(conv_weights) in _SEQUENCES
        and type(ln_weights) in _SEQUENCES
        and type(ln_biases) in _SEQUENCES
        and type(strides) in _SEQUENCES
        and (conv_biases is None or type(conv_biases) in _SEQUENCES)
    ):
        biases = conv_biases if conv_biases is not None else ()
        key = layout_key(wave, *conv_weights, *ln_weights, *ln_biases, *biases)
        if key is not None and key[0] is not None:
            # What validation and dispatch read: the layouts, the list lengths, the strides with
            # their types (True is 1 to a tuple), eps, grad mode, autocast, the forced backends.
            key = (
                key, len(conv_weights), len(ln_weights), len(ln_biases), None if conv_biases is None else len(biases),
                tuple(strides), tuple(map(type, strides)), eps.__class__, eps, torch.is_grad_enabled(),
                _autocast(wave.device.type), dispatch.forced_token(),
            )  # fmt: skip
            plan = lookup(_PLANS, key)
            if plan is not None:
                return plan(wave, conv_weights, ln_weights, ln_biases, conv_biases)
    plan = _plan(wave, conv_weights, ln_weights, ln_biases, strides, conv_biases, eps)
    return store(_PLANS, key, plan, wave.device)(wave, conv_weights, ln_weights, ln_biases, conv_biases)


_PLANS = plan_cache()
_SEQUENCES = (list, tuple)


def _autocast(device_type: str) -> bool:
    """Autocast on the devices whose backends read it (the eager reference follows it per call)."""
    return device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)


def _plan(wave, conv_weights, ln_weights, ln_biases, strides, conv_biases, eps):
    """Validate (errors name the argument) and return the callable that runs this input's
    implementation on inputs of its layout: ``plan(wave, conv_weights, ln_weights, ln_biases,
    conv_biases)``."""
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
    options = dict(strides=list(strides), eps=eps)
    backend, implementation = None, conv_feature_extractor_reference
    if wave.shape[0] != 0:
        impl = dispatch.select(
            "conv_feature_extractor", wave.device, wave, list(conv_weights), ln_weights, ln_biases,
            conv_biases=conv_biases, **options,
        )  # fmt: skip
        backend, implementation = impl.backend, impl.run

    def run(wave, conv_weights, ln_weights, ln_biases, conv_biases):
        return implementation(wave, list(conv_weights), ln_weights, ln_biases, conv_biases=conv_biases, **options)

    tensors = (wave, *conv_weights, *ln_weights, *ln_biases, *(conv_biases or ()))
    if implementation is run_conv_then_triton_norm and not _autocast(wave.device.type) and runs_eagerly(tensors):
        make = triton_training_plan if needs_grad(*tensors) else triton_inference_plan
        run = make(wave, conv_weights, ln_weights, ln_biases, conv_biases=conv_biases, **options)
    record = recorder()

    def plan(wave, conv_weights, ln_weights, ln_biases, conv_biases):
        if backend is not None:
            record("conv_feature_extractor", backend)
        return run(wave, conv_weights, ln_weights, ln_biases, conv_biases)

    return plan


dispatch.register("conv_feature_extractor", "eager", conv_feature_extractor_reference, devices=("cpu", "cuda", "meta"))
dispatch.register(
    "conv_feature_extractor",
    "triton",
    run_conv_then_triton_norm,
    triton_composite_reasons,
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
