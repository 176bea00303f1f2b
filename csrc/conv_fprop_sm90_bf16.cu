// The Hopper conv forward (conv_fprop_sm90.cuh) for DType::kBFloat16: one translation unit per dtype, so
// the CUTLASS instantiations compile in parallel.
#include "conv_fprop_sm90.cuh"

namespace d2v {
template cudaError_t conv_fprop_sm90_workspace_typed<DType::kBFloat16>(const ConvFpropArgs&, size_t*);
template cudaError_t conv_fprop_sm90_typed<DType::kBFloat16>(const ConvFpropArgs&, void*, size_t, cudaStream_t);
}  // namespace d2v
