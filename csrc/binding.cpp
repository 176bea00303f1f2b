// The only file of the extension that includes torch: checks tensors, makes the strided views the
// GEMMs read and write (those of d2v_kernels/ops/_conv_gemm_plan.py), allocates every buffer through
// torch's allocator, and calls the kernels of conv_feature_extractor.h on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
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

void check_launch(cudaError_t err, const char* what, size_t layer) {
  TORCH_CHECK(err == cudaSuccess, "conv_feature_extractor: layer ", layer, " ", what, " failed: ",
              cudaGetErrorString(err));
}

// One conv layer's parameters, checked.
struct Layer {
  at::Tensor weight, gamma, beta, bias;  // bias undefined without conv biases
  int64_t kernel, stride, c_in, c_out;
};

std::vector<Layer> check_layers(const at::Tensor& wave, const std::vector<at::Tensor>& conv_weights,
                                const std::vector<at::Tensor>& ln_weights, const std::vector<at::Tensor>& ln_biases,
                                const std::vector<at::Tensor>& conv_biases, const std::vector<int64_t>& strides) {
  TORCH_CHECK(wave.is_cuda() && wave.dim() == 2, "wave must be a (B, S) CUDA tensor, got ", wave.sizes(), " on ",
              wave.device());
  kernel_dtype(wave);
  const size_t layers = conv_weights.size();
  TORCH_CHECK(layers >= 1, "conv_weights must not be empty");
  TORCH_CHECK(ln_weights.size() == layers && ln_biases.size() == layers && strides.size() == layers,
              "ln_weights, ln_biases and strides need one entry per layer (", layers, ")");
  TORCH_CHECK(conv_biases.empty() || conv_biases.size() == layers, "conv_biases must be empty or have ", layers,
              " entries");
  TORCH_CHECK(wave.size(0) <= d2v::kMaxBatch, "batch must be at most ", d2v::kMaxBatch, ", got ", wave.size(0));
  const bool tensor_cores = wave.scalar_type() != at::kFloat;
  std::vector<Layer> out;
  int64_t length = wave.size(1);
  int64_t c_in = 1;
  for (size_t i = 0; i < layers; ++i) {
    const at::Tensor& w = conv_weights[i];
    TORCH_CHECK(w.device() == wave.device() && w.scalar_type() == wave.scalar_type() && w.dim() == 3 &&
                    w.size(1) == c_in,
                "conv_weights[", i, "] must be a (C_out, ", c_in, ", k) tensor of wave's dtype and device, got ",
                w.sizes(), " ", w.scalar_type(), " on ", w.device());
    Layer layer{w.contiguous(), {}, {}, {}, w.size(2), strides[i], c_in, w.size(0)};
    TORCH_CHECK(layer.c_out >= 1 && layer.c_out <= d2v::kMaxChannels, "conv_weights[", i, "]: at most ",
                d2v::kMaxChannels, " output channels, got ", layer.c_out);
    TORCH_CHECK(layer.kernel >= 1 && layer.stride >= 1, "strides[", i, "] and the kernel size must be positive");
    TORCH_CHECK(length >= layer.kernel, "conv layer ", i, ": input length ", length, " is shorter than the kernel ",
                layer.kernel);
    if (i == 0) {
      TORCH_CHECK(layer.kernel <= d2v::kMaxLayer0Kernel && layer.stride <= d2v::kMaxLayer0Stride,
                  "conv layer 0: kernel (", layer.kernel, ") and stride (", layer.stride, ") must be at most ",
                  d2v::kMaxLayer0Kernel, " and ", d2v::kMaxLayer0Stride);
    } else {
      TORCH_CHECK(layer.stride <= layer.kernel, "strides[", i, "] (", layer.stride,
                  ") must be at most its kernel size ", layer.kernel, " (the input gradient's GEMMs)");
    }
    // Layer i's output channels are the N of its GEMMs and the next layer's K: 16-byte accesses.
    TORCH_CHECK(!tensor_cores || layer.c_out % d2v::kGemmAlignment == 0, "conv_weights[", i,
                "]: the float16/bfloat16 GEMMs need output channel counts that are multiples of ",
                d2v::kGemmAlignment, ", got ", layer.c_out);
    check_param(ln_weights[i], wave, layer.c_out, "ln_weights", i);
    check_param(ln_biases[i], wave, layer.c_out, "ln_biases", i);
    layer.gamma = ln_weights[i].contiguous();
    layer.beta = ln_biases[i].contiguous();
    if (!conv_biases.empty()) {
      check_param(conv_biases[i], wave, layer.c_out, "conv_biases", i);
      layer.bias = conv_biases[i].contiguous();
      // the forward GEMM's epilogue reads it 16 bytes at a time (a view into a larger tensor may not be aligned)
      if (reinterpret_cast<uintptr_t>(layer.bias.data_ptr()) % 16 != 0) layer.bias = layer.bias.clone();
    }
    out.push_back(layer);
    length = (length - layer.kernel) / layer.stride + 1;
    c_in = layer.c_out;
  }
  return out;
}

const void* optional_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// d = a @ b (+ bias on every row) on strided views: a (batch, m, k), b (k, n) shared by the batch or
// (batch, k, n), d (batch, m, n) row-major. The views are those of d2v_kernels/ops/_conv_gemm_plan.py;
// their strides give the GEMM's leading dimensions and the layouts `which` expects.
void conv_gemm(d2v::ConvGemm which, const at::Tensor& a, const at::Tensor& b, const at::Tensor& d,
               const at::Tensor& bias, cudaStream_t stream, size_t layer, bool hopper = false) {
  const bool a_row = which != d2v::ConvGemm::kWeightGrad;
  const bool b_row = which != d2v::ConvGemm::kForward;
  const int64_t b_batch_stride = b.dim() == 3 ? b.stride(0) : 0;
  const int64_t b_rows = b.stride(b.dim() - 2), b_cols = b.stride(b.dim() - 1);
  TORCH_CHECK(a.dim() == 3 && (a_row ? a.stride(2) == 1 : a.stride(1) == 1) && (b_row ? b_cols == 1 : b_rows == 1) &&
                  d.dim() == 3 && d.stride(2) == 1 && d.size(0) == a.size(0) && d.size(1) == a.size(1) &&
                  b.size(b.dim() - 2) == a.size(2) && b.size(b.dim() - 1) == d.size(2),
              "conv_feature_extractor: layer ", layer, ": GEMM views of unexpected layout (an internal error)");
  d2v::GemmArgs args{};
  args.batch = static_cast<int>(a.size(0));
  args.m = static_cast<int>(a.size(1));
  args.k = static_cast<int>(a.size(2));
  args.n = static_cast<int>(d.size(2));
  args.a = a.data_ptr();
  args.lda = a_row ? a.stride(1) : a.stride(2);
  args.batch_stride_a = a.stride(0);
  args.b = b.data_ptr();
  args.ldb = b_row ? b_rows : b_cols;
  args.batch_stride_b = b_batch_stride;
  args.bias = optional_ptr(bias);
  args.d = d.data_ptr();
  args.ldd = d.stride(1);
  args.batch_stride_d = d.stride(0);
  if (hopper) {
    const cudaError_t err = d2v::launch_conv_gemm_sm90(kernel_dtype(a), which, args, stream);
    if (err != cudaErrorNotSupported) {
      check_launch(err, "Hopper GEMM", layer);
      return;
    }
  }
  check_launch(d2v::launch_conv_gemm(kernel_dtype(a), which, args, stream), "GEMM", layer);
}

// x (B, T_in, C) contiguous seen as the forward GEMM's A: (B, T_out, k * C), row t = frames
// s t .. s t + k - 1 back to back (_conv_gemm_plan.conv_rows).
at::Tensor conv_rows(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t t_out) {
  const int64_t t_in = x.size(1), c = x.size(2);
  return x.as_strided({x.size(0), t_out, kernel * c}, {t_in * c, stride * c, 1}, x.storage_offset());
}

// Layer 0's conv (pre_norm) or its activation, recomputed from the waveform.
at::Tensor layer0(const at::Tensor& wave, const Layer& l, int64_t frames, double eps, bool pre_norm,
                  cudaStream_t stream) {
  at::Tensor out = at::empty({wave.size(0), frames, l.c_out}, wave.options());
  check_launch(d2v::launch_conv0_ln_gelu(kernel_dtype(wave), wave.data_ptr(), l.weight.data_ptr(), optional_ptr(l.bias),
                                         l.gamma.data_ptr(), l.beta.data_ptr(), out.data_ptr(), wave.size(0),
                                         wave.size(1), frames, static_cast<int>(l.c_out), static_cast<int>(l.kernel),
                                         static_cast<int>(l.stride), static_cast<float>(eps), pre_norm, stream),
               "conv", 0);
  return out;
}

// GELU(LN(z)) over the rows of z (B, T, C); into `out` (may be z).
void ln_gelu(const at::Tensor& z, const Layer& l, const at::Tensor& out, double eps, cudaStream_t stream,
             size_t layer) {
  check_launch(d2v::launch_ln_gelu_rows(kernel_dtype(z), z.data_ptr(), l.gamma.data_ptr(), l.beta.data_ptr(),
                                        out.data_ptr(), z.size(0) * z.size(1), static_cast<int>(l.c_out),
                                        static_cast<float>(eps), stream),
               "LayerNorm + GELU", layer);
}

// Whether layers 1.. run their forward conv and backward GEMMs on Hopper (conv_fprop_sm90.cuh,
// conv_gemm_sm90.cuh) where they can; the Sm80 GEMMs when off (set_sm90_conv: benchmarks compare the
// two in one process).
std::atomic<bool> sm90_conv_enabled{true};

// Per device: -1 not asked yet, 0 / 1 what launch_sm90a_probe answered.
std::mutex sm90a_mutex;
std::array<int, 64> sm90a_answers = [] {
  std::array<int, 64> a{};
  a.fill(-1);
  return a;
}();

// Whether `like`'s device runs this build's sm_90a cubins: compute capability 9.0 and a build for
// sm_90a, asked of the device once (a one-int kernel and a read back). Not asked during a CUDA graph
// capture (the read back would break it): false there until an eager call has asked.
bool sm90a_present(const at::Tensor& like) {
  const int device = like.get_device();
  if (device < 0 || device >= static_cast<int>(sm90a_answers.size())) return false;
  const std::lock_guard<std::mutex> lock(sm90a_mutex);
  if (sm90a_answers[device] >= 0) return sm90a_answers[device] == 1;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0) {
    sm90a_answers[device] = 0;
    return false;
  }
  const c10::cuda::CUDAGuard device_guard(like.device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  at::Tensor flag = at::empty({1}, like.options().dtype(at::kInt));
  C10_CUDA_CHECK(d2v::launch_sm90a_probe(flag.data_ptr<int>(), stream.stream()));
  sm90a_answers[device] = flag.item<int>() == 1 ? 1 : 0;
  return sm90a_answers[device] == 1;
}

// Layer i >= 1's forward conv on Hopper; false (nothing launched) where CUTLASS cannot implement it.
bool conv_forward_sm90(const at::Tensor& x, const at::Tensor& w_t, const at::Tensor& z, const Layer& l,
                       cudaStream_t stream, size_t layer) {
  d2v::ConvFpropArgs args{x.data_ptr(),
                          w_t.data_ptr(),
                          z.data_ptr(),
                          static_cast<int>(x.size(0)),
                          static_cast<int>(x.size(1)),
                          static_cast<int>(l.c_in),
                          static_cast<int>(l.c_out),
                          static_cast<int>(l.kernel),
                          static_cast<int>(l.stride)};
  const cudaError_t err = d2v::launch_conv_fprop_sm90(kernel_dtype(x), args, stream);
  if (err == cudaErrorNotSupported) return false;
  check_launch(err, "Hopper conv", layer);
  return true;
}

// Whether the backward GEMMs run on Hopper (conv_gemm_sm90.cuh): enabled, fp16 or bf16, a device
// running the sm_90a cubins.
bool sm90_gemm_applies(const at::Tensor& x) {
  return sm90_conv_enabled.load() && x.scalar_type() != at::kFloat && sm90a_present(x);
}

// Whether layer i >= 1's forward runs on Hopper: as the GEMMs, no conv bias, a stride TMA encodes
// (the Python op's cuda_forward_conv asks sm90_gemm_applies, the biases and the strides).
bool sm90_conv_applies(const at::Tensor& x, const Layer& l) {
  return !l.bias.defined() && l.stride <= d2v::kMaxHopperConvStride && sm90_gemm_applies(x);
}

// Forward GEMM of layer i >= 1: z = conv_rows(x) @ W' (+ bias), W' the weight as (k * C_in, C_out)
// column-major over its (C_out, k, C_in) copy (_conv_gemm_plan.weight_matrix); on Hopper the same
// copy is the filter of CUTLASS's implicit-GEMM conv.
at::Tensor conv_forward(const at::Tensor& x, const Layer& l, int64_t t_out, cudaStream_t stream, size_t layer) {
  at::Tensor z = at::empty({x.size(0), t_out, l.c_out}, x.options());
  const at::Tensor w_t = l.weight.permute({0, 2, 1}).contiguous();
  if (sm90_conv_applies(x, l) && conv_forward_sm90(x, w_t, z, l, stream, layer)) return z;
  conv_gemm(d2v::ConvGemm::kForward, conv_rows(x, l.kernel, l.stride, t_out), w_t.view({l.c_out, -1}).t(), z, l.bias,
            stream, layer);
  return z;
}

// The zero frames on each side of dz that the input gradient's residue GEMMs read
// (_conv_gemm_plan.dgrad_pad; 0 when k == s).
int64_t dgrad_pad(const Layer& l) { return (l.kernel + l.stride - 1) / l.stride - 1; }

// Input gradient of layer i >= 1 (_conv_gemm_plan.gemm_conv_backward_input): dx (B, T_in, C_in)
// from `padded`, dz (B, T_out, C_out) with dgrad_pad(l) zero frames on each side (written there by
// the LayerNorm + GELU backward: no copy); one GEMM when k == s, else one per residue of the frame
// index over an overlapping view of the padded dz.
at::Tensor conv_input_grad(const at::Tensor& padded, const Layer& l, int64_t t_out, int64_t t_in, cudaStream_t stream,
                           size_t layer) {
  const int64_t batch = padded.size(0), frames = padded.size(1), k = l.kernel, s = l.stride, c_in = l.c_in,
                c_out = l.c_out, pad = dgrad_pad(l);
  TORCH_CHECK(padded.is_contiguous() && frames == pad + t_out + pad, "conv_feature_extractor: layer ", layer,
              ": padded dz of unexpected shape (an internal error)");
  at::Tensor dx = at::empty({batch, t_in, c_in}, padded.options());
  const int64_t read = s * (t_out - 1) + k;  // frames past it feed no output frame
  if (read < t_in) dx.narrow(1, read, t_in - read).zero_();
  const at::Tensor w_t = l.weight.permute({0, 2, 1}).contiguous();  // (C_out, k, C_in)
  const bool hopper = sm90_gemm_applies(padded);
  if (k == s) {
    const at::Tensor d = dx.as_strided({batch, t_out, k * c_in}, {t_in * c_in, k * c_in, 1}, dx.storage_offset());
    conv_gemm(d2v::ConvGemm::kInputGrad, padded, w_t.view({c_out, k * c_in}), d, {}, stream, layer, hopper);
    return dx;
  }
  for (int64_t r = 0; r < s; ++r) {
    const int64_t taps = (k - r + s - 1) / s;
    const int64_t first_row = pad - (taps - 1), rows = t_out + taps - 1;
    std::vector<at::Tensor> blocks;  // W_j^T for j = r + s (taps - 1), ..., r + s, r
    for (int64_t m = 0; m < taps; ++m) blocks.push_back(w_t.select(1, r + s * (taps - 1 - m)));
    const at::Tensor b = at::cat(blocks, 0);  // (taps * C_out, C_in)
    const at::Tensor a = padded.as_strided({batch, rows, taps * c_out}, {frames * c_out, c_out, 1},
                                           padded.storage_offset() + first_row * c_out);
    const at::Tensor d = dx.as_strided({batch, rows, c_in}, {t_in * c_in, s * c_in, 1}, dx.storage_offset() + r * c_in);
    conv_gemm(d2v::ConvGemm::kInputGrad, a, b, d, {}, stream, layer, hopper);
  }
  return dx;
}

// Weight gradient (_conv_gemm_plan.gemm_conv_backward_weight): one fp32 partial conv_rows(x)^T @ dz
// per batch row, summed over the batch in order; returned as (C_out, C_in, k) in x's dtype.
at::Tensor conv_weight_grad(const at::Tensor& x, const at::Tensor& dz, const Layer& l, cudaStream_t stream,
                            size_t layer) {
  const int64_t batch = x.size(0), t_out = dz.size(1), c_in = x.size(2);
  const at::Tensor rows = conv_rows(x, l.kernel, l.stride, t_out);
  at::Tensor partials = at::empty({batch, l.kernel * c_in, l.c_out}, x.options().dtype(at::kFloat));
  conv_gemm(d2v::ConvGemm::kWeightGrad, rows.transpose(1, 2), dz, partials, {}, stream, layer,
            sm90_gemm_applies(x));
  return partials.sum(0).view({l.kernel, c_in, l.c_out}).permute({2, 1, 0}).to(x.scalar_type()).contiguous();
}

// LayerNorm + GELU backward over the rows of z (B, T, C): dz into `dz`, a (B, T, C) view with rows
// of C contiguous values and any batch stride (dz may be dy); returns (dgamma, dbeta, and the conv
// bias gradient, sum of dz, when the layer has a bias).
std::array<at::Tensor, 3> ln_gelu_backward(const at::Tensor& z, const at::Tensor& dy, const at::Tensor& dz,
                                           const Layer& l, double eps, cudaStream_t stream, size_t layer) {
  const int64_t rows = z.size(0) * z.size(1);
  TORCH_CHECK(dz.sizes() == z.sizes() && dz.stride(2) == 1 && dz.stride(1) == l.c_out, "conv_feature_extractor: layer ",
              layer, ": dz of unexpected layout (an internal error)");
  at::Tensor partials =
      at::empty({d2v::ln_gelu_backward_blocks(rows), 2, l.c_out}, z.options().dtype(at::kFloat));
  check_launch(d2v::launch_ln_gelu_rows_backward(kernel_dtype(z), z.data_ptr(), l.gamma.data_ptr(), l.beta.data_ptr(),
                                                 dy.data_ptr(), dz.data_ptr(), dz.stride(0), z.size(1),
                                                 partials.data_ptr<float>(), rows, static_cast<int>(l.c_out),
                                                 static_cast<float>(eps), stream),
               "LayerNorm + GELU backward", layer);
  const at::Tensor sums = partials.sum(0).to(z.scalar_type());
  // a torch reduction (deterministic) over dz: rare (Data2Vec's convs have no bias), and a third
  // accumulator in the row kernel would cost it registers it does not have
  const at::Tensor d_bias = l.bias.defined() ? dz.sum({0, 1}, false, at::kFloat).to(z.scalar_type()) : at::Tensor();
  return {sums[0].clone(), sums[1].clone(), d_bias};  // clones: custom op outputs may not alias
}

std::vector<int64_t> frame_counts(int64_t samples, const std::vector<Layer>& layers) {
  std::vector<int64_t> frames;
  for (const Layer& l : layers) {
    samples = (samples - l.kernel) / l.stride + 1;
    frames.push_back(samples);
  }
  return frames;
}

// Runs every layer. Returns {output} or, with keep_conv_outputs, {output, z_1, ..., z_{n-1}}: the
// conv outputs of layers 1.. (before their LayerNorm), what the backward needs besides the inputs
// (_conv_gemm_plan.gemm_stack_forward).
std::vector<at::Tensor> forward(const at::Tensor& wave, const std::vector<at::Tensor>& conv_weights,
                                const std::vector<at::Tensor>& ln_weights, const std::vector<at::Tensor>& ln_biases,
                                const std::vector<at::Tensor>& conv_biases, const std::vector<int64_t>& strides,
                                double eps, bool keep_conv_outputs) {
  const std::vector<Layer> layers = check_layers(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides);
  const c10::cuda::CUDAGuard device_guard(wave.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(wave.get_device()).stream();
  const std::vector<int64_t> frames = frame_counts(wave.size(1), layers);
  const at::Tensor w = wave.contiguous();
  std::vector<at::Tensor> outputs{layer0(w, layers[0], frames[0], eps, false, stream)};
  for (size_t i = 1; i < layers.size(); ++i) {
    const at::Tensor z = conv_forward(outputs[0], layers[i], frames[i], stream, i);
    const at::Tensor h = keep_conv_outputs ? at::empty_like(z) : z;
    ln_gelu(z, layers[i], h, eps, stream, i);
    outputs[0] = h;
    if (keep_conv_outputs) outputs.push_back(z);
  }
  return outputs;
}

// Gradients of the stack from grad_out (B, T, C_last) and the forward's conv outputs z_1..z_{n-1},
// step by step as _conv_gemm_plan.gemm_stack_backward (tested against autograd on the CPU).
// Layers below `lowest` are not walked. Returns {d_wave, dW_0.., dgamma_0.., dbeta_0.., dbias_0..}
// (dbias only with conv biases), an empty tensor for each one not computed: d_wave unless
// wave_grad, every gradient of the layers below lowest.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& wave,
                                 const std::vector<at::Tensor>& conv_weights, const std::vector<at::Tensor>& ln_weights,
                                 const std::vector<at::Tensor>& ln_biases, const std::vector<at::Tensor>& conv_biases,
                                 const std::vector<at::Tensor>& conv_outputs, const std::vector<int64_t>& strides,
                                 double eps, int64_t lowest, bool wave_grad) {
  const std::vector<Layer> layers = check_layers(wave, conv_weights, ln_weights, ln_biases, conv_biases, strides);
  const size_t n = layers.size();
  const std::vector<int64_t> frames = frame_counts(wave.size(1), layers);
  const int64_t batch = wave.size(0);
  TORCH_CHECK(lowest >= 0 && lowest < static_cast<int64_t>(n), "lowest must be in [0, ", n, "), got ", lowest);
  TORCH_CHECK(!wave_grad || lowest == 0, "wave_grad needs lowest == 0");
  TORCH_CHECK(grad_out.device() == wave.device() && grad_out.scalar_type() == wave.scalar_type() &&
                  grad_out.sizes() == at::IntArrayRef({batch, frames[n - 1], layers[n - 1].c_out}),
              "grad_out must be a (", batch, ", ", frames[n - 1], ", ", layers[n - 1].c_out,
              ") tensor of wave's dtype and device, got ", grad_out.sizes());
  TORCH_CHECK(conv_outputs.size() == n - 1, "conv_outputs must hold the conv outputs of layers 1..", n - 1);
  for (size_t i = 1; i < n; ++i) {
    const at::Tensor& z = conv_outputs[i - 1];
    TORCH_CHECK(z.device() == wave.device() && z.scalar_type() == wave.scalar_type() && z.is_contiguous() &&
                    z.sizes() == at::IntArrayRef({batch, frames[i], layers[i].c_out}),
                "conv_outputs[", i - 1, "] must be a contiguous (", batch, ", ", frames[i], ", ", layers[i].c_out,
                ") tensor of wave's dtype and device, got ", z.sizes());
  }
  const c10::cuda::CUDAGuard device_guard(wave.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(wave.get_device()).stream();
  const at::Tensor w = wave.contiguous();
  const bool has_bias = !conv_biases.empty();
  std::vector<at::Tensor> d_w(n), d_gamma(n), d_beta(n), d_bias(has_bias ? n : 0);
  // g: the gradient of layer i's output; a tensor of ours after the first step, so the LayerNorm
  // backward writes its dz over it.
  at::Tensor g = grad_out.contiguous();
  bool g_owned = false;
  for (int64_t i = static_cast<int64_t>(n) - 1; i >= lowest; --i) {
    const Layer& l = layers[i];
    const at::Tensor z = i == 0 ? layer0(w, l, frames[0], eps, true, stream) : conv_outputs[i - 1];
    // dz lands in the middle of the zero-padded buffer the input gradient's GEMMs read, or over g
    const bool input_grad = i > lowest && i > 0;
    const int64_t pad = input_grad ? dgrad_pad(l) : 0;
    at::Tensor dz_buffer;
    if (pad == 0 && g_owned) {
      dz_buffer = g;
    } else {
      dz_buffer = at::empty({batch, frames[i] + 2 * pad, l.c_out}, z.options());
      dz_buffer.narrow(1, 0, pad).zero_();
      dz_buffer.narrow(1, pad + frames[i], pad).zero_();
    }
    const at::Tensor dz = dz_buffer.narrow(1, pad, frames[i]);
    auto sums = ln_gelu_backward(z, g, dz, l, eps, stream, i);
    d_gamma[i] = sums[0];
    d_beta[i] = sums[1];
    if (has_bias) d_bias[i] = sums[2];
    if (i == 0) {
      // One input channel: the weight gradient's A (k x T_0, leading dimension s) fits no 16-byte
      // access, so its frame rows are copied into k_pad >= k zero-padded columns first (a small
      // (B, T_0, k_pad) buffer); the input gradient, asked for only when the waveform is trained,
      // is a torch GEMM and an overlap-add in fp32.
      const int64_t k_pad = (l.kernel + d2v::kGemmAlignment - 1) / d2v::kGemmAlignment * d2v::kGemmAlignment;
      at::Tensor cols = at::zeros({batch, frames[0], k_pad}, w.options());
      cols.narrow(2, 0, l.kernel).copy_(conv_rows(w.unsqueeze(2), l.kernel, l.stride, frames[0]));
      at::Tensor partials = at::empty({batch, k_pad, l.c_out}, w.options().dtype(at::kFloat));
      conv_gemm(d2v::ConvGemm::kWeightGrad, cols.transpose(1, 2), dz, partials, {}, stream, 0);
      d_w[0] = partials.sum(0).narrow(0, 0, l.kernel).t().unsqueeze(1).to(w.scalar_type()).contiguous();
      if (wave_grad) {
        const at::Tensor d_cols = at::matmul(dz, l.weight.view({l.c_out, l.kernel})).to(at::kFloat);
        at::Tensor d_wave = at::zeros({batch, w.size(1)}, w.options().dtype(at::kFloat));
        for (int64_t j = 0; j < l.kernel; ++j) {
          d_wave.narrow(1, j, l.stride * (frames[0] - 1) + 1)
              .slice(1, 0, c10::nullopt, l.stride)
              .add_(d_cols.select(2, j));
        }
        g = d_wave.to(w.scalar_type());
      }
      break;
    }
    // layer i's input, recomputed: layer 0's activation from the waveform, or GELU(LN(z_{i-1}))
    const at::Tensor x =
        i == 1 ? layer0(w, layers[0], frames[0], eps, false, stream) : at::empty_like(conv_outputs[i - 2]);
    if (i > 1) ln_gelu(conv_outputs[i - 2], layers[i - 1], x, eps, stream, i - 1);
    d_w[i] = conv_weight_grad(x, dz, l, stream, i);
    if (input_grad) {
      g = conv_input_grad(dz_buffer, l, frames[i], frames[i - 1], stream, i);
      g_owned = true;
    }
  }
  const at::Tensor none = at::empty({0}, wave.options());
  auto filled = [&](const at::Tensor& t) { return t.defined() ? t : none.clone(); };
  std::vector<at::Tensor> result{wave_grad ? g : none.clone()};
  for (auto* list : {&d_w, &d_gamma, &d_beta, &d_bias}) {
    for (const at::Tensor& t : *list) result.push_back(filled(t));
  }
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2v-kernels CUDA extension: strided Conv1d + LayerNorm + GELU feature encoder on CUTLASS GEMMs";
  m.def("forward", &forward, "Feature encoder forward: wave (B, S) -> [(B, T, C)] channels-last (+ conv outputs)",
        py::arg("wave"), py::arg("conv_weights"), py::arg("ln_weights"), py::arg("ln_biases"), py::arg("conv_biases"),
        py::arg("strides"), py::arg("eps"), py::arg("keep_conv_outputs"));
  m.def("backward", &backward, "Feature encoder backward from the forward's conv outputs", py::arg("grad_out"),
        py::arg("wave"), py::arg("conv_weights"), py::arg("ln_weights"), py::arg("ln_biases"), py::arg("conv_biases"),
        py::arg("conv_outputs"), py::arg("strides"), py::arg("eps"), py::arg("lowest"), py::arg("wave_grad"));
  m.def(
      "set_sm90_conv", [](bool enabled) { return sm90_conv_enabled.exchange(enabled); },
      "Run layers 1..'s forward conv and backward GEMMs on Hopper where they apply (default) or always on "
      "the Sm80 GEMMs; returns the previous setting",
      py::arg("enabled"));
  m.def("sm90_applies", &sm90_gemm_applies,
        "Whether the Hopper kernels run for a tensor like this one: enabled, fp16 or bf16, a device running "
        "this build's sm_90a cubins (asked of the device once)",
        py::arg("like"));
  m.attr("MAX_CHANNELS") = d2v::kMaxChannels;
  m.attr("MAX_LAYER0_KERNEL") = d2v::kMaxLayer0Kernel;
  m.attr("MAX_LAYER0_STRIDE") = d2v::kMaxLayer0Stride;
  m.attr("MAX_BATCH") = d2v::kMaxBatch;
  m.attr("GEMM_ALIGNMENT") = d2v::kGemmAlignment;
  m.attr("MAX_HOPPER_CONV_STRIDE") = d2v::kMaxHopperConvStride;
}
