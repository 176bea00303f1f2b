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
