"""ops.layer_norm_gelu: the Triton kernel (interpreter on CPU) against float64 eager and transformers."""

from __future__ import annotations

import warnings

import pytest
import torch

import d2v_kernels
from d2v_kernels import dispatch, ops
from d2v_kernels.kernels import layer_norm_gelu as kernels
from d2v_kernels.testing import assert_close_to_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _inputs(shape, channels_dim, dtype, affine, param_dtype=None):
    x = torch.randn(shape, dtype=torch.float32).mul(2.0).add(0.5).to(dtype)
    channels = shape[channels_dim]
    if not affine:
        return x, None, None
    weight = (1.0 + 0.5 * torch.randn(channels)).to(param_dtype or dtype)
    bias = (0.3 * torch.randn(channels)).to(param_dtype or dtype)
    return x, weight, bias


def _run(fn, x, weight, bias, dy, **kwargs):
    """(y, dx, dweight, dbias) of fn with gradients of sum(y * dy)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves, **kwargs)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype)))
    return [y.detach()] + [next(grads) if t is not None else None for t in leaves]


def _check_against_float64(x, weight, bias, channels_dim, approximate="none"):
    kwargs = {"channels_dim": channels_dim, "approximate": approximate}
    dy = torch.randn(x.shape, device=x.device)
    with d2v_kernels.use_backend(layer_norm_gelu="triton"):
        out = _run(ops.layer_norm_gelu, x, weight, bias, dy, **kwargs)
    as64 = [t.double() if t is not None else None for t in (x, weight, bias)]
    ref64 = _run(ops.layer_norm_gelu_reference, *as64, dy.double(), **kwargs)
    eager = _run(ops.layer_norm_gelu_reference, x, weight, bias, dy, **kwargs)
    assert out[0].dtype == x.dtype and out[0].shape == x.shape
    for name, o, r, e in zip(("y", "dx", "dweight", "dbias"), out, ref64, eager):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == e.dtype, name
        assert_close_to_reference(o, r, e, name=name)


LAYOUTS = [
    pytest.param((2, 7, 48), -1, id="channels_last-B2-T7-C48"),
    pytest.param((2, 48, 7), 1, id="channels_first-B2-C48-T7"),
    pytest.param((9, 500), -1, id="rows-N9-C500"),
    pytest.param((1, 500, 5), 1, id="channels_first-B1-C500-T5"),
    pytest.param((3, 1), -1, id="C1"),
    pytest.param((2, 33, 1), 1, id="channels_first-T1"),
    pytest.param((1, 1, 768), -1, id="channels_last-T1-C768"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize(("shape", "channels_dim"), LAYOUTS)
def test_matches_float64_with_affine(shape, channels_dim, dtype):
    _check_against_float64(*_inputs(shape, channels_dim, dtype, affine=True), channels_dim)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize(
    ("shape", "channels_dim"),
    [pytest.param((2, 1024, 3), 1, id="channels_first-C1024"), pytest.param((5, 48), -1, id="rows-C48")],
)
def test_matches_float64_without_affine(shape, channels_dim, dtype):
    """The positional conv's LayerNorm has no affine: dweight and dbias are None."""
    _check_against_float64(*_inputs(shape, channels_dim, dtype, affine=False), channels_dim)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_fp32_parameters_with_half_input(dtype):
    """Autocast-like use: fp32 LayerNorm parameters, half activations; dweight stays fp32."""
    _check_against_float64(*_inputs((2, 48, 6), 1, dtype, affine=True, param_dtype=torch.float32), 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("channels_dim", [-1, 1])
def test_tanh_approximation(channels_dim, dtype):
    shape = (2, 5, 48) if channels_dim == -1 else (2, 48, 5)
    _check_against_float64(*_inputs(shape, channels_dim, dtype, affine=True), channels_dim, approximate="tanh")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("channels_dim", [1, -1], ids=["channels_first", "channels_last"])
def test_small_variance_rows(channels_dim, dtype):
    """Rows whose variance is near eps (and constant rows, where eps alone sets rstd): the
    statistics in fp32 on the unrounded values, as the float64 reference computes them."""
    shape = (2, 40, 5) if channels_dim == 1 else (2, 5, 40)
    x, weight, bias = _inputs(shape, channels_dim, torch.float32, True)
    x = (0.01 + 3e-3 * torch.randn(shape)).to(dtype)  # variance about eps
    x.select(2 if channels_dim == 1 else 1, 0).fill_(0.75)  # constant rows: position 0 of each batch
    _check_against_float64(x, weight.to(dtype), bias.to(dtype), channels_dim)


def test_weight_only_and_bias_only():
    x, weight, bias = _inputs((6, 48), -1, torch.float32, affine=True)
    _check_against_float64(x, weight, None, -1)
    _check_against_float64(x, None, bias, -1)


def test_four_dims_channels_second():
    """(B, C, H, W) with the norm over C: positions are the collapsed (H, W)."""
    _check_against_float64(*_inputs((2, 20, 3, 4), 1, torch.float32, affine=True), 1)


# --------------------------------------------------------------------------------------------
# Strided inputs: read in place, or a dispatch reason
# --------------------------------------------------------------------------------------------


def test_channels_last_view_of_channels_first_storage():
    """transformers' ``conv(x).transpose(1, 2)``: channels_dim=-1 with channel stride T."""
    x, weight, bias = _inputs((2, 48, 9), 1, torch.float32, affine=True)
    view = x.transpose(1, 2)
    assert view.stride(-1) != 1
    _check_against_float64(view, weight, bias, -1)


def test_row_stride_and_sliced_positions():
    x, weight, bias = _inputs((2, 8, 48), -1, torch.float32, affine=True)
    sliced = x[:, :5, :]  # rows not one stride apart across the batch boundary
    assert not sliced.is_contiguous()
    _check_against_float64(sliced, weight, bias, -1)
    y, _, _ = _inputs((2, 48, 10), 1, torch.float32, affine=False)
    _check_against_float64(y[..., 2:9], None, None, 1)


def test_unreadable_layout_is_a_dispatch_reason_and_eager_still_runs():
    x, weight, bias = _inputs((1, 20, 5, 5), 1, torch.float32, affine=True)
    window = x[:, :, :3, :3]  # positions (3, 3) with strides (5, 1): not one stride
    impl = next(i for i in dispatch.implementations("layer_norm_gelu") if i.backend == "triton")
    reasons = impl.check(window, weight, bias, eps=1e-5, channels_dim=1, approximate="none")
    assert len(reasons) == 1 and "strides" in reasons[0]
    with pytest.raises(d2v_kernels.BackendUnavailableError, match="cannot be read as"):
        with d2v_kernels.use_backend(layer_norm_gelu="triton"):
            ops.layer_norm_gelu(window, weight, bias, channels_dim=1)
    with d2v_kernels.record_dispatch() as calls:
        out = ops.layer_norm_gelu(window, weight, bias, channels_dim=1)
    assert calls == {("layer_norm_gelu", "eager"): 1}
    expected = ops.layer_norm_gelu_reference(window.contiguous(), weight, bias, channels_dim=1)
    torch.testing.assert_close(out, expected)


def test_dispatch_reasons_for_dtypes_and_width():
    impl = next(i for i in dispatch.implementations("layer_norm_gelu") if i.backend == "triton")
    kwargs = {"eps": 1e-5, "channels_dim": -1, "approximate": "none"}
    x64 = torch.randn(3, 8, dtype=torch.float64)
    assert any("float64" in r for r in impl.check(x64, None, None, **kwargs))
    x32 = torch.randn(3, 8)
    half_weight = torch.randn(8, dtype=torch.float16)
    assert any("weight has dtype float16" in r for r in impl.check(x32, half_weight, None, **kwargs))
    wide = torch.randn(1, kernels.MAX_CHANNELS + 1)
    assert any("channels" in r for r in impl.check(wide, None, None, **kwargs))
    assert impl.check(x32, torch.randn(8), torch.randn(8), **kwargs) == []


def test_incompatible_upstream_gradient_is_read_after_a_copy():
    """A gradient whose strides the kernel cannot read is made contiguous, not misread."""
    x, weight, bias = _inputs((2, 6, 48), -1, torch.float32, affine=True)
    dy = torch.randn(48, 6, 2).permute(2, 1, 0)  # (2, 6, 48) with channel stride 12
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    with d2v_kernels.use_backend(layer_norm_gelu="triton"):
        grads = torch.autograd.grad(ops.layer_norm_gelu(*leaves), leaves, dy)
    expected = torch.autograd.grad(ops.layer_norm_gelu_reference(*leaves), leaves, dy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# What is saved, and the statistics
# --------------------------------------------------------------------------------------------


def test_saves_input_and_fp32_statistics_only():
    x, weight, bias = _inputs((2, 48, 5), 1, torch.float16, affine=True, param_dtype=torch.float32)
    saved = []
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with d2v_kernels.use_backend(layer_norm_gelu="triton"):
            ops.layer_norm_gelu(*leaves, channels_dim=1)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].dtype == torch.float16  # x itself, not the normalised tensor
    stats = [t for t in saved if t.shape == (2, 5)]
    assert len(stats) == 2 and all(t.dtype == torch.float32 for t in stats)
    assert len(saved) == 5  # x, weight, bias, mean, rstd


def test_statistics_are_fp32_mean_and_rstd():
    x = torch.randn(2, 48, 5, dtype=torch.bfloat16)
    with d2v_kernels.use_backend(layer_norm_gelu="triton"):
        _, mean, rstd = torch.ops.d2v_kernels.layer_norm_gelu_fwd(x, None, None, 1e-5, 1, "none")
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (x64.var(1, unbiased=False) + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Equal to the transformers modules it replaces
# --------------------------------------------------------------------------------------------


def test_equals_data2vec_audio_conv_layer():
    from transformers import Data2VecAudioConfig
    from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioConvLayer

    config = Data2VecAudioConfig(conv_dim=(24, 48), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=False)
    layer = Data2VecAudioConvLayer(config, layer_id=1).eval()
    with torch.no_grad():
        layer.layer_norm.weight.normal_(1.0, 0.3)
        layer.layer_norm.bias.normal_(0.0, 0.3)
        hidden = torch.randn(2, 24, 21)
        expected = layer(hidden)
        conv_out = layer.conv(hidden)
        with d2v_kernels.use_backend(layer_norm_gelu="triton"):
            out = ops.layer_norm_gelu(
                conv_out, layer.layer_norm.weight, layer.layer_norm.bias, eps=layer.layer_norm.eps, channels_dim=1
            )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_equals_data2vec_audio_positional_conv_layer():
    from transformers import Data2VecAudioConfig
    from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioPositionalConvLayer

    config = Data2VecAudioConfig(hidden_size=48, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4)
    layer = Data2VecAudioPositionalConvLayer(config).eval()
    with torch.no_grad():
        hidden = torch.randn(2, 48, 11)
        expected = layer(hidden)
        conv_out = layer.padding(layer.conv(hidden))
        with d2v_kernels.use_backend(layer_norm_gelu="triton"):
            out = ops.layer_norm_gelu(conv_out, eps=layer.layer_norm.eps, channels_dim=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad inputs, torch.library, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"x": [1.0, 2.0]}, TypeError, "x must be a torch.Tensor"),
        ({"weight": torch.randn(7)}, ValueError, r"weight must have shape \(8,\)"),
        ({"bias": torch.randn(8, 1)}, ValueError, "bias must have 1 dimensions"),
        ({"channels_dim": 3}, ValueError, "channels_dim must be in"),
        ({"channels_dim": 1.0}, TypeError, "channels_dim must be an int"),
        ({"eps": 0.0}, ValueError, "eps must be a positive float"),
        ({"approximate": "sigmoid"}, ValueError, "approximate must be one of"),
        ({"x": torch.randn(2, 8).long()}, TypeError, "x must have dtype in"),
    ],
    ids=["not-tensor", "weight-shape", "bias-ndim", "channels-dim-range", "channels-dim-type", "eps", "approx", "int"],
)
def test_bad_inputs(kwargs, error, message):
    args = {"x": torch.randn(2, 8), "weight": torch.randn(8), "bias": torch.randn(8)} | kwargs
    x, weight, bias = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(error, match=message):
        ops.layer_norm_gelu(x, weight, bias, **args)


def test_empty_input_returns_empty():
    x = torch.randn(0, 48, 5)
    with d2v_kernels.use_backend(layer_norm_gelu="triton"):
        assert ops.layer_norm_gelu(x, channels_dim=1).shape == (0, 48, 5)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_opcheck(affine):
    x, weight, bias = _inputs((2, 20, 3), 1, torch.float32, affine=affine)
    x.requires_grad_()
    if affine:
        weight.requires_grad_()
        bias.requires_grad_()
    with d2v_kernels.use_backend(layer_norm_gelu="triton"):
        torch.library.opcheck(torch.ops.d2v_kernels.layer_norm_gelu_fwd.default, (x, weight, bias, 1e-5, 1, "none"))
        params = [p.detach() if p is not None else None for p in (weight, bias)]
        _, mean, rstd = torch.ops.d2v_kernels.layer_norm_gelu_fwd(x.detach(), *params, 1e-5, 1, "none")
        # The backward op is not differentiable itself (no double backward): no input requires grad.
        bwd_args = (torch.randn_like(x), x.detach(), *params, mean, rstd, 1, "none")
        torch.library.opcheck(torch.ops.d2v_kernels.layer_norm_gelu_bwd.default, bwd_args)


def test_torch_compile_fullgraph_forward_and_backward():
    x, weight, bias = _inputs((2, 48, 5), 1, torch.float32, affine=True)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    compiled = torch.compile(ops.layer_norm_gelu, fullgraph=True)
    with d2v_kernels.use_backend(layer_norm_gelu="triton"):
        y = compiled(*leaves, channels_dim=1)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    y_ref = ops.layer_norm_gelu_reference(*leaves, channels_dim=1)
    expected = torch.autograd.grad(y_ref, leaves, torch.ones_like(y_ref))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_records_triton_dispatch():
    x = torch.randn(3, 48)
    with d2v_kernels.use_backend(layer_norm_gelu="triton"), d2v_kernels.record_dispatch() as calls:
        ops.layer_norm_gelu(x)
    assert calls == {("layer_norm_gelu", "triton"): 1}


RULE_CASES = [
    # (shape, channels_dim, affine, training, dtype, preferred): one input of each measured class and
    # of unmeasured neighbours (fp32, another row bucket, affine at the pos conv's width): Triton.
    ((2, 512, 3), 1, True, False, torch.float16, ()),
    ((2, 512, 3), 1, True, True, torch.bfloat16, ("eager",)),
    ((2, 3, 512), -1, True, False, torch.float16, ()),
    ((2, 3, 512), -1, True, True, torch.float16, ("eager",)),
    ((2, 768, 3), 1, False, False, torch.float16, ("eager",)),
    ((2, 768, 3), 1, False, True, torch.float16, ("eager",)),
    ((2, 3, 1024), -1, False, False, torch.bfloat16, ("eager",)),
    ((2, 3, 768), -1, False, True, torch.float16, ("eager",)),
    ((2, 3, 768), -1, False, False, torch.float32, ()),
    ((2, 3, 512), -1, True, True, torch.float32, ()),
    ((2, 3, 2048), -1, False, False, torch.float16, ()),
    ((2, 3, 768), -1, True, False, torch.float16, ()),
    ((2, 512, 3), 1, False, False, torch.float16, ()),
]


@pytest.mark.parametrize(("shape", "channels_dim", "affine", "training", "dtype", "preferred"), RULE_CASES)
def test_measured_rule_table(shape, channels_dim, affine, training, dtype, preferred):
    """The rule answers each class from PREFERENCES (eager where the H100 run measured the kernel
    slower, Triton elsewhere); training is grad mode with an input that requires a gradient."""
    from d2v_kernels.ops import layer_norm_gelu_op

    measured = dispatch.rule("layer_norm_gelu")
    assert measured.prefer is layer_norm_gelu_op.preferred_backends
    assert measured.evidence.startswith("bench/results/") and measured.evidence.endswith("layer_norm_gelu.json")
    x, weight, bias = _inputs(shape, channels_dim, dtype, affine)
    x.requires_grad_(training)
    kwargs = {"eps": 1e-5, "channels_dim": channels_dim % x.dim(), "approximate": "none"}
    assert measured.prefer(x, weight, bias, **kwargs) == preferred
    with torch.no_grad():  # inference, whatever requires a gradient
        assert measured.prefer(x, weight, bias, **kwargs) == layer_norm_gelu_op.preferred_backends(
            x.detach(), weight, bias, **kwargs
        )
    for key, (backends, evidence) in layer_norm_gelu_op.PREFERENCES.items():
        assert backends in ((), ("eager",)) and "triton" in evidence and "eager" in evidence, key


def test_measured_rule_picks_eager_on_cuda_without_a_warning():
    """On a CUDA device (passed to select: the rule reads only the input), the pos conv's class runs
    eager, recorded, without a fallback warning; the encoder's inference class runs Triton."""
    cuda = torch.device("cuda")
    x = torch.randn(2, 3, 768, dtype=torch.float16)
    kwargs = {"eps": 1e-5, "channels_dim": 2, "approximate": "none"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with d2v_kernels.record_dispatch() as calls:
            y = dispatch.call("layer_norm_gelu", cuda, x, None, None, **kwargs)
        assert calls == {("layer_norm_gelu", "eager"): 1}
        torch.testing.assert_close(y, ops.layer_norm_gelu_reference(x, channels_dim=-1))
        x, weight, bias = _inputs((2, 512, 3), 1, torch.float16, True)
        assert dispatch.select("layer_norm_gelu", cuda, x, weight, bias, **{**kwargs, "channels_dim": 1}).backend == (
            "triton"
        )
        posconv = torch.randn(2, 3, 768, dtype=torch.float16)
        with d2v_kernels.use_backend(layer_norm_gelu="triton"):  # forcing beats the rule
            assert dispatch.select("layer_norm_gelu", cuda, posconv, None, None, **kwargs).backend == "triton"


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize(
    ("shape", "channels_dim"),
    [((4, 512, 3199), 1), ((4, 768, 499), 1), ((4, 499, 768), -1), ((3, 1000, 1024), -1)],
    ids=["encoder-C512", "posconv-C768", "channels_last-C768", "C1024"],
)
def test_cuda_matches_float64(shape, channels_dim, dtype):
    _check_against_float64(*[t.cuda() if t is not None else None for t in _inputs(shape, channels_dim, dtype, True)],
                           channels_dim)  # fmt: skip


@pytest.mark.cuda
def test_cuda_parameter_gradients_are_deterministic():
    x, weight, bias = (t.cuda() for t in _inputs((8, 512, 999), 1, torch.float16, True, torch.float32))
    dy = torch.randn_like(x)
    runs = [_run(ops.layer_norm_gelu, x, weight, bias, dy, channels_dim=1) for _ in range(3)]
    for run in runs[1:]:
        assert torch.equal(run[2], runs[0][2]) and torch.equal(run[3], runs[0][3])


@pytest.mark.parametrize("channels_dim", [1, -1], ids=["channels_first", "channels_last"])
def test_int64_offsets_compute_the_same_bits(channels_dim, monkeypatch):
    """Batch slices over 2**31 elements index with int64 (WIDE_OFFSETS); forced on small tensors,
    forward and backward give the same bits as the int32 path."""
    from d2v_kernels.kernels import _row_norm

    shape = (2, 40, 9) if channels_dim == 1 else (2, 9, 40)
    x, weight, bias = _inputs(shape, channels_dim, torch.float16, True)
    dy = torch.randn(x.shape)
    with d2v_kernels.use_backend(layer_norm_gelu="triton"):
        narrow = _run(ops.layer_norm_gelu, x, weight, bias, dy, channels_dim=channels_dim)
        monkeypatch.setattr(_row_norm, "INT32_OFFSET_LIMIT", 0)
        monkeypatch.setattr(_row_norm, "_launches", {})  # the layout's launches chose int32
        d2v_kernels.dispatch.clear_plans()  # and the op's plan holds its forward launch
        wide = _run(ops.layer_norm_gelu, x, weight, bias, dy, channels_dim=channels_dim)
    assert [launch._constexprs[7] for launch in _row_norm._launches.values()] == [True, True]  # WIDE_OFFSETS
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), narrow, wide):
        assert torch.equal(a, b), name


def test_launch_plans_are_kept_per_layout(monkeypatch):
    """Launches are cached by layout: one shape in three layouts (channels-first storage,
    channels-last storage, a slice) makes three forward launches, each result right (forward and
    backward), and the cache stays within its bound."""
    from d2v_kernels.kernels import _row_norm

    monkeypatch.setattr(_row_norm, "_launches", {})
    monkeypatch.setattr(_row_norm, "_MAX_PLANS", 2)
    x, weight, bias = _inputs((2, 48, 9), 1, torch.float32, affine=True)
    channels_last = x.transpose(1, 2).contiguous().transpose(1, 2)
    sliced = _inputs((2, 48, 12), 1, torch.float32, affine=False)[0][..., 3:]
    seen = set()
    for layout in (x, channels_last, sliced, x):
        _check_against_float64(layout, weight, bias, 1)
        seen |= {key for key in _row_norm._launches if key[0] == "fwd"}
        assert len(_row_norm._launches) <= 2
    assert len(seen) == 3


def test_int64_offsets_are_chosen_past_int32():
    from d2v_kernels.kernels._row_norm import wide_offsets

    assert not wide_offsets(512, 32_000, [(512 * 32_000, 32_000, 1)])  # layer 0, 10 s
    assert wide_offsets(512, 4_200_000, [(512 * 4_200_000, 4_200_000, 1)])  # layer 0, 22 minutes
    assert wide_offsets(768, 3_000_000, [(0, 1, 768)])  # 3M channels-last rows of 768 in one slice
    assert not wide_offsets(768, 2_000_000, [(0, 1, 768)])


@pytest.mark.parametrize("channels_dim", [1, -1], ids=["channels_first", "channels_last"])
@pytest.mark.parametrize("into", ["dy", "x"])
def test_backward_written_over_dy_or_x_computes_the_same_bits(channels_dim, into):
    """The backward may write dx over its dy or its x (the feature extractor's backward does, with
    buffers of its own): every tile's rows are read whole before they are written. Two tiles a
    batch row at least (139 positions), so programs sit side by side in each buffer."""
    shape = (2, 40, 139) if channels_dim == 1 else (2, 139, 40)
    x, weight, bias = _inputs(shape, channels_dim, torch.float32, True)
    dy = torch.randn(x.shape)
    _, mean, rstd = kernels.layer_norm_gelu_forward(x, weight, bias, 1e-5, channels_dim, "none")
    expected = kernels.layer_norm_gelu_backward(dy, x, weight, bias, mean, rstd, channels_dim, "none")
    x_copy, dy_copy = x.clone(), dy.clone()
    out = dy_copy if into == "dy" else x_copy
    got = kernels.layer_norm_gelu_backward(dy_copy, x_copy, weight, bias, mean, rstd, channels_dim, "none", out=out)
    assert got[0] is out
    for name, a, b in zip(("dx", "dweight", "dbias"), got, expected):
        assert torch.equal(a, b), name


def test_backward_out_must_have_the_input_layout():
    x, weight, bias = _inputs((2, 40, 9), 1, torch.float32, True)
    _, mean, rstd = kernels.layer_norm_gelu_forward(x, weight, bias, 1e-5, 1, "none")
    dy = torch.randn(x.shape)
    channels_last = torch.empty(2, 9, 40).transpose(1, 2)
    with pytest.raises(ValueError, match=r"out must have x's shape \(2, 40, 9\) and strides \(360, 9, 1\)"):
        kernels.layer_norm_gelu_backward(dy, x, weight, bias, mean, rstd, 1, "none", out=channels_last)
