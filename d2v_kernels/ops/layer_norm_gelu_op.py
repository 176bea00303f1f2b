"""LayerNorm over the channel dimension followed by GELU.

Where Data2Vec runs it: all audio feature-encoder conv layers (channels-first (B, C, T), affine)
and all positional-conv layers (no affine). The Triton kernel reads channels-first or
channels-last input in place; the eager reference below is the numerics oracle and the CPU path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import (
    check_eps,
    check_same_device,
    check_tensor,
    layer_norm_compute_dtype,
    layer_norm_promoted,
)
from d2v_kernels.ops._eager import direct_apply, pick, register_autograd, runs_eagerly
from d2v_kernels.ops._plan import layout_key, lookup, needs_grad, plan_cache, plans_enabled, recorder, store

try:
    from d2v_kernels.kernels import layer_norm_gelu as _kernels
except ImportError as _error:  # triton absent: the triton backend reports it as a reason
    _kernels, _KERNELS_IMPORT_ERROR = None, _error

APPROXIMATIONS = ("none", "tanh")


def layer_norm_gelu_reference(x, weight=None, bias=None, *, eps=1e-5, channels_dim=-1, approximate="none"):
    """Eager PyTorch: exactly what transformers runs (transpose, LayerNorm, transpose, GELU).

    With parameters in another dtype than x (fp32 weights, fp16 activations), it computes in the
    promoted dtype and returns x's, as the kernel does (CUDA's layer_norm rejects mixed dtypes).
    """
    h = layer_norm_promoted(x.movedim(channels_dim, -1), weight, bias, eps)
    return F.gelu(h.movedim(-1, channels_dim), approximate=approximate).to(x.dtype)


# --------------------------------------------------------------------------------------------
# torch.library registration: forward (y, mean, rstd) and backward as opaque ops for torch.compile
# --------------------------------------------------------------------------------------------


def layer_norm_gelu_fwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    channels_dim: int,
    approximate: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.layer_norm_gelu_forward(x, weight, bias, eps, channels_dim, approximate)


layer_norm_gelu_fwd_op = torch.library.custom_op(
    "d2v_kernels::layer_norm_gelu_fwd", layer_norm_gelu_fwd_impl, mutates_args=()
)


@layer_norm_gelu_fwd_op.register_fake
def _(x, weight, bias, eps, channels_dim, approximate):
    channels_dim %= x.dim()
    stats_shape = x.shape[:channels_dim] + x.shape[channels_dim + 1 :]
    mean = x.new_empty(stats_shape, dtype=torch.float32)
    return torch.empty_like(x), mean, torch.empty_like(mean)


def layer_norm_gelu_bwd_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    channels_dim: int,
    approximate: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); a missing parameter's gradient is an empty (0,) tensor."""
    dx, dweight, dbias = _kernels.layer_norm_gelu_backward(dy, x, weight, bias, mean, rstd, channels_dim, approximate)
    empty = x.new_empty(0)
    return dx, dweight if dweight is not None else empty, dbias if dbias is not None else empty.clone()


layer_norm_gelu_bwd_op = torch.library.custom_op(
    "d2v_kernels::layer_norm_gelu_bwd", layer_norm_gelu_bwd_impl, mutates_args=()
)


@layer_norm_gelu_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, channels_dim, approximate):
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, channels_dim, approximate = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.channels_dim, ctx.approximate = channels_dim, approximate
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    backward_op = pick(layer_norm_gelu_bwd_op, layer_norm_gelu_bwd_impl, (dy, x, weight, bias))
    dx, dweight, dbias = backward_op(dy, x, weight, bias, mean, rstd, ctx.channels_dim, ctx.approximate)
    return (
        dx,
        dweight if weight is not None else None,
        dbias if bias is not None else None,
        None,
        None,
        None,
    )


LayerNormGeluFunction, _layer_norm_gelu_call = register_autograd(
    layer_norm_gelu_fwd_op, "LayerNormGeluFunction", layer_norm_gelu_fwd_impl, _setup_context, _backward
)


class LayerNormGeluLaunched(torch.autograd.Function):
    """The eager training path: the forward a plan's launch (statistics stored), the backward
    :func:`_backward`'s. Traced calls and tensor subclasses take the custom op."""

    @staticmethod
    def forward(ctx, launch, x, weight, bias, eps, channels_dim, approximate):
        y, _, mean, rstd = launch(x, weight, bias, eps, None)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.channels_dim, ctx.approximate = channels_dim, approximate
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return (None, *_backward(ctx, dy, None, None))


def layer_norm_gelu_triton(x, weight=None, bias=None, *, eps=1e-5, channels_dim=-1, approximate="none"):
    return _layer_norm_gelu_call(x, weight, bias, eps, channels_dim, approximate)[0]


def triton_available() -> list[str]:
    return [] if _kernels is not None else [f"triton kernels not importable: {_KERNELS_IMPORT_ERROR}"]


def _triton_reasons(x, weight=None, bias=None, *, eps=1e-5, channels_dim=-1, approximate="none") -> list[str]:
    return _kernels.unsupported_reasons(x, channels_dim, weight=weight, bias=bias)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def _normalize_channels_dim(x: torch.Tensor, channels_dim) -> int:
    if isinstance(channels_dim, bool) or not isinstance(channels_dim, int):
        raise TypeError(f"channels_dim must be an int, got {type(channels_dim).__name__}")
    if not -x.dim() <= channels_dim < x.dim():
        raise ValueError(f"channels_dim must be in [-{x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}")
    return channels_dim % x.dim()


def layer_norm_gelu(x, weight=None, bias=None, *, eps=1e-5, channels_dim=-1, approximate="none"):
    """GELU(LayerNorm(x)) with the norm over ``channels_dim``.

    x: (..., C) with ``channels_dim=-1`` or (B, C, T) with ``channels_dim=1``; fp16, bf16, fp32
    (fp64 runs eager). weight, bias: (C,) or None (no affine), x's dtype or fp32.
    ``approximate``: "none" (exact erf GELU, transformers' "gelu") or "tanh" ("gelu_new").
    Statistics in fp32. Returns a tensor of x's shape and dtype.
    """
    key = None
    if plans_enabled():
        key = layout_key(x, weight, bias)
        if key is not None:
            key = (
                key, eps.__class__, eps, channels_dim.__class__, channels_dim, approximate.__class__, approximate,
                torch.is_grad_enabled(), torch.is_autocast_enabled("cuda"), dispatch.forced_token(),
            )  # fmt: skip
            plan = lookup(_PLANS, key)
            if plan is not None:
                return plan(x, weight, bias)
    return store(_PLANS, key, _plan(x, weight, bias, eps, channels_dim, approximate), x.device)(x, weight, bias)


_PLANS = plan_cache()


def _plan(x, weight, bias, eps, channels_dim, approximate):
    """Validate (errors name the argument) and return the callable that runs this input's
    implementation on inputs of its layout."""
    check_tensor("x", x, ndim=range(1, 9))
    convert = layer_norm_compute_dtype(x.device, x.dtype) != x.dtype  # under CUDA autocast, as torch's layer_norm
    if convert:
        x = x.float()
    cd = _normalize_channels_dim(x, channels_dim)
    channels = x.shape[cd]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            if p.shape[0] != channels:
                raise ValueError(f"{name} must have shape ({channels},) to match x's channels, got {tuple(p.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    eps = check_eps(eps)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    options = dict(eps=eps, channels_dim=cd, approximate=approximate)
    backend = None
    if x.numel() == 0:
        run = functools.partial(layer_norm_gelu_reference, **options)
    else:
        impl = dispatch.select("layer_norm_gelu", x.device, x, weight, bias, **options)
        backend = impl.backend
        run = functools.partial(impl.run, **options)
        eager = runs_eagerly((x, weight, bias))  # else (traced, a tensor subclass) the custom op
        if impl.run is layer_norm_gelu_triton and eager and not needs_grad(x, weight, bias):
            launch = _kernels.layer_norm_gelu_inference_launch(x, weight, bias, cd, approximate)

            def run(x, weight, bias):
                return launch(x, weight, bias, eps, None)[0]

        elif impl.run is layer_norm_gelu_triton and eager:
            launch = _kernels.layer_norm_gelu_training_launch(x, weight, bias, cd, approximate)
            apply = direct_apply(LayerNormGeluLaunched)

            def run(x, weight, bias):
                return apply(launch, x, weight, bias, eps, cd, approximate)

    record = recorder()

    def plan(x, weight, bias):
        if convert:
            x = x.float()
        if backend is not None:
            record("layer_norm_gelu", backend)
        return run(x, weight, bias)

    return plan


# --------------------------------------------------------------------------------------------
# Measured rule: which backend runs first, per class of input
# --------------------------------------------------------------------------------------------

EVIDENCE = "bench/results/nvidia-h100-80gb-hbm3/20261125-091756-layer_norm_gelu.json"

# (layout, affine, training, dtype class, row bucket) -> (backends tried first, what was measured).
# Medians on the H100 of EVIDENCE, fp16, B = 8, d2v_triton against hf_eager (transformers'
# transpose, LayerNorm, transpose, GELU); "fwd+bwd" is training. "half" is fp16 and bf16 (bf16 was
# not measured: same bytes, same kernel code but the rounding). The row bucket is the kernel's
# BLOCK_C, the next power of two of C (768 and 1024 share one tile). Classes absent here were not
# measured and keep Triton.
PREFERENCES = {
    ("channels_first", True, False, "half", 512): ((), "encoder-T3199 fwd: triton 0.072 ms, eager 0.154"),
    ("channels_first", True, True, "half", 512): (("eager",), "encoder-T3199 fwd+bwd: triton 0.595 ms, eager 0.572"),
    ("channels_last", True, False, "half", 512): ((), "encoder-T3199 fwd: triton 0.053 ms, eager 0.070"),
    ("channels_last", True, True, "half", 512): (("eager",), "encoder-T3199 fwd+bwd: triton 0.852 ms, eager 0.237"),
    ("channels_first", False, False, "half", 1024): (("eager",), "posconv-T499 fwd: triton 0.069 ms, eager 0.043"),
    ("channels_first", False, True, "half", 1024): (("eager",), "posconv-T499 fwd+bwd: triton 0.565 ms, eager 0.237"),
    ("channels_last", False, False, "half", 1024): (("eager",), "posconv-T499 fwd: triton 0.187 ms, eager 0.019"),
    ("channels_last", False, True, "half", 1024): (("eager",), "posconv-T499 fwd+bwd: triton 0.413 ms, eager 0.066"),
}


def input_class(x, weight=None, bias=None, *, channels_dim=-1) -> tuple:
    """The key of :data:`PREFERENCES` for this input: only what the op's plan key holds (layout
    and dtype of x, which parameters are present, whether autograd records the call)."""
    channels = x.shape[channels_dim]
    layout = "channels_last" if x.stride(channels_dim) == 1 or channels == 1 else "channels_first"
    training = needs_grad(x, weight, bias)
    dtype = {torch.float16: "half", torch.bfloat16: "half", torch.float32: "fp32"}.get(x.dtype, str(x.dtype))
    return layout, weight is not None or bias is not None, training, dtype, 1 << max(channels - 1, 0).bit_length()


def preferred_backends(x, weight=None, bias=None, *, eps=1e-5, channels_dim=-1, approximate="none") -> tuple:
    """The measured rule: the backends to try first for this input (eager where the committed
    measurement shows the kernel slower). On a CPU the priority order already ends in eager, and a
    forced backend beats the rule."""
    return PREFERENCES.get(input_class(x, weight, bias, channels_dim=channels_dim), ((), ""))[0]


dispatch.register("layer_norm_gelu", "eager", layer_norm_gelu_reference, devices=("cpu", "cuda", "meta"))
dispatch.register(
    "layer_norm_gelu",
    "triton",
    layer_norm_gelu_triton,
    _triton_reasons,
    available=triton_available,
    description="Triton row-norm kernel: LayerNorm over channels (either layout, strided) + GELU, fp32 stats",
)
dispatch.register_rule("layer_norm_gelu", preferred_backends, evidence=EVIDENCE)
