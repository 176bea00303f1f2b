"""The ops' fast path: one decision per input layout, looked up on later calls.

An op's first call with a new layout validates every argument, asks :mod:`d2v_kernels.dispatch`
for the implementation and makes a *plan*: a callable that runs that implementation on inputs of
this layout (for a Triton kernel, its launch with tiles, grid and integer arguments fixed). The
plan is stored under a key that holds everything validation and dispatch read, so a later call
with the same key would validate and dispatch exactly as the first did, and goes straight to the
plan. A call whose key differs in anything (a shape, a stride, a dtype, a device, a pointer's
16-byte alignment, ``requires_grad``, grad mode, a flag, its type, the backends forced in this
thread) takes the full path again, errors included.

The fast path is for eager calls on plain tensors: under ``torch.compile``, export or any tracing
and dispatch mode, the ops take their full path to their ``torch.library`` custom ops.
"""

from __future__ import annotations

import torch

from d2v_kernels import dispatch
from d2v_kernels.ops._eager import current_dispatch_mode

try:
    from d2v_kernels.kernels._tiles import on_change as _on_tiles_change
except ImportError:  # triton absent: no tiles, no overrides
    _on_tiles_change = None

__all__ = [
    "MAX_PLANS", "launch_rows", "layout_key", "lookup", "needs_grad", "plan_cache", "plans_enabled", "recorder", "store",
]  # fmt: skip

PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# Each new input length makes a plan; past this many an op starts afresh.
MAX_PLANS = 1024

if _on_tiles_change is not None:
    _on_tiles_change(dispatch.clear_plans)

_is_compiling = torch.compiler.is_compiling
_functorch_active = dispatch.functorch_active


def plan_cache() -> dict:
    """An op's plans, cleared by :func:`d2v_kernels.dispatch.clear_plans`."""
    return dispatch.plan_cache()


def plans_enabled() -> bool:
    """Whether this call may take the fast path: eager, no dispatch mode (fake tensors, tracing), no
    torch.func transform (under which dispatch picks aten backends: :func:`dispatch.device_reasons`)."""
    return not _is_compiling() and current_dispatch_mode() is None and not _functorch_active()


def layout_key(*tensors) -> tuple | None:
    """(shape, strides, dtype, device, data_ptr % 16, requires_grad) of each tensor (None stays
    None), or None when an argument is neither None nor a plain tensor (the full path judges it):
    also a tensor without storage (a functorch wrapper left over from a finished transform, whose
    type is plain), whose pointer cannot be read."""
    key = []
    try:
        for t in tensors:
            if t is None:
                key.append(None)
            elif type(t) in PLAIN_TENSOR_TYPES:
                key.append((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15, t.requires_grad))
            else:
                return None
    except RuntimeError:
        return None
    return tuple(key)


def _no_record(op: str, backend: str) -> None:
    pass


def recorder():
    """What a plan counts its runs with: :func:`d2v_kernels.dispatch.record`, or nothing for a plan
    made while being traced (a compiled graph runs without counting, as ``dispatch.call``)."""
    return dispatch.record if not _is_compiling() else _no_record


def lookup(cache: dict, key):
    """The plan stored under ``key``, or None (also when the key cannot be hashed: an argument of
    a type the full path rejects)."""
    try:
        return cache.get(key)
    except TypeError:
        return None


def needs_grad(*tensors) -> bool:
    """Autograd records this call: grad mode is on and some input requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def store(cache: dict, key, plan, device: torch.device):
    """Keep ``plan``, run on ``device`` (:func:`d2v_kernels.dispatch.on_device`), under ``key`` (a key
    that cannot be hashed keeps nothing) and return it."""
    plan = dispatch.on_device(device, plan)
    if key is not None:
        if len(cache) >= MAX_PLANS:
            cache.clear()
        try:
            cache[key] = plan
        except TypeError:
            pass
    return plan


def launch_rows(grad: torch.Tensor, rows: int, channels: int) -> torch.Tensor:
    """``grad`` as (rows, channels), contiguous and 16-byte aligned: the layout a plan's backward
    launches were made for (a copy only where an incoming gradient has another)."""
    grad = grad.reshape(rows, channels)
    if not grad.is_contiguous() or grad.data_ptr() & 15:
        grad = grad.clone(memory_format=torch.contiguous_format)
    return grad
