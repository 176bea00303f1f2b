"""What the attention kernels share, forward and backward: the (BLOCK_M, BLOCK_N) scores of a
tile with every bias and mask applied (log2 units, masked scores at MASK_VALUE), the dropout keep
mask replayed from a Philox key, and the launch helpers (pointers and strides of the optional
inputs, dot precision). The conventions are in :mod:`d2v_kernels.kernels.attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d2v_kernels.kernels._tiles import next_power_of_2
from d2v_kernels.kernels.autotune import SPACES, sequence_bucket

LOG2E = 1.4426950408889634
MASK_VALUE = -1.0e30  # log2 units; exp2(MASK_VALUE - any real score) == 0 in fp32


@triton.jit
def tile_dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (interpreter only: its bf16 tl.dot multiplies the raw
    bits) runs it in fp32 on the same bf16 values, whose products are exact in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def masked_scores(
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
    s = tile_dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
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
def mask_extent(KEEP_B, stride_mj, n_k):
    """One past the last attended key of one batch row's padding mask (0 when none attends), read
    once per program: key blocks from there on are padding for every query, and the kernels skip
    them (a right-padded mask, transformers' audio and text masks, then costs its lengths' work)."""
    BLOCK: tl.constexpr = 512
    kv_end = tl.full([], 0, tl.int32)
    for start in range(0, n_k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        keep = tl.load(KEEP_B + offs * stride_mj, mask=offs < n_k, other=0) != 0
        kv_end = tl.maximum(kv_end, tl.max(tl.where(keep, offs + 1, 0), 0))
    return kv_end


@triton.jit
def philox_key(SEED, off_bh):
    """64-bit Philox key of one (batch, head): seed[0] in the low word, seed[1] + b*H + h in the high."""
    seed_lo = tl.load(SEED).to(tl.int64) & 0xFFFFFFFF
    seed_hi = (tl.load(SEED + 1).to(tl.int64) + off_bh) & 0xFFFFFFFF
    return seed_lo | (seed_hi << 32)


@triton.jit
def dropout_keep(key, offs_m, offs_n, n_k, dropout_p):
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


def upcast_dot(t: torch.Tensor) -> bool:
    """bf16 on the CPU runs in the interpreter, whose bf16 tl.dot is wrong: dot in fp32 there."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def head_dim_block(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def tuning_bucket(dtype: torch.dtype, block_d: int, n_q: int, n_k: int, features: dict[str, bool]) -> str:
    """The shape bucket tiles are chosen per (``autotune.launch_config``): dtype, head-dim block,
    sequence-length bucket and the features on, e.g. "bf16 d64 n512 mask+dropout"."""
    kinds = "+".join(name for name, on in features.items() if on) or "plain"
    return f"{_DTYPE_NAMES[dtype]} d{block_d} n{sequence_bucket(max(n_q, n_k))} {kinds}"


def tile_candidates(kernel: str, dtype: torch.dtype) -> tuple[dict[str, int], ...]:
    """What the autotuner may pick for ``kernel``: its space in half precision; fp32, the precision
    path, keeps its default."""
    return () if dtype == torch.float32 else SPACES[kernel]


def bias_args(q, k, bias_table, bias_index, bias, key_padding_mask):
    """Pointers and strides of the optional inputs. An absent input's pointer is q (never read: its
    flag is off); the padding mask is read in its own dtype (bool or integer, nonzero attends), so
    no conversion is launched."""
    b, n_q, h, _ = q.shape
    n_k = k.shape[1]
    if bias_table is not None:
        table, index = bias_table, bias_index
        table_strides = (*bias_table.stride(), *bias_index.stride())
    else:
        table, index, table_strides = q, q, (0, 0, 0, 0)
    if bias is not None:
        dense = bias.expand(b, h, n_q, n_k)  # broadcast dims read with stride 0
        bias_strides = dense.stride()
    else:
        dense, bias_strides = q, (0, 0, 0, 0)
    if key_padding_mask is not None:
        keep, keep_strides = key_padding_mask, key_padding_mask.stride()
    else:
        keep, keep_strides = q, (0, 0)
    pointers = (table, index, dense, keep)
    strides = (*table_strides, *bias_strides, *keep_strides)
    flags = {
        "HAS_TABLE": bias_table is not None,
        "HAS_BIAS": bias is not None,
        "HAS_MASK": key_padding_mask is not None,
    }
    return pointers, strides, flags
