"""``optimize(model)``: swap the fused modules into a Data2Vec model instance, in place.

Module instances are replaced by subclasses of the transformers modules that share the same
parameters and buffers (state-dict keys unchanged; ``isinstance`` hooks that record hidden states
and attentions still match). Audio and text attention run through transformers' attention
registry, by default its ``d2v_kernels`` entry; vision attention is a fused module (its
relative-bias attention is not reachable through a registry). transformers' module globals are
never patched.
"""

from __future__ import annotations

import warnings

from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from d2v_kernels.models import audio, hf_attention, text, vision
from d2v_kernels.models._common import swap_class

REPLACEMENTS: dict[type, type] = {**audio.REPLACEMENTS, **vision.REPLACEMENTS, **text.REPLACEMENTS}
REGISTRY_MODEL_TYPES = ("data2vec-audio", "data2vec-text")
FUSED_MODULE_CLASSES = (*REPLACEMENTS.values(), *vision.ATTENTION_REPLACEMENTS.values())


def _resolved_implementation(current: str | None, requested: str | None) -> str:
    """The implementation optimize() gives a config that says ``current``: ``requested`` when
    given; else ``d2v_kernels`` for transformers' default (None, or the "sdpa" it resolves None
    to, which a constructed model cannot tell from a request), and ``current`` for any other."""
    if requested is not None:
        return requested
    return hf_attention.IMPLEMENTATION_NAME if current in (None, "sdpa") else current


def _swap_children(parent: nn.Module, attn_implementation: str | None) -> None:
    """Swap ``parent``'s children, then theirs: a swapped module's children are found in the new
    instance (whose ``_modules`` is a copy of the old one's)."""
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        new_cls = REPLACEMENTS.get(type(child))
        if new_cls is None and type(child) in vision.ATTENTION_REPLACEMENTS:
            current = child.config._attn_implementation
            if _resolved_implementation(current, attn_implementation) == hf_attention.IMPLEMENTATION_NAME:
                new_cls = vision.ATTENTION_REPLACEMENTS[type(child)]
        if new_cls is not None:
            child = parent._modules[name] = swap_class(child, new_cls)
        _swap_children(child, attn_implementation)


def optimize(model: nn.Module, *, attn_implementation: str | None = None) -> nn.Module:
    """Swap fused modules into any Data2Vec model (or submodule) in place; returns ``model``.

    Idempotent. Same weights and state-dict keys, same outputs (to float rounding), faster on a
    GPU. Modules of user subclasses (not the exact transformers classes) are left alone.

    ``attn_implementation``: the attention to run. None keeps one the model was given ("eager",
    "flash_attention_2", ...) and turns transformers' default ("sdpa") into "d2v_kernels"; a name
    sets it (for vision, "d2v_kernels" swaps in the fused attention and any other name keeps
    transformers' attention modules).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hf_attention.register()
    if attn_implementation is not None:
        valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if not isinstance(attn_implementation, str) or attn_implementation not in valid:
            raise ValueError(f"attn_implementation must be None or one of {valid}, got {attn_implementation!r}")
    if type(model) in REPLACEMENTS:
        raise ValueError(
            f"optimize() swaps submodules in place; call it on the model that holds this {type(model).__name__}"
        )
    _swap_children(model, attn_implementation)
    configs = {}
    for module in model.modules():  # the attention modules' and the model-level (mask-building) configs
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "model_type", None) in REGISTRY_MODEL_TYPES:
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation = _resolved_implementation(config._attn_implementation, attn_implementation)
    for module in model.modules():  # the relative position index, so a compile right after hits the cache
        if isinstance(module, vision.hf.Data2VecVisionRelativePositionBias):
            table = module.relative_position_bias_table
            if table.device.type != "meta":
                vision.relative_position_index(module, module.window_size, table.device)
    if not any(isinstance(module, FUSED_MODULE_CLASSES) for module in model.modules()):
        warnings.warn(
            f"optimize() found no Data2Vec module to swap in {type(model).__name__}; it runs unchanged",
            stacklevel=2,
        )
    return model
