#pragma once
// BatchNorm's CUDA passes over the skeleton (csrc/cuda/reduce.cuh, elementwise.cuh): the finishes of
// its reductions, and its backward, which noisy BatchNorm's is (on g = dy * s). The forward is in
// batch_norm.cu.
//   forward:   training: reduce (Welford partials) -> merge per channel (BatchNormStatsFinish:
//              mean, var and the mean's residual) -> per-channel scale -> elementwise y
//              (AffineEpilogue); eval: scale -> elementwise y
//   backward:  per-channel scale -> training with ReLU: the forward's residual, recomputed for the
//              channels where it matters (MeanResidualFinish) -> reduce (GradSumsPolicy: sum g,
//              sum g * (x - mean), sum x - mean; eval also writes dx) -> merge per channel
//              (BatchNormGradFinish: training recentres the sums) -> training: elementwise dx
//              (BatchNormBackward)
// Same semantics as csrc/cpu/passes.h and csrc/cpu/batch_norm.cpp: fp64 statistics, the saved acc_t
// mean plus its residual (batch_norm_math.h), the backward's sums recentred on the batch mean.
#include <c10/cuda/CUDAStream.h>

#include "elementwise.cuh"

namespace bnext {
namespace {

// Batch statistics: mean and biased variance from the fp64 totals, and the residual of the mean
// (csrc/cpu/batch_norm.cpp: bn_statistics, then set_residuals with invstd from these statistics).
template <typename acc_t>
struct BatchNormStatsFinish {
  acc_t* mean;
  acc_t* var;
  acc_t* mean_lo;
  double eps;
  __device__ void operator()(int64_t c, const WelfordState<double>& s) const {
    const acc_t m = static_cast<acc_t>(s.mean), v = static_cast<acc_t>(welford_variance(s));
    mean[c] = m;
    var[c] = v;
    mean_lo[c] = bn_mean_residual(s.mean, m, bn_invstd(v, eps), false);
  }
};

// The forward's residual of the saved mean, recomputed (BatchNormStatsPolicy with the saved mean and
// invstd: the same partials as the forward's where the residual matters, empty elsewhere, where
// bn_mean_residual gives 0).
template <typename acc_t>
struct MeanResidualFinish {
  const acc_t* mean;
  const acc_t* invstd;
  acc_t* mean_lo;
  __device__ void operator()(int64_t c, const WelfordState<double>& s) const {
    mean_lo[c] = bn_mean_residual(s.mean, mean[c], invstd[c], false);
  }
};

// Backward sums, as the CPU path forms them (fp64 arithmetic on the channel totals; training first
// recentres sum g * (x - mean) on the batch mean, bn_recentre, and keeps the residual lo for dx):
//   sum_dy = sum g,  sum_dy_xhat = sum g * (x - mean) * invstd,
//   training: mean_dy = sum_dy / M,  proj = sum g * (x - mean) * invstd^2 / M.
template <typename acc_t>
struct BatchNormGradFinish {
  const acc_t* mean;
  const acc_t* invstd;
  acc_t* sum_dy;
  acc_t* sum_dy_xhat;
  acc_t* mean_dy;  // null in eval
  acc_t* proj;     // null in eval
  acc_t* lo;       // null in eval
  double M;
  __device__ void operator()(int64_t c, const GradSums<double>& s) const {
    const double inv = static_cast<double>(invstd[c]);
    double s_dy_xc = s.dy_xc;
    if (mean_dy != nullptr) lo[c] = bn_recentre(mean[c], M, s.dy, s.xc, &s_dy_xc);
    sum_dy[c] = static_cast<acc_t>(s.dy);
    sum_dy_xhat[c] = static_cast<acc_t>(s_dy_xc * inv);
    if (mean_dy != nullptr) {
      mean_dy[c] = static_cast<acc_t>(s.dy / M);
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

  // The ReLU mask is the forward's: with its residual of the mean, recomputed from x where it
  // matters (as csrc/cpu/batch_norm.cpp; the other channels' blocks read nothing).
  at::Tensor mean_lo;
  if (RELU && training) {
    mean_lo = at::empty({g.C}, mean_t.options());
    reduce_and_merge(BatchNormStatsPolicy<dev_t, acc_t>{x, mean, invstd.const_data_ptr<acc_t>()}, g, x_t, sms,
                     MeanResidualFinish<acc_t>{mean, invstd.const_data_ptr<acc_t>(), mean_lo.mutable_data_ptr<acc_t>()},
                     stream);
  }
  const acc_t* mean_lo_p = RELU && training ? mean_lo.const_data_ptr<acc_t>() : nullptr;

  at::Tensor mean_dy, proj, lo;
  if (training) {
    mean_dy = at::empty({g.C}, mean_t.options());
    proj = at::empty({g.C}, mean_t.options());
    lo = at::empty({g.C}, mean_t.options());
  }
  const BatchNormGradFinish<acc_t> finish{mean, invstd.const_data_ptr<acc_t>(), sum_dy.mutable_data_ptr<acc_t>(),
                                 sum_dy_xhat.mutable_data_ptr<acc_t>(),
                                 training ? mean_dy.mutable_data_ptr<acc_t>() : nullptr,
                                 training ? proj.mutable_data_ptr<acc_t>() : nullptr,
                                 training ? lo.mutable_data_ptr<acc_t>() : nullptr, static_cast<double>(g.rows())};
  with_bool(!training, [&](auto write_eval) {
    using Policy = GradSumsPolicy<dev_t, acc_t, RELU, decltype(write_eval)::value>;
    reduce_and_merge(Policy{x, dy, dx, mean, scale_p, shift, mean_lo_p}, g, x_t, sms, finish, stream);
  });
  if (!training) return;
  launch_elementwise(BatchNormBackward<dev_t, acc_t, RELU>{x, dy, dx, mean, scale_p, shift, mean_dy.const_data_ptr<acc_t>(),
                                                   proj.const_data_ptr<acc_t>(), mean_lo_p, lo.const_data_ptr<acc_t>()},
                     g, sms, stream);
}

}  // namespace
}  // namespace bnext
