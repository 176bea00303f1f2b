"""The GEMMs that the CUDA extension runs for a strided Conv1d, written in PyTorch.

The extension (``csrc/conv_gemm.cu``, launched from ``csrc/binding.cpp``) computes each conv layer
of the feature encoder and its gradients as plain GEMMs over strided views of channels-last
tensors, never materialising an im2col matrix. This module is the same decomposition in torch (views
made with ``torch.as_strided``, products with ``@``): the CPU proof, tested against ``F.conv1d`` and
its autograd in float64 (``tests/test_conv_gemm_plan.py``), of what the kernels compute. The
launchers use the same views, strides and offsets as the functions here, one to one.

Notation: x (B, T_in, C_in) contiguous, weight (C_out, C_in, k), stride s <= k, and
T_out = (T_in - k) // s + 1.

- Forward: z[b] = A_b @ W' with A_b = x[b] seen as (T_out, k * C_in) with row stride s * C_in and
  unit column stride: row t is the k frames x[b, s t : s t + k] back to back. Rows overlap when
  k > s (the leading dimension s * C_in is below K = k * C_in). W'[j * C_in + c, o] = weight[o, c, j].
  One GEMM batched over b (batch stride T_in * C_in).
- Weight gradient: dW' = sum_b A_b^T @ dz[b], K = T_out. One batched GEMM with an fp32 partial per
  batch row, summed over b in order (deterministic, no atomics).
- Input gradient: dx[b, s q + r] = sum_m dz[b, q - m] @ W_{r + s m}^T for each residue r < s of the
  output frame (W_j = weight[:, :, j], (C_out, C_in)). Per residue, one GEMM: A row q is the
  M_r = ceil((k - r) / s) frames dz[q - M_r + 1 .. q] back to back, an overlapping view (leading
  dimension C_out, K = M_r * C_out) of dz padded with P = ceil(k / s) - 1 zero frames at both ends
  (the extension's LayerNorm + GELU backward writes dz straight into that padded buffer);
  B stacks W_j^T for j = r + s (M_r - 1), ..., r + s, r; the Q_r = T_out + M_r - 1 output rows go to
  frames r, r + s, r + 2 s, ... of dx (leading dimension s * C_in). With s <= k every frame up to
  s (T_out - 1) + k - 1 belongs to exactly one residue's rows; the frames after it (the input's tail
  that no output frame reads) are zero. When k == s no row overlaps: one GEMM writes dx seen as
  (T_out, k * C_in) with B = weight permuted to (C_out, k * C_in), and no padding is needed.

:func:`gemm_stack_forward` and :func:`gemm_stack_backward` chain these with the LayerNorm + GELU
row steps (:func:`ln_gelu_rows`, :func:`ln_gelu_rows_backward`, the row kernels' formulas) in the
order the binding runs them: what the training forward keeps, what the backward recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ResidueGemm",
    "conv_rows",
    "dgrad_gemms",
    "dgrad_pad",
    "gemm_conv_backward_input",
    "gemm_conv_backward_weight",
    "gemm_conv_forward",
    "gemm_stack_backward",
    "gemm_stack_forward",
    "ln_gelu_rows",
    "ln_gelu_rows_backward",
    "output_frames",
    "stride_reasons",
    "weight_matrix",
]


def output_frames(t_in: int, kernel: int, stride: int) -> int:
    """T_out of a valid (unpadded) strided conv."""
    return (t_in - kernel) // stride + 1


def stride_reasons(layer: int, kernel: int, stride: int) -> list[str]:
    """Why the GEMM decomposition of the input gradient does not hold for this layer ([] when it
    does): with s > k some input frames are read by no output frame, and the residues above k have
    no tap."""
    if stride > kernel:
        return [f"layer {layer}: stride {stride} is above its kernel size {kernel}; the GEMM kernels need s <= k"]
    return []


def conv_rows(x: Tensor, kernel: int, stride: int) -> Tensor:
    """x (B, T_in, C) contiguous -> the GEMM's A operand (B, T_out, k * C), overlapping rows:
    element (b, t, j * C + c) is x[b, s t + j, c]. A view: row stride s * C, batch stride T_in * C."""
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (B, T_in, C)")
    batch, t_in, channels = x.shape
    frames = output_frames(t_in, kernel, stride)
    return x.as_strided((batch, frames, kernel * channels), (t_in * channels, stride * channels, 1))


def weight_matrix(weight: Tensor) -> Tensor:
    """weight (C_out, C_in, k) -> W' (k * C_in, C_out), W'[j * C_in + c, o] = weight[o, c, j]."""
    c_out, c_in, kernel = weight.shape
    return weight.permute(2, 1, 0).reshape(kernel * c_in, c_out)


def gemm_conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int) -> Tensor:
    """Conv output (B, T_out, C_out) = A_b @ W' (+ bias): the forward GEMM."""
    z = conv_rows(x, weight.shape[2], stride) @ weight_matrix(weight)
    return z if bias is None else z + bias


def gemm_conv_backward_weight(x: Tensor, dz: Tensor, kernel: int, stride: int) -> Tensor:
    """dW (C_out, C_in, k) from x (B, T_in, C_in) and dz (B, T_out, C_out): one partial A_b^T @ dz[b]
    per batch row (fp32 in the kernels), summed over b in order."""
    partials = conv_rows(x, kernel, stride).transpose(1, 2) @ dz  # (B, k * C_in, C_out)
    total = partials[0].clone()
    for b in range(1, partials.shape[0]):
        total += partials[b]
    c_in, c_out = x.shape[2], dz.shape[2]
    return total.view(kernel, c_in, c_out).permute(2, 1, 0)


@dataclass(frozen=True)
class ResidueGemm:
    """One GEMM of the input gradient: output frames s q + residue for q < rows.

    A is the padded dz (B, P + T_out + P, C_out) seen as (rows, taps * C_out) from frame
    ``first_row`` with row stride C_out; B stacks weight[:, :, j]^T for j in ``kernel_taps``
    (first block first); D is dx from frame ``residue`` with row stride s * C_in."""

    residue: int
    kernel_taps: tuple[int, ...]
    first_row: int
    rows: int


def dgrad_pad(kernel: int, stride: int) -> int:
    """P: the zero frames on each side of dz that the residue GEMMs read (0 when k == s)."""
    return -(-kernel // stride) - 1


def dgrad_gemms(kernel: int, stride: int, t_out: int) -> list[ResidueGemm]:
    """The input gradient's GEMMs for s < k (k == s is one GEMM, see the module docstring)."""
    pad = dgrad_pad(kernel, stride)
    gemms = []
    for r in range(stride):
        taps = -(-(kernel - r) // stride)  # M_r
        gemms.append(
            ResidueGemm(
                residue=r,
                kernel_taps=tuple(r + stride * (taps - 1 - m) for m in range(taps)),
                first_row=pad - (taps - 1),
                rows=t_out + taps - 1,
            )
        )
    return gemms


def gemm_conv_backward_input(dz: Tensor, weight: Tensor, t_in: int, stride: int) -> Tensor:
    """dx (B, T_in, C_in) from dz (B, T_out, C_out) contiguous: the GEMMs of the module docstring,
    written through strided views of dx as the kernels write it."""
    batch, t_out, c_out = dz.shape
    _, c_in, kernel = weight.shape
    if stride > kernel:
        raise ValueError(stride_reasons(0, kernel, stride)[0])
    dx = dz.new_zeros(batch, t_in, c_in)
    w_t = weight.permute(0, 2, 1).contiguous()  # (C_out, k, C_in): the forward's B, column-major
    if kernel == stride:
        out = dx.as_strided((batch, t_out, kernel * c_in), (t_in * c_in, kernel * c_in, 1))
        out.copy_(dz @ w_t.view(c_out, kernel * c_in))
        return dx
    pad = dgrad_pad(kernel, stride)
    padded = dz.new_zeros(batch, pad + t_out + pad, c_out)
    padded[:, pad : pad + t_out] = dz
    rows_total = padded.shape[1]
    for g in dgrad_gemms(kernel, stride, t_out):
        taps = len(g.kernel_taps)
        a = padded.as_strided(
            (batch, g.rows, taps * c_out), (rows_total * c_out, c_out, 1), storage_offset=g.first_row * c_out
        )
        b = w_t[:, list(g.kernel_taps), :].permute(1, 0, 2).reshape(taps * c_out, c_in)
        out = dx.as_strided(
            (batch, g.rows, c_in),
            (t_in * c_in, stride * c_in, 1),
            storage_offset=dx.storage_offset() + g.residue * c_in,
        )
        out.copy_(a @ b)
    return dx


# --- The whole stack, step by step as csrc/binding.cpp runs it ------------------------------------
# Layer 0 (one input channel) is a direct kernel in the extension, not a GEMM; its conv is written
# here with the same row view (C = 1), which is what its weight gradient uses.


def ln_gelu_rows(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """GELU(LayerNorm(z)) over the last dimension (the row kernel's forward)."""
    mean = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((z - mean) ** 2).mean(-1, keepdim=True) + eps)
    a = (z - mean) * rstd * gamma + beta
    return 0.5 * a * (1.0 + torch.erf(a * 0.5**0.5))


def ln_gelu_rows_backward(z: Tensor, gamma: Tensor, beta: Tensor, dy: Tensor, eps: float):
    """(dz, dgamma, dbeta, dbias) of :func:`ln_gelu_rows` for dy, in the row kernel's steps: xhat,
    da = dy * GELU'(a), dxhat = da * gamma, dz = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat));
    dgamma = sum da xhat, dbeta = sum da, the conv bias gradient sum dz, over every row."""
    mean = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((z - mean) ** 2).mean(-1, keepdim=True) + eps)
    xhat = (z - mean) * rstd
    a = xhat * gamma + beta
    gelu_grad = 0.5 * (1.0 + torch.erf(a * 0.5**0.5)) + a * torch.exp(-0.5 * a * a) * (2.0 * torch.pi) ** -0.5
    da = dy * gelu_grad
    dxhat = da * gamma
    dz = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    rows = tuple(range(z.dim() - 1))
    return dz, (da * xhat).sum(rows), da.sum(rows), dz.sum(rows)


def gemm_stack_forward(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides, eps):
    """(output (B, T, C_last), [z_1, ..., z_{n-1}]): the training forward, keeping each later
    layer's conv output. ``conv_biases`` is [] or one per layer."""
    biases = conv_biases or [None] * len(conv_weights)
    h = ln_gelu_rows(gemm_conv_forward(wave[:, :, None], conv_weights[0], biases[0], strides[0]),
                     ln_weights[0], ln_biases[0], eps)  # fmt: skip
    conv_outputs = []
    for w, g, b, cb, s in zip(conv_weights[1:], ln_weights[1:], ln_biases[1:], biases[1:], strides[1:]):
        z = gemm_conv_forward(h, w, cb, s)
        conv_outputs.append(z)
        h = ln_gelu_rows(z, g, b, eps)
    return h, conv_outputs


def gemm_stack_backward(grad_out, wave, conv_weights, ln_weights, ln_biases, conv_biases, conv_outputs, strides, eps,
                        lowest: int, wave_grad: bool):  # fmt: skip
    """The extension's backward: (d_wave or None, [dW], [dgamma], [dbeta], [dbias]) with None for the
    layers below ``lowest`` (and [] for dbias without conv biases). From the last layer down: the
    row backward from the kept conv output; the layer's input recomputed (layer 0's activation from
    the waveform, else the row forward of the previous conv output); the weight gradient; the input
    gradient while a lower layer needs it. Layer 0's weight gradient reads its frames copied into
    k_pad >= k zero-padded columns (the GEMM's 16-byte accesses); the waveform's gradient is a GEMM
    against the (C, k) weight and an overlap-add."""
    n = len(conv_weights)
    has_bias = bool(conv_biases)
    d_w, d_gamma, d_beta = [None] * n, [None] * n, [None] * n
    d_bias = [None] * n if has_bias else []
    batch = wave.shape[0]
    lengths = [wave.shape[1]]
    for w, s in zip(conv_weights, strides):
        lengths.append(output_frames(lengths[-1], w.shape[2], s))
    g, d_wave = grad_out, None
    for i in reversed(range(lowest, n)):
        w, s = conv_weights[i], strides[i]
        kernel = w.shape[2]
        if i == 0:
            z = gemm_conv_forward(wave[:, :, None], w, conv_biases[0] if has_bias else None, s)
        else:
            z = conv_outputs[i - 1]
        dz, d_gamma[i], d_beta[i], dbias = ln_gelu_rows_backward(z, ln_weights[i], ln_biases[i], g, eps)
        if has_bias:
            d_bias[i] = dbias
        if i == 0:
            k_pad = -(-kernel // 8) * 8
            cols = wave.new_zeros(batch, lengths[1], k_pad)
            cols[:, :, :kernel] = conv_rows(wave[:, :, None].contiguous(), kernel, s)
            d_w[0] = (cols.transpose(1, 2) @ dz).sum(0)[:kernel].t()[:, None]
            if wave_grad:
                d_cols = dz @ w.view(w.shape[0], kernel)  # (B, T_0, k)
                d_wave = wave.new_zeros(wave.shape)
                for j in range(kernel):
                    d_wave[:, j : j + s * (lengths[1] - 1) + 1 : s] += d_cols[:, :, j]
            break
        if i == 1:
            x = ln_gelu_rows(gemm_conv_forward(wave[:, :, None], conv_weights[0], conv_biases[0] if has_bias else None,
                                               strides[0]), ln_weights[0], ln_biases[0], eps)  # fmt: skip
        else:
            x = ln_gelu_rows(conv_outputs[i - 2], ln_weights[i - 1], ln_biases[i - 1], eps)
        d_w[i] = gemm_conv_backward_weight(x, dz, kernel, s)
        if i > lowest:
            g = gemm_conv_backward_input(dz, w, lengths[i], s)
    return d_wave, d_w, d_gamma, d_beta, d_bias
