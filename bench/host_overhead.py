"""Host time of eager steps, on any machine: Triton's real launch path (binder, cache key,
compile to cubin for sm_90, launcher call) with a driver whose launch does nothing.

An eager step on a GPU whose host is slow is bound by this time, not by the kernels (bench/NOTES.md).
This measures it on a CPU, where CI runs, so a change can be judged without a GPU.

Per op (the default): microseconds per call of each op at an audio-base shape (fp16, inference, no
autograd) and launches per call.

    python -m bench.host_overhead [--calls 2000] [--grad] [--profile OP]

``--grad``: the same calls with inputs that require gradients, autograd recording (the forward
call and its graph node; no backward).

Whole models: ``bench.models``' model at its base depth (12 layers; audio's 7 conv layers and 5
positional conv layers) at tiny widths (hidden 32, 2 heads of 16, intermediate 64, audio's convs 32
channels) on short inputs (audio 2 x 0.5 s, the second row padded; vision 2 x 64 px, 17 tokens,
relative position bias on; text 2 x 32 tokens, the second row padded), fp32. ``d2v`` is
``d2v_kernels.optimize(model)`` with the Triton backend forced for every op that has one;
``hf_sdpa`` is transformers' model with ``attn_implementation="sdpa"``; same config, same weights.
Their steps are timed in alternated rounds (A B A B ...), so that the load of a shared machine
falls on both alike: host ms per step is the median of the rounds, the ratio the median of the
rounds' ratios. ``--train`` times a training step: train mode (the configs' dropouts but
attention's, see ``TINY_OVERRIDES``), forward with labels, loss, backward, gradients set to None;
no optimizer step.

    python -m bench.host_overhead --model audio_ctc,vision_base,text_base [--train] [--json PATH]

Launches per step: Triton's (counted by the no-op driver) plus the aten calls, from
``torch.profiler``'s record of a step, that would launch a GPU kernel (:func:`counts_as_launch`:
every aten call but views, allocation, metadata and composite ops, which count by their parts);
per layer: a step's launches less those of the same step without the encoder's last layer (by op
in the ``--json`` rows).

CPU tensors stand in for CUDA ones (only their data_ptr and strides reach the launcher); nothing
our kernels output is computed (outputs are uninitialised). The convs (cuDNN's on a GPU, whose
host time is not ours to cut; on a CPU they would compute) are, in both models, a stub that
returns the output cuDNN returns (channels-last for a channels-last input), so the feature
extractor's op row is our host time plus one ``new_empty`` a conv. So is aten's GELU and its
backward (:func:`shape_only_gelu`): on a CPU its exact-erf kernel costs 10 to 26 us a call at any
size. The rest of transformers' model (and the aten ops left in ours) computes on the CPU, on one
thread: at these widths a small part of its step, which ``--half-input`` bounds (``hf_sdpa`` again
on half the input: the length, or vision's batch); more in transformers' model than in ours (its
feature encoder's norms, its CPU sdpa), so the ratio errs in our favour (bench/NOTES.md).
Run it in a process of its own: the kernels it compiles stay cached for the no-op driver's target.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

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


def run_in_a_process(module: str, *args: str, triton_cache: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m module *args`` from the repository root in a process of its own without
    TRITON_INTERPRET (Triton's compiled launch path, which the no-op driver needs; a process that
    imported triton for the interpreter cannot have it), its output captured. ``triton_cache``:
    its TRITON_CACHE_DIR, for runs that share the kernels they compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_cache is not None:
        env["TRITON_CACHE_DIR"] = str(triton_cache)
    command = [sys.executable, "-m", module, *args]
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)


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


@contextlib.contextmanager
def shape_only_gelu() -> Iterator[None]:
    """aten's ``gelu`` and ``gelu_backward`` on CPU tensors allocate their results without computing
    them, for the duration of the block: a CPU kernel override, so both models reach them through
    the dispatcher as before (transformers' module and its autograd node, our layers' direct calls)
    and pay one Python kernel call each, about a GPU launch's host time. The CPU's exact-erf GELU
    costs 10 to 26 us a call at any size (fixed work, not host time), which a GPU does not pay."""
    import warnings

    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        library.impl("gelu", lambda x, approximate="none": torch.empty_like(x), "CPU")
        library.impl("gelu_backward", lambda grad, x, approximate="none": torch.empty_like(x), "CPU")
    try:
        yield
    finally:
        library._destroy()


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


OP_NAMES = ("add_layer_norm", "layer_norm_gelu", "attention", "conv_feature_extractor")


def op_calls(grad: bool = False) -> dict[str, Callable[[], object]]:
    """One call of each op at an audio-base shape (fp16), under torch.no_grad by the caller; with
    ``grad`` the floating inputs require gradients and the caller records autograd (the forward
    call with its graph node, dropped at once: no backward)."""
    from d2v_kernels import ops

    dt = torch.float16
    randn = lambda *shape: torch.randn(*shape, dtype=dt).requires_grad_(grad)
    rows = randn(8 * 499, 768)
    residual = randn(8 * 499, 768)
    w768, b768 = randn(768), randn(768)
    frames = randn(8, 512, 3199)
    w512, b512 = randn(512), randn(512)
    q, k, v = (randn(8, 499, 12, 64) for _ in range(3))
    keep = torch.ones(8, 499, dtype=torch.bool)
    keep[1:, 400:] = False
    # The audio encoder's 7 layers on 1 s (the host time does not depend on the length; a CPU
    # allocation of a longer one's activations would add page faults a GPU's allocator does not pay).
    kernels, strides = (10, 3, 3, 3, 3, 2, 2), [5, 2, 2, 2, 2, 2, 2]
    conv_weights = [randn(512, 1 if i == 0 else 512, k) for i, k in enumerate(kernels)]
    wave = torch.randn(1, 16000, dtype=dt)
    norms = [w512] * len(kernels), [b512] * len(kernels)
    return {
        "add_layer_norm": lambda: ops.add_layer_norm(rows, residual, w768, b768),
        "layer_norm_gelu": lambda: ops.layer_norm_gelu(frames, w512, b512, channels_dim=1),
        "attention": lambda: ops.attention(q, k, v, key_padding_mask=keep),
        "conv_feature_extractor": lambda: ops.conv_feature_extractor(wave, conv_weights, *norms, strides=strides),
    }


def op_table(calls: int, driver: NoOpDriver, grad: bool = False) -> None:
    """The per-op mode: µs per call and launches per call of each op of :func:`op_calls`."""
    print(f"{'op':<22} {'µs/call':>8}  launches/call{'  (autograd recording)' if grad else ''}")
    for name, fn in op_calls(grad).items():
        before = driver.launches
        us = per_call_us(fn, calls)
        launched = (driver.launches - before) / (calls * 5 + max(10, calls // 100))
        print(f"{name:<22} {us:8.1f}  {launched:.0f}")


def profile_calls(fn: Callable[[], object], calls: int) -> None:
    """cProfile ``calls`` calls of ``fn`` (after one untimed call) and print the top 20 by own time."""
    import cProfile
    import pstats

    fn()
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [fn() for _ in range(calls)])
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


# ------------------------------------------------------------------------------------ whole models

MODEL_NAMES = ("audio_ctc", "vision_base", "text_base")
MODEL_IMPLS = ("d2v", "hf_sdpa")
HALF_INPUT = "hf_sdpa_half_input"
# Base depth (the configs' defaults: 12 layers; audio's 7 conv and 5 positional conv layers), at
# widths where aten's compute is small next to its host time. Head dim 16: the smallest the
# attention kernel takes.
TINY_WIDTHS = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
# No attention dropout (vision's is off already): on a CPU torch's sdpa has no fused kernel with
# dropout, and its math path would put a dozen aten calls a layer into transformers' model where a
# GPU's memory-efficient kernel runs one. The other dropouts stay at the configs' defaults.
TINY_OVERRIDES = {
    "audio_ctc": {"conv_dim": (32,) * 7, "attention_dropout": 0.0},
    "vision_base": {"image_size": 64, "num_labels": 10},  # 16-pixel patches: 4 x 4 + CLS = 17 tokens
    # a small vocabulary: the embedding's gradient is computed (zeroed, scattered) on the CPU
    "text_base": {"vocab_size": 512, "attention_probs_dropout_prob": 0.0},
}
# Allocation, metadata, dtype arithmetic and CPU scalars (a kernel's argument on a GPU): no GPU
# kernel (see counts_as_launch).
NO_KERNEL_OPS = frozenset(
    {
        "aten::empty",
        "aten::empty_strided",
        "aten::empty_like",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::_unsafe_view",
        "aten::lift_fresh",
        "aten::set_",
        "aten::resize_",
        "aten::sym_size",
        "aten::sym_stride",
        "aten::sym_numel",
        "aten::sym_storage_offset",
        "aten::is_same_size",
        "aten::_has_compatible_shallow_copy_type",
        "aten::promote_types",
        "aten::result_type",
        "aten::can_cast",
        "aten::scalar_tensor",
    }
)


@functools.cache
def counts_as_launch(name: str) -> bool:
    """Whether a call of the aten op ``name`` (``"aten::addmm"``) would launch a GPU kernel (or a
    copy) on a GPU: every aten op but views and in-place views (``transpose``, ``transpose_``: an
    overload whose output aliases its input), ops that only decompose into others (every overload
    ``CompositeImplicitAutograd``: ``layer_norm``, ``dropout``, ``contiguous``) and those of
    ``NO_KERNEL_OPS`` (allocation, metadata, dtype arithmetic, CPU scalars). ``.item()`` counts (a
    copy to the host)."""
    namespace, _, op = name.partition("::")
    if namespace != "aten" or name in NO_KERNEL_OPS:
        return False
    packet = getattr(torch.ops.aten, op, None)
    if not hasattr(packet, "overloads"):  # unknown, or stubbed (shape_only_convs): a kernel on a GPU
        return True
    overloads = []
    for overload in packet.overloads():
        overload = getattr(packet, overload)
        if torch._C._dispatch_has_kernel(overload.name()):  # schemas without a kernel (TorchScript's) aside
            overloads.append(overload)
    if any(o.is_view or torch.Tag.inplace_view in o.tags for o in overloads):
        return False
    return not all(o.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd) for o in overloads)


def aten_launches(events) -> Counter:
    """{op: calls} of the aten calls among profiler ``events`` (``torch.profiler.profile().events()``)
    that :func:`counts_as_launch`, outermost first: the calls a counted op makes are its own (the
    ``copy_`` of a CPU ``addmm``), a decomposed op's are counted in its place. Our ops' Triton
    launches are the driver's to count; the aten calls they make count like any other.

    An approximation of a GPU's launches: a few of the counted ops run on CPU tensors there (a mask
    built on the host), one op may launch more than one kernel, and a CPU op may decompose where the
    GPU's does not (dropout: ``bernoulli_`` then ``div``, one kernel on a GPU)."""
    launches: Counter = Counter()
    stack = [event for event in events if event.cpu_parent is None]
    while stack:
        event = stack.pop()
        if counts_as_launch(event.name):
            launches[event.name] += 1
        else:
            stack.extend(event.cpu_children)
    return launches


def tiny_base_config(name: str):
    """The transformers config of ``bench.models``' model ``name`` (its base depth) at tiny widths."""
    import transformers

    from bench import models

    spec = models.MODELS[name]
    cls = getattr(transformers, f"Data2Vec{spec.modality.capitalize()}Config")
    return cls(**{**spec.config_kwargs, **TINY_WIDTHS, **TINY_OVERRIDES[name]})


def model_inputs(name: str, config, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Seeded inputs with labels: audio 2 x 0.5 s, the second row padded after 3/4 of it; vision
    2 images; text 2 x 32 tokens, the second row padded after 20. ``scale=0.5`` halves them (the
    length; vision's batch)."""
    gen = torch.Generator().manual_seed(1)
    if name == "audio_ctc":
        samples = int(8000 * scale)
        mask = torch.ones(2, samples, dtype=torch.long)
        mask[1, samples * 3 // 4 :] = 0
        labels = torch.randint(1, config.vocab_size, (2, 4), generator=gen)
        return {"input_values": torch.randn(2, samples, generator=gen) * mask, "attention_mask": mask, "labels": labels}
    if name == "vision_base":
        batch = max(1, int(2 * scale))
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)
        return {"pixel_values": pixels, "labels": torch.randint(0, config.num_labels, (batch,), generator=gen)}
    length = int(32 * scale)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length * 5 // 8 :] = 0
    ids = torch.randint(3, config.vocab_size, (2, length), generator=gen)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, config.pad_token_id))
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (2,), generator=gen)}


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder's list of transformer layers."""
    for name, module in model.named_modules():
        if name.endswith(("encoder.layer", "encoder.layers")) and isinstance(module, torch.nn.ModuleList):
            return module
    raise LookupError(f"{type(model).__name__}: no encoder.layer(s) ModuleList")


@contextlib.contextmanager
def one_layer_less(model: torch.nn.Module) -> Iterator[None]:
    """The model runs without its encoder's last layer for the duration of the block."""
    layers = encoder_layers(model)
    last = layers[len(layers) - 1]
    del layers[len(layers) - 1]
    try:
        yield
    finally:
        layers.append(last)


def model_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], train: bool) -> Callable[[], object]:
    """One inference step (eval, no grad, logits), or one training step: train mode (the config's
    dropouts), forward with labels, loss, backward, gradients set to None. No optimizer step."""
    if not train:
        model.eval()
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}

        def infer():
            with torch.no_grad():
                return model(**forward_inputs).logits

        return infer
    model.train()

    def train_step():
        loss = model(**inputs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return train_step


def build_steps(name: str, train: bool, dtype: torch.dtype, half_input: bool) -> tuple[dict, dict]:
    """({impl: step}, {impl: model}) for one model: ``d2v`` (``d2v_kernels.optimize``), ``hf_sdpa``
    (transformers' sdpa model), from the same config and weights; and ``hf_sdpa`` on half the
    input when ``half_input``. Call inside :func:`no_op_triton` and :func:`shape_only_convs`."""
    from bench import models

    spec, config = models.MODELS[name], tiny_base_config(name)
    state = models.master_weights(spec, config, "cpu")
    built = {
        impl: models.build_variant(spec, config, impl, state, dtype, "cpu", train_precision="pure")[0]
        for impl in MODEL_IMPLS
    }
    cast = lambda inputs: {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    inputs = cast(model_inputs(name, config))
    steps = {impl: model_step(model, inputs, train) for impl, model in built.items()}
    if half_input:
        steps[HALF_INPUT] = model_step(built["hf_sdpa"], cast(model_inputs(name, config, 0.5)), train)
    return steps, built


def alternate(steps: dict[str, Callable[[], object]], rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    """{impl: host ms per step of each round}: rounds A B A B ..., ``steps_per_round`` steps each, so
    that a change of the machine's load falls on every implementation alike."""
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, step in steps.items():
            started = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            times[impl].append((time.perf_counter() - started) / steps_per_round * 1e3)
    return times


def count_launches(step: Callable[[], object], driver: NoOpDriver) -> Counter:
    """Launches of one call of ``step``: ``"triton"`` (through the no-op driver) and each aten op's
    (:func:`aten_launches`)."""
    from torch.profiler import ProfilerActivity, profile

    before = driver.launches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return Counter(triton=driver.launches - before) + aten_launches(prof.events())


def measure_model(name: str, train: bool, dtype: torch.dtype, options: argparse.Namespace, driver) -> list[dict]:
    """Rows of one model and mode: host ms per step (median of the alternated rounds), its ratio to
    ``hf_sdpa``'s (median of the rounds' ratios), launches per step, and per layer (a step's
    launches less those of the step without the encoder's last layer)."""
    steps, built = build_steps(name, train, dtype, options.half_input)
    for step in steps.values():  # compiles the kernels, fills the caches
        for _ in range(options.warmup):
            step()
    gc.collect()
    gc.freeze()  # what exists now is never collected: a collection during a round costs what it finds new
    try:
        times = alternate(steps, options.rounds, options.steps)
    finally:
        gc.unfreeze()
    baseline = times["hf_sdpa"]
    rows = []
    for impl, step in steps.items():
        ratios = [t / b for t, b in zip(times[impl], baseline)]
        row = {
            "model": name,
            "mode": "train" if train else "inference",
            "impl": impl,
            "dtype": str(dtype).removeprefix("torch."),
            "ms": statistics.median(times[impl]),
            "ms_rounds": times[impl],
            "vs_hf_sdpa": statistics.median(ratios),
            "vs_hf_sdpa_range": [min(ratios), max(ratios)],
        }
        if impl in built:
            launches = count_launches(step, driver)
            with one_layer_less(built[impl]):
                less = count_launches(step, driver)
            row.update(
                launches_triton=launches["triton"],
                launches_aten=launches.total() - launches["triton"],
                launches=launches.total(),
                launches_per_layer=launches.total() - less.total(),
                launches_per_layer_by_op=dict(sorted((launches - less).items())),
            )
        rows.append(row)
    return rows


def cpu_name() -> str:
    """The CPU's model name, from /proc/cpuinfo (Linux), or platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_model_rows(rows: list[dict]) -> None:
    print(
        f"{'model':<12} {'mode':<9} {'impl':<19} {'host ms/step':>12} {'vs hf_sdpa':>10} "
        f"{'launches/step':>13} {'(triton + aten)':>15} {'launches/layer':>14}"
    )
    for row in rows:
        split = f"{row['launches_triton']} + {row['launches_aten']}" if "launches" in row else "-"
        print(
            f"{row['model']:<12} {row['mode']:<9} {row['impl']:<19} {row['ms']:12.2f} {row['vs_hf_sdpa']:9.2f}x "
            f"{row.get('launches', '-'):>13} {split:>15} {row.get('launches_per_layer', '-'):>14}"
        )


def model_main(args: argparse.Namespace) -> int:
    """The whole-model mode: rows for each model asked for, printed and optionally written as JSON."""
    import transformers

    import d2v_kernels
    import d2v_kernels.models
    from bench import common, models

    for name in args.model:  # imported before the conv stubs go in
        getattr(transformers, models.MODELS[name].class_name)

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(1)  # the host's Python runs on one thread; aten's compute stays on it too
    torch.set_flush_denormal(True)  # stubbed convs and kernels leave their outputs uninitialised
    env = {**common.environment(), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": 1}
    rows = []
    with no_op_triton() as driver, shape_only_convs(), shape_only_gelu(), d2v_kernels.use_backend("triton"):
        for name in args.model:
            if args.profile is not None:
                steps, _ = build_steps(name, args.train, dtype, half_input=False)
                profile_calls(steps[args.profile], args.steps)
                continue
            rows.extend(measure_model(name, args.train, dtype, args, driver))
    if rows:
        print_model_rows(rows)
    if args.json is not None:
        payload = {"schema": common.SCHEMA_VERSION, "what": "host_overhead", "environment": env, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="per op: calls per timing round (default 2000)")
    parser.add_argument(
        "--model", default=None, help=f"whole models instead of ops: comma list of {', '.join(MODEL_NAMES)}, or all"
    )
    parser.add_argument("--train", action="store_true", help="with --model: a training step (forward + backward)")
    parser.add_argument(
        "--grad", action="store_true", help="per op: inputs that require gradients, autograd recording (forward call)"
    )
    parser.add_argument("--steps", type=int, default=10, help="with --model: steps per timing round (default 10)")
    parser.add_argument("--rounds", type=int, default=10, help="with --model: alternated rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="with --model: untimed steps first (default 3)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="with --model (default fp32)")
    parser.add_argument(
        "--half-input", action="store_true", help=f"with --model: also time hf_sdpa on half the input ({HALF_INPUT})"
    )
    parser.add_argument("--json", type=Path, default=None, help="with --model: write the rows and environment here")
    parser.add_argument(
        "--profile",
        default=None,
        help="cProfile an op's calls (its name), or with --model an impl's steps (d2v, hf_sdpa)",
    )
    args = parser.parse_args(argv)
    if args.model is None:
        if args.profile is not None and args.profile not in OP_NAMES:
            parser.error(f"--profile must be one of {list(OP_NAMES)}")
        return args
    args.model = list(MODEL_NAMES) if args.model == "all" else args.model.split(",")
    unknown = sorted(set(args.model) - set(MODEL_NAMES))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {MODEL_NAMES} or all")
    if args.profile is not None and args.profile not in MODEL_IMPLS:
        parser.error(f"with --model, --profile must be one of {MODEL_IMPLS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    if args.model is not None:
        return model_main(args)
    import d2v_kernels

    with no_op_triton() as driver, shape_only_convs(), d2v_kernels.use_backend(**dict.fromkeys(OP_NAMES, "triton")):
        with torch.set_grad_enabled(args.grad):
            if args.profile is not None:
                profile_calls(op_calls(args.grad)[args.profile], args.calls)
            else:
                op_table(args.calls, driver, args.grad)
    return 0


if __name__ == "__main__":
    sys.exit(main())
