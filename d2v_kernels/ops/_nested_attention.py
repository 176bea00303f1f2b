"""An attention backend without a launch of ours (sdpa, eager) inside a whole-layer autograd node.

The layer ops (``post_ln_layer_op``, ``pre_ln_layer_op``) run a layer's forward with autograd off
and compute its gradients themselves, calling the Triton attention's forward and backward
launches. Where dispatch's measured rule picks another backend for the attention (sdpa's flash /
efficient / cuDNN kernels, or eager PyTorch), there is no launch to call: its forward runs with
autograd on from the QKV GEMM's output (and the bias table) as leaves, its graph kept on the
node's ``ctx``, and the node's backward takes their gradients through it with
``torch.autograd.grad``: one gradient for q, k and v together (the views' gradients land in one
tensor, no concatenation), and the table's.
"""

from __future__ import annotations

import torch

from d2v_kernels.ops._eager import backward_keeps_graph

__all__ = ["attention_forward", "attention_backward"]


def attention_forward(ctx, run, qkv, batch, heads, *, table=None, index=None, mask=None, dropout_p=0.0, scale=None):
    """``run(q, k, v, bias_table=..., bias_index=..., key_padding_mask=..., dropout_p=..., scale=...)``
    (an ``ops.attention`` backend) on the (B * N, 3C) QKV GEMM output ``qkv``, recorded for
    :func:`attention_backward`. Returns the context (B, N, H, d), contiguous."""
    qkv.requires_grad_()
    leaves = [qkv]
    if table is not None and table.requires_grad:
        table = table.detach().requires_grad_()
        leaves.append(table)
    with torch.enable_grad():
        q, k, v = qkv.view(batch, qkv.shape[0] // batch, 3, heads, -1).unbind(2)
        attended = run(
            q, k, v, bias_table=table, bias_index=index, key_padding_mask=mask, dropout_p=dropout_p, scale=scale
        )
    ctx.nested_attention = (attended, tuple(leaves))
    return attended.detach().contiguous()


def attention_backward(ctx, dcontext):
    """(dqkv (B * N, 3C), the table's gradient or None) through the graph :func:`attention_forward`
    kept; the graph's saved tensors are released with it unless this backward keeps its graph."""
    attended, leaves = ctx.nested_attention
    keep = backward_keeps_graph()
    grads = torch.autograd.grad(attended, leaves, dcontext, retain_graph=keep)
    if not keep:
        ctx.nested_attention = None
    return grads[0], (grads[1] if len(grads) > 1 else None)
