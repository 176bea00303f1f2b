"""torch.compile(fullgraph=True) of optimize()d models on the custom-op path: with the Triton
backend forced (the interpreter on the CPU) every kernel the uncompiled run launches is launched
by the compiled graph too, as many times, forward and backward; the compiled loss and gradients
equal the uncompiled run's and transformers'."""

from collections import Counter

import pytest
import torch
from conftest import small_inputs, small_pair

import d2v_kernels

# Per class: the ops that must dispatch to Triton and kernels that must launch (forward and backward).
EXPECTED = {
    "Data2VecAudioForCTC": (
        {"conv_feature_extractor", "pos_conv", "attention", "add_layer_norm"},
        {"conv0_ln_gelu_kernel", "conv0_ln_gelu_bwd_kernel", "grouped_conv1d_kernel", "layer_norm_gelu_bwd_kernel",
         "attention_fwd_kernel", "attention_bwd_dq_kernel", "row_norm_fwd_kernel", "row_norm_bwd_kernel"},
    ),
    "Data2VecVisionForImageClassification": (
        {"attention", "add_layer_norm"},
        {"attention_fwd_kernel", "attention_bwd_dkdv_kernel", "segment_sum_kernel", "row_norm_bwd_kernel"},
    ),
    "Data2VecTextForMaskedLM": (
        {"attention", "add_layer_norm"},
        {"attention_fwd_kernel", "attention_bwd_dq_kernel", "row_norm_fwd_kernel", "row_norm_param_grad_kernel"},
    ),
}  # fmt: skip


def _loss_and_grads(model, inputs, params: dict):
    logits = model(**inputs).logits
    loss = (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum()  # every logit its own weight
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), dict(zip(params, grads))


def _assert_close(got, want, tol, what):
    loss, grads = got
    torch.testing.assert_close(loss, want[0], atol=tol, rtol=tol, msg=lambda m: f"{what} loss: {m}")
    for name, grad in want[1].items():
        if grad is None:
            assert grads[name] is None, f"{what}: {name} got a gradient, the reference none"
        else:
            torch.testing.assert_close(grads[name], grad, atol=tol, rtol=tol, msg=lambda m, n=name: f"{what} {n}: {m}")


def _compiles_whole(model, inputs) -> bool:
    torch._dynamo.reset()
    whole = torch._dynamo.explain(model)(**inputs).graph_break_count == 0
    torch._dynamo.reset()
    return whole


@pytest.mark.parametrize("class_name", EXPECTED)
def test_compiled_model_runs_the_triton_kernels(class_name, triton_launches):
    torch._dynamo.reset()
    reference, fused, config = small_pair(class_name)
    reference.train()
    fused.train()  # the test configs have no dropout: the two runs see the same function
    inputs = small_inputs(class_name, config, labels=False)
    params = dict(fused.named_parameters())
    want = _loss_and_grads(reference, inputs, dict(reference.named_parameters()))

    with d2v_kernels.use_backend("triton"), d2v_kernels.record_dispatch() as calls:
        uncompiled = _loss_and_grads(fused, inputs, params)
    ops, kernels = EXPECTED[class_name]
    assert {op for op, backend in calls if backend == "triton"} == ops, calls
    assert all(backend == "triton" for _, backend in calls), calls
    assert kernels <= set(triton_launches), triton_launches
    uncompiled_launches = Counter(triton_launches)
    triton_launches.clear()

    # transformers' audio encoder before 5.2x branches on a layerdrop draw in training: a break of
    # its own (tests/test_training.py checks that the fused model adds none).
    fullgraph = not class_name.startswith("Data2VecAudio") or _compiles_whole(reference, inputs)
    compiled = torch.compile(fused, fullgraph=fullgraph, backend="aot_eager")
    with d2v_kernels.use_backend("triton"):
        got = _loss_and_grads(compiled, inputs, params)
    # The graph holds our custom ops (fake impls while tracing): the launches are its runtime's.
    assert triton_launches == uncompiled_launches
    # Not bit-equal: uncompiled, the layer nodes take dense biases' gradients from the add +
    # LayerNorm backward kernels (fp32 partial sums), the compiled graph sums them with torch.
    _assert_close(got, uncompiled, 1e-5, "compiled against uncompiled")
    _assert_close(got, want, 1e-4, "compiled against transformers")
