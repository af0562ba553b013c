#pragma once
// The host entry of every op, one template over the backend for CPU and CUDA alike: argument
// checks, layout (csrc/layout.h), output allocation, per-channel parameter vectors and dtype
// dispatch are written here once, and the backend supplies only its kernels, per op:
//
//   BatchNormKernels<B>       forward<scalar_t, RELU>(ForwardCall&, training, eps)
//                             backward<scalar_t, RELU>(BackwardCall&, training, eps)
//   NoisyBatchNormKernels<B>  forward<scalar_t>(ForwardCall&, eps, NoiseSpec)
//                             backward<scalar_t>(BackwardCall&, eps, NoiseSpec)
//   LpNormKernels<B>          forward<scalar_t>(ForwardCall&, argmax, LpKind, training, eps)
//                             backward<scalar_t>(BackwardCall&, argmax, LpKind, training, eps)
//   SyncKernels<B>            batch_norm_stats, lp_norm_stats, sync_backward_elementwise, noise_apply
//   GradStatsKernels<B>       grad_stats, multi_axpy
//
// specialized in csrc/cpu/<op>.cpp (B = Cpu) and csrc/cuda/<op>.cu (B = Cuda), each of which then
// instantiates its op's entry template (`template struct BatchNorm<Cpu>;`). A backend adds
// `check_input` (the CUDA kernels also check that the input is a CUDA tensor: the dispatcher picks
// the CUDA kernel when any argument is one) and a device guard.
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "layout.h"
#include "multi_tensor.h"
#include "ops.h"

// BNEXT_SIMT: the CUDA backend compiled as host C++ against the SIMT emulation (csrc/simt), whose
// "device" holds CPU tensors.
#if defined(__CUDACC__) || defined(BNEXT_SIMT)
#include <c10/cuda/CUDAGuard.h>
#endif

namespace bnext {

struct Cpu {
  // The dispatcher sends CPU tensors only.
  static void check_input(const at::Tensor& input, const char*) { bnext::check_input(input); }
  static void check_list_device(const at::Device&, const char*) {}
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
};

#if defined(__CUDACC__) || defined(BNEXT_SIMT)
struct Cuda {
#ifdef BNEXT_SIMT
  static bool on_device(const at::Device& device) { return device.is_cpu(); }
#else
  static bool on_device(const at::Device& device) { return device.is_cuda(); }
#endif
  static void check_input(const at::Tensor& input, const char* op) {
    bnext::check_input(input);
    TORCH_CHECK(on_device(input.device()), "bnext.", op, ": the CUDA kernel got input on ", input.device());
  }
  static void check_list_device(const at::Device& device, const char* op) {
    TORCH_CHECK_VALUE(on_device(device), op, ": expected CUDA tensors, got ", device);
  }
  using Guard = c10::cuda::CUDAGuard;
};
#endif

template <class Backend> struct BatchNormKernels;
template <class Backend> struct NoisyBatchNormKernels;
template <class Backend> struct LpNormKernels;
template <class Backend> struct SyncKernels;
template <class Backend> struct GradStatsKernels;

// Calls f(scalar_t{}) for the four floating dtypes (check_input and check_tensor_pairs admit no other).
template <typename F>
void dispatch_floating(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kDouble: f(double{}); break;
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "bnext: unexpected dtype ", t);
  }
}

// A forward op's tensors once its arguments are checked: the input in a kernel layout, the output
// in the same layout, the two statistics (var or norm second; NaN in training until the kernels fill
// them, a copy of the running ones in eval) and, unless the input is empty, the affine parameters,
// all per-channel vectors in the accumulation dtype.
struct ForwardCall {
  Geometry g;
  at::Tensor x, y, mean, second, w, b;
  bool empty() const { return g.numel() == 0; }
};

inline ForwardCall forward_call(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, bool training,
                                const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_second, const char* names) {
  ForwardCall f;
  f.x = to_kernel_layout(input, &f.g);
  f.y = empty_in_layout(f.x, f.g);
  std::tie(f.mean, f.second) = forward_statistics(input, f.g.C, training, running_mean, running_second, names);
  if (f.empty()) return f;
  const auto acc = acc_dtype(input.scalar_type());
  f.w = channel_vector(weight, f.g.C, acc, input.device(), 1.0);
  f.b = channel_vector(bias, f.g.C, acc, input.device(), 0.0);
  return f;
}

// A backward op's tensors: input and grad_out in one kernel layout, the outputs (BackwardOutputs)
// and, unless the input is empty, the affine parameters and the saved statistics (var or norm
// second) as per-channel vectors in the accumulation dtype.
struct BackwardCall {
  Geometry g;
  at::Tensor x, dy, w, b, mean, second;
  BackwardOutputs out;
  bool empty() const { return g.numel() == 0; }
};

inline BackwardCall backward_call(const at::Tensor& grad_out, const at::Tensor& input,
                                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& mean, const at::Tensor& second) {
  BackwardCall c;
  c.x = to_kernel_layout(input, &c.g);
  c.dy = match_layout(grad_out, c.g);
  c.out = backward_outputs(c.x, c.g);
  if (c.empty()) return c;
  const auto acc = acc_dtype(input.scalar_type());
  c.w = channel_vector(weight, c.g.C, acc, input.device(), 1.0);
  c.b = channel_vector(bias, c.g.C, acc, input.device(), 0.0);
  c.mean = mean.to(acc).contiguous();
  c.second = second.to(acc).contiguous();
  return c;
}

// --- BatchNorm (+ fused ReLU) ------------------------------------------------------------------

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> BatchNorm<B>::forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training, double eps,
    bool relu) {
  B::check_input(input, "batch_norm");
  check_forward_args("batch_norm", input, weight, bias, running_mean, running_var, "running_var", eps);
  const typename B::Guard guard(input.device());
  // An empty training batch gives an empty output and NaN statistics, as torch does.
  ForwardCall f = forward_call(input, weight, bias, training, running_mean, running_var,
                               "bnext.batch_norm: running_mean and running_var");
  if (!f.empty()) {
    dispatch_floating(input.scalar_type(), [&](auto tag) {
      with_bool(relu, [&](auto RELU) {
        BatchNormKernels<B>::template forward<decltype(tag), decltype(RELU)::value>(f, training, eps);
      });
    });
  }
  return {f.y, f.mean, f.second};
}

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> BatchNorm<B>::backward(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training, double eps, bool relu) {
  B::check_input(input, "batch_norm");
  check_backward_args("batch_norm", grad_out, input, weight, bias, mean, var, "var", eps);
  const typename B::Guard guard(input.device());
  BackwardCall c = backward_call(grad_out, input, weight, bias, mean, var);
  if (!c.empty()) {
    dispatch_floating(input.scalar_type(), [&](auto tag) {
      with_bool(relu, [&](auto RELU) {
        BatchNormKernels<B>::template backward<decltype(tag), decltype(RELU)::value>(c, training, eps);
      });
    });
  }
  return c.out.tuple();
}

// --- Noisy BatchNorm (training only) -----------------------------------------------------------

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> NoisyBatchNorm<B>::forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels) {
  B::check_input(input, "noisy_batch_norm");
  check_forward_args("noisy_batch_norm", input, weight, bias, std::nullopt, std::nullopt, "", eps);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  const typename B::Guard guard(input.device());
  ForwardCall f = forward_call(input, weight, bias, true, std::nullopt, std::nullopt, "");
  if (!f.empty()) {
    dispatch_floating(input.scalar_type(), [&](auto tag) {
      NoisyBatchNormKernels<B>::template forward<decltype(tag)>(f, eps, ns);
    });
  }
  return {f.y, f.mean, f.second};
}

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> NoisyBatchNorm<B>::backward(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, const Tensor& seed,
    at::ArrayRef<double> noise, int64_t noise_channels) {
  B::check_input(input, "noisy_batch_norm");
  check_backward_args("noisy_batch_norm", grad_out, input, weight, bias, mean, var, "var", eps);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  const typename B::Guard guard(input.device());
  BackwardCall c = backward_call(grad_out, input, weight, bias, mean, var);
  if (!c.empty()) {
    dispatch_floating(input.scalar_type(), [&](auto tag) {
      NoisyBatchNormKernels<B>::template backward<decltype(tag)>(c, eps, ns);
    });
  }
  return c.out.tuple();
}

// --- l_p normalization -------------------------------------------------------------------------

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> LpNorm<B>::forward(
    const Tensor& input, double p, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_norm, bool training,
    double eps) {
  B::check_input(input, "lp_norm");
  check_forward_args("lp_norm", input, weight, bias, running_mean, running_norm, "running_norm", eps);
  const LpKind kind = lp_kind(p);
  const typename B::Guard guard(input.device());
  ForwardCall f = forward_call(input, weight, bias, training, running_mean, running_norm,
                               "bnext.lp_norm: running_mean and running_norm");
  Tensor argmax = at::full({f.g.C}, -1, input.options().dtype(at::kLong));
  if (!f.empty()) {
    dispatch_floating(input.scalar_type(), [&](auto tag) {
      LpNormKernels<B>::template forward<decltype(tag)>(f, argmax, kind, training, eps);
    });
  }
  return {f.y, f.mean, f.second, argmax};
}

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> LpNorm<B>::backward(
    const Tensor& grad_out, const Tensor& input, double p, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& norm, const Tensor& argmax, bool training,
    double eps) {
  B::check_input(input, "lp_norm");
  check_backward_args("lp_norm", grad_out, input, weight, bias, mean, norm, "norm", eps);
  const LpKind kind = lp_kind(p);
  // Shape, dtype and device; the values (positions) of a host tensor here, on the GPU in the kernel
  // that reads them, without a sync.
  check_lp_argmax(argmax, input, training && kind == LpKind::kLinf);
  const typename B::Guard guard(input.device());
  BackwardCall c = backward_call(grad_out, input, weight, bias, mean, norm);
  if (!c.empty()) {
    const Tensor am = argmax.contiguous();
    dispatch_floating(input.scalar_type(), [&](auto tag) {
      LpNormKernels<B>::template backward<decltype(tag)>(c, am, kind, training, eps);
    });
  }
  return c.out.tuple();
}

// --- Synchronized normalization ----------------------------------------------------------------

template <class B>
std::tuple<at::Tensor, at::Tensor> Sync<B>::batch_norm_stats(const Tensor& input) {
  B::check_input(input, "batch_norm_stats");
  const typename B::Guard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor mean = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor m2 = at::zeros({g.C}, input.options().dtype(at::kDouble));
  if (g.numel() == 0) return {mean, m2};
  dispatch_floating(input.scalar_type(), [&](auto tag) {
    SyncKernels<B>::template batch_norm_stats<decltype(tag)>(x, g, mean, m2);
  });
  return {mean, m2};
}

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> Sync<B>::lp_norm_stats(const Tensor& input, double p) {
  B::check_input(input, "lp_norm_stats");
  const LpKind kind = lp_kind(p);
  const typename B::Guard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor sum = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor power = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor argmax = at::full({g.C}, -1, input.options().dtype(at::kLong));
  if (g.numel() == 0) return {sum, power, argmax};
  dispatch_floating(input.scalar_type(), [&](auto tag) {
    SyncKernels<B>::template lp_norm_stats<decltype(tag)>(x, g, kind, sum, power, argmax);
  });
  return {sum, power, argmax};
}

// A per-channel coefficient of sync_backward_elementwise, in the accumulation dtype.
inline at::Tensor sync_channel_coefficient(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), "bnext.sync_backward_elementwise: ", name,
              " must be a 1-D tensor with one value per channel (", input.size(1), "), got shape ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), "bnext.sync_backward_elementwise: ", name, " is on ", t.device(),
              " but input is on ", input.device());
  return t.to(acc_dtype(input.scalar_type())).contiguous();
}

template <class B>
at::Tensor Sync<B>::sync_backward_elementwise(const Tensor& grad_eval, const Tensor& input, const Tensor& center,
                                              const Tensor& a, const Tensor& b, bool sign) {
  B::check_input(input, "sync_backward_elementwise");
  TORCH_CHECK(grad_eval.sizes() == input.sizes() && grad_eval.scalar_type() == input.scalar_type(),
              "bnext.sync_backward_elementwise: grad_eval must match input in shape and dtype, got ",
              grad_eval.sizes(), " ", grad_eval.scalar_type(), " vs ", input.sizes(), " ", input.scalar_type());
  TORCH_CHECK(grad_eval.device() == input.device(), "bnext.sync_backward_elementwise: grad_eval is on ",
              grad_eval.device(), " but input is on ", input.device());
  const typename B::Guard guard(input.device());
  const Tensor cc = sync_channel_coefficient(center, "center", input);
  const Tensor ac = sync_channel_coefficient(a, "a", input);
  const Tensor bc = sync_channel_coefficient(b, "b", input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor ge = match_layout(grad_eval, g);
  Tensor dx = empty_in_layout(x, g);
  if (g.numel() == 0) return dx;
  dispatch_floating(input.scalar_type(), [&](auto tag) {
    SyncKernels<B>::template sync_backward_elementwise<decltype(tag)>(ge, x, g, dx, cc, ac, bc, sign);
  });
  return dx;
}

template <class B>
at::Tensor Sync<B>::noise_apply(const Tensor& input, const Tensor& seed, at::ArrayRef<double> noise,
                                int64_t noise_channels, int64_t sample_offset, bool forward) {
  B::check_input(input, "noise_apply");
  TORCH_CHECK(sample_offset >= 0, "bnext.noise_apply: sample_offset must be >= 0, got ", sample_offset);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  const typename B::Guard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor y = empty_in_layout(x, g);
  if (g.numel() == 0) return y;
  dispatch_floating(input.scalar_type(), [&](auto tag) {
    with_bool(forward, [&](auto FORWARD) {
      SyncKernels<B>::template noise_apply<decltype(tag), decltype(FORWARD)::value>(x, g, y, ns, sample_offset);
    });
  });
  return y;
}

// --- Multi-tensor ops --------------------------------------------------------------------------

template <class B>
at::Tensor GradStats<B>::grad_stats(at::TensorList a, at::TensorList b) {
  const at::Device device = check_tensor_pairs("bnext.grad_stats", "a", a, "b", b);
  B::check_list_device(device, "bnext.grad_stats");
  if (a.empty()) return at::zeros({0, 4}, at::TensorOptions().dtype(at::kDouble).device(device));
  const typename B::Guard guard(device);
  return GradStatsKernels<B>::grad_stats(dense(a), dense(b));
}

template <class B>
std::vector<at::Tensor> GradStats<B>::multi_axpy(at::TensorList x, at::TensorList d, at::ArrayRef<double> etas) {
  const at::Device device = check_tensor_pairs("bnext.multi_axpy", "x", x, "d", d);
  B::check_list_device(device, "bnext.multi_axpy");
  const typename B::Guard guard(device);
  const int64_t n = static_cast<int64_t>(x.size()), K = static_cast<int64_t>(etas.size());
  const auto dx = dense(x), dd = dense(d);
  std::vector<Tensor> out(n);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int64_t> shape{K};
    shape.insert(shape.end(), x[i].sizes().begin(), x[i].sizes().end());
    out[i] = at::empty(shape, dx[i].options().memory_format(at::MemoryFormat::Contiguous));
  }
  if (K == 0 || n == 0) return out;
  GradStatsKernels<B>::multi_axpy(dx, dd, out, etas);
  return out;
}

}  // namespace bnext
