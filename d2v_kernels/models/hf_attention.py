"""Our attention in transformers' registries: ``attn_implementation="d2v_kernels"``.

The attention function goes into ``AttentionInterface`` and a mask function into
``AttentionMaskInterface`` (without it transformers builds no mask for an unknown implementation
and padding is silently dropped). The mask function hands the attention a 2-D key padding mask
(or None) when the pattern is plain bidirectional or causal, which the kernel applies in-kernel;
any other pattern (packed sequences, or-/and-composed masks) comes as transformers' 4-D boolean
mask, which the attention turns into an additive bias. Data2VecVision picks its attention class
from a dict keyed by the name; there the name gets a class that raises a clear error.
"""

from __future__ import annotations

import torch
from transformers import masking_utils as mu

from d2v_kernels import dispatch, ops

IMPLEMENTATION_NAME = "d2v_kernels"


def mask_arguments(attention_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, is_causal) -> dict:
    """``ops.attention``'s ``key_padding_mask``, ``bias`` and ``causal`` for the mask our mask
    function handed the layers (see ``d2v_kernels_mask``), q and k (B, N, H, d)."""
    n_q, n_k = q.shape[1], k.shape[1]
    key_padding_mask, bias, causal = None, None, False
    if attention_mask is None:
        causal = bool(is_causal) and n_q > 1
    elif attention_mask.dim() == 2:
        key_padding_mask = attention_mask[:, -n_k:]
        causal = bool(is_causal) and n_q > 1
    elif attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(
                ~attention_mask, torch.finfo(q.dtype).min
            )
        else:
            bias = attention_mask
        bias = bias[..., :n_k]
    else:
        raise ValueError(f"attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}")
    return dict(key_padding_mask=key_padding_mask, bias=bias, causal=causal)


def d2v_kernels_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention interface: q, k, v (B, H, N, d) -> ((B, Nq, H, d), weights or None).

    Attentions asked for (``output_attentions=True`` in the call or in the module's config) need
    the probabilities, which the fused kernel never forms: that call runs the eager reference
    (recorded as ``("attention", "eager")``).
    """
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, H, d) views, no copies
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    kwargs_op = dict(
        **mask_arguments(attention_mask, q, k, is_causal),
        dropout_p=float(dropout),
        scale=scaling,
    )
    # transformers collects the attentions a config asks for with hooks, passing no flag down.
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False):
        out, probs = ops.attention_reference(q, k, v, return_probs=True, **kwargs_op)
        dispatch.record("attention", "eager")
        return out, probs
    return ops.attention(q, k, v, **kwargs_op), None


def d2v_kernels_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask interface: a 2-D (B, Nk) bool padding mask or None for plain patterns, else 4-D bool."""
    plain = mask_function is None or mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function)
    if plain:
        if attention_mask is None:
            return None
        # Sliced from the right, as for flash attention. An all-ones mask is passed as it is: testing
        # for one would read the mask back to the host on every forward.
        return attention_mask[:, -kv_length:]
    sdpa_kwargs = {k: v for k, v in kwargs.items() if k not in ("allow_is_causal_skip", "allow_is_bidirectional_skip")}
    return mu.sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **sdpa_kwargs,
    )


class VisionRegistryName(torch.nn.Module):
    """transformers' vision attention classes, keyed by ``attn_implementation``, get this for
    ``"d2v_kernels"`` (registered for audio and text): a clear error instead of a KeyError."""

    def __init__(self, config, window_size=None):
        raise ValueError(
            f'attn_implementation="{IMPLEMENTATION_NAME}" is for Data2VecAudio and Data2VecText models; '
            "Data2VecVision takes d2v_kernels' attention through d2v_kernels.optimize(model) or the "
            "fused classes in d2v_kernels.models (with no attn_implementation)"
        )


_registered = False


def register() -> None:
    """Register ``"d2v_kernels"`` with transformers (idempotent; done on import of d2v_kernels.models)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.models.data2vec import modeling_data2vec_vision as vision_hf

    AttentionInterface.register(IMPLEMENTATION_NAME, d2v_kernels_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, d2v_kernels_mask)
    vision_hf.DATA2VEC_VISION_SELF_ATTENTION_CLASSES.setdefault(IMPLEMENTATION_NAME, VisionRegistryName)
    _registered = True
