// Fused strided Conv1d -> LayerNorm(C) -> GELU layers of the Data2VecAudio feature encoder.
//
// Torch-free interface: raw device pointers, sizes and a cudaStream_t. Activations are
// channels-last (B, T, C) contiguous between layers so no layer transposes. Every launcher
// returns the launch's cudaError_t (cudaSuccess when it was queued).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace d2v {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// A block owns whole rows of output channels so the LayerNorm statistics stay local.
constexpr int kMaxChannels = 512;
// Layer 0 keeps its (k, C) weights and the block's waveform span in shared memory.
constexpr int kMaxLayer0Kernel = 32;
constexpr int kMaxLayer0Stride = 32;
// Layer 0 puts the batch on gridDim.y.
constexpr int64_t kMaxBatch = 65535;

// Layer 0: one input channel. wave (B, S) contiguous; weight (C, 1, k) contiguous; conv_bias
// (C) or nullptr; gamma, beta (C); out (B, frames, C) with frames = (S - k) / stride + 1.
cudaError_t launch_conv0_ln_gelu(DType dtype, const void* wave, const void* weight, const void* conv_bias,
                                 const void* gamma, const void* beta, void* out, int64_t batch, int64_t samples,
                                 int64_t frames, int channels, int kernel, int stride, float eps,
                                 cudaStream_t stream);

// Layers 1..n-1 as an implicit GEMM: M = B * t_out frames, N = c_out, K = kernel * c_in.
// x (B, t_in, c_in) contiguous; weight_t (c_out, kernel, c_in) contiguous (the conv weight with
// its last two dims swapped, so a K index j * c_in + c matches x's memory order); conv_bias
// (c_out) or nullptr; gamma, beta (c_out); out (B, t_out, c_out).
cudaError_t launch_conv_ln_gelu(DType dtype, const void* x, const void* weight_t, const void* conv_bias,
                                const void* gamma, const void* beta, void* out, int64_t batch, int64_t t_in,
                                int64_t t_out, int c_in, int c_out, int kernel, int stride, float eps,
                                cudaStream_t stream);

}  // namespace d2v
