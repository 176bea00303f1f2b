"""Run by tests/test_conv_feature_extractor.py under compute-sanitizer (GPU only): the CUDA feature
extractor's kernels, forward, on odd lengths, every dtype, the base config (tensor-core path for
fp16/bf16, SIMT for fp32) and a config with channel counts that fill no tile (conv bias too)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_conv_feature_extractor import BASE, make_params, split

import d2v_kernels
from d2v_kernels import ops

UNALIGNED = dict(conv_dim=(20, 36, 7), conv_kernel=(7, 3, 4), conv_stride=(3, 3, 1))

for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for config, conv_bias, shape in ((BASE, False, (2, 16001)), (UNALIGNED, True, (3, 3001))):
        params = make_params(**config, device="cuda", dtype=dtype, conv_bias=conv_bias)
        args, kwargs = split(params)
        wave = torch.randn(*shape, device="cuda", dtype=dtype)
        with d2v_kernels.use_backend(conv_feature_extractor="cuda"):
            out = ops.conv_feature_extractor(wave, *args, **kwargs)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), (dtype, config)
print("sanitized run done")
