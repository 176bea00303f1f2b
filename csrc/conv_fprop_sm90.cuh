// The conv layers' forward on Hopper: CUTLASS 3's implicit-GEMM convolution for sm_90a
// (cutlass::conv::kernel::ConvUniversal: TMA im2col loads of the channels-last activations, wgmma,
// a warp-specialized producer / consumer pipeline, a TMA store of the output). No strided views
// and no weight transpose beyond the (C_out, k, C_in) copy the Sm80 GEMM also reads: the kernel
// walks the (B, T_in, C_in) input through the conv's own stride. Included by one translation unit
// per dtype (conv_fprop_sm90_f16.cu, conv_fprop_sm90_bf16.cu).
//
// The kernel body exists only in an sm_90a cubin (CUTLASS compiles it out for other targets, leaving
// a kernel that prints an error and writes nothing): the binding asks the device which cubin it runs
// (arch_probe.cu) and takes this path only where it is sm_90a. A build without sm_90a among its
// targets (no D2V_SM90A_CONV, which the build defines with it) compiles no CUTLASS here: the
// launcher answers cudaErrorNotSupported.
#pragma once

#include "conv_feature_extractor.h"

#if !defined(D2V_SM90A_CONV)

namespace d2v {

template <DType kDType>
cudaError_t conv_fprop_sm90_typed(const ConvFpropArgs&, cudaStream_t) {
  return cudaErrorNotSupported;
}

}  // namespace d2v

#else

// In this order: CUTLASS 3's conv headers use cute's algebra and the kernel's hardware info
// without including them.
#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>

#include "cutlass_common.cuh"

namespace d2v {

// 128 x 128 output tile (frames x output channels: 4 tiles across C_out = 512), K in 64-element
// slices (C_in = 512 a tap: 8 slices a tap), one CTA a cluster, as many pipeline stages as the
// shared memory left by the epilogue holds. No source tensor C (no conv bias on this path).
template <DType kDType>
struct HopperFprop {
  using Element = typename CutlassElement<kDType>::type;
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::TensorNWC, kAlignment,
      Element, cutlass::layout::TensorNWC, kAlignment, cutlass::epilogue::TmaWarpSpecialized>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element,
      cutlass::layout::TensorNWC, kAlignment, Element, cutlass::layout::TensorNWC, kAlignment, float, TileShape,
      ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;
  using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 1>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <DType kDType>
typename HopperFprop<kDType>::Conv::Arguments hopper_fprop_arguments(const ConvFpropArgs& a) {
  using F = HopperFprop<kDType>;
  using Element = typename F::Element;
  // Activations (B, T_in, C_in) and output (B, T_out, C_out) packed channels-last; the filter
  // (C_out, k, C_in) packed: CUTLASS's NWC / KSC with no padding, dilation 1.
  typename F::ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation, {a.batch, a.t_in, a.c_in},
                                 {a.c_out, a.kernel, a.c_in}, {0}, {0}, {a.stride}, {1}, 1);
  typename F::Kernel::StrideD stride_d;
  cute::for_each(cute::make_seq<cute::rank<0>(typename F::Kernel::StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(stride_d) = shape.stride_C[F::ProblemShape::RankT - 2 - i];
  });
  return {shape,
          {static_cast<const Element*>(a.x), static_cast<const Element*>(a.weight)},
          {{1.0f, 0.0f}, nullptr, stride_d, static_cast<Element*>(a.out), stride_d}};
}

// Whether the kernel runs `a` (with `arguments`, hopper_fprop_arguments of it): a stride TMA's im2col
// mode encodes, CUTLASS implements it, and without a workspace (this non-persistent kernel needs
// none). The launch asks this; so does the host check (tests/csrc/hopper_conv_host_check.cu).
template <DType kDType>
bool hopper_fprop_implementable(const ConvFpropArgs& a, const typename HopperFprop<kDType>::Conv::Arguments& arguments) {
  using Conv = typename HopperFprop<kDType>::Conv;
  return a.stride <= kMaxHopperConvStride && Conv::can_implement(arguments) == cutlass::Status::kSuccess &&
         Conv::get_workspace_size(arguments) == 0;
}

// The launch, or why it cannot run this problem: cudaErrorNotSupported where
// hopper_fprop_implementable says no (the caller runs the Sm80 GEMMs). An empty batch launches nothing.
template <DType kDType>
cudaError_t conv_fprop_sm90_typed(const ConvFpropArgs& a, cudaStream_t stream) {
  using Conv = typename HopperFprop<kDType>::Conv;
  constexpr int kAlign = HopperFprop<kDType>::kAlignment;
  if (a.batch < 0 || a.t_in < a.kernel || a.kernel <= 0 || a.stride <= 0) return cudaErrorInvalidValue;
  if (a.batch == 0) return cudaSuccess;
  if (a.c_in % kAlign != 0 || a.c_out % kAlign != 0 || reinterpret_cast<uintptr_t>(a.x) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(a.weight) % 16 != 0 || reinterpret_cast<uintptr_t>(a.out) % 16 != 0) {
    return cudaErrorMisalignedAddress;
  }
  const auto arguments = hopper_fprop_arguments<kDType>(a);
  if (!hopper_fprop_implementable<kDType>(a, arguments)) return cudaErrorNotSupported;
  return initialize_and_run<Conv>(arguments, nullptr, stream);
}

}  // namespace d2v

#endif  // D2V_SM90A_CONV
