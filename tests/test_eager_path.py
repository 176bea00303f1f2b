"""The per-layer ops run eagerly through a plain autograd.Function (no torch.library dispatch per
call) and under torch.compile as their custom op; both give the same values and gradients
(CPU, Triton interpreter)."""

import pytest
import torch

import d2v_kernels
from d2v_kernels import ops
from d2v_kernels.ops import conv_feature_extractor_op, pos_conv_op


def _layer_norm_gelu(x, w, b):
    return ops.layer_norm_gelu(x, w, b)


def _add_layer_norm(x, w, b):
    return ops.add_layer_norm(x, x.flip(1), w, b)


def _attention(x, w, b):
    q = x.view(*x.shape[:2], 2, -1)
    return ops.attention(q, q * w.view(2, -1), q + b.view(2, -1))


CASES = [
    ("layer_norm_gelu", _layer_norm_gelu, "LayerNormGeluLaunched", "d2v_kernels.layer_norm_gelu_fwd"),
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


# --- The plan caches of the feature extractor and the positional conv ----------------------------


def _front_end_inputs(op):
    """(call(*tensors, **options), tensors, options) of a small input: the feature extractor on a
    waveform (layer 0 fused, one conv layer after it), the positional conv on (B, T, C)."""
    torch.manual_seed(0)
    if op == "conv_feature_extractor":
        wave = torch.randn(2, 203)
        params = [torch.randn(32, 1, 10) * 0.3, torch.randn(32, 32, 3) * 0.1, torch.randn(32), torch.randn(32)]
        params += [torch.randn(32), torch.randn(32)]

        def call(wave, w0, w1, g0, g1, b0, b1, **options):
            return ops.conv_feature_extractor(wave, [w0, w1], [g0, g1], [b0, b1], **({"strides": [5, 2]} | options))

        return call, [wave, *params]
    x = torch.randn(2, 9, 32)
    params = [torch.randn(32, 16, 3) * 0.2, torch.randn(32, 16, 3) * 0.2, torch.randn(32)]

    def call(x, w0, w1, b0, **options):
        return ops.pos_conv(x, [w0, w1], [b0, None], **({"groups": 2} | options))

    return call, [x, *params]


FRONT_END = ["conv_feature_extractor", "pos_conv"]


@pytest.mark.parametrize("op", FRONT_END)
def test_front_end_plan_hits_equal_the_full_path_bit_for_bit(op):
    """The Triton inference plan (layer 0's launch, each layer's launches kept) gives the bits the
    full path (``dispatch.call`` of the backend) gives, on the first call and on a hit, and counts
    each call for record_dispatch as the full path does."""
    call, tensors = _front_end_inputs(op)
    plans = (conv_feature_extractor_op if op == "conv_feature_extractor" else pos_conv_op)._PLANS
    d2v_kernels.dispatch.clear_plans()
    with d2v_kernels.use_backend(**{op: "triton"}), torch.no_grad():
        with d2v_kernels.record_dispatch() as calls:
            first, hit = call(*tensors), call(*tensors)
        assert len(plans) == 1 and calls == {(op, "triton"): 2}

        def full_path(*args, **kwargs):
            return d2v_kernels.dispatch.call(op, args[0].device, *args, **kwargs)

        with d2v_kernels.record_dispatch() as full_calls:
            if op == "conv_feature_extractor":
                wave, w0, w1, g0, g1, b0, b1 = tensors
                expected = full_path(wave, [w0, w1], [g0, g1], [b0, b1], strides=[5, 2], conv_biases=None, eps=1e-5)
            else:
                x, w0, w1, b0 = tensors
                expected = full_path(x, [w0, w1], [b0, None], groups=2, eps=1e-5)
    assert full_calls == {(op, "triton"): 1}
    assert torch.equal(first, expected) and torch.equal(hit, expected)


@pytest.mark.parametrize("op", FRONT_END)
def test_front_end_plans_miss_on_each_key_field(op):
    """Each field the decision reads makes another plan: a shape, a dtype, requires_grad, grad
    mode, an option and its type; the same call again makes none."""
    call, tensors = _front_end_inputs(op)
    plans = (conv_feature_extractor_op if op == "conv_feature_extractor" else pos_conv_op)._PLANS
    d2v_kernels.dispatch.clear_plans()
    first = tensors[0]
    grad_param = tensors[1].detach().requires_grad_()
    if op == "conv_feature_extractor":
        other_option = lambda: call(*tensors, strides=[5, 3])
    else:
        other_option = lambda: ops.pos_conv(first, tensors[1:3], None, groups=2)  # no biases
    variants = [
        lambda: call(*tensors),
        lambda: call(first[:, :-1], *tensors[1:]),  # shape
        lambda: call(*(t.double() for t in tensors)),  # dtype
        lambda: call(first, grad_param, *tensors[2:]),  # requires_grad
        lambda: call(*tensors, eps=1e-3),  # an option's value
        lambda: call(*tensors, eps=1),  # its type
        other_option,
    ]
    for n, variant in enumerate(variants, start=1):
        variant()
        assert len(plans) == n
        variant()
        assert len(plans) == n
    with torch.no_grad():  # grad mode
        call(first, grad_param, *tensors[2:])
    assert len(plans) == len(variants) + 1


@pytest.mark.parametrize("op", FRONT_END)
def test_front_end_bad_input_is_rejected_after_a_hit(op):
    """A cached layout lets no other bad input through: a parameter of the wrong shape, and flags
    of the wrong type equal to a cached value (True == 1), each still raise naming the argument."""
    call, tensors = _front_end_inputs(op)
    wrong = torch.randn(33)
    with d2v_kernels.use_backend(**{op: "triton"}), torch.no_grad():
        for _ in range(2):
            call(*tensors, eps=1)
        with pytest.raises(ValueError, match="eps must be a positive float"):
            call(*tensors, eps=True)
        if op == "conv_feature_extractor":
            wave, w0, w1, g0, _, b0, b1 = tensors
            with pytest.raises(ValueError, match=r"ln_weights\[1\] must have shape \(32,\)"):
                call(wave, w0, w1, g0, wrong, b0, b1)
            for _ in range(2):
                call(*tensors, strides=[5, 1])
            with pytest.raises(ValueError, match=r"strides\[1\] must be a positive int"):
                call(*tensors, strides=[5, True])
        else:
            x, w0, w1, b0 = tensors
            with pytest.raises(ValueError, match=r"biases\[0\] must have shape \(32,\)"):
                call(x, w0, w1, wrong)
            dense = torch.randn(32, 32, 3) * 0.1
            for _ in range(2):
                call(x, dense, dense, b0, groups=1)
            with pytest.raises(ValueError, match="groups must be a positive int"):
                call(x, dense, dense, b0, groups=True)


def test_pos_conv_plan_follows_the_one_pass_switch(monkeypatch):
    """D2V_KERNELS_POS_CONV_ONE_PASS is read into the plan: setting or unsetting it takes effect on
    the next call of a cached layout (one launch a layer with it, two without)."""
    call, tensors = _front_end_inputs("pos_conv")
    one_pass_runs = []
    layers = pos_conv_op._pos_conv_layers
    monkeypatch.setattr(pos_conv_op, "_pos_conv_layers", lambda *a: one_pass_runs.append(a[-1]) or layers(*a))
    monkeypatch.delenv(pos_conv_op.ENV_ONE_PASS, raising=False)
    with d2v_kernels.use_backend(pos_conv="triton"), torch.no_grad():
        two = call(*tensors)
        monkeypatch.setenv(pos_conv_op.ENV_ONE_PASS, "1")
        one = call(*tensors)
        monkeypatch.delenv(pos_conv_op.ENV_ONE_PASS)
        call(*tensors)
    assert one_pass_runs == [True]
    torch.testing.assert_close(one, two)


def test_a_leftover_functorch_wrapper_takes_the_full_path():
    """A tensor left over from a finished torch.func transform is a plain torch.Tensor by type
    but has no storage: the plan key cannot read its pointer, so the op takes its full path (the
    custom op), not a plan's launch or the direct Function apply, and computes what it computes
    for the tensor it wraps."""
    leaked = []

    def keep(x):
        leaked.append(x)
        return (x * 2).sum()

    gen = torch.Generator().manual_seed(3)
    x, residual = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen)
    weight, bias = torch.randn(48, generator=gen), torch.randn(48, generator=gen)
    torch.func.grad(keep)(x)
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    with d2v_kernels.use_backend(add_layer_norm="triton"):
        expected = ops.add_layer_norm(x, residual, weight, bias)
        got = ops.add_layer_norm(leaked[0], residual, weight, bias)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
