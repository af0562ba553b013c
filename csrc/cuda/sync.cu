// Synchronized normalization (bnext/distributed.py, csrc/common/sync_math.h), CUDA kernels: local
// BatchNorm statistics as fp64 (mean, m2), local l_p statistics as fp64 (sum x, sum |x|^p or max |x|)
// with the first arg-max, the training dx from the eval dx and all-reduced coefficients, and noisy
// BatchNorm's noise at a global sample offset. Same semantics as csrc/cpu/sync.cpp. The skeleton:
// csrc/cuda/reduce.cuh, elementwise.cuh; the entry points (checks, layout, outputs, dispatch) are
// csrc/entry.h's Sync<Cuda>.
#include "../common/sync_math.h"
#include "../entry.h"
#include "elementwise.cuh"

namespace bnext {
namespace {

// Welford totals (fp64, csrc/cuda/reduce.cuh) -> (mean, m2) for the cross-rank merge.
struct StatsM2Finish {
  double* mean;
  double* m2;
  __device__ void operator()(int64_t c, const WelfordState<double>& s) const {
    mean[c] = s.mean;
    m2[c] = s.m2;
  }
};

// dx = grad_eval - a_c - b_c * dir(x - center_c)
template <typename scalar_t, typename acc_t>
struct SyncBackwardOp {
  struct Item {
    acc_t ge, x;
  };
  const scalar_t* __restrict__ ge;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ dx;
  const acc_t* __restrict__ center;
  const acc_t* __restrict__ a;
  const acc_t* __restrict__ b;
  bool sign;

  __device__ Item load(int64_t i) const { return Item{to_acc(ge[i]), to_acc(x[i])}; }
  __device__ void apply(int64_t i, const Item& v, int64_t c) const {
    store(dx + i, sync_backward_value<acc_t>(v.ge, v.x, center[c], a[c], b[c], sign));
  }
};

// l_p totals (fp64) -> (sum x, sum |x|^p or max |x|) and the arg-max position, for the cross-rank merge.
struct LpSumsFinish {
  double* sum;
  double* power;
  int64_t* argmax;
  LpKind p;
  __device__ void operator()(int64_t c, const LpState<double>& s) const {
    sum[c] = s.sum;
    power[c] = p == LpKind::kLinf ? s.max.max : s.pow;
    argmax[c] = p == LpKind::kLinf ? s.max.index : -1;
  }
};

}  // namespace

template <>
struct SyncKernels<Cuda> {
  template <typename scalar_t>
  static void batch_norm_stats(const at::Tensor& x, const Geometry& g, at::Tensor& mean, at::Tensor& m2) {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    reduce_and_merge(BatchNormStatsPolicy<dev_t, acc_t>{device_ptr<scalar_t>(x)}, g, x, sm_count(x.device()),
                     StatsM2Finish{mean.mutable_data_ptr<double>(), m2.mutable_data_ptr<double>()},
                     c10::cuda::getCurrentCUDAStream());
  }

  template <typename scalar_t>
  static void lp_norm_stats(const at::Tensor& x, const Geometry& g, LpKind kind, at::Tensor& sum, at::Tensor& power,
                            at::Tensor& argmax) {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    with_lp_kind(kind, [&](auto P) {
      reduce_and_merge(LpNormStatsPolicy<dev_t, acc_t, decltype(P)::value>{device_ptr<scalar_t>(x)}, g, x,
                       sm_count(x.device()),
                       LpSumsFinish{sum.mutable_data_ptr<double>(), power.mutable_data_ptr<double>(),
                                           argmax.mutable_data_ptr<int64_t>(), kind},
                       c10::cuda::getCurrentCUDAStream());
    });
  }

  template <typename scalar_t>
  static void sync_backward_elementwise(const at::Tensor& ge, const at::Tensor& x, const Geometry& g, at::Tensor& dx,
                                        const at::Tensor& center, const at::Tensor& a, const at::Tensor& b, bool sign) {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    launch_elementwise(SyncBackwardOp<dev_t, acc_t>{device_ptr<scalar_t>(ge), device_ptr<scalar_t>(x),
                                                   device_ptr_mut<scalar_t>(dx), center.const_data_ptr<acc_t>(),
                                                   a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), sign},
                       g, sm_count(x.device()), c10::cuda::getCurrentCUDAStream());
  }

  template <typename scalar_t, bool FORWARD>
  static void noise_apply(const at::Tensor& x, const Geometry& g, at::Tensor& y, const NoiseSpec& ns, int64_t n0) {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const auto noise_c = channel_noise_vectors(ns, g.C, x, stream);
    launch_noise(NoiseApplyOp<dev_t, acc_t, FORWARD>{device_ptr<scalar_t>(x), device_ptr_mut<scalar_t>(y)}, g, ns,
                 noise_c.first, noise_c.second, n0, sm_count(x.device()), stream);
  }
};

template struct Sync<Cuda>;

}  // namespace bnext
