"""Attention backward (FlashAttention-2 style): delta = rowsum(dO * O), then dK and dV by key
block, then dQ by query block, each recomputing P from the forward's log2-sum-exp. The dQ kernel
also stores or adds dS where a bias needs its gradient (:mod:`._attention_bias_grad`). The
conventions (log2 units, fully masked rows, dropout replay) are in
:mod:`d2v_kernels.kernels.attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._attention_bias_grad import attention_bwd_ds_kernel, reduce_to_shape, relative_bias_table_grad
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
from d2v_kernels.kernels._launch import DirectLaunch, empty_template, fixed_tail, operand_key
from d2v_kernels.kernels._tiles import cdiv
from d2v_kernels.kernels._tiles import on_change as on_tiles_change
from d2v_kernels.kernels.autotune import launch_config

# ds_mode of the dQ kernel: what it does with the score gradient dS.
DS_NONE, DS_STORE, DS_ATOMIC = 0, 1, 2


@triton.jit
def attention_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_on,
    stride_oh,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dod,
    n_heads,
    n_q,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, (B, H, Nq). Grid (cdiv(Nq, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = off_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < head_dim)
    o = tl.load(
        O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
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
    stride_dob,
    stride_don,
    stride_doh,
    stride_dod,
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
    stride_gn,
    n_heads,
    n_q,
    n_k,
    head_dim,
    scale,
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
):
    """dK, dV of one key block of one (batch, head). Grid (cdiv(Nk, BLOCK_N), B * H)."""
    pid_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = off_bh % n_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d[None, :] < head_dim
    kv_mask = (offs_n[:, None] < n_k) & in_d
    k = tl.load(
        K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    Q_BH = Q + off_b * stride_qb + off_h * stride_qh
    DO_BH = DO + off_b * stride_dob + off_h * stride_doh
    BIAS_BH = BIAS + off_b * stride_bb + off_h * stride_bh
    KEEP_B = KEEP + off_b * stride_mb
    LSE_BH = LSE + off_bh.to(tl.int64) * n_q
    DELTA_BH = DELTA + off_bh.to(tl.int64) * n_q
    dropout_key = 0
    if HAS_DROPOUT:
        dropout_key = philox_key(SEED, off_bh)
    inv_n_k = 1.0 / n_k

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start_m = 0
    if IS_CAUSAL:
        # Query blocks before the first row that sees this key block have every score here masked.
        start_m = tl.maximum(start_n - (n_k - n_q), 0) // BLOCK_M * BLOCK_M
    if HAS_MASK:
        # A key block at or past the row's last attended key: every query block is skipped, unless
        # no key attends (every row uniform over all keys: the loop below gives their dV).
        kv_end = mask_extent(KEEP_B, stride_mj, n_k)
        start_m = tl.where((start_n >= kv_end) & (kv_end > 0), n_q, start_m)
    if IS_CAUSAL or (HAS_MASK and (HAS_TABLE or HAS_BIAS)):
        # In skipped query blocks only fully masked rows (uniform over all keys: by causality, or
        # by a bias at or below MASK_VALUE before the last attended key) reach dV, no dS.
        for skipped_m in range(0, start_m, BLOCK_M):
            offs_m = skipped_m + tl.arange(0, BLOCK_M)
            lse = tl.load(LSE_BH + offs_m, mask=offs_m < n_q, other=float("inf"))
            fully_masked = lse <= -1.0e30
            if tl.max(fully_masked.to(tl.int32), 0) > 0:
                row_mask = (offs_m[:, None] < n_q) & in_d
                do = tl.load(
                    DO_BH + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=row_mask, other=0.0
                )
                p = tl.where(fully_masked[:, None] & (offs_n[None, :] < n_k), inv_n_k, 0.0)
                if HAS_DROPOUT:
                    p = tl.where(dropout_keep(dropout_key, offs_m, offs_n, n_k, dropout_p), p, 0.0)
                dv += tile_dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
    for block_m in range(start_m, n_q, BLOCK_M):
        offs_m = block_m + tl.arange(0, BLOCK_M)
        row_mask = (offs_m[:, None] < n_q) & in_d
        q = tl.load(Q_BH + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
        do = tl.load(DO_BH + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=row_mask, other=0.0)
        lse = tl.load(LSE_BH + offs_m, mask=offs_m < n_q, other=float("inf"))  # padded rows: P = 0
        delta = tl.load(DELTA_BH + offs_m, mask=offs_m < n_q, other=0.0)
        s = masked_scores(
            q, k, offs_m, offs_n, off_h, n_q, n_k, scale_log2, TABLE, INDEX, stride_tr, stride_th, stride_ii,
            stride_ij, BIAS_BH, stride_bi, stride_bj, KEEP_B, stride_mj,
            HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, PRECISION, UPCAST,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        p_ds = p
        if HAS_MASK or HAS_BIAS or IS_CAUSAL:
            fully_masked = (lse <= -1.0e30)[:, None]
            p_ds = tl.where(fully_masked, 0.0, p)
            p = tl.where(fully_masked, p * inv_n_k, p)
        dp = tile_dot(do, tl.trans(v), PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = dropout_keep(dropout_key, offs_m, offs_n, n_k, dropout_p)
            p = tl.where(keep, p, 0.0)  # 1/(1-p) applied to dV once at the end
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        dv += tile_dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        ds = p_ds * (dp - delta[:, None])
        dk += tile_dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)

    if HAS_DROPOUT:
        dv *= 1.0 / (1.0 - dropout_p)
    dk *= scale
    # dK, dV are (B, Nk, H, d) with rows stride_gn apart (H * d, or 3 * H * d packed with dQ).
    out_offs = off_b * n_k * stride_gn + off_h * head_dim + offs_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DS,
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
    stride_dob,
    stride_don,
    stride_doh,
    stride_dod,
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
    stride_gn,
    n_heads,
    n_q,
    n_k,
    head_dim,
    scale,
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
    DS_MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dQ of one query block of one (batch, head); with DS_MODE also dS (natural units) into the
    (G, H, Nq, Nk) fp32 scratch DS: stored at [b] (G = B) or atomically added at [0] (G = 1).
    Grid (cdiv(Nq, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = off_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d[None, :] < head_dim
    row_mask = (offs_m[:, None] < n_q) & in_d
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=row_mask,
        other=0.0,
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=row_mask,
        other=0.0,
    )
    lse = tl.load(LSE + off_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    K_BH = K + off_b * stride_kb + off_h * stride_kh
    V_BH = V + off_b * stride_vb + off_h * stride_vh
    BIAS_BH = BIAS + off_b * stride_bb + off_h * stride_bh
    KEEP_B = KEEP + off_b * stride_mb
    if DS_MODE == 1:
        DS_BH = DS + off_bh.to(tl.int64) * n_q * n_k
    else:
        DS_BH = DS + off_h.to(tl.int64) * n_q * n_k
    dropout_key = 0
    if HAS_DROPOUT:
        dropout_key = philox_key(SEED, off_bh)
    keep_scale = 1.0
    if HAS_DROPOUT:
        keep_scale = 1.0 / (1.0 - dropout_p)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys past the row's last attended key, or past the block's last diagonal, have P = 0 (fully
    # masked rows included: they have no dS): skipped.
    stop = n_k
    if HAS_MASK:
        stop = mask_extent(KEEP_B, stride_mj, n_k)
    if IS_CAUSAL:
        stop = tl.minimum(stop, (pid_m + 1) * BLOCK_M + n_k - n_q)
    for start_n in range(0, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_k) & in_d
        k = tl.load(K_BH + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V_BH + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = masked_scores(
            q, k, offs_m, offs_n, off_h, n_q, n_k, scale_log2, TABLE, INDEX, stride_tr, stride_th, stride_ii,
            stride_ij, BIAS_BH, stride_bi, stride_bj, KEEP_B, stride_mj,
            HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, PRECISION, UPCAST,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        if HAS_MASK or HAS_BIAS or IS_CAUSAL:
            p = tl.where((lse <= -1.0e30)[:, None], 0.0, p)
        dp = tile_dot(do, tl.trans(v), PRECISION, UPCAST)
        if HAS_DROPOUT:
            dp = tl.where(dropout_keep(dropout_key, offs_m, offs_n, n_k, dropout_p), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tile_dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        if DS_MODE != 0:
            ds_ptrs = DS_BH + offs_m[:, None] * n_k + offs_n[None, :]
            ds_mask = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_k)
            if DS_MODE == 1:
                tl.store(ds_ptrs, ds, mask=ds_mask)
            else:
                tl.atomic_add(ds_ptrs, ds, mask=ds_mask, sem="relaxed")
    dq *= scale
    out_offs = off_b * n_q * stride_gn + off_h * head_dim + offs_m[:, None] * stride_gn + offs_d[None, :]
    tl.store(DQ + out_offs, dq.to(DQ.dtype.element_ty), mask=row_mask)


def bwd_config(dtype: torch.dtype, block_d: int) -> dict:
    """dK/dV, dQ and dS tiles, 8 warps: 64 x 64 up to d=64, 32 x 64 at d=128, fp32 32 x 32."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if block_d > 64:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def backward_tiles(
    grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p, scale,
    table_grad, bias_grad, deterministic,
) -> dict:  # fmt: skip
    """The tiles of dK/dV, dQ and dS for this input (``autotune.launch_config``: override, autotuned,
    table or :func:`bwd_config`). Autotuning times each candidate's whole backward on these inputs;
    it allocates its own gradients."""
    _, _, flags = bias_args(q, k, bias_table, bias_index, bias, key_padding_mask)
    block_d = head_dim_block(q.shape[-1])
    features = {"table": flags["HAS_TABLE"], "bias": flags["HAS_BIAS"], "mask": flags["HAS_MASK"]}
    features.update(causal=causal, dropout=dropout_p > 0.0, det=deterministic and (table_grad or bias_grad))
    bucket = tuning_bucket(q.dtype, block_d, q.shape[1], k.shape[1], features)
    args = (grad_out, q, k, v, out, bias_table, bias_index, bias, key_padding_mask, causal, dropout_p, scale,
            table_grad, bias_grad, deterministic)  # fmt: skip

    def measure(config):
        launch = BackwardLaunch(*args, config)
        return lambda: launch(grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed)

    default = bwd_config(q.dtype, block_d)
    candidates = tile_candidates("attention_bwd", q.dtype)
    return launch_config(
        "attention_bwd", default, bucket=bucket, device=q.device, candidates=candidates, measure=measure
    )


class BackwardLaunch:
    """The backward's launches for one layout (every input's shape, strides, dtype and alignment;
    flags, scale, dropout probability): tiles, grids and integer arguments fixed, the compiled
    kernels launched directly. ``launch(grad_out, q, k, v, out, lse, bias_table, bias_index, bias,
    key_padding_mask, seed)`` -> :func:`attention_backward`'s result; ``config``: the tiles
    (:func:`backward_tiles`). ``packed`` (self-attention, Nq = Nk): dQ, dK and dV written into one
    (B, N, 3, H, d) tensor, returned first in place of dq, with None for dk and dv: the gradient of
    a fused QKV projection's output, no concatenation."""

    __slots__ = (
        "_bias_grad", "_delta", "_dkdv", "_dkv_out", "_dq", "_dq_out", "_dqkv_out", "_ds", "_ds_mode", "_ds_shape",
        "_pre", "_table_grad",
    )  # fmt: skip

    def __init__(self, grad_out, q, k, v, out, bias_table, bias_index, bias, key_padding_mask, causal, dropout_p,
                 scale, table_grad, bias_grad, deterministic, config: dict, packed: bool = False):  # fmt: skip
        b, n_q, h, d = q.shape
        n_k = k.shape[1]
        if packed and (n_k != n_q or k.shape != q.shape or v.shape != q.shape):
            raise ValueError(f"packed gradients need q, k and v of one shape, got {q.shape}, {k.shape}, {v.shape}")
        self._dqkv_out = empty_template((b, n_q, 3, h, d), q.dtype, q.device) if packed else None
        block_d = head_dim_block(d)
        _, strides, flags = bias_args(q, k, bias_table, bias_index, bias, key_padding_mask)
        common = dict(
            BLOCK_D=block_d, IS_CAUSAL=causal, HAS_DROPOUT=dropout_p > 0.0, PRECISION=dot_precision(q.dtype),
            UPCAST=upcast_dot(q), **flags,
        )  # fmt: skip
        self._delta = empty_template((b, h, n_q), torch.float32, q.device)
        self._dq_out = empty_template((b, n_q, h, d), q.dtype, q.device)
        self._dkv_out = empty_template((b, n_k, h, d), q.dtype, q.device)
        pre_block_m = 64
        pre_tail = fixed_tail(
            attention_bwd_preprocess_kernel, 3, (*out.stride()[:3], *grad_out.stride(), h, n_q, d),
            {"BLOCK_M": pre_block_m, "BLOCK_D": block_d},
        )  # fmt: skip
        # 4 warps spill (ptxas, sm_90)
        self._pre = (
            DirectLaunch(attention_bwd_preprocess_kernel, (cdiv(n_q, pre_block_m), b * h), num_warps=8),
            pre_tail,
        )

        options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
        blocks = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
        io_strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
        tail = (*io_strides, *strides, (3 if packed else 1) * h * d, h, n_q, n_k, d, scale, scale * LOG2E, dropout_p)
        self._dkdv = (
            DirectLaunch(attention_bwd_dkdv_kernel, (cdiv(n_k, config["BLOCK_N"]), b * h), **options),
            fixed_tail(attention_bwd_dkdv_kernel, 13, tail, {**common, **blocks}),
        )

        # dS scratch: per batch when a dense bias with a batch dim needs its gradient, else summed.
        need_ds = table_grad or bias_grad
        per_batch = bias_grad and b > 1 and bias.dim() == 4 and bias.shape[0] == b
        self._ds_shape = ((b if per_batch else 1), h, n_q, n_k) if need_ds else None
        self._ds = None
        if not need_ds:
            ds_mode = DS_NONE
        elif per_batch:
            ds_mode = DS_STORE
        elif deterministic:
            ds_mode = DS_NONE
            ds_tail = (*io_strides, *strides, b, h, n_q, n_k, d, scale * LOG2E, dropout_p)
            self._ds = (
                DirectLaunch(
                    attention_bwd_ds_kernel, (cdiv(n_q, config["BLOCK_M"]) * cdiv(n_k, config["BLOCK_N"]), h), **options
                ),
                fixed_tail(attention_bwd_ds_kernel, 12, ds_tail, {**common, **blocks}),
            )
        else:
            ds_mode = DS_ATOMIC
        self._dq = (
            DirectLaunch(attention_bwd_dq_kernel, (cdiv(n_q, config["BLOCK_M"]), b * h), **options),
            fixed_tail(attention_bwd_dq_kernel, 13, tail, {**common, **blocks, "DS_MODE": ds_mode}),
        )
        self._table_grad, self._bias_grad = table_grad, bias_grad

    def __call__(self, grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed):
        table, index = (q, q) if bias_table is None else (bias_table, bias_index)
        dense = q if bias is None else bias
        keep = q if key_padding_mask is None else key_padding_mask
        seed = q if seed is None else seed
        delta = torch.empty_like(self._delta)
        launch, tail = self._pre
        launch(out, grad_out, delta, *tail)
        if self._dqkv_out is None:
            dq = torch.empty_like(self._dq_out)
            dk, dv = torch.empty_like(self._dkv_out), torch.empty_like(self._dkv_out)
        else:
            dqkv = torch.empty_like(self._dqkv_out)
            dq, dk, dv = dqkv.unbind(2)
        launch, tail = self._dkdv
        launch(q, k, v, grad_out, lse, delta, dk, dv, table, index, dense, keep, seed, *tail)
        ds = q if self._ds_shape is None else torch.zeros(self._ds_shape, device=q.device, dtype=torch.float32)
        if self._ds is not None:
            launch, tail = self._ds
            launch(q, k, v, grad_out, lse, delta, ds, table, index, dense, keep, seed, *tail)
        launch, tail = self._dq
        launch(q, k, v, grad_out, lse, delta, dq, ds, table, index, dense, keep, seed, *tail)
        dtable = dbias = None
        if self._table_grad:
            dtable = relative_bias_table_grad(ds.sum(0) if ds.shape[0] > 1 else ds[0], bias_index, bias_table)
        if self._bias_grad:
            dbias = reduce_to_shape(ds, bias.shape).to(bias.dtype)
        if self._dqkv_out is not None:
            return dqkv, None, None, dtable, dbias
        return dq, dk, dv, dtable, dbias


_backward_launches: dict[tuple, BackwardLaunch] = {}
_MAX_LAUNCHES = 1024
on_tiles_change(_backward_launches.clear)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias_table: torch.Tensor | None,
    bias_index: torch.Tensor | None,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float,
    table_grad: bool,
    bias_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv, dbias_table or None, dbias or None); dq/dk/dv (B, N, H, d) contiguous in q's dtype,
    the bias gradients in their parameters' dtypes and shapes."""
    launch = backward_launch(
        grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed, causal, dropout_p, scale,
        table_grad, bias_grad, deterministic,
    )  # fmt: skip
    return launch(grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed)


def backward_launch(
    grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed, causal: bool,
    dropout_p: float, scale: float, table_grad: bool, bias_grad: bool, deterministic: bool, packed: bool = False,
) -> BackwardLaunch:  # fmt: skip
    """The :class:`BackwardLaunch` for this input's layout and ``packed`` (made once, then looked up)."""
    key = (
        tuple(operand_key(t) for t in (grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask)),
        q.device, causal, dropout_p, scale, table_grad, bias_grad, deterministic, dot_precision(q.dtype), packed,
    )  # fmt: skip
    launch = _backward_launches.get(key)
    if launch is None:
        if len(_backward_launches) >= _MAX_LAUNCHES:
            _backward_launches.clear()
        config = backward_tiles(grad_out, q, k, v, out, lse, bias_table, bias_index, bias, key_padding_mask, seed,
                                causal, dropout_p, scale, table_grad, bias_grad, deterministic)  # fmt: skip
        launch = _backward_launches[key] = BackwardLaunch(
            grad_out, q, k, v, out, bias_table, bias_index, bias, key_padding_mask, causal, dropout_p, scale,
            table_grad, bias_grad, deterministic, config, packed,
        )  # fmt: skip
    return launch
