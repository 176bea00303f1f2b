// LayerNorm(C) + exact GELU over channels-last rows, forward and backward: the step between the
// conv GEMMs of layers 1..n-1 (the GEMM writes the conv output z, these normalise and activate it).
// Their formulas, step by step: d2v_kernels/ops/_conv_gemm_plan.py (ln_gelu_rows, ln_gelu_rows_backward).
//
// One warp owns one row of up to kMaxChannels values, fp32 in registers, so the statistics are warp
// shuffles (fp32, two passes from registers). Accesses are packs of V consecutive channels, 16 bytes
// where the rows allow it (V = 16 / sizeof(T) when the channel count is a multiple of it and the
// pointers 16-byte aligned, else V = 1): the lane's i-th value is channel ((i / V) 32 + lane) V + i % V,
// so a warp's pack accesses are contiguous.
// Both kernels read a whole row into registers before writing it, so out may be z (forward) and dz
// may be dy (backward). The backward writes dz batch by batch with its own batch stride, so that it
// can land in the middle of the zero-padded buffer the input gradient's GEMMs read.
#include <cstdint>
#include <initializer_list>

#include "common.cuh"
#include "conv_feature_extractor.h"

namespace d2v {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = kMaxChannels / 32;
// The backward's grid: a fixed function of the row count, so the partial sums (and so dgamma and
// dbeta) do not depend on the GPU they run on.
constexpr int kMaxBackwardBlocks = 1024;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V>
__device__ __forceinline__ int channel_of(int i, int lane) {
  return ((i / V) * 32 + lane) * V + i % V;
}

// With channels a multiple of V a pack is wholly inside the row or wholly past it (then zeros).
template <int V, typename T>
__device__ __forceinline__ void load_row(const T* row, int lane, int channels, float (&v)[kPerLane]) {
#pragma unroll
  for (int p = 0; p < kPerLane / V; ++p) {
    const int c0 = channel_of<V>(p * V, lane);
    Pack<T, V> pack;
    if (c0 < channels) pack = *reinterpret_cast<const Pack<T, V>*>(row + c0);
#pragma unroll
    for (int e = 0; e < V; ++e) v[p * V + e] = c0 < channels ? to_float(pack.v[e]) : 0.0f;
  }
}

template <int V, typename T>
__device__ __forceinline__ void store_row(const float (&v)[kPerLane], int lane, int channels, T* row) {
#pragma unroll
  for (int p = 0; p < kPerLane / V; ++p) {
    const int c0 = channel_of<V>(p * V, lane);
    if (c0 < channels) {
      Pack<T, V> pack;
#pragma unroll
      for (int e = 0; e < V; ++e) pack.v[e] = from_float<T>(v[p * V + e]);
      *reinterpret_cast<Pack<T, V>*>(row + c0) = pack;
    }
  }
}

// Mean and 1 / std of a row held as load_row leaves it.
template <int V>
__device__ __forceinline__ void row_statistics(const float (&v)[kPerLane], int lane, int channels, float eps,
                                               float& mean, float& rstd) {
  const float inv_channels = 1.0f / static_cast<float>(channels);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum += v[i];
  mean = warp_sum(sum) * inv_channels;
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const float d = channel_of<V>(i, lane) < channels ? v[i] - mean : 0.0f;
    squares += d * d;
  }
  rstd = rsqrtf(warp_sum(squares) * inv_channels + eps);
}

template <int V, typename T>
__global__ void __launch_bounds__(kThreads)
    ln_gelu_rows_kernel(const T* z, const T* __restrict__ gamma, const T* __restrict__ beta, T* out, int64_t rows,
                        int channels, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  float v[kPerLane], g[kPerLane], b[kPerLane];
  load_row<V>(z + row * channels, lane, channels, v);
  load_row<V>(gamma, lane, channels, g);
  load_row<V>(beta, lane, channels, b);
  float mean, rstd;
  row_statistics<V>(v, lane, channels, eps, mean, rstd);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] = gelu_erf((v[i] - mean) * rstd * g[i] + b[i]);
  store_row<V>(v, lane, channels, out + row * channels);
}

__device__ __forceinline__ float gelu_erf_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * __expf(-0.5f * x * x);
  return cdf + x * pdf;
}

// Sums acc over the block's warps per channel and writes the block's partial row.
template <int V>
__device__ __forceinline__ void store_block_partial(const float (&acc)[kPerLane], float (*scratch)[kMaxChannels],
                                                    int lane, int warp, int channels, float* __restrict__ out) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) scratch[warp][channel_of<V>(i, lane)] = acc[i];
  __syncthreads();
  for (int c = threadIdx.x; c < channels; c += kThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += scratch[w][c];
    out[c] = sum;
  }
  __syncthreads();
}

// Two blocks an SM (at most 128 registers a thread) for more loads in flight.
template <int V, typename T>
__global__ void __launch_bounds__(kThreads, 2)
    ln_gelu_rows_backward_kernel(const T* __restrict__ z, const T* __restrict__ gamma, const T* __restrict__ beta,
                                 const T* dy, T* dz, int64_t dz_batch_stride, int64_t rows_per_batch,
                                 float* __restrict__ partials, int64_t rows, int channels, float eps) {
  __shared__ float scratch[kWarps][kMaxChannels];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float inv_channels = 1.0f / static_cast<float>(channels);
  float d_gamma[kPerLane] = {}, d_beta[kPerLane] = {};
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows; row += step) {
    float x[kPerLane], d[kPerLane];
    load_row<V>(z + row * channels, lane, channels, x);
    load_row<V>(dy + row * channels, lane, channels, d);
    float mean, rstd;
    row_statistics<V>(x, lane, channels, eps, mean, rstd);
    // x becomes xhat, d becomes dxhat = da * gamma; sums for the LayerNorm input gradient
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = channel_of<V>(i, lane);
      const bool in = c < channels;
      // gamma and beta are read again each row (L1 hits): held in registers they would cost the
      // second block an SM (ptxas -v)
      const float g = in ? to_float(gamma[c]) : 0.0f;
      const float xhat = in ? (x[i] - mean) * rstd : 0.0f;
      const float da = in ? d[i] * gelu_erf_grad(xhat * g + to_float(beta[c])) : 0.0f;
      d_gamma[i] += da * xhat;
      d_beta[i] += da;
      x[i] = xhat;
      d[i] = da * g;
      sum_dxhat += d[i];
      sum_dxhat_xhat += d[i] * xhat;
    }
    const float mean_dxhat = warp_sum(sum_dxhat) * inv_channels;
    const float mean_dxhat_xhat = warp_sum(sum_dxhat_xhat) * inv_channels;
    const int64_t batch = row / rows_per_batch;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      d[i] = rstd * (d[i] - mean_dxhat - x[i] * mean_dxhat_xhat);  // past the row's end: not stored
    }
    store_row<V>(d, lane, channels, dz + batch * dz_batch_stride + (row - batch * rows_per_batch) * channels);
  }
  float* block_partials = partials + static_cast<int64_t>(blockIdx.x) * 2 * channels;
  store_block_partial<V>(d_gamma, scratch, lane, warp, channels, block_partials);
  store_block_partial<V>(d_beta, scratch, lane, warp, channels, block_partials + channels);
}

bool rows_ok(int64_t rows, int channels) { return rows >= 0 && channels >= 1 && channels <= kMaxChannels; }

// 16-byte packs when every row starts 16-byte aligned: the pointers and the channel count (and
// dz's batch stride) fit it.
template <typename T>
constexpr int kPack = 16 / static_cast<int>(sizeof(T));

template <typename T>
bool packs_fit(int channels, std::initializer_list<const void*> pointers, int64_t stride = 0) {
  if (channels % kPack<T> != 0 || stride % kPack<T> != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename T>
cudaError_t launch_forward_typed(const void* z, const void* gamma, const void* beta, void* out, int64_t rows,
                                 int channels, float eps, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  const auto kernel = packs_fit<T>(channels, {z, gamma, beta, out}) ? ln_gelu_rows_kernel<kPack<T>, T>
                                                                     : ln_gelu_rows_kernel<1, T>;
  kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(z), static_cast<const T*>(gamma),
                                          static_cast<const T*>(beta), static_cast<T*>(out), rows, channels, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_typed(const void* z, const void* gamma, const void* beta, const void* dy, void* dz,
                                  int64_t dz_batch_stride, int64_t rows_per_batch, float* partials, int64_t rows,
                                  int channels, float eps, cudaStream_t stream) {
  const auto kernel = packs_fit<T>(channels, {z, gamma, beta, dy, dz}, dz_batch_stride)
                          ? ln_gelu_rows_backward_kernel<kPack<T>, T>
                          : ln_gelu_rows_backward_kernel<1, T>;
  kernel<<<ln_gelu_backward_blocks(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<const T*>(gamma), static_cast<const T*>(beta), static_cast<const T*>(dy),
      static_cast<T*>(dz), dz_batch_stride, rows_per_batch, partials, rows, channels, eps);
  return cudaGetLastError();
}

}  // namespace

int ln_gelu_backward_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBackwardBlocks ? kMaxBackwardBlocks : blocks));
}

cudaError_t launch_ln_gelu_rows(DType dtype, const void* z, const void* gamma, const void* beta, void* out,
                                int64_t rows, int channels, float eps, cudaStream_t stream) {
  if (!rows_ok(rows, channels) || (rows + kWarps - 1) / kWarps > 0x7fffffff) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return launch_forward_typed<__half>(z, gamma, beta, out, rows, channels, eps, stream);
    case DType::kBFloat16:
      return launch_forward_typed<__nv_bfloat16>(z, gamma, beta, out, rows, channels, eps, stream);
    case DType::kFloat32:
      return launch_forward_typed<float>(z, gamma, beta, out, rows, channels, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_ln_gelu_rows_backward(DType dtype, const void* z, const void* gamma, const void* beta,
                                         const void* dy, void* dz, int64_t dz_batch_stride, int64_t rows_per_batch,
                                         float* partials, int64_t rows, int channels, float eps,
                                         cudaStream_t stream) {
  // With no rows each block still writes its (zero) partials: the caller's sum stays defined.
  if (!rows_ok(rows, channels) || rows_per_batch < 1 || dz_batch_stride < rows_per_batch * channels) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kFloat16:
      return launch_backward_typed<__half>(z, gamma, beta, dy, dz, dz_batch_stride, rows_per_batch, partials, rows,
                                           channels, eps, stream);
    case DType::kBFloat16:
      return launch_backward_typed<__nv_bfloat16>(z, gamma, beta, dy, dz, dz_batch_stride, rows_per_batch, partials,
                                                  rows, channels, eps, stream);
    case DType::kFloat32:
      return launch_backward_typed<float>(z, gamma, beta, dy, dz, dz_batch_stride, rows_per_batch, partials, rows,
                                          channels, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace d2v
