"""conv_feature_extractor: eager reference vs transformers, the cuda backend's dispatch, checks,
fake impl and backward math (CPU), and the CUDA kernels against float64 (GPU only)."""

import importlib
import os
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import Data2VecAudioConfig
from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioFeatureEncoder

import d2v_kernels
from d2v_kernels import _extension, dispatch, ops
from d2v_kernels.testing import assert_close_to_reference

# d2v_kernels.ops re-exports the function under the module's name: fetch the module itself.
cfe = importlib.import_module("d2v_kernels.ops.conv_feature_extractor_op")
triton_path = importlib.import_module("d2v_kernels.ops._conv_feature_extractor_triton")

SMALL = dict(conv_dim=(32, 48, 48), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2))
BASE = dict(conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
# Channel counts that are multiples of 8, kernel / stride pairs whose input gradient takes the
# residue GEMMs with 3 and 2 taps (layer 1: 7, 3), 4 taps (4, 1) and the one GEMM of k == s (5, 5).
RESIDUES = dict(conv_dim=(16, 24, 8, 16), conv_kernel=(7, 7, 4, 5), conv_stride=(3, 3, 1, 5))
UNALIGNED = dict(conv_dim=(20, 36, 7), conv_kernel=(7, 3, 4), conv_stride=(3, 3, 1))
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_params(conv_dim, conv_kernel, conv_stride, *, dtype=torch.float32, device="cpu", conv_bias=False, seed=0):
    """Random weights at the scale of a trained encoder: conv ~ 1/sqrt(fan_in), LN affine near (1, 0)."""
    g = torch.Generator().manual_seed(seed)
    conv_weights, ln_weights, ln_biases, conv_biases = [], [], [], []
    c_in = 1
    for c_out, k in zip(conv_dim, conv_kernel):
        conv_weights.append(torch.randn(c_out, c_in, k, generator=g) / (c_in * k) ** 0.5)
        ln_weights.append(1.0 + 0.2 * torch.randn(c_out, generator=g))
        ln_biases.append(0.2 * torch.randn(c_out, generator=g))
        conv_biases.append(0.2 * torch.randn(c_out, generator=g))
        c_in = c_out
    to = lambda ts: [t.to(device=device, dtype=dtype) for t in ts]
    return dict(
        conv_weights=to(conv_weights),
        ln_weights=to(ln_weights),
        ln_biases=to(ln_biases),
        conv_biases=to(conv_biases) if conv_bias else None,
        strides=list(conv_stride),
    )


def split(params):
    """(positional args after wave, keyword args) of the public op."""
    p = dict(params)
    args = (p.pop("conv_weights"), p.pop("ln_weights"), p.pop("ln_biases"))
    return args, p


def hf_encoder(config_kwargs, conv_bias):
    config = Data2VecAudioConfig(**config_kwargs, conv_bias=conv_bias)
    encoder = Data2VecAudioFeatureEncoder(config).eval()
    with torch.no_grad():
        for layer in encoder.conv_layers:
            layer.layer_norm.weight.normal_(1.0, 0.2)
            layer.layer_norm.bias.normal_(0.0, 0.2)
            if layer.conv.bias is not None:
                layer.conv.bias.normal_(0.0, 0.2)
    return encoder


def encoder_params(encoder):
    layers = list(encoder.conv_layers)
    return dict(
        conv_weights=[layer.conv.weight for layer in layers],
        ln_weights=[layer.layer_norm.weight for layer in layers],
        ln_biases=[layer.layer_norm.bias for layer in layers],
        conv_biases=[layer.conv.bias for layer in layers] if layers[0].conv.bias is not None else None,
        strides=[layer.conv.stride[0] for layer in layers],
    )


def all_tensors(wave, params):
    tensors = [wave, *params["conv_weights"], *params["ln_weights"], *params["ln_biases"]]
    return tensors + list(params["conv_biases"] or [])


# --------------------------------------------------------------------------------------------
# CPU: the reference equals transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_kwargs, conv_bias, samples",
    [(SMALL, False, 1601), (SMALL, True, 977), (BASE, False, 1200)],
    ids=["small", "small-conv-bias", "base-short-wave"],
)
def test_reference_equals_transformers_forward_and_gradients(config_kwargs, conv_bias, samples):
    encoder = hf_encoder(config_kwargs, conv_bias)
    params = encoder_params(encoder)
    wave = torch.randn(2, samples)

    wave_hf = wave.clone().requires_grad_(True)
    expected = encoder(wave_hf).transpose(1, 2)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [wave_hf, *encoder.parameters()], grad_out)

    wave_ref = wave.clone().requires_grad_(True)
    args, kwargs = split(params)
    out = ops.conv_feature_extractor(wave_ref, *args, **kwargs)
    frames = cfe.output_length(samples, config_kwargs["conv_kernel"], params["strides"])
    assert out.shape == (2, frames, config_kwargs["conv_dim"][-1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out, [wave_ref, *encoder.parameters()], grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_layer_norm_eps_is_applied_on_quiet_input(backend):
    """Every layer's rows have a variance near LayerNorm's eps (a quiet wave, small convs after layer
    0), so the output depends on eps: 50x it, or a 50th of it, moves the output far past the
    tolerance. With a non-default eps given to the op and to transformers' LayerNorms, both backends
    match transformers in float64."""
    eps = 3e-5
    encoder = hf_encoder(SMALL, conv_bias=False).double()
    with torch.no_grad():
        for layer in encoder.conv_layers[1:]:
            layer.conv.weight.mul_(0.01)
    wave = 5e-3 * torch.randn(2, 977, dtype=torch.float64)

    def transformers_output(ln_eps):
        for layer in encoder.conv_layers:
            layer.layer_norm.eps = ln_eps
        with torch.no_grad():
            return encoder(wave).transpose(1, 2)

    for wrong in (50 * eps, eps / 50):
        assert (transformers_output(wrong) - transformers_output(eps)).abs().max() > 0.05
    expected = transformers_output(eps)
    args, kwargs = split(
        {k: [t.float() for t in v] if k != "strides" and v else v for k, v in encoder_params(encoder).items()}
    )
    with d2v_kernels.use_backend(conv_feature_extractor=backend), d2v_kernels.record_dispatch() as calls:
        out = ops.conv_feature_extractor(wave.float(), *args, **kwargs, eps=eps)
    assert calls[("conv_feature_extractor", backend)] == 1, calls
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# CPU: dispatch of the cuda backend, its checks, fake impl and backward math
# --------------------------------------------------------------------------------------------


def _cuda_impl():
    return next(i for i in dispatch.implementations("conv_feature_extractor") if i.backend == "cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_cuda_backend_unavailable_on_cpu_torch_with_reason():
    assert _cuda_impl().available() == ["d2v_kernels._C not built: torch is a CPU build"]
    assert _extension.extension_reasons() == ["d2v_kernels._C not built: torch is a CPU build"]
    info = _extension.build_info()
    assert info["loaded"] is False and info["reasons"] == ["d2v_kernels._C not built: torch is a CPU build"]
    with pytest.raises(RuntimeError, match="torch is a CPU build"):
        _extension.module()


def test_forcing_cuda_backend_raises_with_the_reason():
    params = make_params(**SMALL)
    args, kwargs = split(params)
    wave = torch.randn(2, 400)
    reasons = _extension.extension_reasons() or ["inputs are on cpu, cuda runs on cuda"]
    with d2v_kernels.use_backend(conv_feature_extractor="cuda"):
        with pytest.raises(d2v_kernels.BackendUnavailableError) as excinfo:
            ops.conv_feature_extractor(wave, *args, **kwargs)
    message = str(excinfo.value)
    assert message.startswith("conv_feature_extractor: backend 'cuda' was forced but cannot take this input")
    assert reasons[0] in message
    with d2v_kernels.record_dispatch() as calls:
        ops.conv_feature_extractor(wave, *args, **kwargs)
    assert calls == {("conv_feature_extractor", "eager"): 1}


def test_cuda_check_accepts_the_gpu_tests_configs():
    """The base config and RESIDUES in every dtype, UNALIGNED in fp32 (the SIMT GEMMs) only."""
    for config, dtypes in ((BASE, DTYPES), (RESIDUES, DTYPES), (UNALIGNED, [torch.float32])):
        for dtype in dtypes:
            params = make_params(**config, dtype=dtype, conv_bias=True)
            args, kwargs = split(params)
            assert cfe._cuda_check(torch.randn(2, 16001, dtype=dtype), *args, **kwargs) == []
    args, kwargs = split(make_params(**UNALIGNED, dtype=torch.float16))
    assert "not a multiple of 8" in cfe._cuda_check(torch.randn(2, 16001, dtype=torch.float16), *args, **kwargs)[0]


def test_cuda_check_lists_what_the_kernels_cannot_take():
    def reasons(wave, params):
        args, kwargs = split(params)
        return cfe._cuda_check(wave, *args, **kwargs)

    params = make_params(**SMALL, dtype=torch.float64)
    assert reasons(torch.randn(2, 400, dtype=torch.float64), params) == [
        "wave is float64; the cuda kernels take float16, bfloat16 or float32"
    ]
    params = make_params(**SMALL, dtype=torch.float16)
    params["ln_weights"][1] = params["ln_weights"][1].float()
    assert reasons(torch.randn(2, 400, dtype=torch.float16), params) == [
        "ln_weights[1] not in wave's dtype float16; the cuda kernels take one dtype for all tensors"
    ]
    params = make_params(conv_dim=(513, 48), conv_kernel=(40, 3), conv_stride=(33, 2))
    assert reasons(torch.randn(2, 4000), params) == [
        "conv_weights[0] has 513 output channels; the cuda kernels take at most 512",
        "layer 0 kernel size 40 is above the cuda limit 32",
        "layer 0 stride 33 is above the cuda limit 32",
    ]
    params = make_params(conv_dim=(20, 40, 12), conv_kernel=(10, 2, 2), conv_stride=(5, 3, 2), dtype=torch.bfloat16)
    assert reasons(torch.randn(2, 4000, dtype=torch.bfloat16), params) == [
        "conv_weights[0], conv_weights[2]: output channels not a multiple of 8; the cuda kernels' bfloat16 GEMMs"
        " load 16 bytes at a time",
        "layer 1: stride 3 is above its kernel size 2; the GEMM kernels need s <= k",
    ]
    assert (
        reasons(torch.randn(2, 4000), make_params(conv_dim=(20, 36, 12), conv_kernel=(10, 2, 2), conv_stride=(5, 2, 2)))
        == []
    )
    params = make_params(**SMALL)
    assert reasons(torch.randn(1, 400).expand(cfe.MAX_BATCH + 1, -1), params) == [
        f"batch {cfe.MAX_BATCH + 1} is above the cuda limit {cfe.MAX_BATCH}"
    ]


class _Ctx:
    """Stands in for autograd's ctx (the autograd engine itself cannot run on fake CUDA tensors
    in a CPU build of torch)."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        self.non_differentiable = tensors


def _empty_params(device, dtype=torch.float16):
    shapes = make_params(**BASE, conv_bias=True)
    return {
        k: [torch.empty(t.shape, dtype=dtype, device=device) for t in v] if k != "strides" else v
        for k, v in shapes.items()
    }


def test_fake_impls_give_shapes_on_fake_cuda_tensors():
    with FakeTensorMode():
        params = _empty_params("cuda")
        params["ln_weights"][2] = None  # no affine on one layer: the run function fills ones
        wave = torch.empty(3, 16001, dtype=torch.float16, device="cuda")
        args, kwargs = split(params)
        out = cfe._run_cuda(wave, *args, **kwargs)
        assert out.shape == (3, 49, 512) and out.dtype == torch.float16 and out.device.type == "cuda"
        params = _empty_params("cuda")
        op_args = [wave, params["conv_weights"], params["ln_weights"], params["ln_biases"], []]
        out, *conv_outputs = torch.ops.d2v_kernels.conv_feature_extractor_cuda_train(*op_args, params["strides"], 1e-5)
        assert out.shape == (3, 49, 512)
        assert [t.shape[1] for t in conv_outputs] == [1599, 799, 399, 199, 99, 49]
        assert all(t.shape[0] == 3 and t.shape[2] == 512 and t.dtype == torch.float16 for t in conv_outputs)
        grads = torch.ops.d2v_kernels.conv_feature_extractor_cuda_bwd(
            torch.empty_like(out), *op_args, conv_outputs, params["strides"], 1e-5, 2, False
        )
        assert grads[0].numel() == 0 and len(grads) == 1 + 3 * 7
        for got, want in zip(grads[1:], params["conv_weights"] + params["ln_weights"] + params["ln_biases"]):
            assert got.shape == (want.shape if got.numel() else (0,))
        assert [g.numel() > 0 for g in grads[1:8]] == [False, False] + [True] * 5


def test_a_channels_first_conv_output_on_the_gpu_is_copied_with_one_warning(monkeypatch):
    # the CPU stands in for the GPU here (fake CUDA tensors cannot be copied on a CPU build)
    monkeypatch.setattr(triton_path, "_LAYOUT_COPY_WARNED_ON", ("cpu",))
    monkeypatch.setattr(triton_path, "_warned_layout_copy", False)
    channels_last = torch.randn(2, 40, 512).transpose(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert triton_path._channels_last(channels_last) is channels_last
    channels_first = torch.randn(2, 512, 40)
    with pytest.warns(UserWarning, match=r"has strides \(20480, 40, 1\) where channels-last was expected"):
        copied = triton_path._channels_last(channels_first)
    assert copied.stride() == (20480, 1, 512) and torch.equal(copied, channels_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a process
        triton_path._channels_last(channels_first)


@pytest.mark.parametrize("op", ["train", "recompute"])
def test_backward_gives_gradient_shapes_on_meta_tensors(op, monkeypatch):
    """The autograd formulas of the training op (conv outputs kept) and of the op that keeps nothing
    (its backward reruns the training forward): which gradients the extension's backward is asked
    for, and their shapes. Meta tensors run the custom ops' fake impls; the formulas are called
    directly because the custom ops only have CUDA kernels."""
    monkeypatch.setattr(cfe, "extension_reasons", lambda: [])  # as if loaded: the fake impls run
    params = _empty_params("meta")
    wave = torch.empty(3, 16001, dtype=torch.float16, device="meta")
    op_args = [wave, params["conv_weights"], params["ln_weights"], params["ln_biases"], params["conv_biases"]]
    for t in params["conv_weights"][2:] + params["conv_biases"][2:]:
        t.requires_grad_(True)  # layers 0 and 1 and the LayerNorm affines stay frozen: None for them
    ctx = _Ctx(needs_input_grad=(False,))
    inputs = (*op_args, params["strides"], 1e-5)
    with torch.no_grad():  # as in autograd's backward pass
        if op == "train":
            out, *conv_outputs = torch.ops.d2v_kernels.conv_feature_extractor_cuda_train(*inputs)
            cfe._train_setup_context(ctx, inputs, [out, *conv_outputs])
            assert ctx.non_differentiable == tuple(conv_outputs)
            assert ctx.saved_tensors[-6:] == tuple(conv_outputs)
            grads = cfe._train_backward(ctx, [torch.empty_like(out)] + [None] * 6)
        else:
            out = torch.ops.d2v_kernels.conv_feature_extractor_cuda(*inputs)
            cfe._setup_context(ctx, inputs, out)
            grads = cfe._backward(ctx, torch.empty_like(out))
    d_wave, d_w, d_lw, d_lb, d_cb, d_strides, d_eps = grads
    assert d_wave is None and d_strides is None and d_eps is None
    assert d_w[:2] == [None, None] and d_cb[:2] == [None, None]
    for got, want in zip(d_w[2:] + d_cb[2:], params["conv_weights"][2:] + params["conv_biases"][2:]):
        assert got.shape == want.shape and got.dtype == want.dtype
    assert d_lw == [None] * 7 and d_lb == [None] * 7


def test_autograd_through_the_registered_formulas_on_meta_tensors(monkeypatch):
    """The custom ops' autograd registrations themselves (the training op's list output and its
    non-differentiable conv outputs; the plain op's recompute), run by the autograd engine on meta
    tensors: every leaf gets a gradient of its shape."""
    monkeypatch.setattr(cfe, "extension_reasons", lambda: [])  # as if loaded: the fake impls run
    params = make_params(**SMALL, dtype=torch.float16, conv_bias=True)
    leaves = [t.to("meta").requires_grad_(True) for t in all_tensors(torch.randn(2, 1601), params)]
    n = len(SMALL["conv_dim"])
    wave, groups = leaves[0], [leaves[1 + k * n : 1 + (k + 1) * n] for k in range(4)]
    out = cfe._run_cuda(wave, *groups[:3], strides=params["strides"], conv_biases=groups[3])
    outputs = torch.ops.d2v_kernels.conv_feature_extractor_cuda_train(wave, *groups, params["strides"], 1e-5)
    assert not any(t.requires_grad for t in outputs[1:])
    plain = torch.ops.d2v_kernels.conv_feature_extractor_cuda(wave, *groups, params["strides"], 1e-5)
    for result in (out, outputs[0], plain):
        grads = torch.autograd.grad(result, leaves, torch.empty_like(result))
        assert [g.shape for g in grads] == [t.shape for t in leaves]


def test_cuda_ops_pass_opcheck_on_meta_tensors(monkeypatch):
    """Schemas, fake impls, autograd registrations and their traced forms (opcheck's
    test_aot_dispatch_dynamic) of the three custom ops, on meta tensors (the fake impls run)."""
    monkeypatch.setattr(cfe, "extension_reasons", lambda: [])
    params = make_params(**SMALL, dtype=torch.float16, conv_bias=True)
    leaves = [t.to("meta").requires_grad_(True) for t in all_tensors(torch.randn(2, 1601), params)]
    n = len(SMALL["conv_dim"])
    groups = [leaves[1 + k * n : 1 + (k + 1) * n] for k in range(4)]
    op_args = (leaves[0], *groups, params["strides"], 1e-5)
    torch.library.opcheck(torch.ops.d2v_kernels.conv_feature_extractor_cuda.default, op_args)
    torch.library.opcheck(torch.ops.d2v_kernels.conv_feature_extractor_cuda_train.default, op_args)
    with torch.no_grad():
        out, *conv_outputs = torch.ops.d2v_kernels.conv_feature_extractor_cuda_train(*op_args)
    detached = [[t.detach() for t in group] for group in groups]
    bwd_args = (torch.empty_like(out), leaves[0].detach(), *detached, conv_outputs, params["strides"], 1e-5, 0, True)
    torch.library.opcheck(torch.ops.d2v_kernels.conv_feature_extractor_cuda_bwd.default, bwd_args)


def test_lowest_layer_is_the_first_with_a_gradient_to_give():
    n = 3
    frozen = [False] * n
    assert cfe._lowest_layer((True, frozen, frozen, frozen, [])) == 0
    assert cfe._lowest_layer((False, frozen, frozen, frozen, [])) == n
    assert cfe._lowest_layer((False, frozen, [False, True, False], frozen, [])) == 1
    assert cfe._lowest_layer((False, frozen, frozen, frozen, [False, False, True])) == 2


# --------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against float64 eager
# --------------------------------------------------------------------------------------------


def _run_cuda_and_reference(wave, params, *, grads, backend="cuda"):
    """(kernel out, float64 reference out, eager out), and each one's gradients when ``grads``;
    the kernels of ``backend`` ("cuda": the extension, or "triton")."""
    results = []
    for run_backend, dtype in ((backend, wave.dtype), ("eager", torch.float64), ("eager", wave.dtype)):
        w = wave.detach().to(dtype).requires_grad_(grads)
        p = {
            k: (
                [t.detach().to(dtype).requires_grad_(grads) for t in v]
                if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
                else v
            )
            for k, v in params.items()
        }
        args, kwargs = split(p)
        with d2v_kernels.use_backend(conv_feature_extractor=run_backend), d2v_kernels.record_dispatch() as calls:
            out = ops.conv_feature_extractor(w, *args, **kwargs)
        assert calls == {("conv_feature_extractor", run_backend): 1}, calls
        g = None
        if grads:
            torch.manual_seed(1)
            grad_out = torch.randn(out.shape, device=out.device, dtype=torch.float64).to(dtype)
            g = torch.autograd.grad(out, all_tensors(w, p), grad_out)
        results.append((out.detach(), g))
    return results


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("samples", [400, 16001, 160000])
def test_cuda_forward_and_gradients_match_float64(dtype, samples):
    params = make_params(**BASE, device="cuda")
    wave = torch.randn(2, samples, device="cuda")
    (out, g), (ref, g64), (eager, g_eager) = _run_cuda_and_reference(wave.to(dtype), params, grads=True)
    assert_close_to_reference(out, ref, eager)
    names = ["wave"] + [f"{n}[{i}]" for n in ("conv_weights", "ln_weights", "ln_biases") for i in range(7)]
    for name, a, b, c in zip(names, g, g64, g_eager):
        assert_close_to_reference(a, b, c, name=f"grad {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("samples", [16001, 160000])
def test_cuda_hopper_conv_and_sm80_gemms_both_match_float64(dtype, samples):
    """On an H100 the extension's forward convs of layers 1.. are CUTLASS 3's sm_90a conv and its
    backward GEMMs CUTLASS 3's sm_90a GEMMs (where the build has sm_90a: the wheel, a JIT build
    there); elsewhere, and with set_hopper_conv(False), the Sm80 GEMMs. Both paths, forward and
    backward, against float64."""
    from d2v_kernels.ops import conv_feature_extractor_op as cfe

    params = make_params(**BASE, device="cuda")
    wave = torch.randn(2, samples, device="cuda").to(dtype)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    hopper_build = archs is None or "9.0a" in archs
    expected = "sm90a_conv" if torch.cuda.get_device_capability() == (9, 0) and hopper_build else "sm80_gemm"
    assert cfe.cuda_forward_conv(wave) == expected
    assert cfe.cuda_forward_conv(wave.float()) == "sm80_gemm"
    assert cfe.cuda_forward_conv(wave, [torch.zeros(512, device="cuda", dtype=dtype)] * 7) == "sm80_gemm"
    assert cfe.cuda_forward_conv(wave, strides=list(BASE["conv_stride"])) == expected
    before = cfe.set_hopper_conv(True)
    try:
        for hopper in (True, False):
            assert cfe.set_hopper_conv(hopper) is (not hopper)  # the previous setting
            assert cfe.cuda_forward_conv(wave) == (expected if hopper else "sm80_gemm")
            (out, g), (ref, g64), (eager, g_eager) = _run_cuda_and_reference(wave, params, grads=True)
            assert_close_to_reference(out, ref, eager, name=f"out (hopper conv {hopper})")
            for i, (a, b, c) in enumerate(zip(g, g64, g_eager)):
                assert_close_to_reference(a, b, c, name=f"grad {i} (hopper conv {hopper})")
    finally:
        cfe.set_hopper_conv(before)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("samples", [16001, 160000])
def test_triton_path_forward_and_gradients_match_float64_on_gpu(dtype, samples, monkeypatch):
    """The default CUDA path (Triton layer 0 and its one-kernel backward, cuDNN, Triton LayerNorm +
    GELU, activations recomputed in the backward) at Data2Vec's size."""
    params = make_params(**BASE, device="cuda")
    wave = torch.randn(2, samples, device="cuda")
    monkeypatch.setattr(triton_path, "_warned_layout_copy", False)  # it warns once a process
    with warnings.catch_warnings():
        # cuDNN must return channels-last conv outputs for channels-last inputs (the path's premise:
        # no transpose between layers); a copy would warn
        warnings.filterwarnings("error", message=".*where channels-last was expected")
        (out, g), (ref, g64), (eager, g_eager) = _run_cuda_and_reference(
            wave.to(dtype), params, grads=True, backend="triton"
        )
    assert out.is_contiguous()
    assert_close_to_reference(out, ref, eager)
    names = ["wave"] + [f"{n}[{i}]" for n in ("conv_weights", "ln_weights", "ln_biases") for i in range(7)]
    for name, a, b, c in zip(names, g, g64, g_eager):
        assert_close_to_reference(a, b, c, name=f"grad {name}")


def _training_peak_bytes(wave, params, backend):
    """Peak memory of forward + backward above what was allocated before (the waveform is an input,
    not trained, as in fine-tuning)."""
    leaves = [t.detach().requires_grad_(True) for t in all_tensors(wave, params)[1:]]
    p = dict(params)
    n = len(p["conv_weights"])
    p["conv_weights"], p["ln_weights"], p["ln_biases"] = leaves[:n], leaves[n : 2 * n], leaves[2 * n : 3 * n]
    args, kwargs = split(p)
    frames = cfe.output_length(wave.shape[1], BASE["conv_kernel"], BASE["conv_stride"])
    grad_out = torch.randn(wave.shape[0], frames, BASE["conv_dim"][-1], device="cuda", dtype=wave.dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with d2v_kernels.use_backend(conv_feature_extractor=backend):
        out = ops.conv_feature_extractor(wave, *args, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    del out, grads
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_path_training_peak_memory_is_at_most_half_of_eager(dtype):
    """#7's memory target at its case, B=8 x 10 s: the Triton path keeps one conv output a layer
    for the backward and recomputes the activations; eager keeps four tensors a layer. Both peaks
    include cuDNN's workspaces (a smaller batch would weigh them more)."""
    params = make_params(**BASE, device="cuda", dtype=dtype)
    wave = torch.randn(8, 160000, device="cuda", dtype=dtype)
    eager = _training_peak_bytes(wave, params, "eager")
    triton = _training_peak_bytes(wave, params, "triton")
    assert triton <= 0.5 * eager, f"peak {triton / 2**20:.0f} MiB, eager {eager / 2**20:.0f} MiB"


# A layer-1 stride TMA's im2col mode cannot encode (above the extension's MAX_HOPPER_CONV_STRIDE, 8):
# that layer takes the Sm80 GEMMs on an H100, the next one the Hopper conv.
WIDE_STRIDE = dict(conv_dim=(16, 16, 16), conv_kernel=(10, 9, 2), conv_stride=(5, 9, 2))


@pytest.mark.cuda
def test_cuda_stride_beyond_tma_im2col_runs_the_gemms_and_matches_float64():
    params = make_params(**WIDE_STRIDE, device="cuda")
    wave = torch.randn(2, 16001, device="cuda", dtype=torch.bfloat16)
    assert cfe.extension_module().MAX_HOPPER_CONV_STRIDE == 8
    assert cfe.cuda_forward_conv(wave, strides=list(WIDE_STRIDE["conv_stride"])) == "sm80_gemm"
    (out, g), (ref, g64), (eager, g_eager) = _run_cuda_and_reference(wave, params, grads=True)
    assert_close_to_reference(out, ref, eager, name="out")
    for i, (a, b, c) in enumerate(zip(g, g64, g_eager)):
        assert_close_to_reference(a, b, c, name=f"grad {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [SMALL, RESIDUES, UNALIGNED], ids=["small", "residues", "unaligned-channels"])
def test_cuda_odd_configs_with_conv_bias(dtype, config):
    params = make_params(**config, device="cuda", conv_bias=True)
    wave = torch.randn(3, 3001, device="cuda", dtype=dtype)
    if config is UNALIGNED and dtype != torch.float32:
        args, kwargs = split(make_params(**config, device="cuda", dtype=dtype, conv_bias=True))
        with d2v_kernels.use_backend(conv_feature_extractor="cuda"):
            with pytest.raises(d2v_kernels.BackendUnavailableError, match="not a multiple of 8"):
                ops.conv_feature_extractor(wave, *args, **kwargs)
        return
    (out, g), (ref, g64), (eager, g_eager) = _run_cuda_and_reference(wave, params, grads=True)
    assert_close_to_reference(out, ref, eager)
    for i, (a, b, c) in enumerate(zip(g, g64, g_eager)):
        assert_close_to_reference(a, b, c, name=f"grad {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_frozen_layers_get_no_gradient_and_the_others_match_float64(dtype):
    """freeze_feature_encoder() with the first layers only (the waveform is never trained): the
    extension's backward stops at the lowest layer with a gradient to give."""
    params = make_params(**BASE, device="cuda")
    wave = torch.randn(2, 16001, device="cuda")
    results = []
    for backend, run_dtype in (("cuda", dtype), ("eager", torch.float64), ("eager", dtype)):
        p = {k: v if k == "strides" or v is None else [t.detach().to(run_dtype) for t in v] for k, v in params.items()}
        leaves = []
        for name in ("conv_weights", "ln_weights", "ln_biases"):
            for i, t in enumerate(p[name]):
                t.requires_grad_(i >= 2)
                leaves += [t] if i >= 2 else []
        args, kwargs = split(p)
        with d2v_kernels.use_backend(conv_feature_extractor=backend):
            out = ops.conv_feature_extractor(wave.to(run_dtype), *args, **kwargs)
        torch.manual_seed(1)
        grad_out = torch.randn(out.shape, device="cuda", dtype=torch.float64).to(run_dtype)
        results.append(torch.autograd.grad(out, leaves, grad_out))
    for i, (a, b, c) in enumerate(zip(*results)):
        assert_close_to_reference(a, b, c, name=f"grad {i}")


@pytest.mark.cuda
def test_cuda_misaligned_parameter_views_take_the_element_wise_row_kernels():
    """LayerNorm affines and conv biases that are views one element into a larger tensor: the row
    kernels move single elements instead of 16-byte packs, the GEMM epilogue reads a copy of the bias;
    the results match those of the aligned parameters."""
    params = make_params(**SMALL, device="cuda", dtype=torch.float16, conv_bias=True)
    args, kwargs = split(params)
    shifted = lambda ts: [torch.cat([t.new_zeros(1), t])[1:] for t in ts]
    assert all(t.data_ptr() % 16 for t in shifted(params["ln_weights"]))
    wave = torch.randn(2, 1601, device="cuda", dtype=torch.float16)
    with d2v_kernels.use_backend(conv_feature_extractor="cuda"):
        aligned = ops.conv_feature_extractor(wave, *args, **kwargs)
        views = ops.conv_feature_extractor(
            wave,
            args[0],
            shifted(args[1]),
            shifted(args[2]),
            **{**kwargs, "conv_biases": shifted(kwargs["conv_biases"])},
        )
    torch.testing.assert_close(views, aligned)  # the lanes sum other channels: rounding may differ


@pytest.mark.cuda
def test_cuda_backward_is_deterministic():
    """No atomics: dgamma and dbeta are per-block partials, the conv bias gradient a torch sum, the weight
    gradients per-batch-row partials, each summed in a fixed order; two runs agree bit for bit."""
    params = make_params(**BASE, device="cuda", dtype=torch.bfloat16, conv_bias=True)
    wave = torch.randn(3, 16001, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_(True) for t in all_tensors(wave, params)]
        n = len(params["conv_weights"])
        groups = [leaves[1 + k * n : 1 + (k + 1) * n] for k in range(4)]
        with d2v_kernels.use_backend(conv_feature_extractor="cuda"):
            out = ops.conv_feature_extractor(leaves[0], *groups[:3], strides=params["strides"], conv_biases=groups[3])
        torch.manual_seed(2)
        runs.append(torch.autograd.grad(out, leaves, torch.randn_like(out)))
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"gradient {i} differs between two runs"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_training_peak_memory_is_at_most_half_of_eager(dtype):
    """#24's memory target at B=8 x 10 s: the training forward keeps each later layer's conv output
    (one tensor a layer) and the backward recomputes the activations."""
    params = make_params(**BASE, device="cuda", dtype=dtype)
    wave = torch.randn(8, 160000, device="cuda", dtype=dtype)
    eager = _training_peak_bytes(wave, params, "eager")
    cuda = _training_peak_bytes(wave, params, "cuda")
    assert cuda <= 0.5 * eager, f"peak {cuda / 2**20:.0f} MiB, eager {eager / 2**20:.0f} MiB"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_batch_of_different_lengths_equals_each_wave_alone(dtype):
    params = make_params(**BASE, device="cuda", dtype=dtype)
    args, kwargs = split(params)
    lengths = [16001, 9377, 400]
    wave = torch.zeros(len(lengths), max(lengths), device="cuda", dtype=dtype)
    for b, n in enumerate(lengths):
        wave[b, :n] = torch.randn(n, device="cuda", dtype=dtype)
    with d2v_kernels.use_backend(conv_feature_extractor="cuda"):
        batched = ops.conv_feature_extractor(wave, *args, **kwargs)
        for b, n in enumerate(lengths):
            alone = ops.conv_feature_extractor(wave[b : b + 1, :n].contiguous(), *args, **kwargs)
            frames = cfe.output_length(n, BASE["conv_kernel"], BASE["conv_stride"])
            # Frames inside a wave's own length see no padding: rows are independent in the kernels.
            torch.testing.assert_close(batched[b : b + 1, :frames], alone)


@pytest.mark.cuda
def test_cuda_dispatch_opcheck_compile_and_limits(monkeypatch):
    monkeypatch.setenv("D2V_KERNELS_ENABLE_OPT_IN", "1")  # the cuda backend is opt-in until validated
    ext = _extension.module()
    assert (ext.MAX_CHANNELS, ext.MAX_LAYER0_KERNEL, ext.MAX_LAYER0_STRIDE, ext.MAX_BATCH, ext.GEMM_ALIGNMENT) == (
        cfe.MAX_CHANNELS,
        cfe.MAX_LAYER0_KERNEL,
        cfe.MAX_LAYER0_STRIDE,
        cfe.MAX_BATCH,
        cfe.GEMM_ALIGNMENT,
    )
    params = make_params(**SMALL, device="cuda", dtype=torch.float16, conv_bias=True)
    wave = torch.randn(2, 1601, device="cuda", dtype=torch.float16)
    args, kwargs = split(params)
    with d2v_kernels.record_dispatch() as calls:
        ops.conv_feature_extractor(wave, *args, **kwargs)
    assert calls == {("conv_feature_extractor", "cuda"): 1}

    leaves = [t.detach().requires_grad_(True) for t in all_tensors(wave, params)]
    n = len(params["conv_weights"])
    op_args = (
        leaves[0],
        leaves[1 : n + 1],
        leaves[n + 1 : 2 * n + 1],
        leaves[2 * n + 1 : 3 * n + 1],
        leaves[3 * n + 1 :],
        params["strides"],
        1e-5,
    )
    torch.library.opcheck(torch.ops.d2v_kernels.conv_feature_extractor_cuda.default, op_args)
    torch.library.opcheck(torch.ops.d2v_kernels.conv_feature_extractor_cuda_train.default, op_args)
    with torch.no_grad():
        out, *conv_outputs = torch.ops.d2v_kernels.conv_feature_extractor_cuda_train(*op_args)
    detached = [[t.detach() for t in group] for group in op_args[1:5]]
    bwd_args = (torch.randn_like(out), op_args[0].detach(), *detached, conv_outputs, params["strides"], 1e-5, 0, True)
    torch.library.opcheck(torch.ops.d2v_kernels.conv_feature_extractor_cuda_bwd.default, bwd_args)

    compiled = torch.compile(lambda w: ops.conv_feature_extractor(w, *args, **kwargs), fullgraph=True)
    out = compiled(wave)
    torch.testing.assert_close(out, ops.conv_feature_extractor(wave, *args, **kwargs))


# --------------------------------------------------------------------------------------------
# Bad input (public validation; every backend)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: a.update(wave=[0.0] * 400), TypeError, "wave must be a torch.Tensor, got list"),
        (lambda a: a.update(wave=torch.randn(2, 1, 400)), ValueError, r"wave must have 2 dimensions"),
        (lambda a: a.update(wave=torch.zeros(2, 400, dtype=torch.int64)), TypeError, "wave must have dtype in"),
        (lambda a: a.update(conv_weights=[]), ValueError, "conv_weights must be a non-empty list"),
        (
            lambda a: a["conv_weights"].__setitem__(1, torch.randn(48, 31, 3)),
            ValueError,
            r"conv_weights\[1\] must have 32 input channels, got shape \(48, 31, 3\)",
        ),
        (
            lambda a: a.update(ln_weights=a["ln_weights"][:2]),
            ValueError,
            r"ln_weights must have 3 entries \(one per layer\), got 2",
        ),
        (
            lambda a: a["ln_biases"].__setitem__(2, torch.randn(47)),
            ValueError,
            r"ln_biases\[2\] must have shape \(48,\), got \(47,\)",
        ),
        (lambda a: a.update(strides=[5, 2.0, 2]), ValueError, r"strides\[1\] must be a positive int, got 2.0"),
        (lambda a: a.update(eps=0.0), ValueError, "eps must be a positive float, got 0.0"),
        (lambda a: a.update(wave=torch.randn(2, 12)), ValueError, "wave has 12 samples, too few for one output frame"),
    ],
    ids=[
        "wave-list",
        "wave-3d",
        "wave-int",
        "no-layers",
        "in-channels",
        "ln-count",
        "ln-shape",
        "stride-float",
        "eps-zero",
        "too-short",
    ],
)
def test_bad_input_raises_with_message(change, error, message):
    a = dict(wave=torch.randn(2, 400), **make_params(**SMALL))
    change(a)
    with pytest.raises(error, match=message):
        ops.conv_feature_extractor(
            a["wave"],
            a["conv_weights"],
            a["ln_weights"],
            a["ln_biases"],
            strides=a["strides"],
            conv_biases=a["conv_biases"],
            eps=a.get("eps", 1e-5),
        )


def _compute_sanitizer() -> str | None:
    import shutil
    from pathlib import Path

    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "compute-sanitizer").exists():
        return str(Path(CUDA_HOME) / "bin" / "compute-sanitizer")
    return shutil.which("compute-sanitizer")


@pytest.mark.cuda
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_cuda_kernels_are_compute_sanitizer_clean(tool):
    """Out-of-bounds or misaligned accesses (memcheck), shared-memory hazards of the CUTLASS GEMMs'
    cp.async pipelines and of the row kernels' block reductions (racecheck) and barrier misuse
    (synccheck), forward and backward. Every kernel of the script is checked (the CUTLASS ones have
    no name of ours to filter on), torch's few included."""
    import subprocess
    import sys
    from pathlib import Path

    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (CUDA_HOME/bin or PATH)")
    _extension.module()  # build (or load) the extension before the sanitized process reuses it
    script = Path(__file__).resolve().parent / "_sanitize_feature_extractor.py"
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3"]
    cmd += [sys.executable, str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "sanitized run done" in log, log[-6000:]
    assert "ERROR SUMMARY: 0 errors" in log or "RACECHECK SUMMARY: 0 hazards" in log, log[-6000:]
