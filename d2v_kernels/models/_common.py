"""Helpers shared by the drop-in modules."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from d2v_kernels.ops.dropout_seeds import one_draw_per_forward

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


def seeds_drawn_once(encoder_forward, layers: str):
    """An encoder class's ``forward``: ``encoder_forward`` (transformers' own), in training within
    :func:`d2v_kernels.ops.dropout_seeds.one_draw_per_forward` for the encoder's ModuleList
    attribute ``layers``, so that its layer nodes draw their dropout seeds in one launch, not one a
    layer. Its signature is transformers' (``functools.wraps``)."""

    @functools.wraps(encoder_forward)
    def forward(self, *args, **kwargs):
        if not self.training or torch.compiler.is_compiling():
            return encoder_forward(self, *args, **kwargs)
        with one_draw_per_forward(len(getattr(self, layers))):
            return encoder_forward(self, *args, **kwargs)

    return forward


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


def _concatenated(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([linear.weight for linear in linears])
    if all(linear.bias is None for linear in linears):
        return weight, None
    # A projection without a bias (vision's key) gets a zero segment: adding 0 leaves it exact.
    biases = [
        linear.weight.new_zeros(linear.out_features) if linear.bias is None else linear.bias for linear in linears
    ]
    return weight, torch.cat(biases)


def _cache_key(linears) -> tuple:
    return tuple(
        None if p is None else (id(p), p.data_ptr(), p._version, p.dtype, p.device)
        for linear in linears
        for p in (linear.weight, linear.bias)
    )


def qkv_projection(module: nn.Module, hidden_states: torch.Tensor, linears, head_dim: int):
    """The query, key and value projections as one GEMM over their concatenated weights:
    three (..., H, head_dim) views of its output.

    With autograd on, the weights are concatenated per call (their gradients reach the three
    modules' own parameters). Without it the concatenation is cached on ``module``, keyed on each
    parameter's identity, storage, version counter, dtype and device, so an optimizer step,
    ``load_state_dict`` or ``.to()`` / ``.half()`` rebuilds it."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        weight, bias = _concatenated(linears)
    else:
        key = _cache_key(linears)
        cached = module.__dict__.get("_d2v_qkv_cache")
        if cached is None or cached[0] != key:
            cached = (key, *_concatenated(linears))
            module.__dict__["_d2v_qkv_cache"] = cached
        _, weight, bias = cached
    projected = F.linear(hidden_states, weight, bias)
    return projected.view(*hidden_states.shape[:-1], len(linears), -1, head_dim).unbind(-3)


def registry_attention(module, eager_forward, input_shape, query, key, value, attention_mask, **kwargs):
    """The call transformers' Data2Vec attention modules make to the attention registry (the
    config's implementation, ``eager_forward`` for "eager"): q, k, v (B, H, N, d) ->
    ((*input_shape, H * d) output, weights or None)."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_forward)
    attn_output, attn_weights = interface(module, query, key, value, attention_mask, scaling=module.scaling, **kwargs)
    return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights
