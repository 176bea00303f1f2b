// The Hopper conv forward (conv_fprop_sm90.cuh) for DType::kBFloat16: one translation unit per dtype, so
// the CUTLASS instantiations compile in parallel.
#include "conv_fprop_sm90.cuh"

namespace d2v {
template cudaError_t conv_fprop_sm90_typed<DType::kBFloat16>(const ConvFpropArgs&, cudaStream_t);
}  // namespace d2v
