"""Drop-in fused modules for Data2VecVision: self-attention (one GEMM for q, k, v) with the
relative position bias gathered in-kernel from its table, the layer with the first residual add
fused into ``layernorm_after``, and the encoder's shared bias passed down as its table (not a
dense bias)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.data2vec import modeling_data2vec_vision as hf

from d2v_kernels import dispatch, ops
from d2v_kernels.models._common import qkv_projection, seeds_drawn_once, swap_class
from d2v_kernels.models._lean import (
    activation_call,
    add_layer_norm,
    dropout,
    lean_modules,
    linear,
    training_node_options,
    unobserved,
    weights_and_biases,
)
from d2v_kernels.ops.attention_op import gather_relative_bias
from d2v_kernels.ops.pre_ln_layer_op import pre_ln_layer_training


@dataclasses.dataclass
class TableBias:
    """A relative position bias kept as (table, index) instead of a dense (1, H, N, N) tensor."""

    table: torch.Tensor  # (num_relative_distances, H)
    index: torch.Tensor  # (N, N) int

    def dense(self) -> torch.Tensor:
        return gather_relative_bias(self.table, self.index)


def relative_position_index(module: hf.Data2VecVisionRelativePositionBias, window_size, device) -> torch.Tensor:
    """The (N, N) int32 index of a window, cached on the module per (window, device) by eager calls.

    A compiled forward reads the cache but never writes it (torch 2.11's dynamo cannot trace the
    module-dict mutation): on a miss it builds the index in the graph. ``optimize()`` fills the
    cache for the table's device, so a model compiled where it was optimized hits it.

    transformers' index depends on the window alone: its modules share one tensor per (window,
    device), so what the kernels derive from an index once (the table gradient's segments, the
    range check) serves every layer."""
    key = (tuple(window_size), device)
    cache = module.__dict__.get("_d2v_index_cache")
    if cache is not None and key in cache:
        return cache[key]
    if torch.compiler.is_compiling():
        return module.generate_relative_position_index(tuple(window_size)).to(device=device, dtype=torch.int32)
    shared = (
        type(module).generate_relative_position_index
        is hf.Data2VecVisionRelativePositionBias.generate_relative_position_index
    )
    index = _SHARED_INDICES.get(key) if shared else None
    if index is None:
        index = module.generate_relative_position_index(tuple(window_size)).to(device=device, dtype=torch.int32)
        if shared:
            if len(_SHARED_INDICES) >= 16:
                _SHARED_INDICES.clear()
            _SHARED_INDICES[key] = index
    module.__dict__.setdefault("_d2v_index_cache", {})[key] = index
    return index


_SHARED_INDICES: dict[tuple, torch.Tensor] = {}


def _table_and_index(module: hf.Data2VecVisionRelativePositionBias, window_size, interpolate, dim_size):
    """(TableBias, None) when the stored table with the window's index is exact, else (None, dense)."""
    window_size = tuple(int(w) for w in window_size)
    table = module.relative_position_bias_table
    if window_size == tuple(module.window_size) and not interpolate:
        return TableBias(table, relative_position_index(module, window_size, table.device)), None
    dense = hf.Data2VecVisionRelativePositionBias.forward(module, window_size, interpolate, dim_size=dim_size)
    return None, dense


class FusedData2VecVisionSelfAttention(hf.Data2VecVisionSelfAttention):
    """BEiT-style self-attention through ``ops.attention`` with the bias table gathered in-kernel.

    ``output_attentions=True`` needs the probabilities: that call runs the eager module.
    """

    def forward(
        self,
        hidden_states,
        output_attentions=False,
        relative_position_bias=None,
        interpolate_pos_encoding=False,
        resolution=None,
    ):
        if isinstance(relative_position_bias, TableBias) and output_attentions:
            relative_position_bias = relative_position_bias.dense()
        if output_attentions:
            dispatch.record("attention", "eager")
            return hf.Data2VecVisionSelfAttention.forward(
                self, hidden_states, True, relative_position_bias, interpolate_pos_encoding, resolution
            )
        return (self._context(hidden_states, relative_position_bias, interpolate_pos_encoding, resolution),)

    def _context(self, hidden_states, relative_position_bias, interpolate_pos_encoding, resolution):
        """The attention's output (B, N, H * d) through ``ops.attention``, attentions not asked for."""
        length = hidden_states.shape[1]
        biases = self._bias(relative_position_bias, interpolate_pos_encoding, resolution, length)
        return self._attend(hidden_states, biases)

    def _attend(self, hidden_states, biases):
        """:meth:`_context` with the biases :meth:`_bias` gave."""
        batch, length, _ = hidden_states.shape
        projections = (self.query, self.key, self.value)
        query, key, value = qkv_projection(self, hidden_states, projections, self.attention_head_size)
        table_bias, dense_bias = biases
        context = ops.attention(
            query,
            key,
            value,
            bias_table=None if table_bias is None else table_bias.table,
            bias_index=None if table_bias is None else table_bias.index,
            bias=dense_bias,
            dropout_p=self.config.attention_probs_dropout_prob if self.training else 0.0,
            scale=1.0 / math.sqrt(self.attention_head_size),
        )
        return context.reshape(batch, length, self.all_head_size)

    def _bias(self, relative_position_bias, interpolate_pos_encoding, resolution, length):
        """(TableBias or None, dense bias or None): this module's relative position bias and the
        encoder's shared one (``relative_position_bias``), as one table where both are exact
        tables of one index, else summed densely."""
        table_bias, dense_bias = None, None
        if self.has_relative_position_bias:
            height, width = resolution
            window = (height // self.config.patch_size, width // self.config.patch_size)
            table_bias, dense_bias = _table_and_index(
                self.relative_position_bias, window, interpolate_pos_encoding, length
            )
        if isinstance(relative_position_bias, TableBias):
            if table_bias is None and dense_bias is None:
                table_bias = relative_position_bias
            elif table_bias is not None and table_bias.index is relative_position_bias.index:
                table_bias = TableBias(table_bias.table + relative_position_bias.table, table_bias.index)
            else:
                shared = relative_position_bias.dense()
                dense_bias = shared if dense_bias is None else dense_bias + shared
        elif relative_position_bias is not None:
            dense_bias = relative_position_bias if dense_bias is None else dense_bias + relative_position_bias
        return table_bias, dense_bias


class FusedData2VecVisionLayer(hf.Data2VecVisionLayer):
    """Pre-LN layer; the first residual add is fused into ``layernorm_after`` (which needs the sum
    back), with the layer scale ``lambda_1`` where drop path passes its input through (lean path).
    The whole layer is one function of its parameters (``_lean_forward``) where that is
    exactly transformers' layer on our attention (see ``_lean``), else transformers' structure
    (on the fused submodules): attentions asked for, transformers' attention, replaced submodules,
    or hooks on them (on ``layernorm_after``: transformers' forward). With autograd recording, the
    lean layer is one autograd node where it runs the Triton kernels (``_training_forward``)."""

    _LEAN_PATHS = (
        ("layernorm_before", nn.LayerNorm),
        ("attention", hf.Data2VecVisionAttention),
        ("attention.attention", FusedData2VecVisionSelfAttention),
        ("attention.output", hf.Data2VecVisionSelfOutput),
        ("attention.output.dense", nn.Linear),
        ("attention.output.dropout", nn.Dropout),
        ("drop_path", (nn.Identity, hf.Data2VecVisionDropPath)),
        ("layernorm_after", nn.LayerNorm),
        ("intermediate", hf.Data2VecVisionIntermediate),
        ("intermediate.dense", nn.Linear),
        ("intermediate.intermediate_act_fn", None),
        ("output", hf.Data2VecVisionOutput),
        ("output.dense", nn.Linear),
        ("output.dropout", nn.Dropout),
    )

    def forward(
        self,
        hidden_states,
        output_attentions=False,
        relative_position_bias=None,
        interpolate_pos_encoding=False,
        resolution=None,
    ):
        modules = None if output_attentions else lean_modules(self, self._LEAN_PATHS)
        if modules is not None:
            bias = (relative_position_bias, interpolate_pos_encoding, resolution)
            return (self._lean_forward(hidden_states, bias, modules),)
        if not unobserved(self.layernorm_after):
            return super().forward(
                hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution
            )
        self_attention_outputs = self.attention(
            self.layernorm_before(hidden_states),
            output_attentions=output_attentions,
            relative_position_bias=relative_position_bias,
            interpolate_pos_encoding=interpolate_pos_encoding,
            resolution=resolution,
        )
        attention_output = self_attention_outputs[0]
        outputs = self_attention_outputs[1:]
        if self.lambda_1 is not None:
            attention_output = self.lambda_1 * attention_output
        layer_output, hidden_states = add_layer_norm(
            self.drop_path(attention_output), hidden_states, self.layernorm_after, return_sum=True
        )
        layer_output = self.output(self.intermediate(layer_output))
        if self.lambda_2 is not None:
            layer_output = self.lambda_2 * layer_output
        layer_output = self.drop_path(layer_output) + hidden_states
        return (layer_output, *outputs)

    def _lean_forward(self, hidden_states, bias, modules):
        (
            norm,
            _,
            self_attention,
            _,
            dense,
            drop,
            drop_path,
            norm_after,
            _,
            intermediate_dense,
            activation,
            _,
            output_dense,
            output_drop,
        ) = modules
        biases = self_attention._bias(*bias, hidden_states.shape[1])
        # also unrecorded in training: a reentrant checkpoint's first pass draws the dropouts as its
        # recomputation does
        if torch.is_grad_enabled() or self.training:
            output = self._training_forward(hidden_states, biases, modules)
            if output is not None:
                return output
        parameters = norm._parameters
        normed = F.layer_norm(hidden_states, norm.normalized_shape, parameters["weight"], parameters["bias"], norm.eps)
        attention_output = dropout(linear(self_attention._attend(normed, biases), dense), drop)
        parameters = self._parameters
        lambda_1, lambda_2 = parameters.get("lambda_1"), parameters.get("lambda_2")
        # Where drop path leaves its input as it is, the layer scales fold into the ops around them:
        # lambda_1 into layernorm_after's add (its gradient reduced in the kernel), lambda_2 and the
        # residual add into one addcmul. The add before the next layer's layernorm_before crosses
        # the layer's boundary (transformers' encoder loop holds the sum): not folded.
        passes_through = type(drop_path) is nn.Identity or drop_path.drop_prob == 0.0 or not drop_path.training
        if lambda_1 is not None and passes_through:
            layer_output, hidden_states = add_layer_norm(
                attention_output, hidden_states, norm_after, return_sum=True, x_scale=lambda_1
            )
        else:
            if lambda_1 is not None:
                attention_output = lambda_1 * attention_output
            layer_output, hidden_states = add_layer_norm(
                drop_path.forward(attention_output), hidden_states, norm_after, return_sum=True
            )
        layer_output = activation_call(activation, linear(layer_output, intermediate_dense))
        layer_output = dropout(linear(layer_output, output_dense), output_drop)
        if lambda_2 is not None and passes_through:
            return torch.addcmul(hidden_states, lambda_2, layer_output)
        if lambda_2 is not None:
            layer_output = lambda_2 * layer_output
        return drop_path.forward(layer_output) + hidden_states

    def _training_forward(self, hidden_states, biases, modules):
        """The layer as one autograd node (``ops.pre_ln_layer_op``), or None where that does not
        apply: a dense bias (interpolated, or two tables of different indices), two hidden dropouts
        that differ, an activation other than GELU, or what the op itself declines."""
        (norm, _, s, _, dense, drop, drop_path, norm_after, _, intermediate_dense, activation, _, output_dense,
         output_drop) = modules  # fmt: skip
        table_bias, dense_bias = biases
        if dense_bias is not None:
            return None
        options = training_node_options(drop, output_drop, activation)
        if options is None:
            return None
        hidden_dropout, approximate = options
        active = type(drop_path) is not nn.Identity and drop_path.training
        params = weights_and_biases(norm, s.query, s.key, s.value, dense, norm_after, intermediate_dense, output_dense)
        parameters = self._parameters
        params += (parameters.get("lambda_1"), parameters.get("lambda_2"))
        return pre_ln_layer_training(
            hidden_states, None if table_bias is None else table_bias.table,
            None if table_bias is None else table_bias.index, params, heads=s.num_attention_heads,
            attention_dropout=float(s.config.attention_probs_dropout_prob) if s.training else 0.0,
            hidden_dropout=hidden_dropout, drop_path=float(drop_path.drop_prob) if active else 0.0,
            scale=1.0 / math.sqrt(s.attention_head_size), eps=(norm.eps, norm_after.eps), approximate=approximate,
        )  # fmt: skip


class FusedData2VecVisionRelativePositionBias(hf.Data2VecVisionRelativePositionBias):
    """The encoder's shared bias as (table, index) when that is exact, else transformers' dense one."""

    def forward(self, window_size, interpolate_pos_encoding=False, dim_size=None):
        table_bias, dense_bias = _table_and_index(self, window_size, interpolate_pos_encoding, dim_size)
        return table_bias if table_bias is not None else dense_bias


class FusedData2VecVisionEncoder(hf.Data2VecVisionEncoder):
    """transformers' encoder, passing its shared relative position bias down as (table, index); in
    training its layer nodes' attention dropout seeds are drawn once a forward."""

    forward = seeds_drawn_once(hf.Data2VecVisionEncoder.forward, "layer")

    def _d2v_setup(self):
        bias = self._modules.get("relative_position_bias")
        if type(bias) is hf.Data2VecVisionRelativePositionBias:
            self._modules["relative_position_bias"] = swap_class(bias, FusedData2VecVisionRelativePositionBias)


REPLACEMENTS = {
    hf.Data2VecVisionLayer: FusedData2VecVisionLayer,
}
# Swapped only where attention is to run d2v_kernels (not where eager or sdpa was asked for).
ATTENTION_REPLACEMENTS = {
    hf.Data2VecVisionSelfAttention: FusedData2VecVisionSelfAttention,
    hf.Data2VecVisionSdpaSelfAttention: FusedData2VecVisionSelfAttention,
    hf.Data2VecVisionEncoder: FusedData2VecVisionEncoder,
}
