// Layers 1..n-1 of the feature encoder: strided Conv1d(C_in -> C_out, k, stride) -> LayerNorm
// (C_out) -> GELU as an implicit GEMM with the normalisation in the epilogue.
//
// With channels-last input x (B, t_in, c_in), the K = k * c_in inputs of output frame t of
// batch row b are contiguous: A[m, kk] = x[(b * t_in + t * stride) * c_in + kk] for
// m = b * t_out + t. A is an ordinary row-major matrix with row offsets computed per row (rows
// overlap when k > stride), and B is the weight permuted to (c_out, k, c_in), i.e. (N, K)
// row-major = (K, N) column-major. A block owns kBlockM frames and all (<= kMaxChannels)
// output channels, so each row's LayerNorm statistics are computed inside the block.
//
// fp16/bf16: WMMA 16x16x16 tensor-core MMAs with fp32 accumulators, a two-stage cp.async
// pipeline (16-byte copies when c_in % 8 == 0 and the pointers are 16-byte aligned, scalar
// loads otherwise), accumulators staged through shared memory for the epilogue.
// fp32: a SIMT kernel (fp32 FMAs) whose warps own whole rows, epilogue from registers.
#include <mma.h>

#include "common.cuh"
#include "conv_feature_extractor.h"

namespace d2v {
namespace {

struct ConvParams {
  const void* x;
  const void* weight_t;
  const void* conv_bias;
  const void* gamma;
  const void* beta;
  void* out;
  int64_t rows;  // B * t_out
  int64_t t_in;
  int64_t t_out;
  int c_in;
  int c_out;
  int k_total;  // kernel * c_in
  int stride;
  float eps;
};

constexpr int kPerLane = kMaxChannels / 32;

// Offset into x of A row m (frame m % t_out of batch row m / t_out), or -1 past the last row.
__device__ __forceinline__ int64_t a_row_offset(const ConvParams& p, int64_t m) {
  if (m >= p.rows) return -1;
  const int64_t b = m / p.t_out;
  const int64_t t = m - b * p.t_out;
  return (b * p.t_in + t * p.stride) * p.c_in;
}

// ------------------------------------------------------------------------------------------
// Tensor-core path (fp16 / bf16)
// ------------------------------------------------------------------------------------------

constexpr int kBlockM = 64;
constexpr int kBlockN = kMaxChannels;
constexpr int kBlockK = 32;
// 8 warps side by side over N, each 64 rows x 64 channels (16 fp32 accumulator fragments =
// 128 registers; 256 threads leave up to 255 registers per thread, so nothing spills).
constexpr int kMmaThreads = 256;
constexpr int kWarpsN = kMmaThreads / 32;
constexpr int kWarpN = kBlockN / kWarpsN;  // 64
constexpr int kFragsM = kBlockM / 16;      // 4
constexpr int kFragsN = kWarpN / 16;       // 4
// Shared-memory row pitch of the A and B tiles in elements: 40 halves = 80 bytes keeps every
// 16-row fragment start 32-byte aligned (WMMA's requirement) and staggers rows across banks.
constexpr int kPitchAB = kBlockK + 8;
// Epilogue: accumulators of kEpilogueRows rows at a time, fp32, pitch 516 floats (a 16-byte
// multiple, as WMMA stores need).
constexpr int kEpilogueRows = 32;
constexpr int kEpilogueFrags = kEpilogueRows / 16;
constexpr int kPitchC = kBlockN + 4;
constexpr int kStageElems = (kBlockM + kBlockN) * kPitchAB;
constexpr size_t kMmaSmemBytes = 2 * kStageElems * 2;  // two stages of 2-byte elements
static_assert(static_cast<size_t>(kEpilogueRows) * kPitchC * sizeof(float) <= kMmaSmemBytes,
              "the epilogue tile must fit in the main-loop buffers it reuses");
static_assert(kBlockM % kEpilogueRows == 0 && kBlockM * (kBlockK / 8) == kMmaThreads, "tile layout");

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;  // 0: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Copies the K slice [k0, k0 + kBlockK) of the block's A rows and of all B rows into one stage,
// zero-filling rows past the end, channels >= c_out and K indices >= k_total.
template <typename T, bool kVec>
__device__ __forceinline__ void load_stage(const ConvParams& p, const int64_t* row_offset_s, T* a_s, T* b_s, int k0,
                                           int tid) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.weight_t);
  if constexpr (kVec) {
    // 16-byte chunks of 8 elements; k_total % 8 == 0, so a chunk is all in or all out of range.
    constexpr int kChunksPerRow = kBlockK / 8;
    {  // one A chunk per thread
      const int r = tid / kChunksPerRow;
      const int kk = (tid % kChunksPerRow) * 8;
      const int64_t offset = row_offset_s[r];
      const bool valid = offset >= 0 && k0 + kk < p.k_total;
      cp_async_16(a_s + r * kPitchAB + kk, valid ? x + offset + k0 + kk : x, valid);
    }
#pragma unroll
    for (int s = 0; s < kBlockN * kChunksPerRow / kMmaThreads; ++s) {
      const int chunk = tid + s * kMmaThreads;
      const int n = chunk / kChunksPerRow;
      const int kk = (chunk % kChunksPerRow) * 8;
      const bool valid = n < p.c_out && k0 + kk < p.k_total;
      cp_async_16(b_s + n * kPitchAB + kk, valid ? w + static_cast<int64_t>(n) * p.k_total + k0 + kk : w, valid);
    }
  } else {
    const T zero = from_float<T>(0.0f);
#pragma unroll
    for (int s = 0; s < kBlockM * kBlockK / kMmaThreads; ++s) {
      const int e = tid + s * kMmaThreads;
      const int r = e / kBlockK;
      const int kk = e % kBlockK;
      const int64_t offset = row_offset_s[r];
      a_s[r * kPitchAB + kk] = (offset >= 0 && k0 + kk < p.k_total) ? x[offset + k0 + kk] : zero;
    }
#pragma unroll 4
    for (int s = 0; s < kBlockN * kBlockK / kMmaThreads; ++s) {
      const int e = tid + s * kMmaThreads;
      const int n = e / kBlockK;
      const int kk = e % kBlockK;
      b_s[n * kPitchAB + kk] =
          (n < p.c_out && k0 + kk < p.k_total) ? w[static_cast<int64_t>(n) * p.k_total + k0 + kk] : zero;
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kMmaThreads, 1) conv_ln_gelu_mma_kernel(ConvParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int64_t row_offset_s[kBlockM];
  T* stage_s = reinterpret_cast<T*>(smem_raw);  // [2][(kBlockM + kBlockN) * kPitchAB]: A tile, then B tile
  float* c_s = reinterpret_cast<float*>(smem_raw);  // epilogue [kEpilogueRows][kPitchC], after the main loop

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_n = warp;
  // Warps whose 64 channels all lie past c_out skip the MMAs (their columns are never read).
  const bool warp_has_channels = warp_n * kWarpN < p.c_out;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;

  if (tid < kBlockM) row_offset_s[tid] = a_row_offset(p, m0 + tid);
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsM][kFragsN];
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  const int k_tiles = (p.k_total + kBlockK - 1) / kBlockK;
  load_stage<T, kVec>(p, row_offset_s, stage_s, stage_s + kBlockM * kPitchAB, 0, tid);
  cp_async_commit();
  for (int kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) {
      T* next = stage_s + ((kt + 1) & 1) * kStageElems;
      load_stage<T, kVec>(p, row_offset_s, next, next + kBlockM * kPitchAB, (kt + 1) * kBlockK, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* a_s = stage_s + (kt & 1) * kStageElems;
    const T* b_s = a_s + kBlockM * kPitchAB;
    if (warp_has_channels) {
#pragma unroll
      for (int ks = 0; ks < kBlockK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag[kFragsM];
#pragma unroll
        for (int i = 0; i < kFragsM; ++i) {
          wmma::load_matrix_sync(a_frag[i], a_s + (i * 16) * kPitchAB + ks, kPitchAB);
        }
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) {
          // B tile is stored [n][k]: the (K, N) operand in column-major order.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
          wmma::load_matrix_sync(b_frag, b_s + (warp_n * kWarpN + j * 16) * kPitchAB + ks, kPitchAB);
#pragma unroll
          for (int i = 0; i < kFragsM; ++i) wmma::mma_sync(acc[i][j], a_frag[i], b_frag, acc[i][j]);
        }
      }
    }
    __syncthreads();  // the next iteration's copies overwrite the stage just read
  }

  // Epilogue, kEpilogueRows frames at a time: stage the fp32 accumulators in shared memory,
  // then each warp normalises whole rows read lane-strided over channels.
  const T* __restrict__ conv_bias = static_cast<const T*>(p.conv_bias);
  const T* __restrict__ gamma = static_cast<const T*>(p.gamma);
  const T* __restrict__ beta = static_cast<const T*>(p.beta);
  T* __restrict__ out = static_cast<T*>(p.out);
  constexpr int kWarps = kMmaThreads / 32;
#pragma unroll
  for (int part = 0; part < kBlockM / kEpilogueRows; ++part) {
    if (warp_has_channels) {
#pragma unroll
      for (int i = 0; i < kEpilogueFrags; ++i) {
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) {
          wmma::store_matrix_sync(c_s + (i * 16) * kPitchC + warp_n * kWarpN + j * 16,
                                  acc[part * kEpilogueFrags + i][j], kPitchC, wmma::mem_row_major);
        }
      }
    }
    __syncthreads();
    for (int r = warp; r < kEpilogueRows; r += kWarps) {
      const int64_t m = m0 + part * kEpilogueRows + r;
      if (m < p.rows) {
        float v[kPerLane];
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int c = lane + 32 * i;
          const float bias = (conv_bias != nullptr && c < p.c_out) ? to_float(conv_bias[c]) : 0.0f;
          v[i] = c < p.c_out ? c_s[r * kPitchC + c] + bias : 0.0f;
        }
        layer_norm_gelu_store_row<kPerLane>(v, lane, p.c_out, p.eps, gamma, beta, out + m * p.c_out);
      }
    }
    __syncthreads();
  }
#else
  __trap();  // built for an architecture without bf16 WMMA / cp.async; the launcher never gets here
#endif
}

// ------------------------------------------------------------------------------------------
// SIMT path (fp32): warp w owns rows 4w..4w+3 of the block, lane owns channels lane + 32 j.
// ------------------------------------------------------------------------------------------

constexpr int kSimtThreads = 256;
constexpr int kSimtBlockM = 32;
constexpr int kSimtBlockK = 16;
constexpr int kSimtRowsPerWarp = kSimtBlockM / (kSimtThreads / 32);

__global__ void __launch_bounds__(kSimtThreads) conv_ln_gelu_simt_kernel(ConvParams p) {
  __shared__ float a_s[kSimtBlockM][kSimtBlockK + 1];
  __shared__ float b_s[kSimtBlockK][kBlockN + 1];  // [k][n]: lanes read consecutive channels
  __shared__ int64_t row_offset_s[kSimtBlockM];
  const float* __restrict__ x = static_cast<const float*>(p.x);
  const float* __restrict__ w = static_cast<const float*>(p.weight_t);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSimtBlockM;
  if (tid < kSimtBlockM) row_offset_s[tid] = a_row_offset(p, m0 + tid);
  __syncthreads();

  float acc[kSimtRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kSimtRowsPerWarp; ++r) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[r][i] = 0.0f;
  }

  for (int k0 = 0; k0 < p.k_total; k0 += kSimtBlockK) {
#pragma unroll
    for (int s = 0; s < kSimtBlockM * kSimtBlockK / kSimtThreads; ++s) {
      const int e = tid + s * kSimtThreads;
      const int r = e / kSimtBlockK;
      const int kk = e % kSimtBlockK;
      const int64_t offset = row_offset_s[r];
      a_s[r][kk] = (offset >= 0 && k0 + kk < p.k_total) ? x[offset + k0 + kk] : 0.0f;
    }
#pragma unroll 4
    for (int s = 0; s < kBlockN * kSimtBlockK / kSimtThreads; ++s) {
      const int e = tid + s * kSimtThreads;
      const int n = e / kSimtBlockK;
      const int kk = e % kSimtBlockK;
      b_s[kk][n] = (n < p.c_out && k0 + kk < p.k_total) ? w[static_cast<int64_t>(n) * p.k_total + k0 + kk] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBlockK; ++kk) {
      float a[kSimtRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kSimtRowsPerWarp; ++r) a[r] = a_s[warp * kSimtRowsPerWarp + r][kk];
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const float b = b_s[kk][lane + 32 * i];
#pragma unroll
        for (int r = 0; r < kSimtRowsPerWarp; ++r) acc[r][i] = fmaf(a[r], b, acc[r][i]);
      }
    }
    __syncthreads();
  }

  const float* __restrict__ conv_bias = static_cast<const float*>(p.conv_bias);
  float* __restrict__ out = static_cast<float*>(p.out);
#pragma unroll
  for (int r = 0; r < kSimtRowsPerWarp; ++r) {
    const int64_t m = m0 + warp * kSimtRowsPerWarp + r;
    if (m < p.rows) {
      float v[kPerLane];
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        v[i] = c < p.c_out ? acc[r][i] + (conv_bias != nullptr ? conv_bias[c] : 0.0f) : 0.0f;
      }
      layer_norm_gelu_store_row<kPerLane>(v, lane, p.c_out, p.eps, static_cast<const float*>(p.gamma),
                                          static_cast<const float*>(p.beta), out + m * p.c_out);
    }
  }
}

template <typename T, bool kVec>
cudaError_t launch_mma(const ConvParams& p, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(conv_ln_gelu_mma_kernel<T, kVec>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kMmaSmemBytes));
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>((p.rows + kBlockM - 1) / kBlockM);
  conv_ln_gelu_mma_kernel<T, kVec><<<blocks, kMmaThreads, kMmaSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mma_any_alignment(const ConvParams& p, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.weight_t) % 16 == 0;
  if (p.c_in % 8 == 0 && aligned) return launch_mma<T, true>(p, stream);
  return launch_mma<T, false>(p, stream);
}

}  // namespace

cudaError_t launch_conv_ln_gelu(DType dtype, const void* x, const void* weight_t, const void* conv_bias,
                                const void* gamma, const void* beta, void* out, int64_t batch, int64_t t_in,
                                int64_t t_out, int c_in, int c_out, int kernel, int stride, float eps,
                                cudaStream_t stream) {
  const int64_t k_total = static_cast<int64_t>(kernel) * c_in;
  if (c_out < 1 || c_out > kMaxChannels || c_in < 1 || kernel < 1 || stride < 1 || k_total > (int64_t{1} << 30) ||
      t_out < 1 || t_in < (t_out - 1) * stride + kernel || batch < 0) {
    return cudaErrorInvalidValue;
  }
  const ConvParams p{x,     weight_t, conv_bias, gamma, beta, out, batch * t_out, t_in, t_out, c_in, c_out,
                     static_cast<int>(k_total), stride, eps};
  if (p.rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return launch_mma_any_alignment<__half>(p, stream);
    case DType::kBFloat16:
      return launch_mma_any_alignment<__nv_bfloat16>(p, stream);
    case DType::kFloat32: {
      const unsigned blocks = static_cast<unsigned>((p.rows + kSimtBlockM - 1) / kSimtBlockM);
      conv_ln_gelu_simt_kernel<<<blocks, kSimtThreads, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace d2v
