// Host-side check of the Hopper kernels (csrc/conv_fprop_sm90.cuh; csrc/conv_gemm_sm90.cuh through
// hopper_gemm_host_check.cu, built into the same program) at every
// layer shape of Data2Vec's feature encoder, run on a machine without a GPU (tests/test_csrc_compile.py,
// scripts/check_extension_build): CUTLASS's can_implement takes the forward conv and the backward
// GEMMs over the views csrc/binding.cpp makes (so the extension does not fall back to the Sm80
// GEMMs), the output extent the conv derives equals the op's (T_in - k) / s + 1, and its output's
// strides are the packed (B, T_out, C_out) tensor the binding allocates. Exit status: the number of
// failed checks.
#include <cstdio>

#include "conv_fprop_sm90.cuh"

// In hopper_gemm_host_check.cu: CUTLASS 3's conv and GEMM kernel headers cannot share a
// translation unit (their GemmUniversal specializations collide), as in csrc/.
template <d2v::DType kDType>
int backward_gemms(long batch, long t_in, long t_out, int k, int s, const void* p);

namespace {

template <d2v::DType kDType>
int check(long batch, long samples) {
  const int kernels[7] = {10, 3, 3, 3, 3, 2, 2}, strides[7] = {5, 2, 2, 2, 2, 2, 2};
  alignas(16) static char buffer[64];  // only the alignment of the pointers is read
  int failures = 0;
  long t = (samples - kernels[0]) / strides[0] + 1;
  for (int l = 1; l < 7 && t >= kernels[l]; ++l) {
    const long t_out = (t - kernels[l]) / strides[l] + 1;
    const d2v::ConvFpropArgs a{buffer, buffer, buffer, static_cast<int>(batch), static_cast<int>(t), 512, 512,
                               kernels[l], strides[l]};
    // As conv_fprop_sm90_typed asks before it launches.
    const auto args = d2v::hopper_fprop_arguments<kDType>(a);
    const bool taken = d2v::hopper_fprop_implementable<kDType>(a, args);
    const auto& c = args.problem_shape.shape_C;  // (n, q, k)
    const auto d = args.epilogue.dD;             // ((q, n), k, l) strides
    const bool ok = taken && c[0] == batch && c[1] == t_out && c[2] == 512 && cute::get<0, 0>(d) == 512 &&
                    cute::get<0, 1>(d) == t_out * 512;
    std::printf("%s B=%ld T_in=%ld layer %d: T_out %ld, CUTLASS (%d, %d, %d), %s\n", ok ? "ok  " : "FAIL", batch,
                t, l, t_out, c[0], c[1], c[2], taken ? "taken" : "not taken");
    failures += !ok;
    const int backward = backward_gemms<kDType>(batch, t, t_out, kernels[l], strides[l], buffer);
    std::printf("%s B=%ld T_in=%ld layer %d: backward GEMMs\n", backward == 0 ? "ok  " : "FAIL", batch, t, l);
    failures += backward != 0;
    t = t_out;
  }
  return failures;
}

}  // namespace

// A stride TMA's im2col mode cannot encode (CUTLASS's can_implement takes it): not taken, so the
// layer runs the Sm80 GEMMs; the largest it encodes: taken.
template <d2v::DType kDType>
int check_strides() {
  alignas(16) static char buffer[64];
  int failures = 0;
  for (const int stride : {d2v::kMaxHopperConvStride, d2v::kMaxHopperConvStride + 1}) {
    const d2v::ConvFpropArgs a{buffer, buffer, buffer, 2, 1000, 512, 512, stride, stride};
    const bool taken = d2v::hopper_fprop_implementable<kDType>(a, d2v::hopper_fprop_arguments<kDType>(a));
    const bool ok = taken == (stride <= d2v::kMaxHopperConvStride);
    std::printf("%s k=%d stride %d: %s\n", ok ? "ok  " : "FAIL", stride, stride, taken ? "taken" : "not taken");
    failures += !ok;
  }
  return failures;
}

int main() {
  int failures = check_strides<d2v::DType::kBFloat16>() + check_strides<d2v::DType::kFloat16>();
  for (const auto& c : {std::pair<long, long>{8, 160000}, {1, 480000}, {2, 400}, {2, 16001}, {3, 160000}}) {
    failures += check<d2v::DType::kBFloat16>(c.first, c.second);
    failures += check<d2v::DType::kFloat16>(c.first, c.second);
  }
  return failures;
}
