// Device helpers shared by the feature-extractor kernels: dtype conversion, warp sums and the
// LayerNorm + exact GELU epilogue over one channels-last row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace d2v {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// One warp normalises one row of `channels` values and writes GELU(LN(row)) to out_row.
// Layout: v[i] holds channel lane + 32 * i; entries whose channel is >= channels must be 0.
// Two-pass statistics in fp32 (mean, then the sum of squared deviations) from registers.
template <int kPerLane, typename T>
__device__ __forceinline__ void layer_norm_gelu_store_row(const float (&v)[kPerLane], int lane, int channels,
                                                          float eps, const T* __restrict__ gamma,
                                                          const T* __restrict__ beta, T* __restrict__ out_row) {
  const float inv_channels = 1.0f / static_cast<float>(channels);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum += v[i];
  const float mean = warp_sum(sum) * inv_channels;
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const float d = (lane + 32 * i < channels) ? v[i] - mean : 0.0f;
    squares += d * d;
  }
  const float rstd = rsqrtf(warp_sum(squares) * inv_channels + eps);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < channels) {
      const float y = (v[i] - mean) * rstd * to_float(gamma[c]) + to_float(beta[c]);
      out_row[c] = from_float<T>(gelu_erf(y));
    }
  }
}

}  // namespace d2v
