// LayerNorm(C) + exact GELU over channels-last rows, forward and backward: the step between the
// conv GEMMs of layers 1..n-1 (the GEMM writes the conv output z, these normalise and activate it).
// Their formulas, step by step: d2v_kernels/ops/_conv_gemm_plan.py (ln_gelu_rows, ln_gelu_rows_backward).
//
// One warp owns one row of up to kMaxChannels values, channel lane + 32 i in its i-th register, so
// the statistics are warp shuffles (fp32, two passes from registers) and the accesses coalesce.
// Both kernels read a whole row into registers before writing it, so out may be z (forward) and dz
// may be dy (backward). The backward writes dz batch by batch with its own batch stride, so that it
// can land in the middle of the zero-padded buffer the input gradient's GEMMs read.
#include "common.cuh"
#include "conv_feature_extractor.h"

namespace d2v {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = kMaxChannels / 32;
// The backward's grid: a fixed function of the row count, so the partial sums (and so dgamma,
// dbeta and the conv bias gradient) do not depend on the GPU they run on.
constexpr int kMaxBackwardBlocks = 1024;

template <typename T>
__device__ __forceinline__ void load_row(const T* row, int lane, int channels, float (&v)[kPerLane]) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    v[i] = c < channels ? to_float(row[c]) : 0.0f;
  }
}

// Mean and 1 / std of a row held as load_row leaves it.
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
    const float d = (lane + 32 * i < channels) ? v[i] - mean : 0.0f;
    squares += d * d;
  }
  rstd = rsqrtf(warp_sum(squares) * inv_channels + eps);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ln_gelu_rows_kernel(const T* z, const T* __restrict__ gamma, const T* __restrict__ beta, T* out, int64_t rows,
                        int channels, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  float v[kPerLane];
  load_row(z + row * channels, lane, channels, v);
  layer_norm_gelu_store_row<kPerLane>(v, lane, channels, eps, gamma, beta, out + row * channels);
}

__device__ __forceinline__ float gelu_erf_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * __expf(-0.5f * x * x);
  return cdf + x * pdf;
}

// Sums acc over the block's warps per channel and writes the block's partial row.
__device__ __forceinline__ void store_block_partial(const float (&acc)[kPerLane], float (*scratch)[kMaxChannels],
                                                    int lane, int warp, int channels, float* __restrict__ out) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) scratch[warp][lane + 32 * i] = acc[i];
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
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    ln_gelu_rows_backward_kernel(const T* __restrict__ z, const T* __restrict__ gamma, const T* __restrict__ beta,
                                 const T* dy, T* dz, int64_t dz_batch_stride, int64_t rows_per_batch,
                                 float* __restrict__ partials, int64_t rows, int channels, float eps) {
  __shared__ float scratch[kWarps][kMaxChannels];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float inv_channels = 1.0f / static_cast<float>(channels);
  float d_gamma[kPerLane] = {}, d_beta[kPerLane] = {}, d_bias[kPerLane] = {};
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows; row += step) {
    float x[kPerLane], d[kPerLane];
    load_row(z + row * channels, lane, channels, x);
    load_row(dy + row * channels, lane, channels, d);
    float mean, rstd;
    row_statistics(x, lane, channels, eps, mean, rstd);
    // x becomes xhat, d becomes dxhat = da * gamma; sums for the LayerNorm input gradient
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + 32 * i;
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
    T* dz_row = dz + batch * dz_batch_stride + (row - batch * rows_per_batch) * channels;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + 32 * i;
      const float grad = rstd * (d[i] - mean_dxhat - x[i] * mean_dxhat_xhat);
      if (c < channels) {
        d_bias[i] += grad;
        dz_row[c] = from_float<T>(grad);
      }
    }
  }
  float* block_partials = partials + static_cast<int64_t>(blockIdx.x) * 3 * channels;
  store_block_partial(d_gamma, scratch, lane, warp, channels, block_partials);
  store_block_partial(d_beta, scratch, lane, warp, channels, block_partials + channels);
  store_block_partial(d_bias, scratch, lane, warp, channels, block_partials + 2 * channels);
}

bool rows_ok(int64_t rows, int channels) { return rows >= 0 && channels >= 1 && channels <= kMaxChannels; }

template <typename T>
cudaError_t launch_forward_typed(const void* z, const void* gamma, const void* beta, void* out, int64_t rows,
                                 int channels, float eps, cudaStream_t stream) {
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  ln_gelu_rows_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<const T*>(gamma), static_cast<const T*>(beta), static_cast<T*>(out), rows,
      channels, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_typed(const void* z, const void* gamma, const void* beta, const void* dy, void* dz,
                                  int64_t dz_batch_stride, int64_t rows_per_batch, float* partials, int64_t rows,
                                  int channels, float eps, cudaStream_t stream) {
  ln_gelu_rows_backward_kernel<T><<<ln_gelu_backward_blocks(rows), kThreads, 0, stream>>>(
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
