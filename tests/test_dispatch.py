"""Dispatch: forced backends, reasons, warn-once, record_dispatch counts, the environment variable."""

import contextlib
import warnings

import pytest
import torch

import d2v_kernels
from d2v_kernels import dispatch, ops


def _x():
    return torch.randn(3, 7, 48)


def test_record_dispatch_counts_each_call():
    x = _x()
    with d2v_kernels.record_dispatch() as outer:
        ops.layer_norm_gelu(x)
        with d2v_kernels.record_dispatch() as inner:
            ops.layer_norm_gelu(x)
            ops.add_layer_norm(x, x, None, None)
    assert outer[("layer_norm_gelu", "eager")] == 2
    assert outer[("add_layer_norm", "eager")] == 1
    assert inner == {("layer_norm_gelu", "eager"): 1, ("add_layer_norm", "eager"): 1}


def test_every_op_registers_eager_last():
    for op in ("attention", "layer_norm_gelu", "add_layer_norm", "pos_conv", "conv_feature_extractor"):
        impls = dispatch.implementations(op)
        assert impls[-1].backend == "eager"
        assert [i.backend for i in impls] == sorted((i.backend for i in impls), key=dispatch._PRIORITY.get)


def test_forced_backend_without_that_implementation_raises_for_named_op():
    fake = "layer_norm_gelu"
    backends = {i.backend for i in dispatch.implementations(fake)}
    missing = next(b for b in ("cuda", "triton") if b not in backends)
    with pytest.raises(ValueError, match=f"has no '{missing}' implementation"):
        with d2v_kernels.use_backend(**{fake: missing}):
            pass


def test_global_cuda_backend_raises_with_reasons_for_ops_that_have_it_and_ignores_others():
    x = _x()
    with d2v_kernels.use_backend("cuda"):
        ops.layer_norm_gelu(x)  # no cuda implementation: dispatches as usual
        wave = torch.randn(1, 400)
        ws = [torch.randn(8, 1, 10)]
        if any(i.backend == "cuda" for i in dispatch.implementations("conv_feature_extractor")):
            with pytest.raises(d2v_kernels.BackendUnavailableError, match="conv_feature_extractor: backend 'cuda'"):
                ops.conv_feature_extractor(wave, ws, [None], [None], strides=[5])


def test_use_backend_validates_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        with d2v_kernels.use_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="unknown op 'atention'"):
        with d2v_kernels.use_backend(atention="eager"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "layer_norm_gelu=eager")
    assert dispatch.forced_backend("layer_norm_gelu") == ("eager", True)
    assert dispatch.forced_backend("attention") == (None, False)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    assert dispatch.forced_backend("attention") == ("triton", False)
    with d2v_kernels.use_backend(attention="eager"):  # the context manager wins over the environment
        assert dispatch.forced_backend("attention") == ("eager", True)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match="D2V_KERNELS_BACKEND"):
        dispatch.forced_backend("attention")


def _fake_op(name, kernel_reasons):
    calls = []
    dispatch.register(name, "eager", lambda x: calls.append("eager") or x, devices=("cpu", "cuda", "meta"))
    dispatch.register(
        name, "triton", lambda x: calls.append("triton") or x, check=lambda x: list(kernel_reasons), devices=("cuda",)
    )
    return calls


def test_fallback_warns_once_per_reason_on_cuda_and_forced_backend_raises(monkeypatch):
    calls = _fake_op("fake_op", ["head dim 200 > 128"])
    try:
        device = torch.device("cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                impl = dispatch.select("fake_op", device, torch.empty(1))
                assert impl.backend == "eager"
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "head dim 200 > 128" in messages[0] and "falls back to eager" in messages[0]
        with pytest.raises(d2v_kernels.BackendUnavailableError, match="head dim 200 > 128"):
            with d2v_kernels.use_backend(fake_op="triton"):
                dispatch.select("fake_op", device, torch.empty(1))
        with warnings.catch_warnings(record=True) as caught:  # CPU is the designed eager path: no warning
            warnings.simplefilter("always")
            dispatch.call("fake_op", torch.device("cpu"), torch.empty(1))
        assert not caught and calls == ["eager"]
    finally:
        dispatch._REGISTRY.pop("fake_op")


def test_cpu_triton_needs_interpreter_and_forcing(monkeypatch):
    _fake_op("fake_op2", [])
    try:
        cpu = torch.device("cpu")
        impl = next(i for i in dispatch.implementations("fake_op2") if i.backend == "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1 is not set" in dispatch.reasons_for(impl, cpu, torch.empty(1), forced=True)[0]
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert "only when the triton backend is forced" in dispatch.reasons_for(impl, cpu, torch.empty(1))[0]
        assert dispatch.reasons_for(impl, cpu, torch.empty(1), forced=True) == []
        assert dispatch.select("fake_op2", cpu, torch.empty(1)).backend == "eager"
        with d2v_kernels.use_backend("triton"):
            assert dispatch.select("fake_op2", cpu, torch.empty(1)).backend == "triton"
    finally:
        dispatch._REGISTRY.pop("fake_op2")


def test_opt_in_implementation_runs_only_when_forced_or_enabled(monkeypatch):
    dispatch.register("fake_op3", "eager", lambda x: "eager", devices=("cpu", "cuda", "meta"))
    dispatch.register("fake_op3", "cuda", lambda x: "cuda", devices=("cpu",), opt_in=True)
    try:
        cpu = torch.device("cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert dispatch.call("fake_op3", cpu, 1) == "eager"
            with d2v_kernels.use_backend(fake_op3="cuda"):
                assert dispatch.call("fake_op3", cpu, 1) == "cuda"
            monkeypatch.setenv(dispatch.ENV_ENABLE_OPT_IN, "1")
            assert dispatch.call("fake_op3", cpu, 1) == "cuda"
        impl = next(i for i in dispatch.implementations("fake_op3") if i.backend == "cuda")
        monkeypatch.delenv(dispatch.ENV_ENABLE_OPT_IN)
        assert "is opt-in: slower than the default" in dispatch.reasons_for(impl, cpu, 1)[0]
    finally:
        dispatch._REGISTRY.pop("fake_op3")


def test_default_pick_past_an_opt_in_backend_does_not_warn():
    """A CUDA input whose default is Triton, beside an opt-in CUDA backend that is not enabled
    (the feature extractor's extension): no warning, and the opt-in backend is never asked to load."""
    asked = []
    dispatch.register("fake_op4", "eager", lambda x: "eager", devices=("cpu", "cuda", "meta"))
    dispatch.register("fake_op4", "triton", lambda x: "triton", devices=("cuda",))
    dispatch.register(
        "fake_op4", "cuda", lambda x: "cuda", devices=("cuda",), available=lambda: asked.append(1) or [], opt_in=True
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dispatch.select("fake_op4", torch.device("cuda"), torch.empty(1)).backend == "triton"
        assert not asked
        assert [i.backend for i in dispatch.implementations("fake_op4")] == ["triton", "cuda", "eager"]
    finally:
        dispatch._REGISTRY.pop("fake_op4")


def test_measured_rule_prefers_a_backend_per_input_without_warning():
    """A rule sends one class of input to the backend it prefers, the rest in priority order; a
    preferred backend that cannot take an input is passed over silently; forcing beats the rule."""
    dispatch.register("fake_op5", "eager", lambda x: "eager", devices=("cpu", "cuda", "meta"))
    dispatch.register("fake_op5", "triton", lambda x: "triton", devices=("cuda",))
    dispatch.register(
        "fake_op5",
        "sdpa",
        lambda x: "sdpa",
        check=lambda x: [] if x.dim() == 2 else ["sdpa takes 2-D inputs only"],
        devices=("cuda", "cpu"),
    )
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="evidence"):
        dispatch.register_rule("fake_op5", lambda x: ("sdpa",), evidence=" ")
    dispatch.register_rule("fake_op5", lambda x: ("sdpa",) if x.dtype == torch.float16 else (), evidence="test")
    try:
        assert dispatch.rule("fake_op5").evidence == "test"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with d2v_kernels.record_dispatch() as calls:
                assert dispatch.call("fake_op5", cuda, torch.empty(1, 1, dtype=torch.float16)) == "sdpa"
                assert dispatch.call("fake_op5", cuda, torch.empty(1, 1)) == "triton"
                assert dispatch.call("fake_op5", cuda, torch.empty(1, dtype=torch.float16)) == "triton"
            assert calls == {("fake_op5", "sdpa"): 1, ("fake_op5", "triton"): 2}
            with d2v_kernels.use_backend(fake_op5="triton"):
                assert dispatch.call("fake_op5", cuda, torch.empty(1, 1, dtype=torch.float16)) == "triton"
    finally:
        dispatch._REGISTRY.pop("fake_op5")
        dispatch._RULES.pop("fake_op5")


def test_plans_follow_use_backend_and_the_environment(monkeypatch):
    """An op's cached decision is keyed by the backends forced in this thread, and dropped when an
    environment variable dispatch reads changes: the same input then dispatches anew."""
    x = torch.randn(3, 8)
    w, b = torch.randn(8), torch.randn(8)
    with d2v_kernels.record_dispatch() as calls:
        d2v_kernels.ops.add_layer_norm(x, x, w, b)
        with d2v_kernels.use_backend(add_layer_norm="triton"):
            d2v_kernels.ops.add_layer_norm(x, x, w, b)
        d2v_kernels.ops.add_layer_norm(x, x, w, b)
        monkeypatch.setenv(dispatch.ENV_BACKEND, "add_layer_norm=triton")
        d2v_kernels.ops.add_layer_norm(x, x, w, b)
        monkeypatch.delenv(dispatch.ENV_BACKEND)
        d2v_kernels.ops.add_layer_norm(x, x, w, b)
    assert calls == {("add_layer_norm", "eager"): 3, ("add_layer_norm", "triton"): 2}


def test_kernels_run_on_their_tensors_device_when_another_is_current(monkeypatch):
    """A Triton launch uses the current CUDA device: on a machine with several GPUs an op on cuda:1
    while cuda:0 is current must make cuda:1 current around its run (and add nothing otherwise)."""
    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    fn = lambda x: x + 1
    monkeypatch.setattr(dispatch, "_several_gpus", lambda: False)
    assert dispatch.on_device(torch.device("cuda", 1), fn) is fn  # one GPU: the plan itself
    monkeypatch.setattr(dispatch, "_several_gpus", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    assert dispatch.on_device(torch.device("cpu"), fn) is fn
    assert dispatch.on_device(torch.device("cuda", 1), fn)(1) == 2 and entered == [1]
    assert dispatch.on_device(torch.device("cuda", 0), fn)(1) == 2 and entered == [1]
    dispatch.register("fake_op6", "eager", lambda x: x * 3, devices=("cpu", "cuda", "meta"))
    try:
        assert dispatch.call("fake_op6", torch.device("cuda", 1), 2) == 6 and entered == [1, 1]
    finally:
        dispatch._REGISTRY.pop("fake_op6")
