// Synchronized normalization (bnext/distributed.py, csrc/common/sync_math.h), CUDA entry points:
// local statistics as fp64 (mean, m2), the training dx from the eval dx and all-reduced
// coefficients, and noisy BatchNorm's noise at a global sample offset. Same semantics as
// csrc/cpu/sync_normalization.cpp. The passes and kernels: csrc/cuda/normalization.cuh.
#include "normalization.cuh"

namespace bnext {
namespace {

// Welford totals -> fp64 (mean, m2) for the cross-rank merge.
template <typename acc_t>
struct StatsM2Finish {
  double* mean;
  double* m2;
  __device__ void operator()(int64_t c, const WelfordState<acc_t>& s) const {
    mean[c] = static_cast<double>(s.mean);
    m2[c] = static_cast<double>(s.m2);
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

// FORWARD: y = s * x + m; else y = x * s; element (n, c, s) drawn at global sample n0 + n (the
// sample offset goes to launch_noise).
template <typename scalar_t, typename acc_t, bool FORWARD>
struct NoiseApplyOp {
  using Item = acc_t;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;

  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  __device__ void apply(int64_t i, const Item& v, int64_t, const ElementNoise& e) const {
    if (FORWARD) store(y + i, static_cast<acc_t>(e.s) * v + static_cast<acc_t>(e.m));
    else store(y + i, v * static_cast<acc_t>(e.s));
  }
};

// l_p totals -> fp64 (sum x, sum |x|^p or max |x|) and the arg-max position, for the cross-rank merge.
template <typename acc_t>
struct LpSumsFinish {
  double* sum;
  double* power;
  int64_t* argmax;
  LpKind p;
  __device__ void operator()(int64_t c, const LpState<acc_t>& s) const {
    sum[c] = static_cast<double>(s.sum);
    power[c] = static_cast<double>(p == LpKind::kLinf ? s.max.max : s.pow);
    argmax[c] = p == LpKind::kLinf ? s.max.index : -1;
  }
};

Tensor sync_channel_acc(const Tensor& t, const char* name, const Tensor& input) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), "bnext.sync_backward_elementwise: ", name,
              " must be a 1-D tensor with one value per channel (", input.size(1), "), got shape ", t.sizes());
  check_same_device(t, name, input);
  return t.to(acc_dtype(input.scalar_type())).contiguous();
}

}  // namespace

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input) {
  check_input(input);
  TORCH_CHECK(input.is_cuda(), "bnext: the CUDA kernel got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor mean = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor m2 = at::zeros({g.C}, input.options().dtype(at::kDouble));
  if (g.numel() == 0) return {mean, m2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    reduce_and_merge(StatsPolicy<dev_t, acc_t>{device_ptr<scalar_t>(x)}, g, x, sm_count(x.device()),
                     StatsM2Finish<acc_t>{mean.mutable_data_ptr<double>(), m2.mutable_data_ptr<double>()},
                     c10::cuda::getCurrentCUDAStream());
  });
  return {mean, m2};
}

Tensor sync_backward_elementwise_cuda(const Tensor& grad_eval, const Tensor& input, const Tensor& center,
                                      const Tensor& a, const Tensor& b, bool sign) {
  check_input(input);
  TORCH_CHECK(input.is_cuda(), "bnext: the CUDA kernel got input on ", input.device());
  TORCH_CHECK(grad_eval.sizes() == input.sizes() && grad_eval.scalar_type() == input.scalar_type(),
              "bnext.sync_backward_elementwise: grad_eval must match input in shape and dtype, got ",
              grad_eval.sizes(), " ", grad_eval.scalar_type(), " vs ", input.sizes(), " ", input.scalar_type());
  check_same_device(grad_eval, "grad_eval", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor cc = sync_channel_acc(center, "center", input), ac = sync_channel_acc(a, "a", input),
               bc = sync_channel_acc(b, "b", input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor ge = match_layout(grad_eval, g);
  Tensor dx = empty_in_layout(x, g);
  if (g.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_sync_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    launch_elementwise(SyncBackwardOp<dev_t, acc_t>{device_ptr<scalar_t>(ge), device_ptr<scalar_t>(x),
                                                   device_ptr_mut<scalar_t>(dx), cc.const_data_ptr<acc_t>(),
                                                   ac.const_data_ptr<acc_t>(), bc.const_data_ptr<acc_t>(), sign},
                       g, sm_count(x.device()), c10::cuda::getCurrentCUDAStream());
  });
  return dx;
}

Tensor noise_apply_cuda(const Tensor& input, const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels,
                        int64_t sample_offset, bool forward) {
  check_input(input);
  TORCH_CHECK(input.is_cuda(), "bnext: the CUDA kernel got input on ", input.device());
  TORCH_CHECK(sample_offset >= 0, "bnext.noise_apply: sample_offset must be >= 0, got ", sample_offset);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor y = empty_in_layout(x, g);
  if (g.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto noise_c = channel_noise_vectors(ns, g.C, x, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_noise_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    with_bool(forward, [&](auto FWD) {
      launch_noise(NoiseApplyOp<dev_t, acc_t, decltype(FWD)::value>{device_ptr<scalar_t>(x), device_ptr_mut<scalar_t>(y)},
                   g, ns, noise_c.first, noise_c.second, sample_offset, sm_count(x.device()), stream);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> lp_norm_stats_cuda(const Tensor& input, double p) {
  check_input(input);
  TORCH_CHECK(input.is_cuda(), "bnext: the CUDA kernel got input on ", input.device());
  const LpKind kind = lp_kind(p);
  const c10::cuda::CUDAGuard guard(input.device());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor sum = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor power = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor argmax = at::full({g.C}, -1, input.options().dtype(at::kLong));
  if (g.numel() == 0) return {sum, power, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_lp_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using dev_t = typename DeviceScalar<scalar_t>::type;
    with_lp_kind(kind, [&](auto P) {
      reduce_and_merge(LpStatsPolicy<dev_t, acc_t, decltype(P)::value>{device_ptr<scalar_t>(x)}, g,
                       x, sm_count(x.device()),
                       LpSumsFinish<acc_t>{sum.mutable_data_ptr<double>(), power.mutable_data_ptr<double>(),
                                           argmax.mutable_data_ptr<int64_t>(), kind},
                       c10::cuda::getCurrentCUDAStream());
    });
  });
  return {sum, power, argmax};
}

}  // namespace bnext
