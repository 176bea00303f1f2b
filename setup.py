"""Builds the optional CUDA extension ``d2v_kernels._C`` when a CUDA build of torch, nvcc and
CUTLASS's headers (``pip install nvidia-cutlass``, or ``CUTLASS_PATH``) are present (or
``D2V_KERNELS_FORCE_CUDA_BUILD=1``); otherwise installs the pure Python/Triton package, which works
without it (the missing extension is a dispatch reason at run time). CUTLASS is needed to build the
extension only: it is neither a build requirement of the package nor a runtime dependency."""

import os
import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CSRC = HERE / "csrc"


def _extension_helpers():
    """d2v_kernels/_extension.py loaded alone (not the package, which setup.py cannot import
    before it is installed): the nvcc flags and where CUTLASS's headers are, as the JIT build
    uses them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_d2v_extension", HERE / "d2v_kernels" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_build_reason() -> str | None:
    """None when the extension can be built, else why not."""
    if os.environ.get("D2V_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return "D2V_KERNELS_SKIP_CUDA_BUILD=1"
    sources = list(CSRC.glob("*.cu")) if CSRC.is_dir() else []
    if not sources:
        return "no csrc/*.cu sources"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not installed in the build environment"
    if torch.version.cuda is None and os.environ.get("D2V_KERNELS_FORCE_CUDA_BUILD", "0") != "1":
        return "torch is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found"
    helpers = _extension_helpers()
    if helpers.cutlass_include() is None:
        return helpers.CUTLASS_MISSING
    return None


def _extensions():
    reason = _cuda_build_reason()
    if reason is not None:
        print(f"d2v-kernels: not building d2v_kernels._C ({reason})")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    helpers = _extension_helpers()
    nvcc_flags = helpers.nvcc_flags() + helpers.hopper_conv_flags(archs or "8.0;9.0a")
    if not archs:
        # sm_90a, not sm_90: the Hopper conv kernels (wgmma, TMA) exist only for the architecture-specific
        # target; every other kernel runs there as on sm_90. Other 8.x devices run the sm_80 cubin.
        nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    sources = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.cu")) + sorted(
        str(p.relative_to(HERE)) for p in CSRC.glob("*.cpp")
    )
    ext = CUDAExtension(
        "d2v_kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
