"""The fused ops. Each dispatches per call to triton / cuda / eager (see ``d2v_kernels.dispatch``)."""

from d2v_kernels.ops.accumulate_target_op import accumulate_target, accumulate_target_reference
from d2v_kernels.ops.add_layer_norm_op import add_layer_norm, add_layer_norm_reference
from d2v_kernels.ops.attention_op import attention, attention_reference
from d2v_kernels.ops.conv_feature_extractor_op import conv_feature_extractor, conv_feature_extractor_reference
from d2v_kernels.ops.layer_norm_gelu_op import layer_norm_gelu, layer_norm_gelu_reference
from d2v_kernels.ops.pos_conv_op import pos_conv, pos_conv_reference

__all__ = [
    "accumulate_target",
    "accumulate_target_reference",
    "add_layer_norm",
    "add_layer_norm_reference",
    "attention",
    "attention_reference",
    "conv_feature_extractor",
    "conv_feature_extractor_reference",
    "layer_norm_gelu",
    "layer_norm_gelu_reference",
    "pos_conv",
    "pos_conv_reference",
]
