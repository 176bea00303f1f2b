"""ops.attention's sdpa backend (torch's scaled_dot_product_attention) against float64 runs of the
eager reference for every bias kind, fully masked rows, the table's gradient through the gathered
bias (on the CPU, and on a GPU where sdpa picks its fused kernels) and its inference cache; and the measured rule (ATTENTION_RULE): which backend each class of
CUDA input gets, without a warning, while CPU inputs keep the eager reference."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import d2v_kernels
from d2v_kernels import dispatch, ops
from d2v_kernels.ops import attention_op
from d2v_kernels.testing import assert_close_to_reference

HEADS = 2


def make_case(kinds, b=3, n_q=11, n_k=13, d=16, dtype=torch.float32):
    """q, k, v (strided views) and the op's keyword arguments for a "+"-joined set of bias kinds;
    a padding mask has a full row, a partial one and an empty one (when b >= 3)."""
    q = torch.randn(b, n_q, HEADS * d, dtype=dtype).view(b, n_q, HEADS, d)
    k = torch.randn(b, HEADS, n_k, d, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, n_k, 2, HEADS, d, dtype=dtype)[:, :, 1]
    kwargs = {}
    if "padding" in kinds:
        mask = torch.zeros(b, n_k, dtype=torch.int64)
        for row, length in enumerate([n_k, n_k - 6, 0][:b]):
            mask[row, :length] = 1
        kwargs["key_padding_mask"] = mask
    if "table" in kinds:
        n_rel = 2 * n_k + 3
        kwargs["bias_table"] = torch.randn(n_rel, HEADS, dtype=dtype)
        kwargs["bias_index"] = torch.randint(0, n_rel, (n_q, n_k), dtype=torch.int32)
    if "dense" in kinds:
        kwargs["bias"] = torch.randn(1, HEADS, n_q, n_k, dtype=dtype)
    if "causal" in kinds:
        kwargs["causal"] = True
    return q, k, v, kwargs


def to64(kwargs):
    return {n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t for n, t in kwargs.items()}


def run_sdpa(q, k, v, **kwargs):
    with d2v_kernels.use_backend(attention="sdpa"), d2v_kernels.record_dispatch() as calls:
        out = ops.attention(q, k, v, **kwargs)
    assert calls == {("attention", "sdpa"): 1}
    return out


CASES = ["none", "padding", "table", "dense", "table+padding", "padding+causal", "dense+padding+causal"]


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kinds", CASES)
def test_sdpa_matches_float64_reference(kinds, dtype):
    q, k, v, kwargs = make_case(kinds, dtype=dtype)
    out = run_sdpa(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype
    ref = ops.attention_reference(q.double(), k.double(), v.double(), **to64(kwargs))
    assert_close_to_reference(out, ref, ops.attention_reference(q, k, v, **kwargs))


@pytest.mark.usefixtures("on_device")
def test_sdpa_rows_with_no_key_are_the_mean_of_v():
    """A fully padded batch row, and rows that causality leaves without a key (Nq > Nk, bottom-right
    aligned), give the mean of v over all keys as the other backends do; their gradients are finite."""
    q, k, v, kwargs = make_case("padding+table", n_q=7, n_k=7)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = run_sdpa(*leaves, **kwargs)
    mean_v = v.mean(1)  # (B, H, d)
    torch.testing.assert_close(out[2], mean_v[2].expand(7, HEADS, 16), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    q, k, v, _ = make_case("none", b=1, n_q=9, n_k=4)
    out = run_sdpa(q, k, v, causal=True)
    torch.testing.assert_close(out[0, :5], v.mean(1)[0].expand(5, HEADS, 16), rtol=1e-5, atol=1e-6)
    ref = ops.attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert_close_to_reference(out, ref, ops.attention_reference(q, k, v, causal=True))


@pytest.mark.usefixtures("on_device")
def test_sdpa_additive_minus_inf_row_is_finite():
    q, k, v, _ = make_case("none", b=1)
    bias = torch.zeros(1, 1, 11, 13)
    bias[..., 4, :] = float("-inf")
    assert torch.isfinite(run_sdpa(q, k, v, bias=bias)).all()


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_gradients_reach_the_table(dtype):
    q, k, v, kwargs = make_case("table+padding", dtype=dtype)
    grad_out = torch.randn(q.shape, dtype=torch.float64)

    def grads(fn, q, k, v, table):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
        out = fn(*leaves[:3], **{**kwargs, "bias_table": leaves[3]})
        out.backward(grad_out.to(out.dtype))
        return [t.grad for t in leaves]

    table = kwargs.pop("bias_table")
    got = grads(run_sdpa, q, k, v, table)
    want = grads(ops.attention_reference, q.double(), k.double(), v.double(), table.double())
    eager = grads(ops.attention_reference, q, k, v, table)
    for name, g, g64, ge in zip(("dq", "dk", "dv", "dtable"), got, want, eager):
        assert g.dtype == ge.dtype and g.shape == ge.shape, name
        assert_close_to_reference(g, g64, ge, name=name)


def test_gathered_bias_is_kept_in_inference_and_follows_the_table():
    *_, kwargs = make_case("table", b=1)
    table, index = kwargs["bias_table"], kwargs["bias_index"]
    with torch.no_grad():
        first = attention_op.gathered_bias(table, index, torch.float32)
        assert attention_op.gathered_bias(table, index, torch.float32) is first
        assert first.shape == (1, HEADS, 11, 13) and first.stride() == (HEADS * 11 * 16, 11 * 16, 16, 1)
        table.mul_(2.0)  # an optimizer step: a new version
        second = attention_op.gathered_bias(table, index, torch.float32)
        assert second is not first
        torch.testing.assert_close(second, 2.0 * first)
        assert attention_op.gathered_bias(table, index, torch.bfloat16).dtype == torch.bfloat16
    trained = table.detach().clone().requires_grad_()
    assert attention_op.gathered_bias(trained, index, torch.float32).requires_grad  # no cache: autograd


def test_cpu_default_stays_eager_without_warning():
    q, k, v, kwargs = make_case("padding", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with d2v_kernels.record_dispatch() as calls:
            ops.attention(q, k, v, **kwargs)
    assert calls == {("attention", "eager"): 1}


# --------------------------------------------------------------------------------------------
# The measured rule, on fake CUDA tensors (no GPU needed: dispatch reads layouts only)
# --------------------------------------------------------------------------------------------


def fake_cuda_case(kinds, dtype=torch.float16, grad=False, dropout_p=0.0):
    """(q, k, v, kwargs) as fake CUDA tensors with the vision/text shapes' layout."""
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 197, 12, 64, device="cuda", dtype=dtype) for _ in range(3))
        kwargs = {"dropout_p": dropout_p}
        if "padding" in kinds:
            kwargs["key_padding_mask"] = torch.ones(2, 197, device="cuda", dtype=torch.int64)
        if "table" in kinds:
            kwargs["bias_table"] = torch.empty(732, 12, device="cuda", dtype=dtype)
            kwargs["bias_index"] = torch.zeros(197, 197, device="cuda", dtype=torch.int32)
        if "dense" in kinds:
            kwargs["bias"] = torch.empty(1, 12, 197, 197, device="cuda", dtype=dtype)
        if "causal" in kinds:
            kwargs["causal"] = True
    if grad:
        q.requires_grad_()
    return q, k, v, kwargs


RULE_CASES = [
    # (kinds, dtype, grad, dropout_p) -> backend
    (("padding", torch.float16, False, 0.0), "sdpa"),
    (("padding", torch.bfloat16, True, 0.0), "sdpa"),
    (("padding", torch.bfloat16, False, 0.1), "sdpa"),  # dropout: the training class
    (("table", torch.bfloat16, False, 0.0), "sdpa"),
    (("table", torch.float16, True, 0.0), "eager"),
    (("none", torch.float16, False, 0.0), "sdpa"),
    (("none", torch.bfloat16, True, 0.0), "sdpa"),
    (("dense", torch.float16, True, 0.0), "triton"),  # unmeasured
    (("padding", torch.float32, False, 0.0), "triton"),  # fp32: unmeasured
    (("padding+causal", torch.float16, False, 0.0), "triton"),  # causal: unmeasured
    (("table+padding", torch.float16, False, 0.0), "triton"),  # two kinds: unmeasured
]


@pytest.mark.parametrize(
    ("case", "backend"), RULE_CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else c
)
def test_rule_picks_the_measured_backend_on_cuda_without_warning(case, backend):
    kinds, dtype, grad, dropout_p = case
    q, k, v, kwargs = fake_cuda_case(kinds, dtype, grad, dropout_p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("attention", q.device, q, k, v, **kwargs).backend == backend
    row = attention_op.ATTENTION_RULE.get(attention_op.input_class(q, k, v, **kwargs))
    assert backend == "triton" or (row is not None and row[0][0] == backend and "bench/results/" in row[1])


def test_rule_rows_cite_evidence_and_cpu_inputs_get_no_preference():
    for key, (backends, evidence) in attention_op.ATTENTION_RULE.items():
        assert evidence.strip(), key
        assert set(backends) <= {"sdpa", "eager", "triton"}, key
        assert not backends or "bench/results/" in evidence, key
    q, k, v, kwargs = make_case("padding", dtype=torch.float16)
    assert attention_op.input_class(q, k, v, **kwargs) == ("key_padding", "inference", "half")
    assert attention_op.preferred_backends(q, k, v, **kwargs) == ()
    assert dispatch.rule("attention").prefer is attention_op.preferred_backends


def test_rule_rows_from_a_bench_result_file():
    """bench.attention_rule turns bench.attention rows into ATTENTION_RULE rows: per class the least
    total time over its cases wins; Triton's rows prefer nothing; a missing backend is unmeasured."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.attention_rule import rule_rows

    def rows(case, bias, dtype, mode, **ms):
        return [dict(case=case, bias=bias, dtype=dtype, mode=mode, impl=impl, ms=t) for impl, t in ms.items()]

    result = {
        "environment": {"gpu": "GPU"},
        "rows": rows("text_base", "padding", "fp16", "fwd", d2v_triton=0.2, d2v_sdpa=0.1, eager=1.0)
        + rows("audio_base", "padding", "bf16", "fwd", d2v_triton=0.1, d2v_sdpa=0.15, eager=1.0)
        + rows("vision_base", "table", "fp16", "fwd", d2v_triton=0.1, d2v_sdpa=0.2, eager=1.0, sdpa_nobias=0.01)
        + rows("vision_base", "table", "fp16", "fwd+bwd", d2v_triton=2.0, d2v_sdpa=3.0, eager=1.0)
        + rows("audio_base_nomask", "none", "fp16", "fwd", d2v_triton=0.2, eager=1.0),
    }
    got = rule_rows(result)
    assert got[("key_padding", "inference", "half")][0] == ("sdpa",)  # 0.25 against 0.3
    assert "text_base fp16 triton 0.200, sdpa 0.100, eager 1.000" in got[("key_padding", "inference", "half")][1]
    assert got[("table", "inference", "half")][0] == ()
    assert got[("table", "training", "half")][0] == ("eager",)
    assert got[("none", "inference", "half")] == ((), "unmeasured: a backend is missing in 1 case(s)")


def test_padding_mask_made_once_for_the_layers_of_a_forward_and_never_stale():
    """The layers slice the same padding mask: the first makes sdpa's mask, the others reuse it; a
    mask changed in place, or a new mask (even in the same memory), is made anew."""
    from d2v_kernels.ops.attention_op import padding_mask_for_sdpa

    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False  # no key left
    first = padding_mask_for_sdpa(mask[:, -9:])
    assert padding_mask_for_sdpa(mask[:, -9:]) is first  # another layer's view of the same mask
    allowed, rows_kept = first
    assert rows_kept.flatten().tolist() == [True, True, False] and allowed[2].all()
    assert torch.equal(allowed[1].flatten(), mask[1])
    mask[0, 3] = False  # changed in place
    again = padding_mask_for_sdpa(mask[:, -9:])
    assert again is not first and not again[0][0, 0, 0, 3]
    other = mask.clone()
    other[1] = True
    assert padding_mask_for_sdpa(other)[0][1].all()
