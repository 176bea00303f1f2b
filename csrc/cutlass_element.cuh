// The CUTLASS element type of each DType, for the conv GEMMs (conv_gemm.cuh) and the Hopper conv
// (conv_fprop_sm90.cuh).
#pragma once

#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include "conv_feature_extractor.h"

namespace d2v {

template <DType kDType>
struct CutlassElement;
template <>
struct CutlassElement<DType::kFloat16> {
  using type = cutlass::half_t;
};
template <>
struct CutlassElement<DType::kBFloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CutlassElement<DType::kFloat32> {
  using type = float;
};

}  // namespace d2v
