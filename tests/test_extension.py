"""d2v_kernels._extension, the CUDA extension's build and load, on the CPU: where CUTLASS's headers
are found, the architectures and defines of a JIT build (sm_90a on Hopper), the Hopper switch read
as the extension loads."""

import importlib

import pytest

from d2v_kernels import _extension


def test_cutlass_headers_are_found_from_cutlass_path_or_the_wheel_and_missing_is_a_reason(tmp_path, monkeypatch):
    """CUTLASS is a requirement of the extension's build only: found under $CUTLASS_PATH/include or
    the nvidia-cutlass wheel's cutlass_library/source/include; without it the JIT build is not tried."""
    import importlib.util

    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    util = tmp_path / "tools" / "util" / "include"
    assert _extension.cutlass_include() is None  # the conv kernels need the utility headers too
    (util / "cutlass" / "util").mkdir(parents=True)
    (util / "cutlass" / "util" / "packed_stride.hpp").write_text("")
    assert _extension.cutlass_include() == tmp_path / "include"
    assert _extension.nvcc_flags()[-4:] == ["-isystem", str(tmp_path / "include"), "-isystem", str(util)]
    monkeypatch.delenv("CUTLASS_PATH")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no nvidia-cutlass installed
    assert _extension.cutlass_include() is None and _extension.nvcc_flags() == _extension.NVCC_FLAGS
    # everything else a JIT build needs is there (a CUDA torch, a GPU, nvcc): the headers are the reason
    monkeypatch.setattr(_extension.torch.version, "cuda", "13.0")
    monkeypatch.setattr(_extension.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    assert _extension._jit_reasons() == ["not prebuilt and CUTLASS headers not found (pip install nvidia-cutlass)"]


@pytest.mark.parametrize("env", [None, "1", "0"])
def test_hopper_conv_env_turns_it_off_when_the_extension_loads(env, monkeypatch):
    """D2V_KERNELS_HOPPER_CONV=0 keeps the feature extractor's forward convs on the Sm80 GEMMs: the
    extension's switch is set as it loads (a stand-in module here), and left alone otherwise."""
    import types

    calls = []
    fake = types.SimpleNamespace(set_sm90_conv=calls.append, MAX_CHANNELS=512)
    import_module = importlib.import_module
    monkeypatch.setattr(_extension, "_state", {"resolved": False, "module": None, "source": None, "reasons": []})
    monkeypatch.setattr(
        _extension.importlib, "import_module", lambda name: fake if name == "d2v_kernels._C" else import_module(name)
    )
    if env is None:
        monkeypatch.delenv(_extension.ENV_HOPPER_CONV, raising=False)
    else:
        monkeypatch.setenv(_extension.ENV_HOPPER_CONV, env)
    assert _extension.module() is fake and _extension.build_info()["source"] == "prebuilt"
    assert calls == ([False] if env == "0" else [])


def test_jit_build_targets_sm90a_on_hopper_and_keeps_the_users_arch_list(monkeypatch):
    """The JIT build compiles the Hopper conv kernels (wgmma, TMA) only for sm_90a, which torch never
    picks by itself: an H100 gets 9.0a, other devices their own capability, a set
    TORCH_CUDA_ARCH_LIST is left alone."""
    capabilities = {0: (9, 0), 1: (8, 0), 2: (9, 0)}
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_extension.torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(_extension.torch.cuda, "get_device_capability", lambda i: capabilities[i])
    assert _extension.jit_arch_list() == "8.0;9.0a"
    capabilities.update({0: (8, 6), 2: (8, 6)})
    assert _extension.jit_arch_list() == "8.0;8.6"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _extension.jit_arch_list() is None
    # the Hopper conv is compiled only where sm_90a is a target
    assert _extension.hopper_conv_flags("8.0;9.0a") == _extension.hopper_conv_flags("9.0a") == ["-DD2V_SM90A_CONV"]
    assert _extension.hopper_conv_flags("8.0 9.0a+PTX") == ["-DD2V_SM90A_CONV"]
    assert _extension.hopper_conv_flags("8.0;9.0") == _extension.hopper_conv_flags("") == []
