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

Dropout keeps element (b, h, i, j) when Philox(key, i * Nk + j) >= p, with the 64-bit key
(seed[0] | (seed[1] + b * H + h) << 32) from a (2,) int64 seed tensor; the backward replays it.

Bias gradients. dS summed over the batch (or per batch, for a dense bias with a batch dim) goes
into an fp32 (G, H, Nq, Nk) scratch: from the dQ kernel with a plain store (G = B) or atomics
(G = 1, non-deterministic mode), or from a separate kernel that loops over the batch for each
(head, tile) (G = 1, deterministic mode). The table gradient is then an index-sorted segment sum.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._tiles import cdiv, next_power_of_2, tiles
from d2v_kernels.kernels.aot import AotVariant, as_run

LOG2E = 1.4426950408889634
MASK_VALUE = -1.0e30  # log2 units; exp2(MASK_VALUE - any real score) == 0 in fp32

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
HEAD_DIM_MULTIPLE = 8

# ds_mode of the dQ kernel: what it does with the score gradient dS.
DS_NONE, DS_STORE, DS_ATOMIC = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Shared tile helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (interpreter only: its bf16 tl.dot multiplies the raw
    bits) runs it in fp32 on the same bf16 values, whose products are exact in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _masked_scores(
    q,
    k,
    offs_m,
    offs_n,
    off_h,
    n_q,
    n_k,
    scale_log2,
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
    HAS_TABLE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 scores in log2 units with every bias and mask applied."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
    in_k = offs_n < n_k
    if HAS_TABLE or HAS_BIAS:
        in_tile = (offs_m[:, None] < n_q) & in_k[None, :]
        if HAS_TABLE:
            idx = tl.load(INDEX + offs_m[:, None] * stride_ii + offs_n[None, :] * stride_ij, mask=in_tile, other=0)
            table = tl.load(TABLE + idx * stride_tr + off_h * stride_th, mask=in_tile, other=0.0)
            s += table.to(tl.float32) * 1.4426950408889634
        if HAS_BIAS:
            bias = tl.load(BIAS_BH + offs_m[:, None] * stride_bi + offs_n[None, :] * stride_bj, mask=in_tile, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        # Additive masks (finfo.min, -inf) saturate at MASK_VALUE, so they mask like the padding mask.
        s = tl.maximum(s, -1.0e30)
    if HAS_MASK:
        keep = tl.load(KEEP_B + offs_n * stride_mj, mask=in_k, other=1) != 0
        s = tl.where(keep[None, :], s, -1.0e30)
    if IS_CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + (n_k - n_q), s, -1.0e30)
    return tl.where(in_k[None, :], s, float("-inf"))


@triton.jit
def _dropout_key(SEED, off_bh):
    """64-bit Philox key of one (batch, head): seed[0] in the low word, seed[1] + b*H + h in the high."""
    seed_lo = tl.load(SEED).to(tl.int64) & 0xFFFFFFFF
    seed_hi = (tl.load(SEED + 1).to(tl.int64) + off_bh) & 0xFFFFFFFF
    return seed_lo | (seed_hi << 32)


@triton.jit
def _dropout_keep(key, offs_m, offs_n, n_k, dropout_p):
    """Keep mask of one tile (offs_n contiguous, starting at a multiple of 4): element (i, j)
    survives when its uniform >= p. One Philox call (counter i * ceil(Nk / 4) + j // 4) gives the
    4 uniforms of columns 4g..4g+3, outputs (0, 2, 1, 3) in that order: a quarter of the Philox
    rounds of one call per element (``tl.rand``), which made dropout cost 4x the attention itself."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    groups = tl.min(offs_n, 0) // 4 + tl.arange(0, BLOCK_N // 4)
    counters = offs_m[:, None] * ((n_k + 3) // 4) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(key, counters)
    # join(join(r0, r1), join(r2, r3)) is (M, N/4, 2, 2) with [..., a, b] = r_{2b + a}
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (offs_m.shape[0], BLOCK_N))
    return tl.random.uint_to_uniform_float(bits) >= dropout_p


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
        s = _masked_scores(
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
            p = tl.where(_dropout_keep(dropout_key, offs_m, offs_n, n_k, dropout_p), p, 0.0)
        v = tl.load(V_BH + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attention_fwd_kernel(
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
):
    """Grid (cdiv(Nq, BLOCK_M), B * H): one query block of one (batch, head) against all its keys."""
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
        dropout_key = _dropout_key(SEED, off_bh)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    stop = n_k
    if IS_CAUSAL:
        # Keys past the last row's diagonal are masked for the whole block: skip them.
        stop = tl.minimum(n_k, (pid_m + 1) * BLOCK_M + n_k - n_q)
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, K_BH, V_BH, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, off_h,
        n_q, n_k, head_dim, scale_log2, dropout_p, dropout_key, TABLE, INDEX, stride_tr, stride_th,
        stride_ii, stride_ij, BIAS_BH, stride_bi, stride_bj, KEEP_B, stride_mj, 0, stop,
        BLOCK_N, HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, HAS_DROPOUT, PRECISION, UPCAST,
    )  # fmt: skip
    if IS_CAUSAL:
        # A row with no unmasked key among those seen is uniform over all Nk keys: when the block
        # has one, visit the skipped keys too (masked for every other row, so they add nothing there).
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
    lse = tl.where(m_i <= -1.0e30, -1.0e30, m_i + tl.math.log2(l_i))
    tl.store(LSE + off_bh.to(tl.int64) * n_q + offs_m, lse, mask=offs_m < n_q)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attention_bwd_preprocess_kernel(
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
def _attention_bwd_dkdv_kernel(
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
        dropout_key = _dropout_key(SEED, off_bh)
    inv_n_k = 1.0 / n_k

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start_m = 0
    if IS_CAUSAL:
        # Query blocks before the first row that sees this key block have every score here masked:
        # only their fully masked rows (uniform over all keys) reach dV, and no dS at all.
        start_m = tl.maximum(start_n - (n_k - n_q), 0) // BLOCK_M * BLOCK_M
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
                    p = tl.where(_dropout_keep(dropout_key, offs_m, offs_n, n_k, dropout_p), p, 0.0)
                dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
    for block_m in range(start_m, n_q, BLOCK_M):
        offs_m = block_m + tl.arange(0, BLOCK_M)
        row_mask = (offs_m[:, None] < n_q) & in_d
        q = tl.load(Q_BH + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
        do = tl.load(DO_BH + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=row_mask, other=0.0)
        lse = tl.load(LSE_BH + offs_m, mask=offs_m < n_q, other=float("inf"))  # padded rows: P = 0
        delta = tl.load(DELTA_BH + offs_m, mask=offs_m < n_q, other=0.0)
        s = _masked_scores(
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
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(dropout_key, offs_m, offs_n, n_k, dropout_p)
            p = tl.where(keep, p, 0.0)  # 1/(1-p) applied to dV once at the end
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        ds = p_ds * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)

    if HAS_DROPOUT:
        dv *= 1.0 / (1.0 - dropout_p)
    dk *= scale
    # dK, dV are (B, Nk, H, d) contiguous.
    out_offs = (
        off_b * n_k * n_heads * head_dim + off_h * head_dim + offs_n[:, None] * n_heads * head_dim + offs_d[None, :]
    )
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
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
        dropout_key = _dropout_key(SEED, off_bh)
    keep_scale = 1.0
    if HAS_DROPOUT:
        keep_scale = 1.0 / (1.0 - dropout_p)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    stop = n_k
    if IS_CAUSAL:
        stop = tl.minimum(n_k, (pid_m + 1) * BLOCK_M + n_k - n_q)
    for start_n in range(0, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_k) & in_d
        k = tl.load(K_BH + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V_BH + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = _masked_scores(
            q, k, offs_m, offs_n, off_h, n_q, n_k, scale_log2, TABLE, INDEX, stride_tr, stride_th, stride_ii,
            stride_ij, BIAS_BH, stride_bi, stride_bj, KEEP_B, stride_mj,
            HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, PRECISION, UPCAST,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        if HAS_MASK or HAS_BIAS or IS_CAUSAL:
            p = tl.where((lse <= -1.0e30)[:, None], 0.0, p)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        if HAS_DROPOUT:
            dp = tl.where(_dropout_keep(dropout_key, offs_m, offs_n, n_k, dropout_p), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        if DS_MODE != 0:
            ds_ptrs = DS_BH + offs_m[:, None] * n_k + offs_n[None, :]
            ds_mask = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_k)
            if DS_MODE == 1:
                tl.store(ds_ptrs, ds, mask=ds_mask)
            else:
                tl.atomic_add(ds_ptrs, ds, mask=ds_mask, sem="relaxed")
    dq *= scale
    out_offs = (
        off_b * n_q * n_heads * head_dim + off_h * head_dim + offs_m[:, None] * n_heads * head_dim + offs_d[None, :]
    )
    tl.store(DQ + out_offs, dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _attention_bwd_ds_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
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
    n_batch,
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
):
    """dS summed over the batch in a fixed order (deterministic), into the (H, Nq, Nk) fp32 scratch
    DS. Grid (cdiv(Nq, BLOCK_M) * cdiv(Nk, BLOCK_N), H); tiles masked by causality stay zero."""
    pid = tl.program_id(0)
    off_h = tl.program_id(1)
    n_blocks_n = tl.cdiv(n_k, BLOCK_N)
    start_m = (pid // n_blocks_n) * BLOCK_M
    start_n = (pid % n_blocks_n) * BLOCK_N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d[None, :] < head_dim
    row_mask = (offs_m[:, None] < n_q) & in_d
    kv_mask = (offs_n[:, None] < n_k) & in_d
    keep_scale = 1.0
    if HAS_DROPOUT:
        keep_scale = 1.0 / (1.0 - dropout_p)
    n_batch_visited = n_batch
    if IS_CAUSAL:
        # Every row of the tile masks every key of it: dS is zero (the scratch starts at zero).
        n_batch_visited = tl.where(start_n > start_m + BLOCK_M - 1 + n_k - n_q, 0, n_batch)
    ds_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, n_batch_visited):
        off_b = tl.cast(b, tl.int64)
        off_bh = b * n_heads + off_h
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
        lse = tl.load(LSE + off_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
        delta = tl.load(DELTA + off_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=0.0)
        s = _masked_scores(
            q, k, offs_m, offs_n, off_h, n_q, n_k, scale_log2, TABLE, INDEX, stride_tr, stride_th, stride_ii,
            stride_ij, BIAS + off_b * stride_bb + off_h * stride_bh, stride_bi, stride_bj,
            KEEP + off_b * stride_mb, stride_mj, HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, PRECISION, UPCAST,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        if HAS_MASK or HAS_BIAS or IS_CAUSAL:
            p = tl.where((lse <= -1.0e30)[:, None], 0.0, p)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(_dropout_key(SEED, off_bh), offs_m, offs_n, n_k, dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds_sum += p * (dp - delta[:, None])
    tl.store(
        DS + off_h.to(tl.int64) * n_q * n_k + offs_m[:, None] * n_k + offs_n[None, :],
        ds_sum,
        mask=(offs_m[:, None] < n_q) & (offs_n[None, :] < n_k),
    )


@triton.jit
def _segment_sum_kernel(
    VALUES,
    ORDER,
    OFFSETS,
    OUT,
    n_heads,
    n_values,
    stride_or,
    stride_oh,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """OUT[r, h] = sum of VALUES[h, ORDER[p]] over p in [OFFSETS[r], OFFSETS[r + 1]), in a fixed
    order. VALUES (H, n_values) fp32 contiguous. Grid (R,)."""
    r = tl.program_id(0)
    start = tl.load(OFFSETS + r)
    stop = tl.load(OFFSETS + r + 1)
    offs_h = tl.arange(0, BLOCK_H)
    in_h = offs_h < n_heads
    acc = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    for p0 in range(start, stop, BLOCK_P):
        pos = p0 + tl.arange(0, BLOCK_P)
        valid = pos < stop
        flat = tl.load(ORDER + pos, mask=valid, other=0)
        acc += tl.load(
            VALUES + offs_h[None, :].to(tl.int64) * n_values + flat[:, None],
            mask=valid[:, None] & in_h[None, :],
            other=0.0,
        )
    tl.store(OUT + r * stride_or + offs_h * stride_oh, tl.sum(acc, 0).to(OUT.dtype.element_ty), mask=in_h)


@triton.jit
def _dropout_mask_kernel(SEED, KEEP_OUT, n_heads, n_q, n_k, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The attention kernels' keep mask as uint8 (B, H, Nq, Nk), for tests and debugging."""
    off_bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(_dropout_key(SEED, off_bh), offs_m, offs_n, n_k, dropout_p)
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


def _upcast(t: torch.Tensor) -> bool:
    """bf16 on the CPU runs in the interpreter, whose bf16 tl.dot is wrong: dot in fp32 there."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


# Tiles chosen by the compiler's resource report (ptxas -v for sm_90, no GPU needed): every
# configuration below compiles without a register spill except fp32 dK/dV (about 600 bytes; the
# fp32 path is for precision, not speed). A (BLOCK_M, BLOCK_N) tile of the relative position
# bias or of a dense bias is read through per-element 64-bit pointers, which doubles the tile's
# register cost: those kernels take half as wide key blocks (forward) or 8 warps (backward).
# To be timed on the GPU (bench/tune.py); tests/test_aot_compile.py keeps them spill-free.


def _fwd_config(dtype: torch.dtype, block_d: int, bias_tile: bool = False, dropout: bool = False) -> dict:
    """Forward tiles: 128 x 64 with 4 warps up to d=64, 8 warps at d=128 or with dropout (its 4
    Philox outputs a group of columns); 128 x 32 with 8 warps when a bias tile is gathered; fp32
    64 x 32 with 8 warps."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if bias_tile:
        return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4 if block_d <= 64 and not dropout else 8, "num_stages": 3}


def _bwd_config(dtype: torch.dtype, block_d: int) -> dict:
    """dK/dV, dQ and dS tiles, 8 warps: 64 x 64 up to d=64, 32 x 64 at d=128, fp32 32 x 32."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if block_d > 64:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def _bias_args(q, k, bias_table, bias_index, bias, key_padding_mask):
    """Pointers (a dummy tensor for the absent ones) and strides of the optional inputs."""
    b, n_q, h, _ = q.shape
    n_k = k.shape[1]
    dummy = q.new_empty(1)
    if bias_table is not None:
        table, index = bias_table, bias_index
        table_strides = (*bias_table.stride(), *bias_index.stride())
    else:
        table, index, table_strides = dummy, dummy, (0, 0, 0, 0)
    if bias is not None:
        dense = bias.expand(b, h, n_q, n_k)  # broadcast dims read with stride 0
        bias_strides = dense.stride()
    else:
        dense, bias_strides = dummy, (0, 0, 0, 0)
    if key_padding_mask is not None:
        keep = key_padding_mask
        keep = keep.view(torch.uint8) if keep.dtype == torch.bool else (keep != 0).view(torch.uint8)
        keep_strides = keep.stride()
    else:
        keep, keep_strides = dummy, (0, 0)
    pointers = (table, index, dense, keep)
    strides = (*table_strides, *bias_strides, *keep_strides)
    flags = {
        "HAS_TABLE": bias_table is not None,
        "HAS_BIAS": bias is not None,
        "HAS_MASK": key_padding_mask is not None,
    }
    return pointers, strides, flags


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
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    out = torch.empty((b, n_q, h, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    pointers, strides, flags = _bias_args(q, k, bias_table, bias_index, bias, key_padding_mask)
    block_d = _block_d(d)
    bias_tile = flags["HAS_TABLE"] or flags["HAS_BIAS"]
    config = tiles("attention_fwd", _fwd_config(q.dtype, block_d, bias_tile, dropout_p > 0.0))
    grid = (cdiv(n_q, config["BLOCK_M"]), b * h)
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, *pointers, seed if dropout_p > 0.0 else q.new_empty(1),
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3], *strides,
        h, n_q, n_k, d, scale * LOG2E, dropout_p,
        BLOCK_D=block_d, IS_CAUSAL=causal, HAS_DROPOUT=dropout_p > 0.0, PRECISION=_precision(q.dtype), UPCAST=_upcast(q),
        **flags, **config,
    )  # fmt: skip
    return out, lse


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
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    block_d = _block_d(d)
    pointers, strides, flags = _bias_args(q, k, bias_table, bias_index, bias, key_padding_mask)
    seed_arg = seed if dropout_p > 0.0 else q.new_empty(1)
    common_flags = dict(
        BLOCK_D=block_d,
        IS_CAUSAL=causal,
        HAS_DROPOUT=dropout_p > 0.0,
        PRECISION=_precision(q.dtype),
        UPCAST=_upcast(q),
        **flags,
    )

    delta = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    pre_block_m = 64
    _attention_bwd_preprocess_kernel[(cdiv(n_q, pre_block_m), b * h)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride(), h, n_q, d, BLOCK_M=pre_block_m, BLOCK_D=block_d,
        num_warps=8,  # 4 warps spill (ptxas, sm_90)
    )  # fmt: skip

    config = tiles("attention_bwd", _bwd_config(q.dtype, block_d))
    dq = torch.empty((b, n_q, h, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, n_k, h, d), device=q.device, dtype=q.dtype)
    dv = torch.empty((b, n_k, h, d), device=q.device, dtype=q.dtype)
    io_strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    _attention_bwd_dkdv_kernel[(cdiv(n_k, config["BLOCK_N"]), b * h)](
        q, k, v, grad_out, lse, delta, dk, dv, *pointers, seed_arg, *io_strides, *strides,
        h, n_q, n_k, d, scale, scale * LOG2E, dropout_p, **common_flags, **config,
    )  # fmt: skip

    # dS scratch: per batch when a dense bias with a batch dim needs its gradient, else summed.
    need_ds = table_grad or bias_grad
    per_batch = bias_grad and b > 1 and bias.dim() == 4 and bias.shape[0] == b
    groups = b if per_batch else 1
    ds = torch.zeros((groups, h, n_q, n_k), device=q.device, dtype=torch.float32) if need_ds else q.new_empty(1)
    if not need_ds:
        ds_mode = DS_NONE
    elif per_batch:
        ds_mode = DS_STORE
    elif deterministic:
        ds_mode = DS_NONE
        _attention_bwd_ds_kernel[(cdiv(n_q, config["BLOCK_M"]) * cdiv(n_k, config["BLOCK_N"]), h)](
            q, k, v, grad_out, lse, delta, ds, *pointers, seed_arg, *io_strides, *strides,
            b, h, n_q, n_k, d, scale * LOG2E, dropout_p, **common_flags, **config,
        )  # fmt: skip
    else:
        ds_mode = DS_ATOMIC
    _attention_bwd_dq_kernel[(cdiv(n_q, config["BLOCK_M"]), b * h)](
        q, k, v, grad_out, lse, delta, dq, ds, *pointers, seed_arg, *io_strides, *strides,
        h, n_q, n_k, d, scale, scale * LOG2E, dropout_p, DS_MODE=ds_mode, **common_flags, **config,
    )  # fmt: skip

    dtable = dbias = None
    if table_grad:
        dtable = relative_bias_table_grad(ds.sum(0) if groups > 1 else ds[0], bias_index, bias_table)
    if bias_grad:
        dbias = _reduce_to_shape(ds, bias.shape).to(bias.dtype)
    return dq, dk, dv, dtable, dbias


# bias_index -> (order, offsets): one index tensor serves every layer and every step of a model.
_SEGMENTS_CACHE: collections.OrderedDict[int, tuple] = collections.OrderedDict()
_SEGMENTS_CACHE_SIZE = 8


def _index_segments(bias_index: torch.Tensor, n_rel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): positions of ``bias_index`` sorted by value (stable), and where each
    value's run starts. Cached per index tensor, checked by identity (a weak reference, so a new
    tensor at a freed address misses) and by version (an in-place change misses)."""
    key = id(bias_index)
    hit = _SEGMENTS_CACHE.get(key)
    if hit is not None:
        ref, version, cached_n_rel, order, offsets = hit
        if ref() is bias_index and version == bias_index._version and cached_n_rel == n_rel:
            _SEGMENTS_CACHE.move_to_end(key)
            return order, offsets
    sorted_index, order = torch.sort(bias_index.reshape(-1), stable=True)
    bounds = torch.arange(n_rel + 1, device=bias_index.device, dtype=sorted_index.dtype)
    offsets = torch.searchsorted(sorted_index, bounds)
    _SEGMENTS_CACHE[key] = (weakref.ref(bias_index), bias_index._version, n_rel, order, offsets)
    while len(_SEGMENTS_CACHE) > _SEGMENTS_CACHE_SIZE:
        _SEGMENTS_CACHE.popitem(last=False)
    return order, offsets


def relative_bias_table_grad(ds: torch.Tensor, bias_index: torch.Tensor, bias_table: torch.Tensor) -> torch.Tensor:
    """Deterministic scatter-add of ds (H, Nq, Nk) fp32 into a table shaped like ``bias_table`` (R, H):
    out[r, h] = sum of ds[h, i, j] over bias_index[i, j] == r, by an index-sorted segment sum."""
    n_rel, h = bias_table.shape
    order, offsets = _index_segments(bias_index, n_rel)
    out = torch.empty_like(bias_table)
    _segment_sum_kernel[(n_rel,)](
        ds,
        order,
        offsets,
        out,
        h,
        ds[0].numel(),
        *out.stride(),
        BLOCK_P=64,
        BLOCK_H=next_power_of_2(h),
    )
    return out


def _reduce_to_shape(ds: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum (G, H, Nq, Nk) over the dims a bias of ``shape`` broadcasts along."""
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    dims = [i for i in range(4) if padded[i] == 1 and ds.shape[i] != 1]
    reduced = ds.sum(dim=dims, keepdim=True) if dims else ds
    return reduced.reshape(shape)


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, n_q: int, n_k: int, dropout_p: float) -> torch.Tensor:
    """The keep mask the attention kernels draw for this seed: bool (B, H, Nq, Nk)."""
    keep = torch.empty((batch, heads, n_q, n_k), device=seed.device, dtype=torch.uint8)
    grid = (cdiv(n_q, 64), cdiv(n_k, 64), batch * heads)
    _dropout_mask_kernel[grid](seed, keep, heads, n_q, n_k, dropout_p, BLOCK_M=64, BLOCK_N=64)
    return keep.bool()


# --------------------------------------------------------------------------------------------
# Ahead-of-time variants
# --------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FLOAT_ARGS = {"scale", "scale_log2", "dropout_p"}


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict:
    """Triton signature of ``fn``: data pointers in ``dtype``, statistics fp32, ints i32."""
    dt = _TRITON_DTYPES[dtype]
    pointer_types = {
        "LSE": "*fp32", "DELTA": "*fp32", "DS": "*fp32", "VALUES": "*fp32", "INDEX": "*i64", "ORDER": "*i64",
        "OFFSETS": "*i64", "KEEP": "*u8", "KEEP_OUT": "*u8", "SEED": "*i64",
    }  # fmt: skip
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = pointer_types.get(name, f"*{dt}")
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _variant(kind: str, fn, dtype: torch.dtype, config: dict, **constexprs) -> AotVariant:
    constexprs = {**{k: v for k, v in config.items() if k.isupper()}, **constexprs}
    flags = "".join(k[4].lower() if k.startswith("HAS_") else "" for k, v in constexprs.items() if v is True)
    name = f"{kind}_{_TRITON_DTYPES[dtype]}_d{constexprs.get('BLOCK_D', 0)}_{flags or 'plain'}"
    if constexprs.get("IS_CAUSAL"):
        name += "_causal"
    if "DS_MODE" in constexprs:
        name += f"_ds{constexprs['DS_MODE']}"
    return AotVariant(
        name=name,
        fn=fn,
        signature=_signature(fn, dtype, constexprs),
        constexprs=constexprs,
        num_warps=config.get("num_warps", 4),
        num_stages=config.get("num_stages", 2),
    )


def aot_variants() -> list[AotVariant]:
    """The model configurations (vision: table bias in fp16 and fp32; audio/text: padding mask in bf16),
    every feature flag at once in fp16, the d=128 and d=16 tiles; the small kernels once per dtype
    they are launched with. Kept to ~30 compiles per arch for CI time."""
    features = ("HAS_TABLE", "HAS_BIAS", "HAS_MASK", "IS_CAUSAL", "HAS_DROPOUT")

    def flags(*on):
        return {f: f in on for f in features}

    cases = [  # (dtype, BLOCK_D, flags, kernels)
        (torch.float16, 64, flags("HAS_TABLE"), ("fwd", "dkdv", "dq", "ds")),
        (torch.float32, 64, flags("HAS_TABLE"), ("fwd", "dkdv", "dq", "ds")),
        (torch.bfloat16, 64, flags("HAS_MASK"), ("fwd", "dkdv", "dq")),
        (torch.bfloat16, 64, flags("HAS_MASK", "HAS_DROPOUT"), ("fwd", "dkdv", "dq")),  # audio/text training
        (torch.float16, 64, flags(*features), ("fwd", "dkdv", "dq", "ds")),
        (torch.float16, 128, flags("HAS_MASK"), ("fwd", "dkdv", "dq")),
        (torch.float16, 16, flags("HAS_MASK"), ("fwd", "dkdv")),
    ]
    kernels = {
        "fwd": _attention_fwd_kernel,
        "dkdv": _attention_bwd_dkdv_kernel,
        "dq": _attention_bwd_dq_kernel,
        "ds": _attention_bwd_ds_kernel,
    }
    variants = []
    for dtype, block_d, case_flags, names in cases:
        common = {
            "BLOCK_D": block_d,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": False,
            **case_flags,
        }
        for name in names:
            bias_tile = case_flags["HAS_TABLE"] or case_flags["HAS_BIAS"]
            dropout = case_flags["HAS_DROPOUT"]
            config = _fwd_config(dtype, block_d, bias_tile, dropout) if name == "fwd" else _bwd_config(dtype, block_d)
            extra = {}
            if name == "dq":
                needs_ds = case_flags["HAS_TABLE"] or case_flags["HAS_BIAS"]
                extra["DS_MODE"] = DS_STORE if case_flags["HAS_BIAS"] else DS_ATOMIC if needs_ds else DS_NONE
            variant = _variant(name, kernels[name], dtype, config, **common, **extra)
            if all(case_flags.values()):
                # Every flag at once (table, dense bias, mask, causal, dropout): compiled for coverage,
                # no model runs it; its backward spills ~100-650 bytes on sm_90 (triton 3.8-3.9).
                variant = dataclasses.replace(variant, allowed_spill_bytes=1024)
            elif name == "dkdv" and case_flags["HAS_DROPOUT"]:
                # The training configuration's dK/dV: 8 bytes (2 registers) at 255, with tl.rand too.
                variant = dataclasses.replace(variant, allowed_spill_bytes=16)
            elif name == "dkdv" and dtype == torch.float32:
                # fp32 is the precision path: its FMA (ieee) dots keep dK and dV in ~600 spilled bytes.
                variant = dataclasses.replace(variant, allowed_spill_bytes=640)
            variants.append(variant)
    for dtype in (torch.float16, torch.float32):
        delta_config = {"BLOCK_M": 64, "num_warps": 8}
        variants.append(_variant("delta", _attention_bwd_preprocess_kernel, dtype, delta_config, BLOCK_D=64))
        variants.append(_variant("segment_sum", _segment_sum_kernel, dtype, {"BLOCK_P": 64, "BLOCK_H": 16}))
    variants.append(_variant("dropout_mask", _dropout_mask_kernel, torch.float16, {"BLOCK_M": 64, "BLOCK_N": 64}))
    # Compiled as Data2Vec's calls run: head dim, index, bias and mask rows contiguous (unit
    # strides), the other strides multiples of the 768-wide hidden size, head_dim 16 to 128.
    return [as_run(v, _UNIT_STRIDES, _DIVISIBLE_BY_16) for v in variants]


_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_dod", "stride_ij", "stride_bj", "stride_mj")
_DIVISIBLE_BY_16 = tuple(f"stride_{t}{a}" for t in ("q", "k", "v", "o", "do") for a in ("b", "n", "h")) + ("head_dim",)
