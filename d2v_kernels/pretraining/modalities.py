"""What the pretrainer needs to know about each transformers Data2Vec encoder: its inputs, how its
masks are passed, where its layers and their feed-forward blocks are, and which front end
``ema_transformer_only`` shares.

The target of a layer is its feed-forward block's output before the last residual add:
- audio (post-LN: ``final_layer_norm(h + feed_forward(h))``): ``feed_forward``'s output (fairseq's
  ``layer_result``, fc2 before dropout);
- text (post-LN BERT): ``output.dense``'s output, before ``output.LayerNorm(x + input)`` (fairseq's
  ``fc_results``; the dropout between them is the identity in the teacher's eval mode);
- vision (pre-LN BEiT: ``h + lambda_2 * output(intermediate(layernorm_after(h)))``):
  ``lambda_2 * output(...)``, the layer-scaled tensor the residual adds (fairseq's
  ``data2vec_vision`` ``fc_feature``); the CLS token has no target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from transformers import Data2VecAudioModel, Data2VecTextModel, Data2VecVisionModel


def _identity(layer: nn.Module, output: torch.Tensor) -> torch.Tensor:
    return output


def _layer_scaled(layer: nn.Module, output: torch.Tensor) -> torch.Tensor:
    scale = layer.lambda_2
    return output if scale is None else output * scale


@dataclasses.dataclass(frozen=True)
class Modality:
    """One Data2Vec encoder family.

    ``input_name``: the model's main input; ``mask_name``: the pretrainer's argument for a
    caller's mask; ``shared``: the submodule paths ``ema_transformer_only`` shares with the
    student; ``layers``: the encoder layers of a model; ``ffn``: (module whose forward output is
    hooked, function (layer, that output) -> the layer's target); ``prefix_tokens``: leading
    positions without a target (vision's CLS).
    """

    name: str
    model_class: type
    input_name: str
    mask_name: str
    shared: tuple[str, ...]
    layers: Callable[[nn.Module], nn.ModuleList]
    ffn: Callable[[nn.Module], nn.Module]
    target_of: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    prefix_tokens: int = 0


AUDIO = Modality(
    name="audio",
    model_class=Data2VecAudioModel,
    input_name="input_values",
    mask_name="mask_time_indices",
    shared=("feature_extractor", "feature_projection", "encoder.pos_conv_embed"),
    layers=lambda model: model.encoder.layers,
    ffn=lambda layer: layer.feed_forward,
    target_of=_identity,
)
VISION = Modality(
    name="vision",
    model_class=Data2VecVisionModel,
    input_name="pixel_values",
    mask_name="bool_masked_pos",
    shared=("embeddings",),
    layers=lambda model: model.encoder.layer,
    ffn=lambda layer: layer.output,
    target_of=_layer_scaled,
    prefix_tokens=1,
)
TEXT = Modality(
    name="text",
    model_class=Data2VecTextModel,
    input_name="input_ids",
    mask_name="masked_positions",
    shared=("embeddings",),
    layers=lambda model: model.encoder.layer,
    ffn=lambda layer: layer.output.dense,
    target_of=_identity,
)
MODALITIES = (AUDIO, VISION, TEXT)


def modality_of(model: nn.Module) -> Modality:
    """The modality of a Data2Vec{Audio,Vision,Text}Model (transformers' class or a subclass)."""
    for modality in MODALITIES:
        if isinstance(model, modality.model_class):
            return modality
    names = ", ".join(m.model_class.__name__ for m in MODALITIES)
    raise TypeError(
        f"student must be one of {names} (or d2v_kernels.models' fused classes), got {type(model).__name__}; "
        "for a task model pass its encoder (e.g. model.data2vec_audio)"
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, nn.parallel.DistributedDataParallel):
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner
