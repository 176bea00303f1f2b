"""Argument validation shared by the ops: clear errors that name the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))


def check_same_dtype(**tensors) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} is {str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise TypeError(f"floating tensors must share one dtype, got {listing}")
    return next(iter(dtypes.values()))


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def check_param_list(name: str, values, length: int) -> list:
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(values).__name__}")
    if len(values) != length:
        raise ValueError(f"{name} must have {length} entries (one per layer), got {len(values)}")
    return list(values)


def layer_norm_promoted(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dim in the dtype x promotes to with the parameters' (fp32
    weights on fp16 / bf16 rows: fp32, as the kernels compute; CUDA's layer_norm rejects mixed
    dtypes). The eager references cast the result back to x's dtype after their own epilogue."""
    compute = x.dtype
    for p in (weight, bias):
        if p is not None:
            compute = torch.promote_types(compute, p.dtype)
    if compute != x.dtype:
        x = x.to(compute)
        weight, bias = (None if p is None else p.to(compute) for p in (weight, bias))
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype transformers' LayerNorm would run in here: under CUDA autocast torch runs
    layer_norm in float32 (it is on autocast's fp32 list there, not on the CPU's)."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return dtype
