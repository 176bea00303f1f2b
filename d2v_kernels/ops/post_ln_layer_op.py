"""A post-LN encoder layer's training forward (Data2VecText's and Data2VecAudio's) as one autograd
node, eager only:

    qkv = x Wqkv^T + bqkv;  a = LN1(dropout(attention(q, k, v) Wd^T + bd) + x)
    y = LN2(dropout(dropout'(act(a Wi^T + bi)) Wo^T + bo) + a)

(dropout' is audio's activation dropout; text has none.)

The same computation as the layer op by op (``F.linear``, ``ops.attention``, ``F.dropout``,
``ops.add_layer_norm``), with the same kernels, but those record about thirty autograd nodes a
layer, three of them Python ``autograd.Function``s (each costs its ``apply`` and a Python backward
call, tens of microseconds of host time). Here one Function runs the GEMMs, the attention and the
two add + LayerNorms with autograd off, and its backward computes every gradient itself: each
linear's input, weight and bias gradients with ``mm`` / ``addmm`` / ``sum`` (the bias gradients
of the two dense layers that feed an add + LayerNorm come out of its backward kernels, reduced with
the LayerNorm's own), the activation's backward, the Triton backwards of the add + LayerNorms and
of the attention. The hidden dropouts run inside the add + LayerNorm kernels and the attention's
inside its kernel, and audio's activation dropout with its GELU in one Triton kernel each way
(``kernels/gelu_dropout``), each from a Philox seed (the four drawn at once a call) and redrawn in
the backward, so no mask is kept. Without an activation dropout (text; audio with p = 0) the GELU
and its backward are aten's ``gelu`` / ``gelu_backward``. The dropped elements differ from
transformers' for the same ``torch.manual_seed``, as with the ops alone; the distribution is the
same.

Only where the layer would run those same kernels: dispatch picks the Triton backend for the add +
LayerNorm, and for the attention Triton or sdpa (the measured rule's pick in half precision on
CUDA), whose autograd graph is then recorded inside the node (``_nested_attention``); so
``use_backend``, the measured rule and the environment choose exactly as for the ops alone. On
plain tensors, not traced, not under
autocast, with autograd recording. Anything else returns None and the caller runs the layer op by
op. Validation, like the ops', happens once per input layout (the plan key holds every tensor's
shape, strides, dtype, device, alignment and ``requires_grad``).
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

__all__ = ["post_ln_layer_training"]

# The overloads themselves: an OpOverloadPacket call resolves one on every call.
_gelu_backward = torch.ops.aten.gelu_backward.default

_NOT_TAKEN = object()  # a plan for a layout this path does not take


class PostLnLayerFunction(torch.autograd.Function):
    """The layer's forward (``plan``: a :class:`_Plan`) and every gradient of its 16 parameters and
    its input in one backward."""

    @staticmethod
    def forward(ctx, plan, x, mask, wq, bq, wk, bk, wv, bv, wd, bd, w1, b1, wi, bi, wo, bo, w2, b2):
        b, n, c = x.shape
        x2 = x.view(b * n, c)
        wqkv, bqkv = torch.cat((wq, wk, wv)), torch.cat((bq, bk, bv))
        qkv = F.linear(x2, wqkv, bqkv)
        # The Philox seeds of the attention's dropout, of the two hidden dropouts (fused into the
        # add + LayerNorms) and of the activation dropout (fused with the GELU), in that order, one
        # row of the forward's block (dropout_seeds): their masks are drawn again in the backward,
        # never stored.
        seed = seed1 = seed2 = seed3 = None
        if plan.seeds:
            seeds = iter(layer_seeds(plan.seeds, x.device, ctx is not UNRECORDED))
            seed = next(seeds) if plan.attention_seed else None
            seed1, seed2 = (next(seeds), next(seeds)) if plan.hidden_dropout > 0.0 else (None, None)
            seed3 = next(seeds) if plan.gelu_dropout is not None else None
        if plan.nested is None:
            q, k, v = qkv.view(b, n, 3, plan.heads, c // plan.heads).unbind(2)
            out, lse = plan.attention(q, k, v, None, None, None, mask, seed, plan.scale, plan.attention_dropout)
        else:  # the attention's graph keeps what its backward needs
            q = k = v = lse = None
            out = nested_attention.attention_forward(
                ctx, plan.nested, qkv, b, plan.heads, mask=mask, dropout_p=plan.attention_dropout, scale=plan.scale
            )
        context = out.view(b * n, c)
        a = F.linear(context, wd, bd)
        p = plan.hidden_dropout
        y1, _, mean1, rstd1 = plan.norm1(a, w1, b1, plan.eps1, x2, None, seed=seed1, dropout_p=p)
        h = F.linear(y1, wi, bi)
        if plan.gelu_dropout is None:
            g = torch._C._nn.gelu(h, approximate=plan.approximate)
        else:
            g = plan.gelu_dropout(h, seed3, plan.activation_dropout)
        o = F.linear(g, wo, bo)
        y2, _, mean2, rstd2 = plan.norm2(o, w2, b2, plan.eps2, y1, None, seed=seed2, dropout_p=p)
        keep_for_backward(
            ctx,
            (x2, mask, wd, w1, b1, wi, wo, w2, b2),
            (seed, wqkv, q, k, v, out, lse, a, seed1, mean1, rstd1, y1, h, g, seed3, o, seed2, mean2, rstd2),
        )
        ctx.plan = plan
        return y2.view(b, n, c)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x2, mask, wd, w1, b1, wi, wo, w2, b2), made = kept_for_backward(ctx)
        seed, wqkv, q, k, v, out, lse, a, seed1, mean1, rstd1, y1, h, g, seed3, o, seed2, mean2, rstd2 = made
        plan = ctx.plan
        p = plan.hidden_dropout
        b, n, heads, d = out.shape
        c = heads * d
        dy = launch_rows(dy, b * n, c)
        launches = plan.backward_launches
        if launches is None:
            launches = plan.backward_launches = _BackwardLaunches(dy, x2, a, w1, b1, y1, o, w2, b2, h, plan)
        # Each add + LayerNorm backward gives x's gradient through its dropout, the sum's (the
        # residual's: one tensor when there is no dropout) and the column sums of x's (the bias
        # gradient of the dense layer whose output x is).
        do, dw2, db2, _, dresidual, dbo = launches.norm2(dy, o, w2, b2, mean2, rstd2, y1, None, None, None,
                                                         seed=seed2, dropout_p=p)  # fmt: skip
        dwo = do.t().mm(g)
        dg = do.mm(wo)
        if launches.gelu_dropout is None:
            dh = _gelu_backward(dg, h, approximate=plan.approximate)
        else:  # written over dg
            dh = launches.gelu_dropout(dg, h, seed3, plan.activation_dropout)
        dwi, dbi = dh.t().mm(y1), dh.sum(0)
        da, dw1, db1, _, dresidual, dbd = launches.norm1(torch.addmm(dresidual, dh, wi), a, w1, b1, mean1, rstd1, x2,
                                                         None, None, None, seed=seed1, dropout_p=p)  # fmt: skip
        dwd = da.t().mm(out.view(b * n, c))
        dcontext = da.mm(wd).view(b, n, heads, d)
        if plan.nested is not None:
            dqkv, _ = nested_attention.attention_backward(ctx, dcontext)
        else:
            attention_backward = launches.attention(torch.are_deterministic_algorithms_enabled(), dcontext, q, k, v,
                                                    out, lse, mask, seed, plan)  # fmt: skip
            dqkv = attention_backward(dcontext, q, k, v, out, lse, None, None, None, mask, seed)[0].view(b * n, 3 * c)
        dx = torch.addmm(dresidual, dqkv, wqkv).view(b, n, c)
        dwq, dwk, dwv = dqkv.t().mm(x2).view(3, c, c).unbind(0)
        dbq, dbk, dbv = dqkv.sum(0).view(3, c).unbind(0)
        return None, dx, None, dwq, dbq, dwk, dbk, dwv, dbv, dwd, dbd, dw1, db1, dwi, dbi, dwo, dbo, dw2, db2


class _BackwardLaunches:
    """The backward's Triton launches for a plan's layout, made at its first backward (every
    gradient they read has a layout the plan fixes: the incoming one is made contiguous)."""

    __slots__ = ("_attention", "gelu_dropout", "norm1", "norm2")

    def __init__(self, dy, x2, a, w1, b1, y1, o, w2, b2, h, plan):
        from d2v_kernels.kernels.add_layer_norm import add_layer_norm_backward_launch
        from d2v_kernels.kernels.gelu_dropout import gelu_dropout_backward_launch

        # dy stands in for each gradient: all are contiguous and aligned, of the output's shape.
        dropout = plan.hidden_dropout > 0.0
        self.norm2 = add_layer_norm_backward_launch(dy, o, y1, w2, b2, dropout=dropout, sum_dx=True)
        self.norm1 = add_layer_norm_backward_launch(dy, a, x2, w1, b1, dropout=dropout, sum_dx=True)
        # h stands in for the GELU's gradient (an mm's output of h's shape), which dh overwrites.
        self.gelu_dropout = None
        if plan.gelu_dropout is not None:
            self.gelu_dropout = gelu_dropout_backward_launch(h, h, plan.approximate, in_place=True)
        self._attention = {}

    def attention(self, deterministic: bool, dcontext, q, k, v, out, lse, mask, seed, plan):
        """The attention backward's launch (it depends on the deterministic-algorithms flag)."""
        launch = self._attention.get(deterministic)
        if launch is None:
            from d2v_kernels.kernels.attention import backward_launch

            launch = self._attention[deterministic] = backward_launch(
                dcontext, q, k, v, out, lse, None, None, None, mask, seed, False, plan.attention_dropout, plan.scale,
                False, False, deterministic, packed=True,
            )  # fmt: skip
        return launch


class _Plan:
    """What one input layout fixes: the Triton launches (attention forward with its log-sum-exp, the
    two add + LayerNorm forwards, the GELU + activation dropout's where p > 0; the backward's from
    the first backward on) and the layer's scalars."""

    __slots__ = (
        "activation_dropout", "approximate", "attention", "attention_dropout", "attention_seed", "backward_launches",
        "eps1", "eps2", "gelu_dropout", "heads", "hidden_dropout", "nested", "norm1", "norm2", "scale", "seeds",
    )  # fmt: skip

    def __init__(
        self, x, mask, params, heads, attention_dropout, hidden_dropout, activation_dropout, scale, eps, approximate,
        nested,
    ):  # fmt: skip
        from d2v_kernels.kernels import add_layer_norm as norm_kernels
        from d2v_kernels.kernels.attention import forward_launch
        from d2v_kernels.kernels.gelu_dropout import gelu_dropout_forward_launch

        b, n, c = x.shape
        q = x.new_empty((b, n, 3, heads, c // heads)).unbind(2)[0]  # the layout of the QKV GEMM's views
        rows = x.view(b * n, c)
        # nested: another attention backend's function, its graph recorded inside the node
        # (``_nested_attention``; it draws its dropout from torch's generator itself), or None for
        # the Triton kernels' launches (their dropout from a seed).
        self.nested, self.attention_seed = nested, attention_dropout > 0.0 and nested is None
        self.attention = None
        if nested is None:
            self.attention = forward_launch(q, q, q, None, None, None, mask, False, self.attention_seed)
        dropout = hidden_dropout > 0.0
        self.norm1 = norm_kernels.add_layer_norm_training_launch(
            rows, rows, params[8], params[9], False, dropout=dropout
        )
        self.norm2 = norm_kernels.add_layer_norm_training_launch(
            rows, rows, params[14], params[15], False, dropout=dropout
        )
        # h, the intermediate dense's output (an addmm's: contiguous and aligned).
        h = x.new_empty((b * n, params[10].shape[0]))
        self.gelu_dropout = gelu_dropout_forward_launch(h, approximate) if activation_dropout > 0.0 else None
        self.seeds = sum((self.attention_seed, 2 * dropout, self.gelu_dropout is not None))
        self.backward_launches = None
        self.heads, self.scale, (self.eps1, self.eps2), self.approximate = heads, scale, eps, approximate
        self.attention_dropout, self.hidden_dropout = attention_dropout, hidden_dropout
        self.activation_dropout = activation_dropout


_PLANS = plan_cache()


def post_ln_layer_training(
    hidden_states,
    key_padding_mask,
    params,
    *,
    heads,
    attention_dropout,
    hidden_dropout,
    scale,
    eps,
    approximate,
    activation_dropout=0.0,
):
    """The layer's output (B, N, C) through :class:`PostLnLayerFunction`, or None where this path
    does not apply (see the module docstring; the caller then runs the layer op by op).

    params: (query weight, bias, key weight, bias, value weight, bias, attention output dense weight,
    bias, its LayerNorm weight, bias, intermediate weight, bias, output weight, bias, its LayerNorm
    weight, bias). key_padding_mask: (B, N), nonzero attends, or None. eps: the two LayerNorms'.
    approximate: the GELU's (``"none"``, ``"tanh"``). attention_dropout, hidden_dropout (after the
    attention's output projection and after the feed-forward's), activation_dropout (after the
    activation): the probabilities in force (0 out of training).

    Without autograd recording it runs the same forward where a probability is nonzero (no node):
    a reentrant checkpoint's first pass then draws what its recomputation with autograd draws."""
    if (
        not (torch.is_grad_enabled() or attention_dropout or hidden_dropout or activation_dropout)
        or not plans_enabled()
    ):
        return None
    if torch.is_autocast_enabled(hidden_states.device.type):
        return None
    key = layout_key(hidden_states, key_padding_mask, *params)
    if key is None:
        return None
    key = (
        key, heads, attention_dropout.__class__, attention_dropout, hidden_dropout.__class__, hidden_dropout,
        activation_dropout.__class__, activation_dropout, scale.__class__, scale, eps, approximate,
        dispatch.forced_token(),
    )  # fmt: skip
    plan = lookup(_PLANS, key)
    if plan is None:
        made = _make_plan(
            hidden_states, key_padding_mask, params, heads, attention_dropout, hidden_dropout, activation_dropout,
            scale, eps, approximate,
        )  # fmt: skip
        plan = store(_PLANS, key, made, hidden_states.device)
    return plan(hidden_states, key_padding_mask, params)


def _not_taken(x, mask, params):
    return None


def _make_plan(x, mask, params, heads, attention_dropout, hidden_dropout, activation_dropout, scale, eps, approximate):
    """Validate and pick; the callable that runs this layout (returning None where not taken)."""
    if any(p is None for p in params):
        return _not_taken
    check_tensor("hidden_states", x, ndim=3)
    for i, p in enumerate(params):
        check_tensor(f"params[{i}]", p)
    eps = tuple(check_eps(e) for e in eps)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    for name, p in (("hidden_dropout", hidden_dropout), ("activation_dropout", activation_dropout)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p!r}")
    b, n, c = x.shape
    inner = params[10].shape[0]
    # Another architecture (e.g. heads narrower than the hidden size) runs op by op.
    shapes = ((c, c), (c,), (c, c), (c,), (c, c), (c,), (c, c), (c,), (c,), (c,), (inner, c), (inner,), (c, inner))
    tensors = (x, mask, *params)
    taken = (
        all(p.shape == shape for p, shape in zip(params, (*shapes, (c,), (c,), (c,))))
        and x.numel() > 0
        and c % heads == 0
        and x.is_contiguous()
        and all(p.dtype == x.dtype and p.device == x.device for p in params)
        and any(t.requires_grad for t in tensors if t is not None)
        and runs_eagerly(tensors)
    )
    if taken:
        q = x.new_empty((b, n, 3, heads, c // heads)).unbind(2)[0]
        device = attention_op._validate(q, q, q, None, None, None, mask, False, attention_dropout, scale)
        attention = dispatch.select("attention", device, q, q, q, key_padding_mask=mask, dropout_p=attention_dropout,
                                    scale=scale)  # fmt: skip
        rows = x.view(b * n, c)
        norms = [
            dispatch.select("add_layer_norm", device, rows, rows, params[i], params[i + 1], eps=e)
            for i, e in ((8, eps[0]), (14, eps[1]))
        ]
        taken = attention.run in (attention_op.attention_triton, attention_op.attention_sdpa) and all(
            norm.run is add_layer_norm_op._add_layer_norm_triton for norm in norms
        )
    if not taken:
        return _not_taken
    nested = None if attention.run is attention_op.attention_triton else attention.run
    plan = _Plan(
        x, mask, params, heads, attention_dropout, hidden_dropout, activation_dropout, scale, eps, approximate, nested
    )
    apply, record, attention_backend = direct_apply(PostLnLayerFunction), recorder(), attention.backend

    def run(x, mask, params):
        record("attention", attention_backend)
        record("add_layer_norm", "triton")
        record("add_layer_norm", "triton")
        if torch.is_grad_enabled():
            return apply(plan, x, mask, *params)
        return PostLnLayerFunction.forward(UNRECORDED, plan, x, mask, *params)

    return run
