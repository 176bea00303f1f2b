"""Data2VecAudio's positional convolution: per layer grouped Conv1d + LayerNorm (no affine) + GELU.

``num_conv_pos_embeddings`` stacked layers of Conv1d(C, C, k, padding=k // 2, groups) with bias,
the pad layer (drops the last frame when k is even), LayerNorm over channels without affine and
exact GELU. The op works on the encoder's channels-last (B, T, C) tensor and returns the
positional embedding that the encoder adds to it.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import KERNEL_DTYPES, check_eps, check_param_list, check_same_device, check_tensor
from d2v_kernels.ops._eager import direct_apply, pick, runs_eagerly, without_zero_grads
from d2v_kernels.ops._plan import layout_key, lookup, needs_grad, plan_cache, plans_enabled, recorder, store


def pos_conv_reference(x, weights, biases, *, groups, eps=1e-5):
    """Eager PyTorch: what ``Data2VecAudioPositionalConvEmbedding`` computes (channels-first)."""
    h = x.transpose(1, 2)
    for weight, bias in zip(weights, biases):
        k = weight.shape[-1]
        h = F.conv1d(h, weight, bias, padding=k // 2, groups=groups)
        if k % 2 == 0:
            h = h[:, :, :-1]
        h = F.layer_norm(h.transpose(1, 2), (h.shape[1],), None, None, eps).transpose(1, 2)
        h = F.gelu(h)
    return h.transpose(1, 2)


def pos_conv_channels_last(x, weights, biases, *, groups, eps=1e-5):
    """The same layers on the channels-last (B, T, C) memory, no transposed copies: each conv is a
    conv2d of the (B, C, 1, T) view with channel stride 1 (NHWC), which cuDNN takes as is, and
    LayerNorm runs on the contiguous last dim. The eager backend's formulation on CUDA."""
    h = x
    for weight, bias in zip(weights, biases):
        k = weight.shape[-1]
        y = F.conv2d(h.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), bias, padding=(0, k // 2), groups=groups)
        y = y.squeeze(2).transpose(1, 2)  # (B, T', C), channel stride 1
        if k % 2 == 0:
            y = y[:, :-1]
        h = F.gelu(F.layer_norm(y, (y.shape[-1],), None, None, eps))
    return h


def _pos_conv_eager(x, weights, biases, *, groups, eps=1e-5):
    """Eager backend: cuDNN channels-last on CUDA; transformers' formulation elsewhere and when
    traced (what ``torch.compile`` of transformers' module was measured on)."""
    if x.device.type == "cuda" and not torch.compiler.is_compiling():
        return pos_conv_channels_last(x, weights, biases, groups=groups, eps=eps)
    return pos_conv_reference(x, weights, biases, groups=groups, eps=eps)


# --------------------------------------------------------------------------------------------
# torch.library registration: forward and backward are opaque custom ops (Triton launches)
# --------------------------------------------------------------------------------------------


def _kernels():
    from d2v_kernels.kernels import pos_conv as kernels

    return kernels


def pos_conv_forward_impl(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    groups: int,
    eps: float,
    save_pre_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (embedding (B, T, C), pre-norm conv outputs (L, B, T, C) or an empty (0, B, T, C)).

    A layer without bias gets zeros (torch.library differentiates Tensor[] inputs, not Tensor?[]).
    Per layer: conv + bias written in x's dtype, then LayerNorm + GELU over the channels. With
    ``save_pre_norm`` every layer's conv output is kept for the backward (the only activations it
    needs besides x); without it the LayerNorm runs in place and two (B, T, C) buffers are live.
    """
    packed, biases = _packed_parameters(weights, biases, groups, x.dtype)
    return _pos_conv_layers(x, packed, biases, weights[0].shape[-1], eps, save_pre_norm, _one_pass())


def _packed_parameters(weights, biases, groups: int, dtype: torch.dtype) -> tuple[list, list]:
    """(packed conv weights, biases in ``dtype``), one per layer."""
    packed = _kernels().pack_weights(weights, groups, dtype=dtype).unbind()
    return packed, torch.stack(biases).to(dtype).unbind()


ENV_ONE_PASS = "D2V_KERNELS_POS_CONV_ONE_PASS"
dispatch.watch_environment(ENV_ONE_PASS)  # a change clears the plans, which fixed the form


def _one_pass() -> bool:
    return dispatch.environment_value(ENV_ONE_PASS) == "1"


def _pos_conv_layers(x, packed, biases, kernel_size: int, eps: float, save_pre_norm: bool, one_pass: bool):
    """Each layer two launches (the conv, then the LayerNorm + GELU row kernel), or one with
    ``one_pass`` (``D2V_KERNELS_POS_CONV_ONE_PASS=1``: the conv with its normalising tail). The
    one-launch form orders its programs through a counter in memory, which the interpreter cannot
    check: it stays opt-in until a GPU has run its repeatability test and measured both forms."""
    kernels = _kernels()
    num_layers = len(packed)
    pre_norm = x.new_empty((num_layers if save_pre_norm else 0, *x.shape))
    conv_outs = pre_norm.unbind() if save_pre_norm else [None] * num_layers
    two_pass = not one_pass
    counters = None if two_pass else kernels.tail_counters(x)
    hidden = x
    for layer in range(num_layers):
        conv_args = (hidden, packed[layer], biases[layer])
        if two_pass:
            conv_out = kernels.grouped_conv1d(*conv_args, pad_left=kernel_size // 2, out=conv_outs[layer])
            hidden = kernels.layer_norm_gelu_rows(conv_out, eps, out=None if save_pre_norm else conv_out)
        else:
            _, hidden = kernels.grouped_conv1d_layer_norm_gelu(
                *conv_args,
                pad_left=kernel_size // 2,
                eps=eps,
                counters=counters,
                out=conv_outs[layer],
                hidden=torch.empty_like(conv_outs[layer]) if save_pre_norm else None,
            )
    return hidden, pre_norm


_pos_conv_op = torch.library.custom_op("d2v_kernels::pos_conv", pos_conv_forward_impl, mutates_args=())


@_pos_conv_op.register_fake
def _pos_conv_op_fake(x, weights, biases, groups, eps, save_pre_norm):
    return x.new_empty(x.shape), x.new_empty((len(weights) if save_pre_norm else 0, *x.shape))


def pos_conv_backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    pre_norm: torch.Tensor,
    weights: list[torch.Tensor],
    groups: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweights (L, C, CG, K) fp32, dbiases (L, C) fp32): the layers' parameter gradients
    stacked (one unpacking copy for all layers; the autograd formula casts and splits them).

    Walks the layers backwards: LayerNorm+GELU backward from the saved pre-norm output
    (statistics recomputed), weight and bias gradients against the layer input (recomputed as
    GELU(LayerNorm(previous pre-norm)), an elementwise pass instead of stored activations), and
    the input gradient as a conv with flipped, group-transposed weights.
    """
    kernels = _kernels()
    num_layers = len(weights)
    group_channels, kernel_size = weights[0].shape[1], weights[0].shape[2]
    pad_left = kernel_size // 2
    grad_hidden = grad_out.to(x.dtype).contiguous()
    packed_dw = x.new_empty((num_layers, kernel_size, group_channels, x.shape[2]), dtype=torch.float32)
    dbias = x.new_empty((num_layers, x.shape[2]), dtype=torch.float32)
    transposed = kernels.pack_weights(weights, groups, dtype=x.dtype, transpose=True).unbind()
    no_bias = x.new_zeros(x.shape[2])
    pre_norms, packed_dws, dbiases = pre_norm.unbind(), packed_dw.unbind(), dbias.unbind()
    for layer in reversed(range(num_layers)):
        grad_conv = kernels.layer_norm_gelu_rows_backward(pre_norms[layer], grad_hidden, eps)
        layer_input = x if layer == 0 else kernels.layer_norm_gelu_rows(pre_norms[layer - 1], eps)
        kernels.grouped_conv1d_weight_grad(
            layer_input,
            grad_conv,
            group_channels=group_channels,
            kernel_size=kernel_size,
            pad_left=pad_left,
            out=(packed_dws[layer], dbiases[layer]),
        )
        grad_hidden = kernels.grouped_conv1d(grad_conv, transposed[layer], no_bias, pad_left=kernel_size - 1 - pad_left)
    return grad_hidden, kernels.unpack_weight_grads(packed_dw, groups), dbias


_pos_conv_backward_op = torch.library.custom_op(
    "d2v_kernels::pos_conv_backward", pos_conv_backward_impl, mutates_args=()
)


def _in_dtypes(stacked: torch.Tensor, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """[stacked[l] in dtypes[l]]: one cast when the layers share a dtype."""
    if len(set(dtypes)) == 1:
        return list(stacked.to(dtypes[0]).unbind())
    return [s.to(dtype) for s, dtype in zip(stacked.unbind(), dtypes)]


@_pos_conv_backward_op.register_fake
def _pos_conv_backward_op_fake(grad_out, x, pre_norm, weights, groups, eps):
    stacked = (len(weights), *weights[0].shape)
    return (
        x.new_empty(x.shape),
        x.new_empty(stacked, dtype=torch.float32),
        x.new_empty(stacked[:2], dtype=torch.float32),
    )


def _pos_conv_setup_context(ctx, inputs, output):
    x, weights, biases, groups, eps, _ = inputs
    _, pre_norm = output
    ctx.save_for_backward(x, pre_norm, *weights)
    ctx.groups, ctx.eps = groups, eps
    ctx.bias_dtypes = [b.dtype for b in biases]


def _pos_conv_backward(ctx, grad_out, _grad_pre_norm):
    x, pre_norm, *weights = ctx.saved_tensors
    num_layers = len(weights)
    if pre_norm.shape[0] != num_layers:
        raise RuntimeError("d2v_kernels::pos_conv ran with save_pre_norm=False; it has no backward")
    backward = pick(torch.ops.d2v_kernels.pos_conv_backward, pos_conv_backward_impl, (grad_out, x, pre_norm, *weights))
    grad_x, grad_weights, grad_biases = backward(grad_out, x, pre_norm, weights, ctx.groups, ctx.eps)
    grad_weights = _in_dtypes(grad_weights, [w.dtype for w in weights])
    return grad_x, grad_weights, _in_dtypes(grad_biases, ctx.bias_dtypes), None, None, None


# The pre-norm output has no gradient: without_zero_grads spares a zero (L, B, T, C) tensor each backward.
_pos_conv_setup_context, _pos_conv_backward = without_zero_grads(_pos_conv_setup_context, _pos_conv_backward)
torch.library.register_autograd("d2v_kernels::pos_conv", _pos_conv_backward, setup_context=_pos_conv_setup_context)


class PosConvFunction(torch.autograd.Function):
    """The custom op and its backward for eager calls on real tensors (``_eager``'s reason: the
    custom op's autograd wrapper and dispatch cost host time a call): the layers' weights and
    biases are flattened into the inputs, which a Function differentiates one by one (it does not
    look into lists). The pre-norm outputs stay inside, saved for the backward."""

    @staticmethod
    def forward(ctx, groups, eps, num_layers, x, *params):
        inputs = (x, list(params[:num_layers]), list(params[num_layers:]), groups, eps, True)
        output = pos_conv_forward_impl(*inputs)
        _pos_conv_setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_x, grad_weights, grad_biases, *_ = _pos_conv_backward(ctx, grad_out, None)
        num_layers = len(ctx.bias_dtypes)
        grad_weights = [None] * num_layers if grad_weights is None else grad_weights
        grad_biases = [None] * num_layers if grad_biases is None else grad_biases
        return None, None, None, grad_x, *grad_weights, *grad_biases


_apply_pos_conv = direct_apply(PosConvFunction)


def _pos_conv_triton(x, weights, biases, *, groups, eps=1e-5):
    """Triton path: keeps the pre-norm activations only when autograd will need them.

    Weights and biases of another dtype (fp32 master weights with fp16 x) run in x's dtype, as
    autocast would; their gradients come back in their own dtype.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights, *biases))
    if not needs_grad and runs_eagerly((x, *weights, *biases)):
        run = _pos_conv_inference(len(weights), weights[0].shape[-1], groups, float(eps), _one_pass())
        return run(x, weights, biases)
    biases = [torch.zeros_like(w[:, 0, 0]) if b is None else b for w, b in zip(weights, biases)]
    if needs_grad and runs_eagerly((x, *weights, *biases)):
        return _apply_pos_conv(groups, float(eps), len(weights), x, *weights, *biases)
    out, _ = torch.ops.d2v_kernels.pos_conv(x, list(weights), biases, groups, float(eps), needs_grad)
    return out


def _pos_conv_inference(num_layers: int, kernel_size: int, groups: int, eps: float, one_pass: bool):
    """The Triton path's eager inference, its options fixed (a plan keeps it): the layers straight
    from the implementation (no custom-op dispatch), the packed parameters kept while the
    parameters are unchanged. In the two-launch form the launches are kept too, made by the
    first run: past x, every operand is a fresh allocation (or a slice of one) whose layout
    follows from x's shape and dtype."""
    if one_pass:

        def run(x, weights, biases):
            packed, packed_biases = _inference_parameters(weights, biases, groups, x.dtype)
            return _pos_conv_layers(x, packed, packed_biases, kernel_size, eps, False, True)[0]

        return run
    kernels = _kernels()
    pad_left = kernel_size // 2
    convs, norms = [None] * num_layers, [None] * num_layers

    def run(x, weights, biases):
        packed, packed_biases = _inference_parameters(weights, biases, groups, x.dtype)
        hidden = x
        for layer in range(len(packed)):
            out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
            if convs[layer] is None:  # norms first: a thread that finds the conv finds both
                norms[layer] = kernels.layer_norm_gelu_rows_launch(out, eps, out=out)
                convs[layer] = kernels.grouped_conv1d_launch(
                    hidden, packed[layer], packed_biases[layer], out, pad_left=pad_left
                )
            convs[layer](hidden, packed[layer], packed_biases[layer], out)
            norms[layer](out, out)
            hidden = out
        return hidden

    return run


_inference_cache: dict[tuple, tuple[list, tuple[list, list]]] = {}


def _inference_parameters(weights, biases, groups: int, dtype: torch.dtype) -> tuple[list, list]:
    """:func:`_packed_parameters` kept while the parameters are the same tensors with the same
    storage and version (an optimizer step, ``load_state_dict``, ``.to()`` or another model's
    parameters make them anew), for inference only."""
    tensors = [t for t in (*weights, *biases) if t is not None]
    key = (groups, dtype, len(weights), *((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
    hit = _inference_cache.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):  # not a freed tensor's id
        return hit[1]
    if len(_inference_cache) >= 8:
        _inference_cache.clear()
    biases = [torch.zeros_like(w[:, 0, 0]) if b is None else b for w, b in zip(weights, biases)]
    packed = _packed_parameters(weights, biases, groups, dtype)
    _inference_cache[key] = ([weakref.ref(t) for t in tensors], packed)
    return packed


def _triton_available() -> list[str]:
    try:
        _kernels()
    except Exception as e:  # triton missing or broken on this platform
        return [f"Triton kernels unavailable: {type(e).__name__}: {e}"]
    return []


def _triton_reasons(x, weights, biases, *, groups, eps=1e-5) -> list[str]:
    """Why the Triton kernels cannot take this input (empty when they can)."""
    kernels = _kernels()
    reasons = []
    if x.dtype not in KERNEL_DTYPES:
        reasons.append(f"x has dtype {str(x.dtype).replace('torch.', '')}; the kernels take float16, bfloat16, float32")
    channels = x.shape[2]
    group_channels = channels // groups
    if group_channels > kernels.MAX_GROUP_CHANNELS:
        reasons.append(f"{group_channels} channels per group; the kernels take at most {kernels.MAX_GROUP_CHANNELS}")
    if channels > kernels.MAX_CHANNELS:
        reasons.append(f"{channels} channels; the LayerNorm kernel takes at most {kernels.MAX_CHANNELS}")
    largest_offset = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride()))
    if max(largest_offset, x.numel(), len(weights) * x.numel()) >= 2**31:
        reasons.append("x is too large for the kernels' 32-bit offsets (2**31 elements)")
    return reasons


def pos_conv(x, weights, biases, *, groups, eps=1e-5):
    """Positional conv embedding of channels-last hidden states.

    x: (B, T, C) fp16, bf16 or fp32 (fp64 runs eager). weights: list of per-layer conv weights
    (C, C // groups, k), one k for all layers; biases: list of (C,) or None entries.
    Returns (B, T, C) in x's dtype (the encoder adds it to x).
    """
    key = None
    if plans_enabled() and type(weights) in _SEQUENCES and (biases is None or type(biases) in _SEQUENCES):
        key = layout_key(x, *weights, *(biases if biases is not None else ()))
        if key is not None and key[0] is not None:
            # What validation, dispatch and the measured rule read: the layouts (requires_grad in
            # them), grad mode, the options with their types, the forced backends (and, through
            # dispatch's snapshot, D2V_KERNELS_POS_CONV_ONE_PASS).
            key = (
                key, len(weights), None if biases is None else len(biases), groups.__class__, groups,
                eps.__class__, eps, torch.is_grad_enabled(), dispatch.forced_token(),
            )  # fmt: skip
            plan = lookup(_PLANS, key)
            if plan is not None:
                return plan(x, weights, biases)
    return store(_PLANS, key, _plan(x, weights, biases, groups, eps), x.device)(x, weights, biases)


_PLANS = plan_cache()
_SEQUENCES = (list, tuple)


def _plan(x, weights, biases, groups, eps):
    """Validate (errors name the argument) and return the callable that runs this input's
    implementation on inputs of its layout: ``plan(x, weights, biases)``."""
    check_tensor("x", x, ndim=3)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    channels = x.shape[2]
    if channels % groups:
        raise ValueError(f"groups ({groups}) must divide the channel count of x ({channels})")
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights must be a non-empty list of (C, C // groups, k) tensors")
    weights = list(weights)
    no_biases = [None] * len(weights)
    biases = check_param_list("biases", biases if biases is not None else no_biases, len(weights))
    ks = set()
    for i, (w, b) in enumerate(zip(weights, biases)):
        check_tensor(f"weights[{i}]", w, ndim=3)
        if w.shape[:2] != (channels, channels // groups):
            raise ValueError(
                f"weights[{i}] must have shape ({channels}, {channels // groups}, k), got {tuple(w.shape)}"
            )
        ks.add(w.shape[2])
        if b is not None:
            check_tensor(f"biases[{i}]", b, ndim=1)
            if b.shape[0] != channels:
                raise ValueError(f"biases[{i}] must have shape ({channels},), got {tuple(b.shape)}")
        check_same_device(x=x, **{f"weights[{i}]": w, f"biases[{i}]": b})
    if len(ks) != 1:
        raise ValueError(f"all weights must share one kernel size, got {sorted(ks)}")
    check_eps(eps)
    backend, run = None, functools.partial(pos_conv_reference, groups=groups, eps=eps)
    if x.numel() != 0:
        impl = dispatch.select("pos_conv", x.device, x, weights, biases, groups=groups, eps=eps)
        backend, run = impl.backend, functools.partial(impl.run, groups=groups, eps=eps)
        tensors = (x, *weights, *biases)
        if impl.run is _pos_conv_triton and not needs_grad(*tensors) and runs_eagerly(tensors):
            run = _pos_conv_inference(len(weights), ks.pop(), groups, float(eps), _one_pass())
    record = recorder()

    def plan(x, weights, biases):
        if backend is not None:
            record("pos_conv", backend)
        return run(x, weights, biases if biases is not None else no_biases)

    return plan


dispatch.register(
    "pos_conv",
    "triton",
    _pos_conv_triton,
    _triton_reasons,
    devices=("cuda",),
    available=_triton_available,
    description="implicit-GEMM grouped conv, then a LayerNorm + GELU row kernel (one launch a layer opt-in), channels-last",
)
dispatch.register(
    "pos_conv",
    "eager",
    _pos_conv_eager,
    devices=("cpu", "cuda", "meta"),
    description="cuDNN grouped conv on the channels-last memory + LayerNorm + GELU (CUDA); transformers' formulation elsewhere",
)


def pos_conv_prefer(x, weights, biases, *, groups, eps=1e-5) -> tuple[str, ...]:
    """The measured rule: on CUDA, eager (cuDNN channels-last) where autograd records the op or
    it is being compiled; otherwise the priority order (Triton). Reads the device, grad mode,
    ``requires_grad`` flags and whether torch.compile is tracing: what the decision depends on."""
    if x.device.type != "cuda":
        return ()
    if torch.compiler.is_compiling():
        return ("eager",)
    if torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in (*weights, *biases))
    ):
        return ("eager",)
    return ()


dispatch.register_rule(
    "pos_conv",
    pos_conv_prefer,
    evidence=(
        "bench/results/nvidia-h100-80gb-hbm3/20261125-091743-pos_conv.json (H100, fp16, 5 layers "
        "Conv1d(768, 768, k=19, groups=16) + LayerNorm + GELU, B=8 x T=499): fwd+bwd d2v_triton 4.19 ms, "
        "hf_eager 3.25, hf_compile 2.39, cudnn_channels_last 2.38 -> training runs eager (cuDNN channels-last); "
        "fwd d2v_triton 0.663 ms, hf_eager 0.776, cudnn_channels_last 0.819 -> inference runs Triton; "
        "fwd hf_compile 0.528 -> under torch.compile eager (traced into the graph)"
    ),
)
