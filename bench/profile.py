"""Where the time of one end-to-end step goes: a ``torch.profiler`` table of the top GPU kernels
and CPU ops of a model from ``bench/models.py``, for our model and any baseline, plus the host
time per call against the GPU time (a step whose host time exceeds its GPU time is launch-bound).

    python -m bench.profile --model audio_ctc --impls d2v,hf_sdpa [--mode inference|train]
                            [--dtype bf16] [--case b8x10s] [--rows 25] [--out DIR]

Writes each table to ``DIR/profile-<model>-<case>-<impl>-<mode>.txt`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import common, models


def profile_variant(spec, config, state, batch, impl, dtype, mode, rows, *, device="cuda") -> str:
    """The profiler tables of ``steps`` calls of one implementation, after a warm-up."""
    model, call = models.build_variant(spec, config, impl, state, dtype, device, train_precision="pure")
    if mode == "inference":
        model.eval()

        def fn():
            return models.infer_logits(call, batch, dtype, device=device)

    else:
        model.train()
        fn, _ = models.train_step_fn(model, call, batch, dtype, train_precision="pure", device=device)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    steps = 5
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    host_ms = (time.perf_counter() - started) * 1e3 / steps  # time to enqueue (the GPU may lag behind)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    # Kernels only: an op's row also carries the device time of the kernels it launched.
    kernels = [e for e in averages if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels) / steps
    head = (
        f"{spec.name} {impl} {mode} {str(dtype).removeprefix('torch.')}: wall {wall_ms:.2f} ms/step, host enqueue "
        f"{host_ms:.2f} ms/step, GPU kernels {gpu_us / 1e3:.2f} ms/step (sum of kernel times)"
    )
    gpu_table = averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=rows // 2, max_name_column_width=70)
    return f"{head}\n\nTop GPU time:\n{gpu_table}\nTop CPU time:\n{cpu_table}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="audio_ctc", choices=sorted(models.MODELS))
    parser.add_argument("--impls", default="d2v,hf_sdpa", help=f"comma-separated, of {list(models.IMPLS)}")
    parser.add_argument("--mode", default="inference", choices=models.MODES)
    parser.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    parser.add_argument("--case", default=None, help="a case of the model (default: its first)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    impls = common.parse_list(args.impls, models.IMPLS, "--impls")
    if not torch.cuda.is_available():
        print("bench.profile needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    spec = models.MODELS[args.model]
    config = spec.config()
    case_name = args.case or next(iter(spec.cases))
    if case_name not in spec.cases:
        parser.error(f"--case must be one of {sorted(spec.cases)}, got {case_name!r}")
    batch = models.make_batch(spec, spec.cases[case_name], config, "cuda")
    state = models.master_weights(spec, config, "cuda")
    dtype = common.DTYPES[args.dtype]
    for impl in impls:
        text = profile_variant(spec, config, state, batch, impl, dtype, args.mode, args.rows)
        print(text, flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"profile-{args.model}-{case_name}-{impl}-{args.mode}.txt").write_text(text)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
