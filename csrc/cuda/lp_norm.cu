// l_p normalization (p = 1, 2, inf), CUDA kernels. Same semantics and the same per-channel
// formulas as the CPU path (csrc/common/lp_norm_math.h):
//   forward:  statistics = LpNormStatsPolicy (sum x, sum |x|^p or the first max |x|, fp64 totals);
//             then BatchNorm's elementwise pass with the mean's residual (always carried, as
//             csrc/cpu/lp_norm.cpp does) and invstd := inv = 1 / (N + eps), formed in fp64 and
//             rounded to acc_t, and scale = inv * w in acc_t;
//   backward: BatchNorm's sums (GradSumsPolicy; training recentres them, bn_recentre);
//             sum_dy_xhat = sum_dy_xc * inv; training dx from lp_backward_coeffs (mean_dy, q,
//             coeff = w / (N + eps)). For p = inf dir(x) is zero off
//             the arg-max, so the elementwise pass does not read x, and one thread per channel then
//             rewrites the arg-max element (as the CPU's finish step).
// The skeleton: csrc/cuda/reduce.cuh, elementwise.cuh, passes.cuh. The entry points (checks, layout,
// outputs, dispatch) are csrc/entry.h's LpNorm<Cuda>.
#include "../entry.h"
#include "passes.cuh"

namespace bnext {
namespace {

// mean, N and the arg-max from the fp64 totals; mean_lo = the residual of the mean.
template <typename acc_t>
struct LpNormStatsFinish {
  acc_t* mean;
  acc_t* norm;
  int64_t* argmax;
  acc_t* mean_lo;
  double M;
  LpKind p;
  __device__ void operator()(int64_t c, const LpState<double>& s) const {
    const double mean64 = s.sum / M;
    mean[c] = static_cast<acc_t>(mean64);
    mean_lo[c] = bn_mean_residual(mean64, mean[c], acc_t(0), true);
    norm[c] = static_cast<acc_t>(lp_norm_value(p, s.pow, s.max.max, M));
    argmax[c] = p == LpKind::kLinf ? s.max.index : -1;
  }
};

// Per channel: sum_dy, sum_dy_xhat = sum_dy_xc * inv (CPU: write_grad_sums); training also the dx
// coefficients of lp_backward_coeffs, from the sums recentred on the batch mean (bn_recentre; l_p's
// dx does not centre x, so the residual itself is not needed).
template <typename acc_t>
struct LpNormGradFinish {
  const acc_t* mean;
  const acc_t* norm;
  const acc_t* inv;
  const acc_t* weight;
  const int64_t* argmax_in;
  acc_t* sum_dy;
  acc_t* sum_dy_xhat;
  acc_t* mean_dy;  // null in eval
  acc_t* q;        // null in eval
  acc_t* coeff;    // null in eval
  double eps, M;
  LpKind p;
  __device__ void operator()(int64_t c, const GradSums<double>& s) const {
    double s_dy_xc = s.dy_xc;
    if (mean_dy != nullptr) bn_recentre(mean[c], M, s.dy, s.xc, &s_dy_xc);
    sum_dy[c] = static_cast<acc_t>(s.dy);
    sum_dy_xhat[c] = static_cast<acc_t>(s_dy_xc * static_cast<double>(inv[c]));
    if (mean_dy != nullptr) {
      const LpBackward<acc_t> k = lp_backward_coeffs<acc_t>(p, s.dy, s_dy_xc, norm[c], eps, weight[c], M, argmax_in[c]);
      mean_dy[c] = k.mean_dy;
      q[c] = k.q;
      coeff[c] = k.coeff;
    }
  }
};

// Training dx = (g - mean_dy - q * dir(x)) * coeff; p = inf: (g - mean_dy) * coeff (the arg-max
// element is rewritten by linf_argmax_kernel).
template <typename scalar_t, typename acc_t, LpKind P>
struct LpNormBackward {
  struct Item {
    acc_t x, dy;
  };
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ dy;
  scalar_t* __restrict__ dx;
  const acc_t* __restrict__ mean_dy;
  const acc_t* __restrict__ q;
  const acc_t* __restrict__ coeff;

  __device__ Item load(int64_t i) const {
    return Item{P == LpKind::kLinf ? acc_t(0) : to_acc(x[i]), to_acc(dy[i])};
  }
  __device__ void apply(int64_t i, const Item& v, int64_t c) const {
    if (P == LpKind::kLinf) {
      store(dx + i, (v.dy - mean_dy[c]) * coeff[c]);
    } else {
      const LpBackward<acc_t> k{mean_dy[c], q[c], coeff[c], int64_t(-1)};
      store(dx + i, lp_backward_train_value(v.dy, v.x, int64_t(-1), k, P));
    }
  }
};

// p = inf, training: the arg-max element of each channel, dx = (g - mean_dy - q sign(x)) * coeff.
// An arg-max outside [-1, M) (only a raw call of the backward op can pass one: the Python API hands
// over what the forward returned) fails a device-side assertion, as torch's own index kernels do:
// raising from the host would need a device sync on every backward.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
linf_argmax_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, scalar_t* __restrict__ dx,
                   const int64_t* __restrict__ argmax, const acc_t* __restrict__ mean_dy, const acc_t* __restrict__ q,
                   const acc_t* __restrict__ coeff, int64_t C, int64_t S, int64_t M, bool interleaved) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t pos = argmax[c];
    CUDA_KERNEL_ASSERT_MSG(pos >= -1 && pos < M, "bnext.lp_norm backward: argmax is not a position in its channel");
    if (pos < 0 || pos >= M) continue;
    const int64_t off = interleaved ? pos * C + c : ((pos / S) * C + c) * S + pos % S;
    const LpBackward<acc_t> k{mean_dy[c], q[c], coeff[c], pos};
    store(dx + off, lp_backward_train_value(to_acc(dy[off]), to_acc(x[off]), pos, k, LpKind::kLinf));
  }
}

template <typename scalar_t, LpKind P>
void lp_norm_forward_passes(const at::Tensor& x, at::Tensor& y, const Geometry& g, bool training, double eps,
                     const at::Tensor& weight, const at::Tensor& bias, at::Tensor& mean, at::Tensor& norm,
                     at::Tensor& argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  using dev_t = typename DeviceScalar<scalar_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.device());
  const dev_t* xp = device_ptr<scalar_t>(x);
  at::Tensor mean_lo;  // training: the residual of the mean (eval: none)
  if (training) {
    mean_lo = at::empty({g.C}, mean.options());
    reduce_and_merge(LpNormStatsPolicy<dev_t, acc_t, P>{xp}, g, x, sms,
                     LpNormStatsFinish<acc_t>{mean.mutable_data_ptr<acc_t>(), norm.mutable_data_ptr<acc_t>(),
                                          argmax.mutable_data_ptr<int64_t>(), mean_lo.mutable_data_ptr<acc_t>(),
                                          static_cast<double>(g.rows()), P},
                     stream);
  }
  at::Tensor scale = at::empty({g.C}, mean.options());
  launch_channel_scale<acc_t, ScaleOf::kNorm>(norm, weight, eps, nullptr, scale, stream);
  launch_elementwise(AffineEpilogue<dev_t, acc_t, false>{xp, device_ptr_mut<scalar_t>(y), mean.const_data_ptr<acc_t>(),
                                                   scale.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(),
                                                   training ? mean_lo.const_data_ptr<acc_t>() : nullptr},
                     g, sms, stream);
}

template <typename scalar_t, LpKind P>
void lp_norm_backward_passes(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const Geometry& g,
                      bool training, double eps, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& mean_t, const at::Tensor& norm_t, const at::Tensor& argmax_t,
                      at::Tensor& sum_dy, at::Tensor& sum_dy_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  using dev_t = typename DeviceScalar<scalar_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x_t.device());
  const dev_t* x = device_ptr<scalar_t>(x_t);
  const dev_t* dy = device_ptr<scalar_t>(dy_t);
  dev_t* dx = device_ptr_mut<scalar_t>(dx_t);
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  at::Tensor inv = at::empty({g.C}, mean_t.options()), scale = at::empty({g.C}, mean_t.options());
  launch_channel_scale<acc_t, ScaleOf::kNorm>(norm_t, weight, eps, inv.mutable_data_ptr<acc_t>(), scale, stream);
  const acc_t* scale_p = scale.const_data_ptr<acc_t>();
  at::Tensor mean_dy, q, coeff;
  if (training) {
    mean_dy = at::empty({g.C}, mean_t.options());
    q = at::empty({g.C}, mean_t.options());
    coeff = at::empty({g.C}, mean_t.options());
  }
  const LpNormGradFinish<acc_t> finish{mean, norm_t.const_data_ptr<acc_t>(), inv.const_data_ptr<acc_t>(),
                                   weight.const_data_ptr<acc_t>(), argmax_t.const_data_ptr<int64_t>(),
                                   sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xhat.mutable_data_ptr<acc_t>(),
                                   training ? mean_dy.mutable_data_ptr<acc_t>() : nullptr,
                                   training ? q.mutable_data_ptr<acc_t>() : nullptr,
                                   training ? coeff.mutable_data_ptr<acc_t>() : nullptr, eps,
                                   static_cast<double>(g.rows()), P};
  with_bool(!training, [&](auto write_eval) {
    using Policy = GradSumsPolicy<dev_t, acc_t, false, decltype(write_eval)::value>;
    reduce_and_merge(Policy{x, dy, dx, mean, scale_p, bias.const_data_ptr<acc_t>()}, g, x_t, sms, finish, stream);
  });
  if (!training) return;
  launch_elementwise(LpNormBackward<dev_t, acc_t, P>{x, dy, dx, mean_dy.const_data_ptr<acc_t>(), q.const_data_ptr<acc_t>(),
                                                   coeff.const_data_ptr<acc_t>()},
                     g, sms, stream);
  if (P != LpKind::kLinf) return;
  launch(linf_argmax_kernel<dev_t, acc_t>, channel_blocks(g.C), kThreads, 0, stream,
      x, dy, dx, argmax_t.const_data_ptr<int64_t>(), mean_dy.const_data_ptr<acc_t>(), q.const_data_ptr<acc_t>(),
      coeff.const_data_ptr<acc_t>(), g.C, g.S, g.rows(), g.interleaved);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <>
struct LpNormKernels<Cuda> {
  template <typename scalar_t>
  static void forward(ForwardCall& f, at::Tensor& argmax, LpKind kind, bool training, double eps) {
    with_lp_kind(kind, [&](auto P) {
      lp_norm_forward_passes<scalar_t, decltype(P)::value>(f.x, f.y, f.g, training, eps, f.w, f.b, f.mean, f.second, argmax);
    });
  }

  template <typename scalar_t>
  static void backward(BackwardCall& c, const at::Tensor& argmax, LpKind kind, bool training, double eps) {
    with_lp_kind(kind, [&](auto P) {
      lp_norm_backward_passes<scalar_t, decltype(P)::value>(c.dy, c.x, c.out.dx, c.g, training, eps, c.w, c.b, c.mean,
                                                     c.second, argmax, c.out.sum_dy, c.out.sum_dy_xhat);
    });
  }
};

template struct LpNorm<Cuda>;

}  // namespace bnext
