"""The Triton path of conv_feature_extractor: cuDNN conv per layer + the Triton LayerNorm+GELU
kernel reading the conv output channels-first in place (interpreter on CPU)."""

import pytest
import torch
from numerics import assert_close_to_reference

import d2v_kernels
from d2v_kernels import dispatch, ops

DIMS, KERNELS, STRIDES = (40, 48, 36), (10, 3, 2), (5, 2, 2)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _params(dtype, conv_bias=False):
    gen = torch.Generator(device="cpu").manual_seed(3)
    c_in, conv_weights = 1, []
    for c, k in zip(DIMS, KERNELS):
        conv_weights.append(torch.randn(c, c_in, k, generator=gen, device="cpu") * (c_in * k) ** -0.5)
        c_in = c
    ln_weights = [torch.randn(c, generator=gen, device="cpu") * 0.2 + 1 for c in DIMS]
    ln_biases = [torch.randn(c, generator=gen, device="cpu") * 0.1 for c in DIMS]
    conv_biases = [torch.randn(c, generator=gen, device="cpu") * 0.1 for c in DIMS] if conv_bias else None
    device = torch.get_default_device()  # drawn on the CPU (its generator), run where the test runs
    cast = lambda ts: None if ts is None else [t.to(device, dtype).requires_grad_(True) for t in ts]
    return cast(conv_weights), cast(ln_weights), cast(ln_biases), cast(conv_biases)


def _run(wave, params, backend):
    conv_weights, ln_weights, ln_biases, conv_biases = params
    with d2v_kernels.use_backend(conv_feature_extractor=backend):
        return ops.conv_feature_extractor(
            wave, conv_weights, ln_weights, ln_biases, strides=list(STRIDES), conv_biases=conv_biases
        )


def _leaves(wave, params):
    return [wave] + [t for group in params if group is not None for t in group]


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-bias", "bias"])
def test_forward_and_gradients_match_float64(dtype, conv_bias):
    device = torch.get_default_device()

    def cpu_randn(*shape, seed):
        """Seeded on the CPU, so both devices see the same numbers."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(*shape, generator=gen, device="cpu", dtype=torch.float64).to(device)

    wave64 = cpu_randn(2, 1601, seed=1)
    results = {}
    for name, run_dtype, backend in (
        ("kernel", dtype, "triton"),
        ("eager", dtype, "eager"),
        ("ref", torch.float64, "eager"),
    ):
        wave = wave64.to(run_dtype).requires_grad_(True)
        params = _params(run_dtype, conv_bias)
        with d2v_kernels.record_dispatch() as calls:
            out = _run(wave, params, backend)
        assert calls == {("conv_feature_extractor", backend): 1}
        grad_out = cpu_randn(*out.shape, seed=2)
        grads = torch.autograd.grad(out, _leaves(wave, params), grad_out.to(run_dtype))
        results[name] = (out, grads)
    (out, grads), (eager, eager_grads), (ref, ref_grads) = results["kernel"], results["eager"], results["ref"]
    assert out.shape == (2, 79, DIMS[-1]) and out.dtype == dtype
    assert_close_to_reference(out, ref, eager)
    for i, (g, g64, ge) in enumerate(zip(grads, ref_grads, eager_grads)):
        assert_close_to_reference(g, g64, ge, name=f"grad {i}")


def test_triton_path_declines_float64_and_mixed_dtypes_with_reasons():
    impl = next(i for i in dispatch.implementations("conv_feature_extractor") if i.backend == "triton")
    conv_weights, ln_weights, ln_biases, _ = _params(torch.float64)
    wave = torch.randn(1, 400, dtype=torch.float64)
    reasons = impl.check(wave, conv_weights, ln_weights, ln_biases, strides=list(STRIDES))
    assert any("wave has dtype torch.float64" in r for r in reasons)
    conv_weights, ln_weights, ln_biases, _ = _params(torch.float32)
    reasons = impl.check(wave.half(), conv_weights, ln_weights, ln_biases, strides=list(STRIDES))
    assert any("conv_weights[0] has dtype torch.float32, wave has torch.float16" in r for r in reasons)
    with pytest.raises(d2v_kernels.BackendUnavailableError, match=r"wave has dtype torch\.float64"):
        _run(wave, _params(torch.float64), "triton")


def test_compiles_fullgraph_through_the_triton_path():
    params = _params(torch.float32)
    wave = torch.randn(2, 801)
    expected = _run(wave, params, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(lambda w: _run(w, params, "triton"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(wave), expected)


# --------------------------------------------------------------------------------------------
# Layer 0 as one kernel (conv on the waveform + LayerNorm + GELU)
# --------------------------------------------------------------------------------------------


def _spy(monkeypatch, name):
    """Record each launch of a feature-extractor kernel: False for a forward, True for the
    pre-norm recompute."""
    from d2v_kernels.kernels import conv_feature_extractor as kernels

    calls, real = [], getattr(kernels, name)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pre_norm_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, spy)
    return calls


def test_layer0_is_one_kernel_and_its_backward_recomputes_it(monkeypatch):
    calls = _spy(monkeypatch, "conv0_ln_gelu")
    params = _params(torch.float32, conv_bias=True)
    wave = torch.randn(2, 1601, requires_grad=True)
    out = _run(wave, params, "triton")
    assert calls == [False]
    out.sum().backward()
    assert calls == [False, True]
    assert wave.grad is not None and all(t.grad is not None for group in params for t in group)


def test_layer0_under_autocast_takes_the_per_layer_path(monkeypatch):
    calls = _spy(monkeypatch, "conv0_ln_gelu")
    params = _params(torch.float32)
    wave = torch.randn(2, 1601)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(wave, params, "triton")
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _run(wave, params, "eager")
    assert out.dtype == eager.dtype
    torch.testing.assert_close(out.float(), eager.float(), rtol=0.05, atol=0.05)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer0_reads_a_strided_wave(dtype):
    """A wave that is a strided view (every other sample of a longer buffer) and 40 channels
    (no power of two): forward and every gradient against float64."""
    buffer = torch.randn(2, 3202, dtype=torch.float64)
    results = []
    for run_dtype, backend in ((dtype, "triton"), (dtype, "eager"), (torch.float64, "eager")):
        wave = buffer.to(run_dtype)[:, ::2].requires_grad_(True)
        params = _params(run_dtype, conv_bias=True)
        out = _run(wave, params, backend)
        grads = torch.autograd.grad(out, _leaves(wave, params), torch.ones_like(out) / out.numel() ** 0.5)
        results.append((out, grads))
    (out, grads), (eager, eager_grads), (ref, ref_grads) = results
    assert_close_to_reference(out, ref, eager)
    for i, (g, g64, ge) in enumerate(zip(grads, ref_grads, eager_grads)):
        assert_close_to_reference(g, g64, ge, name=f"grad {i}")


def test_layer0_tile_override_computes_the_same():
    from d2v_kernels.kernels import _tiles

    params = _params(torch.float32)
    wave = torch.randn(1, 1201)
    expected = _run(wave, params, "triton")
    with _tiles.override("conv0", BLOCK_T=4, num_warps=2):
        torch.testing.assert_close(_run(wave, params, "triton"), expected, rtol=1e-6, atol=1e-6)


def test_layer0_opcheck():
    weights, ln_weights, ln_biases, conv_biases = _params(torch.float32, conv_bias=True)
    wave = torch.randn(2, 451, requires_grad=True)
    args = (wave, weights[0], conv_biases[0], ln_weights[0], ln_biases[0], 5, 1e-5)
    torch.library.opcheck(torch.ops.d2v_kernels.conv0_ln_gelu.default, args)
    y, mean, rstd = torch.ops.d2v_kernels.conv0_ln_gelu(*(a.detach() if torch.is_tensor(a) else a for a in args))
    dy = torch.randn_like(y)
    detached = [t.detach() for t in args[:5]]
    bwd_args = (dy, *detached, mean, rstd, 5, 1e-5, True)
    torch.library.opcheck(torch.ops.d2v_kernels.conv0_ln_gelu_bwd.default, bwd_args)


# --------------------------------------------------------------------------------------------
# Layers 0 and 1 as one kernel (opt-in: D2V_KERNELS_FUSE_CONV01=1)
# --------------------------------------------------------------------------------------------


def test_layers_0_and_1_fuse_only_when_asked(monkeypatch):
    params = _params(torch.float16)
    wave = torch.randn(1, 1201, dtype=torch.float16)
    fused, layer0 = _spy(monkeypatch, "conv01_ln_gelu"), _spy(monkeypatch, "conv0_ln_gelu")
    expected = _run(wave, params, "triton")
    assert (fused, layer0) == ([], [False])
    monkeypatch.setenv("D2V_KERNELS_FUSE_CONV01", "1")
    out = _run(wave.requires_grad_(True), params, "triton")
    assert (fused, layer0) == ([False], [False])
    out.sum().backward()
    # The backward recomputes layer 0's output (layer 1's input) and then its pre-norm values
    # (cheaper than deriving one from the other: both are a read of the wave and one write).
    assert layer0 == [False, False, True]
    torch.testing.assert_close(out, expected, rtol=0, atol=4e-3)  # fp16: one rounding apart at most
    fused.clear()
    from d2v_kernels.ops.conv_feature_extractor import fuse_layers_0_1

    with fuse_layers_0_1(False):  # the context manager overrides the environment, and is undone after
        _run(wave.detach(), params, "triton")
    assert fused == []
    _run(wave.detach(), params, "triton")
    assert fused == [False]
    fused.clear()
    _run(wave.detach().float(), _params(torch.float32), "triton")
    assert fused == []  # fp32 is not fused (its dot would spill)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-bias", "bias"])
def test_layers_0_and_1_fused_match_float64(dtype, conv_bias, monkeypatch):
    monkeypatch.setenv("D2V_KERNELS_FUSE_CONV01", "1")
    device = torch.get_default_device()
    gen = torch.Generator(device="cpu").manual_seed(5)
    wave64 = torch.randn(2, 2003, generator=gen, device="cpu", dtype=torch.float64).to(device)
    results = []
    for run_dtype, backend in ((dtype, "triton"), (dtype, "eager"), (torch.float64, "eager")):
        wave = wave64.to(run_dtype).requires_grad_(True)
        params = _params(run_dtype, conv_bias)
        out = _run(wave, params, backend)
        gen_out = torch.Generator(device="cpu").manual_seed(6)
        grad_out = torch.randn(out.shape, generator=gen_out, device="cpu", dtype=torch.float64).to(device, run_dtype)
        results.append((out, torch.autograd.grad(out, _leaves(wave, params), grad_out)))
    (out, grads), (eager, eager_grads), (ref, ref_grads) = results
    assert_close_to_reference(out, ref, eager)
    for i, (g, g64, ge) in enumerate(zip(grads, ref_grads, eager_grads)):
        assert_close_to_reference(g, g64, ge, name=f"grad {i}")


def test_layers_0_and_1_fused_opcheck_compile_and_tiles(monkeypatch):
    from d2v_kernels.kernels import _tiles

    monkeypatch.setenv("D2V_KERNELS_FUSE_CONV01", "1")
    (w0, w1, _), (g0, g1, _), (b0, b1, _), (cb0, cb1, _) = _params(torch.float16, conv_bias=True)
    wave = torch.randn(2, 611, dtype=torch.float16, requires_grad=True)
    args = (wave, w0, w1, cb0, cb1, g0, g1, b0, b1, 5, 2, 1e-5)
    torch.library.opcheck(torch.ops.d2v_kernels.conv01_ln_gelu.default, args)
    detached = [a.detach() if torch.is_tensor(a) else a for a in args]
    y = torch.ops.d2v_kernels.conv01_ln_gelu(*detached)
    torch.library.opcheck(torch.ops.d2v_kernels.conv01_ln_gelu_bwd.default, (torch.randn_like(y), *detached, True))

    params = _params(torch.float16)
    wave = torch.randn(2, 801, dtype=torch.float16)
    expected = _run(wave, params, "triton")
    with _tiles.override("conv01", BLOCK_M=16, BLOCK_K=16, num_warps=2):
        torch.testing.assert_close(_run(wave, params, "triton"), expected, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(lambda w: _run(w, params, "triton"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(wave), expected)
