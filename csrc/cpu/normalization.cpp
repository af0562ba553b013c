// BatchNorm (+ fused ReLU) CPU kernels.
//
// Formulas: csrc/common/batch_norm_math.h. Statistics: csrc/common/welford.h.
//
// Planar (NCHW) layout: every pass walks the (n, c) runs in memory order, parallel over runs;
// reductions produce one partial per run, merged per channel in n order. (Re-reading a channel
// slice from cache, parallel over channels, was measured 2.8x slower than a copy here: a slice is
// N runs of a few KB, C*S apart, and the strided walk defeats the prefetchers and the TLB.)
// Forward = 2 reads + 1 write; training backward = 4 reads + 1 write; eval backward is one pass.
// Interleaved (channels-last) layout: the rows are cut into fixed-size chunks, each chunk
// produces per-channel partial statistics (vectorized over C), merged in chunk order. Because
// the chunking depends on the shape only, results do not depend on the number of threads.
//
// Numerics: every reduction is done in short segments in the accumulation type (fp32, or fp64
// for fp64 input) and the segment results are merged in fp64 (Welford merge for statistics,
// plain sums for gradients). Segment statistics are two-pass over the cached segment and sums
// are taken of x - pivot, so nothing cancels when |mean| >> std.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/batch_norm_math.h"
#include "../common/welford.h"
#include "../layout.h"
#include "../ops.h"

namespace bnext {
namespace {

// Longest run reduced in the accumulation type before it is folded into fp64.
constexpr int64_t kSegment = 2048;
// Elements per chunk of the interleaved reductions (~128 KB of fp32: stays in L2 between passes).
constexpr int64_t kChunkElems = 1 << 15;

template <bool B>
using Bool = std::integral_constant<bool, B>;

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) f(Bool<true>{}); else f(Bool<false>{});
}

inline int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1)); }

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

// Reductions keep kLanes independent partial sums: a single accumulator would serialize on the
// add latency (measured: the statistics pass ran at a third of memory bandwidth).
constexpr int64_t kLanes = 32;

// sum over i of f(i) for i in [0, len), with kLanes independent accumulators.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t len, F&& f) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) part[j] += f(i + j);
  }
  for (int64_t j = 0; i + j < len; ++j) part[j] += f(i + j);
  acc_t total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

// Two passes over a short contiguous run (cached): mean of x - pivot, then squared deviations.
template <typename scalar_t, typename acc_t>
WelfordState<double> segment_stats(const scalar_t* x, int64_t len) {
  const acc_t pivot = static_cast<acc_t>(x[0]);
  const acc_t sum = lane_sum<acc_t>(len, [&](int64_t i) { return static_cast<acc_t>(x[i]) - pivot; });
  const acc_t mean = pivot + sum / static_cast<acc_t>(len);
  const acc_t m2 = lane_sum<acc_t>(len, [&](int64_t i) {
    const acc_t d = static_cast<acc_t>(x[i]) - mean;
    return d * d;
  });
  return WelfordState<double>{static_cast<double>(pivot) + static_cast<double>(sum) / len,
                              static_cast<double>(m2), len};
}

template <typename scalar_t, typename acc_t>
WelfordState<double> run_stats(const scalar_t* run, int64_t len) {
  auto total = welford_init<double>();
  for (int64_t s0 = 0; s0 < len; s0 += kSegment) {
    total = welford_merge(total, segment_stats<scalar_t, acc_t>(run + s0, std::min(kSegment, len - s0)));
  }
  return total;
}

// Runs per parallel task for planar passes: about kChunkElems values each.
inline int64_t runs_per_chunk(const Geometry& g) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.S, 1)); }

template <typename scalar_t, typename acc_t>
std::vector<WelfordState<double>> planar_stats(const scalar_t* x, const Geometry& g) {
  std::vector<WelfordState<double>> per_run(g.N * g.C);
  at::parallel_for(0, g.N * g.C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) per_run[r] = run_stats<scalar_t, acc_t>(x + r * g.S, g.S);
  });
  std::vector<WelfordState<double>> total(g.C, welford_init<double>());
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c) total[c] = welford_merge(total[c], per_run[n * g.C + c]);
  return total;
}

// Per-channel statistics of rows [r0, r1) of an interleaved (M, C) array, merged into `out`.
template <typename scalar_t, typename acc_t>
void interleaved_chunk_stats(const scalar_t* x, int64_t C, int64_t r0, int64_t r1,
                             acc_t* sum, acc_t* m2, acc_t* mean, WelfordState<double>* out) {
  const scalar_t* pivot = x + r0 * C;
  for (int64_t c = 0; c < C; ++c) sum[c] = 0, m2[c] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(row[c]) - static_cast<acc_t>(pivot[c]);
  }
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(r1 - r0);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<acc_t>(pivot[c]) + sum[c] * inv_rows;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(row[c]) - mean[c];
      m2[c] += d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const double m = static_cast<double>(static_cast<acc_t>(pivot[c])) + static_cast<double>(sum[c]) / (r1 - r0);
    out[c] = WelfordState<double>{m, static_cast<double>(m2[c]), r1 - r0};
  }
}

template <typename scalar_t, typename acc_t>
std::vector<WelfordState<double>> interleaved_stats(const scalar_t* x, const Geometry& g) {
  const int64_t C = g.C, M = g.rows(), rpc = rows_per_chunk(C);
  const int64_t nchunks = (M + rpc - 1) / rpc;
  std::vector<WelfordState<double>> partial(nchunks * C);
  at::parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> sum(C), m2(C), mean(C);
    for (int64_t b = b0; b < b1; ++b) {
      interleaved_chunk_stats<scalar_t, acc_t>(x, C, b * rpc, std::min(M, (b + 1) * rpc), sum.data(),
                                               m2.data(), mean.data(), &partial[b * C]);
    }
  });
  std::vector<WelfordState<double>> total(C, welford_init<double>());
  for (int64_t b = 0; b < nchunks; ++b)
    for (int64_t c = 0; c < C; ++c) total[c] = welford_merge(total[c], partial[b * C + c]);
  return total;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, bool RELU>
void normalize_run(const scalar_t* x, scalar_t* y, int64_t len, const ChannelAffine<acc_t>& a) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i)
    y[i] = static_cast<scalar_t>(bn_forward_value(static_cast<acc_t>(x[i]), a, RELU));
}

template <typename scalar_t, typename acc_t, bool RELU>
void normalize_interleaved_rows(const scalar_t* x, scalar_t* y, int64_t C, int64_t r0, int64_t r1,
                                const acc_t* mean, const acc_t* scale, const acc_t* shift) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * C;
    scalar_t* yr = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c]};
      yr[c] = static_cast<scalar_t>(bn_forward_value(static_cast<acc_t>(xr[c]), a, RELU));
    }
  }
}

template <typename scalar_t, bool RELU>
void forward_kernel(const at::Tensor& x, at::Tensor& y, const Geometry& g, bool training, double eps,
                    const at::Tensor& weight, const at::Tensor& bias, at::Tensor& mean,
                    at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const acc_t* w = weight.const_data_ptr<acc_t>();
  const acc_t* b = bias.const_data_ptr<acc_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  const int64_t C = g.C;

  auto affine_of = [&](int64_t c) {
    const acc_t invstd = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(vp[c]) + eps));
    return ChannelAffine<acc_t>{mp[c], invstd * w[c], b[c]};
  };

  if (training) {
    const auto st = g.interleaved ? interleaved_stats<scalar_t, acc_t>(xp, g) : planar_stats<scalar_t, acc_t>(xp, g);
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = static_cast<acc_t>(st[c].mean);
      vp[c] = static_cast<acc_t>(welford_variance(st[c]));
    }
  }
  if (!g.interleaved) {
    at::parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        normalize_run<scalar_t, acc_t, RELU>(xp + r * g.S, yp + r * g.S, g.S, affine_of(r % C));
      }
    });
    return;
  }
  std::vector<acc_t> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto a = affine_of(c);
    scale[c] = a.scale;
    shift[c] = a.shift;
  }
  at::parallel_for(0, g.rows(), rows_per_chunk(C), [&](int64_t r0, int64_t r1) {
    normalize_interleaved_rows<scalar_t, acc_t, RELU>(xp, yp, C, r0, r1, mp, scale.data(), shift.data());
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Sums of g and g * (x - mean) over a run, g = dy masked by the recomputed ReLU. With
// WRITE_EVAL_GRAD the eval-mode input gradient g * coeff is written in the same pass.
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
void grad_sums_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                   const ChannelAffine<acc_t>& a, acc_t coeff, double* sum_dy, double* sum_dy_xc) {
  for (int64_t s0 = 0; s0 < len; s0 += kSegment) {
    const int64_t n = std::min(len - s0, kSegment);
    const scalar_t* xs = x + s0;
    const scalar_t* dys = dy + s0;
    acc_t p_dy[kLanes] = {}, p_dy_xc[kLanes] = {};
    auto body = [&](int64_t i, int64_t j) {
      const acc_t xv = static_cast<acc_t>(xs[i]);
      const acc_t gv = bn_masked_grad(static_cast<acc_t>(dys[i]), xv, a, RELU);
      p_dy[j] += gv;
      p_dy_xc[j] += gv * (xv - a.mean);
      if (WRITE_EVAL_GRAD) dx[s0 + i] = static_cast<scalar_t>(gv * coeff);
    };
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) body(i + j, j);
    }
    for (int64_t j = 0; i + j < n; ++j) body(i + j, j);
    acc_t s_dy = 0, s_dy_xc = 0;
    for (int64_t j = 0; j < kLanes; ++j) s_dy += p_dy[j], s_dy_xc += p_dy_xc[j];
    *sum_dy += s_dy;
    *sum_dy_xc += s_dy_xc;
  }
}

template <typename scalar_t, typename acc_t, bool RELU>
void input_grad_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                    const ChannelAffine<acc_t>& a, const ChannelBackward<acc_t>& k) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t gv = bn_masked_grad(static_cast<acc_t>(dy[i]), xv, a, RELU);
    dx[i] = static_cast<scalar_t>(bn_backward_train_value(gv, xv, k));
  }
}

// Interleaved: per-channel sums over rows [r0, r1) in acc_t, added to fp64 totals.
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
void interleaved_grad_sums(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C, int64_t r0,
                           int64_t r1, const acc_t* mean, const acc_t* scale, const acc_t* shift,
                           const acc_t* coeff, acc_t* s_dy, acc_t* s_dy_xc, double* out_dy,
                           double* out_dy_xc) {
  for (int64_t c = 0; c < C; ++c) s_dy[c] = 0, s_dy_xc[c] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c]};
      const acc_t xv = static_cast<acc_t>(x[off + c]);
      const acc_t gv = bn_masked_grad(static_cast<acc_t>(dy[off + c]), xv, a, RELU);
      s_dy[c] += gv;
      s_dy_xc[c] += gv * (xv - mean[c]);
      if (WRITE_EVAL_GRAD) dx[off + c] = static_cast<scalar_t>(gv * coeff[c]);
    }
  }
  for (int64_t c = 0; c < C; ++c) out_dy[c] = s_dy[c], out_dy_xc[c] = s_dy_xc[c];
}

template <typename scalar_t, bool RELU>
void backward_kernel(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const Geometry& g,
                     bool training, double eps, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& mean_t, const at::Tensor& var_t, at::Tensor& sum_dy_t,
                     at::Tensor& sum_dy_xhat_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy = dy_t.const_data_ptr<scalar_t>();
  const scalar_t* x = x_t.const_data_ptr<scalar_t>();
  scalar_t* dx = dx_t.mutable_data_ptr<scalar_t>();
  const acc_t* w = weight.const_data_ptr<acc_t>();
  const acc_t* b = bias.const_data_ptr<acc_t>();
  const acc_t* mp = mean_t.const_data_ptr<acc_t>();
  const acc_t* vp = var_t.const_data_ptr<acc_t>();
  acc_t* out_dy = sum_dy_t.mutable_data_ptr<acc_t>();
  acc_t* out_dy_xhat = sum_dy_xhat_t.mutable_data_ptr<acc_t>();
  const int64_t C = g.C;
  const double M = static_cast<double>(g.rows());

  std::vector<acc_t> invstd(C), scale(C), coeff(C);
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(vp[c]) + eps));
    scale[c] = invstd[c] * w[c];
    coeff[c] = scale[c];
  }
  // Training-mode coefficients of dx from the channel's fp64 sums.
  auto backward_coeffs = [&](int64_t c, double s_dy, double s_dy_xc) {
    const double inv = static_cast<double>(invstd[c]);
    return ChannelBackward<acc_t>{mp[c], static_cast<acc_t>(s_dy / M),
                                  static_cast<acc_t>(s_dy_xc * inv * inv / M), coeff[c]};
  };
  auto store_sums = [&](int64_t c, double s_dy, double s_dy_xc) {
    out_dy[c] = static_cast<acc_t>(s_dy);
    out_dy_xhat[c] = static_cast<acc_t>(s_dy_xc * static_cast<double>(invstd[c]));
  };

  if (!g.interleaved) {
    auto affine_of = [&](int64_t c) { return ChannelAffine<acc_t>{mp[c], scale[c], b[c]}; };
    std::vector<double> run_dy(g.N * C, 0.0), run_dy_xc(g.N * C, 0.0);
    at::parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C, off = r * g.S;
        with_bool(!training, [&](auto write_eval) {
          grad_sums_run<scalar_t, acc_t, RELU, decltype(write_eval)::value>(
              dy + off, x + off, dx + off, g.S, affine_of(c), coeff[c], &run_dy[r], &run_dy_xc[r]);
        });
      }
    });
    std::vector<double> tot_dy(C, 0.0), tot_dy_xc(C, 0.0);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < C; ++c) tot_dy[c] += run_dy[n * C + c], tot_dy_xc[c] += run_dy_xc[n * C + c];
    for (int64_t c = 0; c < C; ++c) store_sums(c, tot_dy[c], tot_dy_xc[c]);
    if (!training) return;
    std::vector<ChannelBackward<acc_t>> k(C);
    for (int64_t c = 0; c < C; ++c) k[c] = backward_coeffs(c, tot_dy[c], tot_dy_xc[c]);
    at::parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C, off = r * g.S;
        input_grad_run<scalar_t, acc_t, RELU>(dy + off, x + off, dx + off, g.S, affine_of(c), k[c]);
      }
    });
    return;
  }

  const int64_t M_rows = g.rows(), rpc = rows_per_chunk(C);
  const int64_t nchunks = (M_rows + rpc - 1) / rpc;
  std::vector<double> part_dy(nchunks * C), part_dy_xc(nchunks * C);
  at::parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> s_dy(C), s_dy_xc(C);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rpc, r1 = std::min(M_rows, r0 + rpc);
      with_bool(!training, [&](auto write_eval) {
        interleaved_grad_sums<scalar_t, acc_t, RELU, decltype(write_eval)::value>(
            dy, x, dx, C, r0, r1, mp, scale.data(), b, coeff.data(), s_dy.data(), s_dy_xc.data(),
            &part_dy[blk * C], &part_dy_xc[blk * C]);
      });
    }
  });
  std::vector<double> tot_dy(C, 0.0), tot_dy_xc(C, 0.0);
  for (int64_t blk = 0; blk < nchunks; ++blk)
    for (int64_t c = 0; c < C; ++c) tot_dy[c] += part_dy[blk * C + c], tot_dy_xc[c] += part_dy_xc[blk * C + c];
  for (int64_t c = 0; c < C; ++c) store_sums(c, tot_dy[c], tot_dy_xc[c]);
  if (!training) return;

  std::vector<acc_t> k_mean_dy(C), k_proj(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto k = backward_coeffs(c, tot_dy[c], tot_dy_xc[c]);
    k_mean_dy[c] = k.mean_dy;
    k_proj[c] = k.proj;
  }
  at::parallel_for(0, M_rows, rpc, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const ChannelAffine<acc_t> a{mp[c], scale[c], b[c]};
        const ChannelBackward<acc_t> k{mp[c], k_mean_dy[c], k_proj[c], coeff[c]};
        const acc_t xv = static_cast<acc_t>(x[off + c]);
        const acc_t gv = bn_masked_grad(static_cast<acc_t>(dy[off + c]), xv, a, RELU);
        dx[off + c] = static_cast<scalar_t>(bn_backward_train_value(gv, xv, k));
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool relu) {
  check_input(input);
  check_channel_arg(weight, "weight", input);
  check_channel_arg(bias, "bias", input);
  check_channel_arg(running_mean, "running_mean", input);
  check_channel_arg(running_var, "running_var", input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  const auto dev = input.device();
  Tensor y = empty_in_layout(x, g);
  Tensor mean, var;
  if (training) {
    TORCH_CHECK(g.rows() > 0 || g.C == 0, "bnext.batch_norm: training needs at least one value per channel, got input shape ", input.sizes());
    mean = at::empty({g.C}, input.options().dtype(acc));
    var = at::empty({g.C}, input.options().dtype(acc));
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                "bnext.batch_norm: running_mean and running_var are required when training=False");
    mean = running_mean->to(acc).clone();
    var = running_var->to(acc).clone();
  }
  if (g.numel() == 0) return {y, mean, var};
  const Tensor w = channel_vector(weight, g.C, acc, dev, 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, dev, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_forward_cpu", [&] {
    with_bool(relu, [&](auto RELU) {
      forward_kernel<scalar_t, decltype(RELU)::value>(x, y, g, training, eps, w, b, mean, var);
    });
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training,
    double eps, bool relu) {
  check_input(input);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnext.batch_norm backward: grad_out shape ",
              grad_out.sizes(), " differs from input shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "bnext.batch_norm backward: grad_out dtype ",
              grad_out.scalar_type(), " differs from input dtype ", input.scalar_type());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  const auto dev = input.device();
  Tensor dx = empty_in_layout(x, g);
  Tensor sum_dy = at::zeros({g.C}, input.options().dtype(acc));
  Tensor sum_dy_xhat = at::zeros({g.C}, input.options().dtype(acc));
  if (g.numel() == 0) return {dx, sum_dy, sum_dy_xhat};
  const Tensor w = channel_vector(weight, g.C, acc, dev, 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, dev, 0.0);
  const Tensor m = mean.to(acc).contiguous();
  const Tensor v = var.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_backward_cpu", [&] {
    with_bool(relu, [&](auto RELU) {
      backward_kernel<scalar_t, decltype(RELU)::value>(dy, x, dx, g, training, eps, w, b, m, v, sum_dy, sum_dy_xhat);
    });
  });
  return {dx, sum_dy, sum_dy_xhat};
}

}  // namespace bnext
