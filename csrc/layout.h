#pragma once
#include <string>
// Host-side preparation shared by the CPU and CUDA launchers (uses ATen, runs on the host only).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common/lp_norm_math.h"
#include "common/noise.h"

namespace bnext {

// The two memory layouts the kernels read natively.
//   planar:      x[n][c][s]  (NCHW-contiguous), rows of S contiguous values per (n, c)
//   interleaved: x[m][c]     (channels_last 2d/3d, or an (N, C) input), m = n * S + s
// Anything else is copied to planar first.
struct Geometry {
  bool interleaved;
  int64_t N, C, S;
  int64_t rows() const { return N * S; }      // values per channel
  int64_t numel() const { return N * C * S; }
};

inline bool is_interleaved_dense(const at::Tensor& t) {
  return t.movedim(1, -1).is_contiguous();
}

// Returns `input` (or a copy) dense in a layout the kernels read, and fills `geo`.
inline at::Tensor to_kernel_layout(const at::Tensor& input, Geometry* geo) {
  const int64_t N = input.size(0), C = input.size(1);
  int64_t spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) spatial *= input.size(d);
  *geo = Geometry{false, N, C, spatial};
  if (input.is_contiguous()) {
    // With no spatial extent NCHW and interleaved coincide; interleaved vectorizes over C.
    geo->interleaved = (spatial == 1);
    return input;
  }
  if (is_interleaved_dense(input)) {
    geo->interleaved = true;
    return input;
  }
  return input.contiguous();
}

// Brings a tensor shaped like the input (grad_out) into the layout chosen for the input.
inline at::Tensor match_layout(const at::Tensor& t, const Geometry& geo) {
  if (geo.interleaved) {
    return is_interleaved_dense(t) ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.contiguous();
}

// An output dense in the same layout as the (prepared) input.
inline at::Tensor empty_in_layout(const at::Tensor& x, const Geometry& geo) {
  if (geo.interleaved && !x.is_contiguous()) {
    return at::empty(x.movedim(1, -1).sizes(), x.options()).movedim(-1, 1);
  }
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-channel vector in the accumulation dtype, or `fill` when the optional is empty.
inline at::Tensor channel_vector(const std::optional<at::Tensor>& t, int64_t C,
                                 at::ScalarType acc, const at::Device& device, double fill) {
  if (t.has_value() && t->defined()) return t->to(device, acc).contiguous();
  return at::full({C}, fill, at::TensorOptions().dtype(acc).device(device));
}

inline void check_channel_arg(const std::optional<at::Tensor>& t, const char* name,
                              const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == input.size(1), "bnext: ", name,
              " must be a 1-D tensor with ", input.size(1), " elements (one per channel), got shape ",
              t->sizes());
  TORCH_CHECK(t->device() == input.device(), "bnext: ", name, " is on ", t->device(),
              " but input is on ", input.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "bnext: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
}

inline void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2 && input.dim() <= 5,
              "bnext: input must have shape (N, C, *) with 0 to 3 spatial dims, got ",
              input.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "bnext: input must be float64, float32, float16 or bfloat16, got ",
              input.scalar_type());
}

// eps of a raw op call (the Python API checks it too): a finite number >= 0.
inline void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
}

// lp_norm backward, p = inf in training: the saved arg-max positions index into each channel's
// N * S values (-1: none), an int64 vector on the input's device. Reads C values (host tensors only).
inline void check_lp_argmax(const at::Tensor& argmax, const at::Tensor& input, bool check_values) {
  TORCH_CHECK(argmax.dim() == 1 && argmax.size(0) == input.size(1), "bnext.lp_norm backward: argmax must be an int64 tensor ",
              "with one value per channel (", input.size(1), "), got shape ", argmax.sizes());
  TORCH_CHECK(argmax.scalar_type() == at::kLong, "bnext.lp_norm backward: argmax must be int64, got ",
              argmax.scalar_type());
  TORCH_CHECK(argmax.device() == input.device(), "bnext.lp_norm backward: argmax is on ", argmax.device(),
              " but input is on ", input.device());
  if (!check_values || argmax.numel() == 0 || !argmax.device().is_cpu()) return;
  const int64_t rows = input.size(1) > 0 ? input.numel() / input.size(1) : 0;
  const at::Tensor a = argmax.contiguous();
  const int64_t* p = a.const_data_ptr<int64_t>();
  for (int64_t c = 0; c < a.numel(); ++c) {
    TORCH_CHECK(p[c] >= -1 && p[c] < rows, "bnext.lp_norm backward: argmax[", c, "] = ", p[c],
                " is not a position in the channel's ", rows, " values (or -1)");
  }
}

// noisy_batch_norm: the Philox key and noise constants of one call (checks shared by CPU and CUDA).
inline NoiseSpec noise_spec(const at::Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels,
                            const at::Tensor& input) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "bnext.noisy_batch_norm: seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(),
              " of shape ", seed.sizes(), " on ", seed.device());
  TORCH_CHECK(noise.size() == 4, "bnext.noisy_batch_norm: noise must be [noise_mean, noise_std, noise_mean_spread, "
              "noise_std_spread], got ", noise.size(), " values");
  const int64_t C = input.size(1);
  TORCH_CHECK(noise_channels > 0 ? C % noise_channels == 0 : C == 0,
              "bnext.noisy_batch_norm: noise_channels must divide the number of channels ", C, ", got ",
              noise_channels);
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  return NoiseSpec{static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), static_cast<float>(noise[0]),
                   static_cast<float>(noise[1]), static_cast<float>(noise[2]), static_cast<float>(noise[3]),
                   noise_channels > 0 ? noise_channels : 1};
}

// lp_norm: p in {1, 2, inf}.
inline LpKind lp_kind(double p) {
  if (p == 1.0) return LpKind::kL1;
  if (p == 2.0) return LpKind::kL2;
  TORCH_CHECK(std::isinf(p) && p > 0, "bnext.lp_norm: p must be 1, 2 or inf, got ", p);
  return LpKind::kLinf;
}

// --- Shared by the CPU and CUDA entry points of the three layers -------------------------------

// One kernel instantiation per value of a run-time flag.
template <bool B>
using Bool = std::integral_constant<bool, B>;

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) f(Bool<true>{}); else f(Bool<false>{});
}

template <typename F>
void with_lp_kind(LpKind p, F&& f) {
  switch (p) {
    case LpKind::kL1: f(std::integral_constant<LpKind, LpKind::kL1>{}); break;
    case LpKind::kL2: f(std::integral_constant<LpKind, LpKind::kL2>{}); break;
    case LpKind::kLinf: f(std::integral_constant<LpKind, LpKind::kLinf>{}); break;
  }
}

// The grad_out of a backward op (`op`: "batch_norm", "noisy_batch_norm", "lp_norm") against its input.
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& input, const char* op) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnext.", op, " backward: grad_out shape ", grad_out.sizes(),
              " differs from input shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "bnext.", op, " backward: grad_out dtype ",
              grad_out.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "bnext.", op, " backward: grad_out is on ", grad_out.device(),
              " but input is on ", input.device());
}

// The arguments of every forward op (`op`: "batch_norm", "noisy_batch_norm", "lp_norm") besides `input`:
// the affine parameters and running statistics (named var or norm; absent for noisy_batch_norm) one
// value per channel on the input's device, and eps.
inline void check_forward_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_second, const char* second_name, double eps) {
  check_channel_arg(weight, "weight", input);
  check_channel_arg(bias, "bias", input);
  check_channel_arg(running_mean, "running_mean", input);
  check_channel_arg(running_second, second_name, input);
  check_eps((std::string("bnext.") + op).c_str(), eps);
}

// The arguments of every backward op (`op`: "batch_norm", "noisy_batch_norm", "lp_norm") besides `input`
// (check_input): grad_out like the input; the per-channel statistics (`mean` and the second one, named
// var or norm) and the affine parameters one value per channel on the input's device; eps. Without
// these a raw call with a short mean/var read past their end (CPU) or on the device (CUDA).
inline void check_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& mean, const at::Tensor& second, const char* second_name,
                                double eps) {
  check_grad_out(grad_out, input, op);
  TORCH_CHECK(mean.defined() && second.defined(), "bnext.", op, " backward: mean and ", second_name,
              " must be defined tensors");
  check_channel_arg(mean, "mean", input);
  check_channel_arg(second, second_name, input);
  check_channel_arg(weight, "weight", input);
  check_channel_arg(bias, "bias", input);
  check_eps((std::string("bnext.") + op + " backward").c_str(), eps);
}

// What every backward op returns: dx dense in the layout chosen for the input, and the per-channel
// sums (sum g, sum g * xhat) in the accumulation dtype, zero until the kernels add to them.
struct BackwardOutputs {
  at::Tensor dx, sum_dy, sum_dy_xhat;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> tuple() const { return {dx, sum_dy, sum_dy_xhat}; }
};

inline BackwardOutputs backward_outputs(const at::Tensor& x, const Geometry& g) {
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  return BackwardOutputs{empty_in_layout(x, g), at::zeros({g.C}, opts), at::zeros({g.C}, opts)};
}

// The two per-channel statistics of a forward op in the accumulation dtype: NaN placeholders in
// training (the kernels fill them; an empty batch keeps NaN, as torch does), copies of the running
// statistics in eval. `names` completes the error message, e.g. "bnext.lp_norm: running_mean and
// running_norm".
inline std::pair<at::Tensor, at::Tensor> forward_statistics(const at::Tensor& input, int64_t C, bool training,
                                                            const std::optional<at::Tensor>& running_a,
                                                            const std::optional<at::Tensor>& running_b,
                                                            const char* names) {
  const auto acc = acc_dtype(input.scalar_type());
  if (training) {
    return {at::full({C}, NAN, input.options().dtype(acc)), at::full({C}, NAN, input.options().dtype(acc))};
  }
  TORCH_CHECK(running_a.has_value() && running_b.has_value(), names, " are required when training=False");
  return {running_a->to(acc).clone().contiguous(), running_b->to(acc).clone().contiguous()};
}

}  // namespace bnext
