"""Shared pieces of every benchmark: timing, output checks, memory, environment, result files,
hardware peaks. Nothing here touches the GPU at import time.

A result file is ``bench/results/<gpu-slug>/<date>-<what>.json``::

    {"schema": 1, "what": "pos_conv", "environment": {...}, "rows": [{...}, ...]}

Each row is one implementation on one case. Keys the report understands (all optional but
``impl``): ``what`` (op or model), ``case``, ``dtype``, ``mode``, ``impl``, ``ms``, ``ms_p20``,
``ms_p80``, ``tflops``, ``gbps``, ``peak_mem_mb``, ``throughput`` + ``throughput_unit``,
``max_err`` + ``bound``, ``error`` (it failed; not timed), ``skipped`` (the reason it did not run).
Implementations whose name starts with ``d2v`` are ours; the report computes the speedup of ours
over every other implementation of the same (what, case, dtype, mode).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SCHEMA_VERSION = 1

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANTILES = (0.5, 0.2, 0.8)


# ----------------------------------------------------------------------------------- hardware peaks

# triton.testing.get_max_tensorcore_tflops counts Ampere's dense tensor-core rate per SM (512
# fp16 FLOP a clock a sub-core); Hopper's is twice that. For other generations it is not trusted
# (no TFLOP/s peak is recorded rather than a wrong one).
TENSOR_CORE_SCALE = {8: 1, 9: 2}


def device_peak() -> dict[str, Any] | None:
    """The current GPU's peaks, from ``triton.testing``: DRAM GB/s (memory clock x bus width) and
    dense tensor-core TFLOP/s per dtype at the maximum SM clock (``fp32`` is TF32); None without a
    GPU. Compare GB/s also with ``copy_bandwidth_gbps()``, what a copy really reaches."""
    if not has_gpu():
        return None
    from triton.runtime import driver
    from triton.testing import get_dram_gbps, get_max_tensorcore_tflops

    device = torch.cuda.current_device()
    clock_khz = driver.active.utils.get_device_properties(device)["sm_clock_rate"]
    scale = TENSOR_CORE_SCALE.get(torch.cuda.get_device_capability(device)[0])
    tflops = {}
    if scale is not None:
        for name in ("fp16", "bf16", "fp32"):
            tflops[name] = scale * get_max_tensorcore_tflops(DTYPES[name], clock_khz, device)
    return {
        "name": torch.cuda.get_device_name(device),
        "source": "triton.testing",
        "sm_clock_mhz": clock_khz / 1e3,
        "tflops": tflops,
        "hbm_gbps": get_dram_gbps(device),
    }


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    ms: float
    ms_p20: float
    ms_p80: float
    method: str

    def as_row(self) -> dict[str, Any]:
        return {"ms": self.ms, "ms_p20": self.ms_p20, "ms_p80": self.ms_p80, "timing": self.method}


def has_gpu() -> bool:
    return torch.cuda.is_available()


def require_gpu(what: str) -> int | None:
    """None when a CUDA GPU is present; otherwise prints why and returns the exit status (2)."""
    if has_gpu():
        return None
    print(f"{what}: no CUDA GPU on this machine; benchmarks need one.", file=sys.stderr)
    return 2


def _event_ms(fn: Callable[[], Any], runs: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs


def time_ms(
    fn: Callable[[], Any],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_runs: int = 10,
    cudagraph: bool = False,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> Timing:
    """Time ``fn()`` on the current GPU with ``triton.testing.do_bench``; returns median, p20, p80 ms.

    ``do_bench`` zeroes a 256 MB buffer before every run, so each run starts on a cold L2 cache.
    ``min_runs`` stretches ``rep_ms`` / ``warmup_ms`` so that slow calls (a whole model step) are
    still run at least that many times. ``cudagraph=True`` uses ``do_bench_cudagraph`` (one graph
    of many unrolled calls, no launch overhead: for kernels of a few microseconds); it does not
    flush L2, so pass ``rotate_inputs(...)`` as ``fn`` to read cold inputs.
    """
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # compile / autotune / allocate before estimating
    torch.cuda.synchronize()
    estimate = max(_event_ms(fn, 2), 1e-3)
    rep = max(rep_ms, min_runs * estimate)
    if cudagraph:
        median, p20, p80 = do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
        return Timing(median, p20, p80, "do_bench_cudagraph+rotation")
    warmup = max(warmup_ms, min(3, min_runs) * estimate)
    median, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
    return Timing(median, p20, p80, "do_bench+l2_flush")


def graph_ms(fn: Callable[[], Any], *, calls_per_graph: int = 10, replays: int = 25) -> Timing:
    """GPU time of ``fn()`` without the host's launch cost, on a cold L2: one CUDA graph replays
    ``calls_per_graph`` x (L2 flush, ``fn()``), another the flushes alone; the difference per call,
    median (p20, p80) over paired replays. An eager call of a small kernel is bound by the host's
    Python and launch time (``time_ms``); this is what the GPU needs, which CUDA graphs (e.g.
    ``torch.compile(mode="reduce-overhead")``) let a user get. Raises if ``fn`` cannot be captured.
    """
    flush = torch.empty(2 * l2_cache_bytes() // 4, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    with_fn, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(with_fn):
        for _ in range(calls_per_graph):
            flush.zero_()
            fn()
    with torch.cuda.graph(flush_only):
        for _ in range(calls_per_graph):
            flush.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    replay_ms(with_fn), replay_ms(flush_only)
    per_call = sorted((replay_ms(with_fn) - replay_ms(flush_only)) / calls_per_graph for _ in range(replays))
    del with_fn, flush_only, flush

    def quantile(q: float) -> float:
        return per_call[min(len(per_call) - 1, round(q * (len(per_call) - 1)))]

    return Timing(quantile(QUANTILES[0]), quantile(QUANTILES[1]), quantile(QUANTILES[2]), "cuda_graph-flush")


def graph_row(step: Callable[[], Any]) -> dict[str, Any]:
    """The ``ms_graph`` fields of a row (``graph_ms`` of ``step``), or ``graph_error`` when the step
    cannot be captured (a host sync, say): the eager timing then stands alone."""
    try:
        graph = graph_ms(step)
    except Exception as e:
        return {"graph_error": f"{type(e).__name__}: {e}"[:200]}
    return {"ms_graph": graph.ms, "ms_graph_p20": graph.ms_p20, "ms_graph_p80": graph.ms_p80}


def l2_cache_bytes() -> int:
    """The current GPU's L2 size (50 MB on H100 SXM); 64 MiB if torch does not report it."""
    return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)) or 64 << 20


def rotation_copies(bytes_per_call: int, *, cache_bytes: int, max_copies: int = 64) -> int:
    """How many input sets make the bytes read between two uses of one set exceed twice the cache."""
    if bytes_per_call <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(2 * cache_bytes / bytes_per_call) + 1))


def rotate_inputs(
    run: Callable[..., Any], make_inputs: Callable[[], tuple], *, cache_bytes: int | None = None, max_copies: int = 64
) -> Callable[[], Any]:
    """A ``fn()`` that calls ``run(*inputs)`` on a different copy of the inputs each time.

    The copies are cycled so that a kernel never reads an input still in L2 from its last call
    (for ``do_bench_cudagraph``, which does not flush). ``make_inputs()`` returns a fresh tuple.
    """
    first = make_inputs()
    per_call = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
    n = rotation_copies(per_call, cache_bytes=l2_cache_bytes() if cache_bytes is None else cache_bytes)
    sets = [first] + [make_inputs() for _ in range(min(n, max_copies) - 1)]
    position = [0]

    def fn():
        inputs = sets[position[0] % len(sets)]
        position[0] += 1
        return run(*inputs)

    fn.copies = len(sets)
    return fn


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak GPU memory one call of ``fn`` allocates above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written, per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), min_runs=20)
    return gbps(2 * src.numel() * src.element_size(), timing.ms)


# ---------------------------------------------------------------------------------------- environment


def gpu_slug(gpu_name: str) -> str:
    """A folder name for a GPU: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return slug or "unknown-gpu"


def _run_text(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    commit = _run_text(["git", "rev-parse", "HEAD"], cwd=REPO_DIR)
    status = _run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR)
    return {"commit": commit or "unknown", "dirty": bool(status) if status is not None else None}


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # an optional package may fail in other ways than ImportError
        return None
    return getattr(module, "__version__", "unknown")


def _command_line() -> str:
    """How this process was started: ``python -m bench --quick``, ``d2v-kernels bench ...``, ``pytest ...``."""
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        program = f"python -m {Path(sys.argv[0]).parent.name}"
    return " ".join([program, shlex.join(sys.argv[1:])]).strip()


@functools.cache
def collected_env() -> dict[str, Any]:
    """``torch.utils.collect_env.get_env_info()`` (OS, compilers, CUDA runtime, driver, cuDNN, pip
    packages), without its per-core CPU flags: the CPU's model name only."""
    from torch.utils import collect_env

    info = collect_env.get_env_info()._asdict()
    cpu = str(info.pop("cpu_info", "") or "")
    info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), None)
    return info


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What ``torch.utils.collect_env`` reports (under ``collect_env``), and at the top level what
    the report reads: GPU, driver, CUDA, torch, triton, transformers and d2v_kernels versions, git
    commit, UTC date, the command line and ``argv`` (the arguments the benchmark script itself got,
    when a driver passed them), and the GPU's peaks (``device_peak()``).

    Works without a GPU (``gpu`` is then ``"none"``), so results code can be tested on a CPU.
    """
    collected = collected_env()
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "d2v_kernels": _version("d2v_kernels"),
        **git_commit(),
        "gpu": "none",
        "driver": collected.get("nvidia_driver_version"),
        "peak": None,
    }
    if has_gpu():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            peak=device_peak(),
        )
    env["collect_env"] = collected
    return env


# -------------------------------------------------------------------------------------------- results


def results_path(what: str, env: dict[str, Any], out_root: Path = RESULTS_DIR) -> Path:
    """``<out_root>/<gpu-slug>/<date>-<what>.json`` with the date as ``YYYYMMDD-HHMMSS`` (UTC)."""
    stamp = datetime.datetime.fromisoformat(env["date"]).strftime("%Y%m%d-%H%M%S")
    return Path(out_root) / gpu_slug(env["gpu"]) / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.+-]+', '_', what)}.json"


def write_results(
    what: str, rows: Iterable[dict[str, Any]], env: dict[str, Any], out_root: Path = RESULTS_DIR, **extra
) -> Path:
    """Write one result file (see the module docstring) and return its path."""
    rows = [dict(row, what=row.get("what", what)) for row in rows]
    path = results_path(what, env, out_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"schema": SCHEMA_VERSION, "what": what, **extra, "environment": env, "rows": rows}
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def progress_saver(
    what: str, env: dict[str, Any], out_root: Path = RESULTS_DIR, *, enabled: bool = True, **extra
) -> Callable[..., None]:
    """``save(rows, complete=False)``: (re)writes the run's result file, marked ``"complete"`` or not
    (nothing when not ``enabled``: a check-only run). A long run saves after every case, so one
    stopped at a time limit keeps what it measured."""

    def save(rows: list[dict[str, Any]], complete: bool = False) -> None:
        if not enabled:
            return
        path = write_results(what, rows, env, out_root, **extra, complete=complete)
        print(f"wrote {path}" + ("" if complete else f" ({len(rows)} rows so far)"), flush=True)

    return save


INTERRUPTED = 130  # exit status of a run stopped by SIGINT (`timeout --signal=INT` in scripts/gpu_session)


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_row(row: dict[str, Any]) -> None:
    """One row as a JSON line on stdout (progress while a long run goes)."""
    print(json.dumps(row, default=_json_default), flush=True)


# ------------------------------------------------------------------------------------ argument helpers


def parse_list(value: str | None, allowed: Iterable[str], option: str) -> list[str]:
    """``"fp16,bf16"`` -> ``["fp16", "bf16"]``, every item checked against ``allowed``."""
    allowed = list(allowed)
    values = [v.strip() for v in (value or "").split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{option}: unknown {unknown}; choose from {allowed}")
    return values
