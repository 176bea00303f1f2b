"""Multi-head attention with relative position bias gathered from a table, masks and dropout.

Layout: q, k, v are (batch, seq, heads, head_dim), as the transformers projections produce them
before the transpose, so they are read through strides. The relative position bias of
Data2VecVision/BEiT is ``bias_table[bias_index]``: ``bias_table`` (num_relative_distances, heads),
``bias_index`` (Nq, Nk) integer. A dense additive ``bias`` broadcastable to (B, H, Nq, Nk) covers
the general case. ``key_padding_mask`` (B, Nk) follows transformers: 1/True attends, 0 is padding.
``causal`` masks key j for query i when j > i + (Nk - Nq) (bottom-right aligned, as when new
queries attend to cached keys). Fully masked rows give what transformers' eager attention
gives: uniform weights over all keys.
"""

from __future__ import annotations

import collections
import importlib.util
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from d2v_kernels import dispatch
from d2v_kernels.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from d2v_kernels.ops._eager import direct_apply, pick, register_traced_autograd, runs_eagerly
from d2v_kernels.ops._plan import layout_key, plan_cache, plans_enabled, recorder, store
from d2v_kernels.ops.dropout_seeds import draw_seeds

INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def gather_relative_bias(bias_table: torch.Tensor, bias_index: torch.Tensor) -> torch.Tensor:
    """(R, H) table and (Nq, Nk) index -> dense (1, H, Nq, Nk) bias (the eager path only)."""
    return bias_table[bias_index.long()].permute(2, 0, 1).unsqueeze(0)


def attention_reference(
    q,
    k,
    v,
    *,
    bias_table=None,
    bias_index=None,
    bias=None,
    key_padding_mask=None,
    causal=False,
    dropout_p=0.0,
    scale=None,
    return_probs=False,
):
    """Eager PyTorch attention in the input dtype, as transformers' eager path computes it.

    Returns (B, Nq, H, d), or (out, probs (B, H, Nq, Nk)) with ``return_probs``.
    """
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if bias_table is not None:
        scores = scores + gather_relative_bias(bias_table, bias_index).to(scores.dtype)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    n_q, n_k = scores.shape[-2:]
    min_value = torch.finfo(scores.dtype).min
    if key_padding_mask is not None:
        keep = key_padding_mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~keep, min_value)
    if causal:
        rows = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        future = torch.arange(n_k, device=q.device)[None, :] > rows
        scores = scores.masked_fill(future, min_value)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, vh).transpose(1, 2)
    return (out, probs) if return_probs else out


# --------------------------------------------------------------------------------------------
# Triton path: torch.library ops (forward returns the per-row logsumexp the backward needs)
# --------------------------------------------------------------------------------------------


def _attention_fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    bias_index: torch.Tensor | None,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (B, Nq, H, d) contiguous, lse (B, H, Nq) fp32, log2 units)."""
    from d2v_kernels.kernels.attention import attention_forward

    if bias_index is not None and not _capturing(bias_index):
        check_index_range(bias_index, bias_table.shape[0])

    return attention_forward(q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p, scale)


_attention_fwd = torch.library.custom_op("d2v_kernels::attention_fwd", _attention_fwd_impl, mutates_args=())


@_attention_fwd.register_fake
def _(q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p, scale):
    b, n_q, h, d = q.shape
    return q.new_empty((b, n_q, h, d)), q.new_empty((b, h, n_q), dtype=torch.float32)


def _attention_bwd_impl(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias_table: torch.Tensor | None,
    bias_index: torch.Tensor | None,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float,
    table_grad: bool,
    bias_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv, dbias_table, dbias); a gradient not asked for is an empty tensor."""
    from d2v_kernels.kernels.attention import attention_backward

    dq, dk, dv, dtable, dbias = attention_backward(
        grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p,
        scale, table_grad, bias_grad, deterministic,
    )  # fmt: skip
    return dq, dk, dv, q.new_empty(0) if dtable is None else dtable, q.new_empty(0) if dbias is None else dbias


_attention_bwd = torch.library.custom_op("d2v_kernels::attention_bwd", _attention_bwd_impl, mutates_args=())


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p,
      scale, table_grad, bias_grad, deterministic):  # fmt: skip
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        torch.empty_like(bias_table) if table_grad else q.new_empty(0),
        torch.empty_like(bias) if bias_grad else q.new_empty(0),
    )


def _attention_setup_context(ctx, inputs, output):
    q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse, first_input: int = 0):
    """The gradients of the inputs (from ``first_input`` in ``ctx.needs_input_grad``: q's index)."""
    q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed = ctx.saved_tensors
    table_grad = bias_table is not None and ctx.needs_input_grad[first_input + 3]
    bias_grad = bias is not None and ctx.needs_input_grad[first_input + 5]
    dq, dk, dv, dtable, dbias = pick(_attention_bwd, _attention_bwd_impl, (grad_out, q, k, v, out, lse))(
        grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed, ctx.causal,
        ctx.dropout_p, ctx.scale, table_grad, bias_grad, torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    return (
        dq,
        dk,
        dv,
        dtable if table_grad else None,
        None,
        dbias if bias_grad else None,
        None,
        None,
        None,
        None,
        None,
    )


_attention_call = register_traced_autograd(_attention_fwd, _attention_setup_context, _attention_backward)


class AttentionLaunched(torch.autograd.Function):
    """The eager training path: the forward a plan's launch (log-sum-exp stored), the backward
    :func:`_attention_backward`'s. Traced calls and tensor subclasses take the custom op above."""

    @staticmethod
    def forward(ctx, launch, q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p, scale):
        out, lse = launch(q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, scale, dropout_p)
        inputs = (q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p, scale)
        _attention_setup_context(ctx, inputs, (out, lse))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return (None, *_attention_backward(ctx, grad_out, None, first_input=1))


def attention_triton(
    q,
    k,
    v,
    *,
    bias_table=None,
    bias_index=None,
    bias=None,
    key_padding_mask=None,
    causal=False,
    dropout_p=0.0,
    scale=None,
):
    """The Triton path of :func:`attention` (arguments already validated)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seed = draw_seeds(q.device) if dropout_p > 0.0 else None
    out, _ = _attention_call(q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p, scale)
    return out


# Looked up once: dispatch runs inside compiled code, where find_spec and imports break the graph.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_unavailable() -> list[str]:
    return [] if _TRITON_INSTALLED else ["triton is not installed"]


def _triton_reasons(q, k, v, *, bias_table=None, bias=None, dropout_p=0.0, **_) -> list[str]:
    from d2v_kernels.kernels.attention import unsupported_reasons  # triton is installed (checked first)

    return unsupported_reasons(q, k.shape[1], dropout_p, {"bias_table": bias_table, "bias": bias})


# --------------------------------------------------------------------------------------------
# sdpa path: PyTorch's scaled_dot_product_attention (flash, cuDNN, memory-efficient or math, its pick)
# --------------------------------------------------------------------------------------------


# (table, index, dtype) -> the gathered (1, H, Nq, Nk) bias, for inference: a model's tables are
# parameters and its index a cached buffer, so every layer of every step hits.
_GATHERED_BIAS: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
_GATHERED_BIAS_SIZE = 64  # a table per layer: 24 layers of a large model, in two dtypes, and spare


def gathered_bias(bias_table: torch.Tensor, bias_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``bias_table[bias_index]`` as a (1, H, Nq, Nk) bias in ``dtype`` shared by the batch, a view
    of rows padded to a multiple of 16 elements: sdpa's fused kernels take it as it is (an unaligned
    bias, e.g. Nk = 197, is padded again by torch on every call), and a kernel reads its rows as
    aligned vectors. With autograd recording the table's gradient flows back through the gather;
    otherwise the result is kept while the table and the index are the same tensors (weak
    references) at the same versions."""
    if (torch.is_grad_enabled() and bias_table.requires_grad) or torch.compiler.is_compiling():
        return _padded_rows(gather_relative_bias(bias_table, bias_index).to(dtype))
    key = (id(bias_table), id(bias_index), dtype)
    hit = _GATHERED_BIAS.get(key)
    if hit is not None:
        table_ref, index_ref, versions, dense = hit
        if table_ref() is bias_table and index_ref() is bias_index and versions == _versions(bias_table, bias_index):
            _GATHERED_BIAS.move_to_end(key)
            return dense
    dense = _padded_rows(gather_relative_bias(bias_table.detach(), bias_index).to(dtype))
    versions = _versions(bias_table, bias_index)
    _GATHERED_BIAS[key] = (weakref.ref(bias_table), weakref.ref(bias_index), versions, dense)
    while len(_GATHERED_BIAS) > _GATHERED_BIAS_SIZE:
        _GATHERED_BIAS.popitem(last=False)
    return dense


def _padded_rows(dense: torch.Tensor) -> torch.Tensor:
    n_k = dense.shape[-1]
    return F.pad(dense, (0, -n_k % 16))[..., :n_k] if n_k % 16 else dense.contiguous()


def _versions(*tensors) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


def attention_sdpa(
    q,
    k,
    v,
    *,
    bias_table=None,
    bias_index=None,
    bias=None,
    key_padding_mask=None,
    causal=False,
    dropout_p=0.0,
    scale=None,
):
    """:func:`attention` through ``torch.nn.functional.scaled_dot_product_attention`` (arguments
    already validated): the padding mask as a (B, 1, 1, Nk) boolean mask, the table gathered into a
    (1, H, Nq, Nk) bias in q's dtype (see :func:`gathered_bias`). Rows with no key left give what the
    other backends give (the mean of v over all keys; with dropout, not thinned by it), never NaN. Dropout draws from torch's
    generator in sdpa's own way: the same seed gives other dropped weights than the Triton kernel."""
    n_q, n_k = q.shape[1], k.shape[1]
    additive = None
    if bias_table is not None:
        additive = gathered_bias(bias_table, bias_index, q.dtype)
    if bias is not None:
        # -inf would make a row of sdpa's fused kernels 0 or NaN: the lowest finite value masks alike.
        extra = bias.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
        additive = extra if additive is None else additive + extra
    if causal or key_padding_mask is None:
        allowed, rows_kept = _sdpa_mask(key_padding_mask, causal, n_q, n_k, q.device, additive is not None)
    else:  # the padding mask alone: the same for every layer of a forward
        allowed, rows_kept = padding_mask_for_sdpa(key_padding_mask)
    is_causal = causal and allowed is None and additive is None and n_q == n_k
    attn_mask = allowed
    if additive is not None:
        attn_mask = additive if allowed is None else torch.where(allowed, additive, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, dropout_p=dropout_p,
        is_causal=is_causal, scale=scale,
    ).transpose(1, 2)  # fmt: skip
    if rows_kept is not None:
        out = torch.where(rows_kept.transpose(1, 2), out, v.mean(1, keepdim=True))
    return out


def _sdpa_mask(key_padding_mask, causal: bool, n_q: int, n_k: int, device, with_bias: bool = False) -> tuple:
    """(allowed: bool broadcastable to (B, H, Nq, Nk) or None, rows_kept: (B|1, 1, Nq|1, 1) or None).
    Causal becomes an explicit mask unless sdpa's ``is_causal`` can say it (square, no other mask,
    no bias). Rows with no key left are allowed every key (sdpa would give 0 or NaN there):
    ``rows_kept`` tells :func:`attention_sdpa` to give them mean(v), as the other backends do."""
    allowed = None
    if key_padding_mask is not None:
        keep = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
        allowed = keep[:, None, None, :]
    is_causal = causal and allowed is None and not with_bias and n_q == n_k
    if causal and not is_causal:
        rows = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)  # bottom-right aligned
        seen = (torch.arange(n_k, device=device)[None, :] <= rows)[None, None]
        allowed = seen if allowed is None else allowed & seen
    rows_kept = None
    if allowed is not None and (key_padding_mask is not None or n_q > n_k):
        rows_kept = allowed.any(-1, keepdim=True)
        allowed = allowed | ~rows_kept
    return allowed, rows_kept


# The last padding mask made for sdpa: the layers of a forward slice the same mask, so the first
# layer makes it and the others reuse it. It is keyed by the mask's base tensor (a weak reference:
# a new mask in the same memory is another tensor), its version and the view's geometry.
_LAST_PADDING: list = [None]


def padding_mask_for_sdpa(key_padding_mask: torch.Tensor) -> tuple:
    """:func:`_sdpa_mask` of a padding mask alone, reused while the mask is the same."""
    if torch.compiler.is_compiling():
        return _sdpa_mask(key_padding_mask, False, 0, 0, key_padding_mask.device)
    base = key_padding_mask._base if key_padding_mask._base is not None else key_padding_mask
    geometry = (
        key_padding_mask.shape,
        key_padding_mask.stride(),
        key_padding_mask.storage_offset(),
        key_padding_mask.dtype,
        base._version,
    )
    last = _LAST_PADDING[0]
    if last is not None and last[0]() is base and last[1] == geometry:
        return last[2]
    made = _sdpa_mask(key_padding_mask, False, 0, 0, key_padding_mask.device)
    _LAST_PADDING[0] = (weakref.ref(base), geometry, made)
    return made


_PLANS = plan_cache()


def attention(
    q,
    k,
    v,
    *,
    bias_table=None,
    bias_index=None,
    bias=None,
    key_padding_mask=None,
    causal=False,
    dropout_p=0.0,
    scale=None,
):
    """softmax(q k^T * scale + bias + masks) v, per head.

    q: (B, Nq, H, d); k, v: (B, Nk, H, d); one float dtype (fp16, bf16, fp32; fp64 runs eager).
    bias_table: (R, H) float with bias_index: (Nq, Nk) int32/int64 in [0, R). bias: additive,
    broadcastable to (B, H, Nq, Nk). key_padding_mask: (B, Nk) bool or integer, nonzero attends.
    causal: bottom-right aligned. dropout_p: probability of dropping an attention weight
    (in-kernel Philox seeded from torch's generator in the Triton path). scale: default d**-0.5.
    Returns (B, Nq, H, d) in q's dtype.
    """
    key = None
    if plans_enabled():
        key = layout_key(q, k, v, bias_table, bias_index, bias, key_padding_mask)
        if key is not None:
            key = (
                key, _index_version(bias_index), causal.__class__, causal, dropout_p.__class__, dropout_p,
                scale.__class__, scale, torch.is_grad_enabled(), dispatch.forced_token(),
            )  # fmt: skip
            try:
                plan = _PLANS.get(key)
            except TypeError:  # an unhashable argument: the full path says what is wrong with it
                plan = key = None
            if plan is not None:
                return plan(q, k, v, bias_table, bias_index, bias, key_padding_mask)
    device = _validate(q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout_p, scale)
    return store(_PLANS, key, _plan(device, q, k, v, bias_table, bias_index, bias, key_padding_mask, causal,
                                    float(dropout_p), None if scale is None else float(scale)), device)(
        q, k, v, bias_table, bias_index, bias, key_padding_mask
    )  # fmt: skip


def _index_version(bias_index) -> tuple | None:
    """The index's contents are validated (its range), so a plan holds for one version of them."""
    return None if bias_index is None else (bias_index.data_ptr(), bias_index._version)


def _validate(q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout_p, scale) -> torch.device:
    """Check every argument (errors name it); the device they share."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    b, n_q, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"k must have shape ({b}, Nk, {h}, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    n_k = k.shape[1]
    if (bias_table is None) != (bias_index is None):
        raise ValueError("bias_table and bias_index must be given together")
    if bias_table is not None:
        check_tensor("bias_table", bias_table, ndim=2, dtypes=FLOAT_DTYPES)
        if bias_table.shape[1] != h:
            raise ValueError(
                f"bias_table must have shape (R, {h}) (one column per head), got {tuple(bias_table.shape)}"
            )
        check_tensor("bias_index", bias_index, ndim=2, dtypes=INDEX_DTYPES)
        if tuple(bias_index.shape) != (n_q, n_k):
            raise ValueError(f"bias_index must have shape ({n_q}, {n_k}) = (Nq, Nk), got {tuple(bias_index.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        try:
            if bias.dim() > 4 or torch.broadcast_shapes(bias.shape, (b, h, n_q, n_k)) != (b, h, n_q, n_k):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"bias must be broadcastable to (B, H, Nq, Nk) = {(b, h, n_q, n_k)}, got {tuple(bias.shape)}"
            ) from None
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=MASK_DTYPES)
        if tuple(key_padding_mask.shape) != (b, n_k):
            raise ValueError(
                f"key_padding_mask must have shape (B, Nk) = ({b}, {n_k}), got {tuple(key_padding_mask.shape)}"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    device = check_same_device(
        q=q, k=k, v=v, bias_table=bias_table, bias_index=bias_index, bias=bias, key_padding_mask=key_padding_mask
    )
    if plans_enabled():  # traced: the custom op checks the range when it runs
        check_index_range(bias_index, bias_table.shape[0] if bias_table is not None else 0)
    return device


_checked_indices: dict[tuple, bool] = {}


def _capturing(t: torch.Tensor) -> bool:
    """A CUDA graph is being captured on t's device: no check may wait for the device then."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_index_range(bias_index, n_relative: int) -> None:
    """ValueError unless every entry of ``bias_index`` is in [0, n_relative): a kernel would read
    the table out of bounds. Checked once per version of the index (a buffer that rarely changes;
    on a GPU the check waits for the device once)."""
    if bias_index is None or bias_index.numel() == 0 or bias_index.device.type == "meta":
        return
    key = (
        bias_index.data_ptr(),
        bias_index._version,
        bias_index.device,
        bias_index.shape,
        bias_index.stride(),
        n_relative,
    )
    if key in _checked_indices:
        return
    low, high = torch.aminmax(bias_index)
    low, high = int(low), int(high)
    if low < 0 or high >= n_relative:
        raise ValueError(f"bias_index must hold indices in [0, {n_relative}) (bias_table's rows), got [{low}, {high}]")
    if len(_checked_indices) >= 64:
        _checked_indices.clear()
    _checked_indices[key] = True


def _plan(device, q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout_p, scale):
    """The callable that runs this input's implementation on inputs of its layout."""
    kwargs = dict(
        bias_table=bias_table,
        bias_index=bias_index,
        bias=bias,
        key_padding_mask=key_padding_mask,
        causal=causal,
        dropout_p=dropout_p,
        scale=scale,
    )
    if q.numel() == 0 or k.shape[1] == 0:
        return lambda q, k, v, table, index, bias, mask: attention_reference(
            q, k, v, bias_table=table, bias_index=index, bias=bias, key_padding_mask=mask, causal=causal,
            dropout_p=dropout_p, scale=scale,
        )  # fmt: skip
    impl = dispatch.select("attention", device, q, k, v, **kwargs)
    backend, scale_value = impl.backend, q.shape[-1] ** -0.5 if scale is None else scale
    record = recorder()
    # Traced calls and tensor subclasses: through the custom op.
    if impl.run is not attention_triton or not runs_eagerly((q, k, v, bias_table, bias_index, bias, key_padding_mask)):

        def run_other(q, k, v, table, index, bias, mask):
            record("attention", backend)
            return impl.run(q, k, v, bias_table=table, bias_index=index, bias=bias, key_padding_mask=mask,
                            causal=causal, dropout_p=dropout_p, scale=scale)  # fmt: skip

        return run_other
    from d2v_kernels.kernels.attention import forward_launch

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias_table, bias)):
        launch = forward_launch(q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout_p > 0.0)
        apply = direct_apply(AttentionLaunched)

        def run_autograd(q, k, v, table, index, bias, mask):
            record("attention", backend)
            seed = draw_seeds(q.device) if dropout_p > 0.0 else None
            return apply(launch, q, k, v, table, index, bias, mask, seed, causal, dropout_p, scale_value)

        return run_autograd
    launch = forward_launch(
        q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout_p > 0.0, store_lse=False
    )

    def run_kernel(q, k, v, table, index, bias, mask):
        record("attention", backend)
        seed = draw_seeds(q.device) if dropout_p > 0.0 else None
        return launch(q, k, v, table, index, bias, mask, seed, scale_value, dropout_p)[0]

    return run_kernel


# --------------------------------------------------------------------------------------------
# The measured rule: which backend runs a class of input on a CUDA device
# --------------------------------------------------------------------------------------------

EVIDENCE_OP = "bench/results/nvidia-h100-80gb-hbm3/20261125-091653-attention.json"
EVIDENCE_PROFILE = "bench/results/nvidia-h100-80gb-hbm3/20261125-094000-profile-vision_base-inference.txt"

# (bias kind, mode, dtype class) -> (backends preferred, evidence). A class with no preference
# keeps the priority order: the Triton kernel, then sdpa, then eager. Every measurement is an H100
# at d=64 (the Data2Vec head dim); fp16 and bf16 are one class. ``python -m bench.attention_rule
# <results.json>`` prints these rows from a results file of ``bench.attention``.
ATTENTION_RULE: dict[tuple[str, str, str], tuple[tuple[str, ...], str]] = {
    ("key_padding", "inference", "half"): (
        ("sdpa",),
        f"text_base B=32 N=512 fp16 fwd: sdpa_bias 0.124 ms, d2v_triton 0.228 ms ({EVIDENCE_OP})",
    ),
    ("key_padding", "training", "half"): (
        ("sdpa",),
        f"text_base B=32 N=512 fp16 fwd+bwd: sdpa_bias 0.468 ms, d2v_triton 0.842 ms, eager 2.616 ms ({EVIDENCE_OP})",
    ),
    ("table", "inference", "half"): (
        ("sdpa",),
        "vision_base B=64 N=197 bf16 model inference: cuDNN sdpa with transformers' (1, H, N, N) bias "
        f"128 us a layer, d2v_triton 210 us ({EVIDENCE_PROFILE}); the op bench's sdpa_bias row "
        "(1.18 ms) gave sdpa a per-batch bias, which this backend does not",
    ),
    ("table", "training", "half"): (
        ("eager",),
        f"vision_base B=64 N=197 fp16 fwd+bwd: eager 1.200 ms, d2v_triton 1.675, flex 1.811, sdpa_bias (per-batch "
        f"bias) 2.366 ({EVIDENCE_OP}); sdpa with the shared (1, H, N, N) bias not measured",
    ),
    # The kernel without a mask does the work it does with one (the mask's loads aside), and at the
    # same shape flash attention without a mask ran 3x faster than the kernel with one.
    ("none", "inference", "half"): (
        ("sdpa",),
        f"text_base B=32 N=512 fp16 fwd: sdpa_nobias 0.074 ms, d2v_triton 0.228 ms with the padding mask ({EVIDENCE_OP})",
    ),
    ("none", "training", "half"): (
        ("sdpa",),
        f"text_base B=32 N=512 fp16 fwd+bwd: sdpa_nobias 0.345 ms, d2v_triton 0.842 ms with the padding mask "
        f"({EVIDENCE_OP})",
    ),
    ("dense", "inference", "half"): ((), "unmeasured"),
    ("dense", "training", "half"): ((), "unmeasured"),
}
# Not in the table (unmeasured, Triton first): fp32, causal, more than one bias kind at once.


def input_class(q, k=None, v=None, *, bias_table=None, bias=None, key_padding_mask=None, causal=False,
                dropout_p=0.0, **_) -> tuple[str, str, str]:  # fmt: skip
    """(bias kind, mode, dtype class) of an input, the key of :data:`ATTENTION_RULE`: bias kind
    ``none``, ``key_padding``, ``table``, ``dense`` or ``other`` (causal, or two kinds at once);
    mode ``training`` (dropout, or autograd recording) or ``inference``; dtype ``half`` (fp16,
    bf16), ``fp32`` or ``other``. Reads only what the op's plan key holds."""
    kinds = [
        name for name, t in (("key_padding", key_padding_mask), ("table", bias_table), ("dense", bias)) if t is not None
    ]
    kind = "other" if causal or len(kinds) > 1 else (kinds[0] if kinds else "none")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias_table, bias))
    mode = "training" if dropout_p > 0.0 or grad else "inference"
    dtype = {torch.float16: "half", torch.bfloat16: "half", torch.float32: "fp32"}.get(q.dtype, "other")
    return kind, mode, dtype


def preferred_backends(q, k, v, **kwargs) -> tuple[str, ...]:
    """The backends :data:`ATTENTION_RULE` prefers for this input (none off CUDA)."""
    if q.device.type != "cuda":
        return ()
    row = ATTENTION_RULE.get(input_class(q, k, v, **kwargs))
    return () if row is None else row[0]


dispatch.register(
    "attention",
    "triton",
    attention_triton,
    _triton_reasons,
    devices=("cuda",),
    available=_triton_unavailable,
    description="fused FlashAttention-2 style kernels, relative position bias gathered in-kernel",
)
dispatch.register(
    "attention",
    "sdpa",
    attention_sdpa,
    devices=("cuda",),
    description="torch.nn.functional.scaled_dot_product_attention, the table gathered to a (1, H, N, N) bias",
)
dispatch.register("attention", "eager", attention_reference, devices=("cpu", "cuda", "meta"))
dispatch.register_rule(
    "attention",
    preferred_backends,
    evidence=f"ATTENTION_RULE in d2v_kernels/ops/attention_op.py, from {EVIDENCE_OP} and {EVIDENCE_PROFILE}",
)
