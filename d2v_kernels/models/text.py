"""Drop-in fused modules for Data2VecText: self-attention with one GEMM for q, k and v, and the
residual add + LayerNorm after attention and after the feed-forward. Attention runs through
transformers' AttentionInterface, by default its ``d2v_kernels`` entry (see ``hf_attention``),
causal and cached generation included."""

from __future__ import annotations

from transformers.models.data2vec import modeling_data2vec_text as hf
from transformers.utils.deprecation import deprecate_kwarg

from d2v_kernels import ops
from d2v_kernels.models._common import qkv_projection, registry_attention


class FusedData2VecTextSelfAttention(hf.Data2VecTextSelfAttention):
    """transformers' forward (pinned in tests/test_drop_in.py) with q, k and v projected by one GEMM."""

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        hidden_states = self.dropout(self.dense(hidden_states))
        norm = self.LayerNorm
        return ops.add_layer_norm(hidden_states, input_tensor, norm.weight, norm.bias, eps=norm.eps)


class FusedData2VecTextSelfOutput(_DenseDropoutAddLayerNorm, hf.Data2VecTextSelfOutput):
    """Attention output projection, residual add and LayerNorm."""


class FusedData2VecTextOutput(_DenseDropoutAddLayerNorm, hf.Data2VecTextOutput):
    """Feed-forward output projection, residual add and LayerNorm."""


REPLACEMENTS = {
    hf.Data2VecTextSelfOutput: FusedData2VecTextSelfOutput,
    hf.Data2VecTextOutput: FusedData2VecTextOutput,
    hf.Data2VecTextSelfAttention: FusedData2VecTextSelfAttention,
}
