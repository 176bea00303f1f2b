"""``optimize(model)``: swap the fused modules into a Data2Vec model instance, in place.

Module instances are replaced by subclasses of the transformers modules that share the same
parameters and buffers (state-dict keys unchanged; ``isinstance`` hooks that record hidden states
and attentions still match). Audio and text attention switch to the ``d2v_kernels`` entry of
transformers' attention registry; vision attention is a fused module (its relative-bias attention
is not reachable through that registry). transformers' module globals are never patched.
"""

from __future__ import annotations

import torch
from torch import nn

from d2v_kernels.models import audio, hf_attention, text, vision
from d2v_kernels.models._common import swap_class

REPLACEMENTS: dict[type, type] = {**audio.REPLACEMENTS, **vision.REPLACEMENTS, **text.REPLACEMENTS}
REGISTRY_ATTENTION_CLASSES = audio.ATTENTION_CLASSES + text.ATTENTION_CLASSES


def _set_attn_implementation(config, name: str) -> None:
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name
    else:
        config._attn_implementation = name


def optimize(model: nn.Module) -> nn.Module:
    """Swap fused modules into any Data2Vec model (or submodule) in place; returns ``model``.

    Idempotent. Same weights and state-dict keys, same outputs (to float rounding), faster on a
    GPU. Modules of user subclasses (not the exact transformers classes) are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hf_attention.register()
    if type(model) in REPLACEMENTS:
        raise ValueError(
            f"optimize() swaps submodules in place; call it on the model that holds this {type(model).__name__}"
        )
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            new_cls = REPLACEMENTS.get(type(child))
            if new_cls is not None:
                parent._modules[name] = swap_class(child, new_cls)
    configs = {}
    for module in model.modules():
        if isinstance(module, REGISTRY_ATTENTION_CLASSES) and getattr(module, "config", None) is not None:
            configs[id(module.config)] = module.config
    for module in model.modules():  # the model-level configs that build the masks
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "model_type", None) in ("data2vec-audio", "data2vec-text"):
            configs[id(config)] = config
    for config in configs.values():
        _set_attn_implementation(config, hf_attention.IMPLEMENTATION_NAME)
    for module in model.modules():  # the relative position index, so a compile right after hits the cache
        if isinstance(module, vision.hf.Data2VecVisionRelativePositionBias):
            table = module.relative_position_bias_table
            if table.device.type != "meta":
                vision.relative_position_index(module, module.window_size, table.device)
    if torch.cuda.is_available() and any(
        isinstance(m, audio.FusedData2VecAudioFeatureEncoder) for m in model.modules()
    ):
        from d2v_kernels import _extension

        _extension.extension_reasons()  # load (or JIT-build) the CUDA extension now, not inside a compile trace
    return model
