"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90 without a warning or a register spill.

The kernels include no torch header, so this runs where torch is a CPU build. The binding
(csrc/binding.cpp, the one file that includes torch) is compiled only by real builds.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("80", "90")
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--use_fast_math",
    "-Xptxas",
    "-v",
    "-Werror",
    "all-warnings",
    "-Xcompiler",
    "-Wall,-Wextra,-Werror",
]
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
SOURCES = sorted(CSRC.glob("*.cu"))


def _compile(source: Path, out_dir: Path) -> subprocess.CompletedProcess:
    """One nvcc run for every arch: the host code is compiled once, ptxas reports each arch."""
    gencodes = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHS]
    cmd = [NVCC, *NVCC_FLAGS, *gencodes, "-c", str(source), "-o", str(out_dir / f"{source.stem}.o")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files in {CSRC}"
    assert (CSRC / "binding.cpp").exists()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_and_sm90_without_warnings_or_spills(source, tmp_path):
    result = _compile(source, tmp_path)
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
