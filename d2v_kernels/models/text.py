"""Drop-in fused modules for Data2VecText: the residual add + LayerNorm after attention and
after the feed-forward. Attention runs through the ``d2v_kernels`` entry of transformers'
AttentionInterface (see ``hf_attention``), causal and cached generation included."""

from __future__ import annotations

from transformers.models.data2vec import modeling_data2vec_text as hf

from d2v_kernels import ops


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
}
ATTENTION_CLASSES = (hf.Data2VecTextSelfAttention, hf.Data2VecTextCrossAttention)
