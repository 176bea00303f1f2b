"""ops.add_layer_norm: the Triton kernel (interpreter on CPU) against float64 eager and transformers;
with dropout of x in the kernels, against float64 eager on the kernels' own keep mask."""

from __future__ import annotations

import functools

import pytest
import torch

import d2v_kernels
from d2v_kernels import dispatch, ops
from d2v_kernels.kernels.add_layer_norm import (
    add_layer_norm_backward_launch,
    add_layer_norm_dropout_keep,
    add_layer_norm_training_launch,
)
from d2v_kernels.ops.dropout_seeds import draw_seeds
from d2v_kernels.testing import assert_close_to_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _inputs(shape, dtype, affine=True, param_dtype=None):
    x = torch.randn(shape).to(dtype)
    residual = (2.0 * torch.randn(shape) + 0.5).to(dtype)
    channels = shape[-1]
    if not affine:
        return x, residual, None, None
    weight = (1.0 + 0.5 * torch.randn(channels)).to(param_dtype or dtype)
    bias = (0.3 * torch.randn(channels)).to(param_dtype or dtype)
    return x, residual, weight, bias


def _run(fn, x, residual, weight, bias, grad_outs, return_sum, x_scale=None):
    """Outputs then gradients (x, residual, weight, bias, x_scale; None where absent) of
    sum(out * grad_out)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, residual, weight, bias, x_scale)]
    out = fn(*leaves[:4], return_sum=return_sum, **({} if x_scale is None else {"x_scale": leaves[4]}))
    outs = list(out) if return_sum else [out]
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(outs, wanted, [g.to(o.dtype) for g, o in zip(grad_outs, outs)]))
    return [o.detach() for o in outs] + [next(grads) if t is not None else None for t in leaves]


def _next_keep(x, dropout_p):
    """The keep mask the next ``ops.add_layer_norm(x, ..., dropout_p=dropout_p)`` on the Triton path
    draws: its seed is the next ``draw_seeds``, taken here and the generator put back."""
    state = torch.get_rng_state()
    seed = draw_seeds(x.device)
    torch.set_rng_state(state)
    return add_layer_norm_dropout_keep(seed, x.shape, dropout_p)


def _dropped_out(keep, dropout_p):
    """The eager reference on ``keep * x / (1 - p)``: F.dropout's result for that mask."""

    def reference(x, *args, **kwargs):
        return ops.add_layer_norm_reference(x * keep.to(x.dtype) * (1.0 / (1.0 - dropout_p)), *args, **kwargs)

    return reference


def _check_against_float64(x, residual, weight, bias, return_sum=False, x_scale=None, dropout_p=0.0):
    grad_outs = [torch.randn(x.shape, device=x.device) for _ in range(2 if return_sum else 1)]
    reference = ops.add_layer_norm_reference
    if dropout_p > 0.0:
        reference = _dropped_out(_next_keep(x, dropout_p), dropout_p)
    op = functools.partial(ops.add_layer_norm, dropout_p=dropout_p)
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        out = _run(op, x, residual, weight, bias, grad_outs, return_sum, x_scale)
    as64 = [t.double() if t is not None else None for t in (x, residual, weight, bias, x_scale)]
    ref64 = _run(reference, *as64[:4], [g.double() for g in grad_outs], return_sum, as64[4])
    eager = _run(reference, x, residual, weight, bias, grad_outs, return_sum, x_scale)
    names = ["y", "sum"][: len(grad_outs)] + ["dx", "dresidual", "dweight", "dbias", "dx_scale"]
    for name, o, r, e in zip(names, out, ref64, eager):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == e.dtype, name
        assert_close_to_reference(o, r, e, name=name)


SHAPES = [
    pytest.param((2, 7, 48), id="B2-T7-C48"),
    pytest.param((9, 500), id="N9-C500"),
    pytest.param((1, 3, 768), id="B1-T3-C768"),
    pytest.param((3, 1), id="C1"),
    pytest.param((1, 1, 1024), id="T1-C1024"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(shape, dtype):
    _check_against_float64(*_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [pytest.param((2, 5, 48), id="B2-T5-C48"), pytest.param((3, 768), id="N3-C768")])
def test_return_sum_gradients_add_in(shape, dtype):
    """(y, x + residual): the sum's own gradient adds into dx and dresidual."""
    _check_against_float64(*_inputs(shape, dtype), return_sum=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_fp32_parameters_with_half_input(dtype):
    _check_against_float64(*_inputs((4, 48), dtype, param_dtype=torch.float32), return_sum=True)


def test_without_affine_and_partial_affine():
    x, residual, weight, bias = _inputs((6, 48), torch.float32)
    _check_against_float64(x, residual, None, None)
    _check_against_float64(x, residual, weight, None)
    _check_against_float64(x, residual, None, bias, return_sum=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_x_scale_matches_float64(dtype):
    """LayerNorm(x_scale * x + residual), the sum returned (vision's layer scale): outputs and the
    gradients of x, residual, weight, bias and x_scale against float64; C not a power of two."""
    x, residual, weight, bias = _inputs((3, 5, 40), dtype)
    x_scale = (0.1 + 0.05 * torch.randn(40)).to(dtype)
    _check_against_float64(x, residual, weight, bias, return_sum=True, x_scale=x_scale)


def test_x_scale_without_sum_or_affine_and_an_fp32_x_scale_promotes():
    """An fp32 x_scale on bf16 inputs computes and returns fp32, as ``x_scale * x + residual`` does."""
    x, residual, _, _ = _inputs((2, 9, 24), torch.bfloat16)
    x_scale, weight = 0.5 + torch.rand(24), 1.0 + 0.5 * torch.randn(24)
    _check_against_float64(x, residual, None, None, x_scale=x_scale.to(torch.bfloat16))
    _check_against_float64(x, residual, weight, None, x_scale=x_scale)
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        assert ops.add_layer_norm(x, residual, weight, None, x_scale=x_scale).dtype == torch.float32


def test_parameter_gradients_are_deterministic_and_reduced_without_atomics():
    """dweight, dbias, dx_scale: per-program partial rows walked in a fixed order, then summed in a
    fixed order by one kernel; no atomic anywhere in the row-norm kernels, two runs bit-equal."""
    import inspect

    from d2v_kernels.kernels import _row_norm

    for kernel in (_row_norm.row_norm_fwd_kernel, _row_norm.row_norm_bwd_kernel, _row_norm.row_norm_param_grad_kernel):
        assert "atomic" not in inspect.getsource(kernel.fn)
    x, residual, weight, bias = _inputs((2, 100, 40), torch.float16)  # 7 tiles over 4 programs (interpreter)
    x_scale = torch.rand(40).to(torch.float16)
    grad_outs = [torch.randn(x.shape), torch.randn(x.shape)]
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        runs = [_run(ops.add_layer_norm, x, residual, weight, bias, grad_outs, True, x_scale) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_return_sum_is_the_sum_in_input_dtype():
    x, residual, weight, bias = _inputs((3, 48), torch.bfloat16)
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        _, total = ops.add_layer_norm(x, residual, weight, bias, return_sum=True)
    assert total.dtype == torch.bfloat16
    torch.testing.assert_close(total, x + residual, atol=0, rtol=0)


def test_strided_inputs_read_in_place():
    """Rows a stride apart, a residual that is a transposed view: read through strides."""
    x_big, _, weight, bias = _inputs((2, 9, 48), torch.float32)
    x = x_big[:, 2:7]
    residual_t = torch.randn(2, 48, 5).transpose(1, 2)  # (2, 5, 48) with channel stride 5
    assert not x.is_contiguous() and residual_t.stride(-1) != 1
    impl = next(i for i in dispatch.implementations("add_layer_norm") if i.backend == "triton")
    assert impl.check(x, residual_t, weight, bias, eps=1e-5, return_sum=True) == []
    _check_against_float64(x, residual_t, weight, bias, return_sum=True)


def test_unreadable_layout_is_a_dispatch_reason():
    x = torch.randn(2, 5, 4, 48)[:, :3, :2]  # rows (2, 3, 2): no two-stride split reads them
    residual = torch.randn_like(x)
    impl = next(i for i in dispatch.implementations("add_layer_norm") if i.backend == "triton")
    reasons = impl.check(x, residual, None, None, eps=1e-5, return_sum=False)
    assert len(reasons) == 1 and "x and residual" in reasons[0]
    with pytest.raises(d2v_kernels.BackendUnavailableError, match="cannot be read as"):
        with d2v_kernels.use_backend(add_layer_norm="triton"):
            ops.add_layer_norm(x, residual, None, None)
    with d2v_kernels.record_dispatch() as calls:
        out = ops.add_layer_norm(x, residual, None, None)
    assert calls == {("add_layer_norm", "eager"): 1}
    torch.testing.assert_close(out, ops.add_layer_norm_reference(x, residual, None, None))


def test_dispatch_reasons_for_dtypes():
    impl = next(i for i in dispatch.implementations("add_layer_norm") if i.backend == "triton")
    x64 = torch.randn(3, 8, dtype=torch.float64)
    assert any("float64" in r for r in impl.check(x64, x64, None, None, eps=1e-5, return_sum=False))
    x = torch.randn(3, 8)
    bf16_bias = torch.randn(8, dtype=torch.bfloat16)
    reasons = impl.check(x, x, None, bf16_bias, eps=1e-5, return_sum=False)
    assert any("bias has dtype bfloat16" in r for r in reasons)


def test_equals_data2vec_text_self_output():
    from transformers import Data2VecTextConfig
    from transformers.models.data2vec.modeling_data2vec_text import Data2VecTextSelfOutput

    config = Data2VecTextConfig(hidden_size=48, num_attention_heads=3, intermediate_size=96)
    module = Data2VecTextSelfOutput(config).eval()
    with torch.no_grad():
        module.LayerNorm.weight.normal_(1.0, 0.3)
        module.LayerNorm.bias.normal_(0.0, 0.3)
        hidden, input_tensor = torch.randn(2, 7, 48), torch.randn(2, 7, 48)
        expected = module(hidden, input_tensor)
        with d2v_kernels.use_backend(add_layer_norm="triton"):
            out = ops.add_layer_norm(
                module.dense(hidden), input_tensor, module.LayerNorm.weight, module.LayerNorm.bias,
                eps=module.LayerNorm.eps,
            )  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"residual": torch.randn(2, 7)}, ValueError, "residual must have x's shape"),
        ({"residual": torch.ones(2, 8, dtype=torch.long)}, TypeError, "residual must have dtype in"),
        ({"weight": torch.randn(9)}, ValueError, r"weight must have shape \(8,\)"),
        ({"eps": -1.0}, ValueError, "eps must be a positive float"),
        ({"return_sum": 1}, TypeError, "return_sum must be a bool"),
        ({"x": "x"}, TypeError, "x must be a torch.Tensor"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a float in \[0, 1\), got 1.0"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p must be a float in"),
        ({"dropout_p": True}, ValueError, "dropout_p must be a float in"),
        ({"dropout_p": "0.1"}, ValueError, "dropout_p must be a float in"),
    ],
    ids=[
        "residual-shape", "residual-dtype", "weight-shape", "eps", "return-sum", "not-tensor", "dropout-one",
        "dropout-negative", "dropout-bool", "dropout-str",
    ],
)  # fmt: skip
def test_bad_inputs(kwargs, error, message):
    args = {"x": torch.randn(2, 8), "residual": torch.randn(2, 8), "weight": torch.randn(8), "bias": None} | kwargs
    positional = [args.pop(k) for k in ("x", "residual", "weight", "bias")]
    with pytest.raises(error, match=message):
        ops.add_layer_norm(*positional, **args)


@pytest.mark.parametrize(
    ("return_sum", "dropout_p"), [(False, 0.0), (True, 0.0), (True, 0.25)], ids=["y", "y_and_sum_x_scale", "dropout"]
)
def test_opcheck(return_sum, dropout_p):
    x, residual, weight, bias = (t.requires_grad_() for t in _inputs((2, 3, 20), torch.float32))
    x_scale = (0.1 * torch.randn(20)).requires_grad_() if return_sum else None
    seed = torch.tensor([12345, 678], dtype=torch.int64) if dropout_p > 0.0 else None
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        torch.library.opcheck(
            torch.ops.d2v_kernels.add_layer_norm_fwd.default,
            (x, residual, weight, bias, x_scale, 1e-5, return_sum, seed, dropout_p),
        )
        detached = [None if t is None else t.detach() for t in (x, residual, weight, bias, x_scale)]
        _, _, mean, rstd = torch.ops.d2v_kernels.add_layer_norm_fwd(*detached, 1e-5, return_sum, seed, dropout_p)
        dsum = torch.randn_like(x) if return_sum else None
        bwd_args = (torch.randn_like(x), dsum, *detached, mean, rstd, seed, dropout_p)
        torch.library.opcheck(torch.ops.d2v_kernels.add_layer_norm_bwd.default, bwd_args)


def test_torch_compile_fullgraph_forward_and_backward():
    leaves = [t.requires_grad_() for t in _inputs((2, 5, 48), torch.float32)]
    compiled = torch.compile(ops.add_layer_norm, fullgraph=True)
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        y, total = compiled(*leaves, return_sum=True)
        grads = torch.autograd.grad([y, total], leaves, [torch.ones_like(y), torch.full_like(total, 0.5)])
    y_ref, total_ref = ops.add_layer_norm_reference(*leaves, return_sum=True)
    expected = torch.autograd.grad([y_ref, total_ref], leaves, [torch.ones_like(y), torch.full_like(total, 0.5)])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, total_ref)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_records_triton_dispatch():
    x, residual, weight, bias = _inputs((3, 48), torch.float16)
    with d2v_kernels.use_backend(add_layer_norm="triton"), d2v_kernels.record_dispatch() as calls:
        ops.add_layer_norm(x, residual, weight, bias)
    assert calls == {("add_layer_norm", "triton"): 1}


# --------------------------------------------------------------------------------------------
# Dropout of x in the kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_dropout_matches_float64(dtype):
    """LayerNorm(dropout(x) + residual): y and every gradient against float64 on the kernels' keep
    mask (x's gradient is the sum's times keep / (1 - p), from the mask the backward redraws)."""
    _check_against_float64(*_inputs((2, 7, 48), dtype), dropout_p=0.3)


def test_dropout_with_sum_x_scale_and_strided_inputs():
    """The sum x_scale * dropout(x) + residual returned, dx_scale reduced on the dropped x; and x a
    strided slice with a transposed residual: the mask depends on (row, channel), not on strides."""
    x, residual, weight, bias = _inputs((3, 5, 40), torch.float32)
    x_scale = 0.5 + torch.rand(40)
    _check_against_float64(x, residual, weight, bias, return_sum=True, x_scale=x_scale, dropout_p=0.2)
    x_big, _, weight, _ = _inputs((2, 9, 48), torch.float32)
    residual_t = torch.randn(2, 48, 5).transpose(1, 2)
    _check_against_float64(x_big[:, 2:7], residual_t, weight, None, return_sum=True, dropout_p=0.5)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_and_seed(dropout_p):
    """About 1 - p kept (4.5 standard deviations on 3737 elements, odd row length), per row too; the
    same seed gives the same mask, another seed another."""
    shape = (37, 101)
    seed = torch.tensor([2024, 7], dtype=torch.int64)
    keep = add_layer_norm_dropout_keep(seed, shape, dropout_p)
    assert keep.dtype == torch.bool and keep.shape == shape
    n = keep.numel()
    bound = 4.5 * (dropout_p * (1 - dropout_p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < bound
    row_bound = 4.5 * (dropout_p * (1 - dropout_p) / shape[1]) ** 0.5 + 1e-6
    assert (keep.float().mean(1) - (1 - dropout_p)).abs().max().item() < 2 * row_bound
    assert torch.equal(keep, add_layer_norm_dropout_keep(seed.clone(), shape, dropout_p))
    for other in ([2025, 7], [2024, 8]):
        assert not torch.equal(keep, add_layer_norm_dropout_keep(torch.tensor(other), shape, dropout_p))


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_dropout_repeats_under_manual_seed(grad):
    """ops.add_layer_norm draws its seed from torch's generator: torch.manual_seed repeats the
    output (inference launch and training launch), and the next call draws another mask."""
    x, residual, weight, bias = _inputs((3, 5, 24), torch.float16)
    x.requires_grad_(grad)
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        torch.manual_seed(11)
        first, second = (ops.add_layer_norm(x, residual, weight, bias, dropout_p=0.4) for _ in range(2))
        torch.manual_seed(11)
        again = ops.add_layer_norm(x, residual, weight, bias, dropout_p=0.4)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_dropout_records_triton_and_eager_runs_f_dropout():
    x, residual, weight, bias = _inputs((3, 48), torch.float32)
    with d2v_kernels.use_backend(add_layer_norm="triton"), d2v_kernels.record_dispatch() as calls:
        ops.add_layer_norm(x, residual, weight, bias, dropout_p=0.1)
    assert calls == {("add_layer_norm", "triton"): 1}
    # The eager path: F.dropout, then the add + LayerNorm (the same generator draw).
    torch.manual_seed(5)
    with d2v_kernels.use_backend(add_layer_norm="eager"), d2v_kernels.record_dispatch() as calls:
        out = ops.add_layer_norm(x, residual, weight, bias, dropout_p=0.1)
    assert calls == {("add_layer_norm", "eager"): 1}
    torch.manual_seed(5)
    expected = torch.nn.functional.layer_norm(torch.nn.functional.dropout(x, 0.1) + residual, (48,), weight, bias)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_dropout_launches_as_a_post_ln_layer_calls_them():
    """The kernel-level launch objects, made once per layout with ``dropout=True`` and called with a
    seed and p each time: dresidual is the sum's gradient apart from dx, dx = dresidual * keep / (1 - p)."""
    x, residual, weight, bias = _inputs((11, 40), torch.float32)
    seed, p = torch.tensor([3, 4], dtype=torch.int64), 0.25
    forward = add_layer_norm_training_launch(x, residual, weight, bias, False, dropout=True)
    y, total, mean, rstd = forward(x, weight, bias, 1e-5, residual, None, seed, p)
    keep = add_layer_norm_dropout_keep(seed, x.shape, p)
    expected = ops.add_layer_norm_reference(x * keep / (1 - p), residual, weight, bias)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert total is None
    dy = torch.randn_like(x)
    backward = add_layer_norm_backward_launch(dy, x, residual, weight, bias, dropout=True)
    dx, dweight, dbias, dx_scale, dresidual = backward(
        dy, x, weight, bias, mean, rstd, residual, None, None, None, seed, p
    )
    assert dx_scale is None and dresidual is not dx
    leaves = [t.detach().requires_grad_() for t in (x, residual, weight, bias)]
    y_ref = ops.add_layer_norm_reference(leaves[0] * keep / (1 - p), *leaves[1:])
    for got, want in zip((dx, dresidual, dweight, dbias), torch.autograd.grad(y_ref, leaves, dy)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The same launches serve the next call's seed (the plan is per layout, the seed per call).
    other = torch.tensor([5, 6], dtype=torch.int64)
    y2, _, _, _ = forward(x, weight, bias, 1e-5, residual, None, other, p)
    keep2 = add_layer_norm_dropout_keep(other, x.shape, p)
    torch.testing.assert_close(y2, ops.add_layer_norm_reference(x * keep2 / (1 - p), residual, weight, bias))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(8, 499, 768), (4, 197, 1024), (3, 50, 500)], ids=["audio", "vision-large", "odd"])
@pytest.mark.parametrize("return_sum", [False, True], ids=["y", "y_and_sum"])
def test_cuda_matches_float64(shape, dtype, return_sum):
    _check_against_float64(*(t.cuda() for t in _inputs(shape, dtype)), return_sum=return_sum)


@pytest.mark.cuda
def test_cuda_parameter_gradients_are_deterministic():
    x, residual, weight, bias = (t.cuda() for t in _inputs((8, 499, 768), torch.bfloat16))
    grad_outs = [torch.randn(x.shape, device="cuda")]
    runs = [_run(ops.add_layer_norm, x, residual, weight, bias, grad_outs, False) for _ in range(3)]
    for run in runs[1:]:
        assert torch.equal(run[3], runs[0][3]) and torch.equal(run[4], runs[0][4])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dtype_id)
def test_cuda_dropout_matches_float64(dtype):
    x, residual, weight, bias = (t.cuda() for t in _inputs((8, 128, 768), dtype))
    _check_against_float64(x, residual, weight, bias, dropout_p=0.1)
    keep = add_layer_norm_dropout_keep(torch.tensor([1, 2], device="cuda"), (8, 128, 768), 0.1)
    assert abs(keep.float().mean().item() - 0.9) < 0.005


# --------------------------------------------------------------------------------------------
# dx's column sums reduced in the backward (``sum_dx``: a dense layer's bias gradient)
# --------------------------------------------------------------------------------------------


def _sum_dx_launches(x, residual, weight, bias, x_scale, dropout_p, return_sum, grad_outs):
    """The kernels' backward with ``sum_dx`` (its six outputs) and without (five), on the training
    forward's statistics, for upstream gradients ``grad_outs`` (dy, and the sum's with ``return_sum``)."""
    from d2v_kernels.kernels import _row_norm
    from d2v_kernels.kernels.add_layer_norm import add_layer_norm_forward

    seed = torch.tensor([31, 7], dtype=torch.int64, device=x.device) if dropout_p > 0.0 else None
    _, _, mean, rstd = add_layer_norm_forward(x, residual, weight, bias, 1e-5, return_sum, x_scale, seed, dropout_p)
    dy, dsum = grad_outs[0].to(x.dtype), grad_outs[1].to(x.dtype) if return_sum else None
    runs = []
    for sum_dx in (True, False):
        launch = _row_norm.backward_launch(
            dy, x, -1, weight, bias, None, residual, dsum, None, x_scale, dropout_p > 0.0, sum_dx=sum_dx
        )
        runs.append(launch(dy, x, weight, bias, mean, rstd, residual, dsum, None, x_scale, seed, dropout_p))
    return seed, *runs


def _check_sum_dx_against_float64(x, residual, weight, bias, x_scale=None, dropout_p=0.0, return_sum=False):
    """dx's column sums from the kernel against float64 (dx's gradient summed over the rows),
    within twice eager PyTorch's error (``dx.sum(0)`` in x's dtype); the other outputs bit-equal to
    those of the launch without the sums."""
    grad_outs = [torch.randn(x.shape, device=x.device) for _ in range(2 if return_sum else 1)]
    seed, summed, plain = _sum_dx_launches(x, residual, weight, bias, x_scale, dropout_p, return_sum, grad_outs)
    assert len(summed) == 6 and len(plain) == 5
    for name, got, want in zip(("dx", "dweight", "dbias", "dx_scale", "dresidual"), summed, plain):
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want)), name
    reference = ops.add_layer_norm_reference
    if dropout_p > 0.0:
        reference = _dropped_out(add_layer_norm_dropout_keep(seed, x.shape, dropout_p), dropout_p)
    as64 = [t.double() if t is not None else None for t in (x, residual, weight, bias, x_scale)]
    outputs = len(grad_outs)
    dx64 = _run(reference, *as64[:4], [g.double() for g in grad_outs], return_sum, as64[4])[outputs]
    dx_eager = _run(reference, x, residual, weight, bias, grad_outs, return_sum, x_scale)[outputs]
    rows = (-1, x.shape[-1])
    dx_sum = summed[5]
    assert dx_sum.dtype == x.dtype and dx_sum.shape == (x.shape[-1],)
    assert_close_to_reference(dx_sum, dx64.reshape(rows).sum(0), dx_eager.reshape(rows).sum(0), name="dx_sum")


# 5 x 61 = 305 rows of 37 channels: 10 tiles of 32 rows over the interpreter's 4 programs, a
# partial last tile, and channels masked off in each 64-wide row.
SUM_DX_SHAPE = (5, 61, 37)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", ["post-ln", "post-ln-dropout", "vision-x-scale"])
def test_sum_dx_matches_float64(case, dtype):
    """The layers' uses: a post-LN layer's LayerNorm(dropout(x) + residual), with p > 0 and 0; the
    vision layer's LayerNorm(x_scale * x + residual), the sum returned and its gradient added in."""
    x, residual, weight, bias = _inputs(SUM_DX_SHAPE, dtype)
    if case == "vision-x-scale":
        x_scale = (0.1 + 0.05 * torch.randn(SUM_DX_SHAPE[-1])).to(dtype)
        _check_sum_dx_against_float64(x, residual, weight, bias, x_scale=x_scale, return_sum=True)
    else:
        _check_sum_dx_against_float64(x, residual, weight, bias, dropout_p=0.3 if case.endswith("dropout") else 0.0)


def _row_scaled_launches(x, residual, weight, bias, x_scale, row_scale, dropout_p, grad_outs):
    """The kernels' training forward (y, sum) and backward with ``sum_dx`` (dx, dresidual,
    dweight, dbias, dx_scale, dx's column sums) with ``row_scale``; the seed of their dropout."""
    from d2v_kernels.kernels import _row_norm
    from d2v_kernels.kernels.add_layer_norm import add_layer_norm_forward

    seed = torch.tensor([5, 9], dtype=torch.int64, device=x.device) if dropout_p > 0.0 else None
    y, total, mean, rstd = add_layer_norm_forward(
        x, residual, weight, bias, 1e-5, True, x_scale, seed, dropout_p, row_scale=row_scale
    )
    dy, dsum = (g.to(x.dtype) for g in grad_outs)
    launch = _row_norm.backward_launch(
        dy, x, -1, weight, bias, None, residual, dsum, None, x_scale, dropout_p > 0.0, sum_dx=True,
        row_scale=row_scale,
    )  # fmt: skip
    dx, dweight, dbias, dx_scale, dres, dx_sum = launch(
        dy, x, weight, bias, mean, rstd, residual, dsum, None, x_scale, seed, dropout_p, row_scale
    )
    assert dres is not dx  # x's gradient is scaled: the residual's is written apart
    return seed, [y, total, dx, dres, dweight, dbias, dx_scale, dx_sum]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", ["vision-drop-path", "row-scale-and-dropout"])
def test_row_scale_matches_float64(case, dtype):
    """LayerNorm(x_scale * row_scale * dropout(x) + residual), the sum returned and its gradient
    added in: drop path's per-sample factor (B, 1, 1) of a (B, N, C) input as the row scale, one
    sample dropped (0) and the others scaled by 1 / keep; with vision's x_scale, or alone with the
    kernels' dropout and no affine. Outputs, every gradient and dx's column sums against float64
    within twice eager PyTorch's error; row tiles straddle the samples."""
    x, residual, weight, bias = _inputs(SUM_DX_SHAPE, dtype, affine=case == "vision-drop-path")
    b, _, c = SUM_DX_SHAPE
    row_scale = torch.tensor([1.0 / 0.7, 0.0, 1.0 / 0.7, 1.0 / 0.7, 0.0]).view(b, 1, 1).to(dtype)
    x_scale = (0.1 + 0.05 * torch.randn(c)).to(dtype) if case == "vision-drop-path" else None
    dropout_p = 0.0 if case == "vision-drop-path" else 0.3
    got = _check_row_scale_against_float64(x, residual, weight, bias, x_scale, row_scale, dropout_p)
    assert torch.all(got[2][1] == 0) and torch.all(got[2][4] == 0)  # the dropped samples' dx


def _check_row_scale_against_float64(x, residual, weight, bias, x_scale, row_scale, dropout_p):
    """The kernels' outputs (:func:`_row_scaled_launches`) against float64, within twice eager
    PyTorch's error; returns them."""
    c = x.shape[-1]
    grad_outs = [torch.randn(x.shape, device=x.device) for _ in range(2)]
    seed, got = _row_scaled_launches(x, residual, weight, bias, x_scale, row_scale, dropout_p, grad_outs)
    keep = add_layer_norm_dropout_keep(seed, x.shape, dropout_p) if seed is not None else None

    def reference(x, residual, weight, bias, **kwargs):
        scaled = x * row_scale.to(x.dtype)
        if keep is not None:
            scaled = scaled * keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))
        return ops.add_layer_norm_reference(scaled, residual, weight, bias, **kwargs)

    as64 = [t.double() if t is not None else None for t in (x, residual, weight, bias, x_scale)]
    ref64 = _run(reference, *as64[:4], [g.double() for g in grad_outs], True, as64[4])
    eager = _run(reference, x, residual, weight, bias, grad_outs, True, x_scale)
    rows = (-1, c)
    ref64.append(ref64[2].reshape(rows).sum(0))
    eager.append(eager[2].reshape(rows).sum(0))
    names = ["y", "sum", "dx", "dresidual", "dweight", "dbias", "dx_scale", "dx_sum"]
    for name, o, r, e in zip(names, got, ref64, eager, strict=True):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == e.dtype and o.shape == e.shape, name
        assert_close_to_reference(o, r, e, name=name)
    return got


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_cuda_row_scale_matches_float64(dtype):
    """Vision's drop-path configuration at the base model's width (x_scale, the sum, dx's column
    sums, a (B, 1, 1) row scale with dropped samples) against float64 on the GPU, its backward's
    grid two resident programs an SM."""
    from d2v_kernels.kernels import _row_norm

    x, residual, weight, bias = (t.cuda() for t in _inputs((8, 197, 768), dtype))
    x_scale = (0.1 + 0.05 * torch.randn(768, device="cuda")).to(dtype)
    keep = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], device="cuda") / 0.9
    row_scale = keep.view(8, 1, 1).to(dtype)
    _check_row_scale_against_float64(x, residual, weight, bias, x_scale, row_scale, 0.0)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    dy = torch.randn_like(x)
    launch = _row_norm.backward_launch(
        dy, x, -1, weight, bias, None, residual, dy, None, x_scale, sum_dx=True, row_scale=row_scale
    )
    assert launch.n_programs == min(8 * 197, _row_norm.BWD_PROGRAMS_PER_SM * sms)


def test_row_scale_must_divide_the_rows():
    from d2v_kernels.kernels import _row_norm
    from d2v_kernels.kernels.add_layer_norm import add_layer_norm_forward

    x, residual, weight, bias = _inputs((3, 5, 8), torch.float32)
    for row_scale in (torch.ones(2), torch.ones(6, 2)[:, 0], torch.ones(0)):
        with pytest.raises(ValueError, match="row_scale"):
            add_layer_norm_forward(x, residual, weight, bias, 1e-5, False, row_scale=row_scale)
    with pytest.raises(ValueError, match="row_scale takes inputs of at most"):  # rows indexed in int32
        _row_norm.rows_per_scale(2**31, torch.ones(2))


def test_sum_dx_alone_and_with_every_option():
    """Without affine (the sums alone make the reduction launch), and with x_scale, dropout and the
    sum's gradient at once; a single row."""
    x, residual, _, _ = _inputs((2, 9, 24), torch.float32)
    _check_sum_dx_against_float64(x, residual, None, None)
    x, residual, weight, bias = _inputs((3, 7, 40), torch.bfloat16)
    x_scale = (0.5 + torch.rand(40)).to(torch.bfloat16)
    _check_sum_dx_against_float64(x, residual, weight, bias, x_scale=x_scale, dropout_p=0.2, return_sum=True)
    _check_sum_dx_against_float64(*_inputs((1, 1, 24), torch.float16))


def test_sum_dx_is_deterministic():
    """dx's column sums reduced like dweight: per-program partial rows in a fixed order, then one
    fixed-order sum (no atomics: see the test above); two runs bit-equal."""
    x, residual, weight, bias = _inputs(SUM_DX_SHAPE, torch.float16)
    x_scale = torch.rand(SUM_DX_SHAPE[-1]).to(torch.float16)
    grad_outs = [torch.randn(x.shape), torch.randn(x.shape)]
    for args in ((None, 0.3, False), (x_scale, 0.0, True)):
        first, second = (_sum_dx_launches(x, residual, weight, bias, *args, grad_outs)[1] for _ in range(2))
        for a, b in zip(first, second):
            assert (a is None and b is None) or torch.equal(a, b)


def test_sum_dx_launch_as_a_post_ln_layer_calls_it():
    """``add_layer_norm_backward_launch(..., sum_dx=True)``: a sixth output, dx's column sums in
    x's dtype, from the same kernels as dweight and dbias (their launches, no torch reduction)."""
    x, residual, weight, bias = _inputs((11, 40), torch.float32)
    seed, p = torch.tensor([3, 4], dtype=torch.int64), 0.25
    forward = add_layer_norm_training_launch(x, residual, weight, bias, False, dropout=True)
    _, _, mean, rstd = forward(x, weight, bias, 1e-5, residual, None, seed, p)
    dy = torch.randn_like(x)
    backward = add_layer_norm_backward_launch(dy, x, residual, weight, bias, dropout=True, sum_dx=True)
    assert backward is not add_layer_norm_backward_launch(dy, x, residual, weight, bias, dropout=True)
    with torch.profiler.profile() as profile:
        dx, _, _, _, _, dx_sum = backward(dy, x, weight, bias, mean, rstd, residual, None, None, None, seed, p)
    assert not [e.name for e in profile.events() if e.name.startswith("aten::sum")]
    torch.testing.assert_close(dx_sum, dx.sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_cuda_sum_dx_matches_float64_and_is_deterministic(dtype):
    """The layers' configurations at a base model's width (one compiled program for 768 and 1024
    channels): text's with dropout, vision's with x_scale and the sum; three runs bit-equal."""
    x, residual, weight, bias = (t.cuda() for t in _inputs((8, 197, 768), dtype))
    x_scale = (0.1 + 0.05 * torch.randn(768, device="cuda")).to(dtype)
    _check_sum_dx_against_float64(x, residual, weight, bias, dropout_p=0.1)
    _check_sum_dx_against_float64(x, residual, weight, bias, x_scale=x_scale, return_sum=True)
    grad_outs = [torch.randn(x.shape, device="cuda"), torch.randn(x.shape, device="cuda")]
    runs = [_sum_dx_launches(x, residual, weight, bias, x_scale, 0.1, True, grad_outs)[1] for _ in range(3)]
    for run in runs[1:]:
        assert all(a is None or torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.cuda
def test_cuda_backward_grid_holds_only_resident_programs():
    """Each backward's persistent grid is what the SMs hold at once of its compiled kernel, two
    programs an SM at the layers' tiles (vision's x_scale variant included: its narrower tile), and
    the gradients match float64 with that grid."""
    from d2v_kernels.kernels import _row_norm
    from d2v_kernels.kernels._launch import resident_programs
    from d2v_kernels.kernels.add_layer_norm import add_layer_norm_forward

    x, residual, weight, bias = (t.cuda() for t in _inputs((8, 197, 768), torch.bfloat16))
    x_scale = (0.1 + 0.05 * torch.randn(768, device="cuda")).to(x.dtype)
    _check_sum_dx_against_float64(x, residual, weight, bias, x_scale=x_scale, return_sum=True)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    dy = torch.randn_like(x)
    for scale, dsum in ((x_scale, dy), (None, None)):
        _, _, mean, rstd = add_layer_norm_forward(x, residual, weight, bias, 1e-5, dsum is not None, scale)
        launch = _row_norm.backward_launch(dy, x, -1, weight, bias, None, residual, dsum, None, scale, sum_dx=True)
        launch(dy, x, weight, bias, mean, rstd, residual, dsum, None, scale)
        compiled = launch._launch._compiled
        resident = resident_programs(compiled, compiled.metadata.num_warps, x.device)
        assert resident is not None and resident >= 1
        rows_a_tile = _row_norm.backward_tile_config(768, False, scale is not None)[0]
        assert resident >= _row_norm.BWD_PROGRAMS_PER_SM  # the tiles' register budget (the AOT check's)
        assert launch.n_programs == min(8 * 197 // rows_a_tile, _row_norm.BWD_PROGRAMS_PER_SM * sms)
