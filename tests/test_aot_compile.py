"""Every Triton kernel configuration in the AOT tables compiles for sm_80 and sm_90 (no GPU needed)
and spills no register on sm_90 beyond what the variant allows with its reason; every kernel has a
configuration in the tables.

The interpreter accepts programs the GPU compiler rejects, so the compile runs the real compiler in
a subprocess with TRITON_INTERPRET unset, in one process per CPU (``aot --jobs``).
"""

import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import d2v_kernels.kernels
from d2v_kernels.kernels.aot import collect

triton = pytest.importorskip("triton")


def test_every_kernel_configuration_compiles_for_sm80_and_sm90_without_spills_on_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-m", "d2v_kernels.kernels.aot", "--arch", "80", "90", "--spills", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    failed = "\n".join(line for line in result.stdout.splitlines() if line.startswith("FAIL"))
    assert result.returncode == 0, (failed or result.stdout[-4000:]) + result.stderr[-4000:]
    assert re.search(r"^\d+ variants x 2 archs, 0 failed", result.stdout, re.M), result.stdout[-4000:]


def _kernels() -> dict[str, object]:
    """Every ``@triton.jit`` entry point (named ``*_kernel``) of the kernel modules, by qualified name."""
    from triton.runtime.interpreter import InterpretedFunction

    kinds = (triton.runtime.JITFunction, InterpretedFunction)
    found = {}
    for info in pkgutil.iter_modules(d2v_kernels.kernels.__path__):
        module = importlib.import_module(f"d2v_kernels.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, kinds) and name.endswith("_kernel") and obj.fn.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_kernel_has_an_aot_configuration():
    kernels = _kernels()
    assert "attention.attention_fwd_kernel" in kernels and "_row_norm.row_norm_fwd_kernel" in kernels
    compiled = {id(variant.fn) for _, variant in collect()}
    missing = sorted(name for name, fn in kernels.items() if id(fn) not in compiled)
    assert not missing, f"kernels no AOT variant compiles (add them to d2v_kernels/kernels/aot_variants.py): {missing}"
