#pragma once
// BatchNorm's CUDA passes over the skeleton (csrc/cuda/reduce.cuh, elementwise.cuh): the finishes of
// its reductions, and its backward, which noisy BatchNorm's is (on g = dy * s). The forward is in
// batch_norm.cu.
//   forward:   training: reduce (Welford partials) -> merge per channel (BatchNormStatsFinish)
//              -> per-channel scale -> elementwise y (AffineEpilogue); eval: scale -> elementwise y
//   backward:  per-channel scale -> reduce (GradSumsPolicy: sum g, sum g * (x - mean); eval also
//              writes dx) -> merge per channel (BatchNormGradFinish) -> training: elementwise dx
//              (BatchNormBackward)
// Same semantics as csrc/cpu/passes.h.
#include <c10/cuda/CUDAStream.h>

#include "elementwise.cuh"

namespace bnext {
namespace {

// Batch statistics: mean and biased variance.
template <typename acc_t>
struct BatchNormStatsFinish {
  acc_t* mean;
  acc_t* var;
  __device__ void operator()(int64_t c, const WelfordState<acc_t>& s) const {
    mean[c] = s.mean;
    var[c] = welford_variance(s);
  }
};

// Backward sums, as the CPU path forms them (fp64 arithmetic on the channel totals):
//   sum_dy = sum g,  sum_dy_xhat = sum g * (x - mean) * invstd,
//   training: mean_dy = sum_dy / M,  proj = sum g * (x - mean) * invstd^2 / M.
template <typename acc_t>
struct BatchNormGradFinish {
  const acc_t* invstd;
  acc_t* sum_dy;
  acc_t* sum_dy_xhat;
  acc_t* mean_dy;  // null in eval
  acc_t* proj;     // null in eval
  double M;
  __device__ void operator()(int64_t c, const GradSums<acc_t>& s) const {
    const double inv = static_cast<double>(invstd[c]);
    const double s_dy = static_cast<double>(s.dy), s_dy_xc = static_cast<double>(s.dy_xc);
    sum_dy[c] = s.dy;
    sum_dy_xhat[c] = static_cast<acc_t>(s_dy_xc * inv);
    if (mean_dy != nullptr) {
      mean_dy[c] = static_cast<acc_t>(s_dy / M);
      proj[c] = static_cast<acc_t>(s_dy_xc * inv * inv / M);
    }
  }
};

// BatchNorm's backward (noisy BatchNorm's on g = dy * s): the sums (eval: and dx), then training dx.
template <typename scalar_t, bool RELU>
void batch_norm_backward_passes(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const Geometry& g,
                   bool training, double eps, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& mean_t, const at::Tensor& var_t, at::Tensor& sum_dy, at::Tensor& sum_dy_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  using dev_t = typename DeviceScalar<scalar_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x_t.device());
  const dev_t* x = device_ptr<scalar_t>(x_t);
  const dev_t* dy = device_ptr<scalar_t>(dy_t);
  dev_t* dx = device_ptr_mut<scalar_t>(dx_t);
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  const acc_t* shift = bias.const_data_ptr<acc_t>();

  at::Tensor invstd = at::empty({g.C}, mean_t.options());
  at::Tensor scale = at::empty({g.C}, mean_t.options());
  launch_channel_scale<acc_t, ScaleOf::kVariance>(var_t, weight, eps, invstd.mutable_data_ptr<acc_t>(), scale, stream);
  const acc_t* scale_p = scale.const_data_ptr<acc_t>();

  at::Tensor mean_dy, proj;
  if (training) {
    mean_dy = at::empty({g.C}, mean_t.options());
    proj = at::empty({g.C}, mean_t.options());
  }
  const BatchNormGradFinish<acc_t> finish{invstd.const_data_ptr<acc_t>(), sum_dy.mutable_data_ptr<acc_t>(),
                                 sum_dy_xhat.mutable_data_ptr<acc_t>(),
                                 training ? mean_dy.mutable_data_ptr<acc_t>() : nullptr,
                                 training ? proj.mutable_data_ptr<acc_t>() : nullptr, static_cast<double>(g.rows())};
  with_bool(!training, [&](auto write_eval) {
    using Policy = GradSumsPolicy<dev_t, acc_t, RELU, decltype(write_eval)::value>;
    reduce_and_merge(Policy{x, dy, dx, mean, scale_p, shift}, g, x_t, sms, finish, stream);
  });
  if (!training) return;
  launch_elementwise(BatchNormBackward<dev_t, acc_t, RELU>{x, dy, dx, mean, scale_p, shift, mean_dy.const_data_ptr<acc_t>(),
                                                   proj.const_data_ptr<acc_t>()},
                     g, sms, stream);
}

}  // namespace
}  // namespace bnext
