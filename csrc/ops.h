#pragma once
// Declarations of every op's entry points; the schemas live in registration.cpp.
//
// An op's entry point is one template over the backend, Op<Cpu>::f and Op<Cuda>::f (csrc/entry.h:
// argument checks, layout, outputs, per-channel parameter vectors and dtype dispatch, written once),
// so the two backends cannot drift. The backend supplies only the kernels, in one file per op:
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, each of which instantiates its op's template.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <tuple>
#include <vector>

namespace bnext {

using at::Tensor;

// The backends (csrc/entry.h).
struct Cpu;
struct Cuda;

// BatchNorm (+ fused ReLU).
// forward returns (output, mean, var): the statistics actually used to normalize (batch statistics
// in training, a copy of the running statistics in eval), biased variance, in the accumulation
// dtype (fp32 for fp16/bf16/fp32 input, fp64 for fp64 input).
// backward returns (grad_input, sum_dy, sum_dy_xhat); grad_weight = sum_dy_xhat, grad_bias = sum_dy.
template <class Backend>
struct BatchNorm {
  static std::tuple<Tensor, Tensor, Tensor> forward(
      const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training, double eps,
      bool relu);
  static std::tuple<Tensor, Tensor, Tensor> backward(
      const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training, double eps, bool relu);
};

// Noisy BatchNorm (training mode only: eval is plain BatchNorm). `seed`: 0-d int64 CPU tensor,
// the Philox key; `noise` = [noise_mean, noise_std, noise_mean_spread, noise_std_spread]
// (csrc/common/noise.h). Returns (output, mean, var) like BatchNorm::forward; backward returns
// (grad_input, sum_g, sum_g_xhat) with g = grad_out * s, s regenerated from the seed.
// noise_channels (= C, except in the vmap rule, which folds B problems into B * C channels): channel
// c gets the noise of channel c % noise_channels of a (N, noise_channels, *) input, so every folded
// problem sees the noise it would get alone.
template <class Backend>
struct NoisyBatchNorm {
  static std::tuple<Tensor, Tensor, Tensor> forward(
      const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
      const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels);
  static std::tuple<Tensor, Tensor, Tensor> backward(
      const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, const Tensor& seed,
      at::ArrayRef<double> noise, int64_t noise_channels);
};

// l_p normalization, p in {1, 2, inf} (csrc/common/lp_norm_math.h). forward returns (output, mean,
// norm, argmax): the statistics used (batch or a copy of the running ones) in the accumulation dtype,
// and for p = inf in training the position (n * S + s) of each channel's first arg-max of |x|
// (int64, -1 otherwise). backward returns (grad_input, sum_dy, sum_dy_xhat), xhat = (x - mean) / (N + eps).
template <class Backend>
struct LpNorm {
  static std::tuple<Tensor, Tensor, Tensor, Tensor> forward(
      const Tensor& input, double p, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_norm, bool training,
      double eps);
  static std::tuple<Tensor, Tensor, Tensor> backward(
      const Tensor& grad_out, const Tensor& input, double p, const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& norm, const Tensor& argmax, bool training,
      double eps);
};

// Synchronized normalization (bnext/distributed.py, csrc/common/sync_math.h): the per-rank pieces.
template <class Backend>
struct Sync {
  // Local per-channel BatchNorm statistics (mean, m2) in fp64, zeros for an empty input.
  static std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input);
  // Local fp64 (sum x, sum |x|^p or max |x|) and int64 first arg-max position (p = inf; else -1).
  static std::tuple<Tensor, Tensor, Tensor> lp_norm_stats(const Tensor& input, double p);
  // dx = grad_eval - a_c - b_c * dir(x - center_c), dir = identity or sign.
  static Tensor sync_backward_elementwise(const Tensor& grad_eval, const Tensor& input, const Tensor& center,
                                          const Tensor& a, const Tensor& b, bool sign);
  // Noisy BatchNorm's noise at global sample offset: s * x + m (forward) or x * s (backward).
  static Tensor noise_apply(const Tensor& input, const Tensor& seed, at::ArrayRef<double> noise,
                            int64_t noise_channels, int64_t sample_offset, bool forward);
};

// Multi-tensor ops (csrc/multi_tensor.h).
template <class Backend>
struct GradStats {
  // (len(a), 4) fp64, row i = [||a_i||^2, ||b_i||^2, ||a_i - b_i||^2, <a_i, b_i>].
  static Tensor grad_stats(at::TensorList a, at::TensorList b);
  // out_i of shape (K, *x_i.shape), out_i[k] = x_i - etas[k] * d_i.
  static std::vector<Tensor> multi_axpy(at::TensorList x, at::TensorList d, at::ArrayRef<double> etas);
};

// Running statistics, any device (csrc/running_stats.cpp): running = (1 - momentum) * running +
// momentum * batch, the variance (or norm) multiplied by var_correction first; in place.
void update_running_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                          const Tensor& var, double momentum, double var_correction);

}  // namespace bnext
