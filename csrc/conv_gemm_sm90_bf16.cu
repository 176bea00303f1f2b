// The Hopper backward GEMMs (conv_gemm_sm90.cuh) for DType::kBFloat16: one translation unit per dtype, so
// the CUTLASS instantiations compile in parallel.
#include "conv_gemm_sm90.cuh"

namespace d2v {
template cudaError_t launch_conv_gemm_sm90_typed<DType::kBFloat16>(ConvGemm, const GemmArgs&, cudaStream_t);
}  // namespace d2v
