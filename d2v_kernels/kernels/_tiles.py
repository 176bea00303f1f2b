"""Launch configurations (tile sizes, warps, pipeline stages) that a tuning run can override.

A launcher asks :func:`tiles` for its kernel's configuration, passing its default; inside
:func:`override` the given keys replace the default's. That is how ``bench/tune.py`` sweeps the
tiles on a GPU, and how the tests check that every swept tile computes the same function. With
no override active the defaults run unchanged (one dict lookup per launch). Kernels with a
candidate space (attention) ask :func:`d2v_kernels.kernels.autotune.launch_config` instead, which
puts an override over the autotuned, committed or default tiles the same way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

# The kernels whose launchers read their tiles here, and the keys each one takes.
TUNABLE: dict[str, tuple[str, ...]] = {
    "attention_fwd": ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
    "attention_bwd": ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
    "pos_conv": ("BLOCK_T", "BLOCK_CI", "num_warps", "num_stages"),
    "pos_conv_wgrad": ("BLOCK_T", "num_warps", "num_stages"),
    "conv0": ("BLOCK_T", "num_warps"),
    # layer 0's fused backward: frames per tile (at least 16), warps, persistent programs per SM
    "conv0_bwd": ("BLOCK_T", "num_warps", "programs_per_sm"),
    # LayerNorm (+ GELU, + residual) rows: positions per tile (the channels fill BLOCK_C), warps,
    # and for the backward the persistent programs per SM.
    "row_norm_fwd": ("BLOCK_P", "num_warps"),
    "row_norm_bwd": ("BLOCK_P", "num_warps", "programs_per_sm"),
}
_POWER_OF_TWO_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_T", "BLOCK_CI", "BLOCK_P", "num_warps")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: plain Python (``triton.cdiv`` is a constexpr function in Triton
    3.9, whose call wrapper costs microseconds on every launch)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``, in plain Python."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Process-wide, not per thread: on CUDA the autograd engine runs the backward in a worker thread
# of its own, and a backward launched there must see the override the forward ran under.
_stack: list[tuple[str, dict]] = []
_lock = threading.Lock()
# Called whenever an override starts or ends: the launch caches that fixed a tile forget it.
_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever the active overrides change (launch and plan caches register)."""
    _listeners.append(listener)


def clear_launches() -> None:
    """Make every launch and plan cache forget the tiles it fixed (the registered listeners)."""
    for listener in _listeners:
        listener()


def overridden(kernel: str) -> bool:
    """Whether an :func:`override` of ``kernel`` is active."""
    return any(name == kernel for name, _ in _stack)


def tiles(kernel: str, default: dict) -> dict:
    """``default`` with the keys of the innermost active :func:`override` of ``kernel`` replaced."""
    stack = _stack
    if not stack:
        return default
    for name, config in reversed(stack):
        if name == kernel:
            return {**default, **config}
    return default


def check_config(kernel: str, config: dict) -> None:
    """Raises ValueError for an unknown kernel or key, or a value that is not a positive int (a
    power of two for the sizes and warps)."""
    if kernel not in TUNABLE:
        raise ValueError(f"kernel must be one of {sorted(TUNABLE)}, got {kernel!r}")
    unknown = sorted(set(config) - set(TUNABLE[kernel]))
    if unknown:
        raise ValueError(f"{kernel} takes {list(TUNABLE[kernel])}, got unknown keys {unknown}")
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{kernel}: {key} must be a positive int, got {value!r}")
        if key in _POWER_OF_TWO_KEYS and value & (value - 1):
            raise ValueError(f"{kernel}: {key} must be a power of two, got {value}")


@contextlib.contextmanager
def override(kernel: str, **config: int) -> Iterator[None]:
    """Run ``kernel``'s launches with ``config`` (e.g. ``override("attention_fwd", BLOCK_M=64)``)
    in every thread of the process (a CUDA backward runs in the autograd engine's own thread);
    meant for tuning and tests, not for concurrent use. Raises ValueError as :func:`check_config`."""
    check_config(kernel, config)
    entry = (kernel, dict(config))
    with _lock:
        _stack.append(entry)
    clear_launches()
    try:
        yield
    finally:
        with _lock:
            del _stack[max(i for i, e in enumerate(_stack) if e is entry)]
        clear_launches()
