"""Launching a compiled Triton kernel without Triton's per-call binder.

``kernel[grid](*args, **kwargs)`` binds about fifty arguments through a generated function,
specialises each one, builds a cache key with ``str(options)`` and looks the compiled kernel up, on
every call: tens of microseconds of host time, more than the kernels of a small layer take on a
GPU. A launcher that has already fixed everything the specialisation depends on (shapes, strides,
dtypes, alignment: the caller's layout key) can keep the compiled kernel and call its launcher
directly, as PyTorch's static launcher, Helion and vLLM do.

:class:`DirectLaunch` does that for one layout: its first call goes through ``JITFunction.run``
(compiling or finding the kernel), later calls hand the same arguments to the compiled kernel's
``run`` with the current stream. It falls back to the full path, call by call, where Triton's own
launch does more than the direct one would: the Triton interpreter (no compiled kernel), launch
hooks (profilers), or a current device other than the one the kernel was loaded on. What it
needs from Triton is found by structure (``run``, ``function``, ``packed_metadata`` on the
compiled kernel; ``launch_enter_hook`` on the runtime knobs), never by version.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from triton.runtime import driver as _driver

try:
    from triton import knobs as _knobs

    _RUNTIME = _knobs.runtime
except ImportError:  # pragma: no cover - a Triton without knobs: always the full path
    _RUNTIME = None

__all__ = ["DirectLaunch", "LaunchCache", "empty_template", "fixed_tail", "operand_key", "resident_programs"]


def _hook_set(chain) -> bool:
    """A hook chain with a listener, or (a Triton whose hook is a plain callable) any hook."""
    return chain is not None and bool(getattr(chain, "calls", True))


def _hooks_installed() -> bool:
    """True when a launch hook is set (a profiler listens): the full path calls it."""
    if _RUNTIME is None:
        return True
    return _hook_set(getattr(_RUNTIME, "launch_enter_hook", None)) or _hook_set(
        getattr(_RUNTIME, "launch_exit_hook", None)
    )


def _launchable(compiled) -> bool:
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))


class DirectLaunch:
    """One specialisation of a ``@triton.jit`` kernel: ``launch(*args)`` runs ``fn[grid](*args,
    **options)``, every parameter positional (constexpr values included, in the kernel's order).

    The caller guarantees that every call's arguments specialise as the first call's did (same
    dtypes, the same integers where Triton specialises them, pointers with the same 16-byte
    alignment); it keys one instance per such layout.

    ``fit``: called once with the compiled kernel before its first launch, returns the grid to
    launch with from then on (a persistent kernel sizes its grid to the programs its registers
    let an SM hold at once). Only on a GPU: the interpreter has no compiled kernel.
    """

    __slots__ = ("_compiled", "_device", "_fit", "_grid3", "fn", "grid", "options")

    def __init__(self, fn, grid: Sequence[int], fit: Callable[[object], Sequence[int]] | None = None, **options):
        self.fn = fn
        self.options = options
        self._fit = fit
        self._set_grid(grid)
        self._compiled = None
        self._device = None

    def _set_grid(self, grid: Sequence[int]) -> None:
        self.grid = tuple(grid)
        self._grid3 = (*self.grid, 1, 1)[:3]

    def __call__(self, *args) -> None:
        compiled = self._compiled
        if compiled is not None:
            active = _driver.active
            device = active.get_current_device()
            if device == self._device and not _hooks_installed():
                g0, g1, g2 = self._grid3
                compiled.run(
                    g0, g1, g2, active.get_current_stream(device), compiled.function, compiled.packed_metadata,
                    None, None, None, *args,
                )  # fmt: skip
                return
        self._launch_full(args)

    def _launch_full(self, args) -> None:
        if self._fit is not None:
            fit, self._fit = self._fit, None
            self._set_grid(fit(self.fn.run(*args, grid=self.grid, warmup=True, **self.options)))
        compiled = self.fn.run(*args, grid=self.grid, warmup=False, **self.options)
        if self._compiled is None and _launchable(compiled):
            self._compiled = compiled
            self._device = _driver.active.get_current_device()


# Per SM, on every NVIDIA GPU since sm_80: at most 32 resident programs, registers given out per warp
# in units of 256, 1 KB of shared memory reserved by the driver for each program.
_MAX_PROGRAMS_PER_SM = 32
_REGISTER_UNIT = 256
_RESERVED_SHARED_PER_PROGRAM = 1024


def resident_programs(compiled, num_warps: int, device: torch.device) -> int | None:
    """How many programs of ``compiled`` (a Triton kernel of ``num_warps`` warps, loaded on
    ``device``) one SM holds at once, from its registers and shared memory; None where Triton does
    not report its registers. CUDA's occupancy rule, as its occupancy calculator applies it."""
    if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
        compiled._init_handles()  # loads the module, as its first launch would: ptxas's count is known then
    n_regs = getattr(compiled, "n_regs", None)
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    if not isinstance(n_regs, int) or n_regs <= 0 or not isinstance(shared, int):
        return None
    return programs_per_sm(n_regs, shared, num_warps, *_sm_resources(device))


def programs_per_sm(
    n_regs: int, shared: int, num_warps: int, registers: int, threads: int, shared_per_sm: int, warp_size: int = 32
) -> int:
    """Programs of ``num_warps`` warps, ``n_regs`` registers a thread and ``shared`` bytes of shared
    memory that fit at once on an SM with ``registers`` registers, ``threads`` threads and
    ``shared_per_sm`` bytes of shared memory (at least 0)."""
    per_warp = -(-n_regs * warp_size // _REGISTER_UNIT) * _REGISTER_UNIT
    fits = min(_MAX_PROGRAMS_PER_SM, registers // (per_warp * num_warps), threads // (warp_size * num_warps))
    if shared:
        fits = min(fits, shared_per_sm // (shared + _RESERVED_SHARED_PER_PROGRAM))
    return fits


@functools.cache
def _sm_resources(device: torch.device) -> tuple[int, int, int, int]:
    props = torch.cuda.get_device_properties(device)
    # (regs_per_multiprocessor is missing from older torch builds: 64K on every GPU since sm_80)
    registers = getattr(props, "regs_per_multiprocessor", None) or 65536
    return registers, props.max_threads_per_multi_processor, props.shared_memory_per_multiprocessor, props.warp_size


def empty_template(shape, dtype, device) -> torch.Tensor:
    """A one-element tensor expanded to ``shape``: ``torch.empty_like`` of it is a new contiguous
    tensor of that shape, dtype and device. A launch keeps one per output it allocates: an
    ``empty_like`` has no size list to parse, and costs a fraction of ``new_empty(shape, dtype=...)``
    on the host."""
    return torch.empty((1,) * len(shape), dtype=dtype, device=device).expand(shape)


def operand_key(t) -> tuple | None:
    """What a launch specialises on for one tensor operand (None for an absent one): shape,
    strides, dtype and whether its pointer is 16-byte aligned. Launch caches key on it."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15)


def fixed_tail(fn, n_runtime: int, positional: Sequence, constexprs: dict) -> tuple:
    """The arguments of ``fn`` after its first ``n_runtime`` ones (those are given per call), in
    the kernel's order: ``positional`` fills the parameters that follow the runtime ones, then
    ``constexprs`` the rest by name. A launcher fixes them once per layout and calls
    ``launch(*runtime, *tail)``."""
    names = fn.arg_names[n_runtime:]
    values = dict(zip(names, positional))
    values.update(constexprs)
    missing = [name for name in names if name not in values]
    if missing or len(positional) > len(names):
        raise TypeError(f"{fn.__name__}: no value for {missing}" if missing else f"{fn.__name__}: too many arguments")
    return tuple(values[name] for name in names)


class LaunchCache:
    """Launch objects of one launcher, per layout key (bounded: each input length adds one),
    forgotten when a tile override starts or ends (they fixed their tiles)."""

    def __init__(self, max_size: int = 1024):
        from d2v_kernels.kernels._tiles import on_change

        self._launches: dict = {}
        self._max_size = max_size
        on_change(self._launches.clear)

    def get(self, key, make):
        """The launch kept under ``key``, made by ``make()`` the first time."""
        launch = self._launches.get(key)
        if launch is None:
            if len(self._launches) >= self._max_size:
                self._launches.clear()
            launch = self._launches[key] = make()
        return launch
