"""ops.attention through the Triton kernels (interpreter on CPU tensors): forward and gradients
against float64 runs of the eager reference, in-kernel relative position bias, dense bias, padding
and causal masks, fully masked rows, dropout replay, deterministic table gradients, opcheck,
torch.compile, bad input and dispatch reasons."""

import contextlib

import pytest
import torch

import d2v_kernels
from d2v_kernels import ops
from d2v_kernels.dispatch import BackendUnavailableError
from d2v_kernels.testing import assert_close_to_reference

# transformers' padding mask holds float32's minimum; the kernels scale scores by log2(e) for exp2,
# so a masked score overflows to -inf, as IEEE arithmetic on the GPU gives it without a word and
# the kernels expect (fully masked rows are handled). The interpreter's numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = 3


def make_qkv(b, n_q, n_k, d, dtype=torch.float32, heads=HEADS):
    """q, k, v as the model hands them over: strided views, none contiguous."""
    q = torch.randn(b, n_q, heads * d, dtype=dtype).view(b, n_q, heads, d)  # from a (B, N, H*d) projection
    k = torch.randn(b, heads, n_k, d, dtype=dtype).transpose(1, 2)  # from (B, H, N, d)
    v = torch.randn(b, n_k, 2, heads, d, dtype=dtype)[:, :, 1]  # a slice of a fused projection
    return q, k, v


def relative_bias(n_q, n_k, dtype=torch.float32, heads=HEADS):
    n_rel = 2 * n_k + 3
    table = torch.randn(n_rel, heads, dtype=dtype)
    index = torch.randint(0, n_rel, (n_q, n_k))
    return table, index


def padding_mask(b, n_k, lengths):
    mask = torch.zeros(b, n_k, dtype=torch.int64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return mask


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def run_triton(q, k, v, **kwargs):
    with d2v_kernels.use_backend(attention="triton"), d2v_kernels.record_dispatch() as calls:
        out = ops.attention(q, k, v, **kwargs)
    assert calls == {("attention", "triton"): 1}
    return out


def to64(kwargs):
    return {n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t for n, t in kwargs.items()}


def reference64(q, k, v, **kwargs):
    return ops.attention_reference(q.double(), k.double(), v.double(), **to64(kwargs))


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _case(name, b, n_q, n_k, d, dtype):
    """(q, k, v, kwargs) of a named case; every tensor built in ``dtype``."""
    q, k, v = make_qkv(b, n_q, n_k, d, dtype)
    kwargs = {}
    if "table" in name:
        kwargs["bias_table"], kwargs["bias_index"] = relative_bias(n_q, n_k, dtype)
    if "mask" in name:  # a different length per row, and one row of the batch fully padded
        kwargs["key_padding_mask"] = padding_mask(b, n_k, [n_k - 7, 0, 3][:b])
    if "causal" in name:
        kwargs["causal"] = True
    if "dense" in name:
        kwargs["bias"] = torch.randn(1, HEADS, n_q, n_k, dtype=dtype)
    if "hfmask" in name:  # transformers' 4-D additive mask, partially masked rows
        keep = padding_mask(b, n_k, [n_k - 5, 4][:b]).bool()
        kwargs["bias"] = torch.zeros(b, 1, 1, n_k, dtype=dtype).masked_fill(
            ~keep[:, None, None], torch.finfo(dtype).min
        )
    return q, k, v, kwargs


FORWARD_CASES = [
    ("plain", 2, 1, 1, 16),
    ("table", 2, 50, 50, 32),
    ("mask", 2, 50, 50, 64),
    ("causal", 1, 20, 50, 32),
    ("dense", 1, 50, 20, 16),
    ("hfmask", 2, 9, 50, 32),
    ("table_mask_causal", 2, 50, 41, 48),  # d=48: BLOCK_D 64 with the tail masked
]


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "b", "n_q", "n_k", "d"), FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_matches_float64_reference(name, b, n_q, n_k, d, dtype):
    q, k, v, kwargs = _case(name, b, n_q, n_k, d, dtype)
    out = run_triton(q, k, v, **kwargs)
    assert out.dtype == dtype and out.shape == (b, n_q, HEADS, d)
    eager = ops.attention_reference(q, k, v, **kwargs)
    assert_close_to_reference(out, reference64(q, k, v, **kwargs), eager)


@pytest.mark.usefixtures("on_device")
def test_forward_vision_base_shape_fp16():
    """N = 197 (14x14 patches + CLS), d = 64, the relative position index BEiT builds."""
    from transformers import Data2VecVisionConfig
    from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionRelativePositionBias

    config = Data2VecVisionConfig(num_attention_heads=HEADS, image_size=56, patch_size=4)
    module = Data2VecVisionRelativePositionBias(config, window_size=(14, 14))
    index = module.generate_relative_position_index((14, 14))
    table = torch.randn_like(module.relative_position_bias_table).half()
    q, k, v = make_qkv(1, 197, 197, 64, torch.float16)
    kwargs = dict(bias_table=table, bias_index=index)
    out = run_triton(q, k, v, **kwargs)
    assert_close_to_reference(out, reference64(q, k, v, **kwargs), ops.attention_reference(q, k, v, **kwargs))


@pytest.mark.usefixtures("on_device")
def test_fully_masked_rows_are_uniform_over_all_keys():
    """A padded-out batch row, and rows that causality and padding together leave without a key
    (visited through the skipped key blocks), give the mean of v over every key, as eager does."""
    b, n, d = 2, 90, 16
    q, k, v = make_qkv(b, n, n, d)
    mask = padding_mask(b, n, [n, 0])
    mask[0, :70] = 0  # batch 0: rows 0..69 see only padded keys under causality
    out = run_triton(q, k, v, key_padding_mask=mask, causal=True)
    mean_v = v.double().mean(dim=1, keepdim=True)  # (B, 1, H, d)
    torch.testing.assert_close(out[1].double(), mean_v[1].expand(n, HEADS, d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0, :70].double(), mean_v[0].expand(70, HEADS, d), rtol=1e-5, atol=1e-6)
    ref = reference64(q, k, v, key_padding_mask=mask, causal=True)
    assert_close_to_reference(out, ref, ops.attention_reference(q, k, v, key_padding_mask=mask, causal=True))


@pytest.mark.usefixtures("on_device")
def test_causal_with_more_queries_than_keys():
    """Bottom-right alignment: the first Nq - Nk queries see no key and become uniform."""
    q, k, v = make_qkv(1, 70, 20, 16)
    out = run_triton(q, k, v, causal=True)
    ref = reference64(q, k, v, causal=True)
    assert_close_to_reference(out, ref, ops.attention_reference(q, k, v, causal=True))


@pytest.mark.usefixtures("on_device")
def test_fp32_table_with_half_inputs_and_explicit_scale():
    q, k, v = make_qkv(1, 30, 30, 32, torch.float16)
    table, index = relative_bias(30, 30, torch.float32)
    kwargs = dict(
        bias_table=table, bias_index=index.int(), scale=0.3, key_padding_mask=padding_mask(1, 30, [25]).bool()
    )
    out = run_triton(q, k, v, **kwargs)
    assert_close_to_reference(out, reference64(q, k, v, **kwargs), ops.attention_reference(q, k, v, **kwargs))


@pytest.mark.usefixtures("on_device")
def test_additive_fp32_min_mask_on_a_whole_row_is_uniform():
    q, k, v = make_qkv(1, 8, 12, 16)
    bias = torch.zeros(1, 1, 8, 12)
    bias[..., 3, :] = torch.finfo(torch.float32).min
    bias[..., 5, 4:] = float("-inf")
    out = run_triton(q, k, v, bias=bias)
    assert_close_to_reference(out, reference64(q, k, v, bias=bias), ops.attention_reference(q, k, v, bias=bias))


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def _grads(fn, q, k, v, kwargs, grad_out, params):
    """Run fn with fresh leaves; return (out, grads of q, k, v and of the named kwargs)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(kwargs)
    for name in params:
        kw[name] = kwargs[name].detach().clone().requires_grad_()
    out = fn(*leaves, **kw)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad for t in leaves] + [kw[name].grad for name in params]


def check_gradients(q, k, v, kwargs, params=()):
    grad_out = torch.randn(q.shape[0], q.shape[1], q.shape[2], q.shape[3], dtype=torch.float64)
    _out, grads = _grads(run_triton, q, k, v, kwargs, grad_out, params)
    kw64 = to64(kwargs)
    _, grads64 = _grads(ops.attention_reference, q.double(), k.double(), v.double(), kw64, grad_out, params)
    _, grads_eager = _grads(ops.attention_reference, q, k, v, kwargs, grad_out, params)
    for name, g, g64, ge in zip(("dq", "dk", "dv", *params), grads, grads64, grads_eager):
        assert g.dtype == ge.dtype and g.shape == ge.shape, name
        assert_close_to_reference(g, g64, ge, name=name)
    return grads


GRAD_CASES = [
    ("table", 2, 50, 50, 32, ("bias_table",)),
    ("mask", 2, 50, 50, 16, ()),
    ("causal", 1, 20, 50, 32, ()),
    ("dense", 1, 50, 20, 16, ("bias",)),
    ("table_dense_mask_causal", 2, 41, 50, 48, ("bias_table", "bias")),
]


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize(("name", "b", "n_q", "n_k", "d", "params"), GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_fp32(name, b, n_q, n_k, d, params):
    q, k, v, kwargs = _case(name, b, n_q, n_k, d, torch.float32)
    check_gradients(q, k, v, kwargs, params)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradients_half_with_table_and_mask(dtype):
    q, k, v, kwargs = _case("table_mask", 2, 50, 33, 32, dtype)
    check_gradients(q, k, v, kwargs, ("bias_table",))


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_dense_bias_gradients_per_batch_and_broadcast(deterministic):
    """Bias with a batch dim: dS stored per batch; (1, H, 1, Nk): summed over batch and rows."""
    q, k, v = make_qkv(2, 20, 30, 16)
    with deterministic_algorithms(deterministic):
        check_gradients(q, k, v, {"bias": torch.randn(2, HEADS, 20, 30)}, ("bias",))
        check_gradients(q, k, v, {"bias": torch.randn(HEADS, 1, 30)}, ("bias",))


@pytest.mark.usefixtures("on_device")
def test_gradients_of_fully_masked_rows_in_skipped_blocks():
    """dV of rows that only see padding reaches key blocks the causal loop skips."""
    q, k, v = make_qkv(2, 90, 90, 16)
    mask = padding_mask(2, 90, [90, 90])
    mask[0, :70] = 0
    check_gradients(q, k, v, {"key_padding_mask": mask, "causal": True})


# Key blocks are 32 wide in fp32 (forward and backward). Rows of one key, ending inside a block,
# at a block's edge, full, with no key at all, and one with holes (the mask read below its end).
LENGTHS = [1, 45, 64, 70, 0, 60]


def _as_additive(mask, dtype):
    """The same padding as a (B, 1, 1, Nk) additive bias: the kernels' general path, every key block visited."""
    return torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype).masked_fill(
        mask[:, None, None, :] == 0, torch.finfo(dtype).min
    )


@pytest.mark.usefixtures("on_device")
def test_padding_lengths_skip_blocks_and_equal_the_general_path():
    """A right-padded mask row runs as a length (key blocks past its last attended key skipped, the
    mask not read below it); a row with holes reads it below its last attended key. Both equal the
    same padding given as an additive bias (every block visited), forward and gradients, and the
    float64 reference, the row with no key included; keys in skipped blocks are never read."""
    b, n_q, n_k, d = len(LENGTHS), 5, 70, 16
    q, k, v = make_qkv(b, n_q, n_k, d, heads=1)
    mask = padding_mask(b, n_k, LENGTHS).bool()
    mask[5, 3:9] = False
    grad_out = torch.randn(b, n_q, 1, d, dtype=torch.float64)
    out, grads = _grads(run_triton, q, k, v, {"key_padding_mask": mask}, grad_out, ())
    general, general_grads = _grads(run_triton, q, k, v, {"bias": _as_additive(mask, q.dtype)}, grad_out, ())
    torch.testing.assert_close(out, general, rtol=1e-6, atol=1e-6)
    for name, g, g_general in zip(("dq", "dk", "dv"), grads, general_grads):
        torch.testing.assert_close(g, g_general, rtol=1e-5, atol=1e-6, msg=name)
    ref = reference64(q, k, v, key_padding_mask=mask)
    assert_close_to_reference(out, ref, ops.attention_reference(q, k, v, key_padding_mask=mask))
    torch.testing.assert_close(out[4].double(), v.double().mean(1)[4].expand(n_q, 1, d), rtol=1e-5, atol=1e-6)
    # NaN in the key blocks rows 0-2 skip (keys 32-69 of row 0, 64-69 of rows 1 and 2): never read.
    k_nan, v_nan = k.clone(), v.clone()
    for t in (k_nan, v_nan):
        t[0, 32:] = float("nan")
        t[1:3, 64:] = float("nan")
    nan_out, nan_grads = _grads(run_triton, q, k_nan, v_nan, {"key_padding_mask": mask}, grad_out, ())
    assert torch.isfinite(nan_out[:3]).all() and torch.isfinite(nan_grads[0][:3]).all()


@pytest.mark.usefixtures("on_device")
def test_padding_lengths_keep_the_dropout_replay():
    """Skipped key blocks leave the dropout mask of the others where the backward replays it."""
    b, n, d, p = 3, 40, 16, 0.2
    q, k, v = make_qkv(b, n, n, d, heads=HEADS)
    kwargs = {"key_padding_mask": padding_mask(b, n, [33, 0, 32])}
    keep = _kernel_keep_mask(7, b, n, n, p)
    grad_out = torch.randn(b, n, HEADS, d, dtype=torch.float64)

    def kernel(*qkv, **kw):
        torch.manual_seed(7)
        return run_triton(*qkv, dropout_p=p, **kw)

    out, grads = _grads(kernel, q, k, v, kwargs, grad_out, ())
    ref, grads64 = _grads(
        lambda *a, **kw: _reference_with_keep(*a, keep, p, **kw),
        q.double(),
        k.double(),
        v.double(),
        kwargs,
        grad_out,
        (),
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_gradients_vision_base_shape_fp16():
    q, k, v, kwargs = _case("table", 2, 197, 197, 64, torch.float16)
    check_gradients(q, k, v, kwargs, ("bias_table",))


@pytest.mark.usefixtures("on_device")
def test_deterministic_table_gradient_is_bitwise_repeatable():
    q, k, v, kwargs = _case("table_mask", 2, 45, 45, 16, torch.float32)
    grad_out = torch.randn(2, 45, HEADS, 16, dtype=torch.float64)
    with deterministic_algorithms(True):
        runs = [_grads(run_triton, q, k, v, kwargs, grad_out, ("bias_table",))[1][3] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    atomic = _grads(run_triton, q, k, v, kwargs, grad_out, ("bias_table",))[1][3]
    torch.testing.assert_close(atomic, runs[0], rtol=1e-5, atol=1e-5)


def test_table_gradient_segments_are_cached_per_index_and_follow_in_place_changes():
    """The sorted index is reused while the index tensor is the same object at the same version;
    an in-place change or another index tensor gets its own segments (table gradient stays exact)."""
    from d2v_kernels.kernels import _attention_bias_grad as kernels

    q, k, v, kwargs = _case("table", 1, 30, 30, 16, torch.float32)
    grad_out = torch.randn(1, 30, HEADS, 16, dtype=torch.float64)

    def table_grad_error(kw):
        got = _grads(run_triton, q, k, v, kw, grad_out, ("bias_table",))[1][3]
        want = _grads(ops.attention_reference, q.double(), k.double(), v.double(), to64(kw), grad_out, ("bias_table",))
        return (got.double() - want[1][3]).abs().max().item()

    kernels._SEGMENTS_CACHE.clear()
    assert table_grad_error(kwargs) < 1e-5
    first = kernels._SEGMENTS_CACHE[id(kwargs["bias_index"])]
    assert table_grad_error(kwargs) < 1e-5
    assert kernels._SEGMENTS_CACHE[id(kwargs["bias_index"])] is first  # reused
    kwargs["bias_index"].copy_(kwargs["bias_index"].flip(0))  # same tensor, new values
    assert table_grad_error(kwargs) < 1e-5
    assert kernels._SEGMENTS_CACHE[id(kwargs["bias_index"])] is not first
    other = dict(kwargs, bias_index=kwargs["bias_index"].flip(1).contiguous())
    assert table_grad_error(other) < 1e-5


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


def _kernel_keep_mask(seed_value, b, n_q, n_k, p):
    """The keep mask ops.attention draws after torch.manual_seed(seed_value)."""
    from d2v_kernels.kernels.attention import dropout_keep_mask

    torch.manual_seed(seed_value)
    seed = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
    return dropout_keep_mask(seed, b, HEADS, n_q, n_k, p)


@pytest.mark.usefixtures("on_device")
def test_dropout_same_seed_same_output_and_keep_rate():
    q, k, v = make_qkv(2, 40, 50, 16)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(run_triton(q, k, v, dropout_p=0.3))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    keep = _kernel_keep_mask(5, 2, 40, 50, 0.3)
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - 0.7) < 5 * (0.7 * 0.3 / n) ** 0.5, rate
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


def test_dropout_mask_is_uniform_in_every_column_of_a_philox_group_and_uncorrelated():
    """One Philox call feeds 4 adjacent columns (permuted): each column residue mod 4 keeps at rate
    1 - p, and two neighbours are kept together at (1 - p)^2, within 5 standard deviations."""
    p, n_q, n_k = 0.4, 96, 203  # n_k not a multiple of 4 or of the block: groups straddle rows
    keep = _kernel_keep_mask(3, 2, n_q, n_k, p).double()
    for residue in range(4):
        column = keep[..., residue::4]
        rate, n = column.mean().item(), column.numel()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, (residue, rate)
    pairs = keep[..., :-1] * keep[..., 1:]
    both, q2 = pairs.mean().item(), (1 - p) ** 2
    assert abs(both - q2) < 5 * (q2 * (1 - q2) / pairs.numel()) ** 0.5, both
    rows = keep.reshape(-1, n_k)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def _reference_with_keep(q, k, v, keep, p, **kwargs):
    _, probs = ops.attention_reference(q, k, v, return_probs=True, **kwargs)
    dropped = probs * keep.to(probs.dtype) / (1.0 - p)
    return torch.matmul(dropped, v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.usefixtures("on_device")
def test_dropout_forward_and_backward_replay_the_kernel_mask():
    b, n_q, n_k, d, p = 2, 30, 45, 16, 0.25
    q, k, v, kwargs = _case("table_mask", b, n_q, n_k, d, torch.float32)
    keep = _kernel_keep_mask(11, b, n_q, n_k, p)
    grad_out = torch.randn(b, n_q, HEADS, d, dtype=torch.float64)

    def kernel(*qkv, **kw):
        torch.manual_seed(11)
        return run_triton(*qkv, dropout_p=p, **kw)

    out, grads = _grads(kernel, q, k, v, kwargs, grad_out, ("bias_table",))
    ref, grads64 = _grads(
        lambda *a, **kw: _reference_with_keep(*a, keep, p, **kw),
        q.double(), k.double(), v.double(), to64(kwargs), grad_out, ("bias_table",),
    )  # fmt: skip
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, g, g64 in zip(("dq", "dk", "dv", "dtable"), grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------
# torch.library and torch.compile
# --------------------------------------------------------------------------------------------


def test_opcheck_forward_and_backward_ops():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 9, 7, 16, heads=2))
    table, index = relative_bias(9, 7, heads=2)
    table.requires_grad_()
    mask = padding_mask(1, 7, [5])
    seed = torch.tensor([3, 4])
    args = (q, k, v, table, index, None, mask, seed, False, 0.1, 0.25)
    torch.library.opcheck(torch.ops.d2v_kernels.attention_fwd.default, args)
    out, lse = torch.ops.d2v_kernels.attention_fwd(*(a.detach() if torch.is_tensor(a) else a for a in args))
    bias = torch.randn(1, 2, 9, 7)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, table.detach(), index, bias)
    torch.library.opcheck(
        torch.ops.d2v_kernels.attention_bwd.default, (*bwd_args, mask, seed, True, 0.1, 0.25, True, True, True)
    )


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v, kwargs = _case("table_mask_causal", 2, 20, 25, 16, torch.float32)
    table = kwargs["bias_table"].requires_grad_()
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def fn(q, k, v, table):
        return ops.attention(q, k, v, **{**kwargs, "bias_table": table})

    with d2v_kernels.use_backend(attention="triton"):
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves, table)
        out.square().sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (*leaves, table)]
    ref = ops.attention_reference(*ref_leaves[:3], **to64({**kwargs, "bias_table": ref_leaves[3]}))
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for leaf, ref_leaf in zip((*leaves, table), ref_leaves):
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_dropout_repeats_with_manual_seed():
    q, k, v = make_qkv(1, 12, 12, 16)
    compiled = torch.compile(lambda q, k, v: ops.attention(q, k, v, dropout_p=0.5), fullgraph=True, backend="aot_eager")
    with d2v_kernels.use_backend(attention="triton"):
        torch.manual_seed(2)
        first = compiled(q, k, v)
        torch.manual_seed(2)
        second = compiled(q, k, v)
        torch.manual_seed(2)
        uncompiled = ops.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(first, second)
    assert torch.equal(first, uncompiled)


# --------------------------------------------------------------------------------------------
# Bad input and dispatch reasons
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "dtype", "reason"),
    [
        (12, torch.float32, "head dim 12"),
        (136, torch.float32, "head dim 136"),
        (20, torch.float32, "head dim 20"),
        (16, torch.float64, "dtype float64"),
    ],
    ids=["d12", "d136", "d20", "float64"],
)
def test_unsupported_inputs_give_dispatch_reasons(d, dtype, reason):
    q, k, v = make_qkv(1, 4, 4, d, dtype)
    with pytest.raises(BackendUnavailableError, match=reason), d2v_kernels.use_backend(attention="triton"):
        ops.attention(q, k, v)
    with d2v_kernels.record_dispatch() as calls:
        ops.attention(q, k, v)  # unforced on the CPU: eager
    assert calls == {("attention", "eager"): 1}


def test_float64_bias_table_is_a_dispatch_reason():
    q, k, v = make_qkv(1, 4, 4, 16)
    table, index = relative_bias(4, 4, torch.float64)
    with pytest.raises(BackendUnavailableError, match="bias_table dtype float64"):
        run_triton(q, k, v, bias_table=table, bias_index=index)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(k=torch.randn(1, 4, 2, 16)), ValueError, "k must have shape"),
        (dict(v=torch.randn(1, 5, 3, 16)), ValueError, "v must have k's shape"),
        (dict(v=torch.randn(1, 4, 3, 16, dtype=torch.float16)), TypeError, "share one dtype"),
        (dict(bias_table=torch.randn(9, 3)), ValueError, "given together"),
        (dict(bias_table=torch.randn(9, 2), bias_index=torch.zeros(4, 4, dtype=torch.long)), ValueError, "one column"),
        (dict(bias_table=torch.randn(9, 3), bias_index=torch.zeros(4, 5, dtype=torch.long)), ValueError, "(Nq, Nk)"),
        (dict(bias_table=torch.randn(9, 3), bias_index=torch.zeros(4, 4)), TypeError, "bias_index must have dtype"),
        (dict(bias=torch.randn(2, 3, 4, 4)), ValueError, "broadcastable"),
        (dict(key_padding_mask=torch.ones(1, 5)), TypeError, "key_padding_mask must have dtype"),
        (dict(key_padding_mask=torch.ones(1, 5, dtype=torch.bool)), ValueError, r"\(B, Nk\)"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(scale="x"), TypeError, "scale"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_input(change, error, message):
    q, k, v = make_qkv(1, 4, 4, 16)
    args = {"q": q, "k": k, "v": v, **change}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=message), d2v_kernels.use_backend(attention="triton"):
        ops.attention(q, k, v, **args)


def test_packed_backward_writes_dq_dk_dv_into_one_tensor_bit_for_bit():
    """``packed``: the backward's dQ, dK, dV in one (B, N, 3, H, d) tensor (the gradient of a fused
    QKV projection's output), equal bit for bit to the three tensors it gives otherwise, with a
    relative position table and with a padding mask."""
    from d2v_kernels.kernels.attention import attention_forward, backward_launch

    b, n, d = 2, 11, 16
    qkv = torch.randn(b, n, 3, HEADS, d)
    q, k, v = qkv.unbind(2)
    table, index = relative_bias(n, n)
    mask = padding_mask(b, n, (n, 7)).bool()
    for bias_args in ((table, index, None, None), (None, None, None, mask)):
        out, lse = attention_forward(q, k, v, *bias_args, None, False, 0.0, d**-0.5)
        grad_out = torch.randn(b, n, HEADS, d)
        table_grad = bias_args[0] is not None
        args = (grad_out, q, k, v, out, lse, *bias_args, None, False, 0.0, d**-0.5, table_grad, False, True)
        launches = [backward_launch(*args, packed=packed) for packed in (False, True)]
        dq, dk, dv, dtable, _ = launches[0](grad_out, q, k, v, out, lse, *bias_args, None)
        dqkv, none_k, none_v, dtable_packed, _ = launches[1](grad_out, q, k, v, out, lse, *bias_args, None)
        assert dqkv.shape == (b, n, 3, HEADS, d) and none_k is None and none_v is None
        for i, g in enumerate((dq, dk, dv)):
            assert torch.equal(dqkv[:, :, i], g), i
        if table_grad:
            assert torch.equal(dtable_packed, dtable)
    with pytest.raises(ValueError, match="one shape"):
        backward_launch(grad_out, q, k[:, :5], v[:, :5], out, lse, None, None, None, None, None, False, 0.0, 1.0,
                        False, False, True, packed=True)  # fmt: skip
