"""The Triton path of conv_feature_extractor: cuDNN conv per layer + the Triton LayerNorm+GELU
kernel reading the conv output channels-first in place (interpreter on CPU)."""

import importlib

import pytest
import torch

import d2v_kernels
from d2v_kernels import dispatch, ops
from d2v_kernels.testing import assert_close_to_reference, graph_node_names

# d2v_kernels.ops re-exports the function under the module's name: fetch the module itself.
cfe = importlib.import_module("d2v_kernels.ops.conv_feature_extractor_op")
triton_path = importlib.import_module("d2v_kernels.ops._conv_feature_extractor_triton")

DIMS, KERNELS, STRIDES = (40, 48, 36), (10, 3, 2), (5, 2, 2)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _params(dtype, conv_bias=False):
    gen = torch.Generator(device="cpu").manual_seed(3)
    c_in, conv_weights = 1, []
    for c, k in zip(DIMS, KERNELS):
        conv_weights.append(torch.randn(c, c_in, k, generator=gen, device="cpu") * (c_in * k) ** -0.5)
        c_in = c
    ln_weights = [torch.randn(c, generator=gen, device="cpu") * 0.2 + 1 for c in DIMS]
    ln_biases = [torch.randn(c, generator=gen, device="cpu") * 0.1 for c in DIMS]
    conv_biases = [torch.randn(c, generator=gen, device="cpu") * 0.1 for c in DIMS] if conv_bias else None
    device = torch.get_default_device()  # drawn on the CPU (its generator), run where the test runs
    cast = lambda ts: None if ts is None else [t.to(device, dtype).requires_grad_(True) for t in ts]
    return cast(conv_weights), cast(ln_weights), cast(ln_biases), cast(conv_biases)


def _run(wave, params, backend):
    return _run_layers(wave, params, backend, STRIDES)


def _run_layers(wave, params, backend, strides):
    conv_weights, ln_weights, ln_biases, conv_biases = params
    with d2v_kernels.use_backend(conv_feature_extractor=backend):
        return ops.conv_feature_extractor(
            wave, conv_weights, ln_weights, ln_biases, strides=list(strides), conv_biases=conv_biases
        )


def _leaves(wave, params):
    return [wave] + [t for group in params if group is not None for t in group]


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-bias", "bias"])
def test_forward_and_gradients_match_float64(dtype, conv_bias):
    device = torch.get_default_device()

    def cpu_randn(*shape, seed):
        """Seeded on the CPU, so both devices see the same numbers."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(*shape, generator=gen, device="cpu", dtype=torch.float64).to(device)

    wave64 = cpu_randn(2, 1601, seed=1)
    results = {}
    for name, run_dtype, backend in (
        ("kernel", dtype, "triton"),
        ("eager", dtype, "eager"),
        ("ref", torch.float64, "eager"),
    ):
        wave = wave64.to(run_dtype).requires_grad_(True)
        params = _params(run_dtype, conv_bias)
        with d2v_kernels.record_dispatch() as calls:
            out = _run(wave, params, backend)
        assert calls == {("conv_feature_extractor", backend): 1}
        grad_out = cpu_randn(*out.shape, seed=2)
        grads = torch.autograd.grad(out, _leaves(wave, params), grad_out.to(run_dtype))
        results[name] = (out, grads)
    (out, grads), (eager, eager_grads), (ref, ref_grads) = results["kernel"], results["eager"], results["ref"]
    assert out.shape == (2, 79, DIMS[-1]) and out.dtype == dtype
    assert_close_to_reference(out, ref, eager)
    for i, (g, g64, ge) in enumerate(zip(grads, ref_grads, eager_grads)):
        assert_close_to_reference(g, g64, ge, name=f"grad {i}")


def test_triton_path_declines_float64_and_mixed_dtypes_with_reasons():
    impl = next(i for i in dispatch.implementations("conv_feature_extractor") if i.backend == "triton")
    conv_weights, ln_weights, ln_biases, _ = _params(torch.float64)
    wave = torch.randn(1, 400, dtype=torch.float64)
    reasons = impl.check(wave, conv_weights, ln_weights, ln_biases, strides=list(STRIDES))
    assert any("wave has dtype torch.float64" in r for r in reasons)
    conv_weights, ln_weights, ln_biases, _ = _params(torch.float32)
    reasons = impl.check(wave.half(), conv_weights, ln_weights, ln_biases, strides=list(STRIDES))
    assert any("conv_weights[0] has dtype torch.float32, wave has torch.float16" in r for r in reasons)
    with pytest.raises(d2v_kernels.BackendUnavailableError, match=r"wave has dtype torch\.float64"):
        _run(wave, _params(torch.float64), "triton")


def test_compiles_fullgraph_through_the_triton_path():
    params = _params(torch.float32)
    wave = torch.randn(2, 801)
    expected = _run(wave, params, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(lambda w: _run(w, params, "triton"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(wave), expected)


# --------------------------------------------------------------------------------------------
# Layer 0 as one kernel (conv on the waveform + LayerNorm + GELU)
# --------------------------------------------------------------------------------------------


def _spy(monkeypatch, name):
    """Record each launch of a feature-extractor kernel: False for a forward, True for the
    pre-norm recompute."""
    from d2v_kernels.kernels import conv_feature_extractor as kernels

    calls, real = [], getattr(kernels, name)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pre_norm_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, spy)
    return calls


def test_layer0_is_one_kernel_and_its_backward_recomputes_it(monkeypatch):
    """Forward: layer 0 is one kernel. Backward: its output is recomputed once (layer 1's weight
    gradient), then its own backward is one kernel, which recomputes the conv output in registers
    (no pre-norm recompute)."""
    from d2v_kernels.kernels import conv_feature_extractor as kernels

    calls = _spy(monkeypatch, "conv0_ln_gelu")
    backward_calls, real_backward = [], kernels.conv0_ln_gelu_backward
    monkeypatch.setattr(
        kernels, "conv0_ln_gelu_backward", lambda *a, **k: backward_calls.append(k) or real_backward(*a, **k)
    )
    params = _params(torch.float32, conv_bias=True)
    wave = torch.randn(2, 1601, requires_grad=True)
    out = _run(wave, params, "triton")
    assert calls == [False] and out.is_contiguous()  # (B, T, C), channels-last all the way
    out.sum().backward()
    assert calls == [False, False]
    assert backward_calls == [{"wave_grad": True}]
    assert wave.grad is not None and all(t.grad is not None for group in params for t in group)


def _saved_activation_bytes(wave, params, backend):
    """Bytes of the tensors the autograd graph keeps for the backward, the waveform and the
    parameters left out."""
    exclude = {t.untyped_storage().data_ptr() for group in params if group for t in group}
    exclude.add(wave.untyped_storage().data_ptr())
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in exclude:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _run(wave, params, backend)
    return sum(saved.values()), out


def test_backward_keeps_one_tensor_per_layer():
    """The Triton path keeps each layer's conv output (layers 1..n-1) and fp32 row statistics,
    nothing else: no activation (recomputed in the backward), not layer 0's output. Eager keeps
    about six times as much."""
    params = _params(torch.float32, conv_bias=True)
    wave = torch.randn(2, 16001, requires_grad=True)
    saved, out = _saved_activation_bytes(wave, params, "triton")
    frames, expected = wave.shape[1], 0
    for i, (channels, k, stride) in enumerate(zip(DIMS, KERNELS, STRIDES)):
        frames = (frames - k) // stride + 1
        stats = 2 * 2 * frames * 4  # mean and rstd, fp32, per frame
        expected += stats + (2 * channels * frames * 4 if i > 0 else 0)
    assert saved == expected
    eager_saved, eager_out = _saved_activation_bytes(wave, params, "eager")
    assert saved * 5 < eager_saved
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)


def test_layer0_under_autocast_takes_the_per_layer_path(monkeypatch):
    calls = _spy(monkeypatch, "conv0_ln_gelu")
    params = _params(torch.float32)
    wave = torch.randn(2, 1601)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(wave, params, "triton")
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _run(wave, params, "eager")
    assert out.dtype == eager.dtype
    torch.testing.assert_close(out.float(), eager.float(), rtol=0.05, atol=0.05)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer0_reads_a_strided_wave(dtype):
    """A wave that is a strided view (every other sample of a longer buffer) and 40 channels
    (no power of two): forward and every gradient against float64."""
    buffer = torch.randn(2, 3202, dtype=torch.float64)
    results = []
    for run_dtype, backend in ((dtype, "triton"), (dtype, "eager"), (torch.float64, "eager")):
        wave = buffer.to(run_dtype)[:, ::2].requires_grad_(True)
        params = _params(run_dtype, conv_bias=True)
        out = _run(wave, params, backend)
        grads = torch.autograd.grad(out, _leaves(wave, params), torch.ones_like(out) / out.numel() ** 0.5)
        results.append((out, grads))
    (out, grads), (eager, eager_grads), (ref, ref_grads) = results
    assert_close_to_reference(out, ref, eager)
    for i, (g, g64, ge) in enumerate(zip(grads, ref_grads, eager_grads)):
        assert_close_to_reference(g, g64, ge, name=f"grad {i}")


def test_layer0_tile_override_computes_the_same():
    from d2v_kernels.kernels import _tiles

    params = _params(torch.float32)
    wave = torch.randn(1, 1201)
    expected = _run(wave, params, "triton")
    with _tiles.override("conv0", BLOCK_T=4, num_warps=2):
        torch.testing.assert_close(_run(wave, params, "triton"), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("on_device")
def test_layer0_opcheck():
    weights, ln_weights, ln_biases, conv_biases = _params(torch.float32, conv_bias=True)
    wave = torch.randn(2, 451, requires_grad=True)
    args = (wave, weights[0], conv_biases[0], ln_weights[0], ln_biases[0], 5, 1e-5)
    torch.library.opcheck(torch.ops.d2v_kernels.conv0_ln_gelu.default, args)
    y, mean, rstd = torch.ops.d2v_kernels.conv0_ln_gelu(*(a.detach() if torch.is_tensor(a) else a for a in args))
    dy = torch.randn_like(y)
    detached = [t.detach() for t in args[:5]]
    bwd_args = (dy, *detached, mean, rstd, 5, 1e-5, True)
    torch.library.opcheck(torch.ops.d2v_kernels.conv0_ln_gelu_bwd.default, bwd_args)


def _layer0_case(dtype, channels, kernel_size, stride, conv_bias, seed=7):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    wave = draw(2, 1203)
    weight = draw(channels, 1, kernel_size, scale=kernel_size**-0.5)
    cb = draw(channels, scale=0.1) if conv_bias else None
    g, b = draw(channels, scale=0.2) + 1, draw(channels, scale=0.1)
    frames = (wave.shape[1] - kernel_size) // stride + 1
    dy = draw(2, channels, frames)
    device = torch.get_default_device()  # drawn on the CPU, run where the test runs
    return [None if t is None else t.to(device) for t in (wave, weight, cb, g, b)], dy.to(device)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "channels, kernel_size, stride, conv_bias, dy_layout",
    [(40, 10, 5, True, "channels_last"), (33, 3, 2, False, "channels_first"), (48, 16, 3, True, "channels_first")],
)
def test_layer0_backward_kernel_matches_float64(dtype, channels, kernel_size, stride, conv_bias, dy_layout):
    """The fused backward's five gradients (waveform, conv weight and bias, LayerNorm weight and
    bias) against float64 autograd of the eager layer, with eager in the same dtype as the yardstick;
    dy read channels-last or channels-first through its strides."""
    import torch.nn.functional as F

    from d2v_kernels.kernels import conv_feature_extractor as kernels

    inputs64, dy64 = _layer0_case(torch.float64, channels, kernel_size, stride, conv_bias)

    def eager(inputs, dy):
        leaves = [t.clone().requires_grad_(True) for t in inputs if t is not None]
        wave, weight, cb, g, b = (leaves.pop(0) if t is not None else None for t in inputs)
        h = F.conv1d(wave[:, None], weight, cb, stride=stride)
        y = F.gelu(F.layer_norm(h.transpose(1, 2), (channels,), g, b, 1e-5)).transpose(1, 2)
        return torch.autograd.grad(y, [t for t in (wave, weight, cb, g, b) if t is not None], dy)

    ref = eager(inputs64, dy64)
    eager_grads = eager([None if t is None else t.to(dtype) for t in inputs64], dy64.to(dtype))
    wave, weight, cb, g, b = (None if t is None else t.to(dtype) for t in inputs64)
    dy = dy64.to(dtype)
    if dy_layout == "channels_last":
        dy = dy.transpose(1, 2).contiguous().transpose(1, 2)
    _, mean, rstd = kernels.conv0_ln_gelu(wave, weight, cb, g, b, stride, 1e-5)
    grads = kernels.conv0_ln_gelu_backward(dy, wave, weight, cb, g, b, mean, rstd, stride, wave_grad=True)
    grads = [t for t in grads if t is not None]
    for name, got, want, yardstick in zip(
        ["wave", "weight", "conv bias", "ln weight", "ln bias"], grads, ref, eager_grads
    ):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close_to_reference(got, want, yardstick, name=name)


def test_layer0_backward_kernel_is_deterministic_and_tiles_agree():
    from d2v_kernels.kernels import _tiles
    from d2v_kernels.kernels import conv_feature_extractor as kernels

    (wave, weight, cb, g, b), dy = _layer0_case(torch.float32, 40, 10, 5, True)
    wave, weight, cb, g, b, dy = (t.float() for t in (wave, weight, cb, g, b, dy))
    _, mean, rstd = kernels.conv0_ln_gelu(wave, weight, cb, g, b, 5, 1e-5)
    run = lambda: kernels.conv0_ln_gelu_backward(dy, wave, weight, cb, g, b, mean, rstd, 5, wave_grad=True)
    first, second = run(), run()
    for x, y in zip(first, second):
        assert torch.equal(x, y)  # fixed tile order per program, partials summed by torch
    with _tiles.override("conv0_bwd", BLOCK_T=32, num_warps=4, programs_per_sm=3):
        for x, y in zip(run(), first):  # other partial sums: equal on the scale of each gradient
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
    with _tiles.override("conv0_bwd", BLOCK_T=8), pytest.raises(ValueError, match="BLOCK_T must be at least 16"):
        run()
    assert kernels.backward_reasons(512, 10) == []
    assert "1024 channels > 512" in kernels.backward_reasons(1024, 10)[0]
    assert "kernel size 17 > 16" in kernels.backward_reasons(512, 17)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer0_unfused_backward_for_rows_the_kernel_does_not_take(dtype, monkeypatch):
    """Rows wider than the fused backward takes run the unfused one (pre-norm recompute, row-norm
    backward, cuDNN conv gradients): same gradients to rounding."""
    from d2v_kernels.kernels import conv_feature_extractor as kernels

    params = _params(dtype, conv_bias=True)
    wave = torch.randn(2, 1601, dtype=torch.float64).to(dtype).requires_grad_(True)
    leaves = _leaves(wave, params)
    out = _run(wave, params, "triton")
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    fused = torch.autograd.grad(out, leaves, grad_out)
    monkeypatch.setattr(kernels, "BWD_MAX_CHANNELS", DIMS[0] - 1)
    calls = _spy(monkeypatch, "conv0_ln_gelu")
    unfused = torch.autograd.grad(_run(wave, params, "triton"), leaves, grad_out)
    assert calls == [False, False, True]  # forward, layer 0's output again, its pre-norm values
    # Sums over thousands of frames in another order: compare on the scale of each gradient.
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (x, y) in enumerate(zip(fused, unfused)):
        torch.testing.assert_close(x, y, rtol=rel, atol=rel * y.abs().max().item(), msg=f"grad {i}")


@pytest.mark.usefixtures("on_device")
def test_layer_norm_gelu_conv_nodes_opcheck():
    weights, ln_weights, ln_biases, conv_biases = _params(torch.float32, conv_bias=True)
    wave = torch.randn(2, 451, requires_grad=True)
    detach = lambda args: [a.detach() if torch.is_tensor(a) else a for a in args]
    args = (wave, weights[0], conv_biases[0], ln_weights[0], ln_biases[0], weights[1], conv_biases[1], 5, 2, 1e-5)
    torch.library.opcheck(torch.ops.d2v_kernels.conv0_ln_gelu_conv.default, args)
    z1, mean0, rstd0 = torch.ops.d2v_kernels.conv0_ln_gelu_conv(*detach(args))
    assert z1.stride(1) == 1  # channels-last
    d = detach(args)
    bwd_args = (torch.randn_like(z1), *d[:7], mean0, rstd0, 5, 2, 1e-5, True)
    torch.library.opcheck(torch.ops.d2v_kernels.conv0_ln_gelu_conv_bwd.default, bwd_args)

    z1 = z1.requires_grad_(True)
    args = (z1, ln_weights[1], ln_biases[1], weights[2], conv_biases[2], 2, 1e-5)
    torch.library.opcheck(torch.ops.d2v_kernels.ln_gelu_conv.default, args)
    z2, mean1, rstd1 = torch.ops.d2v_kernels.ln_gelu_conv(*detach(args))
    bwd_args = (torch.randn_like(z2), *detach(args)[:5], mean1, rstd1, 2, 1e-5)
    torch.library.opcheck(torch.ops.d2v_kernels.ln_gelu_conv_bwd.default, bwd_args)


# --------------------------------------------------------------------------------------------
# The CUDA extension's backward: the Triton path's nodes rerun from the waveform
# --------------------------------------------------------------------------------------------


class _Ctx:
    """Stands in for autograd's ctx: the extension's custom op has only a CUDA kernel, so its
    backward formula is called directly."""

    def __init__(self, needs_wave):
        self.needs_input_grad = (needs_wave,)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _extension_backward(wave, params, grad_out, strides=STRIDES):
    """The CUDA extension's backward formula on these inputs, gradients by what requires one."""
    conv_weights, ln_weights, ln_biases, conv_biases = params
    ctx = _Ctx(wave.requires_grad)
    inputs = (wave, conv_weights, ln_weights, ln_biases, conv_biases or [], list(strides), 1e-5)
    cfe._setup_context(ctx, inputs, None)
    with torch.no_grad():  # as in autograd's backward pass
        d_wave, d_w, d_lw, d_lb, d_cb, *rest = cfe._backward(ctx, grad_out)
    assert rest == [None, None]
    return [d_wave, *d_w, *d_lw, *d_lb, *d_cb]


_FROZEN = {  # which leaves train, by name: wave, then conv_weights[i], ln_weights[i], ... as _leaves
    "none": lambda name, i: True,
    "wave": lambda name, i: name != "wave",
    "wave-and-layer-0": lambda name, i: name != "wave" and i != 0,
    "last-layer-only": lambda name, i: i == len(DIMS) - 1,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "frozen, conv_bias, layer0_kernel",
    [
        ("none", True, True),
        ("none", False, False),
        ("wave", False, True),
        ("wave-and-layer-0", True, True),
        ("wave-and-layer-0", False, False),
        ("last-layer-only", True, True),
    ],
)
def test_extension_backward_reruns_the_triton_nodes(dtype, frozen, conv_bias, layer0_kernel, monkeypatch):
    """The extension's forward saves only its inputs; its backward reruns the forward through the
    Triton path's nodes (layer 0 as one kernel, or as a conv where the kernel cannot take it) and
    runs their backwards: every gradient that is asked for against float64 autograd of eager, with
    eager in the same dtype as the yardstick, None for the rest, and the layers below the lowest
    trained one not walked."""
    if not layer0_kernel:
        monkeypatch.setattr(triton_path, "_conv0_fusable", lambda *args: False)
    calls = _spy(monkeypatch, "conv0_ln_gelu")
    wave64 = torch.randn(2, 1601, dtype=torch.float64)
    grad64 = None
    results = []
    for run_dtype in (torch.float64, dtype):
        params = _params(run_dtype, conv_bias)
        wave = wave64.to(run_dtype)
        names = ["wave"] + [f"{group}[{i}]" for group in ("w", "g", "b", "cb") for i in range(len(DIMS))]
        for name, leaf in zip(names, _leaves(wave, params)):
            leaf.requires_grad_(_FROZEN[frozen](name.split("[")[0], int(name[-2]) if "[" in name else None))
        out = _run(wave, params, "eager")
        grad64 = torch.randn(out.shape, dtype=torch.float64) if grad64 is None else grad64
        trained = [t for t in _leaves(wave, params) if t.requires_grad]
        eager = dict(zip(map(id, trained), torch.autograd.grad(out, trained, grad64.to(run_dtype))))
        results.append([eager.get(id(t)) for t in _leaves(wave, params)])
    kernel = _extension_backward(wave, params, grad64.to(dtype))
    assert calls == ([] if not layer0_kernel else [False] if frozen == "last-layer-only" else [False, False])
    for name, got, want, yardstick, leaf in zip(names, kernel, *results, _leaves(wave, params)):
        if not leaf.requires_grad:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == leaf.shape, name
        assert_close_to_reference(got, want, yardstick, name=f"grad {name}")


@pytest.mark.parametrize("layer0_kernel", [True, False], ids=["layer0-kernel", "layer0-conv"])
def test_extension_backward_of_one_layer(layer0_kernel, monkeypatch):
    if not layer0_kernel:
        monkeypatch.setattr(triton_path, "_conv0_fusable", lambda *args: False)
    params = [[group[0]] for group in _params(torch.float32, conv_bias=True)]
    wave = torch.randn(2, 1601, requires_grad=True)
    out = _run_layers(wave, params, "eager", STRIDES[:1])
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, _leaves(wave, params), grad_out)
    for got, want in zip(_extension_backward(wave, params, grad_out, STRIDES[:1]), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_extension_backward_traces_to_the_triton_nodes_custom_ops(tracing_mode):
    """Under tracing (torch.compile's backward, make_fx; symbolic: dynamic shapes, as opcheck's
    test_aot_dispatch_dynamic) the formula calls the nodes' custom ops, with arguments their
    schemas take; the traced graph computes what the eager call does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    conv_weights, ln_weights, ln_biases, conv_biases = _params(torch.float32, conv_bias=True)
    n = len(DIMS)
    needs = (True, [True] * n, [True] * n, [True] * n, [True] * n)

    def backward(grad_out, wave, *flat):
        groups = [list(flat[i * n : (i + 1) * n]) for i in range(4)]
        grads = triton_path.triton_nodes_backward(grad_out, wave, *groups, list(STRIDES), 1e-5, needs)
        return [grads[0], *[g for group in grads[1:] for g in group]]

    wave = torch.randn(2, 1601)
    flat = [t.detach() for group in (conv_weights, ln_weights, ln_biases, conv_biases) for t in group]
    grad_out = torch.randn(2, 79, DIMS[-1])
    graph = make_fx(backward, tracing_mode=tracing_mode)(grad_out, wave, *flat)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    for op in ("conv0_ln_gelu_conv", "conv0_ln_gelu_conv_bwd", "ln_gelu_conv", "ln_gelu_conv_bwd"):
        assert f"d2v_kernels.{op}.default" in targets, op
    assert {"d2v_kernels.layer_norm_gelu_fwd.default", "d2v_kernels.layer_norm_gelu_bwd.default"} <= targets
    for got, want in zip(graph(grad_out, wave, *flat), backward(grad_out, wave, *flat)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_extension_backward_takes_the_triton_path_only_where_it_can():
    reasons = lambda wave, params: cfe._triton_nodes_reasons(wave, *params[:3], [], list(STRIDES), 1e-5)
    assert reasons(torch.randn(2, 1601), _params(torch.float32)) == []  # CPU: the interpreter, as if forced
    meta = [[t.to("meta") for t in group] for group in _params(torch.float32)[:3]]
    assert "inputs are on meta" in reasons(torch.randn(2, 1601, device="meta"), meta)[0]
    assert any("float64" in r for r in reasons(torch.randn(2, 1601, dtype=torch.float64), _params(torch.float64)))


# --------------------------------------------------------------------------------------------
# Eager training: the whole stack as one autograd node
# --------------------------------------------------------------------------------------------

STACK_DIMS, STACK_KERNELS, STACK_STRIDES = (16, 24, 20), (10, 3, 2), (5, 2, 2)
STACK_NODE = "ConvFeatureExtractorFunctionBackward"


def _stack_leaves(layers, conv_bias, trains, seed=5):
    """(wave, conv_weights, ln_weights, ln_biases, conv_biases or None) of a small stack; ``trains``
    (name, layer) -> whether that leaf requires a gradient (layer None for the wave)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape, scale=1.0, shift=0.0: torch.randn(*shape, generator=gen) * scale + shift
    wave = draw(2, 241).requires_grad_(trains("wave", None))
    groups, c_in = {"w": [], "g": [], "b": [], "cb": []}, 1
    for c, k in zip(STACK_DIMS[:layers], STACK_KERNELS[:layers]):
        groups["w"].append(draw(c, c_in, k, scale=(c_in * k) ** -0.5))
        groups["g"].append(draw(c, scale=0.2, shift=1.0))
        groups["b"].append(draw(c, scale=0.1))
        groups["cb"].append(draw(c, scale=0.1))
        c_in = c
    for name, group in groups.items():
        for i, t in enumerate(group):
            t.requires_grad_(trains(name, i))
    return wave, groups["w"], groups["g"], groups["b"], groups["cb"] if conv_bias else None


def _stack_run(leaves, layers):
    wave, ws, gs, bs, cbs = leaves
    return triton_path.run_conv_then_triton_norm(wave, ws, gs, bs, strides=STACK_STRIDES[:layers], conv_biases=cbs)


def _flat(leaves):
    wave, *groups = leaves
    return [wave] + [t for group in groups if group is not None for t in group]


def test_eager_training_is_one_node_for_the_stack():
    """Through the op (its training plan) and through the backend's function: one node and its
    parameters' AccumulateGrad, the dispatch recorded once per call as before."""
    leaves = _stack_leaves(3, True, lambda name, i: name != "wave")
    wave, ws, gs, bs, cbs = leaves
    with d2v_kernels.use_backend(conv_feature_extractor="triton"), d2v_kernels.record_dispatch() as calls:
        for _ in range(2):  # the second call takes the plan
            out = ops.conv_feature_extractor(wave, ws, gs, bs, strides=list(STACK_STRIDES), conv_biases=cbs)
            assert sorted(set(graph_node_names(out))) == ["AccumulateGrad", STACK_NODE]
            assert graph_node_names(out).count(STACK_NODE) == 1
    assert calls == {("conv_feature_extractor", "triton"): 2}
    out = _stack_run(leaves, 3)
    assert graph_node_names(out).count(STACK_NODE) == 1
    out.mul_(2).sum().backward()  # no view made inside the Function: autograd takes it in place
    assert all(t.grad is not None for t in _flat(leaves)[1:])


_STACK_CASES = {  # id: (layers, conv bias, layer 0 fusable, which leaves train)
    "bias-wave": (3, True, True, lambda name, i: True),
    "layer0-conv-frozen-wave": (3, False, False, lambda name, i: name != "wave"),
    "frozen-wave-and-layer0": (3, True, True, lambda name, i: i is not None and i > 0),
    "layer0-conv-frozen-low": (3, True, False, lambda name, i: i == 2 or (i == 1 and name in ("g", "b"))),
    "last-norm-only": (3, False, True, lambda name, i: i == 2 and name in ("g", "b")),
    "one-layer": (1, True, True, lambda name, i: True),
    "one-layer-conv": (1, False, False, lambda name, i: name != "wave"),
}


@pytest.mark.parametrize("case", list(_STACK_CASES))
def test_one_node_gradients_equal_the_per_layer_nodes(case, monkeypatch):
    """The one node's gradients are the per-layer nodes' (the path traced calls take, here as
    their eager autograd.Function twins): the same implementations in the same order, so the same
    bits. Frozen leaves get none. A second backward through the retained graph (the first dropped
    the kept tensors) recomputes them and gives the same again."""
    layers, conv_bias, fusable, trains = _STACK_CASES[case]
    if not fusable:
        monkeypatch.setattr(triton_path, "_conv0_fusable", lambda *args: False)
    leaves = _stack_leaves(layers, conv_bias, trains)
    out = _stack_run(leaves, layers)
    assert graph_node_names(out).count(STACK_NODE) == 1
    grad_out = torch.randn_like(out)
    out.backward(grad_out, retain_graph=True)
    got = [t.grad for t in _flat(leaves)]
    for t in _flat(leaves):
        t.grad = None
    out.backward(grad_out)
    again = [t.grad for t in _flat(leaves)]
    for t in _flat(leaves):
        t.grad = None
    with monkeypatch.context() as m:
        m.setattr(triton_path, "runs_eagerly", lambda inputs: False)  # the per-layer path
        per_layer = _stack_run(leaves, layers)
        assert STACK_NODE not in graph_node_names(per_layer)
        per_layer.backward(grad_out)
    torch.testing.assert_close(out, per_layer, rtol=0, atol=0)
    for i, (leaf, g, g2) in enumerate(zip(_flat(leaves), got, again)):
        if not leaf.requires_grad:
            assert g is None and g2 is None and leaf.grad is None, f"leaf {i}"
            continue
        torch.testing.assert_close(g, leaf.grad, rtol=0, atol=0, msg=f"leaf {i}")
        torch.testing.assert_close(g2, leaf.grad, rtol=0, atol=0, msg=f"leaf {i}, second backward")


@pytest.mark.parametrize("fusable", [True, False], ids=["layer0-kernel", "layer0-conv"])
def test_one_node_under_checkpointing_keeps_no_conv_output_and_computes_the_same(fusable, monkeypatch):
    """Non-reentrant checkpointing (how models/audio.py runs the op when enabled): the node's
    tensors go through its hooks, so no conv output outlives the forward (without it they do,
    for the backward), and the gradients are those of the plain call."""
    import weakref

    if not fusable:
        monkeypatch.setattr(triton_path, "_conv0_fusable", lambda *args: False)
    made, conv_output = [], triton_path._conv_output

    def spy(*args):
        z = conv_output(*args)
        made.append(weakref.ref(z))
        return z

    monkeypatch.setattr(triton_path, "_conv_output", spy)
    leaves = _stack_leaves(3, True, lambda name, i: name != "wave")
    out = _stack_run(leaves, 3)
    assert len(made) == 3 - fusable and all(ref() is not None for ref in made)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, _flat(leaves)[1:], grad_out)
    made.clear()
    out = torch.utils.checkpoint.checkpoint(lambda *args: _stack_run(args, 3), *leaves, use_reentrant=False)
    assert len(made) == 3 - fusable and all(ref() is None for ref in made)
    for g, want in zip(torch.autograd.grad(out, _flat(leaves)[1:], grad_out), expected):
        torch.testing.assert_close(g, want, rtol=0, atol=0)
