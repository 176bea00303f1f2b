"""Host time of one eager op call, on any machine: Triton's real launch path (binder, cache key,
compile to cubin for sm_90, launcher call) with a driver whose launch does nothing.

An eager model step on a GPU whose host is slow is bound by this time, not by the kernels
(bench/NOTES.md: on the H100 machine of 2026-11-25 our ops cost 150 to 180 µs of host time a call
under the profiler). This measures it on a CPU, where CI runs, so a change can be judged without a
GPU: microseconds per call of each op (inference, no autograd), and of Triton's own launch of the
same kernel for comparison.

    python -m bench.host_overhead [--calls 2000] [--profile OP]

CPU tensors stand in for CUDA ones (only their data_ptr and strides reach the launcher); the
Triton backend is forced. Nothing is computed: outputs are uninitialised. The feature extractor's
convs (cuDNN's on a GPU, whose host time is not ours to cut; on a CPU they would compute) are
replaced by a stub that returns the output cuDNN returns (channels-last for a channels-last input),
so its row is our host time plus one ``new_empty`` a conv. Run it in a process of its own: the kernels it compiles stay cached
for the no-op driver's target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch


class _NoOpUtils:
    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class NoOpDriver:
    """The parts of Triton's CUDA driver that a launch touches; ``launches`` counts kernel launches."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.utils = _NoOpUtils()
        self.launches = 0
        self._target = GPUTarget("cuda", 90, 32)
        driver = self

        class Launcher:
            def __init__(self, src, metadata):
                pass

            def __call__(self, *args):
                driver.launches += 1

        self.launcher_cls = Launcher

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return None

    def get_empty_cache_for_benchmark(self):
        return None

    def clear_cache(self, cache):
        pass


@contextlib.contextmanager
def no_op_triton() -> Iterator[NoOpDriver]:
    """Triton launches through a no-op driver, and the dispatcher sends CPU tensors to the Triton
    backend, for the duration of the block."""
    from triton.runtime import driver as triton_driver

    from d2v_kernels import dispatch

    previous_env = os.environ.get("TRITON_INTERPRET")
    if previous_env == "1":
        raise RuntimeError("bench.host_overhead needs the compiled launch path: unset TRITON_INTERPRET")
    fake = NoOpDriver()
    triton_driver.set_active(fake)
    previous_check = dispatch.triton_interpreter_enabled
    dispatch.triton_interpreter_enabled = lambda: True
    try:
        yield fake
    finally:
        dispatch.triton_interpreter_enabled = previous_check
        try:
            triton_driver.reset_active()
        except RuntimeError:  # no real driver on this machine: leave none active, as before
            triton_driver._active = None


def _channels_last_like(reference: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised (B, C, T) tensor of ``shape``, channels-last when ``reference`` is (its
    channels contiguous), as cuDNN lays out a conv's output and input gradient."""
    if reference.stride(1) == 1 and reference.shape[1] > 1:
        return reference.new_empty((shape[0], shape[2], shape[1])).transpose(1, 2)
    return reference.new_empty(shape)


def _conv_output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int):
    frames = (x.shape[2] + 2 * padding - dilation * (weight.shape[2] - 1) - 1) // stride + 1
    return x.shape[0], weight.shape[0], frames


class _ShapeOnlyConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)  # what ConvolutionBackward0 keeps
        ctx.has_bias = bias is not None
        return _channels_last_like(x, _conv_output_shape(x, weight, stride, padding, dilation))

    @staticmethod
    def backward(ctx, dz):
        x, weight = ctx.saved_tensors
        dx = _channels_last_like(dz, x.shape) if ctx.needs_input_grad[0] else None
        dweight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        dbias = dz.new_empty(weight.shape[0]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None


def _shape_only_convolution_backward(dz, x, weight, bias_sizes, stride, padding, dilation, *rest):
    output_mask = rest[-1]
    dx = _channels_last_like(dz, x.shape) if output_mask[0] else None
    dweight = dz.new_empty(weight.shape) if output_mask[1] else None
    dbias = dz.new_empty(bias_sizes) if output_mask[2] and bias_sizes else None
    return dx, dweight, dbias


@contextlib.contextmanager
def shape_only_convs() -> Iterator[None]:
    """``F.conv1d`` and ``torch.ops.aten.convolution_backward`` (our backward's conv gradients)
    allocate their results without computing them, for the duration of the block. Enter it after
    the imports a run needs (code that reads ``aten.convolution_backward.default`` at import time
    would find the stub)."""
    import torch.nn.functional as F

    real_conv1d = F.conv1d
    real_backward = torch.ops.aten.convolution_backward

    def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if isinstance(padding, str):
            if padding != "valid":
                raise NotImplementedError(f"shape_only_convs: padding={padding!r} is not modelled")
            padding = 0
        first = lambda value: value[0] if isinstance(value, (tuple, list)) else value
        stride, padding, dilation = first(stride), first(padding), first(dilation)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return _ShapeOnlyConv1d.apply(x, weight, bias, stride, padding, dilation)
        return _channels_last_like(x, _conv_output_shape(x, weight, stride, padding, dilation))  # host time: no node

    F.conv1d = conv1d
    torch.ops.aten.convolution_backward = _shape_only_convolution_backward
    try:
        yield
    finally:
        F.conv1d = real_conv1d
        torch.ops.aten.convolution_backward = real_backward


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Median over 5 rounds of the mean host time of ``calls`` calls, after a warm-up (compiles)."""
    for _ in range(max(10, calls // 100)):
        fn()
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return sorted(rounds)[2]


def op_calls() -> dict[str, Callable[[], object]]:
    """One call of each op at an audio-base shape (fp16), under torch.no_grad by the caller."""
    from d2v_kernels import ops

    dt = torch.float16
    rows = torch.randn(8 * 499, 768, dtype=dt)
    residual = torch.randn_like(rows)
    w768, b768 = torch.randn(768, dtype=dt), torch.randn(768, dtype=dt)
    frames = torch.randn(8, 512, 3199, dtype=dt)
    w512, b512 = torch.randn(512, dtype=dt), torch.randn(512, dtype=dt)
    q, k, v = (torch.randn(8, 499, 12, 64, dtype=dt) for _ in range(3))
    keep = torch.ones(8, 499, dtype=torch.bool)
    keep[1:, 400:] = False
    # The audio encoder's 7 layers on 1 s (the host time does not depend on the length; a CPU
    # allocation of a longer one's activations would add page faults a GPU's allocator does not pay).
    kernels, strides = (10, 3, 3, 3, 3, 2, 2), [5, 2, 2, 2, 2, 2, 2]
    conv_weights = [torch.randn(512, 1 if i == 0 else 512, k, dtype=dt) for i, k in enumerate(kernels)]
    wave = torch.randn(1, 16000, dtype=dt)
    norms = [w512] * len(kernels), [b512] * len(kernels)
    return {
        "add_layer_norm": lambda: ops.add_layer_norm(rows, residual, w768, b768),
        "layer_norm_gelu": lambda: ops.layer_norm_gelu(frames, w512, b512, channels_dim=1),
        "attention": lambda: ops.attention(q, k, v, key_padding_mask=keep),
        "conv_feature_extractor": lambda: ops.conv_feature_extractor(wave, conv_weights, *norms, strides=strides),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing round (default 2000)")
    parser.add_argument("--profile", default=None, help="cProfile one op's calls (its name) and print the top")
    args = parser.parse_args(argv)
    import d2v_kernels

    backends = dict.fromkeys(("add_layer_norm", "layer_norm_gelu", "attention", "conv_feature_extractor"), "triton")
    with no_op_triton() as driver, shape_only_convs(), d2v_kernels.use_backend(**backends), torch.no_grad():
        calls = op_calls()
        if args.profile is not None:
            if args.profile not in calls:
                parser.error(f"--profile must be one of {sorted(calls)}")
            import cProfile
            import pstats

            calls[args.profile]()
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [calls[args.profile]() for _ in range(args.calls)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
            return 0
        print(f"{'op':<22} {'µs/call':>8}  launches/call")
        for name, fn in calls.items():
            before = driver.launches
            us = per_call_us(fn, args.calls)
            launched = (driver.launches - before) / (args.calls * 5 + max(10, args.calls // 100))
            print(f"{name:<22} {us:8.1f}  {launched:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
