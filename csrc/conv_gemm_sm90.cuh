// The conv layers' backward GEMMs on Hopper: CUTLASS 3 GEMMs for sm_90a (wgmma) with cp.async
// operand loads (KernelCpAsyncWarpSpecialized: a producer warpgroup pair loading, a consumer
// warpgroup issuing wgmma). cp.async, not TMA: the input gradient's A and the weight gradient's A are
// views whose rows overlap (a leading dimension below the row length), which a tiled TMA descriptor
// is not known to accept; cp.async reads any 16-byte-aligned strided view. The same GemmArgs, views
// and results as the Sm80 GEMMs (conv_gemm.cuh) for the input-gradient and weight-gradient GEMMs;
// one translation unit per dtype (conv_gemm_sm90_f16.cu, conv_gemm_sm90_bf16.cu).
//
// As the Hopper conv (conv_fprop_sm90.cuh): the kernel body exists only in an sm_90a cubin; the
// binding takes this path only where arch_probe.cu says the device runs it; a build without sm_90a
// (no D2V_SM90A_CONV) compiles a stub answering cudaErrorNotSupported.
#pragma once

#include "conv_feature_extractor.h"

#if !defined(D2V_SM90A_CONV)

namespace d2v {

template <DType kDType>
cudaError_t launch_conv_gemm_sm90_typed(ConvGemm, const GemmArgs&, cudaStream_t) {
  return cudaErrorNotSupported;
}

}  // namespace d2v

#else

// In this order: CUTLASS 3's headers use cute's algebra without including it.
#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>

#include "cutlass_common.cuh"

namespace d2v {

// D (m x n) = A (m x k) B (k x n), batched over L = batch. CUTLASS 3 names B by (n, k): a row-major
// (k x n) B is its RowMajor tag (n contiguous). 128 x 128 x 64 tiles, one CTA a cluster, as many
// stages as the shared memory holds (the epilogue stores from registers, no shared memory).
template <typename Element, typename LayoutA, typename LayoutB, typename ElementD>
struct HopperGemm {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, kAlignD,
      ElementD, cutlass::layout::RowMajor, kAlignD, cutlass::epilogue::NoSmemWarpSpecialized>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kGemmAlignment, Element, LayoutB,
      kGemmAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelCpAsyncWarpSpecialized>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// The CUTLASS 3 arguments of one GEMM: each stride is (the m or n mode's, the k mode's, the batch's),
// in CUTLASS 3's (M|N, K, L) order; the layout tags fix which of the first two is the unit one.
template <typename Gemm>
typename Gemm::Arguments hopper_gemm_arguments(const GemmArgs& g) {
  using ElementA = typename Gemm::ElementA;
  using ElementD = typename Gemm::ElementD;
  typename Gemm::GemmKernel::StrideA stride_a;
  if constexpr (cute::is_same_v<typename Gemm::LayoutA, cutlass::layout::RowMajor>) {
    stride_a = cute::make_stride(g.lda, cute::Int<1>{}, g.batch_stride_a);
  } else {
    stride_a = cute::make_stride(cute::Int<1>{}, g.lda, g.batch_stride_a);
  }
  const typename Gemm::GemmKernel::StrideB stride_b = cute::make_stride(cute::Int<1>{}, g.ldb, g.batch_stride_b);
  const typename Gemm::GemmKernel::StrideD stride_d = cute::make_stride(g.ldd, cute::Int<1>{}, g.batch_stride_d);
  return {cutlass::gemm::GemmUniversalMode::kGemm,
          {g.m, g.n, g.k, g.batch},
          {static_cast<const ElementA*>(g.a), stride_a, static_cast<const ElementA*>(g.b), stride_b},
          {{1.0f, 0.0f}, nullptr, stride_d, static_cast<ElementD*>(g.d), stride_d}};
}

template <typename Gemm>
cudaError_t run_hopper_gemm(const GemmArgs& g, cudaStream_t stream) {
  using ElementD = typename Gemm::ElementD;
  if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0 || g.bias != nullptr) return cudaErrorInvalidValue;
  if (g.m == 0 || g.n == 0 || g.batch == 0) return cudaSuccess;
  if (g.k == 0) return cudaErrorNotSupported;  // D = 0: no k-block would run; the Sm80 GEMM writes it
  constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool strides_ok = g.lda % kGemmAlignment == 0 && g.batch_stride_a % kGemmAlignment == 0 &&
                          g.ldb % kGemmAlignment == 0 && g.batch_stride_b % kGemmAlignment == 0 &&
                          g.ldd % kAlignD == 0 && g.batch_stride_d % kAlignD == 0;
  if (!strides_ok || !aligned(g.a) || !aligned(g.b) || !aligned(g.d)) return cudaErrorMisalignedAddress;
  const typename Gemm::Arguments arguments = hopper_gemm_arguments<Gemm>(g);
  if (Gemm::can_implement(arguments) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (Gemm::get_workspace_size(arguments) != 0) return cudaErrorNotSupported;  // no split-K here
  return initialize_and_run<Gemm>(arguments, nullptr, stream);
}

// The two GEMM types, as the host check (tests/csrc/hopper_gemm_host_check.cu) names them.
template <DType kDType>
using HopperInputGradGemm = typename HopperGemm<typename CutlassElement<kDType>::type, cutlass::layout::RowMajor,
                                                cutlass::layout::RowMajor, typename CutlassElement<kDType>::type>::Gemm;
template <DType kDType>
using HopperWeightGradGemm = typename HopperGemm<typename CutlassElement<kDType>::type, cutlass::layout::ColumnMajor,
                                                 cutlass::layout::RowMajor, float>::Gemm;

// The input-gradient and weight-gradient GEMMs (conv_feature_extractor.h's ConvGemm) in fp16 / bf16;
// cudaErrorNotSupported for the forward (the Hopper conv's) and where CUTLASS cannot implement one.
template <DType kDType>
cudaError_t launch_conv_gemm_sm90_typed(ConvGemm which, const GemmArgs& args, cudaStream_t stream) {
  switch (which) {
    case ConvGemm::kInputGrad:
      return run_hopper_gemm<HopperInputGradGemm<kDType>>(args, stream);
    case ConvGemm::kWeightGrad:
      return run_hopper_gemm<HopperWeightGradGemm<kDType>>(args, stream);
    case ConvGemm::kForward:
      return cudaErrorNotSupported;
  }
  return cudaErrorInvalidValue;
}

}  // namespace d2v

#endif  // D2V_SM90A_CONV
