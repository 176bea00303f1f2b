// The Hopper backward GEMMs' half of hopper_conv_host_check.cu (one program, two translation units:
// CUTLASS 3's conv and GEMM kernel headers cannot share one).
#include "conv_gemm_sm90.cuh"

namespace {

// As run_hopper_gemm asks before it launches: implementable, and with no workspace.
template <typename Gemm>
bool implementable(const d2v::GemmArgs& g) {
  const auto arguments = d2v::hopper_gemm_arguments<Gemm>(g);
  return Gemm::can_implement(arguments) == cutlass::Status::kSuccess && Gemm::get_workspace_size(arguments) == 0;
}

}  // namespace

// The weight-gradient GEMM and the input-gradient ones of a layer as binding.cpp's conv_weight_grad
// and conv_input_grad make them (C_in = C_out = 512; dz held with dgrad_pad zero frames a side).
// Returns the number of GEMMs CUTLASS does not take.
template <d2v::DType kDType>
int backward_gemms(long batch, long t_in, long t_out, int k, int s, const void* p) {
  const long c = 512, pad = (k + s - 1) / s - 1, frames = t_out + 2 * pad;
  int failures = 0;
  // weight: conv_rows(x)^T (k C x T_out, column-major, ld s C) @ dz (T_out x C) -> fp32 partials
  d2v::GemmArgs w{static_cast<int>(k * c), static_cast<int>(c), static_cast<int>(t_out), static_cast<int>(batch),
                  p, s * c, t_in * c, p, c, frames * c, nullptr, const_cast<void*>(p), c, k * c * c};
  failures += !implementable<d2v::HopperWeightGradGemm<kDType>>(w);
  if (k == s) {  // dx as (B, T_out, k C) = dz @ W (C_out x k C_in)
    d2v::GemmArgs x{static_cast<int>(t_out), static_cast<int>(k * c), static_cast<int>(c), static_cast<int>(batch),
                    p, c, frames * c, p, k * c, 0, nullptr, const_cast<void*>(p), k * c, t_in * c};
    return failures + !implementable<d2v::HopperInputGradGemm<kDType>>(x);
  }
  for (int r = 0; r < s; ++r) {  // one GEMM a residue: overlapping rows of the padded dz
    const long taps = (k - r + s - 1) / s, rows = t_out + taps - 1;
    d2v::GemmArgs x{static_cast<int>(rows), static_cast<int>(c), static_cast<int>(taps * c), static_cast<int>(batch),
                    p, c, frames * c, p, c, 0, nullptr, const_cast<void*>(p), s * c, t_in * c};
    failures += !implementable<d2v::HopperInputGradGemm<kDType>>(x);
  }
  return failures;
}

template int backward_gemms<d2v::DType::kFloat16>(long, long, long, int, int, const void*);
template int backward_gemms<d2v::DType::kBFloat16>(long, long, long, int, int, const void*);
