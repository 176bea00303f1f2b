"""Residual add followed by LayerNorm: ``LayerNorm(x + residual)`` in one pass.

Where Data2Vec runs it: twice per audio encoder layer and per text layer (post-LN), once per
vision layer (the pre-LN sum feeding ``layernorm_after``, which needs the sum back).
"""

from __future__ import annotations

import torch.nn.functional as F

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import check_eps, check_same_device, check_tensor


def add_layer_norm_reference(x, residual, weight, bias, *, eps=1e-5, return_sum=False):
    """Eager PyTorch: ``s = x + residual; y = F.layer_norm(s)``, in x's dtype, like transformers."""
    s = x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return (y, s) if return_sum else y


def add_layer_norm(x, residual, weight, bias, *, eps=1e-5, return_sum=False):
    """LayerNorm(x + residual) over the last dimension.

    x, residual: (..., C), same shape and dtype (fp16, bf16, fp32; fp64 runs eager).
    weight, bias: (C,) or None. Statistics in fp32. Returns y (x's shape and dtype), or
    ``(y, x + residual)`` with ``return_sum=True`` (pre-LN layers need the sum as the next
    residual).
    """
    check_tensor("x", x, ndim=range(1, 9))
    check_tensor("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    channels = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            if p.shape[0] != channels:
                raise ValueError(f"{name} must have shape ({channels},) to match x's last dim, got {tuple(p.shape)}")
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    check_eps(eps)
    if not isinstance(return_sum, bool):
        raise TypeError(f"return_sum must be a bool, got {type(return_sum).__name__}")
    if x.numel() == 0:
        return add_layer_norm_reference(x, residual, weight, bias, eps=eps, return_sum=return_sum)
    return dispatch.call("add_layer_norm", x.device, x, residual, weight, bias, eps=eps, return_sum=return_sum)


dispatch.register("add_layer_norm", "eager", add_layer_norm_reference, devices=("cpu", "cuda", "meta"))
