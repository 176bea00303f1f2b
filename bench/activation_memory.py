"""Peak memory of the audio feature encoder's training step, modelled on any machine (no GPU).

#7 asks the feature extractor for at most half the peak memory of transformers' module in a
training step. This runs the step of ``bench.conv_feature_extractor`` (forward, then the gradients
of the waveform and every weight) on CPU tensors at the real sizes and reads the peak of torch's
allocations from the profiler: every tensor our ops and torch's eager ops allocate, when they
allocate it and when they free it. Nothing is computed that would take long:

- the Triton kernels go through Triton's real launch path to a no-op driver
  (``bench.host_overhead``): their outputs are allocated, never written;
- the convolutions (cuDNN's on a GPU) are replaced by stubs that allocate what cuDNN's would:
  the output (channels-last for a channels-last input), and in the backward the gradients
  asked for; a conv in the autograd graph keeps its input and weight alive, as
  ``ConvolutionBackward0`` does. cuDNN's workspaces are left out (on the GPU both peaks include
  them), as is anything allocated outside torch.

transformers' LayerNorm and GELU compute for real (torch's CPU kernels). Each figure is the peak
above what was allocated before the step, with the step's results (output and gradients) held
until its end, as ``bench.common.peak_memory_mb`` measures on a GPU.

    python -m bench.activation_memory [--case b8x10s] [--dtype fp16] [--impls d2v_triton,hf_eager]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

IMPLS = ("d2v_triton", "hf_eager")


def peak_bytes(step: Callable[[], object], largest: int = 0) -> tuple[int, list[tuple[int, str]]]:
    """Peak of torch's CPU allocations during ``step()`` above what was allocated before it (its
    result held until it returns), and the ``largest`` allocations live at that peak: (bytes, the
    ops that allocated it, outermost first)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
        del result
    allocations = []  # (time, fields, allocating op path)
    stack = [(event, ()) for event in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        event, path = stack.pop()
        if event.tag == torch._C._profiler._EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields, " / ".join(path[-3:])))
        stack.extend((child, (*path, event.name)) for child in event.children)
    if not allocations:
        return 0, []
    allocations.sort(key=lambda entry: entry[0])
    first = allocations[0][1]
    before = first.total_allocated - first.alloc_size
    live, peak, at_peak = {}, -1, {}
    for _, fields, where in allocations:
        if fields.alloc_size > 0:
            live[fields.ptr] = (fields.alloc_size, where)
        else:
            live.pop(fields.ptr, None)
        if fields.total_allocated > peak:
            peak = fields.total_allocated
            at_peak = dict(live) if largest else at_peak
    return peak - before, sorted(at_peak.values(), reverse=True)[:largest]


def training_peaks(case: str, dtype: str, impls, largest: int = 0) -> dict[str, tuple[int, list[tuple[int, str]]]]:
    """{impl: :func:`peak_bytes` of one forward + backward step} of ``bench.conv_feature_extractor``'s case."""
    from bench import conv_feature_extractor as fe
    from bench.host_overhead import no_op_triton, shape_only_convs

    peaks = {}
    op_case = fe.setup_case(case, dtype, "fwd+bwd", device="cpu")  # imports done before the stubs
    with no_op_triton(), shape_only_convs():
        for impl in impls:
            step = op_case.make_step(impl)
            step()  # compiles the kernels, fills the launch plans
            peaks[impl] = peak_bytes(step, largest)
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.activation_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="b8x10s", help="a case of bench.conv_feature_extractor (default b8x10s)")
    parser.add_argument("--dtype", default="fp16", help="fp16, bf16 or fp32 (default fp16)")
    parser.add_argument("--impls", default="d2v_triton,hf_eager", help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--largest", type=int, default=0, help="list this many allocations live at each peak")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown impls {unknown}; choose from {IMPLS}")
    peaks = training_peaks(args.case, args.dtype, impls, args.largest)
    baseline = peaks["hf_eager"][0] if "hf_eager" in peaks else None
    print(f"{'impl':<20} {'peak MiB':>9}  {'of hf_eager':>11}")
    for impl, (peak, live) in peaks.items():
        ratio = f"{peak / baseline:.2f}x" if baseline else "-"
        print(f"{impl:<20} {peak / 2**20:9.1f}  {ratio:>11}")
        for size, where in live:
            print(f"{'':<20} {size / 2**20:9.1f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
