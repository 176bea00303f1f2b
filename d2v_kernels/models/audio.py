"""Drop-in fused modules for Data2VecAudio: feature encoder, its conv layers, positional conv
embedding, encoder layers (residual add + LayerNorm) and self-attention (one GEMM for q, k, v).
Attention runs through transformers' AttentionInterface, by default its ``d2v_kernels`` entry
(see ``hf_attention``)."""

from __future__ import annotations

import functools
import inspect
import linecache
import textwrap

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.data2vec import modeling_data2vec_audio as hf

from d2v_kernels import ops
from d2v_kernels.models._common import gelu_approximation, qkv_projection, registry_attention, seeds_drawn_once
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
    """Post-LN encoder layer with both residual adds fused into their LayerNorms; the whole layer
    as one function of its parameters (``_lean_forward``) where that is exactly transformers'
    layer on our attention (see ``_lean``), else transformers' structure (on the fused
    submodules): attentions asked for, another attention implementation, unexpected keyword
    arguments, replaced submodules, or hooks on them (on a LayerNorm: transformers' forward)."""

    _LEAN_PATHS = (
        ("attention", FusedData2VecAudioAttention),
        ("attention.out_proj", nn.Linear),
        ("dropout", nn.Dropout),
        ("layer_norm", nn.LayerNorm),
        ("feed_forward", hf.Data2VecAudioFeedForward),
        ("feed_forward.intermediate_dense", nn.Linear),
        ("feed_forward.intermediate_act_fn", None),
        ("feed_forward.intermediate_dropout", nn.Dropout),
        ("feed_forward.output_dense", nn.Linear),
        ("feed_forward.output_dropout", nn.Dropout),
        ("final_layer_norm", nn.LayerNorm),
    )

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        modules = registry_lean_modules(self, self._LEAN_PATHS, 0, kwargs)
        if modules is not None:
            return self._lean_forward(hidden_states, attention_mask, modules)
        if not unobserved(self.layer_norm, self.final_layer_norm):
            return super().forward(hidden_states, attention_mask, **kwargs)
        attn_residual = hidden_states
        hidden_states, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = add_layer_norm(self.dropout(hidden_states), attn_residual, self.layer_norm)
        return add_layer_norm(self.feed_forward(hidden_states), hidden_states, self.final_layer_norm)

    def _lean_forward(self, hidden_states, attention_mask, modules):
        (
            a,
            out_proj,
            drop,
            norm,
            _,
            intermediate_dense,
            activation,
            intermediate_drop,
            output_dense,
            output_drop,
            final_norm,
        ) = modules
        # also unrecorded in training: a reentrant checkpoint's first pass draws the dropouts as its
        # recomputation does
        if torch.is_grad_enabled() or self.training:
            output = self._training_forward(hidden_states, attention_mask, modules)
            if output is not None:
                return output
        context = lean_attention(
            a,
            hidden_states,
            (a.q_proj, a.k_proj, a.v_proj),
            a.head_dim,
            attention_mask,
            dropout=a.dropout if a.training else 0.0,
            scale=a.scaling,
            is_causal=a.is_causal,
        )
        hidden_states = add_layer_norm(dropout(linear(context, out_proj), drop), hidden_states, norm)
        ff = activation_call(activation, linear(hidden_states, intermediate_dense))
        ff = dropout(linear(dropout(ff, intermediate_drop), output_dense), output_drop)
        return add_layer_norm(ff, hidden_states, final_norm)

    def _training_forward(self, hidden_states, attention_mask, modules):
        """The layer as one autograd node (``ops.post_ln_layer_op``), or None where that does not
        apply: a 4-D mask, a causal layer, two hidden dropouts that differ, an activation other
        than GELU, or what the op itself declines."""
        (a, out_proj, drop, norm, _, intermediate_dense, activation, intermediate_drop, output_dense, output_drop,
         final_norm) = modules  # fmt: skip
        options = training_node_options(drop, output_drop, activation)
        if options is None or a.is_causal or (attention_mask is not None and attention_mask.dim() != 2):
            return None
        hidden_dropout, approximate = options
        key_padding_mask = None if attention_mask is None else attention_mask[:, -hidden_states.shape[1] :]
        params = weights_and_biases(
            a.q_proj, a.k_proj, a.v_proj, out_proj, norm, intermediate_dense, output_dense, final_norm
        )
        return post_ln_layer_training(
            hidden_states, key_padding_mask, params, heads=a.num_heads,
            attention_dropout=float(a.dropout) if a.training else 0.0, hidden_dropout=hidden_dropout,
            activation_dropout=float(intermediate_drop.p) if intermediate_drop.training else 0.0,
            scale=float(a.scaling), eps=(norm.eps, final_norm.eps), approximate=approximate,
        )  # fmt: skip


# transformers' encoder zeroes padded frames by indexing with the mask, which counts the mask's
# True elements inside the kernel: a device sync in every padded forward. The same zeros written by
# masked_fill_ where the mask is boolean (the model's own is); any other mask keeps the indexing.
_SYNCING_LINES = (
    "expand_attention_mask = attention_mask.unsqueeze(-1).repeat(1, 1, hidden_states.shape[2])",
    "hidden_states[~expand_attention_mask] = 0",
)
_SYNC_FREE_LINES = (
    "if attention_mask.dtype == torch.bool:",
    "    hidden_states.masked_fill_(~attention_mask.unsqueeze(-1), 0)",
    "else:",
    *(f"    {line}" for line in _SYNCING_LINES),
)


def sync_free_encoder_forward(forward):
    """transformers' ``Data2VecAudioEncoder.forward`` compiled again from its own source (in its
    module's namespace) with :data:`_SYNCING_LINES` replaced, so the installed transformers' forward
    runs, whatever its version, less the sync; ``forward`` itself (the sync kept) where its source
    cannot be read or does not hold those lines."""
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError):
        return forward
    lines = source.splitlines()
    for i in range(len(lines) - 1):
        if tuple(line.strip() for line in lines[i : i + 2]) == _SYNCING_LINES:
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            lines[i : i + 2] = [indent + line for line in _SYNC_FREE_LINES]
            break
    else:
        return forward
    namespace: dict = {}
    filename = f"<d2v_kernels: {forward.__qualname__} of {inspect.getsourcefile(forward)}, without its sync>"
    source = "\n".join(lines) + "\n"
    # Tracebacks, debuggers and torch.compile's graph-break reports show the lines of the rebuilt forward.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), forward.__globals__, namespace)
    return functools.wraps(forward)(namespace[forward.__name__])


class FusedData2VecAudioEncoder(hf.Data2VecAudioEncoder):
    """transformers' encoder without its device sync on a padding mask
    (:func:`sync_free_encoder_forward`); in training its layer nodes' dropout seeds are drawn once
    a forward."""

    forward = seeds_drawn_once(sync_free_encoder_forward(hf.Data2VecAudioEncoder.forward), "layers")


REPLACEMENTS = {
    hf.Data2VecAudioEncoder: FusedData2VecAudioEncoder,
    hf.Data2VecAudioConvLayer: FusedData2VecAudioConvLayer,
    hf.Data2VecAudioFeatureEncoder: FusedData2VecAudioFeatureEncoder,
    hf.Data2VecAudioPositionalConvEmbedding: FusedData2VecAudioPositionalConvEmbedding,
    hf.Data2VecAudioEncoderLayer: FusedData2VecAudioEncoderLayer,
    hf.Data2VecAudioAttention: FusedData2VecAudioAttention,
}
