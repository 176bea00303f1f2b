"""Triton GELU followed by dropout, forward and backward: Data2VecAudio's feed-forward
``dropout(GELU(h))`` (the activation dropout), h = the intermediate dense's output.

    gelu_dropout_fwd_kernel   g = GELU(h) * keep / (1 - p)
    gelu_dropout_bwd_kernel   dh = GELU'(h) * keep / (1 - p) * dg

GELU is exact (erf, ``APPROXIMATE`` 1) or the tanh approximation (2): the row-norm kernels'
``apply_activation`` and ``activation_grad``. The keep mask is drawn in the kernels by Philox from
a (2,) int64 seed tensor and each element's (row, column) of the (rows, columns) input, with the
attention's and the add + LayerNorm's scheme (``_attention_common.dropout_keep``: one Philox call
gives columns 4g..4g+3 of a row, counter row * ceil(columns / 4) + g, key seed[0] | seed[1] << 32):
element (row, column) is kept when its uniform >= p. The backward draws it again from the same
seed: no mask is stored. Math in fp32, outputs in the input's dtype.

Elementwise: a program takes a (BLOCK_R, BLOCK_C) tile of about 4096 elements, columns contiguous
(16-byte vector loads and stores), several rows a program where rows are short. Bytes, in T an
activation's bytes (E bytes an element): the forward reads h and writes g, 2T (+16 of seed a
program); the backward reads h and dg and writes dh, 3T. Against aten's ``gelu`` (2T) then
``native_dropout`` (reads g, writes the dropped g and a bool mask: 2T + T/E), and in the backward
``native_dropout_backward`` (reads dg and the mask, writes: 2T + T/E) then ``gelu_backward`` (3T),
that is 2T + T/E less each way, two launches fewer, and no T/E mask kept from the forward to the
backward.

The launchers keep, per layout, the tiles, grid and integer arguments, and launch the compiled
kernels directly (``_launch.DirectLaunch``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._attention_common import dropout_keep, philox_key
from d2v_kernels.kernels._launch import DirectLaunch, LaunchCache, operand_key
from d2v_kernels.kernels._row_norm import ACTIVATIONS, activation_grad, apply_activation, to_output
from d2v_kernels.kernels._tiles import cdiv, next_power_of_2

__all__ = [
    "gelu_dropout_backward",
    "gelu_dropout_backward_launch",
    "gelu_dropout_forward",
    "gelu_dropout_forward_launch",
    "gelu_dropout_keep",
    "tile_config",
]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tile(pid_r, pid_c, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(rows (int64), columns, in-bounds mask, local rows) of a program's tile."""
    local = tl.arange(0, BLOCK_R)
    rows = pid_r.to(tl.int64) * BLOCK_R + local
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows, cols, mask, local


@triton.jit
def _ptrs(PTR, pid_r, local, cols, stride_r, BLOCK_R: tl.constexpr):
    """Pointers of a tile: a 64-bit base at its first row, int32 offsets within it."""
    return (PTR + pid_r.to(tl.int64) * BLOCK_R * stride_r) + (local[:, None] * stride_r + cols[None, :])


@triton.jit
def gelu_dropout_fwd_kernel(
    H, G, SEED, n_rows, n_cols, stride_h, stride_g, dropout_p,
    APPROXIMATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Bytes: reads h, writes g, and 16 of seed."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    rows, cols, mask, local = _tile(pid_r, pid_c, n_rows, n_cols, BLOCK_R, BLOCK_C)
    h = tl.load(_ptrs(H, pid_r, local, cols, stride_h, BLOCK_R), mask=mask, other=0.0).to(tl.float32)
    keep = dropout_keep(philox_key(SEED, 0), rows, cols, n_cols, dropout_p)
    g = tl.where(keep, apply_activation(h, APPROXIMATE) * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(_ptrs(G, pid_r, local, cols, stride_g, BLOCK_R), to_output(g, G.dtype.element_ty), mask=mask)


@triton.jit
def gelu_dropout_bwd_kernel(
    DG, H, DH, SEED, n_rows, n_cols, stride_dg, stride_h, stride_dh, dropout_p,
    APPROXIMATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Bytes: reads dg and h, writes dh (which may be dg: each element is read before it is
    written, by the program that writes it), and 16 of seed; the mask is drawn again."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    rows, cols, mask, local = _tile(pid_r, pid_c, n_rows, n_cols, BLOCK_R, BLOCK_C)
    dg = tl.load(_ptrs(DG, pid_r, local, cols, stride_dg, BLOCK_R), mask=mask, other=0.0).to(tl.float32)
    h = tl.load(_ptrs(H, pid_r, local, cols, stride_h, BLOCK_R), mask=mask, other=0.0).to(tl.float32)
    keep = dropout_keep(philox_key(SEED, 0), rows, cols, n_cols, dropout_p)
    dh = tl.where(keep, activation_grad(h, APPROXIMATE) * dg * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(_ptrs(DH, pid_r, local, cols, stride_dh, BLOCK_R), to_output(dh, DH.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configuration and launchers
# --------------------------------------------------------------------------------------------

TILE_ELEMENTS = 4096  # a program's elements: 32 a thread at 4 warps (16-byte vectors in every dtype)


def tile_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): up to 1024 columns a tile (at least 16: a Philox call covers
    4), rows filling about TILE_ELEMENTS. Data2Vec audio's 3072 columns: (4, 1024, 4)."""
    block_c = min(max(next_power_of_2(n_cols), 16), 1024)
    block_r = min(TILE_ELEMENTS // block_c, next_power_of_2(max(n_rows, 1)))
    return block_r, block_c, 4


def unsupported_reasons(h: torch.Tensor) -> list[str]:
    """Why the kernels cannot take ``h`` ([] when they can): rows of contiguous columns in a
    kernel dtype."""
    reasons = []
    if h.dtype not in KERNEL_DTYPES:
        reasons.append(f"h has dtype {str(h.dtype).replace('torch.', '')}; the kernels take float16, bfloat16, float32")
    if h.dim() != 2 or h.stride(-1) != 1:
        reasons.append(f"h must be 2D with contiguous columns, got shape {tuple(h.shape)} strides {h.stride()}")
    return reasons


class _Launch:
    """One layout's launch (the operands' shape, strides, dtype, alignment; the GELU): tiles, grid
    and integer arguments fixed, the compiled kernel launched directly. Outputs are
    ``empty_like(h)`` (or ``out``)."""

    __slots__ = ("_constexprs", "_launch", "_n", "_strides")

    def __init__(self, kernel, h: torch.Tensor, approximate: str, strides: tuple[int, ...]):
        n_rows, n_cols = h.shape
        block_r, block_c, num_warps = tile_config(n_rows, n_cols)
        self._n = (n_rows, n_cols)
        self._strides = strides
        self._constexprs = (ACTIVATIONS[approximate], block_r, block_c)
        self._launch = DirectLaunch(kernel, (cdiv(n_rows, block_r), cdiv(n_cols, block_c)), num_warps=num_warps)


class _ForwardLaunch(_Launch):
    """``launch(h, seed, dropout_p)`` -> g."""

    __slots__ = ()

    def __init__(self, h, approximate):
        super().__init__(gelu_dropout_fwd_kernel, h, approximate, (h.stride(0), h.stride(0)))

    def __call__(self, h: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> torch.Tensor:
        g = torch.empty_like(h)
        self._launch(h, g, seed, *self._n, *self._strides, dropout_p, *self._constexprs)
        return g


class _BackwardLaunch(_Launch):
    """``launch(dg, h, seed, dropout_p)`` -> dh, written over dg when made with ``in_place``."""

    __slots__ = ("_in_place",)

    def __init__(self, dg, h, approximate, in_place):
        super().__init__(gelu_dropout_bwd_kernel, h, approximate, (dg.stride(0), h.stride(0), h.stride(0)))
        self._in_place = in_place

    def __call__(self, dg: torch.Tensor, h: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> torch.Tensor:
        dh = dg if self._in_place else torch.empty_like(h)
        self._launch(dg, h, dh, seed, *self._n, *self._strides, dropout_p, *self._constexprs)
        return dh


_launches = LaunchCache()


def gelu_dropout_forward_launch(h: torch.Tensor, approximate: str) -> _ForwardLaunch:
    """The forward's launch for ``h``'s layout (made once, then looked up): ``launch(h, seed,
    dropout_p)`` -> ``dropout(GELU(h))`` like h (contiguous), the keep mask from ``seed`` ((2,)
    int64). :func:`unsupported_reasons` must be empty for h."""
    key = ("fwd", operand_key(h), h.device, approximate)
    return _launches.get(key, lambda: _ForwardLaunch(h, approximate))


def gelu_dropout_backward_launch(
    dg: torch.Tensor, h: torch.Tensor, approximate: str, *, in_place: bool = False
) -> _BackwardLaunch:
    """The backward's launch for this layout: ``launch(dg, h, seed, dropout_p)`` -> h's gradient
    (the forward's seed and p: the same mask). ``in_place``: written over dg (of h's shape and
    strides; the caller keeps no other use of it)."""
    if in_place and (dg.shape != h.shape or dg.stride() != h.stride()):
        raise ValueError(f"in_place needs dg of h's shape and strides, got {dg.stride()} and {h.stride()}")
    key = ("bwd", operand_key(dg), operand_key(h), h.device, approximate, in_place)
    return _launches.get(key, lambda: _BackwardLaunch(dg, h, approximate, in_place))


def gelu_dropout_forward(h: torch.Tensor, seed: torch.Tensor, dropout_p: float, approximate: str = "none"):
    """``dropout(GELU(h))`` for a 2D ``h`` with contiguous columns; see the module docstring."""
    return gelu_dropout_forward_launch(h, approximate)(h, seed, float(dropout_p))


def gelu_dropout_backward(
    dg: torch.Tensor, h: torch.Tensor, seed: torch.Tensor, dropout_p: float, approximate: str = "none"
) -> torch.Tensor:
    """h's gradient through :func:`gelu_dropout_forward` with the same seed and p."""
    return gelu_dropout_backward_launch(dg, h, approximate)(dg, h, seed, float(dropout_p))


def gelu_dropout_keep(
    seed: torch.Tensor, shape: Sequence[int], dropout_p: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """The keep mask (bool, ``shape``: rows of the last dim's columns, on ``device``, by default
    the seed's) that the kernels draw for ``seed`` and ``dropout_p``, whatever the dtype: for tests
    and an eager reference (``dropout(g) = g * keep / (1 - p)``).

    Materialised by the forward kernel itself (h = 1 in fp32: kept elements hold GELU(1) / (1 - p)
    > 0, dropped ones 0), so it is the kernels' mask by construction."""
    device = seed.device if device is None else torch.device(device)
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    ones = torch.ones((math.prod(shape[:-1]), shape[-1]), dtype=torch.float32, device=device)
    return (gelu_dropout_forward(ones, seed.to(device), dropout_p) != 0).view(shape)
