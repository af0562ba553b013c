// BatchNorm (+ fused ReLU), CUDA entry points. The passes and kernels: csrc/cuda/normalization.cuh.
#include "normalization.cuh"

namespace bnext {

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cuda(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool relu) {
  check_cuda_input(input, "batch_norm");
  check_forward_args("batch_norm", input, weight, bias, running_mean, running_var, "running_var", eps);
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  const auto dev = input.device();
  Tensor y = empty_in_layout(x, g);
  // An empty training batch gives an empty output and NaN statistics, as on the CPU and in torch.
  Tensor mean, var;
  std::tie(mean, var) = forward_statistics(input, g.C, training, running_mean, running_var,
                                           "bnext.batch_norm: running_mean and running_var");
  if (g.numel() == 0) return {y, mean, var};
  const Tensor w = channel_vector(weight, g.C, acc, dev, 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, dev, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_forward_cuda", [&] {
    with_bool(relu, [&](auto RELU) {
      forward_impl<scalar_t, decltype(RELU)::value>(x, y, g, training, eps, w, b, mean, var);
    });
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training,
    double eps, bool relu) {
  check_cuda_input(input, "batch_norm");
  check_backward_args("batch_norm", grad_out, input, weight, bias, mean, var, "var", eps);
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  const auto dev = input.device();
  BackwardOutputs out = backward_outputs(x, g);
  if (g.numel() == 0) return out.tuple();
  const Tensor w = channel_vector(weight, g.C, acc, dev, 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, dev, 0.0);
  const Tensor m = mean.to(acc).contiguous();
  const Tensor v = var.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_backward_cuda", [&] {
    with_bool(relu, [&](auto RELU) {
      backward_impl<scalar_t, decltype(RELU)::value>(dy, x, out.dx, g, training, eps, w, b, m, v, out.sum_dy,
                                                     out.sum_dy_xhat);
    });
  });
  return out.tuple();
}

}  // namespace bnext
