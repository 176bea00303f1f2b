"""Benchmark residual add + LayerNorm, ``LayerNorm(x + residual)`` over the last dim: d2v_kernels
(``d2v``: the public op under default dispatch; ``d2v_triton``: the Triton kernel forced) vs what
transformers runs (``x + residual``, then ``nn.LayerNorm``), torch.compile of that (default and
``max-autotune-no-cudagraphs``), and Liger-Kernel's LayerNorm (after an eager add) when
``liger_kernel`` is importable.

Cases are the encoder layers' (B, N, C) activations: text (B=32 x 512 tokens), vision (B=64 x 197
patches, pre-LN: the sum is returned as the next residual), audio (B=8 x 499 frames), each at
C=768 (base) and 1024 (large). fp16 and bf16, forward and forward+backward (gradients for x,
residual, weight, bias; with the sum returned, of both outputs). Every implementation's output and
gradients are checked against a float64 run before it is timed (at most twice eager's own error in
the dtype plus a small floor). Reports median / p20 / p80 ms, the GB/s of the bytes the op must
move (:func:`bytes_moved`) and that as a fraction of the device copy bandwidth measured in the same
run. Writes ``bench/results/<gpu>/<date>-add_layer_norm.json``.

    python -m bench.add_layer_norm [--quick] [--cases text,vision,...] [--dtypes fp16,bf16]
                                   [--modes fwd,fwd+bwd] [--impls d2v,d2v_triton,hf_eager,...]
    python -m bench.add_layer_norm --check-only --tiny --device cpu     # the output checks on a CPU
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from bench import common, op_benchmark

# name: (batch, tokens, channels, return_sum)
CASES = {
    "text": (32, 512, 768, False),
    "vision": (64, 197, 768, True),
    "audio": (8, 499, 768, False),
    "text-large": (32, 512, 1024, False),
    "vision-large": (64, 197, 1024, True),
    "audio-large": (8, 499, 1024, False),
}
QUICK_CASES = ("text", "vision", "audio")
# For --check-only --tiny (CPU; d2v_triton runs there under TRITON_INTERPRET=1).
TINY_CASES = {"tiny": (2, 7, 48, True)}
SHAPES = {**CASES, **TINY_CASES}
IMPLS = ("d2v", "d2v_triton", "hf_eager", "hf_compile", "hf_compile_max_autotune", "liger")
EPS = 1e-12  # transformers' Data2VecText / Vision layer_norm_eps (audio's is 1e-5: no difference in bytes)


def hf_add_layer_norm(x, residual, weight, bias, return_sum):
    """What transformers' layers run: the residual add, then ``nn.LayerNorm``'s function."""
    s = x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, EPS)
    return (y, s) if return_sum else y


def liger_add_layer_norm(x, residual, weight, bias, return_sum):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    s = x + residual
    y = LigerLayerNormFunction.apply(s, weight, bias, EPS)
    return (y, s) if return_sum else y


def implementation(impl: str):
    """fn(x, residual, weight, bias, return_sum) -> y or (y, x + residual), or raises ``Skip``."""
    from d2v_kernels import ops, use_backend

    if impl == "d2v":

        def run(x, residual, weight, bias, return_sum):
            return ops.add_layer_norm(x, residual, weight, bias, eps=EPS, return_sum=return_sum)

        return run
    if impl == "d2v_triton":

        def run(x, residual, weight, bias, return_sum):
            with use_backend(add_layer_norm="triton"):
                return ops.add_layer_norm(x, residual, weight, bias, eps=EPS, return_sum=return_sum)

        return run
    if impl == "hf_eager":
        return hf_add_layer_norm
    if impl == "hf_compile":
        return torch.compile(hf_add_layer_norm, dynamic=False)  # a graph per shape
    if impl == "hf_compile_max_autotune":
        return torch.compile(hf_add_layer_norm, mode="max-autotune-no-cudagraphs", dynamic=False)
    if impl == "liger":
        try:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction  # noqa: F401
        except Exception as e:  # not installed, or its import fails on this stack
            raise op_benchmark.Skip(f"liger_kernel not importable ({type(e).__name__}: {e})") from None
        return liger_add_layer_norm
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def run_once(fn, x, residual, weight, bias, return_sum, grad_outs, mode):
    """[y] or [y, sum] (fwd), then for fwd+bwd the gradients of x, residual, weight, bias."""
    if mode == "fwd":
        with torch.no_grad():
            out = fn(x, residual, weight, bias, return_sum)
        return list(out) if return_sum else [out]
    leaves = [t.detach().requires_grad_() for t in (x, residual, weight, bias)]
    out = fn(*leaves, return_sum)
    outs = list(out) if return_sum else [out]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, grad_outs[: len(outs)]))


def bytes_moved(x: torch.Tensor, return_sum: bool, mode: str) -> int:
    """Bytes the op must move at the least, in activations of x's size T (parameters and fp32 row
    statistics are negligible): the forward reads x and residual and writes y (3T), and the sum
    (+T) when it is returned; the backward reads x and residual again (or the sum, written and read
    back: as much), dy, and the sum's gradient when the sum was returned, and writes one gradient
    (x's and residual's are the same tensor): 4T (+T). fwd+bwd: 7T, 9T with the sum."""
    tensor_bytes = x.numel() * x.element_size()
    fwd = 3 + return_sum
    return tensor_bytes * (fwd if mode == "fwd" else fwd + 4 + return_sum)


def setup_case(case: str, dtype_name: str, mode: str, device: str = "cuda") -> op_benchmark.OpCase:
    """One case's inputs; steps return [y, (sum)] or [y, (sum), dx, dresidual, dweight, dbias]."""
    batch, tokens, channels, return_sum = SHAPES[case]
    dtype = common.DTYPES[dtype_name]
    generator = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=generator) * scale + shift).to(device, dtype)

    x, residual = rand(batch, tokens, channels), rand(batch, tokens, channels, scale=2.0, shift=0.5)
    weight, bias = rand(channels, scale=0.2, shift=1.0), rand(channels, scale=0.2)
    grad_outs = [rand(batch, tokens, channels) for _ in range(2)] if mode == "fwd+bwd" else None
    inputs = (x, residual, weight, bias, return_sum)

    def make_step(impl: str):
        fn = implementation(impl)
        return lambda: run_once(fn, *inputs, grad_outs, mode)

    @functools.cache
    def reference():
        as64 = [t.double() for t in (x, residual, weight, bias)]
        grads64 = None if grad_outs is None else [g.double() for g in grad_outs]
        ref64 = run_once(hf_add_layer_norm, *as64, return_sum, grads64, mode)
        return ref64, run_once(hf_add_layer_norm, *inputs, grad_outs, mode)

    row = dict(case=case, batch=batch, tokens=tokens, channels=channels, return_sum=return_sum)
    row.update(dtype=dtype_name, mode=mode)
    nbytes = bytes_moved(x, return_sum, mode)
    return op_benchmark.OpCase(row=row, make_step=make_step, reference=lambda impl: reference(), nbytes=nbytes)


BENCHMARK = op_benchmark.OpBenchmark(
    "add_layer_norm", __doc__, setup_case, tuple(CASES), QUICK_CASES, tuple(TINY_CASES), IMPLS, copy_bandwidth=True
)
# main(argv) -> exit status
main, parse_args = BENCHMARK.main, BENCHMARK.parse_args


if __name__ == "__main__":
    sys.exit(main())
