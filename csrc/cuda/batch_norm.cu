// BatchNorm (+ fused ReLU), CUDA kernels:
//   forward:  training: BatchNormStatsPolicy reduced and merged into (mean, var) and the residual of
//             the mean (csrc/cuda/reduce.cuh, passes.cuh); then the per-channel scale and one
//             elementwise pass with AffineEpilogue (elementwise.cuh);
//   backward: batch_norm_backward_passes (csrc/cuda/passes.cuh).
// Same semantics as csrc/cpu/batch_norm.cpp. The entry points (checks, layout, outputs, dispatch)
// are csrc/entry.h's BatchNorm<Cuda>.
#include "../entry.h"
#include "passes.cuh"

namespace bnext {

template <>
struct BatchNormKernels<Cuda> {
  template <typename scalar_t, bool RELU>
  static void forward(ForwardCall& f, bool training, double eps) {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    const Geometry& g = f.g;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int sms = sm_count(f.x.device());
    const dev_t* xp = device_ptr<scalar_t>(f.x);
    at::Tensor mean_lo;  // training: the residual of the mean (eval: none)
    if (training) {
      mean_lo = at::empty({g.C}, f.mean.options());
      reduce_and_merge(BatchNormStatsPolicy<dev_t, acc_t>{xp}, g, f.x, sms,
                       BatchNormStatsFinish<acc_t>{f.mean.mutable_data_ptr<acc_t>(), f.second.mutable_data_ptr<acc_t>(),
                                                   mean_lo.mutable_data_ptr<acc_t>(), eps},
                       stream);
    }
    at::Tensor scale = at::empty({g.C}, f.mean.options());
    launch_channel_scale<acc_t, ScaleOf::kVariance>(f.second, f.w, eps, nullptr, scale, stream);
    launch_elementwise(AffineEpilogue<dev_t, acc_t, RELU>{xp, device_ptr_mut<scalar_t>(f.y),
                                                          f.mean.const_data_ptr<acc_t>(),
                                                          scale.const_data_ptr<acc_t>(), f.b.const_data_ptr<acc_t>(),
                                                          training ? mean_lo.const_data_ptr<acc_t>() : nullptr},
                       g, sms, stream);
  }

  template <typename scalar_t, bool RELU>
  static void backward(BackwardCall& c, bool training, double eps) {
    batch_norm_backward_passes<scalar_t, RELU>(c.dy, c.x, c.out.dx, c.g, training, eps, c.w, c.b, c.mean, c.second,
                                               c.out.sum_dy, c.out.sum_dy_xhat);
  }
};

template struct BatchNorm<Cuda>;

}  // namespace bnext
