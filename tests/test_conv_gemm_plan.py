"""The CUDA extension's GEMM decomposition of a strided Conv1d (d2v_kernels/ops/_conv_gemm_plan.py)
against F.conv1d and its autograd, in float64 on the CPU: forward, input and weight gradients, for
every layer of Data2VecAudio's feature encoder and other kernel / stride pairs with s <= k."""

import pytest
import torch
import torch.nn.functional as F

from d2v_kernels.ops import _conv_gemm_plan as plan

BASE_LAYERS = [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)]
OTHER_LAYERS = [(7, 3), (4, 1), (5, 5), (1, 1), (6, 4), (9, 2)]


def _conv_and_grads(x, weight, bias, stride, grad):
    """F.conv1d on channels-last x, and autograd's (dx, dW, dbias) for the output gradient ``grad``."""
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    z = F.conv1d(x.transpose(1, 2), weight, bias, stride=stride).transpose(1, 2)
    return (z.detach(), *torch.autograd.grad(z, (x, weight, bias), grad))


def _check_layer(batch, t_in, c_in, c_out, kernel, stride, seed):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)
    x, weight, bias = rand(batch, t_in, c_in), rand(c_out, c_in, kernel), rand(c_out)
    t_out = plan.output_frames(t_in, kernel, stride)
    dz = rand(batch, t_out, c_out)
    z, dx, dw, dbias = _conv_and_grads(x, weight, bias, stride, dz)

    torch.testing.assert_close(plan.gemm_conv_forward(x, weight, bias, stride), z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plan.gemm_conv_backward_input(dz, weight, t_in, stride), dx, rtol=1e-12, atol=1e-12)
    got_dw = plan.gemm_conv_backward_weight(x, dz, kernel, stride)
    torch.testing.assert_close(got_dw, dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dz.sum((0, 1)), dbias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch, t_in", [(1, 23), (2, 40), (3, 57)], ids=["B1-T23", "B2-T40", "B3-T57"])
@pytest.mark.parametrize("kernel, stride", BASE_LAYERS[:2] + BASE_LAYERS[5:6], ids=lambda v: str(v))
def test_base_config_layers_equal_conv1d_and_its_gradients(batch, t_in, kernel, stride):
    # layer 0 takes one input channel (the waveform); the others are 512 wide in Data2Vec, narrower here
    c_in = 1 if (kernel, stride) == (10, 5) else 24
    _check_layer(batch, t_in, c_in, 16, kernel, stride, seed=batch * 100 + t_in)


def test_base_config_stack_of_seven_layers_at_odd_lengths():
    """The whole stack's shapes: each layer's T_in is the previous T_out, odd and even alike."""
    seen_parity = set()
    for batch, samples in ((2, 16001), (3, 3001)):
        t_in, c_in = samples, 1
        for i, (kernel, stride) in enumerate(BASE_LAYERS):
            seen_parity.add(t_in % 2)
            _check_layer(batch, t_in, c_in, 8, kernel, stride, seed=i)
            t_in, c_in = plan.output_frames(t_in, kernel, stride), 8
    assert seen_parity == {0, 1}


@pytest.mark.parametrize("kernel, stride", OTHER_LAYERS, ids=lambda v: str(v))
def test_other_kernel_stride_pairs(kernel, stride):
    for t_in in (kernel, kernel + 1, 3 * kernel + 2):
        _check_layer(2, t_in, 5, 3, kernel, stride, seed=t_in)


def test_dgrad_residues_cover_every_frame_once():
    """Each input frame up to the last one read is written by exactly one residue GEMM row (so the
    kernels can write dx without accumulating), and the rows of A stay inside the padded dz."""
    for kernel, stride in BASE_LAYERS + OTHER_LAYERS:
        if kernel == stride:
            continue
        for t_out in (1, 2, 7):
            pad = plan.dgrad_pad(kernel, stride)
            frames = []
            for g in plan.dgrad_gemms(kernel, stride, t_out):
                assert sorted(g.kernel_taps, reverse=True) == list(g.kernel_taps)
                assert all(j % stride == g.residue for j in g.kernel_taps)
                assert g.first_row >= 0 and g.first_row + g.rows - 1 + len(g.kernel_taps) <= pad + t_out + pad
                frames += [stride * q + g.residue for q in range(g.rows)]
            assert sorted(frames) == list(range(stride * (t_out - 1) + kernel))


def test_stride_above_kernel_is_a_reason_and_an_error():
    assert plan.stride_reasons(3, 2, 2) == []
    assert plan.stride_reasons(3, 2, 3) == [
        "layer 3: stride 3 is above its kernel size 2; the GEMM kernels need s <= k"
    ]
    with pytest.raises(ValueError, match="stride 3 is above its kernel size 2"):
        plan.gemm_conv_backward_input(torch.zeros(1, 2, 4), torch.zeros(4, 3, 2), 6, 3)
    with pytest.raises(ValueError, match="x must be contiguous"):
        plan.conv_rows(torch.zeros(1, 4, 9).transpose(1, 2), 2, 2)


# The stack as the binding runs it, against autograd through F.conv1d, F.layer_norm and F.gelu.
STACK = dict(dims=(16, 24, 24, 8), kernels=(10, 3, 2, 3), strides=(5, 2, 2, 1))


def _stack_params(conv_bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0, shift=0.0: (
        torch.randn(*shape, dtype=torch.float64, generator=generator) * scale + shift
    )
    conv_weights, c_in = [], 1
    for c, k in zip(STACK["dims"], STACK["kernels"]):
        conv_weights.append(rand(c, c_in, k, scale=(c_in * k) ** -0.5))
        c_in = c
    ln_weights = [rand(c, scale=0.2, shift=1.0) for c in STACK["dims"]]
    ln_biases = [rand(c, scale=0.2) for c in STACK["dims"]]
    conv_biases = [rand(c, scale=0.2) for c in STACK["dims"]] if conv_bias else []
    return conv_weights, ln_weights, ln_biases, conv_biases


def _autograd_stack(wave, params):
    h = wave[:, None]
    conv_weights, ln_weights, ln_biases, conv_biases = params
    for i, (w, g, b) in enumerate(zip(conv_weights, ln_weights, ln_biases)):
        h = F.conv1d(h, w, conv_biases[i] if conv_biases else None, stride=STACK["strides"][i])
        h = F.gelu(F.layer_norm(h.transpose(1, 2), (w.shape[0],), g, b, 1e-5)).transpose(1, 2)
    return h.transpose(1, 2)


@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-conv-bias", "conv-bias"])
@pytest.mark.parametrize("lowest, wave_grad", [(0, True), (0, False), (2, False)], ids=["wave", "layer-0", "from-2"])
def test_stack_forward_and_backward_equal_autograd(conv_bias, lowest, wave_grad):
    params = _stack_params(conv_bias)
    leaves = [p for group in params for p in group]
    for t in leaves:
        t.requires_grad_(True)
    wave = torch.randn(3, 1601, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    expected = _autograd_stack(wave, params)
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [wave, *leaves], grad_out)
    with torch.no_grad():
        out, conv_outputs = plan.gemm_stack_forward(wave, *params, list(STACK["strides"]), 1e-5)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert [z.shape[1] for z in conv_outputs] == [159, 79, 77]
        got = plan.gemm_stack_backward(
            grad_out, wave, *params, conv_outputs, list(STACK["strides"]), 1e-5, lowest, wave_grad
        )
    d_wave, groups = got[0], got[1:]
    assert (d_wave is not None) == wave_grad
    if wave_grad:
        torch.testing.assert_close(d_wave, want[0], rtol=1e-10, atol=1e-12)
    n = len(STACK["dims"])
    for k, group in enumerate(groups):
        assert len(group) == (n if params[k] else 0)
        for i, got_grad in enumerate(group):
            if i < lowest:
                assert got_grad is None
            else:
                torch.testing.assert_close(got_grad, want[1 + k * n + i], rtol=1e-10, atol=1e-12)
