"""Benchmark the audio positional conv embedding: d2v_kernels' Triton kernels vs transformers'
``Data2VecAudioPositionalConvEmbedding`` (cuDNN grouped conv with transposes, eager LayerNorm +
GELU), torch.compile of it, and a channels-last cuDNN conv (NHWC conv2d on the (B, T, C) memory,
no transposes: the op's eager backend on CUDA). ``d2v`` is the public op under default dispatch
(its measured rule picks the backend), ``d2v_triton`` the Triton kernels forced (two launches a layer: the conv, then the LayerNorm + GELU
row kernel), ``d2v_triton_onepass`` the same in their one-launch form (the conv with its
normalising tail; opt-in, ``D2V_KERNELS_POS_CONV_ONE_PASS=1``).

Cases: base (B=8, T=499 frames = 10 s, C=768, 16 groups, k=19, 5 layers) and large (C=1024),
fp16 and bf16, forward and forward+backward (gradients for the input, every weight and bias).
Every implementation's output (and gradients) is checked against a float64 run before it is
timed: its error may be at most twice eager's own error in the same dtype plus a small floor.
Reports median / p20 / p80 ms, TFLOP/s of the convolutions (2 x MACs, x3 for fwd+bwd; the report
shows it as a share of the GPU's dense fp16/bf16 tensor-core peak), and peak memory. Writes
``bench/results/<gpu>/<date>-pos_conv.json``.

    python -m bench.pos_conv [--quick] [--cases base,large] [--dtypes fp16,bf16] [--modes fwd,fwd+bwd]
                             [--impls d2v,d2v_triton,d2v_triton_onepass,hf_eager,hf_compile,cudnn_channels_last]
    python -m bench.pos_conv --check-only --tiny --device cpu     # the output checks on a CPU
"""

from __future__ import annotations

import copy
import functools
import os
import sys

import torch

from bench import common, op_benchmark

# name: (batch, frames, hidden size, groups, kernel size, layers)
CASES = {"base": (8, 499, 768, 16, 19, 5), "large": (8, 499, 1024, 16, 19, 5)}
QUICK_CASES = ("base",)
# For --check-only --tiny (CPU; d2v_triton runs there under TRITON_INTERPRET=1).
TINY_CASES = {"tiny": (2, 23, 48, 4, 5, 2)}
SHAPES = {**CASES, **TINY_CASES}
IMPLS = ("d2v", "d2v_triton", "d2v_triton_onepass", "hf_eager", "hf_compile", "cudnn_channels_last")


def build_module(case: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """transformers' positional conv embedding for the case, random weights and biases."""
    from transformers import Data2VecAudioConfig
    from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioPositionalConvEmbedding

    _, _, hidden, groups, kernel_size, layers = SHAPES[case]
    config = Data2VecAudioConfig(
        hidden_size=hidden,
        num_conv_pos_embedding_groups=groups,
        conv_pos_kernel_size=kernel_size,
        num_conv_pos_embeddings=layers,
    )
    torch.manual_seed(seed)
    module = Data2VecAudioPositionalConvEmbedding(config)
    with torch.no_grad():
        for layer in module.layers:
            layer.conv.bias.normal_(0.0, 0.2)
    return module.eval().to(device=device, dtype=dtype)


def _layer_params(module):
    layers = list(module.layers)
    conv = layers[0].conv
    return (
        [layer.conv.weight for layer in layers],
        [layer.conv.bias for layer in layers],
        conv.groups,
        conv.kernel_size[0],
        layers[0].layer_norm.eps,
    )


def embedding_fn(module, impl: str):
    """hidden (B, T, C) -> positional embedding (B, T, C) for one implementation."""
    weights, biases, groups, _, eps = _layer_params(module)
    if impl in ("d2v_triton", "d2v_triton_onepass"):
        import d2v_kernels
        from d2v_kernels import ops
        from d2v_kernels.ops.pos_conv_op import ENV_ONE_PASS

        one_pass = "1" if impl == "d2v_triton_onepass" else "0"

        def run(hidden):
            previous = os.environ.get(ENV_ONE_PASS)
            os.environ[ENV_ONE_PASS] = one_pass
            try:
                with d2v_kernels.use_backend(pos_conv="triton"):
                    return ops.pos_conv(hidden, weights, biases, groups=groups, eps=eps)
            finally:
                if previous is None:
                    del os.environ[ENV_ONE_PASS]
                else:
                    os.environ[ENV_ONE_PASS] = previous

        return run
    if impl == "hf_eager":
        return module
    if impl == "hf_compile":
        return torch.compile(module, dynamic=False)  # a graph per shape
    if impl == "d2v":
        from d2v_kernels import ops

        return lambda hidden: ops.pos_conv(hidden, weights, biases, groups=groups, eps=eps)
    if impl == "cudnn_channels_last":
        # The (B, T, C) memory seen as NHWC (B, C, 1, T): cuDNN's channels-last kernels read and
        # write it directly, and LayerNorm runs on the contiguous last dim. No transposed copies.
        # The op's eager backend on CUDA.
        from d2v_kernels.ops.pos_conv_op import pos_conv_channels_last

        return lambda hidden: pos_conv_channels_last(hidden, weights, biases, groups=groups, eps=eps)
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def conv_flops(case: str) -> float:
    """Multiply-adds x 2 of the forward convolutions."""
    batch, frames, hidden, groups, kernel_size, layers = SHAPES[case]
    return 2.0 * batch * frames * hidden * (hidden // groups) * kernel_size * layers


def setup_case(case: str, dtype_name: str, mode: str, device: str = "cuda") -> op_benchmark.OpCase:
    """Inputs of one case; steps return [out] or [out, d hidden, d every weight and bias]."""
    batch, frames, hidden_size = SHAPES[case][:3]
    dtype = common.DTYPES[dtype_name]
    module = build_module(case, dtype, device)
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(mode == "fwd+bwd")
    gen = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(batch, frames, hidden_size, generator=gen).to(device, dtype)
    hidden[1:, frames * 3 // 4 :] = 0.0  # padded frames, zeroed as the encoder does
    grad_out = torch.randn(hidden.shape, generator=gen).to(device, dtype) if mode == "fwd+bwd" else None

    def make_step(impl: str):
        fn = embedding_fn(module, impl)
        return lambda: op_benchmark.forward_backward(fn, [hidden], grad_out, mode, params)

    @functools.cache
    def reference():
        # float64 reference on the very same (already rounded) weights
        module64 = copy.deepcopy(module).double()
        grad64 = None if grad_out is None else grad_out.double()
        out64 = op_benchmark.forward_backward(module64, [hidden.double()], grad64, mode, list(module64.parameters()))
        return out64, op_benchmark.forward_backward(module, [hidden], grad_out, mode, params)

    row = dict(case=case, batch=batch, frames=frames, channels=hidden_size, dtype=dtype_name, mode=mode)
    flops = conv_flops(case) * (3.0 if mode == "fwd+bwd" else 1.0)
    return op_benchmark.OpCase(row=row, make_step=make_step, reference=lambda impl: reference(), flops=flops)


BENCHMARK = op_benchmark.OpBenchmark(
    "pos_conv", __doc__, setup_case, tuple(CASES), QUICK_CASES, tuple(TINY_CASES), IMPLS
)
# main(argv) -> exit status
main, parse_args = BENCHMARK.main, BENCHMARK.parse_args


if __name__ == "__main__":
    sys.exit(main())
