"""Data2VecAudio's feature encoder: strided Conv1d -> LayerNorm(C) -> GELU, stacked.

Seven layers in the base config: kernels (10, 3, 3, 3, 3, 2, 2), strides (5, 2, 2, 2, 2, 2, 2),
512 channels, conv without bias, LayerNorm with affine (``feat_extract_norm="layer"``). The op
takes the waveform (B, S) and returns features channels-last (B, T, C).
"""

from __future__ import annotations

import torch.nn.functional as F

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import check_eps, check_param_list, check_same_device, check_tensor


def conv_feature_extractor_reference(
    wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5
):
    """Eager PyTorch: what ``Data2VecAudioFeatureEncoder`` computes, returned as (B, T, C)."""
    h = wave[:, None]
    conv_biases = conv_biases if conv_biases is not None else [None] * len(conv_weights)
    for w, lw, lb, cb, stride in zip(conv_weights, ln_weights, ln_biases, conv_biases, strides):
        h = F.conv1d(h, w, cb, stride=stride)
        h = F.layer_norm(h.transpose(-2, -1), (h.shape[1],), lw, lb, eps).transpose(-2, -1)
        h = F.gelu(h)
    return h.transpose(1, 2)


def output_length(length: int, kernels, strides) -> int:
    """Frames produced from ``length`` samples (transformers' ``_get_feat_extract_output_lengths``)."""
    for k, s in zip(kernels, strides):
        length = (length - k) // s + 1
    return length


def conv_feature_extractor(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    """Waveform (B, S) -> features (B, T, C) channels-last.

    wave: (B, S) fp16, bf16 or fp32 (fp64 runs eager). conv_weights: per-layer (C_out, C_in, k),
    C_in of layer 0 is 1; ln_weights, ln_biases: per-layer (C_out,); strides: per-layer ints;
    conv_biases: per-layer (C_out,) or None. Returns (B, T, C_last) in wave's dtype, with T as
    :func:`output_length` gives.
    """
    check_tensor("wave", wave, ndim=2)
    if not isinstance(conv_weights, (list, tuple)) or not conv_weights:
        raise ValueError("conv_weights must be a non-empty list of (C_out, C_in, k) tensors")
    n = len(conv_weights)
    ln_weights = check_param_list("ln_weights", ln_weights, n)
    ln_biases = check_param_list("ln_biases", ln_biases, n)
    strides = check_param_list("strides", strides, n)
    if conv_biases is not None:
        conv_biases = check_param_list("conv_biases", conv_biases, n)
    c_in = 1
    for i, w in enumerate(conv_weights):
        check_tensor(f"conv_weights[{i}]", w, ndim=3)
        if w.shape[1] != c_in:
            raise ValueError(f"conv_weights[{i}] must have {c_in} input channels, got shape {tuple(w.shape)}")
        c_out = w.shape[0]
        for name, p in (("ln_weights", ln_weights[i]), ("ln_biases", ln_biases[i])) + (
            (("conv_biases", conv_biases[i]),) if conv_biases is not None else ()
        ):
            if p is None:
                continue
            check_tensor(f"{name}[{i}]", p, ndim=1)
            if p.shape[0] != c_out:
                raise ValueError(f"{name}[{i}] must have shape ({c_out},), got {tuple(p.shape)}")
        s = strides[i]
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"strides[{i}] must be a positive int, got {s!r}")
        c_in = c_out
    check_same_device(wave=wave, **{f"conv_weights[{i}]": w for i, w in enumerate(conv_weights)})
    check_eps(eps)
    frames = output_length(wave.shape[1], [w.shape[2] for w in conv_weights], strides)
    if frames < 1:
        raise ValueError(
            f"wave has {wave.shape[1]} samples, too few for one output frame of this feature encoder"
        )
    kwargs = dict(strides=list(strides), conv_biases=conv_biases, eps=eps)
    if wave.shape[0] == 0:
        return conv_feature_extractor_reference(wave, conv_weights, ln_weights, ln_biases, **kwargs)
    return dispatch.call(
        "conv_feature_extractor", wave.device, wave, list(conv_weights), ln_weights, ln_biases, **kwargs
    )


dispatch.register(
    "conv_feature_extractor", "eager", conv_feature_extractor_reference, devices=("cpu", "cuda", "meta")
)
