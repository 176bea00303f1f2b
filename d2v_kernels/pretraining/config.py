"""``PretrainingConfig``: the Data2Vec method's settings, with the released recipes per modality.

Field names follow fairseq's ``examples/data2vec`` (``Data2VecAudioConfig``, ``Data2VecTextConfig``,
``Data2VecVisionConfig``); the presets follow its released configs:

- audio: ``config/audio/pretraining/base_librispeech.yaml`` (top 8 layers, instance norm per layer,
  L2 loss scaled by 1/sqrt(C), span masks 0.65 x 10 frames, EMA 0.999 -> 0.9999 over 30k updates,
  one linear head).
- text: ``config/text/pretraining/base.yaml`` (top 10 layers, layer norm per layer, smooth L1 with
  beta 4, loss scale 1, spans of 4 tokens at 0.35, EMA over 300k updates, two-layer head).
- vision: the released data2vec-vision pre-training command (BEiT code base): top 6 layers, layer
  norm per layer and of the average, smooth L1 with beta 2, 60% of the patches masked in blocks of
  at least 16, EMA decay 0.9998 held constant. Two differences there: that recipe regresses the
  blocks' outputs (``--layer_results end``) and averages its loss over channels (loss scale 1/C);
  here every modality regresses the FFN output before the last residual (the paper's choice) and
  the loss scale defaults to 1/sqrt(C) unless ``loss_scale`` is given.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class PretrainingConfig:
    """Settings of :class:`~d2v_kernels.pretraining.Data2VecPretrainer`.

    Targets: the mean of the top ``average_top_k_layers`` teacher layers' FFN outputs, each
    normalised first (``instance_norm_target_layer``: per (sample, channel) over the valid time
    steps; ``layer_norm_target_layer``: per time step over channels, no affine; at most one), the
    mean normalised again if ``instance_norm_targets`` or ``layer_norm_targets`` (at most one).

    EMA: the teacher follows the student with decay ``ema_decay`` rising linearly to
    ``ema_end_decay`` over ``ema_anneal_end_step`` updates, then constant. ``ema_transformer_only``:
    the front end (audio: feature encoder, feature projection and positional conv; vision and
    text: the embeddings) is the student's own, not averaged.

    Loss: on the masked positions only; L2 when ``loss_beta`` is 0, else smooth L1 with that beta,
    summed over channels, times ``loss_scale`` (None: 1/sqrt(C)), averaged over masked positions.

    Masks: ``mask_prob`` of the positions; ``mask_length`` is the span length in frames (audio) or
    tokens (text), and the smallest block in patches (vision). ``head_layers``: 1 is one linear
    layer; n > 1 is Linear(C, 2C), GELU, ..., Linear(2C, C) (fairseq's text head). ``seed`` seeds
    the mask generator.
    """

    average_top_k_layers: int = 8
    instance_norm_target_layer: bool = False
    layer_norm_target_layer: bool = False
    instance_norm_targets: bool = False
    layer_norm_targets: bool = False
    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_end_step: int = 30_000
    ema_transformer_only: bool = True
    loss_beta: float = 0.0
    loss_scale: float | None = None
    mask_prob: float = 0.65
    mask_length: int = 10
    head_layers: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in ("average_top_k_layers", "mask_length", "head_layers", "ema_anneal_end_step", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        for name in ("average_top_k_layers", "mask_length", "head_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ema_anneal_end_step < 0:
            raise ValueError(f"ema_anneal_end_step must be >= 0, got {self.ema_anneal_end_step}")
        for name in ("ema_decay", "ema_end_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
        if not isinstance(self.loss_beta, (int, float)) or not math.isfinite(self.loss_beta) or self.loss_beta < 0:
            raise ValueError(f"loss_beta must be a finite float >= 0, got {self.loss_beta!r}")
        if self.loss_scale is not None and (
            not isinstance(self.loss_scale, (int, float)) or not math.isfinite(self.loss_scale) or self.loss_scale <= 0
        ):
            raise ValueError(f"loss_scale must be None or a finite float > 0, got {self.loss_scale!r}")
        if not isinstance(self.mask_prob, (int, float)) or not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be a float in (0, 1], got {self.mask_prob!r}")
        if self.instance_norm_target_layer and self.layer_norm_target_layer:
            raise ValueError("instance_norm_target_layer and layer_norm_target_layer: at most one may be True")
        if self.instance_norm_targets and self.layer_norm_targets:
            raise ValueError("instance_norm_targets and layer_norm_targets: at most one may be True")

    @property
    def layer_norm_mode(self) -> str:
        """``accumulate_target``'s ``norm`` for each layer: "instance", "layer" or "none"."""
        return "instance" if self.instance_norm_target_layer else "layer" if self.layer_norm_target_layer else "none"

    @property
    def target_norm_mode(self) -> str:
        """The normalisation of the layer average: "instance", "layer" or "none"."""
        return "instance" if self.instance_norm_targets else "layer" if self.layer_norm_targets else "none"

    @classmethod
    def for_audio(cls, **overrides) -> PretrainingConfig:
        """fairseq's ``base_librispeech.yaml``; keyword arguments override any field."""
        return cls(**{**dict(instance_norm_target_layer=True), **overrides})

    @classmethod
    def for_text(cls, **overrides) -> PretrainingConfig:
        """fairseq's text ``base.yaml``; keyword arguments override any field."""
        preset = dict(
            average_top_k_layers=10,
            layer_norm_target_layer=True,
            ema_anneal_end_step=300_000,
            loss_beta=4.0,
            loss_scale=1.0,
            mask_prob=0.35,
            mask_length=4,
            head_layers=2,
        )
        return cls(**{**preset, **overrides})

    @classmethod
    def for_vision(cls, **overrides) -> PretrainingConfig:
        """The released data2vec-vision command (see the module docstring); keyword arguments override any field."""
        preset = dict(
            average_top_k_layers=6,
            layer_norm_target_layer=True,
            layer_norm_targets=True,
            ema_decay=0.9998,
            ema_end_decay=0.9998,
            loss_beta=2.0,
            mask_prob=0.6,
            mask_length=16,
        )
        return cls(**{**preset, **overrides})
