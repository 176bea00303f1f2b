"""Tiles chosen by measurement: each kernel's candidate configurations, the committed table of
measured winners, and autotuning on the GPU a process runs on, cached on disk.

A launcher asks :func:`launch_config` once per input layout (its launch cache keeps the answer;
:func:`d2v_kernels.kernels._tiles.on_change` clears those caches), giving its hard-coded default,
the input's shape bucket (a string such as ``"bf16 d64 n512 mask"``) and a ``measure`` function.
An active :func:`~d2v_kernels.kernels._tiles.override` of the kernel (tests, ``bench.tune``) puts
its keys over what the first of these gives (with no autotuning):

1. Under the Triton interpreter: the default, whatever the environment says (one fixed
   configuration, the one CI checks).
2. With ``D2V_KERNELS_AUTOTUNE=1`` on a CUDA device: the fastest of the kernel's candidates
   (:data:`SPACES`) for this bucket on this GPU, read from the disk cache or, the first time,
   timed on the real inputs (``triton.testing.do_bench``; ``measure`` writes to scratch outputs)
   and written there. One file per GPU name and Triton version under ``D2V_KERNELS_CACHE_DIR``
   (default ``~/.cache/d2v_kernels``), written to a temporary file and renamed, so a reader never
   sees half a file; an unreadable file or entry is ignored (tuned again).
3. :data:`TABLE`, the committed winners of ``bench.tune --space`` runs: the row of this GPU's
   family (``"H100"``, ``"A100"``), else the ``"any"`` row.
4. The default.

Autotuning costs a few compiles and about a second of timing at the first call of each bucket,
hence opt-in; and a choice made by timing may differ between two machines (and with it the float
rounding), so runs that must repeat bitwise across machines leave it off. A half-precision
default is one of the candidates, so every configuration a table row or the autotuner can pick is
in the space that ``python -m d2v_kernels.kernels.aot --space`` compiles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from d2v_kernels.kernels._tiles import check_config, clear_launches, overridden, tiles

__all__ = [
    "ENV_AUTOTUNE",
    "ENV_CACHE_DIR",
    "SPACES",
    "TABLE",
    "autotune_enabled",
    "cache_dir",
    "cache_path",
    "config_label",
    "forget_tuned",
    "gpu_family",
    "launch_config",
    "record_choices",
    "sequence_bucket",
    "time_ms",
    "tuned_config",
    "tuning_gpu",
]

ENV_AUTOTUNE = "D2V_KERNELS_AUTOTUNE"
ENV_CACHE_DIR = "D2V_KERNELS_CACHE_DIR"
_FORMAT = 1  # of the cache file; a file of another format is ignored


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> dict[str, int]:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


# The candidates of each kernel, in half precision (fp32 runs its default). Registers are sm_90's
# (ptxas, as the models run them: fp16 table, bf16 padding mask, bf16 mask + dropout, d=64).
SPACES: dict[str, tuple[dict[str, int], ...]] = {
    "attention_fwd": (
        _config(128, 64, 4, 3),  # the default without a bias tile, up to d=64
        _config(128, 64, 8, 3),  # the default at d=128 or with dropout; 179 registers with the table
        _config(128, 32, 8, 3),  # the default with a bias tile
        _config(64, 64, 4, 3),  # twice the programs (short sequences, small batches); 125-178 registers
    ),
    "attention_bwd": (
        _config(64, 64, 8, 2),  # the default up to d=64
        _config(32, 64, 8, 2),  # the default at d=128
        _config(32, 32, 4, 2),  # dK/dV at 126-168 registers: 3 programs an SM where 64 x 64 holds 1
        _config(32, 128, 8, 2),  # FlashAttention-2's dK/dV shape: wide key blocks, short query steps
    ),
}

# (GPU family or "any", kernel, bucket) -> configuration, from ``python -m bench.tune --table
# <result>``, which prints these rows with their timings. No GPU run has filled it yet: every
# launch takes its launcher's default.
TABLE: dict[tuple[str, str, str], dict[str, int]] = {}


def config_label(config: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items()) or "default"


def sequence_bucket(n: int) -> int:
    """The sequence-length part of a bucket: the power of two at or above ``n``, from 64 to 16384."""
    n = min(max(n, 64), 16384)
    return 1 << (n - 1).bit_length()


def gpu_family(name: str) -> str:
    """The family a GPU name belongs to for :data:`TABLE`: its model number ("NVIDIA H100 80GB
    HBM3" -> "H100", "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA L40S" -> "L40S"), else the name."""
    match = re.search(r"\b([A-Z]{0,2}\d{2,4}[A-Z]?)\b", name)
    return match.group(1) if match else name.strip()


def autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "0") == "1"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_names: dict[int, str] = {}


def tuning_gpu(device: torch.device) -> str | None:
    """The name of the GPU a launch on ``device`` would be tuned for; None under the interpreter or
    off CUDA."""
    if device.type != "cuda" or _interpreting():
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    name = _names.get(index)
    if name is None:
        name = _names[index] = torch.cuda.get_device_name(index)
    return name


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def time_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``fn()`` on the current GPU (``triton.testing.do_bench``, cold L2 each run)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


# --------------------------------------------------------------------------------------------
# The disk cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``D2V_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/d2v_kernels``, else ``~/.cache/d2v_kernels``."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "d2v_kernels"


def cache_path(gpu: str, root: Path | None = None) -> Path:
    """The file of ``gpu``'s tuned configurations under the running Triton version."""
    import triton

    slug = re.sub(r"[^a-z0-9]+", "-", f"{gpu} triton {triton.__version__}".lower()).strip("-")
    return (cache_dir() if root is None else Path(root)) / f"autotune-{slug}.json"


def _read_entries(path: Path, gpu: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    import triton

    if not isinstance(data, dict) or (data.get("format"), data.get("gpu"), data.get("triton")) != (
        _FORMAT,
        gpu,
        triton.__version__,
    ):
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_entry(path: Path, gpu: str, key: str, entry: dict) -> None:
    """Adds ``entry`` to the file (read again first: another process may have added its own), through
    a temporary file renamed over it. A cache that cannot be written is skipped: the next process
    tunes again."""
    import triton

    entries = {**_read_entries(path, gpu), key: entry}
    data = {"format": _FORMAT, "gpu": gpu, "triton": triton.__version__, "entries": entries}
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _valid(kernel: str, config: object, candidates: tuple[dict, ...]) -> bool:
    if not isinstance(config, dict):
        return False
    try:
        check_config(kernel, config)
    except ValueError:
        return False
    return config in candidates


# (gpu, kernel, bucket) -> the configuration chosen in this process
_tuned: dict[tuple[str, str, str], dict[str, int]] = {}
_lock = threading.RLock()


def forget_tuned() -> None:
    """Forget this process's tuned configurations (read from the disk cache again) and the launches
    that fixed them."""
    with _lock:
        _tuned.clear()
    clear_launches()


def tuned_config(
    kernel: str,
    bucket: str,
    candidates: tuple[dict[str, int], ...],
    measure: Callable[[dict[str, int]], Callable[[], object]],
    *,
    gpu: str,
    timer: Callable[[Callable[[], object]], float] | None = None,
    root: Path | None = None,
) -> dict[str, int] | None:
    """The fastest of ``candidates`` for ``kernel`` at ``bucket`` on ``gpu``: this process's choice,
    else the disk cache's, else measured now (``timer(measure(config))`` in ms for each; a candidate
    that raises, e.g. out of shared memory, is passed over) and written to the cache. None when no
    candidate ran."""
    key = (gpu, kernel, bucket)
    with _lock:
        chosen = _tuned.get(key)
        if chosen is not None:
            return chosen
        path = cache_path(gpu, root)
        entry = _read_entries(path, gpu).get(f"{kernel}|{bucket}")
        chosen = entry.get("config") if isinstance(entry, dict) else None
        if not _valid(kernel, chosen, candidates):
            timings = {}
            for config in candidates:
                try:
                    timings[config_label(config)] = (timer or time_ms)(measure(config))
                except Exception:  # a candidate this GPU cannot run (shared memory, registers) is passed over
                    timings[config_label(config)] = None
            ran = [(ms, i) for i, ms in enumerate(timings.values()) if ms is not None]
            if not ran:
                return None
            chosen = candidates[min(ran)[1]]
            _write_entry(path, gpu, f"{kernel}|{bucket}", {"config": chosen, "ms": timings})
        _tuned[key] = dict(chosen)
        return _tuned[key]


# --------------------------------------------------------------------------------------------
# The lookup
# --------------------------------------------------------------------------------------------

_recordings: list[list[dict]] = []


@contextlib.contextmanager
def record_choices() -> Iterator[list[dict]]:
    """Collects ``{"kernel", "bucket", "config", "source"}`` for every :func:`launch_config` answer
    inside the block, in every thread (``bench.tune`` reads the buckets its cases fall in).
    ``source`` is "interpreter", "override", "autotune", "table" or "default"."""
    seen: list[dict] = []
    _recordings.append(seen)
    try:
        yield seen
    finally:
        _recordings.remove(seen)


def launch_config(
    kernel: str,
    default: dict[str, int],
    *,
    bucket: str,
    device: torch.device,
    candidates: tuple[dict[str, int], ...] = (),
    measure: Callable[[dict[str, int]], Callable[[], object]] | None = None,
) -> dict[str, int]:
    """``kernel``'s configuration for an input of ``bucket`` on ``device``, in the order of the module
    docstring. ``measure(config)`` returns a function that runs the kernel once with ``config`` on
    this input, writing only scratch outputs; autotuning needs it and at least two candidates."""
    gpu = tuning_gpu(device)
    if gpu is None:
        source, config = ("interpreter" if _interpreting() else "default"), default
    else:
        source, config = "default", default
        if not overridden(kernel) and measure is not None and len(candidates) > 1 and autotune_enabled():
            if not _capturing():
                tuned = tuned_config(kernel, bucket, candidates, measure, gpu=gpu)
                if tuned is not None:
                    source, config = "autotune", tuned
        if source == "default":
            row = TABLE.get((gpu_family(gpu), kernel, bucket)) or TABLE.get(("any", kernel, bucket))
            if row is not None:
                source, config = "table", row
    if overridden(kernel):
        source, config = "override", tiles(kernel, config)
    for seen in _recordings:
        seen.append({"kernel": kernel, "bucket": bucket, "config": dict(config), "source": source})
    return config
