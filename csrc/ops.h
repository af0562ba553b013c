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

#ifdef BNEXT_WITH_CUDA
std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cuda(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool relu);

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training,
    double eps, bool relu);
#endif

// Multi-tensor ops (csrc/cpu/grad_stats.cpp, csrc/cuda/grad_stats.cu).
// grad_stats: (len(a), 4) fp64, row i = [||a_i||^2, ||b_i||^2, ||a_i - b_i||^2, <a_i, b_i>].
Tensor grad_stats_cpu(at::TensorList a, at::TensorList b);
// multi_axpy: out_i of shape (K, *x_i.shape), out_i[k] = x_i - etas[k] * d_i.
std::vector<Tensor> multi_axpy_cpu(at::TensorList x, at::TensorList d, at::ArrayRef<double> etas);
#ifdef BNEXT_WITH_CUDA
Tensor grad_stats_cuda(at::TensorList a, at::TensorList b);
std::vector<Tensor> multi_axpy_cuda(at::TensorList x, at::TensorList d, at::ArrayRef<double> etas);
#endif

}  // namespace bnext
