"""Tile overrides (d2v_kernels.kernels._tiles): every tile a tuning run may pick computes the same
function. Attention and pos_conv forward and gradients under other BLOCK sizes than the defaults,
against float64, on lengths that are not multiples of any block (CPU interpreter)."""

import pytest
import torch
from test_attention import HEADS, check_gradients, make_qkv, padding_mask, reference64, relative_bias, run_triton

import d2v_kernels
from d2v_kernels import ops
from d2v_kernels.kernels import _tiles
from d2v_kernels.kernels import attention as attention_kernels
from d2v_kernels.kernels import pos_conv as pos_conv_kernels
from d2v_kernels.testing import assert_close_to_reference

ATTENTION_TILES = [
    {"BLOCK_M": 16, "BLOCK_N": 32, "num_stages": 1},
    {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128},
]


def _attention_case(dtype):
    b, n_q, n_k, d = 2, 50, 41, 48
    q, k, v = make_qkv(b, n_q, n_k, d, dtype)
    table, index = relative_bias(n_q, n_k, dtype)
    mask = padding_mask(b, n_k, [n_k - 7, 12])
    return q, k, v, dict(bias_table=table, bias_index=index, key_padding_mask=mask, causal=True)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("config", ATTENTION_TILES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_attention_forward_under_other_tiles(config):
    q, k, v, kwargs = _attention_case(torch.float16)
    with _tiles.override("attention_fwd", **config):
        out = run_triton(q, k, v, **kwargs)
    assert_close_to_reference(out, reference64(q, k, v, **kwargs), ops.attention_reference(q, k, v, **kwargs))


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("config", ATTENTION_TILES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_attention_gradients_under_other_tiles(config, deterministic):
    q, k, v, kwargs = _attention_case(torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with _tiles.override("attention_fwd", **config), _tiles.override("attention_bwd", **config):
            check_gradients(q, k, v, kwargs, params=("bias_table",))
    finally:
        torch.use_deterministic_algorithms(previous)


def _spy_launches(monkeypatch, module, name, keys):
    """Replace ``module.name`` (a Triton kernel) by one that records (grid, *arguments[keys]) per
    launch, through ``kernel[grid](...)`` or the direct launch path's ``kernel.run(..., grid=...)``."""
    seen = []
    real = getattr(module, name)

    class Spy:
        def __getattr__(self, attr):
            return getattr(real, attr)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid, *(kwargs[k] for k in keys)))
                return real[grid](*args, **kwargs)

            return launch

        def run(self, *args, grid, **kwargs):
            arguments = dict(zip(real.arg_names, args)) | kwargs
            seen.append((grid, *(arguments[k] for k in keys)))
            return real.run(*args, grid=grid, **kwargs)

    monkeypatch.setattr(module, name, Spy())
    return seen


def test_override_reaches_the_launcher_and_ends_with_the_block(monkeypatch):
    seen = _spy_launches(monkeypatch, attention_kernels, "attention_fwd_kernel", ("BLOCK_M", "BLOCK_N"))
    q, k, v = make_qkv(1, 40, 40, 16)
    with _tiles.override("attention_fwd", BLOCK_M=16, BLOCK_N=16):
        run_triton(q, k, v)
    run_triton(q, k, v)
    assert seen[0] == ((3, HEADS), 16, 16)
    default = attention_kernels.fwd_config(torch.float32, 16)
    assert seen[1][1:] == (default["BLOCK_M"], default["BLOCK_N"])


def _pos_conv_case(dtype):
    torch.manual_seed(0)
    channels, groups, kernel_size, frames = 48, 3, 7, 45
    x = torch.randn(2, frames, channels, dtype=torch.float64)
    weight = 0.2 * torch.randn(channels, channels // groups, kernel_size, dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64)
    return x, [weight], [bias], groups


@pytest.mark.parametrize(
    "conv, wgrad",
    [
        ({"BLOCK_T": 16, "BLOCK_CI": 16, "num_stages": 1}, {"BLOCK_T": 16}),
        ({"BLOCK_T": 128, "num_warps": 8}, {"BLOCK_T": 128, "num_warps": 8}),
    ],
    ids=["small", "large"],
)
@pytest.mark.usefixtures("on_device")
def test_pos_conv_forward_and_gradients_under_other_tiles(conv, wgrad, monkeypatch):
    x64, weights64, biases64, groups = _pos_conv_case(torch.float32)
    grad64 = torch.randn_like(x64)

    def run(x, weights, biases, force):
        leaves = [t.detach().clone().requires_grad_() for t in (x, *weights, *biases)]
        if force:
            with d2v_kernels.use_backend(pos_conv="triton"):
                out = ops.pos_conv(leaves[0], [leaves[1]], [leaves[2]], groups=groups)
        else:
            out = ops.pos_conv_reference(leaves[0], [leaves[1]], [leaves[2]], groups=groups)
        out.backward(grad64.to(out.dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    x32, w32, b32 = x64.float(), [w.float() for w in weights64], [b.float() for b in biases64]
    conv_launches = _spy_launches(monkeypatch, pos_conv_kernels, "grouped_conv1d_kernel", ("BLOCK_T", "num_warps"))
    wgrad_launches = _spy_launches(
        monkeypatch, pos_conv_kernels, "grouped_conv1d_weight_grad_kernel", ("BLOCK_T", "num_warps")
    )
    with _tiles.override("pos_conv", **conv), _tiles.override("pos_conv_wgrad", **wgrad):
        got = run(x32, w32, b32, force=True)
    # forward conv and the dx conv of the backward; then the weight gradient
    assert [launch[1:] for launch in conv_launches] == [(conv["BLOCK_T"], conv.get("num_warps", 4))] * 2
    assert [launch[1:] for launch in wgrad_launches] == [(wgrad["BLOCK_T"], wgrad.get("num_warps", 4))]
    ref = run(x64, weights64, biases64, force=False)
    eager = run(x32, w32, b32, force=False)
    for name, g, r, e in zip(("out", "dx", "dweight", "dbias"), got, ref, eager):
        assert_close_to_reference(g, r, e, name=name)


@pytest.mark.parametrize(
    "kernel, config, message",
    [
        ("attention", {"BLOCK_M": 64}, "kernel must be one of"),
        ("attention_fwd", {"BLOCK_K": 64}, "unknown keys ['BLOCK_K']"),
        ("attention_fwd", {"BLOCK_M": 48}, "BLOCK_M must be a power of two"),
        ("pos_conv", {"num_stages": 0}, "num_stages must be a positive int"),
        ("pos_conv", {"BLOCK_T": True}, "BLOCK_T must be a positive int"),
    ],
)
def test_override_rejects_bad_configs(kernel, config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        with _tiles.override(kernel, **config):
            pass
    assert _tiles.tiles("attention_fwd", {"BLOCK_M": 1}) == {"BLOCK_M": 1}


def test_row_norm_tiles_and_backward_programs_are_overridable(monkeypatch):
    """LayerNorm + GELU under other tiles and program counts: the launches take them, and the
    forward and every gradient still match float64."""
    from d2v_kernels.kernels import _row_norm

    fwd = _spy_launches(monkeypatch, _row_norm, "row_norm_fwd_kernel", ("BLOCK_P", "num_warps"))
    bwd = _spy_launches(monkeypatch, _row_norm, "row_norm_bwd_kernel", ("BLOCK_P", "num_warps"))
    x64 = torch.randn(2, 48, 37, dtype=torch.float64)
    w64, b64 = 1.0 + 0.3 * torch.randn(48, dtype=torch.float64), 0.2 * torch.randn(48, dtype=torch.float64)
    grad64 = torch.randn_like(x64)

    def run(x, w, b, force):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        if force:
            with d2v_kernels.use_backend(layer_norm_gelu="triton"):
                out = ops.layer_norm_gelu(*leaves, channels_dim=1)
        else:
            out = ops.layer_norm_gelu_reference(*leaves, channels_dim=1)
        out.backward(grad64.to(out.dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    x32, w32, b32 = x64.float(), w64.float(), b64.float()
    with (
        _tiles.override("row_norm_fwd", BLOCK_P=4, num_warps=2),
        _tiles.override("row_norm_bwd", BLOCK_P=2, num_warps=2, programs_per_sm=1),
    ):
        got = run(x32, w32, b32, force=True)
    assert [launch[1:] for launch in fwd] == [(4, 2)] and fwd[0][0] == (2 * 10,)  # 2 batches x cdiv(37, 4)
    assert [launch[1:] for launch in bwd] == [(2, 2)]
    ref, eager = run(x64, w64, b64, force=False), run(x32, w32, b32, force=False)
    for name, g, r, e in zip(("out", "dx", "dweight", "dbias"), got, ref, eager):
        assert_close_to_reference(g, r, e, name=name)
