import os

# The Triton interpreter must be chosen before triton is imported: it replaces @triton.jit.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("D2V_KERNELS_BACKEND", None)

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_reset():
    from d2v_kernels import dispatch

    torch.manual_seed(0)
    dispatch.reset_warnings()
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
