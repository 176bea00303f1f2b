// launch_conv_gemm, launch_conv_gemm_sm90 and launch_conv_fprop_sm90: the dtype dispatch of the conv
// GEMMs, of their Hopper backward ones and of the Hopper conv forward, host code only. Their CUTLASS
// instantiations live in conv_gemm_{f16,bf16,f32}.cu (conv_gemm.cuh), conv_gemm_sm90_{f16,bf16}.cu
// (conv_gemm_sm90.cuh) and conv_fprop_sm90_{f16,bf16}.cu (conv_fprop_sm90.cuh); this file includes no
// CUTLASS header (and no torch one).
#include "conv_feature_extractor.h"

namespace d2v {

template <DType kDType>
cudaError_t launch_conv_gemm_typed(ConvGemm which, const GemmArgs& args, cudaStream_t stream);

extern template cudaError_t launch_conv_gemm_typed<DType::kFloat16>(ConvGemm, const GemmArgs&, cudaStream_t);
extern template cudaError_t launch_conv_gemm_typed<DType::kBFloat16>(ConvGemm, const GemmArgs&, cudaStream_t);
extern template cudaError_t launch_conv_gemm_typed<DType::kFloat32>(ConvGemm, const GemmArgs&, cudaStream_t);

template <DType kDType>
cudaError_t conv_fprop_sm90_typed(const ConvFpropArgs& args, cudaStream_t stream);

template <DType kDType>
cudaError_t launch_conv_gemm_sm90_typed(ConvGemm which, const GemmArgs& args, cudaStream_t stream);

extern template cudaError_t launch_conv_gemm_sm90_typed<DType::kFloat16>(ConvGemm, const GemmArgs&, cudaStream_t);
extern template cudaError_t launch_conv_gemm_sm90_typed<DType::kBFloat16>(ConvGemm, const GemmArgs&, cudaStream_t);
extern template cudaError_t conv_fprop_sm90_typed<DType::kFloat16>(const ConvFpropArgs&, cudaStream_t);
extern template cudaError_t conv_fprop_sm90_typed<DType::kBFloat16>(const ConvFpropArgs&, cudaStream_t);

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

cudaError_t launch_conv_gemm_sm90(DType dtype, ConvGemm which, const GemmArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return launch_conv_gemm_sm90_typed<DType::kFloat16>(which, args, stream);
    case DType::kBFloat16:
      return launch_conv_gemm_sm90_typed<DType::kBFloat16>(which, args, stream);
    case DType::kFloat32:
      return cudaErrorNotSupported;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_conv_fprop_sm90(DType dtype, const ConvFpropArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return conv_fprop_sm90_typed<DType::kFloat16>(args, stream);
    case DType::kBFloat16:
      return conv_fprop_sm90_typed<DType::kBFloat16>(args, stream);
    case DType::kFloat32:
      return cudaErrorNotSupported;
  }
  return cudaErrorInvalidValue;
}

}  // namespace d2v
