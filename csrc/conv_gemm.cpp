// launch_conv_gemm: the dtype dispatch of the conv GEMMs, host code only. Their CUTLASS
// instantiations live in conv_gemm_{f16,bf16,f32}.cu (conv_gemm.cuh); this file includes no
// CUTLASS header (and no torch one).
#include "conv_feature_extractor.h"

namespace d2v {

template <DType kDType>
cudaError_t launch_conv_gemm_typed(ConvGemm which, const GemmArgs& args, cudaStream_t stream);

extern template cudaError_t launch_conv_gemm_typed<DType::kFloat16>(ConvGemm, const GemmArgs&, cudaStream_t);
extern template cudaError_t launch_conv_gemm_typed<DType::kBFloat16>(ConvGemm, const GemmArgs&, cudaStream_t);
extern template cudaError_t launch_conv_gemm_typed<DType::kFloat32>(ConvGemm, const GemmArgs&, cudaStream_t);

cudaError_t launch_conv_gemm(DType dtype, ConvGemm which, const GemmArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return launch_conv_gemm_typed<DType::kFloat16>(which, args, stream);
    case DType::kBFloat16:
      return launch_conv_gemm_typed<DType::kBFloat16>(which, args, stream);
    case DType::kFloat32:
      return launch_conv_gemm_typed<DType::kFloat32>(which, args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace d2v
