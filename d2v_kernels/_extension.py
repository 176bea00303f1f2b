"""The optional CUDA extension ``d2v_kernels._C`` (sources in ``csrc/``).

A wheel built with a CUDA toolkit and a CUDA torch ships ``d2v_kernels._C``. In an editable
install with nvcc, a CUDA build of torch and a visible GPU, the extension is instead compiled on
first use with ``torch.utils.cpp_extension.load`` (cached by torch under
``TORCH_EXTENSIONS_DIR``; set ``D2V_KERNELS_NO_JIT=1`` to skip). Nothing here is attempted at
import time: the first :func:`extension_reasons` call decides, and a missing extension is a
dispatch reason, never an ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

ENV_NO_JIT = "D2V_KERNELS_NO_JIT"
# "0": the feature extractor's convs and GEMMs stay on the Sm80 GEMMs on Hopper too (read at load).
ENV_HOPPER_CONV = "D2V_KERNELS_HOPPER_CONV"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
JIT_NAME = "d2v_kernels_C"
# No -std flag: torch adds the C++ standard its headers need (C++20 for torch 2.14, C++17 before).
# CUTLASS's headers want relaxed constexpr and the half / bfloat16 operators torch's build turns off.
# NDEBUG: CUTLASS's device asserts are calls that serialize the Hopper kernels' wgmma pipeline.
NVCC_FLAGS = [
    "-O3",
    "-DNDEBUG",
    "--use_fast_math",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]
CUTLASS_MISSING = "CUTLASS headers not found (pip install nvidia-cutlass)"

_lock = threading.Lock()
_state: dict = {"resolved": False, "module": None, "source": None, "reasons": []}


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cutlass_include() -> Path | None:
    """CUTLASS's include directory, a build requirement of the extension only: ``$CUTLASS_PATH/include``
    (a CUTLASS checkout), else the one the ``nvidia-cutlass`` wheel installs with its
    ``cutlass_library`` package (``source/include``; found without importing the package). Only a
    directory next to CUTLASS's utility headers (:func:`cutlass_util_include`), which its conv
    kernels include, counts."""
    candidates = []
    if os.environ.get("CUTLASS_PATH"):
        candidates.append(Path(os.environ["CUTLASS_PATH"]) / "include")
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "source" / "include" for p in spec.submodule_search_locations]
    return next(
        (
            c
            for c in candidates
            if (c / "cutlass" / "cutlass.h").is_file()
            and (cutlass_util_include(c) / "cutlass" / "util" / "packed_stride.hpp").is_file()
        ),
        None,
    )


def cutlass_util_include(include: Path) -> Path:
    """The utility headers' directory (``tools/util/include``) beside CUTLASS's ``include``, in a
    checkout and in the wheel alike."""
    return include.parent / "tools" / "util" / "include"


def nvcc_flags() -> list[str]:
    """NVCC_FLAGS and CUTLASS's include directories as system ones (its headers' warnings are not ours)."""
    include = cutlass_include()
    if include is None:
        return list(NVCC_FLAGS)
    return NVCC_FLAGS + ["-isystem", str(include), "-isystem", str(cutlass_util_include(include))]


def hopper_conv_flags(arch_list: str) -> list[str]:
    """The define that compiles the Hopper kernels (csrc/conv_fprop_sm90.cuh, csrc/conv_gemm_sm90.cuh)
    when ``arch_list`` (a ``TORCH_CUDA_ARCH_LIST`` value) targets sm_90a; without it their units are
    stubs that say the kernels are absent, and no build spends minutes on CUTLASS instantiations it
    cannot run."""
    archs = arch_list.replace(",", ";").replace(" ", ";").split(";")
    hopper = any(a.strip().lower().removesuffix("+ptx") in ("9.0a", "90a") for a in archs)
    return ["-DD2V_SM90A_CONV"] if hopper else []


def jit_arch_list() -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` for the JIT build when the user set none: the visible devices'
    compute capabilities, 9.0 as ``9.0a`` (the Hopper conv kernels use wgmma and TMA, which only
    the architecture-specific target has; torch would build plain sm_90). None when it is set."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return None
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "") for major, minor in capabilities)


def _jit_reasons() -> list[str]:
    """Why the extension cannot be compiled here and now (empty when it can)."""
    if torch.version.cuda is None:
        return ["torch is a CPU build"]
    if os.environ.get(ENV_NO_JIT, "0") == "1":
        return [f"not prebuilt and {ENV_NO_JIT}=1"]
    if not CSRC.is_dir() or not list(CSRC.glob("*.cu")):
        return [f"not prebuilt and no csrc/ sources at {CSRC} (not an editable install)"]
    if not torch.cuda.is_available():
        return ["not prebuilt and no CUDA device is visible to build it for"]
    if _nvcc() is None:
        return ["not prebuilt and nvcc was not found (set CUDA_HOME)"]
    if cutlass_include() is None:
        return [f"not prebuilt and {CUTLASS_MISSING}"]
    return []


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in CSRC.glob("*.cu")) + sorted(str(p) for p in CSRC.glob("*.cpp"))
    archs = jit_arch_list()
    # torch reads the architectures from the environment only; set for this build, then restored.
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        return load(
            name=JIT_NAME,
            sources=sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=nvcc_flags() + hopper_conv_flags(os.environ["TORCH_CUDA_ARCH_LIST"]),
            verbose=os.environ.get("D2V_KERNELS_JIT_VERBOSE", "0") == "1",
        )
    finally:
        if archs is not None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _resolve() -> None:
    with _lock:
        if _state["resolved"]:
            return
        module, source, reasons = None, None, []
        try:
            module, source = importlib.import_module("d2v_kernels._C"), "prebuilt"
        except ModuleNotFoundError:
            jit_reasons = _jit_reasons()
            if jit_reasons:
                reasons = [f"d2v_kernels._C not built: {r}" for r in jit_reasons]
            else:
                try:
                    module, source = _jit_build(), "jit"
                except Exception as e:  # a failed build is a dispatch reason, not a crash
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    reasons = [f"d2v_kernels._C not built: JIT build failed ({type(e).__name__}: {first_line})"]
        except ImportError as e:  # built, but for another torch / CUDA
            reasons = [f"d2v_kernels._C failed to import: {e}"]
        if module is not None and os.environ.get(ENV_HOPPER_CONV, "1") == "0":
            module.set_sm90_conv(False)
        _state.update(resolved=True, module=module, source=source, reasons=reasons)


def extension_reasons() -> list[str]:
    """Why the extension cannot be used (empty when it is loaded); the dispatch ``available`` hook."""
    if not _state["resolved"]:
        _resolve()
    return list(_state["reasons"])


def module() -> ModuleType:
    """The loaded extension; raises RuntimeError with the reasons when there is none."""
    reasons = extension_reasons()
    if reasons:
        raise RuntimeError("; ".join(reasons))
    return _state["module"]


def build_info() -> dict:
    """What ``d2v-kernels info`` prints: whether the extension is loaded, from where, and why not."""
    reasons = extension_reasons()
    mod = _state["module"]
    info = {
        "loaded": mod is not None,
        "source": _state["source"],
        "path": getattr(mod, "__file__", None),
        "torch_cuda": torch.version.cuda,
        "nvcc": _nvcc(),
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "cutlass_include": str(cutlass_include() or ""),
        "reasons": reasons,
    }
    if mod is not None:
        info["max_channels"] = mod.MAX_CHANNELS
        if torch.cuda.is_available():
            # Asks the device which cubin it runs (once; a one-int kernel): whether the feature
            # extractor's half-precision convs and GEMMs take the Hopper path here.
            info["hopper_conv"] = mod.sm90_applies(torch.empty(0, device="cuda", dtype=torch.bfloat16))
    return info
