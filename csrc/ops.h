#pragma once
// Declarations of every backend implementation; the schemas live in registration.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <tuple>
#include <vector>

namespace bnext {

using at::Tensor;

// Returns (output, mean, var): the statistics actually used to normalize (batch statistics in
// training, a copy of the running statistics in eval), biased variance, in the accumulation
// dtype (fp32 for fp16/bf16/fp32 input, fp64 for fp64 input).
std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool relu);

// Returns (grad_input, sum_dy, sum_dy_xhat); grad_weight = sum_dy_xhat, grad_bias = sum_dy.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training,
    double eps, bool relu);

// Noisy BatchNorm (training mode only: eval is plain BatchNorm). `seed`: 0-d int64 CPU tensor,
// the Philox key; `noise` = [noise_mean, noise_std, noise_mean_spread, noise_std_spread]
// (csrc/common/noise.h). Returns (output, mean, var) like batch_norm_forward; backward returns
// (grad_input, sum_g, sum_g_xhat) with g = grad_out * s, s regenerated from the seed.
// noise_channels (= C, except in the vmap rule, which folds B problems into B * C channels): channel
// c gets the noise of channel c % noise_channels of a (N, noise_channels, *) input, so every folded
// problem sees the noise it would get alone.
std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    const Tensor& seed, at::ArrayRef<double> noise,
    int64_t noise_channels);
std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, const Tensor& seed,
    at::ArrayRef<double> noise, int64_t noise_channels);

// l_p normalization, p in {1, 2, inf} (csrc/common/lp_norm_math.h). Returns (output, mean, norm,
// argmax): the statistics used (batch or a copy of the running ones) in the accumulation dtype,
// and for p = inf in training the position (n * S + s) of each channel's first arg-max of |x|
// (int64, -1 otherwise). Backward returns (grad_input, sum_dy, sum_dy_xhat), xhat = (x - mean) / (N + eps).
std::tuple<Tensor, Tensor, Tensor, Tensor> lp_norm_forward_cpu(
    const Tensor& input, double p, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_norm, bool training, double eps);
std::tuple<Tensor, Tensor, Tensor> lp_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, double p, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& norm, const Tensor& argmax, bool training,
    double eps);

#ifdef BNEXT_WITH_CUDA
std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_forward_cuda(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    const Tensor& seed, at::ArrayRef<double> noise,
    int64_t noise_channels);
std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_backward_cuda(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, const Tensor& seed,
    at::ArrayRef<double> noise, int64_t noise_channels);

std::tuple<Tensor, Tensor, Tensor, Tensor> lp_norm_forward_cuda(
    const Tensor& input, double p, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_norm, bool training, double eps);
std::tuple<Tensor, Tensor, Tensor> lp_norm_backward_cuda(
    const Tensor& grad_out, const Tensor& input, double p, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& norm, const Tensor& argmax, bool training,
    double eps);

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cuda(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool relu);

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training,
    double eps, bool relu);
#endif

// Running statistics, any device (csrc/running_stats.cpp): running = (1 - momentum) * running +
// momentum * batch, the variance (or norm) multiplied by var_correction first; in place.
void update_running_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                          const Tensor& var, double momentum, double var_correction);

// Multi-tensor ops (csrc/cpu/grad_stats.cpp, csrc/cuda/grad_stats.cu).
// grad_stats: (len(a), 4) fp64, row i = [||a_i||^2, ||b_i||^2, ||a_i - b_i||^2, <a_i, b_i>].
Tensor grad_stats_cpu(at::TensorList a, at::TensorList b);
// multi_axpy: out_i of shape (K, *x_i.shape), out_i[k] = x_i - etas[k] * d_i.
std::vector<Tensor> multi_axpy_cpu(at::TensorList x, at::TensorList d, at::ArrayRef<double> etas);
#ifdef BNEXT_WITH_CUDA
Tensor grad_stats_cuda(at::TensorList a, at::TensorList b);
std::vector<Tensor> multi_axpy_cuda(at::TensorList x, at::TensorList d, at::ArrayRef<double> etas);
#endif

// Synchronized normalization (csrc/cpu/sync_normalization.cpp, csrc/common/sync_math.h).
// batch_norm_stats: local per-channel (mean, m2) in fp64, zeros for an empty input.
std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input);
// lp_norm_stats: local fp64 (sum x, sum |x|^p or max |x|) and int64 first arg-max position (p = inf; else -1).
std::tuple<Tensor, Tensor, Tensor> lp_norm_stats_cpu(const Tensor& input, double p);
// dx = grad_eval - a_c - b_c * dir(x - center_c), dir = identity or sign.
Tensor sync_backward_elementwise_cpu(const Tensor& grad_eval, const Tensor& input, const Tensor& center,
                                     const Tensor& a, const Tensor& b, bool sign);
// Noisy BatchNorm's noise at global sample offset: s * x + m (forward) or x * s (backward).
Tensor noise_apply_cpu(const Tensor& input, const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels,
                       int64_t sample_offset, bool forward);
#ifdef BNEXT_WITH_CUDA
std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input);
std::tuple<Tensor, Tensor, Tensor> lp_norm_stats_cuda(const Tensor& input, double p);
Tensor sync_backward_elementwise_cuda(const Tensor& grad_eval, const Tensor& input, const Tensor& center,
                                      const Tensor& a, const Tensor& b, bool sign);
Tensor noise_apply_cuda(const Tensor& input, const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels,
                        int64_t sample_offset, bool forward);
#endif

}  // namespace bnext
