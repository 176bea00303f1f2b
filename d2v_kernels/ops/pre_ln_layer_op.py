"""A pre-LN encoder layer's training forward (Data2VecVision's, BEiT's) as one autograd node, eager
only:

    n = LN0(x);  qkv = n Wqkv^T + bqkv;  a = dropout(attention(q, k, v; bias table) Wd^T + bd)
    h = x + drop_path(lambda_1 * a);  y = LN1(h)
    out = h + drop_path(lambda_2 * dropout(act(y Wi^T + bi) Wo^T + bo))

The same computation as the layer op by op (``F.layer_norm``, ``F.linear``, ``ops.attention`` with
the relative position bias table, ``ops.add_layer_norm`` with ``x_scale=lambda_1`` and the sum
returned, ``torch.addcmul``), with the same kernels, in one Function whose forward runs with
autograd off and whose backward computes every gradient itself (see ``post_ln_layer_op``, the
post-LN twin, for why: each recorded node and each Python Function costs host time). The key
projection may have no bias (BEiT's has none): its segment of the QKV GEMM's bias is zero.

Drop path (stochastic depth) is transformers' ``Data2VecVisionDropPath``: per sample, a keep draw
``floor(rand + keep)`` of shape (B, 1, 1) in x's dtype from torch's generator, the branch scaled by
it over ``keep``; the two draws of a layer are made where transformers makes them (after the
attention's output dropout, after the feed-forward's), so a seeded run draws the same masks. The
per-sample scale of the first branch is the add + LayerNorm kernel's row scale (its ``x_scale`` is
``lambda_1``), forward and backward; the second's joins ``lambda_2`` as the (B, 1, C) factor of
the residual's ``addcmul``. Without hidden dropout, the attention output dense's bias gradient is
the column sum of the add + LayerNorm backward's x gradient, reduced in that kernel; with it, a
``sum`` of the gradient through dropout's backward.

Only where the layer would run those same kernels: dispatch picks the Triton backend for the add +
LayerNorm, and for the attention Triton, or sdpa or eager (the measured rule's pick for the
table's training in half precision on CUDA), whose autograd graph is then recorded inside the
node (``_nested_attention``); on plain tensors, not traced, not under autocast, with autograd
recording. Anything else returns None and the caller runs the layer op by op. Validation
happens once per input layout (the plan key holds every tensor's shape, strides, dtype, device,
alignment and ``requires_grad``, and the bias index's version: its range is checked once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from d2v_kernels import dispatch
from d2v_kernels.ops import _nested_attention as nested_attention
from d2v_kernels.ops import add_layer_norm_op, attention_op
from d2v_kernels.ops._checks import check_eps, check_tensor
from d2v_kernels.ops._eager import UNRECORDED, direct_apply, keep_for_backward, kept_for_backward, runs_eagerly
from d2v_kernels.ops._plan import launch_rows, layout_key, lookup, plan_cache, plans_enabled, recorder, store
from d2v_kernels.ops.dropout_seeds import layer_seeds

__all__ = ["pre_ln_layer_training"]

# The overloads themselves: an OpOverloadPacket call resolves one on every call.
_gelu_backward = torch.ops.aten.gelu_backward.default
_native_dropout_backward = torch.ops.aten.native_dropout_backward.default
_native_layer_norm_backward = torch.ops.aten.native_layer_norm_backward.default

# The attention backends the node runs: Triton's launches, or another's graph recorded inside it.
_ATTENTION_BACKENDS = frozenset(("triton", "sdpa", "eager"))
# Positions in ``params`` that may be None: the key's bias, lambda_1, lambda_2.
_OPTIONAL = frozenset((5, 16, 17))


class PreLnLayerFunction(torch.autograd.Function):
    """The layer's forward (``plan``: a :class:`_Plan`) and every gradient of its parameters, its
    bias table and its input in one backward."""

    @staticmethod
    def forward(ctx, plan, x, table, index, w0, b0, wq, bq, wk, bk, wv, bv, wd, bd, w1, b1, wi, bi, wo, bo, l1, l2):
        b, n, c = x.shape
        x2 = x.view(b * n, c)
        normed, mean0, rstd0 = torch.native_layer_norm(x2, (c,), w0, b0, plan.eps0)
        wqkv, bqkv = torch.cat((wq, wk, wv)), torch.cat((bq, plan.zero_bias if bk is None else bk, bv))
        qkv = F.linear(normed, wqkv, bqkv)
        seed = None
        if plan.nested is None:
            q, k, v = qkv.view(b, n, 3, plan.heads, c // plan.heads).unbind(2)
            if plan.attention_dropout > 0.0:
                seed = layer_seeds(1, q.device, ctx is not UNRECORDED)[0]
            out, lse = plan.attention(q, k, v, table, index, None, None, seed, plan.scale, plan.attention_dropout)
        else:  # the attention's graph keeps what its backward needs
            q = k = v = lse = None
            out = nested_attention.attention_forward(
                ctx,
                plan.nested,
                qkv,
                b,
                plan.heads,
                table=table,
                index=index,
                dropout_p=plan.attention_dropout,
                scale=plan.scale,
            )
        a = F.linear(out.view(b * n, c), wd, bd)
        mask1 = mask2 = keep1 = keep2 = scale2 = None
        if plan.hidden_dropout > 0.0:
            a, mask1 = torch.native_dropout(a, plan.hidden_dropout, True)
        if plan.drop_path > 0.0:  # a's per-sample factor, applied by the add + LayerNorm kernel
            keep1 = plan.sample_scale(x)
        y, h, mean1, rstd1 = plan.norm(a, w1, b1, plan.eps1, x2, l1, None, 0.0, keep1)
        pre = F.linear(y, wi, bi)
        g = torch._C._nn.gelu(pre, approximate=plan.approximate)
        o = F.linear(g, wo, bo)
        if plan.hidden_dropout > 0.0:
            o, mask2 = torch.native_dropout(o, plan.hidden_dropout, True)
        if plan.drop_path > 0.0:
            # The branch's per-sample factor joins lambda_2 as a (B, 1, C) factor of the residual's
            # addcmul: o (kept as it is, for the backward) is read once.
            keep2 = plan.sample_scale(x)
            scale2 = keep2 if l2 is None else l2 * keep2
            output = torch.addcmul(h.view(b, n, c), scale2, o.view(b, n, c))
        else:
            output = h + o if l2 is None else torch.addcmul(h, l2, o)
        keep_for_backward(
            ctx,
            (x2, w0, b0, table, index, wd, w1, b1, l1, wi, wo, l2),
            (mean0, rstd0, normed, wqkv, q, k, v, out, lse, seed, mask1, keep1, a, mean1, rstd1, y, pre, g, mask2,
             keep2, o, scale2),
        )  # fmt: skip
        ctx.plan = plan
        return output.view(b, n, c)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x2, w0, b0, table, index, wd, w1, b1, l1, wi, wo, l2), made = kept_for_backward(ctx)
        (mean0, rstd0, normed, wqkv, q, k, v, out, lse, seed, mask1, keep1, a, mean1, rstd1, y, pre, g, mask2,
         keep2, o, scale2) = made  # fmt: skip
        plan = ctx.plan
        b, n, heads, d = out.shape
        c = heads * d
        dy = launch_rows(dy, b * n, c)
        launches = plan.backward_launches
        if launches is None:
            launches = plan.backward_launches = _BackwardLaunches(dy, x2, a, w1, b1, l1, plan)
        # out = h + lambda_2 * keep2 * o (o after dropout, before drop path's per-sample keep2): dy
        # reaches h directly (the sum LN1 returned, its gradient added in that kernel's backward)
        # and o through lambda_2 * keep2.
        dl2 = None
        do = dy
        if keep2 is None:
            if l2 is not None:
                dl2 = (dy * o).sum(0)
                do = dy * l2
        else:
            dy3 = dy.view(b, n, c)
            if l2 is not None:  # each sample's sum, then their sum weighted by keep2 (one GEMV)
                dl2 = keep2.view(1, b).mm((dy3 * o.view(b, n, c)).sum(1)).view(c)
            do = (dy3 * scale2).view(b * n, c)
        if mask2 is not None:
            do = _native_dropout_backward(do, mask2, plan.dropout_scale)
        dwo, dbo = do.t().mm(g), do.sum(0)
        dpre = _gelu_backward(do.mm(wo), pre, approximate=plan.approximate)
        dwi, dbi = dpre.t().mm(y), dpre.sum(0)
        # LN1's backward: the gradient of its scaled input a (lambda_1 * keep1 * the sum's gradient),
        # its parameters', lambda_1's (reduced in the kernel), the sum's (dy added in) and, where a
        # is the dense layer's output (no dropout), a's column sums: bd's gradient.
        norm1 = launches.norm(dpre.mm(wi), a, w1, b1, mean1, rstd1, x2, dy, None, l1, None, 0.0, keep1)
        da, dw1, db1, dl1, dh = norm1[:5]
        if mask1 is not None:
            da = _native_dropout_backward(da, mask1, plan.dropout_scale)
        dwd = da.t().mm(out.view(b * n, c))
        dbd = da.sum(0) if len(norm1) == 5 else norm1[5]
        dcontext = da.mm(wd).view(b, n, heads, d)
        if plan.nested is None:
            attention_backward = launches.attention(torch.are_deterministic_algorithms_enabled(), dcontext, q, k, v,
                                                    out, lse, table, index, seed, plan)  # fmt: skip
            dqkv, _, _, dtable, _ = attention_backward(dcontext, q, k, v, out, lse, table, index, None, None, seed)
            dqkv = dqkv.view(b * n, 3 * c)
        else:
            dqkv, dtable = nested_attention.attention_backward(ctx, dcontext)
        dwq, dwk, dwv = dqkv.t().mm(normed).view(3, c, c).unbind(0)
        dbq, dbk, dbv = dqkv.sum(0).view(3, c).unbind(0)
        dx, dw0, db0 = _native_layer_norm_backward(dqkv.mm(wqkv), x2, (c,), mean0, rstd0, w0, b0, (True, True, True))
        dx = dx.add_(dh).view(b, n, c)
        dbk = None if plan.zero_bias is not None else dbk
        return (
            None, dx, dtable, None, dw0, db0, dwq, dbq, dwk, dbk, dwv, dbv, dwd, dbd, dw1, db1, dwi, dbi, dwo, dbo,
            dl1, dl2,
        )  # fmt: skip


class _BackwardLaunches:
    """The backward's Triton launches for a plan's layout, made at its first backward (every
    gradient they read has a layout the plan fixes: the incoming one is made contiguous)."""

    __slots__ = ("_attention", "norm")

    def __init__(self, dy, x2, a, w1, b1, l1, plan):
        from d2v_kernels.kernels._row_norm import backward_launch

        # dy stands in for each gradient: all are contiguous and aligned, of the output's shape.
        # Without dropout, the kernel's da (drop path's factor applied) is the dense layer's output
        # gradient: the kernel also sums its columns (bd's gradient). With it, da goes through
        # dropout's backward after the kernel.
        sum_dx = plan.hidden_dropout == 0.0
        self.norm = backward_launch(
            dy, a, -1, w1, b1, None, x2, dy, None, l1, sum_dx=sum_dx, row_scale=plan.row_scale_template
        )
        self._attention = {}

    def attention(self, deterministic: bool, dcontext, q, k, v, out, lse, table, index, seed, plan):
        """The attention backward's launch (it depends on the deterministic-algorithms flag)."""
        launch = self._attention.get(deterministic)
        if launch is None:
            from d2v_kernels.kernels.attention import backward_launch

            launch = self._attention[deterministic] = backward_launch(
                dcontext, q, k, v, out, lse, table, index, None, None, seed, False, plan.attention_dropout, plan.scale,
                plan.table_grad, False, deterministic, packed=True,
            )  # fmt: skip
        return launch


class _Plan:
    """What one input layout fixes: the Triton launches (attention forward with its log-sum-exp,
    the add + LayerNorm forward with its sum; the backward's from the first backward on) and the
    layer's scalars."""

    __slots__ = (
        "approximate", "attention", "attention_dropout", "backward_launches", "drop_path", "dropout_scale", "eps0",
        "eps1", "heads", "hidden_dropout", "keep", "nested", "norm", "row_scale_template", "scale", "table_grad",
        "zero_bias",
    )  # fmt: skip

    def __init__(self, x, table, index, params, heads, attention_dropout, hidden_dropout, drop_path, scale, eps,
                 approximate, nested):  # fmt: skip
        from d2v_kernels.kernels import add_layer_norm as norm_kernels
        from d2v_kernels.kernels.attention import forward_launch

        b, n, c = x.shape
        q = x.new_empty((b, n, 3, heads, c // heads)).unbind(2)[0]  # the layout of the QKV GEMM's views
        rows = x.view(b * n, c)
        # nested: another attention backend's function, its graph recorded inside the node
        # (``_nested_attention``), or None for the Triton kernels' launches.
        self.nested = nested
        self.attention = None
        if nested is None:
            self.attention = forward_launch(q, q, q, table, index, None, None, False, attention_dropout > 0.0)
        # Drop path's per-sample factor (B, 1, 1) is the add + LayerNorm's row scale: its layout.
        self.row_scale_template = x.new_empty((b, 1, 1)) if drop_path > 0.0 else None
        self.norm = norm_kernels.add_layer_norm_training_launch(
            rows, rows, params[10], params[11], True, params[16], row_scale=self.row_scale_template
        )
        self.backward_launches = None
        self.zero_bias = x.new_zeros(c) if params[5] is None else None
        self.table_grad = table is not None and table.requires_grad
        self.heads, self.scale, (self.eps0, self.eps1), self.approximate = heads, scale, eps, approximate
        self.attention_dropout, self.hidden_dropout, self.drop_path = attention_dropout, hidden_dropout, drop_path
        self.dropout_scale = 1.0 / (1.0 - hidden_dropout)
        self.keep = 1.0 - drop_path

    def sample_scale(self, x):
        """Drop path's per-sample factor (B, 1, 1), 0 or 1 / keep: transformers' draw, in its order."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return torch.rand(shape, dtype=x.dtype, device=x.device).add_(self.keep).floor_().div_(self.keep)


_PLANS = plan_cache()


def pre_ln_layer_training(
    hidden_states,
    bias_table,
    bias_index,
    params,
    *,
    heads,
    attention_dropout,
    hidden_dropout,
    drop_path,
    scale,
    eps,
    approximate,
):
    """The layer's output (B, N, C) through :class:`PreLnLayerFunction`, or None where this path
    does not apply (see the module docstring; the caller then runs the layer op by op).

    bias_table: (R, H) with bias_index: (N, N), the relative position bias, or both None.
    params: (layernorm_before weight, bias, query weight, bias, key weight, bias or None, value
    weight, bias, attention output dense weight, bias, layernorm_after weight, bias, intermediate
    weight, bias, output weight, bias, lambda_1 or None, lambda_2 or None). eps: the two
    LayerNorms'. approximate: the GELU's (``"none"``, ``"tanh"``). attention_dropout,
    hidden_dropout, drop_path: the probabilities in force (0 out of training).

    Without autograd recording it runs the same forward where a probability is nonzero (no node):
    a reentrant checkpoint's first pass then draws what its recomputation with autograd draws."""
    if not (torch.is_grad_enabled() or attention_dropout or hidden_dropout or drop_path) or not plans_enabled():
        return None
    if torch.is_autocast_enabled(hidden_states.device.type):
        return None
    key = layout_key(hidden_states, bias_table, bias_index, *params)
    if key is None:
        return None
    key = (
        key, attention_op._index_version(bias_index), heads, attention_dropout.__class__, attention_dropout,
        hidden_dropout.__class__, hidden_dropout, drop_path.__class__, drop_path, scale.__class__, scale, eps,
        approximate, dispatch.forced_token(),
    )  # fmt: skip
    plan = lookup(_PLANS, key)
    if plan is None:
        made = _make_plan(
            hidden_states, bias_table, bias_index, params, heads, attention_dropout, hidden_dropout, drop_path, scale,
            eps, approximate,
        )  # fmt: skip
        plan = store(_PLANS, key, made, hidden_states.device)
    return plan(hidden_states, bias_table, bias_index, params)


def _not_taken(x, table, index, params):
    return None


def _check_probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def _make_plan(x, table, index, params, heads, attention_dropout, hidden_dropout, drop_path, scale, eps, approximate):
    """Validate and pick; the callable that runs this layout (returning None where not taken)."""
    if len(params) != 18:
        raise ValueError(f"params must hold the layer's 18 tensors (or None where optional), got {len(params)}")
    if any(p is None for i, p in enumerate(params) if i not in _OPTIONAL):
        return _not_taken
    check_tensor("hidden_states", x, ndim=3)
    for i, p in enumerate(params):
        if p is not None:
            check_tensor(f"params[{i}]", p)
    if not isinstance(eps, tuple) or len(eps) != 2:
        raise ValueError(f"eps must be a pair (layernorm_before's, layernorm_after's), got {eps!r}")
    eps = tuple(check_eps(e) for e in eps)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    hidden_dropout = _check_probability("hidden_dropout", hidden_dropout)
    drop_path = _check_probability("drop_path", drop_path)
    b, n, c = x.shape
    inner = params[12].shape[0]
    # Another architecture (e.g. heads narrower than the hidden size) runs op by op.
    shapes = (
        (c,), (c,), (c, c), (c,), (c, c), (c,), (c, c), (c,), (c, c), (c,), (c,), (c,), (inner, c), (inner,),
        (c, inner), (c,), (c,), (c,),
    )  # fmt: skip
    tensors = (x, table, index, *params)
    taken = (
        all(p is None or p.shape == shape for p, shape in zip(params, shapes))
        and x.numel() > 0
        and c % heads == 0
        and x.is_contiguous()
        and all(p.dtype == x.dtype and p.device == x.device for p in (table, *params) if p is not None)
        and any(t.requires_grad for t in tensors if t is not None)
        and runs_eagerly(tensors)
    )
    if taken:
        # The stand-in for q requires a gradient, as the layer's q does (dispatch's rule reads it).
        q = x.new_empty((b, n, 3, heads, c // heads)).unbind(2)[0].requires_grad_()
        device = attention_op._validate(q, q, q, table, index, None, None, False, attention_dropout, scale)
        attention = dispatch.select("attention", device, q, q, q, bias_table=table, bias_index=index,
                                    dropout_p=attention_dropout, scale=scale)  # fmt: skip
        rows = x.view(b * n, c)
        norm = dispatch.select("add_layer_norm", device, rows, rows, params[10], params[11], eps=eps[1],
                               return_sum=True, x_scale=params[16])  # fmt: skip
        taken = attention.backend in _ATTENTION_BACKENDS and norm.run is add_layer_norm_op._add_layer_norm_triton
    if not taken:
        return _not_taken
    nested = None if attention.run is attention_op.attention_triton else attention.run
    plan = _Plan(
        x, table, index, params, heads, float(attention_dropout), hidden_dropout, drop_path, float(scale), eps,
        approximate, nested,
    )  # fmt: skip
    apply, record, attention_backend = direct_apply(PreLnLayerFunction), recorder(), attention.backend

    def run(x, table, index, params):
        record("attention", attention_backend)
        record("add_layer_norm", "triton")
        if torch.is_grad_enabled():
            return apply(plan, x, table, index, *params)
        return PreLnLayerFunction.forward(UNRECORDED, plan, x, table, index, *params)

    return run
