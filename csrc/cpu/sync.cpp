// Synchronized normalization (bnext/distributed.py merges across ranks what these compute per rank),
// CPU kernels:
//   batch_norm_stats:          the training forward's BatchNorm statistics (channel_stats), as fp64
//                              (mean, m2), m2 = sum (x - mean)^2;
//   lp_norm_stats:             l_p's statistics as fp64 (sum x, sum |x|^p or max |x|) and the first
//                              arg-max position (p = inf);
//   sync_backward_elementwise: dx = dx_eval - a_c - b_c * dir(x - center_c)  (csrc/common/sync_math.h)
//   noise_apply:               y = s * x + m (forward) or x * s (backward) with noisy BatchNorm's
//                              Philox noise at global sample offset n0 (csrc/common/noise.h)
// The two elementwise maps run over the input's layout (planar runs or interleaved rows) in the
// chunks of the other passes (csrc/cpu/reduce.h): results do not depend on the thread count. The
// entry points (checks, layout, outputs, dispatch) are csrc/entry.h's Sync<Cpu>.
#include "../common/noise.h"
#include "../common/sync_math.h"
#include "../entry.h"
#include "noise_vec.h"
#include "reduce.h"

namespace bnext {
namespace {

// Calls body(offset, len, c) for the contiguous pieces of one channel (planar: a run of S values,
// interleaved: body_rows(row0, rows) over whole rows), in parallel over fixed chunks.
template <typename Planar, typename Rows>
void for_each_piece(const Geometry& g, const Planar& planar, const Rows& rows) {
  if (!g.interleaved) {
    isa::parallel_for(0, g.N * g.C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) planar(r / g.C, r % g.C);
    });
    return;
  }
  isa::parallel_for(0, g.rows(), rows_per_chunk(g.C), [&](int64_t m0, int64_t m1) { rows(m0, m1); });
}

template <typename scalar_t>
void sync_backward_kernel(const scalar_t* ge, const scalar_t* x, scalar_t* dx, const Geometry& g,
                          const at::Tensor& center_t, const at::Tensor& a_t, const at::Tensor& b_t, bool sign) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t *center = center_t.const_data_ptr<acc_t>(), *a = a_t.const_data_ptr<acc_t>(),
              *b = b_t.const_data_ptr<acc_t>();
  const int64_t C = g.C, S = g.S;
  for_each_piece(
      g,
      [&](int64_t n, int64_t c) {
        const int64_t off = (n * C + c) * S;
        const acc_t cc = center[c], ac = a[c], bc = b[c];
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) {
          dx[off + s] = static_cast<scalar_t>(sync_backward_value<acc_t>(
              static_cast<acc_t>(ge[off + s]), static_cast<acc_t>(x[off + s]), cc, ac, bc, sign));
        }
      },
      [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t off = m * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            dx[off + c] = static_cast<scalar_t>(sync_backward_value<acc_t>(
                static_cast<acc_t>(ge[off + c]), static_cast<acc_t>(x[off + c]), center[c], a[c], b[c], sign));
          }
        }
      });
}

// The noise is drawn kTile values at a time through the vectorized generator (csrc/cpu/noise_vec.h,
// bitwise equal to element_noise), s and m formed exactly as element_noise forms them.
template <typename scalar_t, bool FORWARD>
void noise_apply_kernel(const scalar_t* in, scalar_t* out, const Geometry& g, const NoiseSpec& ns, int64_t n0) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kTile = 2048;
  const int64_t C = g.C, S = g.S, P = ns.period;
  std::vector<ChannelNoise> ch(C);
  for (int64_t c = 0; c < C; ++c) ch[c] = channel_noise(ns, c);
  const float sd = ns.noise_std_spread, md = ns.noise_mean_spread;
  // out[k] for k < len from in[k] and the noise z[k], v[k] of channel noise cn(k)
  auto apply = [&](const scalar_t* x, scalar_t* y, int64_t len, const float* z, const float* v, auto&& cn) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const ChannelNoise& c = cn(k);
      const acc_t s = static_cast<acc_t>(c.sigma + sd * z[k]);
      y[k] = FORWARD ? static_cast<scalar_t>(s * static_cast<acc_t>(x[k]) + static_cast<acc_t>(c.mu + md * v[k]))
                     : static_cast<scalar_t>(static_cast<acc_t>(x[k]) * s);
    }
  };
  for_each_piece(
      g,
      [&](int64_t n, int64_t c) {
        alignas(64) float z[kTile], v[kTile];
        const int64_t off = (n * C + c) * S, base = noise_index(n0 + n, c, 0, P, S);
        const ChannelNoise& cn = ch[c];
        for (int64_t s0 = 0; s0 < S; s0 += kTile) {
          const int64_t len = std::min(kTile, S - s0);
          noise_cpu::normal_block(ns, base + s0, 1, len, z, FORWARD ? v : nullptr);
          apply(in + off + s0, out + off + s0, len, z, v, [&](int64_t) -> const ChannelNoise& { return cn; });
        }
      },
      [&](int64_t m0, int64_t m1) {
        alignas(64) float z[kTile], v[kTile];
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t n = m / S, s = m % S, off = m * C;
          for (int64_t c0 = 0; c0 < C; c0 += kTile) {
            const int64_t c1 = std::min(C, c0 + kTile);
            noise_cpu::normal_row(ns, n0 + n, s, c0, c1, S, z, FORWARD ? v : nullptr);
            apply(in + off + c0, out + off + c0, c1 - c0, z, v,
                  [&](int64_t k) -> const ChannelNoise& { return ch[c0 + k]; });
          }
        }
      });
}

}  // namespace

template <>
struct SyncKernels<Cpu> {
  // An empty input never gets here: the entry returns zeros (count 0: the merge skips it).
  template <typename scalar_t>
  static void batch_norm_stats(const at::Tensor& x, const Geometry& g, at::Tensor& mean, at::Tensor& m2) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto st = channel_stats<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), g);
    double *mp = mean.mutable_data_ptr<double>(), *qp = m2.mutable_data_ptr<double>();
    for (int64_t c = 0; c < g.C; ++c) mp[c] = st[c].mean, qp[c] = st[c].m2;
  }

  // Planar inputs by runs, short or not (the forward reads short runs as rows: lp_channel_stats).
  template <typename scalar_t>
  static void lp_norm_stats(const at::Tensor& x, const Geometry& g, LpKind kind, at::Tensor& sum, at::Tensor& power,
                            at::Tensor& argmax) {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<LpPartial> st;
    with_lp_kind(kind, [&](auto P) {
      constexpr LpKind kP = decltype(P)::value;
      st = g.interleaved ? lp_interleaved_stats<scalar_t, acc_t, kP>(xp, g) : lp_planar_stats<scalar_t, acc_t, kP>(xp, g);
    });
    double *sp = sum.mutable_data_ptr<double>(), *pp = power.mutable_data_ptr<double>();
    int64_t* ap = argmax.mutable_data_ptr<int64_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      sp[c] = st[c].sum;
      pp[c] = kind == LpKind::kLinf ? st[c].max.max : st[c].pow;
      ap[c] = kind == LpKind::kLinf ? st[c].max.index : -1;
    }
  }

  template <typename scalar_t>
  static void sync_backward_elementwise(const at::Tensor& ge, const at::Tensor& x, const Geometry& g, at::Tensor& dx,
                                        const at::Tensor& center, const at::Tensor& a, const at::Tensor& b, bool sign) {
    sync_backward_kernel<scalar_t>(ge.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   dx.mutable_data_ptr<scalar_t>(), g, center, a, b, sign);
  }

  template <typename scalar_t, bool FORWARD>
  static void noise_apply(const at::Tensor& x, const Geometry& g, at::Tensor& y, const NoiseSpec& ns, int64_t n0) {
    noise_apply_kernel<scalar_t, FORWARD>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, ns, n0);
  }
};

template struct Sync<Cpu>;

}  // namespace bnext
