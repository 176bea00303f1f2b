"""The one place that decides which implementation of an op runs.

Each op registers its implementations (``triton``, ``cuda``, ``sdpa``, ``eager``) in priority
order. An implementation declares the devices it runs on and a ``check`` that answers an input with
a list of plain-language reasons it cannot take it. ``call`` runs the first implementation with no
reasons (eager last), records the choice for :func:`record_dispatch`, and warns once per
(op, reasons) when a CUDA input falls back from a kernel that default dispatch would run.

An op may declare a measured rule (:func:`register_rule`): for a class of inputs, the backends that
committed GPU measurements show to be faster than the priority order's first, tried before it.
A preferred backend that cannot take an input is passed over without a warning: the rule is a
preference, the priority order the default. An opt-in
implementation that is not enabled is no fallback: the default path never warns. ``use_backend``
(or the environment variable ``D2V_KERNELS_BACKEND``) forces a backend and raises with the reasons
when it cannot take the input.

The ops cache a decision per input layout (their plan caches, :func:`plan_cache`). What a decision
depends on beyond the input is part of the cache key or clears the caches: the backends forced in
this thread (:func:`forced_token`, in the key), the environment variables (read into a snapshot,
compared on each :func:`forced_token` call by their raw values, caches cleared when one changes;
an op adds the variables its plans read with :func:`watch_environment`), registrations and tile
overrides (:func:`clear_plans`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch

BACKENDS = ("triton", "cuda", "sdpa", "eager")
ENV_BACKEND = "D2V_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot take the input; the message lists every reason."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run an op.

    ``run(*args, **kwargs)`` computes the op; ``check(*args, **kwargs)`` returns the reasons it
    cannot (empty when it can). ``devices`` are the torch device types it runs on natively.
    """

    op: str
    backend: str
    run: Callable
    check: Callable[..., list[str]]
    devices: tuple[str, ...]
    available: Callable[[], list[str]] = lambda: []
    description: str = ""
    opt_in: bool = False  # runs only when forced or enabled (slower than the default where both run)


_REGISTRY: dict[str, list[Implementation]] = {}
# The CUDA extension ranks after Triton: it is the slower path wherever both can run (see
# bench/results), and ranked first it would be asked, and loaded, on every default GPU call.
_PRIORITY = {"triton": 0, "cuda": 1, "sdpa": 2, "eager": 3}


def register(
    op: str,
    backend: str,
    run: Callable,
    check: Callable[..., list[str]] | None = None,
    *,
    devices: Sequence[str] = ("cuda",),
    available: Callable[[], list[str]] | None = None,
    description: str = "",
    opt_in: bool = False,
) -> Implementation:
    """Register an implementation of ``op``; kernels before eager, triton before cuda.

    ``opt_in=True`` keeps it out of default dispatch (it runs when forced with ``use_backend``, or
    by default once ``D2V_KERNELS_ENABLE_OPT_IN=1``): for kernels slower than the default where
    both run, kept for what they are (the CUDA extension) until they win.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impl = Implementation(
        op=op,
        backend=backend,
        run=run,
        check=check or (lambda *a, **k: []),
        devices=tuple(devices),
        available=available or (lambda: []),
        description=description,
        opt_in=opt_in,
    )
    impls = [i for i in _REGISTRY.get(op, []) if i.backend != backend]
    impls.append(impl)
    impls.sort(key=lambda i: _PRIORITY[i.backend])
    _REGISTRY[op] = impls
    clear_plans()
    return impl


@dataclasses.dataclass(frozen=True)
class Rule:
    """A measured preference of ``op``: ``prefer(*args, **kwargs)`` names, for an input, the backends
    to try before the priority order (an empty tuple: none); ``evidence`` cites the committed
    measurement (a file under bench/results) it was written from."""

    op: str
    prefer: Callable[..., tuple[str, ...]]
    evidence: str


_RULES: dict[str, Rule] = {}


def register_rule(op: str, prefer: Callable[..., tuple[str, ...]], *, evidence: str) -> Rule:
    """Declare ``op``'s measured rule (one per op; a later one replaces it). ``evidence`` must name
    the measurement; a rule without one is not a rule. ``prefer`` may read only what the ops' plan
    keys hold (the inputs' layouts, the flags, grad mode): its answer is cached with the plan."""
    if not evidence or not evidence.strip():
        raise ValueError(f"register_rule({op!r}): evidence must cite the measurement the rule is written from")
    declared = Rule(op=op, prefer=prefer, evidence=evidence)
    _RULES[op] = declared
    clear_plans()
    return declared


def rule(op: str) -> Rule | None:
    """``op``'s measured rule, or None."""
    _ensure_ops_loaded()
    return _RULES.get(op)


def implementations(op: str) -> list[Implementation]:
    """The registered implementations of ``op`` in dispatch order."""
    _ensure_ops_loaded()
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def ops() -> list[str]:
    _ensure_ops_loaded()
    return sorted(_REGISTRY)


_ops_loaded = False


def _ensure_ops_loaded() -> None:
    """Import every op module once (each registers itself); no import afterwards, so the hot path
    traced by torch.compile has none."""
    global _ops_loaded
    if not _ops_loaded:
        import d2v_kernels.ops  # noqa: F401

        _ops_loaded = True


# --------------------------------------------------------------------------------------------
# Forcing backends: use_backend() and D2V_KERNELS_BACKEND
# --------------------------------------------------------------------------------------------


class _State(threading.local):
    # The use_backend() stack of this thread, innermost last: an immutable tuple of
    # (global backend or None, ((op, backend), ...)) entries, so it can key the ops' plan caches.
    # An instance attribute set in each thread, not a class default: torch 2.11's dynamo reads a
    # threading.local subclass's class default in place of the thread's value.
    def __init__(self):
        self.forced = ()


_state = _State()


def _parse_backend_spec(spec: str) -> tuple[str | None, dict[str, str]]:
    """``"triton"`` or ``"attention=triton,pos_conv=eager"`` -> (global, per-op)."""
    global_backend, per_op = None, {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            op, backend = (s.strip() for s in part.split("=", 1))
            per_op[op] = backend
        else:
            global_backend = part
    _validate_forced(global_backend, per_op, source=f"{ENV_BACKEND}={spec!r}")
    return global_backend, per_op


def _validate_forced(global_backend: str | None, per_op: dict[str, str], source: str) -> None:
    if global_backend is not None and global_backend not in BACKENDS:
        raise ValueError(f"{source}: backend must be one of {BACKENDS}, got {global_backend!r}")
    for op, backend in per_op.items():
        if backend not in BACKENDS:
            raise ValueError(f"{source}: backend for {op!r} must be one of {BACKENDS}, got {backend!r}")
        known = ops()
        if op not in known:
            raise ValueError(f"{source}: unknown op {op!r}; known ops: {known}")


def forced_backend(op: str) -> tuple[str | None, bool]:
    """(backend forced for ``op`` or None, whether it was forced for this op by name)."""
    for global_backend, per_op in reversed(_state.forced):
        for name, backend in per_op:
            if name == op:
                return backend, True
        if global_backend is not None:
            return global_backend, False
    spec = _environment().backend_spec
    if spec:
        global_backend, per_op = _parse_backend_spec(spec)
        if op in per_op:
            return per_op[op], True
        return global_backend, False
    return None, False


@contextlib.contextmanager
def use_backend(backend: str | None = None, **per_op: str) -> Iterator[None]:
    """Force a backend for every op that has it (``use_backend("triton")``) or per op
    (``use_backend(attention="triton", pos_conv="eager")``).

    An op forced by name must run that backend or raise :class:`BackendUnavailableError` with
    the reasons. A global backend applies to the ops that have it; the others dispatch as usual.
    """
    _validate_forced(backend, per_op, source="use_backend()")
    for op, b in per_op.items():
        if b not in {i.backend for i in implementations(op)}:
            raise ValueError(f"use_backend(): op {op!r} has no {b!r} implementation")
    previous = _state.forced
    _state.forced = (*previous, (backend, tuple(sorted(per_op.items()))))
    try:
        yield
    finally:
        _state.forced = previous


# --------------------------------------------------------------------------------------------
# Recording what ran
# --------------------------------------------------------------------------------------------

_recorders: list[Counter] = []
_warned: set[tuple[str, tuple[str, ...]]] = set()


@contextlib.contextmanager
def record_dispatch() -> Iterator[Counter]:
    """Count which implementation really ran: ``Counter({(op, backend): n})``."""
    counter: Counter = Counter()
    _recorders.append(counter)
    try:
        yield counter
    finally:
        _recorders.remove(counter)


def record(op: str, backend: str) -> None:
    """Count one run of ``op`` by ``backend`` in every active :func:`record_dispatch` (for callers
    that run an implementation themselves, e.g. eager attention when the weights are asked for)."""
    for counter in _recorders:
        counter[(op, backend)] += 1


def reset_warnings() -> None:
    """Forget which fallbacks were already warned about (tests use this)."""
    _warned.clear()


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


ENV_ENABLE_OPT_IN = "D2V_KERNELS_ENABLE_OPT_IN"
_ENV_NAMES = (ENV_BACKEND, ENV_ENABLE_OPT_IN, "TRITON_INTERPRET")


@dataclasses.dataclass(frozen=True)
class _Environment:
    raw: tuple
    backend_spec: str
    opt_in_enabled: bool
    interpreter: bool
    values: dict  # every watched variable's value (None when unset)


def _read_environment(raw: tuple) -> _Environment:
    values = {name: os.environ.get(name) for name in _ENV_NAMES}
    spec, opt_in, interpret = (values[name] for name in (ENV_BACKEND, ENV_ENABLE_OPT_IN, "TRITON_INTERPRET"))
    return _Environment(
        raw=raw,
        backend_spec=(spec or "").strip(),
        opt_in_enabled=opt_in == "1",
        interpreter=(interpret or "0") not in ("", "0"),
        values=values,
    )


try:  # os.environ's own dict: a plain lookup, where os.environ.get encodes and decodes on every call
    _ENV_DATA = os.environ._data
    _encode_key = os.environ.encodekey
except AttributeError:  # pragma: no cover - another Python's os.environ
    _ENV_DATA, _encode_key = os.environ, lambda name: name
_ENV_KEYS = tuple(_encode_key(name) for name in _ENV_NAMES)


def _raw_environment() -> tuple:
    # (a comprehension: torch 2.11's dynamo cannot trace map() over the dict's bound get)
    return tuple([_ENV_DATA.get(key) for key in _ENV_KEYS])


_env = _read_environment(_raw_environment())
_plan_caches: list[dict] = []


def _environment() -> _Environment:
    """The environment variables dispatch reads, re-read (and the plan caches cleared) when one changed."""
    global _env
    raw = _raw_environment()
    if raw != _env.raw:
        _env = _read_environment(raw)
        clear_plans()
    return _env


def watch_environment(name: str) -> None:
    """Read the environment variable ``name`` as dispatch reads its own: into the snapshot that
    every :func:`forced_token` call compares with the environment (a change clears every plan
    cache), its value from :func:`environment_value`. For an op whose plans depend on one."""
    global _ENV_NAMES, _ENV_KEYS, _env
    if name not in _ENV_NAMES:
        _ENV_NAMES = (*_ENV_NAMES, name)
        _ENV_KEYS = (*_ENV_KEYS, _encode_key(name))
        _env = _read_environment(_raw_environment())
        clear_plans()


def environment_value(name: str) -> str | None:
    """The value of a variable :func:`watch_environment` watches, as of the last snapshot (re-read
    here when the environment changed)."""
    return _environment().values[name]


def plan_cache() -> dict:
    """A dict for an op's cached decisions, cleared with every other one by :func:`clear_plans`."""
    cache: dict = {}
    _plan_caches.append(cache)
    return cache


def clear_plans() -> None:
    """Forget every op's cached decisions (after something they depend on changed outside the
    cache key: a registration, a tile override, a patched availability check)."""
    for cache in _plan_caches:
        cache.clear()


def forced_token() -> tuple:
    """What the backends forced in this thread are, as a hashable value for an op's plan key (and
    the check that the environment is unchanged since the plans were made)."""
    if _raw_environment() != _env.raw:
        _environment()
    return _state.forced


def triton_interpreter_enabled() -> bool:
    return _environment().interpreter


# Backends whose ops are this package's custom ops and autograd.Functions (eager and sdpa are aten).
_CUSTOM_OP_BACKENDS = ("triton", "cuda")
# Whether a torch.func transform is active now.
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def device_reasons(impl: Implementation, device: torch.device, forced: bool) -> list[str]:
    """Why ``impl`` cannot run on ``device`` at all, whatever the input (empty when it can).

    ``available()`` is asked last: it may load something (the CUDA extension), which only an
    implementation that could otherwise run should pay for."""
    if impl.opt_in and not forced and not _environment().opt_in_enabled:
        return [
            f"the {impl.backend} {impl.op} kernel is opt-in: slower than the default where both run "
            f"(use_backend({impl.op}={impl.backend!r}) or {ENV_ENABLE_OPT_IN}=1)"
        ]
    if impl.backend in _CUSTOM_OP_BACKENDS and functorch_active():
        return [
            "a torch.func transform (grad, vmap, jvp, ...) is active: the kernels' autograd, torch.library "
            "custom ops and autograd.Functions without setup_context, does not run under functorch"
        ]
    if impl.backend == "eager" or device.type in impl.devices:
        return list(impl.available())
    if impl.backend == "sdpa" and device.type == "cpu":
        # PyTorch's sdpa runs anywhere; on the CPU the eager reference stays the default.
        return (
            []
            if forced
            else ["inputs are on the CPU, where the eager reference is the default (sdpa runs when forced)"]
        )
    if impl.backend == "triton" and device.type == "cpu":
        if not triton_interpreter_enabled():
            return ["inputs are on the CPU and TRITON_INTERPRET=1 is not set"]
        if not forced:
            return [
                "inputs are on the CPU: the Triton interpreter runs only when the triton backend "
                "is forced (use_backend('triton'))"
            ]
        return list(impl.available())
    reasons = [f"inputs are on {device.type}, {impl.backend} runs on {', '.join(impl.devices)}"]
    # Forced: the whole story. Not otherwise: it could load the extension, and in a compiled
    # forward on the wrong device (torch 2.11's dynamo cannot trace its lock).
    return reasons + list(impl.available()) if forced else reasons


def reasons_for(impl: Implementation, device: torch.device, *args, forced: bool = False, **kwargs) -> list[str]:
    """Every reason ``impl`` cannot take this input (empty when it can)."""
    reasons = device_reasons(impl, device, forced)
    if reasons:
        return reasons
    return list(impl.check(*args, **kwargs))


def select(op: str, device: torch.device, *args, **kwargs) -> Implementation:
    """Pick the implementation of ``op`` for this input (see module docstring)."""
    impls = implementations(op)
    backend, by_name = forced_backend(op)
    if backend is not None:
        chosen = [i for i in impls if i.backend == backend]
        if not chosen and by_name:
            raise BackendUnavailableError(f"{op}: no {backend!r} implementation")
        if chosen:
            impl = chosen[0]
            reasons = reasons_for(impl, device, *args, forced=True, **kwargs)
            if reasons:
                raise BackendUnavailableError(
                    f"{op}: backend {backend!r} was forced but cannot take this input: " + "; ".join(reasons)
                )
            return impl
    preferred: tuple[str, ...] = ()
    measured = _RULES.get(op)
    if measured is not None:
        preferred = measured.prefer(*args, **kwargs)
        if preferred:
            rank = {b: n for n, b in enumerate(preferred)}
            impls = sorted(impls, key=lambda i: rank.get(i.backend, len(rank)))
    skipped: list[tuple[Implementation, list[str]]] = []
    for impl in impls:
        reasons = reasons_for(impl, device, *args, **kwargs)
        if not reasons:
            # Passing over an opt-in implementation that is not enabled, or one the rule preferred,
            # is the default, not a fallback.
            fell_back = [
                (i, r)
                for i, r in skipped
                if not (i.opt_in and not _environment().opt_in_enabled) and i.backend not in preferred
            ]
            if fell_back and device.type == "cuda":
                _warn_fallback(op, impl, fell_back)
            return impl
        skipped.append((impl, reasons))
    raise BackendUnavailableError(
        f"{op}: no implementation can take this input: "
        + " | ".join(f"{i.backend}: {'; '.join(r)}" for i, r in skipped)
    )


def _warn_fallback(op: str, impl: Implementation, skipped: list[tuple[Implementation, list[str]]]) -> None:
    if torch.compiler.is_compiling():
        return
    key = (op, tuple(r for _, rs in skipped for r in rs))
    if key in _warned:
        return
    _warned.add(key)
    why = "; ".join(f"{i.backend}: {', '.join(r)}" for i, r in skipped)
    warnings.warn(f"d2v_kernels.{op} falls back to {impl.backend} ({why})", stacklevel=4)


def call(op: str, device: torch.device, *args, **kwargs):
    """Select, record and run ``op`` on this input (on its device, see :func:`on_device`)."""
    impl = select(op, device, *args, **kwargs)
    if not torch.compiler.is_compiling():
        record(op, impl.backend)
    return on_device(device, impl.run)(*args, **kwargs)


def _several_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 1


def on_device(device: torch.device, fn: Callable) -> Callable:
    """``fn``, run with ``device`` as the current CUDA device when it is not.

    A Triton launch runs on the current device, not on its tensors' (aten and the extension's
    binding guard themselves): a model split over GPUs (``device_map``) would launch a layer's
    kernels on the wrong one. On a machine with one GPU, or for another device type, ``fn``
    itself: nothing is added to the call."""
    if device.type != "cuda" or not _several_gpus():
        return fn
    index = device.index if device.index is not None else torch.cuda.current_device()
    current = torch.cuda.current_device

    def on_its_device(*args, **kwargs):
        if current() == index:
            return fn(*args, **kwargs)
        with torch.cuda.device(index):
            return fn(*args, **kwargs)

    return on_its_device
