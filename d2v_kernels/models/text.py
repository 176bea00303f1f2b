"""Drop-in fused modules for Data2VecText: self-attention with one GEMM for q, k and v, and the
residual add + LayerNorm after attention and after the feed-forward. Attention runs through
transformers' AttentionInterface, by default its ``d2v_kernels`` entry (see ``hf_attention``),
causal and cached generation included."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from transformers.models.data2vec import modeling_data2vec_text as hf
from transformers.utils.deprecation import deprecate_kwarg

from d2v_kernels import ops
from d2v_kernels.models._common import qkv_projection, registry_attention, seeds_drawn_once
from d2v_kernels.models._lean import (
    activation_call,
    add_layer_norm,
    dropout,
    lean_attention,
    linear,
    registry_lean_modules,
    training_node_options,
    unobserved,
    weights_and_biases,
)
from d2v_kernels.ops.post_ln_layer_op import post_ln_layer_training

# The name the installed transformers' layers take the key/value cache by: ``cache`` since its
# rename (``past_key_values`` still accepted, with a deprecation warning), ``past_key_values`` before.
CACHE_KWARG = "cache" if "cache" in inspect.signature(hf.Data2VecTextLayer.forward).parameters else "past_key_values"


def takes_installed_cache_kwarg(forward):
    """``forward`` (written with a ``cache`` parameter) taking the cache by :data:`CACHE_KWARG`, as
    the transformers forward it overrides does: with the rename, ``past_key_values`` goes through
    transformers' own deprecation; before it, ``past_key_values`` is the parameter, without a
    warning, and the signature says so."""
    if CACHE_KWARG == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def renamed(self, *args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(self, *args, **kwargs)

    signature = inspect.signature(forward)
    params = [p.replace(name="past_key_values") if p.name == "cache" else p for p in signature.parameters.values()]
    renamed.__signature__ = signature.replace(parameters=params)
    return renamed


class FusedData2VecTextSelfAttention(hf.Data2VecTextSelfAttention):
    """transformers' forward (pinned in tests/test_drop_in.py) with q, k and v projected by one GEMM."""

    @takes_installed_cache_kwarg
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        projections = (self.query, self.key, self.value)
        query_layer, key_layer, value_layer = (
            t.transpose(1, 2) for t in qkv_projection(self, hidden_states, projections, self.attention_head_size)
        )
        if cache is not None:
            current_cache = cache.self_attention_cache if isinstance(cache, hf.EncoderDecoderCache) else cache
            key_layer, value_layer = current_cache.update(key_layer, value_layer, self.layer_idx, kwargs=kwargs)
        return registry_attention(
            self,
            hf.eager_attention_forward,
            hidden_states.shape[:-1],
            query_layer,
            key_layer,
            value_layer,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout.p,
            **kwargs,
        )


class _DenseDropoutAddLayerNorm:
    """``LayerNorm(dropout(dense(h)) + input_tensor)`` with the add fused into the norm."""

    def forward(self, hidden_states, input_tensor):
        if not unobserved(self.LayerNorm):
            return super().forward(hidden_states, input_tensor)
        hidden_states = self.dropout(self.dense(hidden_states))
        norm = self.LayerNorm
        return ops.add_layer_norm(hidden_states, input_tensor, norm.weight, norm.bias, eps=norm.eps)


class FusedData2VecTextSelfOutput(_DenseDropoutAddLayerNorm, hf.Data2VecTextSelfOutput):
    """Attention output projection, residual add and LayerNorm."""


class FusedData2VecTextOutput(_DenseDropoutAddLayerNorm, hf.Data2VecTextOutput):
    """Feed-forward output projection, residual add and LayerNorm."""


class FusedData2VecTextLayer(hf.Data2VecTextLayer):
    """The encoder layer as one function of its parameters (``_lean_forward``) where that is
    exactly transformers' layer on our attention (see ``_lean``), else transformers' forward (on
    the fused submodules): a decoder or a cache, attentions asked for, another attention
    implementation, chunked feed-forward, unexpected keyword arguments, replaced submodules, or
    hooks on them."""

    _LEAN_PATHS = (
        ("attention", hf.Data2VecTextAttention),
        ("attention.self", FusedData2VecTextSelfAttention),
        ("attention.output", FusedData2VecTextSelfOutput),
        ("attention.output.dense", nn.Linear),
        ("attention.output.dropout", nn.Dropout),
        ("attention.output.LayerNorm", nn.LayerNorm),
        ("intermediate", hf.Data2VecTextIntermediate),
        ("intermediate.dense", nn.Linear),
        ("intermediate.intermediate_act_fn", None),
        ("output", FusedData2VecTextOutput),
        ("output.dense", nn.Linear),
        ("output.dropout", nn.Dropout),
        ("output.LayerNorm", nn.LayerNorm),
    )

    @takes_installed_cache_kwarg
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache=None,
        **kwargs,
    ):
        if cache is None and not self.is_decoder and not self.chunk_size_feed_forward:
            modules = registry_lean_modules(self, self._LEAN_PATHS, 1, kwargs)
            if modules is not None:
                return self._lean_forward(hidden_states, attention_mask, modules)
        return super().forward(
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            **{CACHE_KWARG: cache},
            **kwargs,
        )

    def _lean_forward(self, hidden_states, attention_mask, modules):
        _, s, _, dense, drop, norm, _, intermediate_dense, activation, _, output_dense, output_drop, output_norm = (
            modules
        )
        # also unrecorded in training: a reentrant checkpoint's first pass draws the dropouts as its
        # recomputation does
        if torch.is_grad_enabled() or self.training:
            output = self._training_forward(hidden_states, attention_mask, modules)
            if output is not None:
                return output
        context = lean_attention(
            s,
            hidden_states,
            (s.query, s.key, s.value),
            s.attention_head_size,
            attention_mask,
            dropout=s.dropout.p if s.training else 0.0,
            scale=s.scaling,
            is_causal=s.is_causal,
        )
        attention_output = add_layer_norm(dropout(linear(context, dense), drop), hidden_states, norm)
        intermediate = activation_call(activation, linear(attention_output, intermediate_dense))
        return add_layer_norm(dropout(linear(intermediate, output_dense), output_drop), attention_output, output_norm)

    def _training_forward(self, hidden_states, attention_mask, modules):
        """The layer as one autograd node (``ops.post_ln_layer_op``), or None where that does not
        apply: a 4-D mask, a causal layer, two hidden dropouts that differ, an activation other
        than GELU, or what the op itself declines."""
        _, s, _, dense, drop, norm, _, intermediate_dense, activation, _, output_dense, output_drop, output_norm = (
            modules
        )
        options = training_node_options(drop, output_drop, activation)
        if options is None or s.is_causal or (attention_mask is not None and attention_mask.dim() != 2):
            return None
        hidden_dropout, approximate = options
        key_padding_mask = None if attention_mask is None else attention_mask[:, -hidden_states.shape[1] :]
        params = weights_and_biases(s.query, s.key, s.value, dense, norm, intermediate_dense, output_dense, output_norm)
        return post_ln_layer_training(
            hidden_states, key_padding_mask, params, heads=s.num_attention_heads,
            attention_dropout=float(s.dropout.p) if s.training else 0.0, hidden_dropout=hidden_dropout,
            scale=float(s.scaling), eps=(norm.eps, output_norm.eps), approximate=approximate,
        )  # fmt: skip


class FusedData2VecTextEncoder(hf.Data2VecTextEncoder):
    """transformers' encoder; in training its layer nodes' dropout seeds are drawn once a forward."""

    forward = seeds_drawn_once(hf.Data2VecTextEncoder.forward, "layer")


REPLACEMENTS = {
    hf.Data2VecTextEncoder: FusedData2VecTextEncoder,
    hf.Data2VecTextLayer: FusedData2VecTextLayer,
    hf.Data2VecTextSelfOutput: FusedData2VecTextSelfOutput,
    hf.Data2VecTextOutput: FusedData2VecTextOutput,
    hf.Data2VecTextSelfAttention: FusedData2VecTextSelfAttention,
}
