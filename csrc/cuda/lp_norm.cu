// l_p normalization (p = 1, 2, inf), CUDA entry points. Same semantics and the same per-channel
// formulas as the CPU path (csrc/common/lp_norm_math.h):
//   forward:  statistics = LpStatsPolicy (sum x, sum |x|^p or the first max |x|); then BatchNorm's
//             elementwise pass with invstd := inv = 1 / (N + eps), formed in fp64 and rounded to
//             acc_t, and scale = inv * w in acc_t;
//   backward: BatchNorm's sums (GradPolicy); sum_dy_xhat = sum_dy_xc * inv; training dx from
//             lp_backward_coeffs (mean_dy, q, coeff = w / (N + eps)). For p = inf dir(x) is zero off
//             the arg-max, so the elementwise pass does not read x, and one thread per channel then
//             rewrites the arg-max element (as the CPU's finish step).
// The passes and kernels: csrc/cuda/normalization.cuh.
#include "normalization.cuh"

namespace bnext {
namespace {

template <typename acc_t>
struct LpStatsFinish {
  acc_t* mean;
  acc_t* norm;
  int64_t* argmax;
  double M;
  LpKind p;
  __device__ void operator()(int64_t c, const LpState<acc_t>& s) const {
    mean[c] = static_cast<acc_t>(static_cast<double>(s.sum) / M);
    norm[c] = static_cast<acc_t>(lp_norm_value(p, static_cast<double>(s.pow), static_cast<double>(s.max.max), M));
    argmax[c] = p == LpKind::kLinf ? s.max.index : -1;
  }
};

// inv = 1 / (N + eps) in fp64, rounded to acc_t; scale = inv * w in acc_t (CPU: lp_params).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
lp_channel_scale_kernel(const acc_t* __restrict__ norm, const acc_t* __restrict__ weight, double eps, int64_t C,
                        acc_t* __restrict__ inv_out, acc_t* __restrict__ scale) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc_t inv = static_cast<acc_t>(1.0 / (static_cast<double>(norm[c]) + eps));
    if (inv_out != nullptr) inv_out[c] = inv;
    scale[c] = inv * weight[c];
  }
}

template <typename acc_t>
void launch_lp_scale(const at::Tensor& norm, const at::Tensor& weight, double eps, acc_t* inv, at::Tensor& scale,
                     cudaStream_t stream) {
  const int64_t C = norm.numel();
  lp_channel_scale_kernel<acc_t><<<channel_blocks(C), kThreads, 0, stream>>>(
      norm.const_data_ptr<acc_t>(), weight.const_data_ptr<acc_t>(), eps, C, inv, scale.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per channel: sum_dy, sum_dy_xhat = sum_dy_xc * inv (CPU: write_grad_sums); training also the dx
// coefficients of lp_backward_coeffs.
template <typename acc_t>
struct LpGradFinish {
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
  __device__ void operator()(int64_t c, const GradSums<acc_t>& s) const {
    sum_dy[c] = s.dy;
    sum_dy_xhat[c] = static_cast<acc_t>(static_cast<double>(s.dy_xc) * static_cast<double>(inv[c]));
    if (mean_dy != nullptr) {
      const LpBackward<acc_t> k = lp_backward_coeffs<acc_t>(p, s.dy, s.dy_xc, norm[c], eps, weight[c], M, argmax_in[c]);
      mean_dy[c] = k.mean_dy;
      q[c] = k.q;
      coeff[c] = k.coeff;
    }
  }
};

// Training dx = (g - mean_dy - q * dir(x)) * coeff; p = inf: (g - mean_dy) * coeff (the arg-max
// element is rewritten by linf_argmax_kernel).
template <typename scalar_t, typename acc_t, LpKind P>
struct LpBackwardOp {
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
void lp_forward_impl(const at::Tensor& x, at::Tensor& y, const Geometry& g, bool training, double eps,
                     const at::Tensor& weight, const at::Tensor& bias, at::Tensor& mean, at::Tensor& norm,
                     at::Tensor& argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  using dev_t = typename DeviceScalar<scalar_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.device());
  const dev_t* xp = device_ptr<scalar_t>(x);
  if (training) {
    reduce_and_merge(LpStatsPolicy<dev_t, acc_t, P>{xp}, g, x, sms,
                     LpStatsFinish<acc_t>{mean.mutable_data_ptr<acc_t>(), norm.mutable_data_ptr<acc_t>(),
                                          argmax.mutable_data_ptr<int64_t>(), static_cast<double>(g.rows()), P},
                     stream);
  }
  at::Tensor scale = at::empty({g.C}, mean.options());
  launch_lp_scale<acc_t>(norm, weight, eps, nullptr, scale, stream);
  launch_elementwise(ForwardOp<dev_t, acc_t, false>{xp, device_ptr_mut<scalar_t>(y), mean.const_data_ptr<acc_t>(),
                                                   scale.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>()},
                     g, sms, stream);
}

template <typename scalar_t, LpKind P>
void lp_backward_impl(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const Geometry& g,
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
  launch_lp_scale<acc_t>(norm_t, weight, eps, inv.mutable_data_ptr<acc_t>(), scale, stream);
  const acc_t* scale_p = scale.const_data_ptr<acc_t>();
  at::Tensor mean_dy, q, coeff;
  if (training) {
    mean_dy = at::empty({g.C}, mean_t.options());
    q = at::empty({g.C}, mean_t.options());
    coeff = at::empty({g.C}, mean_t.options());
  }
  const LpGradFinish<acc_t> finish{norm_t.const_data_ptr<acc_t>(), inv.const_data_ptr<acc_t>(),
                                   weight.const_data_ptr<acc_t>(), argmax_t.const_data_ptr<int64_t>(),
                                   sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xhat.mutable_data_ptr<acc_t>(),
                                   training ? mean_dy.mutable_data_ptr<acc_t>() : nullptr,
                                   training ? q.mutable_data_ptr<acc_t>() : nullptr,
                                   training ? coeff.mutable_data_ptr<acc_t>() : nullptr, eps,
                                   static_cast<double>(g.rows()), P};
  with_bool(!training, [&](auto write_eval) {
    using Policy = GradPolicy<dev_t, acc_t, false, decltype(write_eval)::value>;
    reduce_and_merge(Policy{x, dy, dx, mean, scale_p, bias.const_data_ptr<acc_t>()}, g, x_t, sms, finish, stream);
  });
  if (!training) return;
  launch_elementwise(LpBackwardOp<dev_t, acc_t, P>{x, dy, dx, mean_dy.const_data_ptr<acc_t>(), q.const_data_ptr<acc_t>(),
                                                   coeff.const_data_ptr<acc_t>()},
                     g, sms, stream);
  if (P != LpKind::kLinf) return;
  linf_argmax_kernel<dev_t, acc_t><<<channel_blocks(g.C), kThreads, 0, stream>>>(
      x, dy, dx, argmax_t.const_data_ptr<int64_t>(), mean_dy.const_data_ptr<acc_t>(), q.const_data_ptr<acc_t>(),
      coeff.const_data_ptr<acc_t>(), g.C, g.S, g.rows(), g.interleaved);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> lp_norm_forward_cuda(
    const Tensor& input, double p, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_norm, bool training, double eps) {
  check_cuda_input(input, "lp_norm");
  check_forward_args("lp_norm", input, weight, bias, running_mean, running_norm, "running_norm", eps);
  const LpKind kind = lp_kind(p);
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  Tensor y = empty_in_layout(x, g);
  Tensor mean, norm;
  std::tie(mean, norm) = forward_statistics(input, g.C, training, running_mean, running_norm,
                                            "bnext.lp_norm: running_mean and running_norm");
  Tensor argmax = at::full({g.C}, -1, input.options().dtype(at::kLong));
  if (g.numel() == 0) return {y, mean, norm, argmax};
  const Tensor w = channel_vector(weight, g.C, acc, input.device(), 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, input.device(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_lp_norm_forward_cuda", [&] {
    with_lp_kind(kind, [&](auto P) {
      lp_forward_impl<scalar_t, decltype(P)::value>(x, y, g, training, eps, w, b, mean, norm, argmax);
    });
  });
  return {y, mean, norm, argmax};
}

std::tuple<Tensor, Tensor, Tensor> lp_norm_backward_cuda(
    const Tensor& grad_out, const Tensor& input, double p, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& norm, const Tensor& argmax, bool training,
    double eps) {
  check_cuda_input(input, "lp_norm");
  check_backward_args("lp_norm", grad_out, input, weight, bias, mean, norm, "norm", eps);
  const LpKind kind = lp_kind(p);
  // Shape, dtype and device here; the values (positions) in linf_argmax_kernel, without a sync.
  check_lp_argmax(argmax, input, /*check_values=*/false);
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  BackwardOutputs out = backward_outputs(x, g);
  if (g.numel() == 0) return out.tuple();
  const Tensor w = channel_vector(weight, g.C, acc, input.device(), 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, input.device(), 0.0);
  const Tensor m = mean.to(acc).contiguous();
  const Tensor n = norm.to(acc).contiguous();
  const Tensor am = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_lp_norm_backward_cuda", [&] {
    with_lp_kind(kind, [&](auto P) {
      lp_backward_impl<scalar_t, decltype(P)::value>(dy, x, out.dx, g, training, eps, w, b, m, n, am, out.sum_dy,
                                                     out.sum_dy_xhat);
    });
  });
  return out.tuple();
}

}  // namespace bnext
