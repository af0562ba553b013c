// Noisy BatchNorm and l_p normalization, CPU. Both run on BatchNorm's fused kernels
// (csrc/cpu/normalization.cpp, called through ops.h) plus the passes that differ:
//
//   noisy BN forward:   batch_norm_forward_cpu(training)             (statistics + affine)
//                       -> noise pass, in place: y = s * y + m
//   noisy BN backward:  g = dy * s (s regenerated from the seed)
//                       -> batch_norm_backward_cpu(g, training)       (sums + dx)
//   l_p forward:        l_p statistics pass (sum x; sum |x|^p or first max |x|)
//                       -> batch_norm_forward_cpu(eval, mean, var := (N + eps)^2, eps = 0): the
//                          elementwise (x - mean) * w / (N + eps) + b
//   l_p backward:       batch_norm_backward_cpu(eval, same stand-in statistics): sums of g and
//                          g * xhat and dx = g * w / (N + eps) in one pass
//                       -> training: correction pass dx -= (mean_dy + q * dir(x)) * w / (N + eps)
//                          (csrc/common/lp_norm_math.h)
// The per-element math is in the torch-free headers the CUDA kernels call too
// (csrc/common/noise.h, csrc/common/lp_norm_math.h).
//
// Determinism: the l_p statistics are reduced per (n, c) run (planar) or per fixed-size row chunk
// (interleaved), in the accumulation type over short segments, merged in fp64 in a fixed order, so
// results do not depend on the thread count. The noise is a pure function of (seed, logical index).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/lp_norm_math.h"
#include "../common/noise.h"
#include "../layout.h"
#include "../ops.h"
#include "isa.h"

namespace bnext {
namespace {

constexpr int64_t kSegment = 2048;       // values reduced in acc_t before an fp64 merge
constexpr int64_t kChunkElems = 1 << 15;  // values per parallel task
constexpr int64_t kLanes = 16;            // independent accumulators of a reduction

inline int64_t runs_per_task(const Geometry& g) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.S, 1)); }
inline int64_t rows_per_task(const Geometry& g) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.C, 1)); }

// ---------------------------------------------------------------------------------------------
// l_p statistics
// ---------------------------------------------------------------------------------------------

struct LpPartial {
  double sum = 0, pow = 0;
  MaxAbs<double> max = maxabs_init<double>();
};

inline void lp_merge(LpPartial& a, const LpPartial& b) {
  a.sum += b.sum;
  a.pow += b.pow;
  a.max = maxabs_merge(a.max, b.max);
}

// One contiguous run of a planar channel; `pos0` is the position of x[0] within the channel.
template <typename scalar_t, typename acc_t, LpKind P>
LpPartial lp_run_stats(const scalar_t* x, int64_t len, int64_t pos0) {
  LpPartial out;
  for (int64_t s0 = 0; s0 < len; s0 += kSegment) {
    const int64_t n = std::min(kSegment, len - s0);
    const scalar_t* xs = x + s0;
    acc_t sum[kLanes] = {}, pw[kLanes] = {};
    if (P == LpKind::kLinf) {
      acc_t mx[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) mx[j] = acc_t(-1);
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const acc_t v = static_cast<acc_t>(xs[i + j]);
          sum[j] += v;
          const acc_t a = std::abs(v);
          mx[j] = maxabs_beats(a, mx[j]) ? a : mx[j];
        }
      }
      for (int64_t j = 0; i + j < n; ++j) {
        const acc_t v = static_cast<acc_t>(xs[i + j]);
        sum[j] += v;
        mx[j] = maxabs_beats(std::abs(v), mx[j]) ? std::abs(v) : mx[j];
      }
      acc_t best = acc_t(-1);
      for (int64_t j = 0; j < kLanes; ++j) best = maxabs_beats(mx[j], best) ? mx[j] : best;
      // The first element of the segment attaining the maximum (a short scan, in cache).
      MaxAbs<double> m = maxabs_init<double>();
      if (!(best < acc_t(0))) {
        for (int64_t k = 0; k < n; ++k) {
          if (maxabs_same(std::abs(static_cast<acc_t>(xs[k])), best)) {
            m = MaxAbs<double>{static_cast<double>(best), pos0 + s0 + k};
            break;
          }
        }
      }
      out.max = maxabs_merge(out.max, m);
    } else {
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const acc_t v = static_cast<acc_t>(xs[i + j]);
          sum[j] += v;
          pw[j] += lp_power(v, P);
        }
      }
      for (int64_t j = 0; i + j < n; ++j) {
        const acc_t v = static_cast<acc_t>(xs[i + j]);
        sum[j] += v;
        pw[j] += lp_power(v, P);
      }
    }
    acc_t s = 0, q = 0;
    for (int64_t j = 0; j < kLanes; ++j) s += sum[j], q += pw[j];
    out.sum += s;
    out.pow += q;
  }
  return out;
}

// Rows [r0, r1) of an interleaved (M, C) array, per channel.
template <typename scalar_t, typename acc_t, LpKind P>
void lp_rows_stats(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, double* sum, double* pw, acc_t* mx,
                   int64_t* arg, LpPartial* out) {
  for (int64_t c = 0; c < C; ++c) sum[c] = 0, pw[c] = 0, mx[c] = acc_t(-1), arg[c] = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C;
    if (P == LpKind::kLinf) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(row[c]);
        sum[c] += v;
        const acc_t a = std::abs(v);
        const bool better = maxabs_beats(a, mx[c]);  // strict: rows arrive in increasing position
        mx[c] = better ? a : mx[c];
        arg[c] = better ? r : arg[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(row[c]);
        sum[c] += v;
        pw[c] += lp_power(v, P);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    out[c].sum = sum[c];
    out[c].pow = pw[c];
    out[c].max = arg[c] >= 0 ? MaxAbs<double>{static_cast<double>(mx[c]), arg[c]} : maxabs_init<double>();
  }
}

template <typename scalar_t, LpKind P>
std::vector<LpPartial> lp_stats(const scalar_t* x, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  std::vector<LpPartial> total(C);
  if (!g.interleaved) {
    std::vector<LpPartial> per_run(g.N * C);
    isa::parallel_for(0, g.N * C, runs_per_task(g), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) per_run[r] = lp_run_stats<scalar_t, acc_t, P>(x + r * g.S, g.S, (r / C) * g.S);
    });
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < C; ++c) lp_merge(total[c], per_run[n * C + c]);
    return total;
  }
  // Chunks of at most kSegment-ish rows keep the acc_t sums short.
  const int64_t M = g.rows(), rpc = std::min<int64_t>(kSegment, rows_per_task(g));
  const int64_t nchunks = (M + rpc - 1) / rpc;
  std::vector<LpPartial> partial(nchunks * C);
  isa::parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> sum(C), pw(C);  // double: fp32 sums of up to kSegment rows lose the mean at |mean| >> std
    std::vector<acc_t> mx(C);
    std::vector<int64_t> arg(C);
    for (int64_t b = b0; b < b1; ++b) {
      lp_rows_stats<scalar_t, acc_t, P>(x, C, b * rpc, std::min(M, (b + 1) * rpc), sum.data(), pw.data(), mx.data(),
                                        arg.data(), &partial[b * C]);
    }
  });
  for (int64_t b = 0; b < nchunks; ++b)
    for (int64_t c = 0; c < C; ++c) lp_merge(total[c], partial[b * C + c]);
  return total;
}

template <typename F>
void with_lp_kind(LpKind p, F&& f) {
  switch (p) {
    case LpKind::kL1: f(std::integral_constant<LpKind, LpKind::kL1>{}); break;
    case LpKind::kL2: f(std::integral_constant<LpKind, LpKind::kL2>{}); break;
    case LpKind::kLinf: f(std::integral_constant<LpKind, LpKind::kLinf>{}); break;
  }
}

// l_p backward correction (training): dx -= (mean_dy + q * dir(x)) * coeff, dx holding g * coeff.
template <typename scalar_t, LpKind P>
void lp_correct_dx(const scalar_t* x, scalar_t* dx, const Geometry& g, const std::vector<LpBackward<double>>& kd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  std::vector<acc_t> mdy(C), q(C), coeff(C);
  for (int64_t c = 0; c < C; ++c) {
    mdy[c] = static_cast<acc_t>(kd[c].mean_dy * kd[c].coeff);
    q[c] = static_cast<acc_t>(kd[c].q * kd[c].coeff);
    coeff[c] = static_cast<acc_t>(kd[c].coeff);
  }
  auto dir = [](acc_t xv) -> acc_t {
    if (P == LpKind::kL2) return xv;
    return xv > acc_t(0) ? acc_t(1) : (xv < acc_t(0) ? acc_t(-1) : acc_t(0));
  };
  if (P == LpKind::kLinf) {
    // Only the arg-max element of each channel differs from g * coeff - mean_dy * coeff.
    if (!g.interleaved) {
      isa::parallel_for(0, g.N * C, runs_per_task(g), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* d = dx + r * g.S;
          const acc_t m = mdy[r % C];
#pragma omp simd
          for (int64_t s = 0; s < g.S; ++s) d[s] = static_cast<scalar_t>(static_cast<acc_t>(d[s]) - m);
        }
      });
    } else {
      isa::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* d = dx + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(static_cast<acc_t>(d[c]) - mdy[c]);
        }
      });
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t pos = kd[c].argmax;
      if (pos < 0) continue;
      const int64_t n = pos / g.S, s = pos % g.S;
      const int64_t off = g.interleaved ? pos * C + c : (n * C + c) * g.S + s;
      dx[off] = static_cast<scalar_t>(static_cast<acc_t>(dx[off]) - q[c] * dir(static_cast<acc_t>(x[off])));
    }
    return;
  }
  if (!g.interleaved) {
    isa::parallel_for(0, g.N * C, runs_per_task(g), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = x + r * g.S;
        scalar_t* d = dx + r * g.S;
        const acc_t m = mdy[r % C], qc = q[r % C];
#pragma omp simd
        for (int64_t s = 0; s < g.S; ++s)
          d[s] = static_cast<scalar_t>(static_cast<acc_t>(d[s]) - m - qc * dir(static_cast<acc_t>(xr[s])));
      }
    });
    return;
  }
  isa::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x + r * C;
      scalar_t* d = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        d[c] = static_cast<scalar_t>(static_cast<acc_t>(d[c]) - mdy[c] - q[c] * dir(static_cast<acc_t>(xr[c])));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Noise passes
// ---------------------------------------------------------------------------------------------

// y = s * y + m in place (FORWARD), or y = y * s (the backward's g = dy * s, into `out`).
template <typename scalar_t, bool FORWARD>
void noise_pass(const scalar_t* in, scalar_t* out, const Geometry& g, const NoiseSpec& ns) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, S = g.S, P = ns.period;
  std::vector<float> mu(C), sigma(C);
  for (int64_t c = 0; c < C; ++c) {
    const ChannelNoise ch = channel_noise(ns, c);
    mu[c] = ch.mu;
    sigma[c] = ch.sigma;
  }
  if (!g.interleaved) {
    isa::parallel_for(0, g.N * C, runs_per_task(g), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / C, c = r % C, base = noise_index(n, c, 0, P, S);
        const ChannelNoise ch{mu[c], sigma[c]};
        const scalar_t* src = in + r * S;
        scalar_t* dst = out + r * S;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) {
          const acc_t v = static_cast<acc_t>(src[s]);
          if (FORWARD) {
            const ElementNoise e = element_noise(ns, ch, base + s);
            dst[s] = static_cast<scalar_t>(static_cast<acc_t>(e.s) * v + static_cast<acc_t>(e.m));
          } else {
            dst[s] = static_cast<scalar_t>(v * static_cast<acc_t>(noise_scale(ns, ch, base + s)));
          }
        }
      }
    });
    return;
  }
  std::vector<int64_t> chan_off(C);
  for (int64_t c = 0; c < C; ++c) chan_off[c] = (c % P) * S;
  isa::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / S, s = r % S, base = n * P * S + s;
      const scalar_t* src = in + r * C;
      scalar_t* dst = out + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const ChannelNoise ch{mu[c], sigma[c]};
        const acc_t v = static_cast<acc_t>(src[c]);
        if (FORWARD) {
          const ElementNoise e = element_noise(ns, ch, base + chan_off[c]);
          dst[c] = static_cast<scalar_t>(static_cast<acc_t>(e.s) * v + static_cast<acc_t>(e.m));
        } else {
          dst[c] = static_cast<scalar_t>(v * static_cast<acc_t>(noise_scale(ns, ch, base + chan_off[c])));
        }
      }
    }
  });
}

void check_grad_out(const Tensor& grad_out, const Tensor& input, const char* op) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnext.", op, " backward: grad_out shape ", grad_out.sizes(),
              " differs from input shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "bnext.", op, " backward: grad_out dtype ",
              grad_out.scalar_type(), " differs from input dtype ", input.scalar_type());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels) {
  check_input(input);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  auto [y, mean, var] = batch_norm_forward_cpu(input, weight, bias, std::nullopt, std::nullopt, true, eps, false);
  if (y.numel() == 0) return {y, mean, var};
  Geometry g;
  const Tensor yk = to_kernel_layout(y, &g);  // y is dense in the kernel layout already
  TORCH_INTERNAL_ASSERT(yk.is_same(y));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_noisy_bn_forward_cpu", [&] {
    scalar_t* p = y.mutable_data_ptr<scalar_t>();
    noise_pass<scalar_t, true>(p, p, g, ns);
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, const Tensor& seed,
    at::ArrayRef<double> noise, int64_t noise_channels) {
  check_input(input);
  check_grad_out(grad_out, input, "noisy_batch_norm");
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  Tensor gs = empty_in_layout(x, g);
  if (g.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_noisy_bn_backward_cpu", [&] {
      noise_pass<scalar_t, false>(dy.const_data_ptr<scalar_t>(), gs.mutable_data_ptr<scalar_t>(), g, ns);
    });
  }
  return batch_norm_backward_cpu(gs, x, weight, bias, mean, var, true, eps, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lp_norm_forward_cpu(
    const Tensor& input, double p, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_norm, bool training, double eps) {
  check_input(input);
  check_channel_arg(weight, "weight", input);
  check_channel_arg(bias, "bias", input);
  check_channel_arg(running_mean, "running_mean", input);
  check_channel_arg(running_norm, "running_norm", input);
  check_eps("bnext.lp_norm", eps);
  const LpKind kind = lp_kind(p);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  Tensor mean, norm;
  Tensor argmax = at::full({g.C}, -1, input.options().dtype(at::kLong));
  if (training) {
    mean = at::full({g.C}, NAN, input.options().dtype(acc));
    norm = at::full({g.C}, NAN, input.options().dtype(acc));
    if (g.numel() > 0) {
      std::vector<LpPartial> st;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_lp_stats_cpu", [&] {
        with_lp_kind(kind, [&](auto P) { st = lp_stats<scalar_t, decltype(P)::value>(x.const_data_ptr<scalar_t>(), g); });
      });
      const double M = static_cast<double>(g.rows());
      auto mean_d = at::empty({g.C}, at::kDouble), norm_d = at::empty({g.C}, at::kDouble);
      int64_t* am = argmax.mutable_data_ptr<int64_t>();
      for (int64_t c = 0; c < g.C; ++c) {
        mean_d.mutable_data_ptr<double>()[c] = st[c].sum / M;
        norm_d.mutable_data_ptr<double>()[c] = lp_norm_value(kind, st[c].pow, st[c].max.max, M);
        am[c] = kind == LpKind::kLinf ? st[c].max.index : -1;
      }
      mean.copy_(mean_d);
      norm.copy_(norm_d);
    }
  } else {
    TORCH_CHECK(running_mean.has_value() && running_norm.has_value(),
                "bnext.lp_norm: running_mean and running_norm are required when training=False");
    mean = running_mean->to(acc).clone();
    norm = running_norm->to(acc).clone();
  }
  if (g.numel() == 0) return {empty_in_layout(x, g), mean, norm, argmax};
  // The elementwise pass is BatchNorm's with invstd = 1 / (N + eps): var := (N + eps)^2, eps := 0,
  // formed in fp64.
  const Tensor stand_in_var = (norm.to(at::kDouble) + eps).square().to(acc);
  auto out = batch_norm_forward_cpu(x, weight, bias, mean, stand_in_var, false, 0.0, false);
  return {std::get<0>(out), mean, norm, argmax};
}

std::tuple<Tensor, Tensor, Tensor> lp_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, double p, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& norm, const Tensor& argmax, bool training,
    double eps) {
  check_input(input);
  check_grad_out(grad_out, input, "lp_norm");
  const LpKind kind = lp_kind(p);
  check_backward_args("bnext.lp_norm backward", grad_out, input, weight, bias, mean, norm, "norm", eps);
  check_lp_argmax(argmax, input, training && kind == LpKind::kLinf);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  const Tensor stand_in_var = (norm.to(at::kDouble) + eps).square().to(acc);
  // Eval-mode BatchNorm backward: dx = g * w / (N + eps), sum_dy, sum_dy_xhat (xhat = (x - mean) / (N + eps)).
  auto [dx, sum_dy, sum_dy_xhat] = batch_norm_backward_cpu(dy, x, weight, bias, mean, stand_in_var, false, 0.0, false);
  if (!training || g.numel() == 0) return {dx, sum_dy, sum_dy_xhat};
  const Tensor w = channel_vector(weight, g.C, at::kDouble, input.device(), 1.0);
  const Tensor nd = norm.to(at::kDouble).contiguous(), sdy = sum_dy.to(at::kDouble), sxh = sum_dy_xhat.to(at::kDouble);
  const Tensor am = argmax.contiguous();
  const double M = static_cast<double>(g.rows());
  std::vector<LpBackward<double>> kd(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    const double n = nd.const_data_ptr<double>()[c];
    // sum g * (x - mean) = sum_dy_xhat * (N + eps)
    kd[c] = lp_backward_coeffs<double>(kind, sdy.const_data_ptr<double>()[c], sxh.const_data_ptr<double>()[c] * (n + eps),
                                       n, eps, w.const_data_ptr<double>()[c], M, am.const_data_ptr<int64_t>()[c]);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_lp_backward_cpu", [&] {
    with_lp_kind(kind, [&](auto P) {
      lp_correct_dx<scalar_t, decltype(P)::value>(x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), g, kd);
    });
  });
  return {dx, sum_dy, sum_dy_xhat};
}

}  // namespace bnext
