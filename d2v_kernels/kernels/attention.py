"""Triton fused attention, forward and backward (FlashAttention-2 style), with the relative position
bias gathered from its table inside the kernel, a dense additive bias, key padding mask, bottom-right
causal mask and Philox dropout.

Layouts. q, k, v are (B, N, H, d) read through their four strides (no copies). The output and
dq, dk, dv are allocated (B, N, H, d) contiguous. Per-row statistics are fp32 (B, H, Nq):
``lse`` is the log2-sum-exp of the scores in log2 units, ``delta`` = rowsum(dO * O).

Scores live in log2 units inside the kernels: s2 = q.k * scale * log2(e) + bias * log2(e), so the
softmax is exp2(s2 - max). Masked scores (padding, causal, additive biases at or below it) take the
finite value MASK_VALUE, never -inf, so a row whose every key is masked becomes uniform over all Nk
keys, as transformers' eager softmax over finfo.min gives. Keys past Nk (tile padding) are -inf and
never count. Such a fully masked row is stored with lse == MASK_VALUE exactly; the backward gives
it dV = P^T dO with P = 1/Nk (times the dropout keep) and no dS (masked_fill has no gradient).

Padding. Each program reads its batch row's key padding mask once and skips the key blocks past
its last attended key (forward, dK/dV, dQ), so a right-padded batch (transformers' audio and text
masks) costs its valid lengths' work, with no host sync and no extra launch; a mask with holes is
still read in the blocks visited. A row with no attended key visits every key (uniform).

Dropout keeps element (b, h, i, j) when Philox(key, i * Nk + j) >= p, with the 64-bit key
(seed[0] | (seed[1] + b * H + h) << 32) from a (2,) int64 seed tensor; the backward replays it.

Bias gradients. dS summed over the batch (or per batch, for a dense bias with a batch dim) goes
into an fp32 (G, H, Nq, Nk) scratch: from the dQ kernel with a plain store (G = B) or atomics
(G = 1, non-deterministic mode), or from a separate kernel that loops over the batch for each
(head, tile) (G = 1, deterministic mode). The table gradient is then an index-sorted segment sum.

Files. This one: the forward kernel and the launchers the op calls. ``_attention_common``: the
score, dropout and launch helpers both directions share. ``_attention_backward``: delta, dK/dV and
dQ. ``_attention_bias_grad``: the deterministic dS kernel and the table's segment sum. What the AOT
check compiles of them is listed in ``aot_variants``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._attention_backward import attention_backward, backward_launch
from d2v_kernels.kernels._attention_common import (
    LOG2E,
    bias_args,
    dot_precision,
    dropout_keep,
    head_dim_block,
    mask_extent,
    masked_scores,
    philox_key,
    tile_candidates,
    tile_dot,
    tuning_bucket,
    upcast_dot,
)
from d2v_kernels.kernels._launch import DirectLaunch, empty_template, operand_key
from d2v_kernels.kernels._tiles import cdiv
from d2v_kernels.kernels._tiles import on_change as on_tiles_change
from d2v_kernels.kernels.autotune import launch_config

__all__ = [
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "attention_backward",
    "backward_launch",
    "attention_forward",
    "dropout_keep_mask",
    "unsupported_reasons",
]

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
HEAD_DIM_MULTIPLE = 8


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_key_blocks(
    acc,
    l_i,
    m_i,
    q,
    K_BH,
    V_BH,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_m,
    offs_d,
    off_h,
    n_q,
    n_k,
    head_dim,
    scale_log2,
    dropout_p,
    dropout_key,
    TABLE,
    INDEX,
    stride_tr,
    stride_th,
    stride_ii,
    stride_ij,
    BIAS_BH,
    stride_bi,
    stride_bj,
    KEEP_B,
    stride_mj,
    start,
    stop,
    BLOCK_N: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online softmax over the key blocks starting in [start, stop)."""
    in_d = offs_d[None, :] < head_dim
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_k) & in_d
        k = tl.load(K_BH + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = masked_scores(
            q, k, offs_m, offs_n, off_h, n_q, n_k, scale_log2, TABLE, INDEX, stride_tr, stride_th, stride_ii,
            stride_ij, BIAS_BH, stride_bi, stride_bj, KEEP_B, stride_mj,
            HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, PRECISION, UPCAST,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # Dropped weights still count in the normaliser; 1/(1-p) is applied once at the end.
            p = tl.where(dropout_keep(dropout_key, offs_m, offs_n, n_k, dropout_p), p, 0.0)
        v = tl.load(V_BH + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    TABLE,
    INDEX,
    BIAS,
    KEEP,
    SEED,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_on,
    stride_oh,
    stride_tr,
    stride_th,
    stride_ii,
    stride_ij,
    stride_bb,
    stride_bh,
    stride_bi,
    stride_bj,
    stride_mb,
    stride_mj,
    n_heads,
    n_q,
    n_k,
    head_dim,
    scale_log2,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * H): one query block of one (batch, head) against all its keys.
    STORE_LSE: write the log2-sum-exp the backward needs (inference skips it)."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = off_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < head_dim)
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=row_mask,
        other=0.0,
    )
    K_BH = K + off_b * stride_kb + off_h * stride_kh
    V_BH = V + off_b * stride_vb + off_h * stride_vh
    BIAS_BH = BIAS + off_b * stride_bb + off_h * stride_bh
    KEEP_B = KEEP + off_b * stride_mb
    dropout_key = 0
    if HAS_DROPOUT:
        dropout_key = philox_key(SEED, off_bh)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    stop = n_k
    if HAS_MASK:
        kv_end = mask_extent(KEEP_B, stride_mj, n_k)
        # Keys from kv_end on are padding for every row: skipped, unless no key attends (then every
        # row is uniform over all Nk keys).
        stop = tl.where(kv_end > 0, kv_end, n_k)
    if IS_CAUSAL:
        # Keys past the last row's diagonal are masked for the whole block: skip them.
        stop = tl.minimum(stop, (pid_m + 1) * BLOCK_M + n_k - n_q)
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, K_BH, V_BH, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, off_h,
        n_q, n_k, head_dim, scale_log2, dropout_p, dropout_key, TABLE, INDEX, stride_tr, stride_th,
        stride_ii, stride_ij, BIAS_BH, stride_bi, stride_bj, KEEP_B, stride_mj, 0, stop,
        BLOCK_N, HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, HAS_DROPOUT, PRECISION, UPCAST,
    )  # fmt: skip
    if IS_CAUSAL or (HAS_MASK and (HAS_TABLE or HAS_BIAS)):
        # A row with no unmasked key among those seen (causality, or a bias at or below MASK_VALUE
        # on every key before kv_end) is uniform over all Nk keys: when the block has one, visit the
        # skipped keys too (masked for every other row, so they add nothing there).
        start = tl.maximum(tl.cdiv(stop, BLOCK_N) * BLOCK_N, 0)
        fully_masked = (m_i <= -1.0e30) & (offs_m < n_q)
        stop_all = tl.where(tl.max(fully_masked.to(tl.int32), 0) > 0, n_k, start)
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, K_BH, V_BH, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, off_h,
            n_q, n_k, head_dim, scale_log2, dropout_p, dropout_key, TABLE, INDEX, stride_tr, stride_th,
            stride_ii, stride_ij, BIAS_BH, stride_bi, stride_bj, KEEP_B, stride_mj, start, stop_all,
            BLOCK_N, HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, HAS_DROPOUT, PRECISION, UPCAST,
        )  # fmt: skip

    out_scale = 1.0 / l_i
    if HAS_DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)
    out = acc * out_scale[:, None]
    tl.store(
        O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_mask,
    )
    # Fully masked rows store exactly MASK_VALUE: the backward recognises them by it.
    if STORE_LSE:
        lse = tl.where(m_i <= -1.0e30, -1.0e30, m_i + tl.math.log2(l_i))
        tl.store(LSE + off_bh.to(tl.int64) * n_q + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def dropout_mask_kernel(SEED, KEEP_OUT, n_heads, n_q, n_k, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The attention kernels' keep mask as uint8 (B, H, Nq, Nk), for tests and debugging."""
    off_bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(philox_key(SEED, off_bh), offs_m, offs_n, n_k, dropout_p)
    tl.store(
        KEEP_OUT + off_bh.to(tl.int64) * n_q * n_k + offs_m[:, None] * n_k + offs_n[None, :],
        keep.to(tl.uint8),
        mask=(offs_m[:, None] < n_q) & (offs_n[None, :] < n_k),
    )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def unsupported_reasons(q: torch.Tensor, n_k: int, dropout_p: float, tensors: dict) -> list[str]:
    """Plain-language reasons these kernels cannot take the input ([] when they can)."""
    reasons = []
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in dtypes:
        reasons.append(f"dtype {str(q.dtype).replace('torch.', '')} (kernels take float16, bfloat16, float32)")
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or head_dim % HEAD_DIM_MULTIPLE:
        reasons.append(
            f"head dim {head_dim} (kernels take {MIN_HEAD_DIM} to {MAX_HEAD_DIM}, a multiple of {HEAD_DIM_MULTIPLE})"
        )
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and t.dtype not in dtypes:
            reasons.append(
                f"{name} dtype {str(t.dtype).replace('torch.', '')} (kernels take float16, bfloat16, float32)"
            )
    if dropout_p > 0.0 and q.shape[1] * n_k >= 2**31:
        reasons.append(f"dropout with Nq * Nk = {q.shape[1] * n_k} >= 2**31 (the Philox offset is 32-bit)")
    return reasons


# Tiles chosen by the compiler's resource report (ptxas -v for sm_90, no GPU needed): every
# configuration below and in ``_attention_backward.bwd_config`` compiles without a register
# spill except fp32 dK/dV (about 600 bytes; the fp32 path is for precision, not speed). A
# (BLOCK_M, BLOCK_N) tile of the relative position bias or of a dense bias is read through
# per-element 64-bit pointers, which doubles the tile's register cost: those kernels take half
# as wide key blocks (forward) or 8 warps (backward). To be timed on the GPU (bench/tune.py);
# tests/test_aot_compile.py keeps them spill-free.


def fwd_config(dtype: torch.dtype, block_d: int, bias_tile: bool = False, dropout: bool = False) -> dict:
    """Forward tiles: 128 x 64 with 4 warps up to d=64, 8 warps at d=128 or with dropout (its 4
    Philox outputs a group of columns); 128 x 32 with 8 warps when a bias tile is gathered; fp32
    64 x 32 with 8 warps."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if bias_tile:
        return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4 if block_d <= 64 and not dropout else 8, "num_stages": 3}


def forward_tiles(
    q, k, v, bias_table, bias_index, bias, key_padding_mask, causal: bool, dropout: bool, store_lse: bool
) -> dict:
    """The forward's tiles for this input (``autotune.launch_config``: override, autotuned, table or
    :func:`fwd_config`). Autotuning times each candidate on these inputs into scratch outputs."""
    _, _, flags = bias_args(q, k, bias_table, bias_index, bias, key_padding_mask)
    block_d = head_dim_block(q.shape[-1])
    default = fwd_config(q.dtype, block_d, flags["HAS_TABLE"] or flags["HAS_BIAS"], dropout)
    features = {"table": flags["HAS_TABLE"], "bias": flags["HAS_BIAS"], "mask": flags["HAS_MASK"]}
    bucket = tuning_bucket(q.dtype, block_d, q.shape[1], k.shape[1], {**features, "causal": causal, "dropout": dropout})

    def measure(config):
        launch = ForwardLaunch(
            q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout, store_lse, config
        )
        seed = torch.zeros(2, dtype=torch.int64, device=q.device) if dropout else None
        scale, dropout_p = q.shape[-1] ** -0.5, 0.1 if dropout else 0.0
        return lambda: launch(q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, scale, dropout_p)

    candidates = tile_candidates("attention_fwd", q.dtype)
    return launch_config(
        "attention_fwd", default, bucket=bucket, device=q.device, candidates=candidates, measure=measure
    )


class ForwardLaunch:
    """The forward kernel's launch for one input layout (shapes, strides, dtypes, alignment, flags):
    tiles, grid and every integer argument fixed, the compiled kernel launched directly.

    ``launch(q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, scale, dropout_p)`` ->
    (out, lse) as :func:`attention_forward`, for inputs of the layout it was made for (lse None
    without ``store_lse``: inference needs no backward). ``config``: the tiles, by default
    :func:`forward_tiles`'s.
    """

    __slots__ = ("_constexprs", "_ints", "_launch", "_lse", "_out")

    def __init__(
        self, q, k, v, bias_table, bias_index, bias, key_padding_mask, causal: bool, dropout: bool, store_lse: bool,
        config: dict | None = None,
    ):  # fmt: skip
        b, n_q, h, d = q.shape
        n_k = k.shape[1]
        _, strides, flags = bias_args(q, k, bias_table, bias_index, bias, key_padding_mask)
        block_d = head_dim_block(d)
        if config is None:
            config = forward_tiles(q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout, store_lse)
        self._out = empty_template((b, n_q, h, d), q.dtype, q.device)
        self._lse = empty_template((b, h, n_q), torch.float32, q.device) if store_lse else None
        out_strides = (n_q * h * d, h * d, d)
        self._ints = (*q.stride(), *k.stride(), *v.stride(), *out_strides, *strides, h, n_q, n_k, d)
        self._constexprs = (
            config["BLOCK_M"], config["BLOCK_N"], block_d, flags["HAS_TABLE"], flags["HAS_BIAS"], flags["HAS_MASK"],
            causal, dropout, dot_precision(q.dtype), upcast_dot(q), store_lse,
        )  # fmt: skip
        grid = (cdiv(n_q, config["BLOCK_M"]), b * h)
        self._launch = DirectLaunch(
            attention_fwd_kernel, grid, num_warps=config["num_warps"], num_stages=config["num_stages"]
        )

    def __call__(self, q, k, v, bias_table, bias_index, bias, key_padding_mask, seed, scale, dropout_p):
        out = torch.empty_like(self._out)
        lse = None if self._lse is None else torch.empty_like(self._lse)
        self._launch(
            q, k, v, out, out if lse is None else lse, q if bias_table is None else bias_table, q if bias_index is None else bias_index,
            q if bias is None else bias, q if key_padding_mask is None else key_padding_mask,
            q if seed is None else seed, *self._ints, scale * LOG2E, dropout_p, *self._constexprs,
        )  # fmt: skip
        return out, lse


def forward_key(
    q, k, v, bias_table, bias_index, bias, key_padding_mask, causal: bool, dropout: bool, store_lse: bool = True
) -> tuple:
    """What :class:`ForwardLaunch` depends on: one launch serves every input with this key."""
    optional = tuple(operand_key(t) for t in (bias_table, bias_index, bias, key_padding_mask))
    return (
        q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
        q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, optional, causal, dropout,
        dot_precision(q.dtype), store_lse,
    )  # fmt: skip


_forward_launches: dict[tuple, ForwardLaunch] = {}
_MAX_LAUNCHES = 1024
on_tiles_change(_forward_launches.clear)


def forward_launch(
    q, k, v, bias_table, bias_index, bias, key_padding_mask, causal: bool, dropout: bool, store_lse: bool = True
):
    """The :class:`ForwardLaunch` for this input's layout (made once, then looked up)."""
    key = forward_key(q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout, store_lse)
    launch = _forward_launches.get(key)
    if launch is None:
        if len(_forward_launches) >= _MAX_LAUNCHES:
            _forward_launches.clear()
        launch = ForwardLaunch(q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout, store_lse)
        _forward_launches[key] = launch
    return launch


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    bias_index: torch.Tensor | None,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Nq, H, d), k, v (B, Nk, H, d) any strides -> (out (B, Nq, H, d) contiguous in q's dtype,
    lse (B, H, Nq) fp32 in log2 units). ``seed``: (2,) int64 when dropout_p > 0."""
    dropout = dropout_p > 0.0
    launch = forward_launch(q, k, v, bias_table, bias_index, bias, key_padding_mask, causal, dropout)
    return launch(q, k, v, bias_table, bias_index, bias, key_padding_mask, seed if dropout else None, scale, dropout_p)


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, n_q: int, n_k: int, dropout_p: float) -> torch.Tensor:
    """The keep mask the attention kernels draw for this seed: bool (B, H, Nq, Nk)."""
    keep = torch.empty((batch, heads, n_q, n_k), device=seed.device, dtype=torch.uint8)
    grid = (cdiv(n_q, 64), cdiv(n_k, 64), batch * heads)
    dropout_mask_kernel[grid](seed, keep, heads, n_q, n_k, dropout_p, BLOCK_M=64, BLOCK_N=64)
    return keep.bool()
