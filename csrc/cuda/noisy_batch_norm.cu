// Noisy BatchNorm (the paper's Algorithm 1), CUDA entry points. Same semantics as the CPU path:
//   forward:  BatchNorm's statistics (StatsPolicy), then y = s * bn_forward_value(x) + m in one noise
//             pass (s, m drawn per element pair, csrc/common/noise.h);
//   backward: pass 1 draws s again and writes g = dy * s ROUNDED TO THE INPUT DTYPE (the CPU keeps g
//             in dx's memory, in the input dtype, so both sides reduce and differentiate the same
//             g); then BatchNorm's training backward (sums, dx) on g.
// The passes and kernels: csrc/cuda/normalization.cuh.
#include "normalization.cuh"

namespace bnext {
namespace {

// y = s * bn_forward_value(x) + m, s and m in fp32 (as element_noise), the product and sum in acc_t.
template <typename scalar_t, typename acc_t>
struct NoisyForwardOp {
  using Item = acc_t;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;

  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  __device__ void apply(int64_t i, const Item& v, int64_t c, const ElementNoise& e) const {
    const acc_t a = bn_forward_value(v, ChannelAffine<acc_t>{mean[c], scale[c], shift[c]}, false);
    store(y + i, static_cast<acc_t>(e.s) * a + static_cast<acc_t>(e.m));
  }
};

// g = dy * s, stored in the input dtype.
template <typename scalar_t, typename acc_t>
struct NoiseGradOp {
  using Item = acc_t;
  const scalar_t* __restrict__ dy;
  scalar_t* __restrict__ g;

  __device__ Item load(int64_t i) const { return to_acc(dy[i]); }
  __device__ void apply(int64_t i, const Item& v, int64_t, const ElementNoise& e) const {
    store(g + i, v * static_cast<acc_t>(e.s));
  }
};

template <typename scalar_t>
void noisy_forward_impl(const at::Tensor& x, at::Tensor& y, const Geometry& g, double eps, const at::Tensor& weight,
                        const at::Tensor& bias, at::Tensor& mean, at::Tensor& var, const NoiseSpec& ns) {
  using acc_t = at::opmath_type<scalar_t>;
  using dev_t = typename DeviceScalar<scalar_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.device());
  const dev_t* xp = device_ptr<scalar_t>(x);
  reduce_and_merge(StatsPolicy<dev_t, acc_t>{xp}, g, x, sms,
                   StatsFinish<acc_t>{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>()}, stream);
  at::Tensor scale = at::empty({g.C}, mean.options());
  launch_channel_scale<acc_t>(var, weight, eps, nullptr, scale, stream);
  const auto noise = channel_noise_vectors(ns, g.C, x, stream);
  launch_noise(NoisyForwardOp<dev_t, acc_t>{xp, device_ptr_mut<scalar_t>(y), mean.const_data_ptr<acc_t>(),
                                            scale.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>()},
               g, ns, noise.first, noise.second, 0, sms, stream);
}

template <typename scalar_t>
void noisy_backward_impl(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const Geometry& g,
                         double eps, const at::Tensor& weight, const at::Tensor& mean_t, const at::Tensor& var_t,
                         at::Tensor& sum_dy, at::Tensor& sum_dy_xhat, const NoiseSpec& ns) {
  using acc_t = at::opmath_type<scalar_t>;
  using dev_t = typename DeviceScalar<scalar_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x_t.device());
  const auto noise = channel_noise_vectors(ns, g.C, x_t, stream);
  at::Tensor gs = empty_in_layout(x_t, g);
  launch_noise(NoiseGradOp<dev_t, acc_t>{device_ptr<scalar_t>(dy_t), device_ptr_mut<scalar_t>(gs)}, g, ns,
               noise.first, noise.second, 0, sms, stream);
  // No ReLU: the bias is only read for the ReLU mask, so any C-vector does; the weight is at hand.
  backward_impl<scalar_t, false>(gs, x_t, dx_t, g, /*training=*/true, eps, weight, /*bias=*/weight, mean_t, var_t,
                                 sum_dy, sum_dy_xhat);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_forward_cuda(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels) {
  check_cuda_input(input, "noisy_batch_norm");
  check_forward_args("noisy_batch_norm", input, weight, bias, std::nullopt, std::nullopt, "", eps);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  Tensor y = empty_in_layout(x, g);
  Tensor mean, var;
  std::tie(mean, var) = forward_statistics(input, g.C, true, std::nullopt, std::nullopt, "");
  if (g.numel() == 0) return {y, mean, var};
  const Tensor w = channel_vector(weight, g.C, acc, input.device(), 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, input.device(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_noisy_bn_forward_cuda", [&] {
    noisy_forward_impl<scalar_t>(x, y, g, eps, w, b, mean, var, ns);
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_backward_cuda(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, const Tensor& seed,
    at::ArrayRef<double> noise, int64_t noise_channels) {
  check_cuda_input(input, "noisy_batch_norm");
  check_backward_args("noisy_batch_norm", grad_out, input, weight, bias, mean, var, "var", eps);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  BackwardOutputs out = backward_outputs(x, g);
  if (g.numel() == 0) return out.tuple();
  const Tensor w = channel_vector(weight, g.C, acc, input.device(), 1.0);
  const Tensor m = mean.to(acc).contiguous();
  const Tensor v = var.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_noisy_bn_backward_cuda", [&] {
    noisy_backward_impl<scalar_t>(dy, x, out.dx, g, eps, w, m, v, out.sum_dy, out.sum_dy_xhat, ns);
  });
  return out.tuple();
}

}  // namespace bnext
