"""Data2Vec's teacher targets, one layer at a time: ``acc += scale * normalised(layer_out)``.

The pretrainer averages the top-K teacher layers' FFN outputs, each normalised first (audio:
instance norm over time per channel, as fairseq's ``F.instance_norm`` of the (B, C, T) tensor;
text and vision: LayerNorm over channels without affine). Adding each layer into one fp32
accumulator as the teacher runs means the K outputs are never stored together. The Triton kernel
reads a layer once for "layer" and "none", twice for "instance" (statistics, then the add); the
eager reference below is the numerics oracle and the CPU path.

Targets carry no gradient: a call with grad mode on and an input that requires grad raises (the
teacher runs under ``torch.no_grad()``; a graph through it would keep every layer alive).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import KERNEL_DTYPES, check_eps, check_same_device, check_tensor
from d2v_kernels.ops._eager import runs_eagerly

try:
    from d2v_kernels.kernels import accumulate_target as _kernels
except ImportError as _error:  # triton absent: the triton backend reports it as a reason
    _kernels, _KERNELS_IMPORT_ERROR = None, _error

NORMS = ("instance", "layer", "none")


def accumulate_target_reference(acc, layer_out, *, norm, scale, padding_mask=None, eps=1e-5):
    """Eager PyTorch in acc's dtype (float32; float64 for a test's oracle), in place on acc.

    "instance": per (batch, channel) mean and biased variance over the valid frames; "layer":
    ``F.layer_norm`` over channels; "none": layer_out itself. Padded frames add nothing, whatever
    they hold, and a sample without a valid frame adds nothing.
    """
    x = layer_out.to(acc.dtype)
    valid = None if padding_mask is None else (padding_mask != 0).unsqueeze(-1)  # (B, T, 1)
    if norm == "layer":
        y = F.layer_norm(x, (x.shape[-1],), None, None, eps)
    elif norm == "instance":
        if valid is None:
            y = F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
        else:
            x = x.masked_fill(~valid, 0.0)
            count = valid.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1, 1)
            mean = x.sum(dim=1, keepdim=True) / count
            centred = (x - mean).masked_fill(~valid, 0.0)
            var = centred.square().sum(dim=1, keepdim=True) / count
            y = centred * torch.rsqrt(var + eps)
    else:
        y = x
    if valid is not None:
        y = y.masked_fill(~valid, 0.0)
    return acc.add_(y, alpha=scale)


# --------------------------------------------------------------------------------------------
# torch.library registration: the Triton launch as an opaque op that mutates acc, for torch.compile
# --------------------------------------------------------------------------------------------


def accumulate_target_impl(
    acc: torch.Tensor, layer_out: torch.Tensor, norm: str, scale: float, padding_mask: torch.Tensor | None, eps: float
) -> None:
    if padding_mask is not None and padding_mask.dtype != torch.bool:
        padding_mask = padding_mask != 0
    _kernels.accumulate_target(acc, layer_out, norm, scale, padding_mask, eps)


accumulate_target_op = torch.library.custom_op(
    "d2v_kernels::accumulate_target", accumulate_target_impl, mutates_args=("acc",)
)


@accumulate_target_op.register_fake
def _(acc, layer_out, norm, scale, padding_mask, eps):
    return None


def accumulate_target_triton(acc, layer_out, *, norm, scale, padding_mask=None, eps=1e-5):
    """The Triton kernels: launched directly on real tensors, through the custom op when traced."""
    if runs_eagerly((acc, layer_out, padding_mask)):
        accumulate_target_impl(acc, layer_out, norm, scale, padding_mask, eps)
    else:
        torch.ops.d2v_kernels.accumulate_target(acc, layer_out, norm, scale, padding_mask, eps)
    return acc


def triton_available() -> list[str]:
    return [] if _kernels is not None else [f"triton kernels not importable: {_KERNELS_IMPORT_ERROR}"]


def _triton_reasons(acc, layer_out, *, norm, scale, padding_mask=None, eps=1e-5) -> list[str]:
    return _kernels.unsupported_reasons(norm, acc.shape[-1])


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def _validate(acc, layer_out, norm, scale, padding_mask, eps) -> tuple[float, float]:
    """Errors name the argument. Returns (scale, eps) as floats."""
    check_tensor("acc", acc, ndim=3, dtypes=(torch.float32,))
    check_tensor("layer_out", layer_out, ndim=3, dtypes=KERNEL_DTYPES)
    if any(stride == 0 and size > 1 for size, stride in zip(acc.shape, acc.stride())):
        raise ValueError(f"acc must not be an expanded tensor (elements sharing memory), got strides {acc.stride()}")
    if layer_out.shape != acc.shape:
        raise ValueError(f"layer_out must have acc's shape {tuple(acc.shape)}, got {tuple(layer_out.shape)}")
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    eps = check_eps(eps)
    if padding_mask is not None:
        check_tensor("padding_mask", padding_mask, ndim=2, dtypes=None)
        if padding_mask.dtype.is_floating_point or padding_mask.dtype.is_complex:
            raise TypeError(f"padding_mask must be bool or an integer 0/1 tensor, got {padding_mask.dtype}")
        if padding_mask.shape != acc.shape[:2]:
            raise ValueError(
                f"padding_mask must have shape (B, T) = {tuple(acc.shape[:2])}, got {tuple(padding_mask.shape)}"
            )
    check_same_device(acc=acc, layer_out=layer_out, padding_mask=padding_mask)
    if torch.is_grad_enabled() and (acc.requires_grad or layer_out.requires_grad):
        name = "layer_out" if layer_out.requires_grad else "acc"
        raise ValueError(
            f"{name} requires grad while grad mode is on: targets carry no gradient, build them under torch.no_grad()"
        )
    return float(scale), eps


def accumulate_target(acc, layer_out, *, norm, scale, padding_mask=None, eps=1e-5):
    """``acc += scale * normalised(layer_out)`` in fp32, in place; returns acc.

    acc: (B, T, C) float32 (any strides; elements must not share memory). layer_out: (B, T, C)
    fp32, fp16 or bf16, any strides (a channels-first tensor transposed is read as it is).
    norm: "instance" (per (batch, channel) over time, biased variance, no affine), "layer" (per
    frame over channels) or "none". padding_mask: optional (B, T) bool or integer tensor, nonzero
    = a valid frame: "instance" statistics use the valid frames only, and padded frames of acc are
    left unchanged for every norm. eps is added to the variance inside the square root.
    Call it under ``torch.no_grad()``: with grad mode on, an input that requires grad raises.
    """
    scale, eps = _validate(acc, layer_out, norm, scale, padding_mask, eps)
    options = dict(norm=norm, scale=scale, padding_mask=padding_mask, eps=eps)
    if acc.numel() == 0:
        return acc
    dispatch.call("accumulate_target", acc.device, acc, layer_out, **options)
    return acc


dispatch.register(
    "accumulate_target",
    "triton",
    accumulate_target_triton,
    _triton_reasons,
    available=triton_available,
    description="Triton: per-frame LayerNorm rows or per-(sample, channel) two-pass instance norm, fp32 add in place",
)
dispatch.register("accumulate_target", "eager", accumulate_target_reference, devices=("cpu", "cuda", "meta"))
