"""LayerNorm over the channel dimension followed by GELU.

Where Data2Vec runs it: all audio feature-encoder conv layers (channels-first (B, C, T), affine)
and all positional-conv layers (no affine). The Triton kernel reads channels-first or
channels-last input in place; the eager reference below is the numerics oracle and the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import check_eps, check_same_device, check_tensor

APPROXIMATIONS = ("none", "tanh")


def layer_norm_gelu_reference(x, weight=None, bias=None, *, eps=1e-5, channels_dim=-1, approximate="none"):
    """Eager PyTorch: exactly what transformers runs (transpose, LayerNorm, transpose, GELU)."""
    h = x.movedim(channels_dim, -1)
    h = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return F.gelu(h.movedim(-1, channels_dim), approximate=approximate)


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
    check_tensor("x", x, ndim=range(1, 9))
    cd = _normalize_channels_dim(x, channels_dim)
    channels = x.shape[cd]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            if p.shape[0] != channels:
                raise ValueError(f"{name} must have shape ({channels},) to match x's channels, got {tuple(p.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    check_eps(eps)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if x.numel() == 0:
        return layer_norm_gelu_reference(x, weight, bias, eps=eps, channels_dim=cd, approximate=approximate)
    return dispatch.call(
        "layer_norm_gelu", x.device, x, weight, bias, eps=eps, channels_dim=cd, approximate=approximate
    )



dispatch.register("layer_norm_gelu", "eager", layer_norm_gelu_reference, devices=("cpu", "cuda", "meta"))
