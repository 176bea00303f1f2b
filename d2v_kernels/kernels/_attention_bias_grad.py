"""Gradients of the attention biases: dS summed over the batch in a fixed order (the
deterministic mode's kernel), and the relative position table's gradient as an index-sorted
segment sum of dS. How dS reaches its scratch is in :mod:`d2v_kernels.kernels.attention`.
"""

from __future__ import annotations

import collections
import weakref

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._attention_common import dropout_keep, masked_scores, philox_key, tile_dot
from d2v_kernels.kernels._tiles import next_power_of_2


@triton.jit
def attention_bwd_ds_kernel(
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
        s = masked_scores(
            q, k, offs_m, offs_n, off_h, n_q, n_k, scale_log2, TABLE, INDEX, stride_tr, stride_th, stride_ii,
            stride_ij, BIAS + off_b * stride_bb + off_h * stride_bh, stride_bi, stride_bj,
            KEEP + off_b * stride_mb, stride_mj, HAS_TABLE, HAS_BIAS, HAS_MASK, IS_CAUSAL, PRECISION, UPCAST,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        if HAS_MASK or HAS_BIAS or IS_CAUSAL:
            p = tl.where((lse <= -1.0e30)[:, None], 0.0, p)
        dp = tile_dot(do, tl.trans(v), PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = dropout_keep(philox_key(SEED, off_bh), offs_m, offs_n, n_k, dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds_sum += p * (dp - delta[:, None])
    tl.store(
        DS + off_h.to(tl.int64) * n_q * n_k + offs_m[:, None] * n_k + offs_n[None, :],
        ds_sum,
        mask=(offs_m[:, None] < n_q) & (offs_n[None, :] < n_k),
    )


@triton.jit
def segment_sum_kernel(
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
    segment_sum_kernel[(n_rel,)](
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


def reduce_to_shape(ds: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum (G, H, Nq, Nk) over the dims a bias of ``shape`` broadcasts along."""
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    dims = [i for i in range(4) if padded[i] == 1 and ds.shape[i] != 1]
    reduced = ds.sum(dim=dims, keepdim=True) if dims else ds
    return reduced.reshape(shape)
