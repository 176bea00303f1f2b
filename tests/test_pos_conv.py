"""pos_conv: Triton grouped conv + LayerNorm + GELU per layer (interpreter on CPU) against float64
eager, against transformers' Data2VecAudioPositionalConvEmbedding, gradients, opcheck, compile,
bad input and dispatch reasons."""

import warnings

import pytest
import torch
from transformers import Data2VecAudioConfig
from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioPositionalConvEmbedding

import d2v_kernels
from d2v_kernels import dispatch, ops
from d2v_kernels.kernels import pos_conv as kernels
from d2v_kernels.ops.pos_conv_op import ENV_ONE_PASS, pos_conv_channels_last, pos_conv_prefer
from d2v_kernels.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _params(channels, groups, kernel_size, num_layers, *, bias=True, dtype=torch.float64):
    fan_in = channels // groups * kernel_size
    weights = [
        torch.randn(channels, channels // groups, kernel_size, dtype=dtype) / fan_in**0.5 for _ in range(num_layers)
    ]
    biases = [torch.randn(channels, dtype=dtype) * 0.5 if bias else None for _ in range(num_layers)]
    return weights, biases


def _cast(ts, dtype, requires_grad=False):
    return [None if t is None else t.detach().to(dtype).requires_grad_(requires_grad) for t in ts]


def _triton(x, weights, biases, groups, eps=1e-5):
    with d2v_kernels.use_backend(pos_conv="triton"):
        return ops.pos_conv(x, weights, biases, groups=groups, eps=eps)


def _check_forward(x64, weights64, biases64, groups, dtype):
    ref64 = ops.pos_conv_reference(x64, weights64, biases64, groups=groups)
    x, weights, biases = x64.to(dtype), _cast(weights64, dtype), _cast(biases64, dtype)
    eager = ops.pos_conv_reference(x, weights, biases, groups=groups)
    out = _triton(x, weights, biases, groups)
    assert out.dtype == dtype
    assert_close_to_reference(out, ref64, eager)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel_size", [19, 4], ids=["k19", "k4"])
@pytest.mark.parametrize("frames", [1, 9, 50], ids=lambda t: f"T{t}")
def test_forward_matches_float64_reference(frames, kernel_size, dtype):
    x = torch.randn(2, frames, 48, dtype=torch.float64)
    weights, biases = _params(48, 4, kernel_size, 2)  # 12 channels per group: tiles padded to 16
    _check_forward(x, weights, biases, 4, dtype)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("kernel_size,dtype", [(4, torch.float16), (5, torch.bfloat16)], ids=["k4-fp16", "k5-bf16"])
def test_one_launch_form_forward_and_gradients_match_float64(kernel_size, dtype, monkeypatch):
    """Each layer as one launch (the conv with its normalising tail; opt-in), forward and backward
    against float64: odd T, 10 channels a group. (The two-launch form is the default every other
    test of the Triton path runs, in every dtype; fp32 of this form: the small-variance test.)"""
    monkeypatch.setenv(ENV_ONE_PASS, "1")
    x64 = torch.randn(2, 13, 40, dtype=torch.float64)
    weights64, biases64 = _params(40, 4, kernel_size, 2)
    grad_out = torch.randn(2, 13, 40, dtype=torch.float64)

    def reference(x, w, b):
        return ops.pos_conv_reference(x, w, b, groups=4)

    out64, ref64 = _gradients(reference, x64, weights64, biases64, grad_out)
    x, weights, biases = x64.to(dtype), _cast(weights64, dtype), _cast(biases64, dtype)
    eager_out, eager = _gradients(reference, x, weights, biases, grad_out)
    with d2v_kernels.record_dispatch() as calls:
        out, grads = _gradients(lambda x, w, b: _triton(x, w, b, 4), x, weights, biases, grad_out)
        with torch.no_grad():
            inference = _triton(x, weights, biases, 4)
    assert calls == {("pos_conv", "triton"): 2}
    assert_close_to_reference(out, out64, eager_out)
    torch.testing.assert_close(inference, out.detach(), rtol=0, atol=0)
    for name, g, r, e in zip(["dx", "dweight0", "dweight1", "dbias0", "dbias1"], grads, ref64, eager):
        assert_close_to_reference(g, r, e, name=name)


@pytest.mark.usefixtures("on_device")
def test_small_variance_rows_one_launch_equals_two_launch(monkeypatch):
    """Rows whose variance is tiny against their mean (a large bias, small weights) and near eps:
    the tail's statistics come from whole rows in two passes, as the row kernel's, so the forms
    agree exactly, and both match float64."""
    x64 = torch.randn(1, 11, 40, dtype=torch.float64)
    weights64, _ = _params(40, 4, 5, 2)
    weights64 = [w * 1e-2 for w in weights64]
    biases64 = [torch.full((40,), 50.0, dtype=torch.float64) + 1e-3 * torch.randn(40, dtype=torch.float64)] * 2
    ref64 = ops.pos_conv_reference(x64, weights64, biases64, groups=4)
    x, weights, biases = x64.float(), _cast(weights64, torch.float32), _cast(biases64, torch.float32)
    two = _triton(x, weights, biases, 4)
    monkeypatch.setenv(ENV_ONE_PASS, "1")
    one = _triton(x, weights, biases, 4)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    assert_close_to_reference(one, ref64, ops.pos_conv_reference(x, weights, biases, groups=4))


@pytest.mark.cuda
def test_one_launch_form_is_repeatable_and_matches_two_launch_at_the_model_shape(monkeypatch):
    """On the GPU, at Data2VecAudio-base's shape: the tail's counters order every group's stores
    before the rows are normalised, so repeated runs are bit-equal (a race would show here), and
    both forms are within the dtype rule of float64."""
    x64 = torch.randn(8, 499, 768, dtype=torch.float64)
    x64[1:, 400:] = 0.0
    weights64, biases64 = _params(768, 16, 19, 5)
    ref64 = ops.pos_conv_reference(x64, weights64, biases64, groups=16)
    x, weights, biases = x64.cuda().half(), _cast(weights64, torch.float16), _cast(biases64, torch.float16)
    weights, biases = [w.cuda() for w in weights], [b.cuda() for b in biases]
    eager = ops.pos_conv_reference(x, weights, biases, groups=16).cpu()
    with torch.no_grad():
        two = _triton(x, weights, biases, 16)
        monkeypatch.setenv(ENV_ONE_PASS, "1")
        one = [_triton(x, weights, biases, 16) for _ in range(20)]
    for out in one[1:]:
        assert torch.equal(out, one[0])
    assert_close_to_reference(one[0].cpu(), ref64, eager)
    assert_close_to_reference(two.cpu(), ref64, eager)


@pytest.mark.parametrize(
    "channels,groups,kernel_size,dtype",
    [
        (96, 2, 5, torch.float16),  # 48 channels per group: 3 blocks of 16 input channels, 64-wide output tile
        (40, 8, 3, torch.float32),  # 5 channels per group
        (36, 1, 6, torch.bfloat16),  # one group of 36: masked input-channel block
        (120, 2, 19, torch.float32),  # 60 channels per group; 65 frames: two 64-frame tiles
    ],
    ids=["C96g2k5-fp16", "C40g8k3-fp32", "C36g1k6-bf16", "C120g2k19-fp32"],
)
@pytest.mark.usefixtures("on_device")
def test_forward_group_shapes(channels, groups, kernel_size, dtype):
    x = torch.randn(1, 65 if channels == 120 else 23, channels, dtype=torch.float64)
    weights, biases = _params(channels, groups, kernel_size, 1)
    _check_forward(x, weights, biases, groups, dtype)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("kernel_size,num_layers", [(19, 3), (4, 2)], ids=["k19-3layers", "k4-2layers"])
def test_matches_transformers_module_on_padded_frames(kernel_size, num_layers):
    config = Data2VecAudioConfig(
        hidden_size=48,
        num_conv_pos_embedding_groups=4,
        conv_pos_kernel_size=kernel_size,
        num_conv_pos_embeddings=num_layers,
    )
    module = Data2VecAudioPositionalConvEmbedding(config).eval()
    hidden = torch.randn(2, 50, 48)
    hidden[1, 37:] = 0.0  # the encoder zeroes padded frames before the positional conv
    with torch.no_grad():
        expected = module(hidden)
        layers = list(module.layers)
        out = _triton(hidden, [layer.conv.weight for layer in layers], [layer.conv.bias for layer in layers], 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_padded_frames_half_precision(dtype):
    x = torch.randn(2, 50, 48, dtype=torch.float64)
    x[0, 41:] = 0.0
    x[1, 17:] = 0.0
    weights, biases = _params(48, 4, 19, 2)
    _check_forward(x, weights, biases, 4, dtype)


def _gradients(fn, x, weights, biases, grad_out):
    x = x.detach().requires_grad_()
    weights = [w.detach().requires_grad_() for w in weights]
    biases = [None if b is None else b.detach().requires_grad_() for b in biases]
    out = fn(x, weights, biases)
    out.backward(grad_out.to(out.dtype))
    return out, [x.grad, *(w.grad for w in weights), *(b.grad for b in biases if b is not None)]


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("frames,kernel_size", [(9, 19), (50, 4), (1, 19)], ids=["T9-k19", "T50-k4", "T1-k19"])
def test_gradients_match_float64_reference(frames, kernel_size, dtype):
    groups = 4
    x64 = torch.randn(2, frames, 48, dtype=torch.float64)
    weights64, biases64 = _params(48, groups, kernel_size, 2)
    grad_out = torch.randn(2, frames, 48, dtype=torch.float64)

    def reference(x, w, b):
        return ops.pos_conv_reference(x, w, b, groups=groups)

    _, ref64 = _gradients(reference, x64, weights64, biases64, grad_out)
    x, weights, biases = x64.to(dtype), _cast(weights64, dtype), _cast(biases64, dtype)
    _, eager = _gradients(reference, x, weights, biases, grad_out)
    _, grads = _gradients(lambda x, w, b: _triton(x, w, b, groups), x, weights, biases, grad_out)
    names = ["dx", "dweight0", "dweight1", "dbias0", "dbias1"]
    for name, g, r, e in zip(names, grads, ref64, eager):
        assert g.dtype == dtype, name
        assert_close_to_reference(g, r, e, name=name)


@pytest.mark.usefixtures("on_device")
def test_gradients_without_bias_and_frozen_input():
    x64 = torch.randn(1, 21, 40, dtype=torch.float64)
    weights64, biases64 = _params(40, 8, 6, 2, bias=False)
    grad_out = torch.randn(1, 21, 40, dtype=torch.float64)
    weights64 = [w.requires_grad_() for w in weights64]
    ops.pos_conv_reference(x64, weights64, biases64, groups=8).backward(grad_out)
    weights = _cast(weights64, torch.float32, requires_grad=True)
    out = _triton(x64.float(), weights, biases64, 8)
    out.backward(grad_out.float())
    for w, w64 in zip(weights, weights64):
        torch.testing.assert_close(w.grad, w64.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("on_device")
def test_strided_input_forward_and_gradients():
    x64 = torch.randn(2, 48, 9, dtype=torch.float64).transpose(1, 2)  # (B, T, C) view of channels-first memory
    weights64, biases64 = _params(48, 4, 4, 2)
    grad_out = torch.randn(2, 9, 48, dtype=torch.float64)

    def reference(x, w, b):
        return ops.pos_conv_reference(x, w, b, groups=4)

    out64, ref64 = _gradients(reference, x64, weights64, biases64, grad_out)
    x = x64.float()
    assert not x.is_contiguous()
    out, grads = _gradients(
        lambda x, w, b: _triton(x, w, b, 4),
        x,
        _cast(weights64, torch.float32),
        _cast(biases64, torch.float32),
        grad_out,
    )
    torch.testing.assert_close(out, out64.float(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref64):
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("on_device")
def test_mixed_dtype_weights_run_in_input_dtype_with_grads_in_weight_dtype():
    x64 = torch.randn(2, 9, 48, dtype=torch.float64)
    weights64, biases64 = _params(48, 4, 4, 1)
    x = x64.half()
    weights = _cast(weights64, torch.float32, requires_grad=True)
    biases = _cast(biases64, torch.float32, requires_grad=True)
    out = _triton(x, weights, biases, 4)
    assert out.dtype == torch.float16
    expected = ops.pos_conv_reference(x, _cast(weights, torch.float16), _cast(biases, torch.float16), groups=4)
    assert_close_to_reference(out, ops.pos_conv_reference(x64, weights64, biases64, groups=4), expected)
    out.float().sum().backward()
    assert weights[0].grad.dtype == torch.float32 and biases[0].grad.dtype == torch.float32


@pytest.mark.usefixtures("on_device")
def test_inference_keeps_no_activations_and_matches_training_path():
    x = torch.randn(2, 9, 48)
    weights, biases = (_cast(p, torch.float32) for p in _params(48, 4, 19, 2))
    out_inference, kept = torch.ops.d2v_kernels.pos_conv(x, weights, biases, 4, 1e-5, False)
    out_training, pre_norm = torch.ops.d2v_kernels.pos_conv(x, weights, biases, 4, 1e-5, True)
    assert kept.shape == (0, 2, 9, 48) and pre_norm.shape == (2, 2, 9, 48)
    torch.testing.assert_close(out_inference, out_training, rtol=0, atol=0)
    torch.testing.assert_close(out_training, ops.pos_conv_reference(x, weights, biases, groups=4))


def test_opcheck():
    x = torch.randn(1, 9, 48, requires_grad=True)
    weights, biases = _params(48, 4, 4, 2, dtype=torch.float32)
    weights = [w.requires_grad_() for w in weights]
    biases = [biases[0].requires_grad_(), torch.randn(48)]
    torch.library.opcheck(torch.ops.d2v_kernels.pos_conv.default, (x, weights, biases, 4, 1e-5, True))
    pre_norm = torch.randn(2, 1, 9, 48)
    torch.library.opcheck(
        torch.ops.d2v_kernels.pos_conv_backward.default,
        (torch.randn(1, 9, 48), x.detach(), pre_norm, [w.detach() for w in weights], 4, 1e-5),
    )


def test_torch_compile_fullgraph_forward_and_backward():
    x = torch.randn(2, 9, 48, requires_grad=True)
    weights, biases = (_cast(p, torch.float32, requires_grad=True) for p in _params(48, 4, 4, 2))

    def fn(x, weights, biases):
        return ops.pos_conv(x, weights, biases, groups=4)

    with d2v_kernels.use_backend(pos_conv="triton"):
        compiled = torch.compile(fn, fullgraph=True)
        out = compiled(x, weights, biases)
        out.square().sum().backward()
    grads = [x.grad, *(w.grad for w in weights), *(b.grad for b in biases)]
    x2, w2, b2 = x.detach().requires_grad_(), _cast(weights, torch.float32, True), _cast(biases, torch.float32, True)
    expected = ops.pos_conv_reference(x2, w2, b2, groups=4)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, [x2.grad, *(w.grad for w in w2), *(b.grad for b in b2)]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_size,dtype", [(5, torch.float32), (4, torch.bfloat16)], ids=["k5-fp32", "k4-bf16"])
def test_channels_last_eager_matches_reference(kernel_size, dtype):
    """The eager backend's CUDA formulation (conv2d on the channels-last memory) computes what
    transformers' module does, forward and backward, within the dtype rule (runs on the CPU too)."""
    x64 = torch.randn(2, 23, 40, dtype=torch.float64)
    x64[1, 15:] = 0.0
    weights64, biases64 = _params(40, 4, kernel_size, 2)  # 10 channels per group
    grad_out = torch.randn(2, 23, 40, dtype=torch.float64)

    def reference(x, w, b):
        return ops.pos_conv_reference(x, w, b, groups=4)

    def channels_last(x, w, b):
        return pos_conv_channels_last(x, w, b, groups=4)

    out64, ref64 = _gradients(reference, x64, weights64, biases64, grad_out)
    out, grads = _gradients(channels_last, x64, weights64, biases64, grad_out)
    torch.testing.assert_close(out, out64, rtol=1e-12, atol=1e-12)
    x, weights, biases = x64.to(dtype), _cast(weights64, dtype), _cast(biases64, dtype)
    eager_out, eager = _gradients(reference, x, weights, biases, grad_out)
    out, grads = _gradients(channels_last, x, weights, biases, grad_out)
    assert out.dtype == dtype
    assert_close_to_reference(out, out64, eager_out)
    for name, g, r, e in zip(["dx", "dweight0", "dweight1", "dbias0", "dbias1"], grads, ref64, eager):
        assert_close_to_reference(g, r, e, name=name)


def _fake_cuda_inputs(requires_grad: bool):
    x = torch.randn(2, 9, 48, device="cuda", dtype=torch.float16)
    weights = [torch.randn(48, 12, 5, device="cuda", dtype=torch.float16) for _ in range(2)]
    biases = [torch.randn(48, device="cuda", dtype=torch.float16), None]
    if requires_grad:
        weights[1].requires_grad_()
    return x, weights, biases


def test_measured_rule_on_cuda_inputs():
    """The rule table: on CUDA, training (autograd records the op) and tracing prefer eager
    (cuDNN channels-last); inference keeps the priority order (Triton); CPU inputs keep it too.
    Fake CUDA tensors: the rule and dispatch read only metadata."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    declared = dispatch.rule("pos_conv")
    assert declared.prefer is pos_conv_prefer and "20261125-091743-pos_conv.json" in declared.evidence
    cpu = (torch.randn(1, 5, 48, requires_grad=True), [torch.randn(48, 12, 3)], [None])
    assert pos_conv_prefer(*cpu, groups=4) == ()
    with FakeTensorMode():
        inference, training = _fake_cuda_inputs(False), _fake_cuda_inputs(True)
        assert pos_conv_prefer(*inference, groups=4) == ()
        assert pos_conv_prefer(*training, groups=4) == ("eager",)
        with torch.no_grad():
            assert pos_conv_prefer(*training, groups=4) == ()
        x_grad = (inference[0].requires_grad_(), *inference[1:])
        assert pos_conv_prefer(*x_grad, groups=4) == ("eager",)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.compiler, "is_compiling", lambda: True)
            assert pos_conv_prefer(*_fake_cuda_inputs(False), groups=4) == ("eager",)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cuda = torch.device("cuda")
            assert dispatch.select("pos_conv", cuda, *_fake_cuda_inputs(False), groups=4).backend == "triton"
            assert dispatch.select("pos_conv", cuda, *training, groups=4).backend == "eager"
            with d2v_kernels.use_backend(pos_conv="triton"):  # forcing beats the rule
                assert dispatch.select("pos_conv", cuda, *training, groups=4).backend == "triton"


@pytest.mark.cuda
def test_default_dispatch_on_cuda_follows_the_rule_without_warning():
    x = torch.randn(2, 50, 48, device="cuda", dtype=torch.float16)
    weights, biases = (_cast(p, torch.float16) for p in _params(48, 4, 19, 2, dtype=torch.float32))
    weights, biases = [w.cuda() for w in weights], [b.cuda() for b in biases]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with d2v_kernels.record_dispatch() as calls:
            with torch.no_grad():
                inference = ops.pos_conv(x, weights, biases, groups=4)
            training = ops.pos_conv(x.requires_grad_(), weights, biases, groups=4)
            training.sum().backward()
    assert calls == {("pos_conv", "triton"): 1, ("pos_conv", "eager"): 1}
    assert x.grad is not None
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=1e-2)


def test_dispatch_records_triton_and_cpu_defaults_to_eager():
    x = torch.randn(1, 5, 48)
    weights, biases = _cast(_params(48, 4, 3, 1)[0], torch.float32), [None]
    with d2v_kernels.record_dispatch() as calls:
        ops.pos_conv(x, weights, biases, groups=4)
        _triton(x, weights, biases, 4)
    assert calls == {("pos_conv", "eager"): 1, ("pos_conv", "triton"): 1}


@pytest.mark.parametrize(
    "channels,groups,dtype,reason",
    [
        (48, 4, torch.float64, "dtype float64"),
        (160, 2, torch.float32, f"80 channels per group; the kernels take at most {kernels.MAX_GROUP_CHANNELS}"),
    ],
    ids=["float64", "group-too-wide"],
)
def test_forced_triton_raises_with_reasons(channels, groups, dtype, reason):
    x = torch.randn(1, 5, channels, dtype=dtype)
    weights = [torch.randn(channels, channels // groups, 3, dtype=dtype)]
    impl = next(i for i in dispatch.implementations("pos_conv") if i.backend == "triton")
    assert any(reason in r for r in impl.check(x, weights, [None], groups=groups))
    with pytest.raises(d2v_kernels.BackendUnavailableError, match=reason):
        _triton(x, weights, [None], groups)
    # Without forcing, the same input runs eager.
    with d2v_kernels.record_dispatch() as calls:
        ops.pos_conv(x, weights, [None], groups=groups)
    assert calls == {("pos_conv", "eager"): 1}


@pytest.mark.parametrize(
    "make,error,message",
    [
        (
            lambda: ((torch.randn(1, 5, 48), [torch.randn(48, 12, 3)], [torch.randn(47)]), {"groups": 4}),
            ValueError,
            r"biases\[0\] must have shape \(48,\)",
        ),
        (lambda: ((torch.randn(1, 5, 48), [], []), {"groups": 4}), ValueError, "weights must be a non-empty list"),
        (
            lambda: ((torch.randn(1, 5, 48), [torch.randn(48, 12, 3)], [None]), {"groups": 0}),
            ValueError,
            "groups must be a positive int",
        ),
        (
            lambda: ((torch.randn(1, 5, 48), [torch.randn(48, 12, 3)], [None]), {"groups": 4, "eps": 0.0}),
            ValueError,
            "eps must be a positive",
        ),
        (
            lambda: ((torch.randn(1, 5, 48).int(), [torch.randn(48, 12, 3)], [None]), {"groups": 4}),
            TypeError,
            "x must have dtype",
        ),
        (
            lambda: ((torch.randn(1, 5, 48), [torch.randn(48, 12, 3)], [None, None]), {"groups": 4}),
            ValueError,
            "biases must have 1 entries",
        ),
    ],
    ids=["bias-shape", "no-layers", "groups-zero", "eps-zero", "int-input", "bias-count"],
)
def test_bad_inputs(make, error, message):
    args, kwargs = make()
    with pytest.raises(error, match=message):
        _triton(*args, **kwargs)


def test_inference_packed_weights_follow_the_parameters():
    """Inference keeps the packed weights while the parameters are unchanged: an in-place update
    (an optimizer step), new tensors in their place, and a bias gained all give the new result."""
    x = torch.randn(2, 9, 32)
    weights, biases = _params(32, 4, 3, 2, dtype=torch.float32)
    with torch.no_grad():
        first = _triton(x, weights, biases, 4)
        torch.testing.assert_close(first, ops.pos_conv_reference(x, weights, biases, groups=4))
        weights[1].mul_(-2.0)  # in place: the version counter moves
        biases = [b.clone() + 1.0 for b in biases]  # new tensors
        second = _triton(x, weights, biases, 4)
        torch.testing.assert_close(second, ops.pos_conv_reference(x, weights, biases, groups=4))
        assert not torch.allclose(first, second)
        third = _triton(x, weights, [None, biases[1]], 4)
        torch.testing.assert_close(third, ops.pos_conv_reference(x, weights, [None, biases[1]], groups=4))
