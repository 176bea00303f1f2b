"""Data2VecAudio's positional convolution: per layer grouped Conv1d + LayerNorm (no affine) + GELU.

``num_conv_pos_embeddings`` stacked layers of Conv1d(C, C, k, padding=k // 2, groups) with bias,
the pad layer (drops the last frame when k is even), LayerNorm over channels without affine and
exact GELU. The op works on the encoder's channels-last (B, T, C) tensor and returns the
positional embedding that the encoder adds to it.
"""

from __future__ import annotations

import torch.nn.functional as F

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import check_eps, check_param_list, check_same_device, check_tensor


def pos_conv_reference(x, weights, biases, *, groups, eps=1e-5):
    """Eager PyTorch: what ``Data2VecAudioPositionalConvEmbedding`` computes (channels-first)."""
    h = x.transpose(1, 2)
    for weight, bias in zip(weights, biases):
        k = weight.shape[-1]
        h = F.conv1d(h, weight, bias, padding=k // 2, groups=groups)
        if k % 2 == 0:
            h = h[:, :, :-1]
        h = F.layer_norm(h.transpose(1, 2), (h.shape[1],), None, None, eps).transpose(1, 2)
        h = F.gelu(h)
    return h.transpose(1, 2)


def pos_conv(x, weights, biases, *, groups, eps=1e-5):
    """Positional conv embedding of channels-last hidden states.

    x: (B, T, C) fp16, bf16 or fp32 (fp64 runs eager). weights: list of per-layer conv weights
    (C, C // groups, k), one k for all layers; biases: list of (C,) or None entries.
    Returns (B, T, C) in x's dtype (the encoder adds it to x).
    """
    check_tensor("x", x, ndim=3)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    channels = x.shape[2]
    if channels % groups:
        raise ValueError(f"groups ({groups}) must divide the channel count of x ({channels})")
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights must be a non-empty list of (C, C // groups, k) tensors")
    weights = list(weights)
    biases = check_param_list("biases", biases if biases is not None else [None] * len(weights), len(weights))
    ks = set()
    for i, (w, b) in enumerate(zip(weights, biases)):
        check_tensor(f"weights[{i}]", w, ndim=3)
        if w.shape[:2] != (channels, channels // groups):
            raise ValueError(
                f"weights[{i}] must have shape ({channels}, {channels // groups}, k), got {tuple(w.shape)}"
            )
        ks.add(w.shape[2])
        if b is not None:
            check_tensor(f"biases[{i}]", b, ndim=1)
            if b.shape[0] != channels:
                raise ValueError(f"biases[{i}] must have shape ({channels},), got {tuple(b.shape)}")
        check_same_device(x=x, **{f"weights[{i}]": w, f"biases[{i}]": b})
    if len(ks) != 1:
        raise ValueError(f"all weights must share one kernel size, got {sorted(ks)}")
    check_eps(eps)
    if x.numel() == 0:
        return pos_conv_reference(x, weights, biases, groups=groups, eps=eps)
    return dispatch.call("pos_conv", x.device, x, weights, biases, groups=groups, eps=eps)


dispatch.register("pos_conv", "eager", pos_conv_reference, devices=("cpu", "cuda", "meta"))
