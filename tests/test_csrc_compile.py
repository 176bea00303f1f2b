"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90a (the targets setup.py builds) without a
warning, a register spill or a serialized wgmma pipeline.

The kernels include no torch header, so this runs where torch is a CPU build. The .cpp files
(csrc/binding.cpp, the one file that includes torch, and the GEMMs' dtype dispatch) are compiled
only by real builds (scripts/check_extension_build).

The translation units that include CUTLASS (the conv GEMMs, the Hopper conv forward and backward
GEMMs, one per dtype) take tens of seconds each and need its headers (``pip install nvidia-cutlass``): they are marked slow, out of the CI run
(``-m "not slow"``). CUTLASS's include directory is a system one (``-isystem``), so its headers'
warnings are not ours; ours stay errors.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("80", "90a")
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-DNDEBUG",
    "--use_fast_math",
    "-Xptxas",
    "-v",
    "-Werror",
    "all-warnings",
    "-Xcompiler",
    "-Wall,-Wextra,-Werror",
]
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
# ptxas's note when a wgmma pipeline crosses a call (an assert left in, a non-inlined function).
SERIALIZED = "wgmma.mma_async instructions are serialized"


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
SOURCES = sorted(CSRC.glob("*.cu"))
LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"', re.MULTILINE)


def _includes_cutlass(path: Path) -> bool:
    """Whether the file, or a csrc header it includes (transitively), includes a CUTLASS header."""
    text = path.read_text()
    if re.search(r"^#include <cutlass/", text, re.MULTILINE):
        return True
    return any(_includes_cutlass(CSRC / name) for name in LOCAL_INCLUDE.findall(text) if (CSRC / name).exists())


CUTLASS_SOURCES = [p for p in SOURCES if _includes_cutlass(p)]
PLAIN_SOURCES = [p for p in SOURCES if p not in CUTLASS_SOURCES]


def _compile(source: Path, out_dir: Path, extra=()) -> subprocess.CompletedProcess:
    """One nvcc run for every arch: the host code is compiled once, ptxas reports each arch."""
    gencodes = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHS]
    cmd = [NVCC, *NVCC_FLAGS, *extra, *gencodes, "-c", str(source), "-o", str(out_dir / f"{source.stem}.o")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_there_are_cuda_sources():
    assert PLAIN_SOURCES, f"no .cu files in {CSRC}"
    assert (CSRC / "binding.cpp").exists()
    # the conv GEMMs, the Hopper conv forward and backward GEMMs: one CUTLASS translation unit per dtype
    # (conv_gemm.cpp, host code, dispatches)
    assert {p.name for p in CUTLASS_SOURCES} == {
        "conv_gemm_f16.cu",
        "conv_gemm_bf16.cu",
        "conv_gemm_f32.cu",
        "conv_fprop_sm90_f16.cu",
        "conv_fprop_sm90_bf16.cu",
        "conv_gemm_sm90_f16.cu",
        "conv_gemm_sm90_bf16.cu",
    }


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("source", PLAIN_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_and_sm90a_without_warnings_or_spills(source, tmp_path):
    _check_compile(source, _compile(source, tmp_path))


def _cutlass_flags() -> list[str] | None:
    """The build's CUTLASS include directories (system ones), None without CUTLASS's headers."""
    from d2v_kernels._extension import cutlass_include, cutlass_util_include

    include = cutlass_include()
    if include is None:
        return None
    # The Hopper conv as a build for sm_90a compiles it (setup.py, the JIT build on an H100).
    return ["-DD2V_SM90A_CONV", "-isystem", str(include), "-isystem", str(cutlass_util_include(include))]


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("source", CUTLASS_SOURCES, ids=lambda p: p.name)
def test_cutlass_cu_compiles_for_sm80_and_sm90a_without_warnings_or_spills(source, tmp_path):
    flags = _cutlass_flags()
    if flags is None:
        pytest.skip("CUTLASS headers not found (pip install nvidia-cutlass)")
    started = time.monotonic()
    result = _compile(source, tmp_path, ["--expt-relaxed-constexpr", *flags])
    print(f"{source.name}: nvcc for sm_{' sm_'.join(ARCHS)} took {time.monotonic() - started:.0f} s")
    _check_compile(source, result)


def _check_compile(source: Path, result: subprocess.CompletedProcess) -> None:
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{source.name} failed:\n{log}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"{source.name} warnings:\n" + "\n".join(warnings)
    kernels = ENTRY.findall(log)
    spills = [int(a) + int(b) for a, b in SPILL.findall(log)]
    assert len(spills) == len(kernels), f"{source.name}: no ptxas report for some kernel:\n{log}"
    for arch in ARCHS:
        assert f"sm_{arch}" in {target for _, target in kernels}, f"{source.name}: no sm_{arch} kernel:\n{log}"
    spilling = [f"{name} ({target})" for (name, target), n in zip(kernels, spills) if n > 0]
    assert not spilling, f"{source.name}: register spills in {spilling}:\n{log}"
    assert SERIALIZED not in log, f"{source.name}: a wgmma pipeline serialized:\n{log}"


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
def test_hopper_conv_takes_every_data2vec_layer_shape_on_the_host(tmp_path):
    """CUTLASS's host-side checks (can_implement: TMA alignment, im2col corners and offsets) accept the
    Hopper conv and the Hopper backward GEMMs at every layer of the base feature encoder, B=8 x 10 s,
    B=1 x 30 s and short odd waves, so the extension takes them there instead of falling back to the
    Sm80 GEMMs; the output extent and strides CUTLASS derives are the (B, T_out, C_out) tensor the
    binding allocates; a stride TMA's im2col mode cannot encode (9) is refused, 8 taken. Host code
    only: it runs without a GPU (tests/csrc/hopper_*_host_check.cu)."""
    flags = _cutlass_flags()
    if flags is None:
        pytest.skip("CUTLASS headers not found (pip install nvidia-cutlass)")
    sources = [Path(__file__).resolve().parent / "csrc" / f"hopper_{part}_host_check.cu" for part in ("conv", "gemm")]
    binary = tmp_path / "hopper_host_check"
    cmd = [NVCC, "-std=c++17", "-O1", "-DNDEBUG", "--expt-relaxed-constexpr", *flags, f"-I{CSRC}"]
    cmd += ["-gencode=arch=compute_90a,code=sm_90a", *map(str, sources), "-o", str(binary)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == 124 and all(line.startswith("ok") for line in lines), run.stdout
