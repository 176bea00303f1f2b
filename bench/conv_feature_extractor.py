"""Benchmark the audio feature encoder: d2v_kernels' CUDA extension (CUTLASS) and Triton path vs
transformers' ``Data2VecAudioFeatureEncoder`` (cuDNN convs, eager LayerNorm + GELU), torch.compile of it
and cuDNN's channels-last convs.

Impls: ``d2v`` (default dispatch), ``d2v_cuda`` (the extension forced: on an H100 its forward convs
are CUTLASS 3's Hopper conv, ``ops.conv_feature_extractor_op.cuda_forward_conv``), ``d2v_cuda_sm80``
(the extension with the Hopper conv off: the Sm80 GEMMs every other GPU runs), ``d2v_triton``,
``hf_eager``, ``hf_compile`` (default mode), ``hf_compile_max_autotune`` (``mode="max-autotune"``:
minutes of compile a case, so only when named in ``--impls``), ``cudnn_channels_last``
(transformers' layers with the activations and weights in channels-last strides, so cuDNN runs no
transposes; eager LayerNorm + GELU).

Cases: B=8 x 10 s and B=1 x 30 s of 16 kHz audio, the base config (7 layers, 512 channels),
fp16 and bf16, forward and forward+backward (gradients for the waveform and every weight).
Every implementation's output (and, for fwd+bwd, gradients) is checked against a float64 run
before it is timed: its error may be at most twice eager's own error in the same dtype plus a
small floor. Reports median / p20 / p80 milliseconds, TFLOP/s of the convolutions (2 x MACs, x3
for fwd+bwd), and peak memory (torch.cuda.max_memory_allocated above what was allocated before
the call). Writes ``bench/results/<gpu>/<date>-conv_feature_extractor.json``.

    python -m bench.conv_feature_extractor [--quick] [--cases b8x10s,b1x30s] [--dtypes fp16,bf16]
                                           [--modes fwd,fwd+bwd] [--impls d2v,d2v_cuda,d2v_triton,...]
    python -m bench.conv_feature_extractor --check-only --tiny --device cpu   # the checks on a CPU
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys

import torch
import torch.nn.functional as F

from bench import common, op_benchmark

# name: (batch, samples, conv channels)
CASES = {"b8x10s": (8, 160_000, 512), "b1x30s": (1, 480_000, 512)}
QUICK_CASES = ("b8x10s",)
# For --check-only --tiny (CPU: d2v_cuda is reported as skipped there, the extension runs on CUDA only;
# d2v_triton runs through the interpreter when TRITON_INTERPRET=1).
TINY_CASES = {"tiny": (2, 4_000, 32)}
SHAPES = {**CASES, **TINY_CASES}
IMPLS = ("d2v", "d2v_cuda", "d2v_cuda_sm80", "d2v_triton", "hf_eager", "hf_compile", "cudnn_channels_last")
EXTRA_IMPLS = ("hf_compile_max_autotune",)  # minutes of compile a case: only when named


def build_encoder(case: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """transformers' feature encoder (base kernels and strides) with random weights (LayerNorm affine
    randomised too)."""
    from transformers import Data2VecAudioConfig
    from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioFeatureEncoder

    channels = SHAPES[case][2]
    torch.manual_seed(seed)
    encoder = Data2VecAudioFeatureEncoder(Data2VecAudioConfig(conv_dim=(channels,) * 7))
    with torch.no_grad():
        for layer in encoder.conv_layers:
            layer.layer_norm.weight.normal_(1.0, 0.2)
            layer.layer_norm.bias.normal_(0.0, 0.2)
    return encoder.eval().to(device=device, dtype=dtype)


def encoder_fn(encoder, impl: str):
    """wave (B, S) -> (B, T, C) for one implementation."""
    layers = list(encoder.conv_layers)
    if impl in ("d2v", "d2v_cuda", "d2v_cuda_sm80", "d2v_triton"):
        import d2v_kernels
        from d2v_kernels import ops

        params = dict(
            conv_weights=[layer.conv.weight for layer in layers],
            ln_weights=[layer.layer_norm.weight for layer in layers],
            ln_biases=[layer.layer_norm.bias for layer in layers],
        )
        strides = [layer.conv.stride[0] for layer in layers]

        # d2v: default dispatch (what a user gets); cuda: the CUDA extension (layer 0's direct
        # kernel, then CUTLASS GEMMs and LayerNorm + GELU row kernels, forward and backward);
        # triton: Triton layer 0, then cuDNN conv + Triton LayerNorm + GELU per layer.
        backend = {"d2v": None, "d2v_cuda": "cuda", "d2v_cuda_sm80": "cuda", "d2v_triton": "triton"}[impl]
        hopper = impl != "d2v_cuda_sm80"

        def run(wave):
            forced = (
                contextlib.nullcontext() if backend is None else d2v_kernels.use_backend(conv_feature_extractor=backend)
            )
            with forced, _hopper_conv(wave.device.type == "cuda" and backend == "cuda", hopper):
                return ops.conv_feature_extractor(wave, **params, strides=strides, eps=layers[0].layer_norm.eps)

        return run
    if impl == "cudnn_channels_last":
        return functools.partial(_channels_last_encoder, layers)
    if impl == "hf_eager":
        return lambda wave: encoder(wave).transpose(1, 2)
    if impl in ("hf_compile", "hf_compile_max_autotune"):
        mode = "max-autotune" if impl == "hf_compile_max_autotune" else None
        compiled = torch.compile(encoder, dynamic=False, mode=mode)  # a graph per shape, as each case is timed
        return lambda wave: compiled(wave).transpose(1, 2)
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


@contextlib.contextmanager
def _hopper_conv(applies: bool, enabled: bool):
    """The cuda backend's Hopper kernels on or off for a call (restored after)."""
    if not applies:
        yield
        return
    from d2v_kernels.ops.conv_feature_extractor_op import set_hopper_conv

    before = set_hopper_conv(enabled)
    try:
        yield
    finally:
        set_hopper_conv(before)


def _channels_last_encoder(layers, wave):
    """transformers' conv layers (conv, LayerNorm over channels, GELU) with every activation (B, C, T)
    in channels-last strides and each weight copied to them, so cuDNN picks its NHWC kernels and
    nothing transposes; (B, T, C) out."""
    x = wave[:, None, :]
    for layer in layers:
        conv = layer.conv
        weight = conv.weight.transpose(1, 2).contiguous().transpose(1, 2)
        z = F.conv1d(x, weight, conv.bias, stride=conv.stride).transpose(1, 2)  # (B, T, C), contiguous
        norm = layer.layer_norm
        x = F.gelu(F.layer_norm(z.contiguous(), norm.normalized_shape, norm.weight, norm.bias, norm.eps))
        x = x.transpose(1, 2)
    return x.transpose(1, 2)


def frames(samples: int, encoder) -> int:
    for layer in encoder.conv_layers:
        samples = (samples - layer.conv.kernel_size[0]) // layer.conv.stride[0] + 1
    return samples


def conv_flops(batch: int, samples: int, encoder) -> float:
    """Multiply-adds x 2 of the forward convolutions."""
    flops, length = 0.0, samples
    for layer in encoder.conv_layers:
        c_out, c_in, k = layer.conv.weight.shape
        length = (length - k) // layer.conv.stride[0] + 1
        flops += 2.0 * batch * length * c_out * c_in * k
    return flops


def setup_case(case: str, dtype_name: str, mode: str, device: str = "cuda") -> op_benchmark.OpCase:
    """Inputs of one case; steps return [out] or [out, d wave, d every weight]."""
    batch, samples, channels = SHAPES[case]
    dtype = common.DTYPES[dtype_name]
    encoder = build_encoder(case, dtype, device)
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad_(mode == "fwd+bwd")
    gen = torch.Generator(device="cpu").manual_seed(1)
    wave = torch.randn(batch, samples, generator=gen).to(device, dtype)
    out_shape = (batch, frames(samples, encoder), channels)
    grad_out = torch.randn(out_shape, generator=gen).to(device, dtype) if mode == "fwd+bwd" else None

    def make_step(impl: str):
        fn = encoder_fn(encoder, impl)
        return lambda: op_benchmark.forward_backward(fn, [wave], grad_out, mode, params)

    @functools.cache
    def reference():
        # float64 reference on the very same (already rounded) weights
        encoder64 = copy.deepcopy(encoder).double()
        grad64 = None if grad_out is None else grad_out.double()
        fn64 = encoder_fn(encoder64, "hf_eager")
        out64 = op_benchmark.forward_backward(fn64, [wave.double()], grad64, mode, list(encoder64.parameters()))
        return out64, make_step("hf_eager")()

    row = dict(case=case, batch=batch, samples=samples, channels=channels, dtype=dtype_name, mode=mode)
    flops = conv_flops(batch, samples, encoder) * (3.0 if mode == "fwd+bwd" else 1.0)
    return op_benchmark.OpCase(row=row, make_step=make_step, reference=lambda impl: reference(), flops=flops)


BENCHMARK = op_benchmark.OpBenchmark(
    "conv_feature_extractor",
    __doc__,
    setup_case,
    tuple(CASES),
    QUICK_CASES,
    tuple(TINY_CASES),
    IMPLS,
    extra_impls=EXTRA_IMPLS,
)
# main(argv) -> exit status
main, parse_args = BENCHMARK.main, BENCHMARK.parse_args


if __name__ == "__main__":
    sys.exit(main())
