"""Bad input raises a clear error naming the argument and what was expected."""

import pytest
import torch

import d2v_kernels
from d2v_kernels import ops


def qkv(b=2, n=5, h=3, d=16, dtype=torch.float32):
    return [torch.randn(b, n, h, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: ops.attention(*qkv()[:2], torch.randn(2, 5, 3)), ValueError, "v must have 4 dimensions"),
        (lambda: ops.attention(torch.randn(2, 5, 3, 16), *qkv(dtype=torch.float16)[:2]), TypeError, "share one dtype"),
        (lambda: ops.attention(*qkv(), bias_table=torch.randn(10, 3)), ValueError, "given together"),
        (
            lambda: ops.attention(
                *qkv(), bias_table=torch.randn(10, 2), bias_index=torch.zeros(5, 5, dtype=torch.long)
            ),
            ValueError,
            "bias_table must have shape",
        ),
        (
            lambda: ops.attention(
                *qkv(), bias_table=torch.randn(10, 3), bias_index=torch.zeros(5, 4, dtype=torch.long)
            ),
            ValueError,
            "bias_index must have shape",
        ),
        (
            lambda: ops.attention(*qkv(), bias_table=torch.randn(10, 3), bias_index=torch.zeros(5, 5)),
            TypeError,
            "bias_index must have dtype",
        ),
        (lambda: ops.attention(*qkv(), bias=torch.randn(2, 3, 5, 4)), ValueError, "bias must be broadcastable"),
        (lambda: ops.attention(*qkv(), key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"\(B, Nk\)"),
        (
            lambda: ops.attention(*qkv(), key_padding_mask=torch.ones(2, 5)),
            TypeError,
            "key_padding_mask must have dtype",
        ),
        (lambda: ops.attention(*qkv(), dropout_p=1.0), ValueError, "dropout_p must be a float in"),
        (lambda: ops.attention(*qkv(), causal=1), TypeError, "causal must be a bool"),
        (lambda: ops.attention(*qkv(), scale="x"), TypeError, "scale must be a float"),
        (lambda: ops.attention("q", *qkv()[:2]), TypeError, "q must be a torch.Tensor"),
        (lambda: ops.attention(*[t.int() for t in qkv()]), TypeError, "q must have dtype"),
        (
            lambda: ops.attention(torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)),
            ValueError,
            "k must have shape",
        ),
        (lambda: ops.layer_norm_gelu(torch.randn(4, 8), torch.randn(7)), ValueError, "weight must have shape"),
        (lambda: ops.layer_norm_gelu(torch.randn(4, 8), channels_dim=2), ValueError, "channels_dim must be in"),
        (lambda: ops.layer_norm_gelu(torch.randn(4, 8), approximate="fast"), ValueError, "approximate must be one of"),
        (lambda: ops.layer_norm_gelu(torch.randn(4, 8), eps=0.0), ValueError, "eps must be a positive float"),
        (lambda: ops.layer_norm_gelu(torch.ones(4, 8, dtype=torch.long)), TypeError, "x must have dtype"),
        (
            lambda: ops.add_layer_norm(torch.randn(4, 8), torch.randn(4, 7), None, None),
            ValueError,
            "residual must have x's shape",
        ),
        (
            lambda: ops.add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), None, None, return_sum=1),
            TypeError,
            "return_sum",
        ),
        (lambda: ops.pos_conv(torch.randn(2, 9, 48), [torch.randn(48, 12, 5)], [None], groups=5), ValueError, "groups"),
        (
            lambda: ops.pos_conv(torch.randn(2, 9, 48), [torch.randn(48, 8, 5)], [None], groups=4),
            ValueError,
            r"weights\[0\]",
        ),
        (
            lambda: ops.pos_conv(
                torch.randn(2, 9, 48), [torch.randn(48, 12, 5), torch.randn(48, 12, 4)], [None, None], groups=4
            ),
            ValueError,
            "one kernel size",
        ),
        (
            lambda: ops.pos_conv(torch.randn(9, 48), [torch.randn(48, 12, 5)], [None], groups=4),
            ValueError,
            "x must have 3",
        ),
        (
            lambda: ops.pos_conv(torch.randn(2, 9, 48), [torch.randn(48, 12, 5)], [None, None], groups=4),
            ValueError,
            "biases",
        ),
        (
            lambda: ops.conv_feature_extractor(
                torch.randn(2, 100), [torch.randn(8, 2, 10)], [None], [None], strides=[5]
            ),
            ValueError,
            r"conv_weights\[0\] must have 1 input channels",
        ),
        (
            lambda: ops.conv_feature_extractor(torch.randn(2, 5), [torch.randn(8, 1, 10)], [None], [None], strides=[5]),
            ValueError,
            "too few",
        ),
        (
            lambda: ops.conv_feature_extractor(
                torch.randn(2, 100), [torch.randn(8, 1, 10)], [None], [None], strides=[0]
            ),
            ValueError,
            r"strides\[0\] must be a positive int",
        ),
        (
            lambda: ops.conv_feature_extractor(
                torch.randn(2, 100), [torch.randn(8, 1, 10)], [torch.randn(7)], [None], strides=[5]
            ),
            ValueError,
            r"ln_weights\[0\] must have shape \(8,\)",
        ),
        (
            lambda: ops.conv_feature_extractor(torch.randn(100), [torch.randn(8, 1, 10)], [None], [None], strides=[5]),
            ValueError,
            "wave must have 2",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_raises(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_device_mix_raises():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        ops.attention(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="one device"):
        ops.layer_norm_gelu(torch.randn(4, 8), torch.randn(8, device="meta"))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_extreme_values_stay_finite(backend):
    q, k, v = qkv()
    with d2v_kernels.use_backend(backend), d2v_kernels.record_dispatch() as calls:
        out = ops.attention(q * 1e3, k * 1e3, v)
        y = ops.layer_norm_gelu(torch.full((3, 8), 1e4) + torch.randn(3, 8))
    assert calls == {("attention", backend): 1, ("layer_norm_gelu", backend): 1}
    assert torch.isfinite(out).all()
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fully_masked_row_is_uniform_like_transformers(backend):
    q, k, v = qkv(b=2, n=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    with d2v_kernels.use_backend(backend), d2v_kernels.record_dispatch() as calls:
        out = ops.attention(q, k, v, key_padding_mask=mask)
    assert calls == {("attention", backend): 1}
    torch.testing.assert_close(out[1], v[1].mean(0, keepdim=True).expand(6, -1, -1))


def test_add_layer_norm_promotes_mixed_dtypes_like_transformers():
    x, residual = torch.randn(4, 8).bfloat16(), torch.randn(4, 8)
    y, s = ops.add_layer_norm(x, residual, None, None, return_sum=True)
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(s, x + residual)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + residual, (8,)))


def _misaligned(*shape, dtype=torch.float16, device="cpu"):
    """A view whose data pointer is off 16-byte alignment (storage offset of one element)."""
    n = 1
    for s in shape:
        n *= s
    return torch.randn(n + 1).to(device=device, dtype=dtype)[1:].view(*shape)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_misaligned_and_non_contiguous_inputs_are_correct_on_the_triton_path(dtype, device):
    x = _misaligned(2, 9, 48, dtype=dtype, device=device)
    residual = _misaligned(2, 9, 48, dtype=dtype, device=device)
    q = _misaligned(2, 11, 3, 16, dtype=dtype, device=device)
    k = torch.randn(2, 3, 11, 16).to(device=device, dtype=dtype).transpose(1, 2)  # non-contiguous view
    v = _misaligned(2, 11, 3, 16, dtype=dtype, device=device)
    channels_first = _misaligned(2, 48, 9, dtype=dtype, device=device)
    cases = {
        "layer_norm_gelu": lambda: ops.layer_norm_gelu(x),
        "layer_norm_gelu/channels-first": lambda: ops.layer_norm_gelu(channels_first, channels_dim=1),
        "add_layer_norm": lambda: ops.add_layer_norm(x, residual, None, None),
        "attention": lambda: ops.attention(q, k, v),
    }
    for name, call in cases.items():
        with d2v_kernels.use_backend("eager"):
            expected = call()
        with d2v_kernels.use_backend("triton"), d2v_kernels.record_dispatch() as calls:
            got = call()
        assert calls == {(name.split("/")[0], "triton"): 1}, (name, calls)
        tol = 2e-3 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_out_of_range_bias_index_is_rejected(backend):
    """An index past the table's rows would be an out-of-bounds read in a kernel: a ValueError
    naming bias_index, on every backend, also when the index changes in place after a good call."""
    q, k, v = qkv()
    table, index = torch.randn(5, 3), torch.randint(0, 5, (5, 5))
    with d2v_kernels.use_backend(attention=backend):
        ops.attention(q, k, v, bias_table=table, bias_index=index)
        with pytest.raises(ValueError, match=r"bias_index must hold indices in \[0, 5\)"):
            ops.attention(q, k, v, bias_table=table, bias_index=torch.full((5, 5), 7))
        index[2, 3] = -1  # in place: the plan of the first call must not let it through
        with pytest.raises(ValueError, match=r"bias_index must hold indices in \[0, 5\).*got \[-1"):
            ops.attention(q, k, v, bias_table=table, bias_index=index)


def test_a_cached_plan_lets_no_other_bad_input_through():
    """After a good call, the same shapes with another dtype, a mask of another shape or dtype, or
    a flag of the wrong type still raise as on a first call (each is another plan key)."""
    q, k, v = qkv()
    keep = torch.ones(2, 5, dtype=torch.bool)
    with d2v_kernels.use_backend(attention="triton"):
        ops.attention(q, k, v, key_padding_mask=keep)
        with pytest.raises(TypeError, match="share one dtype"):
            ops.attention(q, k.half(), v, key_padding_mask=keep)
        with pytest.raises(ValueError, match="key_padding_mask must have shape"):
            ops.attention(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(TypeError, match="key_padding_mask must have dtype"):
            ops.attention(q, k, v, key_padding_mask=keep.float())
        with pytest.raises(TypeError, match="causal must be a bool"):
            ops.attention(q, k, v, key_padding_mask=keep, causal=1)
        with pytest.raises(TypeError, match="scale must be a float"):
            ops.attention(q, k, v, key_padding_mask=keep, scale="0.25")
