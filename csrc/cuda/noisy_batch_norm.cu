// Noisy BatchNorm (the paper's Algorithm 1), CUDA entry points. Same semantics as the CPU path:
//   forward:  BatchNorm's statistics (BatchNormStatsPolicy), then y = s * bn_forward_value(x) + m in one noise
//             pass (s, m drawn per element pair, csrc/common/noise.h);
//   backward: pass 1 draws s again and writes g = dy * s ROUNDED TO THE INPUT DTYPE (the CPU keeps g
//             in dx's memory, in the input dtype, so both sides reduce and differentiate the same
//             g); then BatchNorm's training backward (sums, dx) on g.
// The skeleton: csrc/cuda/reduce.cuh, elementwise.cuh, passes.cuh. The entry points (checks, layout,
// outputs, dispatch) are csrc/entry.h's NoisyBatchNorm<Cuda>.
#include "../entry.h"
#include "passes.cuh"

namespace bnext {
namespace {

// y = s * bn_forward_value(x) + m, s and m in fp32 (as element_noise), the product and sum in acc_t.
// The loads and the per-channel affine are AffineEpilogue's.
template <typename scalar_t, typename acc_t>
struct NoisyBatchNormEpilogue : AffineEpilogue<scalar_t, acc_t, false> {
  __device__ void apply(int64_t i, const acc_t& v, int64_t c, const ElementNoise& e) const {
    const acc_t a = bn_forward_value(v, this->affine(c), false);
    store(this->y + i, static_cast<acc_t>(e.s) * a + static_cast<acc_t>(e.m));
  }
};

}  // namespace

template <>
struct NoisyBatchNormKernels<Cuda> {
  template <typename scalar_t>
  static void forward(ForwardCall& f, double eps, const NoiseSpec& ns) {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    const Geometry& g = f.g;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int sms = sm_count(f.x.device());
    const dev_t* xp = device_ptr<scalar_t>(f.x);
    at::Tensor mean_lo = at::empty({g.C}, f.mean.options());
    reduce_and_merge(BatchNormStatsPolicy<dev_t, acc_t>{xp}, g, f.x, sms,
                     BatchNormStatsFinish<acc_t>{f.mean.mutable_data_ptr<acc_t>(), f.second.mutable_data_ptr<acc_t>(),
                                                 mean_lo.mutable_data_ptr<acc_t>(), eps},
                     stream);
    at::Tensor scale = at::empty({g.C}, f.mean.options());
    launch_channel_scale<acc_t, ScaleOf::kVariance>(f.second, f.w, eps, nullptr, scale, stream);
    const auto noise = channel_noise_vectors(ns, g.C, f.x, stream);
    launch_noise(NoisyBatchNormEpilogue<dev_t, acc_t>{{xp, device_ptr_mut<scalar_t>(f.y), f.mean.const_data_ptr<acc_t>(),
                                                      scale.const_data_ptr<acc_t>(), f.b.const_data_ptr<acc_t>(),
                                                      mean_lo.const_data_ptr<acc_t>()}},
                 g, ns, noise.first, noise.second, 0, sms, stream);
  }

  // g = dy * s (NoiseApplyOp, backward), then BatchNorm's training backward on g.
  template <typename scalar_t>
  static void backward(BackwardCall& c, double eps, const NoiseSpec& ns) {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    const Geometry& g = c.g;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int sms = sm_count(c.x.device());
    const auto noise = channel_noise_vectors(ns, g.C, c.x, stream);
    at::Tensor gs = empty_in_layout(c.x, g);
    launch_noise(NoiseApplyOp<dev_t, acc_t, false>{device_ptr<scalar_t>(c.dy), device_ptr_mut<scalar_t>(gs)}, g, ns,
                 noise.first, noise.second, 0, sms, stream);
    batch_norm_backward_passes<scalar_t, false>(gs, c.x, c.out.dx, g, /*training=*/true, eps, c.w, c.b, c.mean,
                                                c.second, c.out.sum_dy, c.out.sum_dy_xhat);
  }
};

template struct NoisyBatchNorm<Cuda>;

}  // namespace bnext
