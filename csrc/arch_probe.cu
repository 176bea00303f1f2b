// Which cubin of the extension the device runs: the Hopper conv kernels (conv_fprop_sm90.cuh) have a
// body only in an sm_90a cubin, and an sm_80 or sm_90 cubin of them would run on an H100 and write
// nothing. This kernel is built for the same architectures as they are, so the cubin the driver
// picks for it is the one it picks for them.
#include "conv_feature_extractor.h"

namespace d2v {
namespace {

__global__ void sm90a_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

}  // namespace

cudaError_t launch_sm90a_probe(int* flag, cudaStream_t stream) {
  sm90a_probe_kernel<<<1, 1, 0, stream>>>(flag);
  return cudaGetLastError();
}

}  // namespace d2v
