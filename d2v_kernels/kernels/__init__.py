"""Triton kernels and their launchers, one file per op. No torch.nn and no dispatch here.

Every kernel module lists, in ``aot_variants()``, each configuration its launcher can pick
(signature, constexprs, warps, stages) as :class:`d2v_kernels.kernels.aot.AotVariant`, so CI
compiles all of them for sm_80 and sm_90 without a GPU (``python -m d2v_kernels.kernels.aot``).
"""

KERNEL_MODULES = ("layer_norm_gelu", "add_layer_norm", "attention", "pos_conv", "conv_feature_extractor")
