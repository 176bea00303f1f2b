"""Run by tests/test_conv_feature_extractor.py under compute-sanitizer (GPU only): the CUDA feature
extractor's kernels, forward and backward (the training forward, the CUTLASS GEMMs of every kind,
the LayerNorm + GELU row kernels), on odd lengths, every dtype: the base config, a config whose
input gradients take the residue GEMMs (conv bias too), and in fp32 (SIMT GEMMs) channel counts
that fill no tile."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_conv_feature_extractor import BASE, RESIDUES, UNALIGNED, all_tensors, make_params, split

import d2v_kernels
from d2v_kernels import ops

for dtype in (torch.float16, torch.bfloat16, torch.float32):
    configs = [(BASE, False, (2, 16001)), (RESIDUES, True, (3, 3001))]
    if dtype == torch.float32:
        configs.append((UNALIGNED, True, (3, 3001)))
    for config, conv_bias, shape in configs:
        params = make_params(**config, device="cuda", dtype=dtype, conv_bias=conv_bias)
        args, kwargs = split(params)
        wave = torch.randn(*shape, device="cuda", dtype=dtype)
        leaves = all_tensors(wave, params)[1:]  # not the waveform: its gradient is a torch GEMM (cuBLAS)
        for t in leaves:
            t.requires_grad_(True)
        with d2v_kernels.use_backend(conv_feature_extractor="cuda"), d2v_kernels.record_dispatch() as calls:
            out = ops.conv_feature_extractor(wave, *args, **kwargs)
        assert calls == {("conv_feature_extractor", "cuda"): 1}, calls
        grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), (dtype, config)
print("sanitized run done")
