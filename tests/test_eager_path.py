"""The per-layer ops run eagerly through a plain autograd.Function (no torch.library dispatch per
call) and under torch.compile as their custom op; both give the same values and gradients
(CPU, Triton interpreter)."""

import pytest
import torch

import d2v_kernels
from d2v_kernels import ops


def _layer_norm_gelu(x, w, b):
    return ops.layer_norm_gelu(x, w, b)


def _add_layer_norm(x, w, b):
    return ops.add_layer_norm(x, x.flip(1), w, b)


def _attention(x, w, b):
    q = x.view(*x.shape[:2], 2, -1)
    return ops.attention(q, q * w.view(2, -1), q + b.view(2, -1))


CASES = [
    ("layer_norm_gelu", _layer_norm_gelu, "LayerNormGeluFunction", "d2v_kernels.layer_norm_gelu_fwd"),
    ("add_layer_norm", _add_layer_norm, "AddLayerNormLaunched", "d2v_kernels.add_layer_norm_fwd"),
    ("attention", _attention, "AttentionLaunched", "d2v_kernels.attention_fwd"),
]


@pytest.mark.parametrize(("op", "fn", "function_name", "custom_op"), CASES, ids=[c[0] for c in CASES])
def test_eager_function_and_compiled_custom_op_agree(op, fn, function_name, custom_op):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    seen_targets = []

    def record_graph(gm, example_inputs):
        seen_targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    with d2v_kernels.use_backend(**{op: "triton"}):
        eager = fn(x, w, b)
        assert type(eager.grad_fn).__name__ == f"{function_name}Backward"
        eager_grads = torch.autograd.grad(eager.sum(), (x, w, b))
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=record_graph, fullgraph=True)(x, w, b)
        compiled_grads = torch.autograd.grad(compiled.sum(), (x, w, b))
    assert any(custom_op in t for t in seen_targets), seen_targets
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eager_backward_is_once_differentiable():
    """As the custom op's: no double backward (its backward is a kernel without autograd)."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    with d2v_kernels.use_backend(layer_norm_gelu="triton"):
        y = ops.layer_norm_gelu(x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"does not require grad|once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("tracing_mode", ["fake", "real"])
@pytest.mark.parametrize(("op", "fn", "function_name", "custom_op"), CASES, ids=[c[0] for c in CASES])
def test_tracing_outside_dynamo_sees_the_custom_op(op, fn, function_name, custom_op, tracing_mode):
    """make_fx (what non-strict export and AOT autograd trace with) gets the custom op and its fake
    implementation, never the Triton launcher with fake tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    args = (torch.randn(2, 9, 32), torch.randn(32), torch.randn(32))
    with d2v_kernels.use_backend(**{op: "triton"}):
        graph = make_fx(fn, tracing_mode=tracing_mode)(*args)
        targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        assert any(custom_op in t for t in targets), targets
        torch.testing.assert_close(graph(*args), fn(*args), rtol=0, atol=0)


@pytest.mark.parametrize(("op", "fn", "function_name", "custom_op"), CASES, ids=[c[0] for c in CASES])
def test_saved_tensors_are_unpacked_once(op, fn, function_name, custom_op):
    """Saved-tensor hooks (CPU offload, checkpointing) see each saved tensor unpacked exactly once."""
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return len(packed) - 1

    def unpack(i):
        unpacked.append(i)
        return packed[i]

    x = torch.randn(2, 9, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    with d2v_kernels.use_backend(**{op: "triton"}):
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = fn(x, w, b)
        y.sum().backward()
    ours = [i for i, t in enumerate(packed) if t is not None and t.dim() >= 1]
    assert ours and sorted(unpacked) == sorted(set(unpacked)), unpacked


def _pos_conv(x, w, b):
    weights = [w.view(32, 1, 1).expand(32, 16, 3) * 0.1, w.view(32, 1, 1).expand(32, 16, 3).flip(0) * 0.1]
    return ops.pos_conv(x, weights, [b, None], groups=2)


def _conv_feature_extractor(x, w, b):
    wave = x.detach().reshape(1, -1)[:, :200]  # a waveform: no gradient (its overlap-add starts from zeros)
    conv_weights = [w.view(32, 1, 1).expand(32, 1, 10) * 0.1, b.view(32, 1, 1).expand(32, 32, 3) * 0.1]
    return ops.conv_feature_extractor(wave, conv_weights, [w, b], [b, w], strides=[5, 2])


@pytest.mark.parametrize(
    ("op", "fn"),
    [(c[0], c[1]) for c in CASES] + [("pos_conv", _pos_conv), ("conv_feature_extractor", _conv_feature_extractor)],
    ids=[c[0] for c in CASES] + ["pos_conv", "conv_feature_extractor"],
)
def test_backward_materialises_no_zero_gradients(op, fn):
    """Outputs without a gradient (the statistics, pos_conv's pre-norm activations) reach the
    backward as None: autograd would otherwise allocate and fill a zero tensor for each, a memset
    launch each on a GPU, on every backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    with d2v_kernels.use_backend(**{op: "triton"}):
        y = fn(x, w, b)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            torch.autograd.grad(y, (w, b), torch.randn_like(y))
    names = [event.name for event in profile.events()]
    assert not [n for n in names if n in ("aten::zeros", "aten::zeros_like")], names


def test_only_the_returned_sum_has_a_gradient():
    """add_layer_norm(return_sum=True) with y unused: the sum's gradient alone reaches x and residual."""
    x = torch.randn(3, 16, requires_grad=True)
    residual = torch.randn(3, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    d_total = torch.randn(3, 16)
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        _, total = ops.add_layer_norm(x, residual, w, b, return_sum=True)
        gx, gres = torch.autograd.grad(total, (x, residual), d_total)
    torch.testing.assert_close(gx, d_total)
    torch.testing.assert_close(gres, d_total)
