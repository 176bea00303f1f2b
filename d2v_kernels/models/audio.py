"""Drop-in fused modules for Data2VecAudio: feature encoder, its conv layers, positional conv
embedding, encoder layers (residual add + LayerNorm) and self-attention (one GEMM for q, k, v).
Attention runs through transformers' AttentionInterface, by default its ``d2v_kernels`` entry
(see ``hf_attention``)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers.models.data2vec import modeling_data2vec_audio as hf

from d2v_kernels import ops
from d2v_kernels.models._common import gelu_approximation, qkv_projection, registry_attention


class FusedData2VecAudioConvLayer(hf.Data2VecAudioConvLayer):
    """Conv1d then fused LayerNorm + GELU read channels-first in place (no transposes)."""

    def forward(self, hidden_states):
        approximate = gelu_approximation(self.activation)
        if approximate is None:
            return super().forward(hidden_states)
        hidden_states = self.conv(hidden_states)
        return ops.layer_norm_gelu(
            hidden_states,
            self.layer_norm.weight,
            self.layer_norm.bias,
            eps=self.layer_norm.eps,
            channels_dim=1,
            approximate=approximate,
        )


class FusedData2VecAudioFeatureEncoder(hf.Data2VecAudioFeatureEncoder):
    """The whole conv stack as one ``ops.conv_feature_extractor`` call (channels-last inside);
    returns the (B, C, T) view transformers returns."""

    def _op_arguments(self) -> dict | None:
        """``ops.conv_feature_extractor``'s parameters and options for these layers, or None when a
        layer is not what the op computes (padding, dilation, groups, another activation, per-layer
        eps). Read on every call, in one pass (module attribute reads are host time)."""
        conv_weights, ln_weights, ln_biases, conv_biases, strides, eps = [], [], [], [], [], set()
        for layer in self.conv_layers:
            conv, norm = layer.conv, layer.layer_norm
            if (
                gelu_approximation(layer.activation) != "none"
                or conv.padding != (0,)
                or conv.dilation != (1,)
                or conv.groups != 1
            ):
                return None
            conv_weights.append(conv.weight)
            conv_biases.append(conv.bias)
            ln_weights.append(norm.weight)
            ln_biases.append(norm.bias)
            strides.append(conv.stride[0])
            eps.add(norm.eps)
        if len(eps) != 1:
            return None
        return dict(
            conv_weights=conv_weights,
            ln_weights=ln_weights,
            ln_biases=ln_biases,
            conv_biases=conv_biases if conv_biases[0] is not None else None,
            strides=strides,
            eps=eps.pop(),
        )

    def forward(self, input_values):
        arguments = self._op_arguments()
        if arguments is None:
            return super().forward(input_values)
        # transformers marks the input as requiring grad for reentrant checkpointing of its conv
        # layers; the fused op is checkpointed non-reentrantly, which needs no such input.
        options = {name: arguments.pop(name) for name in ("strides", "eps")}

        def run(wave, conv_weights, ln_weights, ln_biases, conv_biases):
            return ops.conv_feature_extractor(
                wave, conv_weights, ln_weights, ln_biases, conv_biases=conv_biases, **options
            )

        layers = self.conv_layers
        checkpointing = self.training and any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
        if checkpointing and torch.is_grad_enabled():
            features = checkpoint(run, input_values, *arguments.values(), use_reentrant=False)
        else:
            features = run(input_values, *arguments.values())
        return features.transpose(1, 2)


class FusedData2VecAudioPositionalConvEmbedding(hf.Data2VecAudioPositionalConvEmbedding):
    """All positional conv layers through ``ops.pos_conv`` on the channels-last hidden states."""

    def _op_arguments(self) -> dict | None:
        """``ops.pos_conv``'s weights, biases and options for these layers, or None when a layer is
        not what the op computes (stride, dilation, padding other than "same", an affine
        LayerNorm, another activation, per-layer groups or eps). One pass over the layers, on every call."""
        weights, biases, eps, groups = [], [], set(), self.layers[0].conv.groups
        for layer in self.layers:
            conv, norm = layer.conv, layer.layer_norm
            kernel_size = conv.kernel_size[0]
            if (
                gelu_approximation(layer.activation) != "none"
                or conv.groups != groups
                or norm.weight is not None
                or conv.dilation != (1,)
                or conv.stride != (1,)
                or conv.padding != (kernel_size // 2,)
                or layer.padding.num_pad_remove != (1 if kernel_size % 2 == 0 else 0)
            ):
                return None
            weights.append(conv.weight)
            biases.append(conv.bias)
            eps.add(norm.eps)
        if len(eps) != 1:
            return None
        return dict(weights=weights, biases=biases, groups=groups, eps=eps.pop())

    def forward(self, hidden_states):
        arguments = self._op_arguments()
        if arguments is None:
            return super().forward(hidden_states)
        return ops.pos_conv(hidden_states, **arguments)


class FusedData2VecAudioAttention(hf.Data2VecAudioAttention):
    """transformers' forward (pinned in tests/test_drop_in.py) with q, k and v projected by one
    GEMM; cross-attention (``key_value_states``) runs transformers' own."""

    def forward(self, hidden_states, key_value_states=None, attention_mask=None, output_attentions=False, **kwargs):
        if key_value_states is not None:
            return super().forward(hidden_states, key_value_states, attention_mask, output_attentions, **kwargs)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        query, key, value = (t.transpose(1, 2) for t in qkv_projection(self, hidden_states, projections, self.head_dim))
        attn_output, attn_weights = registry_attention(
            self,
            hf.eager_attention_forward,
            hidden_states.shape[:-1],
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            output_attentions=output_attentions,
            **kwargs,
        )
        return self.out_proj(attn_output), attn_weights


class FusedData2VecAudioEncoderLayer(hf.Data2VecAudioEncoderLayer):
    """Post-LN encoder layer with both residual adds fused into their LayerNorms."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attn_residual = hidden_states
        hidden_states, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states)
        norm = self.layer_norm
        hidden_states = ops.add_layer_norm(hidden_states, attn_residual, norm.weight, norm.bias, eps=norm.eps)
        norm = self.final_layer_norm
        return ops.add_layer_norm(self.feed_forward(hidden_states), hidden_states, norm.weight, norm.bias, eps=norm.eps)


REPLACEMENTS = {
    hf.Data2VecAudioConvLayer: FusedData2VecAudioConvLayer,
    hf.Data2VecAudioFeatureEncoder: FusedData2VecAudioFeatureEncoder,
    hf.Data2VecAudioPositionalConvEmbedding: FusedData2VecAudioPositionalConvEmbedding,
    hf.Data2VecAudioEncoderLayer: FusedData2VecAudioEncoderLayer,
    hf.Data2VecAudioAttention: FusedData2VecAudioAttention,
}
