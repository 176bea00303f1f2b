"""The text layer's training forward as one autograd node (d2v_kernels/ops/post_ln_layer_op.py):
taken where the layer runs the Triton kernels with autograd on, gradients equal transformers',
and its dropout masks are the same in the forward and the backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import d2v_kernels
from d2v_kernels.testing import build_pair, inputs_for

NODE = "PostLnLayerFunctionBackward"


def _nodes(output: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_text_training_forward_is_one_node_a_layer_where_triton_runs():
    """Where tests/test_models.py's train-triton text case (Data2VecTextForSequenceClassification,
    dropout 0) checks gradients against transformers' this path runs, one node a layer."""
    class_name = "Data2VecTextForSequenceClassification"
    _, fused, config = build_pair(class_name)
    inputs = inputs_for(class_name, config)
    with d2v_kernels.use_backend("triton"):
        fused.train()
        assert _nodes(fused(**inputs).loss).count(NODE) == config.num_hidden_layers


def _recomputed(layer, x, key_padding_mask, seed, mask1, mask2):
    """The layer in plain PyTorch with the given dropout draws: the attention kernel's keep mask
    for ``seed``, the hidden dropouts' masks."""
    from d2v_kernels.kernels.attention import dropout_keep_mask

    s, out_module, ffn_out = layer.attention.self, layer.attention.output, layer.output
    b, n, c = x.shape
    h, d = s.num_attention_heads, s.attention_head_size
    q, k, v = (lin(x).view(b, n, h, d).transpose(1, 2) for lin in (s.query, s.key, s.value))
    scores = (q @ k.transpose(-1, -2) * s.scaling).masked_fill(~key_padding_mask.bool()[:, None, None, :], -1e30)
    p_attention, p_hidden = s.dropout.p, out_module.dropout.p
    keep = dropout_keep_mask(seed, b, h, n, n, p_attention)
    probs = torch.softmax(scores, -1) * keep / (1 - p_attention)
    context = (probs @ v).transpose(1, 2).reshape(b, n, c)
    a = out_module.dense(context) * mask1.view(b, n, c) / (1 - p_hidden)
    y1 = F.layer_norm(a + x, (c,), out_module.LayerNorm.weight, out_module.LayerNorm.bias, out_module.LayerNorm.eps)
    o = ffn_out.dense(F.gelu(layer.intermediate.dense(y1))) * mask2.view(b, n, c) / (1 - p_hidden)
    return F.layer_norm(o + y1, (c,), ffn_out.LayerNorm.weight, ffn_out.LayerNorm.bias, ffn_out.LayerNorm.eps)


def test_dropout_masks_agree_between_forward_and_backward():
    _, fused, _ = build_pair("Data2VecTextModel", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)
    fused.train()
    layer = fused.encoder.layer[0]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 48, generator=gen, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    weight = torch.randn(2, 7, 48, generator=gen)
    with d2v_kernels.use_backend("triton"):
        out = layer(x, attention_mask=mask)
        assert type(out.grad_fn).__name__ == NODE
        # save_for_backward's order in PostLnLayerFunction.forward
        saved = out.grad_fn.saved_tensors
        seed, mask1, mask2 = saved[2], saved[11], saved[22]
        assert not mask1.all() and not mask2.all()  # both dropouts dropped something
        params = [p for p in layer.parameters()]
        grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    expected = _recomputed(layer, x, mask, seed, mask1, mask2)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    expected_grads = torch.autograd.grad((expected * weight).sum(), [x, *params])
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
