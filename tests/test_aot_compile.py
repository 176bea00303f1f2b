"""Every Triton kernel configuration compiles for sm_80 and sm_90 (no GPU needed), and spills no
register on sm_90 (ptxas -v) beyond what the variant allows with its reason.

The interpreter accepts programs the GPU compiler rejects, so this runs the real compiler in a
subprocess with TRITON_INTERPRET unset.
"""

import os
import subprocess
import sys

import pytest

from d2v_kernels.kernels import KERNEL_MODULES

pytest.importorskip("triton")


@pytest.mark.parametrize("op", KERNEL_MODULES)
def test_every_kernel_configuration_compiles_for_sm80_and_sm90_without_spills_on_sm90(op):
    import importlib.util

    if importlib.util.find_spec(f"d2v_kernels.kernels.{op}") is None:
        pytest.skip(f"{op} has no Triton kernel module")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-m", "d2v_kernels.kernels.aot", "--op", op, "--arch", "80", "90", "--spills", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 failed" in result.stdout
