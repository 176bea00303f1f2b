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

// A warp owns a whole row of channels so the LayerNorm statistics stay local.
constexpr int kMaxChannels = 512;
// Layer 0 keeps its (k, C) weights and the block's waveform span in shared memory.
constexpr int kMaxLayer0Kernel = 32;
constexpr int kMaxLayer0Stride = 32;
// Layer 0 puts the batch on gridDim.y.
constexpr int64_t kMaxBatch = 65535;

// Layer 0: one input channel. wave (B, S) contiguous; weight (C, 1, k) contiguous; conv_bias
// (C) or nullptr; gamma, beta (C); out (B, frames, C) with frames = (S - k) / stride + 1.
// pre_norm: out gets the conv output itself (with its bias), not GELU(LN(.)): what the backward
// recomputes for layer 0 (gamma and beta are then not read).
cudaError_t launch_conv0_ln_gelu(DType dtype, const void* wave, const void* weight, const void* conv_bias,
                                 const void* gamma, const void* beta, void* out, int64_t batch, int64_t samples,
                                 int64_t frames, int channels, int kernel, int stride, float eps, bool pre_norm,
                                 cudaStream_t stream);

// Layers 1..n-1: every conv, forward and backward, is a GEMM over strided views of channels-last
// tensors (the decomposition and its proof: d2v_kernels/ops/_conv_gemm_plan.py), run by CUTLASS
// (conv_gemm.cuh; one translation unit per dtype).
//
// D[b] (m x n) = A[b] (m x k) @ B[b] (k x n) (+ bias[n] on every row), fp32 accumulation, batched
// over b. Leading dimensions are in elements; row-major A may overlap its rows (lda < k).
enum class Layout : int { kRowMajor = 0, kColumnMajor = 1 };

struct GemmArgs {
  int m, n, k, batch;
  const void* a;
  int64_t lda, batch_stride_a;
  const void* b;
  int64_t ldb, batch_stride_b;
  const void* bias;  // n values in the dtype, or nullptr (forward GEMM only)
  void* d;
  int64_t ldd, batch_stride_d;
};

// fp16 and bf16 run Sm80 tensor-op GEMMs (sm_80 and sm_90a), which load 16 bytes at a time: every
// extent along a contiguous dimension, leading dimension, batch stride and pointer must be a
// multiple of kGemmAlignment elements (16-byte aligned). fp32 runs a SIMT GEMM, aligned anywhere.
constexpr int kGemmAlignment = 8;

// The three GEMMs of a conv layer (A, B, D layouts; D row-major):
//   forward:      A row-major (the input's overlapping frame rows), B column-major (the weight),
//                 D in the dtype, plus the conv bias
//   input grad:   A row-major (the padded output gradient's rows), B row-major (stacked taps),
//                 D in the dtype (a strided view of the input gradient)
//   weight grad:  A column-major (the input's frame rows, transposed), B row-major (the output
//                 gradient), D fp32 (one partial per batch row)
enum class ConvGemm : int { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

cudaError_t launch_conv_gemm(DType dtype, ConvGemm which, const GemmArgs& args, cudaStream_t stream);

// The input-gradient and weight-gradient GEMMs on Hopper (conv_gemm_sm90.cuh: wgmma, cp.async
// loads), the same arguments and results as launch_conv_gemm's; fp16 / bf16 only.
// cudaErrorNotSupported for the forward, fp32, or a problem CUTLASS cannot implement (the caller
// runs launch_conv_gemm). Launch only where launch_sm90a_probe says the sm_90a kernels are present.
cudaError_t launch_conv_gemm_sm90(DType dtype, ConvGemm which, const GemmArgs& args, cudaStream_t stream);

// The forward conv of layers 1..n-1 on Hopper (conv_fprop_sm90.cuh): out (B, T_out, C_out) = the
// conv of x (B, T_in, C_in) with weight (C_out, k, C_in), all packed channels-last, no bias,
// T_out = (T_in - k) / stride + 1. fp16 and bf16 only; C_in and C_out multiples of kGemmAlignment,
// pointers 16-byte aligned. cudaErrorNotSupported (nothing launched) where CUTLASS cannot implement
// the problem: the caller runs the GEMM path. Launch only where launch_sm90a_probe says the sm_90a
// kernels are present.
// The largest conv stride the Hopper conv takes: TMA's im2col descriptor encodes element strides
// up to 8 (cuTensorMapEncodeIm2col); CUTLASS's sm90 can_implement does not check it, and its
// descriptor setup only asserts the encode's result (compiled out under NDEBUG).
constexpr int kMaxHopperConvStride = 8;

struct ConvFpropArgs {
  const void* x;
  const void* weight;
  void* out;
  int batch, t_in, c_in, c_out, kernel, stride;
};

cudaError_t launch_conv_fprop_sm90(DType dtype, const ConvFpropArgs& args, cudaStream_t stream);

// Writes 1 into *flag (device memory) when the device runs this extension's sm_90a cubins (the
// wgmma / TMA kernels exist there), 0 when it runs another architecture's, where they are compiled
// out.
cudaError_t launch_sm90a_probe(int* flag, cudaStream_t stream);

// LayerNorm(C) + exact GELU over rows of `channels` values (channels <= kMaxChannels), fp32
// statistics. Forward: out = GELU(LN(z)); out may be z (in place).
cudaError_t launch_ln_gelu_rows(DType dtype, const void* z, const void* gamma, const void* beta, void* out,
                                int64_t rows, int channels, float eps, cudaStream_t stream);

// Backward of the rows from the conv output z and dy = d out (both contiguous (B, T, C), rows =
// B * T): dz, row t of batch b at dz + b * dz_batch_stride + t * C (rows_per_batch = T; dz may be dy
// when dz_batch_stride = T * C), and per block fp32 partial sums partials[block][q][c] for q = 0:
// dgamma (da * xhat), 1: dbeta (da), where a = LN(z) and da = dy * GELU'(a). The caller sums the
// ln_gelu_backward_blocks(rows) partials in order (deterministic: no atomics).
int ln_gelu_backward_blocks(int64_t rows);
cudaError_t launch_ln_gelu_rows_backward(DType dtype, const void* z, const void* gamma, const void* beta,
                                         const void* dy, void* dz, int64_t dz_batch_stride, int64_t rows_per_batch,
                                         float* partials, int64_t rows, int channels, float eps,
                                         cudaStream_t stream);

}  // namespace d2v
