// What the CUTLASS units share (conv_gemm.cuh, conv_gemm_sm90.cuh, conv_fprop_sm90.cuh): the CUTLASS
// element type of each DType, and the launch of a device operator.
#pragma once

#include <cutlass/bfloat16.h>
#include <cutlass/cutlass.h>
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

// Initializes a CUTLASS device operator (a 2.x or 3.x adapter) with `arguments` and launches it on
// `stream`: cudaSuccess, the launch's CUDA error, or cudaErrorUnknown where CUTLASS reports a failure
// without one (CUTLASS 3's adapters read and so clear the CUDA error themselves; not a device fault).
template <typename Operator>
cudaError_t initialize_and_run(const typename Operator::Arguments& arguments, void* workspace, cudaStream_t stream) {
  Operator op;
  cutlass::Status status = op.initialize(arguments, workspace, stream);
  if (status == cutlass::Status::kSuccess) status = op.run(stream);
  if (status != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorUnknown;
  }
  return cudaSuccess;
}

}  // namespace d2v
