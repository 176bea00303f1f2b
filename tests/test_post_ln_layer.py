"""The text and audio layers' training forward as one autograd node
(d2v_kernels/ops/post_ln_layer_op.py): taken where the layer runs the Triton kernels with autograd
on, gradients equal transformers', and its dropout masks are the same in the forward and the
backward. And the GELU + activation dropout kernels it runs for audio
(d2v_kernels/kernels/gelu_dropout.py) against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import d2v_kernels
from d2v_kernels.testing import build_pair, graph_node_names, inputs_for, reentrant_checkpoint_runs

NODE = "PostLnLayerFunctionBackward"


@pytest.mark.parametrize("class_name", ["Data2VecTextForSequenceClassification", "Data2VecAudioForCTC"])
def test_training_forward_is_one_node_a_layer_where_triton_runs(class_name):
    """Where tests/test_models.py's train-triton cases (dropout 0) check gradients against
    transformers' this path runs, one node a layer."""
    _, fused, config = build_pair(class_name)
    inputs = inputs_for(class_name, config)
    with d2v_kernels.use_backend("triton"):
        fused.train()
        assert graph_node_names(fused(**inputs).loss).count(NODE) == config.num_hidden_layers


def _modules(layer):
    """(q, k, v, attention output dense, its LayerNorm, intermediate dense, output dense, its
    LayerNorm, heads, head dim, scaling, attention dropout p, hidden dropout p) of a text or an
    audio layer."""
    if hasattr(layer, "feed_forward"):  # audio
        a, ff = layer.attention, layer.feed_forward
        return (a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.layer_norm, ff.intermediate_dense, ff.output_dense,
                layer.final_layer_norm, a.num_heads, a.head_dim, a.scaling, a.dropout, layer.dropout.p)  # fmt: skip
    s, out_module, ffn_out = layer.attention.self, layer.attention.output, layer.output
    return (s.query, s.key, s.value, out_module.dense, out_module.LayerNorm, layer.intermediate.dense, ffn_out.dense,
            ffn_out.LayerNorm, s.num_attention_heads, s.attention_head_size, s.scaling, s.dropout.p,
            out_module.dropout.p)  # fmt: skip


def _recomputed(layer, x, key_padding_mask, seed, seed1, seed2, seed3=None, p_activation=0.0):
    """The layer in plain PyTorch with the given dropout draws: the attention kernel's keep mask
    for ``seed``, the add + LayerNorm kernels' for ``seed1`` and ``seed2`` (and the GELU + dropout
    kernel's for ``seed3``)."""
    from d2v_kernels.kernels.add_layer_norm import add_layer_norm_dropout_keep
    from d2v_kernels.kernels.attention import dropout_keep_mask
    from d2v_kernels.kernels.gelu_dropout import gelu_dropout_keep

    query, key, value, dense, norm1, intermediate, output, norm2, h, d, scaling, p_attention, p_hidden = _modules(layer)
    b, n, c = x.shape
    q, k, v = (lin(x).view(b, n, h, d).transpose(1, 2) for lin in (query, key, value))
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~key_padding_mask.bool()[:, None, None, :], -1e30)
    keep = dropout_keep_mask(seed, b, h, n, n, p_attention)
    probs = torch.softmax(scores, -1) * keep / (1 - p_attention)
    context = (probs @ v).transpose(1, 2).reshape(b, n, c)
    a = dense(context) * add_layer_norm_dropout_keep(seed1, (b * n, c), p_hidden).view(b, n, c) / (1 - p_hidden)
    y1 = F.layer_norm(a + x, (c,), norm1.weight, norm1.bias, norm1.eps)
    g = F.gelu(intermediate(y1))
    if seed3 is not None:
        g = g * gelu_dropout_keep(seed3, (b * n, g.shape[-1]), p_activation).view(g.shape) / (1 - p_activation)
    o = output(g) * add_layer_norm_dropout_keep(seed2, (b * n, c), p_hidden).view(b, n, c) / (1 - p_hidden)
    return F.layer_norm(o + y1, (c,), norm2.weight, norm2.bias, norm2.eps)


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_dropout_masks_agree_between_forward_and_backward(modality):
    if modality == "text":
        _, fused, _ = build_pair("Data2VecTextModel", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)
        layer, p_activation = fused.encoder.layer[0], 0.0
    else:
        _, fused, _ = build_pair(
            "Data2VecAudioModel", hidden_dropout=0.3, attention_dropout=0.2, activation_dropout=0.25
        )
        layer, p_activation = fused.encoder.layers[0], 0.25
    fused.train()
    gen = torch.Generator().manual_seed(2)
    c = (
        layer.final_layer_norm.normalized_shape[0]
        if modality == "audio"
        else layer.output.LayerNorm.normalized_shape[0]
    )
    x = torch.randn(2, 7, c, generator=gen, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    weight = torch.randn(2, 7, c, generator=gen)
    with d2v_kernels.use_backend("triton"):
        out = layer(x, attention_mask=mask)
        out = out[0] if isinstance(out, tuple) else out
        assert type(out.grad_fn).__name__ == NODE
        # the order of the tensors PostLnLayerFunction.forward made (keep_for_backward)
        made = out.grad_fn.made
        seed, seed1, seed3, seed2 = made[0], made[8], made[14], made[16]
        assert (seed3 is None) == (modality == "text")  # text has no activation dropout
        drawn = [t for t in (seed, seed1, seed2, seed3) if t is not None]
        assert len({tuple(t.tolist()) for t in drawn}) == len(drawn)  # one draw each
        params = [p for p in layer.parameters()]
        grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    expected = _recomputed(layer, x, mask, seed, seed1, seed2, seed3, p_activation)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    expected_grads = torch.autograd.grad((expected * weight).sum(), [x, *params])
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------
# The GELU + activation dropout kernels
# --------------------------------------------------------------------------------------------


def _gelu_dropout_grads(h, dg, keep, p, approximate):
    """(dropout(GELU(h)), h's gradient for dg) in h's dtype, through eager PyTorch."""
    h = h.detach().requires_grad_()
    g = F.gelu(h, approximate=approximate) * keep / (1 - p)
    (dh,) = torch.autograd.grad(g, h, dg)
    return g.detach(), dh


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the tanh's exp(2u) at large |h|: on purpose
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gelu_dropout_kernels_equal_a_float64_reference_on_their_mask(dtype, approximate):
    from d2v_kernels.kernels.gelu_dropout import gelu_dropout_backward, gelu_dropout_forward, gelu_dropout_keep

    p, gen = 0.3, torch.Generator().manual_seed(3)
    h = (torch.randn(37, 75, generator=gen) * 3).to(dtype)
    dg = torch.randn(37, 75, generator=gen).to(dtype)
    seed = torch.tensor([12345, 678], dtype=torch.int64)
    g = gelu_dropout_forward(h, seed, p, approximate)
    dh = gelu_dropout_backward(dg, h, seed, p, approximate)
    assert g.dtype == dh.dtype == dtype
    keep = gelu_dropout_keep(seed, h.shape, p)
    assert 0 < keep.sum() < keep.numel()
    assert not g[~keep].any() and not dh[~keep].any()  # the dropped elements are zeros
    want = _gelu_dropout_grads(h.double(), dg.double(), keep, p, approximate)
    if dtype == torch.float32:
        for got, ref in zip((g, dh), want):
            torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
        return
    eager = _gelu_dropout_grads(h, dg, keep, p, approximate)
    for name, got, ref, own in zip(("g", "dh"), (g, dh), want, eager):
        error, bound = (got.double() - ref).abs().max(), 2 * (own.double() - ref).abs().max() + 1e-3
        assert error <= bound, f"{name}: {error} > 2x eager bf16's error + 1e-3 ({bound})"


def test_gelu_dropout_mask_is_the_seeds_and_keeps_one_minus_p():
    from d2v_kernels.kernels.gelu_dropout import gelu_dropout_keep

    p, seed = 0.3, torch.tensor([7, 11], dtype=torch.int64)
    keep = gelu_dropout_keep(seed, (200, 300), p)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)  # 5 sigma
    assert torch.equal(keep, gelu_dropout_keep(seed.clone(), (200, 300), p))  # same seed, same mask
    assert not torch.equal(keep, gelu_dropout_keep(torch.tensor([7, 12]), (200, 300), p))
    # No structure along rows or columns: each row's and each column's keep fraction near 1 - p.
    for axis, count in ((1, 300), (0, 200)):
        fractions = keep.float().mean(axis)
        assert (fractions - (1 - p)).abs().max() < 6 * ((p * (1 - p) / count) ** 0.5)
        assert fractions.std() > 0.3 * ((p * (1 - p) / count) ** 0.5)


def _encoder_layer(modality, hidden, attention, activation=0.0):
    """(the first encoder layer of a fused text or audio model with these dropout probabilities,
    its width)."""
    if modality == "text":
        _, fused, _ = build_pair(
            "Data2VecTextModel", hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention
        )
        return fused.encoder.layer[0], fused.config.hidden_size
    _, fused, _ = build_pair(
        "Data2VecAudioModel", hidden_dropout=hidden, attention_dropout=attention, activation_dropout=activation
    )
    return fused.encoder.layers[0], fused.config.hidden_size


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_sdpa_attention_runs_inside_the_node_and_equals_the_op_by_op_path(modality, monkeypatch):
    """Where the measured rule picks sdpa for the attention (half precision on CUDA; forced here)
    the layer is still one node, the attention's own autograd graph recorded inside it: output
    and every gradient equal the op-by-op path on the same backends, attention dropout on (both
    draw it from torch's generator in the same order: the hidden dropouts are off), and the inner
    graph is released by a backward that does not keep its graph, kept by one that does."""
    layer, c = _encoder_layer(modality, hidden=0.0, attention=0.3)
    layer.train()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, c, generator=gen, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    weight = torch.randn(2, 7, c, generator=gen)
    params = [x, *layer.parameters()]

    def run(one_node: bool):
        torch.manual_seed(11)
        with d2v_kernels.use_backend(attention="sdpa", add_layer_norm="triton"), d2v_kernels.record_dispatch() as calls:
            if not one_node:  # the op-by-op path: the layer's caller finds the node declined
                monkeypatch.setattr(f"d2v_kernels.models.{modality}.post_ln_layer_training", lambda *a, **k: None)
            out = layer(x, attention_mask=mask)
        out = out[0] if isinstance(out, tuple) else out
        return out, calls

    out, calls = run(True)
    assert type(out.grad_fn).__name__ == NODE and calls[("attention", "sdpa")] == 1
    expected, expected_calls = run(False)
    assert type(expected.grad_fn).__name__ != NODE and expected_calls[("attention", "sdpa")] == 1
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    kept = torch.autograd.grad((out * weight).sum(), params, retain_graph=True)
    assert out.grad_fn.nested_attention is not None
    again = torch.autograd.grad((out * weight).sum(), params)
    assert out.grad_fn.nested_attention is None
    want = torch.autograd.grad((expected * weight).sum(), params)
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, got, second, ref in zip(names, kept, again, want):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(second, got, atol=0, rtol=0, msg=lambda m, n=name: f"{n} (second backward): {m}")


def _text_layer_call():
    """(the fused text layer in train mode with every dropout on, its input, a call returning the
    layer's output under the Triton backend)."""
    _, fused, _ = build_pair("Data2VecTextModel", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)
    layer = fused.encoder.layer[0]
    layer.train()
    c = layer.output.LayerNorm.normalized_shape[0]
    x = torch.randn(2, 5, c, generator=torch.Generator().manual_seed(3), requires_grad=True)

    def call():
        with d2v_kernels.use_backend("triton"):
            out = layer(x, attention_mask=torch.ones(2, 5, dtype=torch.long))
        out = out[0] if isinstance(out, tuple) else out
        assert type(out.grad_fn).__name__ == NODE
        return out

    return layer, x, call


def test_the_node_lets_its_tensors_go_after_a_backward_and_keeps_them_for_retain_graph():
    """The tensors the forward made are kept on the context, not as SavedVariables: a backward
    drops them as autograd drops its saved tensors, one with retain_graph keeps them for the next
    (same gradients), and a second backward through a freed graph raises autograd's error."""
    _, x, call = _text_layer_call()
    out = call()
    first = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    assert out.grad_fn.made is not None
    again = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert out.grad_fn.made is None
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out.sum(), x)


def test_the_node_reports_an_input_modified_in_place_and_gives_saved_tensor_hooks_every_tensor():
    """The layer's inputs and parameters still go through save_for_backward (autograd's in-place
    check holds), and under saved-tensor hooks the tensors the forward made go through them too."""
    layer, x, call = _text_layer_call()
    out = call()
    with torch.no_grad():
        layer.output.dense.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = call()
    # 9 inputs (x, mask, 7 weights) and the 19 tensors made (None for an absent dropout or
    # activation-dropout seed is not packed)
    assert isinstance(out.grad_fn.made, int)
    assert len(packed) >= 9 + 15, len(packed)
    grads = torch.autograd.grad(out.sum(), x)[0]
    assert torch.isfinite(grads).all()


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_a_reentrant_checkpoint_draws_the_dropouts_of_the_unchecked_layer(modality):
    """A reentrant checkpoint runs the layer without autograd, then again with it in the backward,
    the random state restored: both runs draw the same dropouts (the same forward, unrecorded the
    first time), so output and gradients equal the unchecked layer's, as in transformers, not a
    gradient of other masks than the output's."""
    layer, c = _encoder_layer(modality, hidden=0.3, attention=0.2, activation=0.25)
    layer.train()
    x = torch.randn(2, 7, c, generator=torch.Generator().manual_seed(4), requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0

    def call(h):
        out = layer(h, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    plain, checkpointed = reentrant_checkpoint_runs(layer, x, call)
    for i, (got, want) in enumerate(zip(checkpointed, plain)):
        assert torch.equal(got, want), i


def _torch_sums(loss, inputs) -> int:
    """How many ``aten::sum`` calls the backward of ``loss`` runs (each a launch on a GPU)."""
    with torch.profiler.profile() as profile:
        torch.autograd.grad(loss, inputs)
    return sum(e.name == "aten::sum" for e in profile.events())


@pytest.mark.parametrize("modality", ["text", "audio"])
@pytest.mark.parametrize("hidden", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_dense_bias_gradients_come_out_of_the_add_layer_norm_kernels(modality, hidden):
    """The attention output dense's and the output dense's bias gradients are the column sums of
    the add + LayerNorm backward kernels' x gradient, reduced in those kernels: the backward sums
    only the intermediate dense's and the QKV's gradients with torch. (Their values are checked
    against transformers' in tests/test_models.py, and on dropout masks above.)"""
    layer, c = _encoder_layer(modality, hidden=hidden, attention=0.0)
    layer.train()
    x = torch.randn(2, 7, c, generator=torch.Generator().manual_seed(6), requires_grad=True)
    with d2v_kernels.use_backend("triton"):
        out = layer(x, attention_mask=torch.ones(2, 7, dtype=torch.long))
        out = out[0] if isinstance(out, tuple) else out
        assert type(out.grad_fn).__name__ == NODE
        assert _torch_sums((out * out).sum(), [x, *layer.parameters()]) == 2
