// The conv layers' GEMMs on CUTLASS: cutlass::gemm::device::GemmUniversal in batched mode, Sm80
// kernels (cp.async multistage pipeline; they run on sm_80 and sm_90). Included by one translation
// unit per dtype (conv_gemm_f16.cu, conv_gemm_bf16.cu, conv_gemm_f32.cu), which instantiate
// launch_conv_gemm_typed<kDType> for the three GEMMs of conv_feature_extractor.h; conv_gemm.cpp
// dispatches on the dtype. The views these GEMMs read and write are those of
// d2v_kernels/ops/_conv_gemm_plan.py, made by csrc/binding.cpp.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_universal.h>
#include <cutlass/layout/matrix.h>

#include "conv_feature_extractor.h"
#include "cutlass_common.cuh"

namespace d2v {

// Tensor-op tiles (fp16, bf16): 128 x 128 x 32 per block, 4 warps of 64 x 64, mma.sync 16x8x16,
// 4 pipeline stages (64 KB of shared memory). N is 512 in Data2Vec (4 tiles); M is the frames.
template <typename Element, typename LayoutA, typename LayoutB, typename ElementD>
struct TensorOpGemm {
  using type = cutlass::gemm::device::GemmUniversal<
      Element, LayoutA, Element, LayoutB, ElementD, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>,
      cutlass::epilogue::thread::LinearCombination<ElementD, 128 / cutlass::sizeof_bits<ElementD>::value, float,
                                                   float>,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 4, kGemmAlignment, kGemmAlignment>;
};

// fp32: SIMT FMA GEMM with CUTLASS's default Sm80 SIMT tiles, one element per access (any alignment).
template <typename LayoutA, typename LayoutB>
struct SimtGemm {
  using type = cutlass::gemm::device::GemmUniversal<float, LayoutA, float, LayoutB, float, cutlass::layout::RowMajor,
                                                    float, cutlass::arch::OpClassSimt, cutlass::arch::Sm80>;
};

template <DType kDType, typename LayoutA, typename LayoutB, bool kFp32Output>
struct ConvGemmKernel {
  using Element = typename CutlassElement<kDType>::type;
  using ElementD = typename std::conditional<kFp32Output, float, Element>::type;
  using type = typename std::conditional<kDType == DType::kFloat32, typename SimtGemm<LayoutA, LayoutB>::type,
                                         typename TensorOpGemm<Element, LayoutA, LayoutB, ElementD>::type>::type;
};

inline bool aligned(const void* p, int elements, int element_bytes) {
  return reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(elements) * element_bytes) == 0;
}

template <typename Gemm>
cudaError_t run_gemm(const GemmArgs& g, cudaStream_t stream) {
  using ElementA = typename Gemm::ElementA;
  using ElementC = typename Gemm::ElementC;
  if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0 || g.batch > kMaxBatch) return cudaErrorInvalidValue;
  if (g.m == 0 || g.n == 0 || g.batch == 0) return cudaSuccess;
  // can_implement checks the extents; the leading dimensions, batch strides and pointers are ours.
  constexpr int kAlignA = Gemm::kAlignmentA;
  constexpr int kAlignC = Gemm::kAlignmentC;
  const bool strides_ok = g.lda % kAlignA == 0 && g.batch_stride_a % kAlignA == 0 && g.ldb % kAlignA == 0 &&
                          g.batch_stride_b % kAlignA == 0 && g.ldd % kAlignC == 0 && g.batch_stride_d % kAlignC == 0;
  const bool pointers_ok = aligned(g.a, kAlignA, sizeof(ElementA)) && aligned(g.b, kAlignA, sizeof(ElementA)) &&
                           aligned(g.d, kAlignC, sizeof(ElementC)) &&
                           (g.bias == nullptr || aligned(g.bias, kAlignC, sizeof(ElementC)));
  if (!strides_ok || !pointers_ok) return cudaErrorMisalignedAddress;
  // The bias is the epilogue's source C with leading dimension and batch stride 0: the same n
  // values on every row (beta = 1); without it beta = 0 and C is not read.
  const float beta = g.bias != nullptr ? 1.0f : 0.0f;
  typename Gemm::Arguments arguments(cutlass::gemm::GemmUniversalMode::kBatched, {g.m, g.n, g.k}, g.batch,
                                     {1.0f, beta}, g.a, g.b, g.bias, g.d, g.batch_stride_a, g.batch_stride_b, 0,
                                     g.batch_stride_d, g.lda, g.ldb, 0, g.ldd);
  if (Gemm::can_implement(arguments) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  // Batched mode needs no workspace (only the split-K modes do).
  return initialize_and_run<Gemm>(arguments, nullptr, stream);
}

template <DType kDType>
cudaError_t launch_conv_gemm_typed(ConvGemm which, const GemmArgs& args, cudaStream_t stream) {
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  switch (which) {
    case ConvGemm::kForward:
      return run_gemm<typename ConvGemmKernel<kDType, Row, Col, false>::type>(args, stream);
    case ConvGemm::kInputGrad:
      if (args.bias != nullptr) return cudaErrorInvalidValue;
      return run_gemm<typename ConvGemmKernel<kDType, Row, Row, false>::type>(args, stream);
    case ConvGemm::kWeightGrad:
      if (args.bias != nullptr) return cudaErrorInvalidValue;
      return run_gemm<typename ConvGemmKernel<kDType, Col, Row, true>::type>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace d2v
