// The conv GEMMs (conv_gemm.cuh) for DType::kBFloat16: one translation unit per dtype, so the CUTLASS
// instantiations compile in parallel.
#include "conv_gemm.cuh"

namespace d2v {
template cudaError_t launch_conv_gemm_typed<DType::kBFloat16>(ConvGemm, const GemmArgs&, cudaStream_t);
}  // namespace d2v
