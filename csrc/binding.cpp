// The only file of the extension that includes torch: checks tensors and calls the kernels of
// conv_feature_extractor.h on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "conv_feature_extractor.h"

namespace {

d2v::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return d2v::DType::kFloat16;
    case at::kBFloat16:
      return d2v::DType::kBFloat16;
    case at::kFloat:
      return d2v::DType::kFloat32;
    default:
      TORCH_CHECK(false, "conv_feature_extractor: dtype must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check_param(const at::Tensor& p, const at::Tensor& wave, int64_t channels, const char* name, size_t layer) {
  TORCH_CHECK(p.device() == wave.device(), name, "[", layer, "] must be on ", wave.device(), ", got ", p.device());
  TORCH_CHECK(p.scalar_type() == wave.scalar_type(), name, "[", layer, "] must have wave's dtype ",
              wave.scalar_type(), ", got ", p.scalar_type());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == channels, name, "[", layer, "] must have shape (", channels, "), got ",
              p.sizes());
}

void check_launch(cudaError_t err, size_t layer) {
  TORCH_CHECK(err == cudaSuccess, "conv_feature_extractor: layer ", layer, " kernel failed: ", cudaGetErrorString(err));
}

// Runs every layer; returns every layer's (B, T_i, C_i) output when keep_all, else the last.
std::vector<at::Tensor> forward(const at::Tensor& wave, const std::vector<at::Tensor>& conv_weights,
                                const std::vector<at::Tensor>& ln_weights, const std::vector<at::Tensor>& ln_biases,
                                const std::vector<at::Tensor>& conv_biases, const std::vector<int64_t>& strides,
                                double eps, bool keep_all) {
  TORCH_CHECK(wave.is_cuda() && wave.dim() == 2, "wave must be a (B, S) CUDA tensor, got ", wave.sizes(), " on ",
              wave.device());
  const d2v::DType dtype = kernel_dtype(wave);
  const size_t layers = conv_weights.size();
  TORCH_CHECK(layers >= 1, "conv_weights must not be empty");
  TORCH_CHECK(ln_weights.size() == layers && ln_biases.size() == layers && strides.size() == layers,
              "ln_weights, ln_biases and strides need one entry per layer (", layers, ")");
  TORCH_CHECK(conv_biases.empty() || conv_biases.size() == layers, "conv_biases must be empty or have ", layers,
              " entries");
  const int64_t batch = wave.size(0);
  TORCH_CHECK(batch <= d2v::kMaxBatch, "batch must be at most ", d2v::kMaxBatch, ", got ", batch);

  const c10::cuda::CUDAGuard device_guard(wave.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(wave.get_device()).stream();
  std::vector<at::Tensor> outputs;
  at::Tensor h = wave.contiguous();
  int64_t length = wave.size(1);
  int64_t c_in = 1;
  for (size_t i = 0; i < layers; ++i) {
    const at::Tensor& w = conv_weights[i];
    TORCH_CHECK(w.device() == wave.device() && w.scalar_type() == wave.scalar_type() && w.dim() == 3 &&
                    w.size(1) == c_in,
                "conv_weights[", i, "] must be a (C_out, ", c_in, ", k) tensor of wave's dtype and device, got ",
                w.sizes(), " ", w.scalar_type(), " on ", w.device());
    const int64_t c_out = w.size(0);
    const int64_t kernel = w.size(2);
    const int64_t stride = strides[i];
    TORCH_CHECK(c_out >= 1 && c_out <= d2v::kMaxChannels, "conv_weights[", i, "]: at most ", d2v::kMaxChannels,
                " output channels, got ", c_out);
    TORCH_CHECK(kernel >= 1 && stride >= 1, "conv layer ", i, ": kernel and stride must be positive");
    TORCH_CHECK(length >= kernel, "conv layer ", i, ": input length ", length, " is shorter than the kernel ", kernel);
    const int64_t frames = (length - kernel) / stride + 1;
    check_param(ln_weights[i], wave, c_out, "ln_weights", i);
    check_param(ln_biases[i], wave, c_out, "ln_biases", i);
    at::Tensor conv_bias;
    if (!conv_biases.empty()) {
      check_param(conv_biases[i], wave, c_out, "conv_biases", i);
      conv_bias = conv_biases[i].contiguous();
    }
    const at::Tensor gamma = ln_weights[i].contiguous();
    const at::Tensor beta = ln_biases[i].contiguous();
    const void* bias_ptr = conv_bias.defined() ? conv_bias.data_ptr() : nullptr;
    at::Tensor out = at::empty({batch, frames, c_out}, wave.options());
    cudaError_t err;
    if (i == 0) {
      TORCH_CHECK(kernel <= d2v::kMaxLayer0Kernel && stride <= d2v::kMaxLayer0Stride, "conv layer 0: kernel (",
                  kernel, ") and stride (", stride, ") must be at most ", d2v::kMaxLayer0Kernel, " and ",
                  d2v::kMaxLayer0Stride);
      const at::Tensor w0 = w.contiguous();
      err = d2v::launch_conv0_ln_gelu(dtype, h.data_ptr(), w0.data_ptr(), bias_ptr, gamma.data_ptr(), beta.data_ptr(),
                                      out.data_ptr(), batch, length, frames, static_cast<int>(c_out),
                                      static_cast<int>(kernel), static_cast<int>(stride), static_cast<float>(eps),
                                      stream);
    } else {
      // (C_out, C_in, k) -> (C_out, k, C_in): K index j * C_in + c follows the channels-last input.
      const at::Tensor w_t = w.permute({0, 2, 1}).contiguous();
      err = d2v::launch_conv_ln_gelu(dtype, h.data_ptr(), w_t.data_ptr(), bias_ptr, gamma.data_ptr(), beta.data_ptr(),
                                     out.data_ptr(), batch, length, frames, static_cast<int>(c_in),
                                     static_cast<int>(c_out), static_cast<int>(kernel), static_cast<int>(stride),
                                     static_cast<float>(eps), stream);
    }
    check_launch(err, i);
    if (keep_all) outputs.push_back(out);
    h = out;
    length = frames;
    c_in = c_out;
  }
  if (!keep_all) outputs.push_back(h);
  return outputs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2v-kernels CUDA extension: fused strided Conv1d + LayerNorm + GELU feature encoder";
  m.def("forward", &forward, "Feature encoder forward: wave (B, S) -> [(B, T, C)] channels-last", py::arg("wave"),
        py::arg("conv_weights"), py::arg("ln_weights"), py::arg("ln_biases"), py::arg("conv_biases"),
        py::arg("strides"), py::arg("eps"), py::arg("keep_all"));
  m.attr("MAX_CHANNELS") = d2v::kMaxChannels;
  m.attr("MAX_LAYER0_KERNEL") = d2v::kMaxLayer0Kernel;
  m.attr("MAX_LAYER0_STRIDE") = d2v::kMaxLayer0Stride;
  m.attr("MAX_BATCH") = d2v::kMaxBatch;
}
