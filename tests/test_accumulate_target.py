"""ops.accumulate_target: Data2Vec's target accumulation, eager and Triton (interpreter on CPU),
against float64 and against torch's own instance / layer norms."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import d2v_kernels
from d2v_kernels import dispatch, ops
from d2v_kernels.kernels import accumulate_target as kernels
from d2v_kernels.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NORMS = ["instance", "layer", "none"]
BACKENDS = ["triton", "eager"]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _layer(batch, frames, channels, dtype, *, channels_first=False, offset=0.5):
    """Random (B, T, C) layer output, or the (B, T, C) transpose of a contiguous (B, C, T) tensor."""
    shape = (batch, channels, frames) if channels_first else (batch, frames, channels)
    x = torch.randn(shape).mul(2.0).add(offset).to(dtype)
    return x.transpose(1, 2) if channels_first else x


def _ragged_mask(batch, frames, lengths):
    """(B, T) bool: sample b's first lengths[b] frames valid."""
    return torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]


def _check(backend, acc0, x, **options):
    """acc0 + the op's addition, by ``backend``, within the shared bound of a float64 run of the
    reference (the eager reference in fp32 sets the bound); the backend asserted as having run."""
    acc = acc0.clone()
    with torch.no_grad(), d2v_kernels.use_backend(accumulate_target=backend), d2v_kernels.record_dispatch() as calls:
        out = ops.accumulate_target(acc, x, **options)
    assert out is acc
    assert calls == {("accumulate_target", backend): 1}
    ref64 = ops.accumulate_target_reference(acc0.double(), x.double(), **options)
    eager = ops.accumulate_target_reference(acc0.clone(), x, **options)
    assert_close_to_reference(acc, ref64, eager, name=f"acc ({options['norm']})")
    return acc


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64(on_device, backend, norm, dtype):
    """B=3, T=37 (a partial tile), C=48 and C=20; with and without a padding mask (one sample fully
    valid, one with one valid frame); a channels-first tensor transposed."""
    acc0 = torch.randn(3, 37, 48)
    mask = _ragged_mask(3, 37, [37, 1, 23])
    for padding_mask in (None, mask):
        _check(backend, acc0, _layer(3, 37, 48, dtype), norm=norm, scale=0.375, padding_mask=padding_mask)
    x = _layer(3, 37, 20, dtype, channels_first=True)
    _check(backend, torch.randn(3, 37, 20), x, norm=norm, scale=-1.5, padding_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_instance_norm_over_several_tiles_with_a_large_mean(on_device, dtype):
    """T=150 spans three of the kernel's 64-frame tiles (statistics merged across them), padding
    ends mid-tile, and a mean of 300 against a spread of 2 (a sum-of-squares variance would cancel)."""
    x = _layer(2, 150, 40, dtype, offset=300.0)
    mask = _ragged_mask(2, 150, [150, 97])
    acc0 = torch.randn(2, 150, 40)
    acc = _check("triton", acc0, x, norm="instance", scale=0.5, padding_mask=mask)
    # The masked statistics are those of the valid frames alone (fp32 inputs near 300 carry about
    # 2e-5 of rounding into a normalised value: the float64 bound above is the tight check).
    expected = 0.5 * F.instance_norm(x[1:, :97].double().transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close((acc - acc0)[1:, :97].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_three_layers_average_torch_norms(on_device, backend, norm):
    """acc = mean over 3 layers of each normalised layer: against F.instance_norm of the (B, C, T)
    tensor (fairseq's) or F.layer_norm, in float64, without a mask."""
    layers = [_layer(2, 19, 24, dtype) for dtype in DTYPES]
    acc = torch.zeros(2, 19, 24)
    with torch.no_grad(), d2v_kernels.use_backend(accumulate_target=backend), d2v_kernels.record_dispatch() as calls:
        for layer in layers:
            ops.accumulate_target(acc, layer, norm=norm, scale=1 / 3)
    assert calls == {("accumulate_target", backend): 3}
    if norm == "instance":
        normed = [F.instance_norm(x.double().transpose(1, 2)).transpose(1, 2) for x in layers]
    else:
        normed = [F.layer_norm(x.double(), (24,)) for x in layers]
    expected = torch.stack(normed).mean(0)
    torch.testing.assert_close(acc.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_frames_untouched(on_device, backend, norm):
    """Non-finite values at padded frames are never read; acc there keeps its bits; a sample without
    a valid frame adds nothing; an integer 0/1 mask equals the bool one; a strided acc works."""
    x = _layer(3, 21, 20, torch.float16)
    lengths = [21, 0, 5]
    mask = _ragged_mask(3, 21, lengths)
    x[~mask] = float("nan")
    x[2, 7] = float("inf")
    storage = torch.randn(3, 21, 2, 20)
    acc, neighbour = storage[:, :, 1], storage[:, :, 0].clone()  # acc's strides (840, 40, 1)
    before = acc.clone()
    with torch.no_grad(), d2v_kernels.use_backend(accumulate_target=backend):
        ops.accumulate_target(acc, x, norm=norm, scale=2.0, padding_mask=mask.long())
    assert torch.equal(acc[~mask], before[~mask])
    assert torch.isfinite(acc).all()
    assert torch.equal(storage[:, :, 0], neighbour)
    expected = before.double()
    for b, n in enumerate(lengths):
        if n:
            expected[b : b + 1, :n] = ops.accumulate_target_reference(
                before[b : b + 1, :n].double(), x[b : b + 1, :n].double(), norm=norm, scale=2.0
            )
    torch.testing.assert_close(acc.double(), expected, atol=1e-5, rtol=1e-5)


def test_default_dispatch_on_cpu_is_eager_without_warning():
    acc = torch.zeros(2, 5, 8)
    with torch.no_grad(), d2v_kernels.record_dispatch() as calls:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops.accumulate_target(acc, torch.randn(2, 5, 8), norm="layer", scale=1.0)
    assert calls == {("accumulate_target", "eager"): 1}


def test_layer_rows_wider_than_the_kernel_are_a_reason():
    assert kernels.unsupported_reasons("layer", kernels.MAX_CHANNELS) == []
    assert "channels" in kernels.unsupported_reasons("layer", kernels.MAX_CHANNELS + 1)[0]
    assert kernels.unsupported_reasons("none", 4 * kernels.MAX_CHANNELS) == []
    acc = torch.zeros(1, 1, kernels.MAX_CHANNELS + 1)
    with d2v_kernels.use_backend(accumulate_target="triton"), pytest.raises(dispatch.BackendUnavailableError):
        ops.accumulate_target(acc, acc.clone(), norm="layer", scale=1.0)


def test_opcheck_and_compile_fullgraph():
    acc, x = torch.randn(2, 9, 12), _layer(2, 9, 12, torch.float16)
    mask = _ragged_mask(2, 9, [9, 4])
    with d2v_kernels.use_backend(accumulate_target="triton"):
        torch.library.opcheck(
            torch.ops.d2v_kernels.accumulate_target.default, (acc.clone(), x, "instance", 0.5, mask, 1e-5)
        )

    def targets(x):
        out = torch.zeros(2, 9, 12)
        ops.accumulate_target(out, x, norm="layer", scale=0.5, padding_mask=mask)
        return ops.accumulate_target(out, x, norm="instance", scale=0.5, padding_mask=mask)

    compiled = torch.compile(targets, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = targets(x)
        with d2v_kernels.use_backend(accumulate_target="triton"):
            torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


def _bad(**changes):
    args = {"acc": torch.zeros(2, 5, 8), "layer_out": torch.randn(2, 5, 8), "norm": "instance", "scale": 0.5}
    return args | changes


BAD_INPUTS = [
    pytest.param(_bad(acc=torch.zeros(2, 5, 8, dtype=torch.float16)), TypeError, "acc", id="acc-fp16"),
    pytest.param(_bad(acc=torch.zeros(2, 5)), ValueError, "acc", id="acc-2d"),
    pytest.param(_bad(acc=[0.0]), TypeError, "acc", id="acc-list"),
    pytest.param(_bad(acc=torch.zeros(2, 5, 1).expand(2, 5, 8)), ValueError, "acc", id="acc-expanded"),
    pytest.param(_bad(layer_out=torch.randn(2, 5, 9)), ValueError, "layer_out", id="shape"),
    pytest.param(_bad(layer_out=torch.randn(2, 5, 8).double()), TypeError, "layer_out", id="layer_out-fp64"),
    pytest.param(_bad(layer_out=torch.randn(2, 5, 8, device="meta")), ValueError, "device", id="device"),
    pytest.param(_bad(norm="batch"), ValueError, "norm", id="norm"),
    pytest.param(_bad(scale=float("nan")), ValueError, "scale", id="scale-nan"),
    pytest.param(_bad(scale=torch.tensor(0.5)), ValueError, "scale", id="scale-tensor"),
    pytest.param(_bad(eps=0.0), ValueError, "eps", id="eps"),
    pytest.param(_bad(padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "padding_mask", id="mask-shape"),
    pytest.param(_bad(padding_mask=torch.ones(2, 5)), TypeError, "padding_mask", id="mask-float"),
    pytest.param(_bad(layer_out=torch.randn(2, 5, 8, requires_grad=True)), ValueError, "no_grad", id="grad"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_INPUTS)
def test_bad_input(kwargs, error, match):
    acc, layer_out = kwargs.pop("acc"), kwargs.pop("layer_out")
    with pytest.raises(error, match=match):
        ops.accumulate_target(acc, layer_out, **kwargs)


def test_requires_grad_is_fine_under_no_grad():
    acc, x = torch.zeros(2, 5, 8), torch.randn(2, 5, 8, requires_grad=True)
    with torch.no_grad():
        ops.accumulate_target(acc, x, norm="none", scale=1.0)
    assert not acc.requires_grad
    torch.testing.assert_close(acc, x.detach())
