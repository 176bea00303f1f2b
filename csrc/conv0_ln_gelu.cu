// Layer 0 of the feature encoder: Conv1d(1 -> C, k, stride) -> LayerNorm(C) -> GELU.
//
// Memory-bound (10 MACs per output value in the base config): a block takes a tile of
// kFramesPerBlock frames of one batch row, reads its waveform span and the (k, C) weights
// into shared memory once, and writes each normalised frame once. A warp computes
// kFramesPerStep frames at a time, lane-strided over channels (channel lane + 32 i), so the
// LayerNorm statistics are warp shuffles and the stores are coalesced.
#include "common.cuh"
#include "conv_feature_extractor.h"

namespace d2v {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFramesPerBlock = 128;
constexpr int kFramesPerStep = 4;
constexpr int kPerLane = kMaxChannels / 32;

struct Conv0Params {
  const void* wave;
  const void* weight;
  const void* conv_bias;
  const void* gamma;
  const void* beta;
  void* out;
  int64_t samples;
  int64_t frames;
  int channels;
  int kernel;
  int stride;
  float eps;
  bool pre_norm;
};

// Shared memory: weights [kernel][kMaxChannels] as fp32 (tap-major, zero past `channels`, so
// lanes read consecutive words), then the waveform span of the block's frames as fp32.
size_t conv0_smem_bytes(int kernel, int stride) {
  const size_t span = static_cast<size_t>(kFramesPerBlock - 1) * stride + kernel;
  return (static_cast<size_t>(kernel) * kMaxChannels + span) * sizeof(float);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) conv0_ln_gelu_kernel(Conv0Params p) {
  extern __shared__ float smem[];
  float* weight_s = smem;
  float* wave_s = smem + p.kernel * kMaxChannels;

  const T* __restrict__ wave = static_cast<const T*>(p.wave);
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  const T* __restrict__ conv_bias = static_cast<const T*>(p.conv_bias);
  T* __restrict__ out = static_cast<T*>(p.out);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t batch_index = blockIdx.y;
  const int64_t first_frame = static_cast<int64_t>(blockIdx.x) * kFramesPerBlock;
  const int frames_here = static_cast<int>(min(static_cast<int64_t>(kFramesPerBlock), p.frames - first_frame));
  // Last sample read: (first_frame + frames_here - 1) * stride + kernel - 1 <= samples - 1.
  const int span = (frames_here - 1) * p.stride + p.kernel;

  // weight is (C, 1, k): element (c, j) at c * kernel + j.
  for (int i = tid; i < p.kernel * kMaxChannels; i += kThreads) {
    const int j = i / kMaxChannels;
    const int c = i - j * kMaxChannels;
    weight_s[i] = c < p.channels ? to_float(weight[c * p.kernel + j]) : 0.0f;
  }
  const T* wave_row = wave + batch_index * p.samples + first_frame * p.stride;
  for (int i = tid; i < span; i += kThreads) wave_s[i] = to_float(wave_row[i]);
  __syncthreads();

  float bias[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    bias[i] = (conv_bias != nullptr && c < p.channels) ? to_float(conv_bias[c]) : 0.0f;
  }

  for (int f0 = warp * kFramesPerStep; f0 < frames_here; f0 += kWarps * kFramesPerStep) {
    float acc[kFramesPerStep][kPerLane];
#pragma unroll
    for (int f = 0; f < kFramesPerStep; ++f) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[f][i] = bias[i];
    }
    for (int j = 0; j < p.kernel; ++j) {
      float x[kFramesPerStep];
#pragma unroll
      for (int f = 0; f < kFramesPerStep; ++f) {
        // Frames past the tile's end read the last valid frame's samples (stay inside wave_s);
        // their results are never stored.
        const int frame = min(f0 + f, frames_here - 1);
        x[f] = wave_s[frame * p.stride + j];
      }
      const float* w_tap = weight_s + j * kMaxChannels + lane;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const float w = w_tap[32 * i];
#pragma unroll
        for (int f = 0; f < kFramesPerStep; ++f) acc[f][i] = fmaf(w, x[f], acc[f][i]);
      }
    }
#pragma unroll
    for (int f = 0; f < kFramesPerStep; ++f) {
      if (f0 + f < frames_here) {
        T* out_row = out + ((batch_index * p.frames) + first_frame + f0 + f) * p.channels;
        if (p.pre_norm) {
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            if (lane + 32 * i < p.channels) out_row[lane + 32 * i] = from_float<T>(acc[f][i]);
          }
        } else {
          layer_norm_gelu_store_row<kPerLane>(acc[f], lane, p.channels, p.eps, static_cast<const T*>(p.gamma),
                                              static_cast<const T*>(p.beta), out_row);
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(const Conv0Params& p, int64_t batch, cudaStream_t stream) {
  const size_t smem = conv0_smem_bytes(p.kernel, p.stride);
  const cudaError_t err = cudaFuncSetAttribute(conv0_ln_gelu_kernel<T>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.frames + kFramesPerBlock - 1) / kFramesPerBlock),
                  static_cast<unsigned>(batch));
  conv0_ln_gelu_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_conv0_ln_gelu(DType dtype, const void* wave, const void* weight, const void* conv_bias,
                                 const void* gamma, const void* beta, void* out, int64_t batch, int64_t samples,
                                 int64_t frames, int channels, int kernel, int stride, float eps, bool pre_norm,
                                 cudaStream_t stream) {
  if (channels < 1 || channels > kMaxChannels || kernel < 1 || kernel > kMaxLayer0Kernel || stride < 1 ||
      stride > kMaxLayer0Stride || batch > kMaxBatch || frames < 1 || samples < (frames - 1) * stride + kernel) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) return cudaSuccess;
  const Conv0Params p{wave, weight, conv_bias, gamma, beta, out, samples,
                      frames, channels, kernel, stride, eps, pre_norm};
  switch (dtype) {
    case DType::kFloat16:
      return launch_typed<__half>(p, batch, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, batch, stream);
    case DType::kFloat32:
      return launch_typed<float>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace d2v
