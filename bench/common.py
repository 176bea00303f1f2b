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
import json
import math
import os
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
# Absolute floor added to an error bound, per dtype (about a few ulps at magnitude 1).
ABS_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-12}


# ----------------------------------------------------------------------------------- hardware peaks


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """Datasheet peaks of one GPU: dense (no sparsity) tensor-core TFLOP/s per dtype, and HBM GB/s."""

    name: str
    tflops: dict[str, float]
    hbm_gbps: float


# Matched in order against torch.cuda.get_device_name(); the first pattern that matches wins.
# Dense figures from NVIDIA's datasheets (the 2:4-sparsity figures are twice these).
# fp32 here means TF32 tensor cores (what matmuls use with allow_tf32); "fp32_simt" the CUDA cores.
KNOWN_GPUS: tuple[tuple[str, DevicePeak], ...] = (
    ("H200 NVL", DevicePeak("H200 NVL", {"fp16": 835.0, "bf16": 835.0, "fp32": 418.0, "fp32_simt": 60.0}, 4800.0)),
    ("H200", DevicePeak("H200 SXM", {"fp16": 989.4, "bf16": 989.4, "fp32": 494.7, "fp32_simt": 66.9}, 4800.0)),
    ("H100 NVL", DevicePeak("H100 NVL", {"fp16": 835.0, "bf16": 835.0, "fp32": 418.0, "fp32_simt": 60.0}, 3900.0)),
    ("H100 PCIe", DevicePeak("H100 PCIe", {"fp16": 756.0, "bf16": 756.0, "fp32": 378.0, "fp32_simt": 51.2}, 2000.0)),
    ("H100", DevicePeak("H100 SXM", {"fp16": 989.4, "bf16": 989.4, "fp32": 494.7, "fp32_simt": 66.9}, 3350.0)),
    ("A100.*80GB.*PCIe", DevicePeak("A100 80GB PCIe", {"fp16": 312.0, "bf16": 312.0, "fp32": 156.0}, 1935.0)),
    ("A100.*PCIE", DevicePeak("A100 40GB PCIe", {"fp16": 312.0, "bf16": 312.0, "fp32": 156.0}, 1555.0)),
    ("A100.*80GB", DevicePeak("A100 80GB SXM", {"fp16": 312.0, "bf16": 312.0, "fp32": 156.0}, 2039.0)),
    ("A100", DevicePeak("A100 40GB SXM", {"fp16": 312.0, "bf16": 312.0, "fp32": 156.0}, 1555.0)),
)


def device_peak(gpu_name: str) -> DevicePeak | None:
    """The datasheet peaks of a GPU by its name (``torch.cuda.get_device_name()``), or None if unknown."""
    for pattern, peak in KNOWN_GPUS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return peak
    return None


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


# --------------------------------------------------------------------------------------------- checks


class CheckFailed(AssertionError):
    """An implementation's output is not close enough to the reference; it is not timed."""


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def check_close(
    name: str,
    out,
    ref,
    eager=None,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    rtol: float = 0.0,
) -> dict[str, float]:
    """Assert ``out`` is close to ``ref`` (ideally a float64 run); returns ``{"max_err", "bound"}``.

    With ``eager`` (the same computation in eager PyTorch in ``out``'s dtype) the bound is
    ``factor`` x eager's own max error + ``floor`` (default per dtype, scaled by the reference's
    magnitude when it is above 1); without it, ``floor + rtol * max|ref|``. Tensors, or matching
    (nested) tuples / lists / dicts of tensors. Raises ``CheckFailed`` with the numbers.
    """
    outs, refs = _tensors(out), _tensors(ref)
    eagers = _tensors(eager) if eager is not None else [None] * len(outs)
    if not (len(outs) == len(refs) == len(eagers)) or not outs:
        raise CheckFailed(f"{name}: {len(outs)} output tensors vs {len(refs)} reference tensors")
    worst = {"max_err": 0.0, "bound": 0.0, "ratio": -1.0}
    for i, (o, r, e) in enumerate(zip(outs, refs, eagers)):
        if o.shape != r.shape:
            raise CheckFailed(f"{name}[{i}]: shape {tuple(o.shape)} != reference {tuple(r.shape)}")
        r64 = r.detach().double()
        err = (o.detach().double() - r64).abs().max().item() if o.numel() else 0.0
        scale = max(1.0, r64.abs().max().item()) if r.numel() else 1.0
        base = (ABS_FLOOR.get(o.dtype, 1e-3) if floor is None else floor) * scale
        if e is not None:
            bound = factor * ((e.detach().double() - r64).abs().max().item() if e.numel() else 0.0) + base
        else:
            bound = base + rtol * scale
        if not err <= bound:  # also catches NaN
            raise CheckFailed(f"{name}[{i}]: max error {err:.3e} > bound {bound:.3e}")
        ratio = err / bound if bound else 0.0
        if ratio > worst["ratio"]:
            worst = {"max_err": err, "bound": bound, "ratio": ratio}
    return {"max_err": worst["max_err"], "bound": worst["bound"]}


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


def driver_version() -> str:
    text = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return text.splitlines()[0].strip() if text else "unknown"


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


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """GPU, driver, CUDA, library versions, git commit, UTC date, the command line and ``argv``
    (the arguments the benchmark script itself got, when a driver passed them).

    Works without a GPU (``gpu`` is then ``"none"``), so results code can be tested on a CPU.
    """
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
    }
    if has_gpu():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        peak = device_peak(props.name)
        env.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            driver=driver_version(),
            cudnn=torch.backends.cudnn.version(),
            peak=dataclasses.asdict(peak) if peak else None,
        )
    else:
        env.update(gpu="none", driver=None, cudnn=None, peak=None)
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


# ---------------------------------------------------------------------- cases for pytest-benchmark


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One timed case for ``pytest bench --benchmark-only``.

    ``setup()`` runs on the GPU: it builds the inputs, checks the output against the reference
    (raising ``CheckFailed``) and returns the zero-argument function to time. An op module offers
    its cases through ``benchmark_cases(quick: bool) -> list[BenchCase]``.
    """

    id: str
    setup: Callable[[], Callable[[], Any]]
    group: str = ""
    extra_info: dict[str, Any] = dataclasses.field(default_factory=dict)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
