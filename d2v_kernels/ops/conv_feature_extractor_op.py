"""Data2VecAudio's feature encoder: strided Conv1d -> LayerNorm(C) -> GELU, stacked.

Seven layers in the base config: kernels (10, 3, 3, 3, 3, 2, 2), strides (5, 2, 2, 2, 2, 2, 2),
512 channels, conv without bias, LayerNorm with affine (``feat_extract_norm="layer"``). The op
takes the waveform (B, S) and returns features channels-last (B, T, C).

The ``cuda`` backend is the C++/CUDA extension ``d2v_kernels._C`` (``csrc/``), channels-last end
to end: layer 0 (one input channel, not a GEMM) is one direct kernel with its LayerNorm + GELU;
each later conv, forward and backward, is a CUTLASS GEMM over strided views of the (B, T, C)
activations (``ops/_conv_gemm_plan.py`` holds that decomposition in torch, tested against
``F.conv1d``), followed by a LayerNorm + GELU row kernel (forward, or backward with deterministic
dgamma / dbeta partial sums). Training keeps one tensor a layer for the backward, each
later layer's conv output (``conv_feature_extractor_cuda_train``), and recomputes the activations
the weight gradients read. The op called without keeping them reruns the forward in its backward.
fp16 and bf16 run tensor cores and need channel counts that are multiples of 8; fp32 runs a SIMT
GEMM. On a device that runs the build's sm_90a cubins (an H100 with a wheel from setup.py, or a JIT
build there), fp16 and bf16 run Hopper kernels instead: layers without a conv bias their forward conv
as CUTLASS 3's implicit-GEMM convolution (TMA im2col loads, wgmma; :func:`cuda_forward_conv` says
which), every layer its backward GEMMs as CUTLASS 3 wgmma GEMMs with cp.async loads (the same
views). :func:`set_hopper_conv` (or ``D2V_KERNELS_HOPPER_CONV=0``) keeps the Sm80 GEMMs.

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
from d2v_kernels.ops._conv_gemm_plan import stride_reasons
from d2v_kernels.ops._eager import runs_eagerly
from d2v_kernels.ops._plan import layout_key, lookup, needs_grad, plan_cache, plans_enabled, recorder, store

__all__ = [
    "conv_feature_extractor",
    "conv_feature_extractor_reference",
    "cuda_forward_conv",
    "output_length",
    "set_hopper_conv",
]

# Limits of the CUDA kernels; they mirror csrc/conv_feature_extractor.h (a GPU test compares).
MAX_CHANNELS = 512
MAX_LAYER0_KERNEL = 32
MAX_LAYER0_STRIDE = 32
MAX_BATCH = 65535
GEMM_ALIGNMENT = 8
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


def set_hopper_conv(enabled: bool) -> bool:
    """Whether the ``cuda`` backend runs layers 1..'s forward conv and backward GEMMs as CUTLASS 3's
    Hopper kernels where the device runs them (the default) or always as the Sm80 GEMMs (``False``:
    what other GPUs run; for comparisons). Process-wide, as ``D2V_KERNELS_HOPPER_CONV=0`` at the
    extension's load. Returns the previous setting; raises RuntimeError without the extension."""
    return extension_module().set_sm90_conv(bool(enabled))


def cuda_forward_conv(
    wave: Tensor, conv_biases: list[Tensor | None] | None = None, strides: list[int] | None = None
) -> str:
    """Which forward conv the ``cuda`` backend runs for layers 1.. on this input: ``"sm90a_conv"``
    (CUTLASS 3's Hopper implicit-GEMM conv) or ``"sm80_gemm"`` (the batched GEMMs over strided views),
    as the extension decides (csrc/binding.cpp, sm90_conv_applies): Hopper for fp16 / bf16 without
    conv biases, every stride of layers 1.. (``strides[1:]``; Data2Vec's 2 when not given) at most
    the extension's ``MAX_HOPPER_CONV_STRIDE``, on a device running the sm_90a cubins, while
    :func:`set_hopper_conv` allows it. The first call on a device asks the device (a one-int kernel
    and a read back)."""
    ext = extension_module()
    has_bias = conv_biases is not None and any(b is not None for b in conv_biases)
    encodable = strides is None or all(s <= ext.MAX_HOPPER_CONV_STRIDE for s in strides[1:])
    return "sm90a_conv" if not has_bias and encodable and ext.sm90_applies(wave) else "sm80_gemm"


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
    """Fused forward: wave (B, S) -> (B, T, C_last). ``conv_biases`` is [] for bias-free convs.
    Keeps nothing: its backward reruns the forward keeping the conv outputs."""
    ext = extension_module()
    return ext.forward(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps, False)[0]


@_conv_feature_extractor_cuda.register_fake
def _(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps):
    frames = output_length(wave.shape[1], [w.shape[2] for w in conv_weights], strides)
    return wave.new_empty((wave.shape[0], frames, conv_weights[-1].shape[0]))


@torch.library.custom_op("d2v_kernels::conv_feature_extractor_cuda_train", mutates_args=(), device_types="cuda")
def _conv_feature_extractor_cuda_train(
    wave: Tensor,
    conv_weights: list[Tensor],
    ln_weights: list[Tensor],
    ln_biases: list[Tensor],
    conv_biases: list[Tensor],
    strides: list[int],
    eps: float,
) -> list[Tensor]:
    """The training forward: [output (B, T, C_last), z_1, ..., z_{n-1}], z_i (B, T_i, C_i) layer i's
    conv output before its LayerNorm (layer 0's is recomputed from the waveform): the one tensor a
    layer that the backward keeps."""
    ext = extension_module()
    return list(ext.forward(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps, True))


@_conv_feature_extractor_cuda_train.register_fake
def _(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps):
    outputs, length = [], wave.shape[1]
    for w, stride in zip(conv_weights, strides):
        length = (length - w.shape[2]) // stride + 1
        outputs.append(wave.new_empty((wave.shape[0], length, w.shape[0])))
    return [torch.empty_like(outputs[-1]), *outputs[1:]]


@torch.library.custom_op("d2v_kernels::conv_feature_extractor_cuda_bwd", mutates_args=(), device_types="cuda")
def _conv_feature_extractor_cuda_bwd(
    grad_out: Tensor,
    wave: Tensor,
    conv_weights: list[Tensor],
    ln_weights: list[Tensor],
    ln_biases: list[Tensor],
    conv_biases: list[Tensor],
    conv_outputs: list[Tensor],
    strides: list[int],
    eps: float,
    lowest: int,
    wave_grad: bool,
) -> list[Tensor]:
    """[d_wave, dW_0.., dgamma_0.., dbeta_0.., dbias_0..] (dbias only with conv biases) from the
    training forward's conv outputs; an empty tensor for what is not computed: d_wave unless
    ``wave_grad``, every gradient of the layers below ``lowest``."""
    ext = extension_module()
    return list(
        ext.backward(
            grad_out, wave, conv_weights, ln_weights, ln_biases, conv_biases, conv_outputs, strides, eps, lowest,
            wave_grad,
        )
    )  # fmt: skip


@_conv_feature_extractor_cuda_bwd.register_fake
def _(grad_out, wave, conv_weights, ln_weights, ln_biases, conv_biases, conv_outputs, strides, eps, lowest, wave_grad):
    shaped = lambda params: [torch.empty_like(p) if i >= lowest else wave.new_empty(0) for i, p in enumerate(params)]
    d_wave = torch.empty_like(wave) if wave_grad else wave.new_empty(0)
    return [d_wave, *shaped(conv_weights), *shaped(ln_weights), *shaped(ln_biases), *shaped(conv_biases)]


def _lowest_layer(needs) -> int:
    """The lowest layer whose backward gives a gradient that is asked for (n when none is)."""
    need_wave, need_w, need_lw, need_lb, need_cb = needs
    n = len(need_w)
    if need_wave:
        return 0
    has_bias = bool(need_cb)
    return next((i for i in range(n) if need_w[i] or need_lw[i] or need_lb[i] or (has_bias and need_cb[i])), n)


def _extension_backward(grad_out, wave, conv_weights, ln_weights, ln_biases, conv_biases, conv_outputs, strides, eps,
                        needs):  # fmt: skip
    """The extension's backward (CUTLASS GEMMs and the LayerNorm + GELU row kernels, csrc/binding.cpp):
    (d_wave, [dW], [dgamma], [dbeta], [dbias]), None where ``needs`` (the flags of what requires a
    gradient, as :func:`_setup_context` records them) asks for none."""
    need_wave, need_w, need_lw, need_lb, need_cb = needs
    n = len(conv_weights)
    lowest = _lowest_layer(needs)
    if lowest == n:
        return None, [None] * n, [None] * n, [None] * n, [None] * len(conv_biases)
    grads = torch.ops.d2v_kernels.conv_feature_extractor_cuda_bwd(
        grad_out, wave, conv_weights, ln_weights, ln_biases, conv_biases, conv_outputs, strides, eps, lowest, need_wave
    )
    keep = lambda group, flags: [g if flag else None for g, flag in zip(group, flags)]
    d_w, d_lw, d_lb, d_cb = (grads[1 + k * n : 1 + (k + 1) * n] for k in range(4))
    return (
        grads[0] if need_wave else None,
        keep(d_w, need_w),
        keep(d_lw, need_lw),
        keep(d_lb, need_lb),
        keep(d_cb, need_cb),
    )


def _record_inputs(ctx, inputs) -> list[Tensor]:
    """Keeps on ctx what the backwards read besides tensors; returns the input tensors to save."""
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
    return [wave, *conv_weights, *ln_weights, *ln_biases, *conv_biases]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*_record_inputs(ctx, inputs))


def _train_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*_record_inputs(ctx, inputs), *output[1:])


def _saved_inputs(ctx):
    """(wave, conv_weights, ln_weights, ln_biases, conv_biases, rest of the saved tensors)."""
    n = ctx.num_layers
    wave, *params = ctx.saved_tensors
    split = 3 * n + (n if ctx.has_bias else 0)
    conv_biases = params[3 * n : split] if ctx.has_bias else []
    return wave, params[:n], params[n : 2 * n], params[2 * n : 3 * n], conv_biases, params[split:]


def _triton_nodes_reasons(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps) -> list[str]:
    """Why :func:`triton_nodes_backward` cannot take these inputs (the triton backend's reasons,
    as if forced); [] when it can."""
    impl = next(i for i in dispatch.implementations("conv_feature_extractor") if i.backend == "triton")
    kwargs = dict(strides=strides, conv_biases=conv_biases or None, eps=eps)
    return dispatch.reasons_for(impl, wave.device, wave, conv_weights, ln_weights, ln_biases, forced=True, **kwargs)


def _backward(ctx, grad_out):
    """The forward that kept nothing: rerun the forward keeping the conv outputs, then the
    extension's backward. Where the extension is not loaded (this formula called on CPU tensors, as
    the Triton path's tests do under the interpreter), the same gradients by the Triton path's
    nodes: their forwards rerun from the waveform, then their backwards."""
    wave, *args, _ = _saved_inputs(ctx)
    if not extension_reasons():
        conv_outputs = torch.ops.d2v_kernels.conv_feature_extractor_cuda_train(wave, *args, ctx.strides, ctx.eps)[1:]
        grads = _extension_backward(grad_out, wave, *args, conv_outputs, ctx.strides, ctx.eps, ctx.needs)
    else:
        reasons = _triton_nodes_reasons(wave, *args, ctx.strides, ctx.eps)
        if reasons:
            raise RuntimeError(f"conv_feature_extractor: no backward for the cuda backend here: {'; '.join(reasons)}")
        grads = triton_nodes_backward(grad_out, wave, *args, ctx.strides, ctx.eps, ctx.needs)
    return *grads, None, None


def _train_backward(ctx, grads):
    wave, *args, conv_outputs = _saved_inputs(ctx)
    if grads[0] is None:
        return None, *([None] * len(a) for a in args), None, None
    return *_extension_backward(grads[0], wave, *args, conv_outputs, ctx.strides, ctx.eps, ctx.needs), None, None


_conv_feature_extractor_cuda.register_autograd(_backward, setup_context=_setup_context)
_conv_feature_extractor_cuda_train.register_autograd(_train_backward, setup_context=_train_setup_context)


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
    if wave.dtype in (torch.float16, torch.bfloat16):
        unaligned = [f"conv_weights[{i}]" for i, w in enumerate(conv_weights) if w.shape[0] % GEMM_ALIGNMENT]
        if unaligned:
            reasons.append(
                f"{', '.join(unaligned)}: output channels not a multiple of {GEMM_ALIGNMENT}; the cuda kernels'"
                f" {dtype} GEMMs load 16 bytes at a time"
            )
    for i in range(1, len(conv_weights)):
        reasons += stride_reasons(i, conv_weights[i].shape[2], strides[i])
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
    args = (wave, list(conv_weights), ln_weights, ln_biases, conv_biases, [int(s) for s in strides], float(eps))
    if needs_grad(*_flat(args[:5])):
        return torch.ops.d2v_kernels.conv_feature_extractor_cuda_train(*args)[0]
    return torch.ops.d2v_kernels.conv_feature_extractor_cuda(*args)


def _flat(tensors_and_lists):
    return [t for x in tensors_and_lists for t in (x if isinstance(x, list) else [x])]


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
    description="C++/CUDA extension: layer 0 direct, later convs as CUTLASS GEMMs, LayerNorm + GELU row kernels",
    opt_in=True,  # until a committed GPU measurement shows it faster than the triton backend
)
