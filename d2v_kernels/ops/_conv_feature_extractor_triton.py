"""The Triton path of :func:`d2v_kernels.ops.conv_feature_extractor_op` (its ``triton`` backend), and
the nodes the CUDA extension's backward reruns.

Layer 0 (conv on the waveform + LayerNorm + GELU) is one Triton kernel; then per layer cuDNN's
strided conv and the Triton row-norm LayerNorm + GELU reading its output in place, every
activation (B, C, T) in channels-last strides (no transposes). Each node is layer i's LayerNorm +
GELU with layer i + 1's conv, a ``torch.library`` custom op (forward and backward): traced calls
(torch.compile, export) record one a node; eager training runs the same implementations as one
autograd.Function for the whole stack (:class:`ConvFeatureExtractorFunction`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from d2v_kernels.ops._checks import KERNEL_DTYPES, layer_norm_compute_dtype
from d2v_kernels.ops._eager import direct_apply, pick, register_autograd, runs_eagerly, saved_tensors_hooks_active
from d2v_kernels.ops.layer_norm_gelu_op import (
    layer_norm_gelu_bwd_impl,
    layer_norm_gelu_bwd_op,
    layer_norm_gelu_fwd_impl,
    layer_norm_gelu_fwd_op,
    layer_norm_gelu_triton,
    triton_available,
)

try:
    from d2v_kernels.kernels import conv_feature_extractor as _conv0_kernels
    from d2v_kernels.kernels import layer_norm_gelu as _layer_norm_gelu_kernels
    from d2v_kernels.kernels._row_norm import row_reasons
except ImportError:  # triton absent: triton_available() gives the reason
    _conv0_kernels = _layer_norm_gelu_kernels = row_reasons = None


def _channels_last_empty(like: Tensor, channels: int, frames: int) -> Tensor:
    return like.new_empty((like.shape[0], frames, channels)).transpose(1, 2)


_warned_layout_copy = False
_LAYOUT_COPY_WARNED_ON = ("cuda",)  # devices whose convs return channels-last for channels-last inputs


def _channels_last(z: Tensor) -> Tensor:
    """(B, C, T) with channels-last strides (T * C, 1, C): cuDNN returns that layout for a
    channels-last input on the GPU; a copy only where a backend (the CPU's) returned another,
    warned once on the GPU, where it costs a transpose a layer."""
    global _warned_layout_copy
    if z.stride(1) == 1 or z.shape[1] == 1:
        return z
    if z.device.type in _LAYOUT_COPY_WARNED_ON and not _warned_layout_copy:
        _warned_layout_copy = True
        warnings.warn(
            f"d2v_kernels.conv_feature_extractor: a (B, C, T) activation or gradient of shape {tuple(z.shape)}"
            f" has strides {z.stride()} where channels-last was expected (what cuDNN returns for"
            " channels-last inputs); copying it, a transpose each time",
            stacklevel=2,
        )
    return z.transpose(1, 2).contiguous().transpose(1, 2)


def _conv_output(x: Tensor, weight: Tensor, conv_bias: Tensor | None, stride: int) -> Tensor:
    return _channels_last(F.conv1d(x, weight, conv_bias, stride=stride))


def _conv_backward(x, weight, conv_bias, dz, stride, *, input_grad=True):
    """(dx or None, dweight, dconv_bias or empty) of z = conv1d(x, weight, conv_bias, stride).

    The weight gradient comes first, and x is dropped before dx is allocated: a caller that
    passes a recomputed x without keeping it (``_conv_backward(recompute(), ...)``) frees it
    there. dweight is made contiguous: cuDNN may return it channels-last for channels-last x, and
    a custom op's outputs must have the strides its fake implementation gives (torch.compile
    plans with those). The weight goes to the input gradient in channels-last strides, so cuDNN
    writes dx channels-last, like dz."""
    dweight = torch.nn.grad.conv1d_weight(x, weight.shape, dz, stride=stride).contiguous()
    d_conv_bias = dz.sum(dim=(0, 2), dtype=torch.float32).to(dz.dtype) if conv_bias is not None else x.new_empty(0)
    input_shape = x.shape
    del x
    dx = None
    if input_grad:
        weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
        placeholder = dz.new_empty(1).expand(input_shape)
        dx = torch.ops.aten.convolution_backward(
            dz, placeholder, weight, None, [stride], [0], [1], False, [0], 1, [True, False, False]
        )[0]
    return dx, dweight, d_conv_bias


def _conv0_fwd_impl(
    wave: Tensor,
    weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    stride: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y (B, C, T) in wave's dtype, mean (B, T) fp32, rstd (B, T) fp32)."""
    return _conv0_kernels.conv0_ln_gelu(wave, weight, conv_bias, ln_weight, ln_bias, stride, eps)


_conv0_fwd = torch.library.custom_op("d2v_kernels::conv0_ln_gelu", _conv0_fwd_impl, mutates_args=())


@_conv0_fwd.register_fake
def _(wave, weight, conv_bias, ln_weight, ln_bias, stride, eps):
    frames = (wave.shape[1] - weight.shape[2]) // stride + 1
    mean = wave.new_empty((wave.shape[0], frames), dtype=torch.float32)
    return _channels_last_empty(wave, weight.shape[0], frames), mean, torch.empty_like(mean)


def _conv0_bwd_impl(
    dy: Tensor,
    wave: Tensor,
    weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    stride: int,
    eps: float,
    wave_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dwave or empty, dweight, dconv_bias or empty, dln_weight, dln_bias).

    One kernel where it takes the shape (it recomputes the conv output in registers and stores
    neither it nor its gradient). Otherwise the conv output is recomputed (the kernel's pre-norm
    mode: the values the forward normalised), the LayerNorm + GELU backward is the row-norm
    kernel's, the conv gradients are cuDNN's."""
    if not _conv0_kernels.backward_reasons(weight.shape[0], weight.shape[2]):
        # The kernel's tiles are laid out for channels-last dy (what cuDNN's input gradient and
        # the op's output give): a channels-first one compiles to a program that spills 0.5 to
        # 1.5 KB a thread (ptxas, sm_90), so it is copied instead (never, on the GPU path).
        dy = _channels_last(dy)
        dwave, dweight, d_conv_bias, d_ln_weight, d_ln_bias = _conv0_kernels.conv0_ln_gelu_backward(
            dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, stride, wave_grad=wave_grad
        )
        # a distinct empty tensor per missing gradient: a custom op's outputs may not alias each other
        return (
            dwave if wave_grad else wave.new_empty(0),
            dweight,
            d_conv_bias if conv_bias is not None else wave.new_empty(0),
            d_ln_weight,
            d_ln_bias,
        )
    h, _, _ = _conv0_kernels.conv0_ln_gelu(wave, weight, conv_bias, ln_weight, ln_bias, stride, eps, pre_norm_only=True)
    dh, d_ln_weight, d_ln_bias = _layer_norm_gelu_kernels.layer_norm_gelu_backward(
        dy, h, ln_weight, ln_bias, mean, rstd, 1, "none"
    )
    # usually no waveform gradient: the waveform is an input, not a parameter
    dwave, dweight, d_conv_bias = _conv_backward(wave[:, None], weight, conv_bias, dh, stride, input_grad=wave_grad)
    dwave = dwave[:, 0] if wave_grad else wave.new_empty(0)
    return dwave, dweight, d_conv_bias, d_ln_weight, d_ln_bias


_conv0_bwd = torch.library.custom_op("d2v_kernels::conv0_ln_gelu_bwd", _conv0_bwd_impl, mutates_args=())


@_conv0_bwd.register_fake
def _(dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, stride, eps, wave_grad):
    return (
        torch.empty_like(wave) if wave_grad else wave.new_empty(0),
        torch.empty_like(weight),
        torch.empty_like(conv_bias) if conv_bias is not None else wave.new_empty(0),
        torch.empty_like(ln_weight),
        torch.empty_like(ln_bias),
    )


def _conv0_setup_context(ctx, inputs, output):
    wave, weight, conv_bias, ln_weight, ln_bias, stride, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd)  # not the (B, C, T) output
    ctx.stride, ctx.eps = stride, eps
    ctx.mark_non_differentiable(mean, rstd)


def _conv0_backward(ctx, dy, _dmean, _drstd):
    wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    wave_grad = ctx.needs_input_grad[0]
    dwave, dweight, d_conv_bias, d_ln_weight, d_ln_bias = pick(
        _conv0_bwd, _conv0_bwd_impl, (dy, wave, weight, conv_bias, ln_weight, ln_bias)
    )(dy, wave, weight, conv_bias, ln_weight, ln_bias, mean, rstd, ctx.stride, ctx.eps, wave_grad)
    return (
        dwave if wave_grad else None,
        dweight,
        d_conv_bias if conv_bias is not None else None,
        d_ln_weight,
        d_ln_bias,
        None,
        None,
    )


Conv0LayerNormGeluFunction, _conv0_call = register_autograd(
    _conv0_fwd, "Conv0LayerNormGeluFunction", _conv0_fwd_impl, _conv0_setup_context, _conv0_backward
)


# --- Layer i's LayerNorm + GELU with layer i + 1's conv as one autograd node ---------------------
# The activation between them (the conv's input) is the largest tensor of each layer. Saved, it
# would be kept twice over (the conv output z is saved anyway, for the LayerNorm backward); the
# node saves z alone and the backward recomputes the activation from it (one elementwise pass,
# or for layer 0 one read of the waveform) and frees it before the input gradient is allocated.
# So the Triton path keeps one tensor per layer for the backward, eager keeps four.


def _conv0_conv_fwd_impl(
    wave: Tensor,
    w0: Tensor,
    cb0: Tensor | None,
    g0: Tensor,
    b0: Tensor,
    w1: Tensor,
    cb1: Tensor | None,
    s0: int,
    s1: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Layer 0 (one kernel) then layer 1's conv: (z1 (B, C1, T1) channels-last strides, layer 0's
    mean (B, T0) and rstd fp32)."""
    y0, mean0, rstd0 = _conv0_kernels.conv0_ln_gelu(wave, w0, cb0, g0, b0, s0, eps)
    return _conv_output(y0, w1, cb1, s1), mean0, rstd0


def _conv0_conv_bwd_impl(
    dz1: Tensor,
    wave: Tensor,
    w0: Tensor,
    cb0: Tensor | None,
    g0: Tensor,
    b0: Tensor,
    w1: Tensor,
    cb1: Tensor | None,
    mean0: Tensor,
    rstd0: Tensor,
    s0: int,
    s1: int,
    eps: float,
    wave_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dwave or empty, dw0, dcb0 or empty, dg0, db0, dw1, dcb1 or empty): layer 0's output is
    recomputed for layer 1's weight gradient and freed before its input gradient is formed."""
    # y0 passed without a name: _conv_backward frees it before dy0 is allocated
    dy0, dw1, dcb1 = _conv_backward(_conv0_kernels.conv0_ln_gelu(wave, w0, cb0, g0, b0, s0, eps)[0], w1, cb1, dz1, s1)
    dwave, dw0, dcb0, dg0, db0 = _conv0_bwd_impl(dy0, wave, w0, cb0, g0, b0, mean0, rstd0, s0, eps, wave_grad)
    return dwave, dw0, dcb0, dg0, db0, dw1, dcb1


_conv0_conv_fwd = torch.library.custom_op("d2v_kernels::conv0_ln_gelu_conv", _conv0_conv_fwd_impl, mutates_args=())
_conv0_conv_bwd = torch.library.custom_op("d2v_kernels::conv0_ln_gelu_conv_bwd", _conv0_conv_bwd_impl, mutates_args=())


@_conv0_conv_fwd.register_fake
def _(wave, w0, cb0, g0, b0, w1, cb1, s0, s1, eps):
    frames0 = (wave.shape[1] - w0.shape[2]) // s0 + 1
    frames1 = (frames0 - w1.shape[2]) // s1 + 1
    mean = wave.new_empty((wave.shape[0], frames0), dtype=torch.float32)
    return _channels_last_empty(wave, w1.shape[0], frames1), mean, torch.empty_like(mean)


@_conv0_conv_bwd.register_fake
def _(dz1, wave, w0, cb0, g0, b0, w1, cb1, mean0, rstd0, s0, s1, eps, wave_grad):
    return (
        torch.empty_like(wave) if wave_grad else wave.new_empty(0),
        torch.empty_like(w0),
        wave.new_empty(0) if cb0 is None else torch.empty_like(cb0),
        torch.empty_like(g0),
        torch.empty_like(b0),
        torch.empty_like(w1),
        wave.new_empty(0) if cb1 is None else torch.empty_like(cb1),
    )


def _conv0_conv_setup_context(ctx, inputs, output):
    wave, w0, cb0, g0, b0, w1, cb1, s0, s1, eps = inputs
    _, mean0, rstd0 = output
    ctx.save_for_backward(wave, w0, cb0, g0, b0, w1, cb1, mean0, rstd0)  # no activation
    ctx.s0, ctx.s1, ctx.eps = s0, s1, eps
    ctx.mark_non_differentiable(mean0, rstd0)


def _conv0_conv_backward(ctx, dz1, _dmean, _drstd):
    saved = ctx.saved_tensors
    cb0, cb1 = saved[2], saved[6]
    wave_grad = ctx.needs_input_grad[0]
    dwave, dw0, dcb0, dg0, db0, dw1, dcb1 = pick(_conv0_conv_bwd, _conv0_conv_bwd_impl, (dz1, *saved))(
        dz1, *saved, ctx.s0, ctx.s1, ctx.eps, wave_grad
    )
    return (
        dwave if wave_grad else None,
        dw0,
        dcb0 if cb0 is not None else None,
        dg0,
        db0,
        dw1,
        dcb1 if cb1 is not None else None,
        None,
        None,
        None,
    )


Conv0LayerNormGeluConvFunction, _conv0_conv_call = register_autograd(
    _conv0_conv_fwd,
    "Conv0LayerNormGeluConvFunction",
    _conv0_conv_fwd_impl,
    _conv0_conv_setup_context,
    _conv0_conv_backward,
)


def _norm_conv_fwd_impl(
    z: Tensor, g: Tensor | None, b: Tensor | None, w: Tensor, cb: Tensor | None, stride: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """GELU(LayerNorm(z)) over the channels of z (B, C, T), then the next layer's conv: (z_next
    (B, C', T') channels-last strides, mean (B, T) and rstd fp32 of z)."""
    y, mean, rstd = _layer_norm_gelu_kernels.layer_norm_gelu_forward(z, g, b, eps, 1, "none")
    return _conv_output(y, w, cb, stride), mean, rstd


def _norm_conv_bwd_impl(
    dz_next: Tensor,
    z: Tensor,
    g: Tensor | None,
    b: Tensor | None,
    w: Tensor,
    cb: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    stride: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dz, dg or empty, db or empty, dw, dcb or empty): the activation is recomputed from z for
    the weight gradient and freed before its gradient is formed."""
    # the activation passed without a name: _conv_backward frees it before dy is allocated
    norm_gelu = _layer_norm_gelu_kernels.layer_norm_gelu_forward
    dy, dw, dcb = _conv_backward(norm_gelu(z, g, b, eps, 1, "none")[0], w, cb, dz_next, stride)
    # dz over dy (this function's own): one activation-sized buffer less at the backward's peak
    out = dy if dy.stride() == z.stride() else None
    dz, dg, db = _layer_norm_gelu_kernels.layer_norm_gelu_backward(dy, z, g, b, mean, rstd, 1, "none", out=out)
    missing = lambda: z.new_empty(0)  # a distinct tensor each: a custom op's outputs may not alias
    return dz, dg if dg is not None else missing(), db if db is not None else missing(), dw, dcb


_norm_conv_fwd = torch.library.custom_op("d2v_kernels::ln_gelu_conv", _norm_conv_fwd_impl, mutates_args=())
_norm_conv_bwd = torch.library.custom_op("d2v_kernels::ln_gelu_conv_bwd", _norm_conv_bwd_impl, mutates_args=())


@_norm_conv_fwd.register_fake
def _(z, g, b, w, cb, stride, eps):
    frames = (z.shape[2] - w.shape[2]) // stride + 1
    mean = z.new_empty((z.shape[0], z.shape[2]), dtype=torch.float32)
    return _channels_last_empty(z, w.shape[0], frames), mean, torch.empty_like(mean)


@_norm_conv_bwd.register_fake
def _(dz_next, z, g, b, w, cb, mean, rstd, stride, eps):
    return (
        torch.empty_like(z),
        z.new_empty(0) if g is None else torch.empty_like(g),
        z.new_empty(0) if b is None else torch.empty_like(b),
        torch.empty_like(w),
        z.new_empty(0) if cb is None else torch.empty_like(cb),
    )


def _norm_conv_setup_context(ctx, inputs, output):
    z, g, b, w, cb, stride, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(z, g, b, w, cb, mean, rstd)  # z, not the activation: recomputed
    ctx.stride, ctx.eps = stride, eps
    ctx.mark_non_differentiable(mean, rstd)


def _norm_conv_backward(ctx, dz_next, _dmean, _drstd):
    saved = ctx.saved_tensors
    g, b, cb = saved[1], saved[2], saved[4]
    dz, dg, db, dw, dcb = pick(_norm_conv_bwd, _norm_conv_bwd_impl, (dz_next, *saved))(
        dz_next, *saved, ctx.stride, ctx.eps
    )
    return (
        dz,
        dg if g is not None else None,
        db if b is not None else None,
        dw,
        dcb if cb is not None else None,
        None,
        None,
    )


LayerNormGeluConvFunction, _norm_conv_call = register_autograd(
    _norm_conv_fwd, "LayerNormGeluConvFunction", _norm_conv_fwd_impl, _norm_conv_setup_context, _norm_conv_backward
)


def _conv0_fusable(wave, weight, conv_bias, ln_weight, ln_bias) -> bool:
    """Layer 0 runs as one kernel unless autocast mixes dtypes or its shape is out of the kernel's
    range; the per-layer path (the same backend) takes it otherwise."""
    if _conv0_kernels is None or torch.is_autocast_enabled(wave.device.type):
        return False
    return not _conv0_kernels.unsupported_reasons(wave, weight, conv_bias, ln_weight, ln_bias)


# --- The whole stack as one autograd node (eager training) ---------------------------------------
# Node k is layer k's LayerNorm + GELU with layer k + 1's conv (the last, the LayerNorm + GELU
# alone); node 0 also holds layer 0's conv (one kernel with its LayerNorm + GELU where it is
# fusable) and the waveform. The traced path records one custom op a node; eager training runs the
# same implementations in one autograd.Function: one node, one apply, one Python backward for the
# stack. It keeps what the nodes keep (each node's conv output, none for the fused layer 0, and its
# fp32 statistics), from the lowest node with something to differentiate (as the per-node graph
# records no node below it), and drops each node's tensors once its backward has used them.


def _lowest_node(need_wave, need_w, need_g, need_b, need_cb) -> int:
    """The lowest node whose backward gives a gradient that is asked for (n when none is)."""
    n = len(need_w)
    if need_wave or need_w[0] or need_cb[0]:
        return 0
    for k in range(n):
        if need_g[k] or need_b[k] or (k + 1 < n and (need_w[k + 1] or need_cb[k + 1])):
            return k
    return n


def _impl(op, impl):
    """The implementation of a node (the caller runs eagerly on real tensors)."""
    return impl


def _stack_forward(call, wave, ws, gs, bs, cbs, ss, eps, fused0: bool, lowest: int):
    """The stack's forward through the nodes: (y (B, C, T) channels-last, kept), kept[k - lowest] =
    [node k's conv output (None for the fused layer 0), mean, rstd] for the nodes from ``lowest``.
    ``call(custom_op, implementation)`` picks which one runs (the custom op while traced)."""
    n = len(ws)
    kept = []
    if fused0 and n == 1:
        y, mean, rstd = call(_conv0_fwd, _conv0_fwd_impl)(wave, ws[0], cbs[0], gs[0], bs[0], ss[0], eps)
        return y, [[None, mean, rstd]] if lowest == 0 else []
    if fused0:
        z, mean, rstd = call(_conv0_conv_fwd, _conv0_conv_fwd_impl)(
            wave, ws[0], cbs[0], gs[0], bs[0], ws[1], cbs[1], ss[0], ss[1], eps
        )
        if lowest == 0:
            kept.append([None, mean, rstd])
        first = 1
    else:
        z, first = _conv_output(wave[:, None], ws[0], cbs[0], ss[0]), 0
    for k in range(first, n - 1):
        z_next, mean, rstd = call(_norm_conv_fwd, _norm_conv_fwd_impl)(
            z, gs[k], bs[k], ws[k + 1], cbs[k + 1], ss[k + 1], eps
        )
        if k >= lowest:
            kept.append([z, mean, rstd])
        z = z_next
    y, mean, rstd = call(layer_norm_gelu_fwd_op, layer_norm_gelu_fwd_impl)(z, gs[-1], bs[-1], eps, 1, "none")
    kept.append([z, mean, rstd])
    return y, kept


def _stack_backward(call, dy, wave, ws, gs, bs, cbs, ss, eps, fused0: bool, kept, lowest: int, need_conv0):
    """Gradients of the stack from dy (B, C, T), the nodes' backwards from the last down to
    ``lowest``, each node's entry of ``kept`` (from :func:`_stack_forward`) dropped once used:
    (dwave or None, [dw], [dg], [db], [dcb]), None or an empty tensor where a node gave none.
    ``need_conv0`` = (the waveform's gradient, whether layer 0's conv weight or bias needs one)."""
    n = len(ws)
    need_wave, need_w0 = need_conv0
    d_wave, d_w, d_g, d_b, d_cb = None, [None] * n, [None] * n, [None] * n, [None] * n

    def take(k):
        entry, kept[k - lowest] = kept[k - lowest], None
        return entry

    if fused0 and n == 1:
        _, mean, rstd = take(0)
        d_wave, d_w[0], d_cb[0], d_g[0], d_b[0] = call(_conv0_bwd, _conv0_bwd_impl)(
            dy, wave, ws[0], cbs[0], gs[0], bs[0], mean, rstd, ss[0], eps, need_wave
        )
        return d_wave, d_w, d_g, d_b, d_cb
    z, mean, rstd = take(n - 1)
    dz, d_g[-1], d_b[-1] = call(layer_norm_gelu_bwd_op, layer_norm_gelu_bwd_impl)(
        dy, z, gs[-1], bs[-1], mean, rstd, 1, "none"
    )
    del dy
    first = 1 if fused0 else 0
    for k in reversed(range(max(first, lowest), n - 1)):
        z, mean, rstd = take(k)
        dz, d_g[k], d_b[k], d_w[k + 1], d_cb[k + 1] = call(_norm_conv_bwd, _norm_conv_bwd_impl)(
            dz, z, gs[k], bs[k], ws[k + 1], cbs[k + 1], mean, rstd, ss[k + 1], eps
        )
    z = None  # layer 0's backward recomputes its output: no conv output left alive beside it
    if lowest == 0 and fused0:
        _, mean, rstd = take(0)
        d_wave, d_w[0], d_cb[0], d_g[0], d_b[0], d_w[1], d_cb[1] = call(_conv0_conv_bwd, _conv0_conv_bwd_impl)(
            dz, wave, ws[0], cbs[0], gs[0], bs[0], ws[1], cbs[1], mean, rstd, ss[0], ss[1], eps, need_wave
        )
    elif lowest == 0 and (need_wave or need_w0):
        d_wave, d_w[0], d_cb[0] = _conv_backward(wave[:, None], ws[0], cbs[0], dz, ss[0], input_grad=need_wave)
        d_wave = d_wave[:, 0] if need_wave else None
    return d_wave, d_w, d_g, d_b, d_cb


def _input_needs(ctx, n: int):
    """(the waveform's, [conv weights'], [LayerNorm weights'], [LayerNorm biases'], [conv biases'])
    flags of :class:`ConvFeatureExtractorFunction`'s inputs that need a gradient."""
    needs = ctx.needs_input_grad[3:]
    return needs[0], *(needs[1 + i * n : 1 + (i + 1) * n] for i in range(4))


class ConvFeatureExtractorFunction(torch.autograd.Function):
    """The stack, eagerly, as one node: ``apply(strides, eps, fused0, wave, *conv_weights,
    *ln_weights, *ln_biases, *conv_biases)`` (None for absent conv biases; a Function
    differentiates its tensor inputs one by one, not tensors inside lists) -> (B, T, C).

    Where saved-tensor hooks run (non-reentrant checkpointing among them), the nodes' tensors go
    through ``save_for_backward`` and the hooks own them; otherwise they are kept on the context
    and dropped node by node in the backward, so the backward's peak is the per-node graph's
    (a SavedVariable would hold each until the whole backward ends). A second backward through a
    retained graph finds them gone and recomputes them from the saved inputs."""

    @staticmethod
    def forward(ctx, strides, eps, fused0, wave, *params):
        n = len(strides)
        ws, gs, bs, cbs = params[:n], params[n : 2 * n], params[2 * n : 3 * n], params[3 * n :]
        lowest = _lowest_node(*_input_needs(ctx, n))
        y, kept = _stack_forward(_impl, wave, ws, gs, bs, cbs, strides, eps, fused0, lowest)
        ctx.strides, ctx.eps, ctx.fused0, ctx.lowest = strides, eps, fused0, lowest
        if saved_tensors_hooks_active():
            ctx.save_for_backward(wave, *params, *(t for entry in kept for t in entry))
            ctx.kept = None
        else:
            ctx.save_for_backward(wave, *params)
            ctx.kept = kept
        # (B, T, C) detached from y: an output made as a view inside a Function may not be
        # modified in place (autograd forbids it), an alias may
        return y.transpose(1, 2).detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        strides, eps, fused0, lowest = ctx.strides, ctx.eps, ctx.fused0, ctx.lowest
        n = len(strides)
        wave, *saved = ctx.saved_tensors
        params, kept = saved[: 4 * n], ctx.kept
        ws, gs, bs, cbs = params[:n], params[n : 2 * n], params[2 * n : 3 * n], params[3 * n :]
        if kept is None:  # through save_for_backward: one entry of three a node
            kept = [list(saved[i : i + 3]) for i in range(4 * n, len(saved), 3)]
        elif all(entry is None for entry in kept):  # a second backward: the first dropped them
            kept = _stack_forward(_impl, wave, ws, gs, bs, cbs, strides, eps, fused0, lowest)[1]
        else:
            ctx.kept = [None] * len(kept)
        del saved
        need_wave, *need_params = _input_needs(ctx, n)
        d_wave, *d_params = _stack_backward(
            _impl, grad_out.transpose(1, 2), wave, ws, gs, bs, cbs, strides, eps, fused0, kept, lowest,
            (need_wave, need_params[0][0] or need_params[3][0]),
        )  # fmt: skip
        grads = [g if need else None for group, flags in zip(d_params, need_params) for g, need in zip(group, flags)]
        return None, None, None, d_wave if need_wave else None, *grads


_stack_apply = direct_apply(ConvFeatureExtractorFunction)


def run_conv_then_triton_norm(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    """The ``triton`` backend of the op (its arguments, already validated)."""
    n = len(conv_weights)
    conv_biases = conv_biases if conv_biases is not None else [None] * n
    strides, eps = [int(s) for s in strides], float(eps)
    if torch.is_autocast_enabled(wave.device.type):
        return _run_per_layer(wave[:, None], conv_weights, ln_weights, ln_biases, strides, conv_biases, eps)
    w0, lw0, lb0, cb0 = conv_weights[0], ln_weights[0], ln_biases[0], conv_biases[0]
    fused0 = _conv0_fusable(wave, w0, cb0, lw0, lb0)
    parameters = (*conv_weights, *ln_weights, *ln_biases, *conv_biases)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (wave, *parameters))
    if training and runs_eagerly((wave, *parameters)):
        return _stack_apply(tuple(strides), eps, fused0, wave, *parameters)
    if fused0:
        if n == 1:
            return _conv0_call(wave, w0, cb0, lw0, lb0, strides[0], eps)[0].transpose(1, 2)
        w1, cb1 = conv_weights[1], conv_biases[1]
        z, first = _conv0_conv_call(wave, w0, cb0, lw0, lb0, w1, cb1, strides[0], strides[1], eps)[0], 1
    else:
        z, first = _conv_output(wave[:, None], w0, cb0, strides[0]), 0
    # z is layer `first`'s conv output: each node normalises one layer and runs the next conv.
    if not training and runs_eagerly((z, *parameters)):  # inference: no nodes, no statistics stored
        for i in range(first, n):
            g, b = ln_weights[i], ln_biases[i]
            z = _layer_norm_gelu_kernels.layer_norm_gelu_inference_launch(z, g, b, 1, "none")(z, g, b, eps, None)[0]
            if i < n - 1:
                z = _conv_output(z, conv_weights[i + 1], conv_biases[i + 1], strides[i + 1])
        return z.transpose(1, 2)
    # traced (torch.compile, export, a tensor subclass): a custom op a node
    for i in range(first, n - 1):
        z = _norm_conv_call(
            z, ln_weights[i], ln_biases[i], conv_weights[i + 1], conv_biases[i + 1], strides[i + 1], eps
        )[0]
    return layer_norm_gelu_triton(z, ln_weights[-1], ln_biases[-1], eps=eps, channels_dim=1).transpose(1, 2)


def triton_training_plan(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    """:func:`run_conv_then_triton_norm` for eager training (autograd records, no autocast, real
    tensors) on inputs of this layout, decided once (whether layer 0 is one kernel). Returns
    ``run(wave, conv_weights, ln_weights, ln_biases, conv_biases)``, the same values and graph:
    one :class:`ConvFeatureExtractorFunction` node."""
    n = len(conv_weights)
    strides, eps = tuple(int(s) for s in strides), float(eps)
    no_biases = (None,) * n
    cb0 = conv_biases[0] if conv_biases is not None else None
    fused0 = _conv0_fusable(wave, conv_weights[0], cb0, ln_weights[0], ln_biases[0])

    def run(wave, conv_weights, ln_weights, ln_biases, conv_biases):
        biases = conv_biases if conv_biases is not None else no_biases
        return _stack_apply(strides, eps, fused0, wave, *conv_weights, *ln_weights, *ln_biases, *biases)

    return run


def triton_inference_plan(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    """:func:`run_conv_then_triton_norm` for inference (no autograd, no autocast, eager tensors) on
    inputs of this layout, decided once: whether layer 0 is one kernel (and its launch), each
    layer's LayerNorm + GELU launch (made by the first run, for the conv output it gets).
    Returns ``run(wave, conv_weights, ln_weights, ln_biases, conv_biases)``, the same values."""
    n = len(conv_weights)
    strides, eps = [int(s) for s in strides], float(eps)
    no_biases = [None] * n
    cb0 = conv_biases[0] if conv_biases is not None else None
    conv0 = None
    if _conv0_fusable(wave, conv_weights[0], cb0, ln_weights[0], ln_biases[0]):
        conv0 = _conv0_kernels.Conv0Launch(
            wave, conv_weights[0], cb0, ln_weights[0], ln_biases[0], strides[0], keep_stats=False
        )
    first = 1 if conv0 is not None else 0
    # (launch, the conv output strides it was made for) per layer; a conv output of other strides
    # (a conv backend that returned another layout) looks its launch up.
    norms = [(None, None)] * n
    make_norm = _layer_norm_gelu_kernels.layer_norm_gelu_inference_launch

    def run(wave, conv_weights, ln_weights, ln_biases, conv_biases):
        conv_biases = conv_biases if conv_biases is not None else no_biases
        if conv0 is not None:
            z = conv0(wave, conv_weights[0], conv_biases[0], ln_weights[0], ln_biases[0], eps)[0]
            if n == 1:
                return z.transpose(1, 2)
            z = _conv_output(z, conv_weights[1], conv_biases[1], strides[1])
        else:
            z = _conv_output(wave[:, None], conv_weights[0], conv_biases[0], strides[0])
        for i in range(first, n):
            g, b = ln_weights[i], ln_biases[i]
            launch, z_strides = norms[i]
            if z.stride() != z_strides:
                launch = make_norm(z, g, b, 1, "none")
                if z_strides is None:
                    norms[i] = launch, z.stride()
            z = launch(z, g, b, eps, None)[0]
            if i < n - 1:
                z = _conv_output(z, conv_weights[i + 1], conv_biases[i + 1], strides[i + 1])
        return z.transpose(1, 2)

    return run


def triton_nodes_backward(grad_out, wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps, needs):
    """Gradients of the stack as :func:`_layers_backward` returns them, by the Triton path's nodes:
    their forwards rerun from the waveform, keeping what their autograd nodes keep (each layer's
    conv output and fp32 row statistics), then their backwards from the last layer down.

    The cuda backend's inference op's backward formula where the extension is not loaded (its tests
    call it on CPU tensors under the interpreter; with the extension its own backward runs). Its
    forward saves nothing but the inputs. ``ln_weights`` and ``ln_biases`` are tensors (the cuda
    backend fills None affines); ``conv_biases`` is [] or one per layer. Nodes below the lowest one
    with a gradient to give are not walked.
    :func:`_triton_nodes_reasons` must be empty for these inputs.
    """
    need_wave, need_w, need_lw, need_lb, need_cb = needs
    n = len(conv_weights)
    has_bias = bool(conv_biases)
    cbs = list(conv_biases) if has_bias else [None] * n
    need_cb = need_cb if has_bias else [False] * n
    lowest = _lowest_node(need_wave, need_w, need_lw, need_lb, need_cb)
    keep = lambda grads, flags: [g if flag else None for g, flag in zip(grads, flags)]
    if lowest == n:
        return None, [None] * n, [None] * n, [None] * n, [None] * n if has_bias else []
    call = lambda op, impl: pick(op, impl, (wave, *conv_weights))
    args = (wave, conv_weights, ln_weights, ln_biases, cbs, strides, eps)
    fused0 = _conv0_fusable(wave, conv_weights[0], cbs[0], ln_weights[0], ln_biases[0])
    _, kept = _stack_forward(call, *args, fused0, lowest)
    need_conv0 = (need_wave, need_w[0] or need_cb[0])
    d_wave, d_w, d_lw, d_lb, d_cb = _stack_backward(
        call, grad_out.transpose(1, 2), *args, fused0, kept, lowest, need_conv0
    )
    return (
        d_wave if need_wave else None,
        keep(d_w, need_w),
        keep(d_lw, need_lw),
        keep(d_lb, need_lb),
        keep(d_cb, need_cb) if has_bias else [],
    )


def _run_per_layer(h, conv_weights, ln_weights, ln_biases, strides, conv_biases, eps):
    """Under autocast: each conv as autocast runs it, LayerNorm + GELU in the dtype eager's would use."""
    for w, lw, lb, cb, stride in zip(conv_weights, ln_weights, ln_biases, conv_biases, strides):
        h = F.conv1d(h, w, cb, stride=stride)
        h = h.to(layer_norm_compute_dtype(h.device, h.dtype))  # fp32 under CUDA autocast, as eager
        h = layer_norm_gelu_triton(h, lw, lb, eps=eps, channels_dim=1)
    return h.transpose(1, 2)


def triton_composite_reasons(wave, conv_weights, ln_weights, ln_biases, *, strides, conv_biases=None, eps=1e-5):
    """Why the ``triton`` backend cannot take these (validated) arguments; [] when it can."""
    reasons = triton_available()
    if reasons:
        return reasons
    if wave.dtype not in KERNEL_DTYPES:
        return [f"wave has dtype {wave.dtype}; the Triton LayerNorm takes float16, bfloat16, float32"]
    autocast = torch.is_autocast_enabled(wave.device.type)
    for i, (w, lw, lb) in enumerate(zip(conv_weights, ln_weights, ln_biases)):
        if w.dtype != wave.dtype and not autocast:
            reasons.append(f"conv_weights[{i}] has dtype {w.dtype}, wave has {wave.dtype}")
        # The conv output of layer i is what the row-norm kernel normalises, channels-first.
        norm_dtype = layer_norm_compute_dtype(wave.device, wave.dtype)
        reasons += [f"layer {i}: {r}" for r in row_reasons(norm_dtype, w.shape[0], lw, lb)]
    return reasons
