"""The vision layer's training forward as one autograd node (d2v_kernels/ops/pre_ln_layer_op.py):
taken where the layer runs the Triton kernels with autograd on, outputs and gradients equal
transformers' (drop path's per-sample draws included, under one seed), its dropout masks the same
in the forward and the backward, and declined where the layer must run op by op."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import d2v_kernels
from d2v_kernels.models import vision
from d2v_kernels.ops.pre_ln_layer_op import pre_ln_layer_training
from d2v_kernels.testing import (
    assert_close_to_reference,
    build_pair,
    graph_node_names,
    inputs_for,
    reentrant_checkpoint_runs,
)

NODE = "PreLnLayerFunctionBackward"
# Tiny: 3 x 3 patches of 8 pixels + CLS = 10 tokens, 2 heads of 16.
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=40, image_size=24)


def _op_by_op(monkeypatch):
    """The layers run op by op, as before this path (its op declines every call)."""
    monkeypatch.setattr(vision, "pre_ln_layer_training", lambda *args, **kwargs: None)


@pytest.mark.parametrize(
    ("bias", "attention"),
    [
        pytest.param(dict(), "triton", id="layer-table"),
        pytest.param(
            dict(use_relative_position_bias=False, use_shared_relative_position_bias=True),
            "triton",
            id="shared-table",
        ),
        # the measured rule's picks for the table's training on CUDA: the attention's own graph
        # recorded inside the node
        pytest.param(dict(), "eager", id="layer-table-eager-attention"),
        pytest.param(dict(), "sdpa", id="layer-table-sdpa-attention"),
    ],
)
def test_vision_training_forward_is_one_node_a_layer_where_triton_runs(bias, attention, monkeypatch):
    """One node a layer with drop path on (the default rate), the dispatch record the op-by-op
    path's, and the loss and gradients equal transformers'."""
    class_name = "Data2VecVisionForImageClassification"
    reference, fused, config = build_pair(class_name, num_hidden_layers=2, drop_path_rate=0.1, **TINY, **bias)
    inputs = inputs_for(class_name, config)
    reference.train()
    fused.train()
    torch.manual_seed(3)
    ref_loss = reference(**inputs).loss
    with d2v_kernels.use_backend("triton", attention=attention):
        torch.manual_seed(3)
        with d2v_kernels.record_dispatch() as calls:
            loss = fused(**inputs).loss
        assert calls[("attention", attention)] == config.num_hidden_layers
        assert graph_node_names(loss).count(NODE) == config.num_hidden_layers
        params = [p for _, p in fused.named_parameters()]
        grads = torch.autograd.grad(loss, params)
        with monkeypatch.context() as patch:
            _op_by_op(patch)
            with d2v_kernels.record_dispatch() as op_by_op_calls:
                assert NODE not in graph_node_names(fused(**inputs).loss)
    assert calls == op_by_op_calls
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    ref_grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
    for (name, _), got, want in zip(fused.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _layer_pair(drop_path_rate, **overrides):
    """(transformers' last layer, ours, a hidden state (B, N, C) that requires a gradient, the
    layer's keyword arguments): the model's second layer, whose drop path rate is the model's."""
    class_name = "Data2VecVisionModel"
    reference, fused, config = build_pair(
        class_name, num_hidden_layers=2, drop_path_rate=drop_path_rate, **(TINY | overrides)
    )
    reference.train()
    fused.train()
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    x = torch.randn(4, tokens, config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    kwargs = dict(resolution=(config.image_size, config.image_size))
    return reference.encoder.layer[1], fused.encoder.layer[1], x, kwargs


def _forward(layer, x, kwargs, seed):
    torch.manual_seed(seed)
    return layer(x, **kwargs)[0]


def _with_grads(out, layer, x, weight):
    return [out, *torch.autograd.grad((out * weight).sum(), [x, *layer.parameters()])]


@pytest.mark.parametrize(
    ("drop_path_rate", "overrides"),
    [
        pytest.param(0.0, dict(), id="no-drop-path"),
        pytest.param(0.0, dict(use_relative_position_bias=False, layer_scale_init_value=0.0), id="no-table-no-scale"),
        pytest.param(0.5, dict(), id="drop-path"),
    ],
)
def test_layer_matches_transformers_against_float64(drop_path_rate, overrides, monkeypatch):
    """Output and every gradient (input, q/k/v, the bias table, both LayerNorms, lambda_1 and
    lambda_2, the dense layers) within twice transformers' fp32 error of its float64 run, under one
    seed (drop path's draws alike: with rate 0.5 this seed drops one of the 4 samples in each
    branch and keeps another; the float64 run replays the fp32 run's draws)."""
    reference, fused, x, kwargs = _layer_pair(drop_path_rate, **overrides)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with d2v_kernels.use_backend("triton"):
        out = _forward(fused, x, kwargs, seed=7)
        assert type(out.grad_fn).__name__ == NODE
        if drop_path_rate:
            made = out.grad_fn.made  # the order of the tensors PreLnLayerFunction.forward made
            for keep in (made[11], made[19]):
                assert (keep == 0).any() and (keep != 0).any(), keep.flatten()
        got = _with_grads(out, fused, x, weight)
    rand, draws = torch.rand, []

    def recorded(*args, **kwargs):
        draws.append(rand(*args, **kwargs))
        return draws[-1]

    def replayed(*args, dtype, **kwargs):
        return draws.pop(0).to(dtype)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "rand", recorded)
        eager = _with_grads(_forward(reference, x, kwargs, seed=7), reference, x, weight)
    assert len(draws) == (2 if drop_path_rate else 0)
    x64 = x.detach().double().requires_grad_()
    reference64 = copy.deepcopy(reference).double()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "rand", replayed)
        ref64 = _with_grads(_forward(reference64, x64, kwargs, seed=7), reference64, x64, weight.double())
    names = ["output", "x", *(name for name, _ in reference.named_parameters())]
    assert len(got) == len(names)
    for name, out, want, eager_out in zip(names, got, ref64, eager):
        assert_close_to_reference(out, want, eager_out, name=name)


def _recomputed(layer, x, resolution, seed, mask1, keep1, mask2, keep2):
    """The layer in plain PyTorch with the given draws: the attention kernel's keep mask for
    ``seed``, the hidden dropouts' masks and drop path's per-sample factors."""
    from d2v_kernels.kernels.attention import dropout_keep_mask

    s = layer.attention.attention
    b, n, c = x.shape
    h, d = s.num_attention_heads, s.attention_head_size
    normed = layer.layernorm_before(x)
    q, k, v = (lin(normed).view(b, n, h, d).transpose(1, 2) for lin in (s.query, s.key, s.value))
    window = (resolution[0] // s.config.patch_size, resolution[1] // s.config.patch_size)
    scores = q @ k.transpose(-1, -2) / d**0.5 + s.relative_position_bias(window, dim_size=n)
    p_attention, p_hidden = s.config.attention_probs_dropout_prob, s.config.hidden_dropout_prob
    probs = torch.softmax(scores, -1) * dropout_keep_mask(seed, b, h, n, n, p_attention) / (1 - p_attention)
    context = (probs @ v).transpose(1, 2).reshape(b, n, c)
    a = layer.attention.output.dense(context) * mask1.view(b, n, c) / (1 - p_hidden)
    hidden = layer.lambda_1 * a * keep1 + x
    o = layer.output.dense(F.gelu(layer.intermediate.dense(layer.layernorm_after(hidden))))
    return layer.lambda_2 * (o * mask2.view(b, n, c) / (1 - p_hidden)) * keep2 + hidden


def test_dropout_masks_agree_between_forward_and_backward():
    _, fused, x, kwargs = _layer_pair(0.5, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with d2v_kernels.use_backend("triton"):
        torch.manual_seed(7)
        out = fused(x, **kwargs)[0]
        assert type(out.grad_fn).__name__ == NODE
        # save_for_backward's order in PreLnLayerFunction.forward
        made = out.grad_fn.made  # the order of the tensors PreLnLayerFunction.forward made
        seed, mask1, keep1, mask2, keep2 = made[9], made[10], made[11], made[18], made[19]
        assert not mask1.all() and not mask2.all()  # both dropouts dropped something
        params = list(fused.parameters())
        grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    expected = _recomputed(fused, x, kwargs["resolution"], seed, mask1, keep1, mask2, keep2)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    expected_grads = torch.autograd.grad((expected * weight).sum(), [x, *params])
    names = ["x", *(name for name, _ in fused.named_parameters())]
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", ["eager-backend", "no-grad", "nothing-requires-grad", "interpolated-bias"])
def test_declines_where_the_layer_runs_op_by_op(case):
    _, fused, x, kwargs = _layer_pair(0.1)
    backend = "eager" if case == "eager-backend" else "triton"
    if case == "nothing-requires-grad":
        x = x.detach()
        fused.requires_grad_(False)
    if case == "interpolated-bias":  # a dense (1, H, N, N) bias: transformers' interpolation
        kwargs = dict(kwargs, interpolate_pos_encoding=True)
    with d2v_kernels.use_backend(backend), d2v_kernels.record_dispatch() as calls:
        if case == "no-grad":
            with torch.no_grad():
                out = fused(x, **kwargs)[0]
        else:
            out = fused(x, **kwargs)[0]
    assert NODE not in graph_node_names(out)
    assert calls[("attention", backend)] == 1


def test_bad_arguments_name_themselves():
    x = torch.randn(2, 5, 32, requires_grad=True)
    c, inner = 32, 40
    shapes = [(c,), (c,), (c, c), (c,), (c, c), None, (c, c), (c,), (c, c), (c,), (c,), (c,), (inner, c), (inner,),
              (c, inner), (c,), (c,), (c,)]  # fmt: skip
    params = [None if s is None else torch.randn(s) for s in shapes]
    args = dict(heads=2, attention_dropout=0.0, hidden_dropout=0.0, drop_path=0.0, scale=0.25, eps=(1e-12, 1e-12),
                approximate="none")  # fmt: skip
    for name, value in (("drop_path", 1.0), ("hidden_dropout", -0.1), ("approximate", "erf"), ("eps", (1e-5,))):
        with pytest.raises(ValueError, match=name):
            pre_ln_layer_training(x, None, None, params, **{**args, name: value})
    with pytest.raises(ValueError, match="params"):
        pre_ln_layer_training(x, None, None, params[:-1], **args)


def test_a_reentrant_checkpoint_draws_the_dropouts_and_drop_path_of_the_unchecked_layer():
    """As tests/test_post_ln_layer.py's: the unrecorded first pass of a reentrant checkpoint draws
    the dropouts and drop path's samples its recomputation draws; output and gradients equal the
    unchecked layer's."""
    _, fused, x, kwargs = _layer_pair(0.5, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)
    plain, checkpointed = reentrant_checkpoint_runs(fused, x, lambda h: fused(h, **kwargs)[0])
    for i, (got, want) in enumerate(zip(checkpointed, plain)):
        assert torch.equal(got, want), i


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5], ids=["no-drop-path", "drop-path"])
def test_attention_output_bias_gradient_comes_out_of_the_add_layer_norm_kernel(drop_path_rate):
    """Without hidden dropout the attention output dense's bias gradient is the column sum of the
    add + LayerNorm backward kernel's x gradient, reduced in that kernel, with drop path too (its
    per-sample factor is the kernel's row scale): the backward's torch sums are lambda_2's, the
    output dense's, the intermediate's and the QKV's (with drop path lambda_2's sums each sample's
    rows, and a GEMV weighs the samples by their keep factors)."""
    _, fused, x, kwargs = _layer_pair(drop_path_rate)
    with d2v_kernels.use_backend("triton"):
        out = fused(x, **kwargs)[0]
        assert type(out.grad_fn).__name__ == NODE
        loss = (out * out).sum()
        with torch.profiler.profile() as profile:
            torch.autograd.grad(loss, [x, *fused.parameters()])
    assert sum(e.name == "aten::sum" for e in profile.events()) == 4
