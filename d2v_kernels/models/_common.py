"""Helpers shared by the drop-in modules."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from transformers import activations

# Module level, not in the functions: they run inside compiled forwards, and torch 2.11's dynamo
# breaks the graph on an import of a transformers module (a _LazyModule).
_TANH_GELU_CLASSES = tuple(
    getattr(activations, name)
    for name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation")
    if hasattr(activations, name)
)


def gelu_approximation(activation: nn.Module) -> str | None:
    """ "none" for exact GELU, "tanh" for the tanh form, None for any other activation."""
    if isinstance(activation, nn.GELU):
        return activation.approximate
    if isinstance(activation, activations.GELUActivation):
        return "none"
    if isinstance(activation, _TANH_GELU_CLASSES):
        return "tanh"
    if getattr(activation, "act", None) is F.gelu:
        return "none"
    return None


def swap_class(module: nn.Module, new_cls: type) -> nn.Module:
    """A new instance of ``new_cls`` (a subclass of ``type(module)``'s base) sharing ``module``'s
    parameters, buffers, submodules and hooks, so names and state-dict keys are unchanged."""
    new = new_cls.__new__(new_cls)
    state = module.__dict__.copy()
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in state:
            state[key] = state[key].copy()
    new.__dict__ = state
    setup = getattr(new, "_d2v_setup", None)
    if setup is not None:
        setup()
    return new
