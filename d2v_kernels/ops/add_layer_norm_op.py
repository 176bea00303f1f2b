"""Residual add followed by LayerNorm: ``LayerNorm(x + residual)`` in one pass, x optionally
dropped out and scaled per channel first (``LayerNorm(x_scale * dropout(x) + residual)``).

Where Data2Vec runs it: twice per audio encoder layer and per text layer (post-LN, after the
hidden dropout: ``dropout_p``), once per vision layer (the pre-LN sum feeding ``layernorm_after``,
which needs the sum back; vision's layer scale ``lambda_1`` is the ``x_scale``). The Triton path
drops out in the kernels, from a (2,) int64 Philox seed drawn per call from torch's generator of
x's device (``torch.manual_seed`` repeats a run); the backward redraws the mask from that seed.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import (
    check_eps,
    check_same_device,
    check_tensor,
    layer_norm_compute_dtype,
    layer_norm_promoted,
)
from d2v_kernels.ops._eager import direct_apply, pick, register_traced_autograd, runs_eagerly
from d2v_kernels.ops._plan import layout_key, lookup, needs_grad, plan_cache, plans_enabled, recorder, store
from d2v_kernels.ops.dropout_seeds import draw_seeds

try:
    from d2v_kernels.kernels import add_layer_norm as _kernels
except ImportError as _error:  # triton absent: the triton backend reports it as a reason
    _kernels, _KERNELS_IMPORT_ERROR = None, _error


def add_layer_norm_reference(x, residual, weight, bias, *, eps=1e-5, return_sum=False, x_scale=None, dropout_p=0.0):
    """Eager PyTorch: ``s = [x_scale *] F.dropout(x) + residual; y = F.layer_norm(s)``, in the sum's
    dtype, like transformers."""
    if dropout_p > 0.0:
        x = torch.nn.functional.dropout(x, dropout_p)
    s = (x if x_scale is None else x_scale * x) + residual
    y = layer_norm_promoted(s, weight, bias, eps).to(s.dtype)
    return (y, s) if return_sum else y


# --------------------------------------------------------------------------------------------
# torch.library registration: forward (y, sum, mean, rstd) and backward as opaque ops
# --------------------------------------------------------------------------------------------


def _add_layer_norm_fwd_impl(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    eps: float,
    return_sum: bool,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, the sum or an empty (0,) tensor, mean, rstd). ``seed``: the dropout's (2,) int64 Philox
    seed when ``dropout_p`` > 0."""
    y, total, mean, rstd = _kernels.add_layer_norm_forward(
        x, residual, weight, bias, eps, return_sum, x_scale, seed, dropout_p
    )
    return y, total if total is not None else x.new_empty(0), mean, rstd


_add_layer_norm_fwd = torch.library.custom_op(
    "d2v_kernels::add_layer_norm_fwd", _add_layer_norm_fwd_impl, mutates_args=()
)


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, x_scale, eps, return_sum, seed=None, dropout_p=0.0):
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    total = torch.empty_like(x) if return_sum else x.new_empty(0)
    return torch.empty_like(x), total, mean, torch.empty_like(mean)


def _add_layer_norm_bwd_impl(
    dy: torch.Tensor,
    dsum: torch.Tensor | None,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight, dbias, dx_scale). Without x_scale and dropout dresidual is dx, and
    comes back as an empty (0,) tensor (a custom op's outputs do not alias each other), as does a
    missing parameter's gradient."""
    dx, dresidual, dweight, dbias, dx_scale = _kernels.add_layer_norm_backward(
        dy, dsum, x, residual, weight, bias, mean, rstd, x_scale, seed, dropout_p
    )
    if x_scale is None and dropout_p == 0.0:
        dresidual = x.new_empty(0)
    return dx, dresidual, *(g if g is not None else x.new_empty(0) for g in (dweight, dbias, dx_scale))


_add_layer_norm_bwd = torch.library.custom_op(
    "d2v_kernels::add_layer_norm_bwd", _add_layer_norm_bwd_impl, mutates_args=()
)


@_add_layer_norm_bwd.register_fake
def _(dy, dsum, x, residual, weight, bias, x_scale, mean, rstd, seed=None, dropout_p=0.0):
    dresidual = torch.empty_like(x) if x_scale is not None or dropout_p > 0.0 else x.new_empty(0)
    grads = (torch.empty_like(p) if p is not None else x.new_empty(0) for p in (weight, bias, x_scale))
    return torch.empty_like(x), dresidual, *grads


def _setup_context(ctx, inputs, output):
    # x and residual are saved, not their sum: the backward re-adds them in fp32, exactly as the
    # forward normalised them (the stored sum is rounded to x's dtype).
    # The dropout's seed is saved, not its mask: the backward redraws the mask in the kernel.
    x, residual, weight, bias, x_scale, _eps, return_sum, seed, dropout_p = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, x_scale, mean, rstd, seed)
    ctx.return_sum, ctx.dropout_p = return_sum, dropout_p
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, dsum, _dmean, _drstd):
    x, residual, weight, bias, x_scale, mean, rstd, seed = ctx.saved_tensors
    dsum = dsum if ctx.return_sum else None
    if dy is None:  # only the returned sum was used
        dy = torch.zeros_like(x)
    inputs = (dy, dsum, x, residual, weight, bias, x_scale)
    dx, dresidual, dweight, dbias, dx_scale = pick(_add_layer_norm_bwd, _add_layer_norm_bwd_impl, inputs)(
        *inputs, mean, rstd, seed, ctx.dropout_p
    )
    return (
        dx,
        dresidual if x_scale is not None or ctx.dropout_p > 0.0 else dx,
        dweight if weight is not None else None,
        dbias if bias is not None else None,
        dx_scale if x_scale is not None else None,
        None,
        None,
        None,
        None,
    )


_add_layer_norm_call = register_traced_autograd(_add_layer_norm_fwd, _setup_context, _backward)


class AddLayerNormLaunched(torch.autograd.Function):
    """The eager training path: the forward a plan's launch (statistics stored), the backward
    :func:`_backward`'s. Traced calls and tensor subclasses take the custom op above."""

    @staticmethod
    def forward(ctx, launch, x, residual, weight, bias, x_scale, eps, return_sum, seed=None, dropout_p=0.0):
        y, total, mean, rstd = launch(x, weight, bias, eps, residual, x_scale, seed, dropout_p)
        ctx.set_materialize_grads(False)
        inputs = (x, residual, weight, bias, x_scale, eps, return_sum, seed, dropout_p)
        _setup_context(ctx, inputs, (y, total, mean, rstd))
        return (y, total) if return_sum else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsum=None):
        if dy is None and dsum is None:
            return (None,) * 10
        return (None, *_backward(ctx, dy, dsum, None, None))


def _add_layer_norm_triton(x, residual, weight, bias, *, eps=1e-5, return_sum=False, x_scale=None, dropout_p=0.0):
    seed = draw_seeds(x.device) if dropout_p > 0.0 else None
    y, total, _, _ = _add_layer_norm_call(x, residual, weight, bias, x_scale, eps, return_sum, seed, dropout_p)
    return (y, total) if return_sum else y


def _triton_available() -> list[str]:
    return [] if _kernels is not None else [f"triton kernels not importable: {_KERNELS_IMPORT_ERROR}"]


def _triton_reasons(x, residual, weight, bias, *, eps=1e-5, return_sum=False, x_scale=None, dropout_p=0.0) -> list[str]:
    return _kernels.unsupported_reasons(x, -1, weight=weight, bias=bias, residual=residual, x_scale=x_scale)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def add_layer_norm(x, residual, weight, bias, *, eps=1e-5, return_sum=False, x_scale=None, dropout_p=0.0):
    """LayerNorm(x + residual), or LayerNorm(x_scale * dropout(x) + residual), over the last dimension.

    x, residual: (..., C), same shape (fp16, bf16, fp32; fp64 runs eager); mixed dtypes promote
    as ``x_scale * x + residual`` does, and under CUDA autocast the op runs in fp32 like torch's
    layer_norm. weight, bias, x_scale: (C,) or None (x_scale: a per-channel scale of x, vision's
    layer scale; its gradient is reduced in the kernels like weight's). Statistics in fp32.
    dropout_p: the probability of zeroing an element of x (post-LN layers' hidden dropout), kept
    elements scaled by 1 / (1 - p), as ``F.dropout(x, dropout_p)``; applied whenever it is > 0
    (pass 0 out of training), grad enabled or not. The Triton kernels draw the mask themselves
    from a seed taken from torch's generator (``torch.manual_seed`` repeats it), so it differs
    from the eager path's ``F.dropout`` mask for the same seed.
    Returns y (the sum's shape and dtype), or ``(y, sum)`` with ``return_sum=True`` (pre-LN layers
    need the sum as the next residual).
    """
    key = None
    if plans_enabled():
        key = layout_key(x, residual, weight, bias, x_scale)
        if key is not None:
            key = (
                key, eps.__class__, eps, return_sum.__class__, return_sum, torch.is_grad_enabled(),
                torch.is_autocast_enabled("cuda"), dispatch.forced_token(), dropout_p.__class__, dropout_p,
            )  # fmt: skip
            plan = lookup(_PLANS, key)
            if plan is not None:
                return plan(x, residual, weight, bias, x_scale)
    plan = store(_PLANS, key, _plan(x, residual, weight, bias, eps, return_sum, x_scale, dropout_p), x.device)
    return plan(x, residual, weight, bias, x_scale)


_PLANS = plan_cache()


def _plan(x, residual, weight, bias, eps, return_sum, x_scale, dropout_p):
    """Validate (errors name the argument) and return the callable that runs this input's
    implementation on inputs of its layout."""
    check_tensor("x", x, ndim=range(1, 9))
    check_tensor("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    channels = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias), ("x_scale", x_scale)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            if p.shape[0] != channels:
                raise ValueError(f"{name} must have shape ({channels},) to match x's last dim, got {tuple(p.shape)}")
    # As transformers' `LayerNorm(lambda * x + residual)`: type promotion (an autocast Linear output
    # plus an fp32 residual), and float32 under CUDA autocast.
    dtype = torch.promote_types(x.dtype, residual.dtype)
    if x_scale is not None:
        dtype = torch.promote_types(dtype, x_scale.dtype)
    dtype = layer_norm_compute_dtype(x.device, dtype)
    convert = any(t is not None and t.dtype != dtype for t in (x, residual, x_scale))
    check_same_device(x=x, residual=residual, weight=weight, bias=bias, x_scale=x_scale)
    eps = check_eps(eps)
    if not isinstance(return_sum, bool):
        raise TypeError(f"return_sum must be a bool, got {type(return_sum).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    if convert:
        x, residual, x_scale = (None if t is None else t.to(dtype) for t in (x, residual, x_scale))
    options = {"eps": eps, "return_sum": return_sum, "x_scale": x_scale, "dropout_p": dropout_p}
    backend, implementation = None, add_layer_norm_reference
    if x.numel() != 0:
        impl = dispatch.select("add_layer_norm", x.device, x, residual, weight, bias, **options)
        backend, implementation = impl.backend, impl.run

    def run(x, residual, weight, bias, x_scale):
        return implementation(
            x, residual, weight, bias, eps=eps, return_sum=return_sum, x_scale=x_scale, dropout_p=dropout_p
        )

    # Eager calls on plain tensors launch the plan's kernel directly; traced calls and tensor
    # subclasses take the custom op. With dropout each call draws its seed first (a run of its
    # own: without dropout the call is what it was before dropout existed).
    if implementation is _add_layer_norm_triton and runs_eagerly((x, residual, weight, bias, x_scale)):
        dropout = dropout_p > 0.0
        if not needs_grad(x, residual, weight, bias, x_scale):
            launch = _kernels.add_layer_norm_inference_launch(
                x, residual, weight, bias, return_sum, x_scale, dropout=dropout
            )

            if dropout:

                def run(x, residual, weight, bias, x_scale):
                    y, total, _, _ = launch(x, weight, bias, eps, residual, x_scale, draw_seeds(x.device), dropout_p)
                    return (y, total) if return_sum else y

            else:

                def run(x, residual, weight, bias, x_scale):
                    y, total, _, _ = launch(x, weight, bias, eps, residual, x_scale)
                    return (y, total) if return_sum else y

        else:
            launch = _kernels.add_layer_norm_training_launch(
                x, residual, weight, bias, return_sum, x_scale, dropout=dropout
            )
            apply = direct_apply(AddLayerNormLaunched)

            if dropout:

                def run(x, residual, weight, bias, x_scale):
                    seed = draw_seeds(x.device)
                    return apply(launch, x, residual, weight, bias, x_scale, eps, return_sum, seed, dropout_p)

            else:

                def run(x, residual, weight, bias, x_scale):
                    return apply(launch, x, residual, weight, bias, x_scale, eps, return_sum)

    record = recorder()

    def plan(x, residual, weight, bias, x_scale):
        if convert:
            x, residual, x_scale = (None if t is None else t.to(dtype) for t in (x, residual, x_scale))
        if backend is not None:
            record("add_layer_norm", backend)
        return run(x, residual, weight, bias, x_scale)

    return plan


dispatch.register("add_layer_norm", "eager", add_layer_norm_reference, devices=("cpu", "cuda", "meta"))
dispatch.register(
    "add_layer_norm",
    "triton",
    _add_layer_norm_triton,
    _triton_reasons,
    available=_triton_available,
    description="Triton row-norm kernel: fp32 residual add + LayerNorm over the last dim, fp32 stats",
)
