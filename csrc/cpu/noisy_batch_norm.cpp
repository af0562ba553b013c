// Noisy BatchNorm (the paper's Algorithm 1), CPU kernels:
//   forward:  BatchNorm's statistics (csrc/cpu/reduce.h), then one elementwise pass with the noise
//             epilogue y = s * a + m (NoisyBatchNormEpilogue), s and m drawn in the pass (NoiseDraw);
//   backward: backward_passes with the NoisyBatchNormBackward policy: pass 1 draws s again, leaves
//             g = dy * s in dx's memory and reduces it, pass 2 is BatchNorm's dx formula on g.
// Noise: csrc/common/noise.h, drawn many values at a time by csrc/cpu/noise_vec.h. The entry points
// (checks, layout, outputs, dispatch) are csrc/entry.h's NoisyBatchNorm<Cpu>.
#include "../common/noise.h"
#include "../entry.h"
#include "noise_vec.h"
#include "passes.h"

namespace bnext {
namespace {

// Noise of one noisy BatchNorm call as the elementwise passes draw it: per-channel (mu, sigma) once,
// then z (and v) for a stretch of elements at a time through the vectorized generator
// (csrc/cpu/noise_vec.h), bitwise equal to element_noise of csrc/common/noise.h.
// With `as_columns` a short-run planar input is drawn as the rows of C * S columns its passes see
// (short_runs): mu and sigma are repeated per column, and a row's elements have consecutive indices
// within each block of P * S columns (noise_index: (n * P + c % P) * S + s = n * P * S + k % (P * S)
// for column k = c * S + s).
struct NoiseDraw {
  const NoiseSpec& ns;
  const Geometry& g;
  bool columns;
  std::vector<float> mu, sigma;  // per channel, or per column with `columns`
  NoiseDraw(const NoiseSpec& spec, const Geometry& geo, bool as_columns = false)
      : ns(spec), g(geo), columns(as_columns) {
    const int64_t F = columns ? g.S : 1;
    mu.resize(g.C * F);
    sigma.resize(g.C * F);
    for (int64_t c = 0; c < g.C; ++c) {
      const ChannelNoise ch = channel_noise(ns, c);
      for (int64_t j = 0; j < F; ++j) mu[c * F + j] = ch.mu, sigma[c * F + j] = ch.sigma;
    }
  }
  // Columns [k0, k1) of row n of the column view, in pieces that do not cross a block of P * S columns.
  void column_row(int64_t n, int64_t k0, int64_t k1, float* z, float* v) const {
    const int64_t B = ns.period * g.S;
    for (int64_t a = k0; a < k1;) {
      const int64_t b = std::min(k1, (a / B + 1) * B);
      noise_cpu::normal_block(ns, n * B + a % B, 1, b - a, z + (a - k0), v ? v + (a - k0) : nullptr);
      a = b;
    }
  }
  // Planar: the len (<= kSegment) consecutive values s0.. of run (n, c) have consecutive indices.
  void run(int64_t n, int64_t c, int64_t s0, int64_t len, float* z, float* v) const {
    noise_cpu::normal_block(ns, noise_index(n, c, s0, ns.period, g.S), 1, len, z, v);
  }
  // Interleaved: channels [c0, c1) of row m = n * S + s, in pieces that do not cross a multiple of
  // the period P (within one, the indices step by S).
  void row(int64_t m, int64_t c0, int64_t c1, float* z, float* v) const {
    if (columns) return column_row(m, c0, c1, z, v);
    noise_cpu::normal_row(ns, m / g.S, m % g.S, c0, c1, g.S, z, v);
  }
  // Interleaved, whole rows: z[r * C + c] for rows m0 .. m0 + rows. With S even, rows (s, s + 1), s even,
  // hold the two elements of each pair (their indices differ by 1, the first even), so both rows come
  // from one draw per pair; other rows are drawn alone.
  void rows(int64_t m0, int64_t rows, float* z, float* v) const {
    if (columns) {
      const int64_t K = g.C * g.S;
      for (int64_t r = 0; r < rows; ++r) column_row(m0 + r, 0, K, z + r * K, v ? v + r * K : nullptr);
      return;
    }
    const int64_t C = g.C, S = g.S;
    if (C < kNarrowRow && S >= kNarrowRow) return channel_runs(m0, rows, z, v);
    for (int64_t r = 0; r < rows;) {
      const int64_t m = m0 + r, n = m / S, s = m % S;
      if (S % 2 == 0 && s % 2 == 0 && r + 1 < rows) {
        noise_cpu::normal_row_pair(ns, n, s, 0, C, S, z + r * C, z + (r + 1) * C, v ? v + r * C : nullptr,
                                   v ? v + (r + 1) * C : nullptr);
        r += 2;
      } else {
        row(m, 0, C, z + r * C, v ? v + r * C : nullptr);
        r += 1;
      }
    }
  }

 private:
  // A row of fewer than kNarrowRow channels fills less than one vector of the generator, which then
  // draws most values on its scalar tail (~35 ns each instead of ~2.5; 128x8x32x32 channels-last
  // forward+backward took 41 ms against 2.7 ms planar). Along s the indices of one channel are
  // consecutive, so rows m0.. are drawn as one contiguous block per (sample, channel), the vector
  // generator's fast case, and scattered into the row-major tile: the same values (the generator is
  // counter-based: a value depends on its index only).
  static constexpr int64_t kNarrowRow = 16;
  void channel_runs(int64_t m0, int64_t rows, float* z, float* v) const {
    const int64_t C = g.C, S = g.S;
    alignas(64) float zc[kSegment], vc[kSegment];
    for (int64_t r = 0; r < rows;) {
      const int64_t m = m0 + r, n = m / S, s = m % S;
      const int64_t len = std::min({rows - r, S - s, kSegment});  // rows of one sample
      for (int64_t c = 0; c < C; ++c) {
        noise_cpu::normal_block(ns, noise_index(n, c, s, ns.period, S), 1, len, zc, v ? vc : nullptr);
        for (int64_t i = 0; i < len; ++i) z[(r + i) * C + c] = zc[i];
        if (v)
          for (int64_t i = 0; i < len; ++i) v[(r + i) * C + c] = vc[i];
      }
      r += len;
    }
  }
};

// y = s * a + m, a = the affine normalization; s, m as element_noise computes them (fp32), the product
// and sum in acc_t.
template <typename scalar_t, typename acc_t>
struct NoisyBatchNormEpilogue {
  const NoiseDraw& noise;
  void run(const scalar_t* x, scalar_t* y, int64_t len, int64_t n, int64_t c, int64_t s0,
           const ChannelAffine<acc_t>& a) const {
    alignas(64) float z[kSegment], v[kSegment];
    noise.run(n, c, s0, len, z, v);
    const float sigma = noise.sigma[c], mu = noise.mu[c];
    const float sd = noise.ns.noise_std_spread, md = noise.ns.noise_mean_spread;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t an = bn_forward_value(to_acc<acc_t>(x[i]), a, false);
      const float s = sigma + sd * z[i], m = mu + md * v[i];
      y[i] = from_acc<scalar_t>(static_cast<acc_t>(s) * an + static_cast<acc_t>(m));
    }
  }
  void rows(const scalar_t* x, scalar_t* y, int64_t C, int64_t m0, int64_t rows, const ChannelParams<acc_t>& p) const {
    alignas(64) float z[kSegment], v[kSegment];
    const acc_t *mean = p.mean.data(), *scale = p.scale.data(), *shift = p.shift.data(), *lo = p.mean_lo.data();
    const float *sigma = noise.sigma.data(), *mu = noise.mu.data();
    const float sd = noise.ns.noise_std_spread, md = noise.ns.noise_mean_spread;
    // channels [c0, c1) of row r, their noise at zr[c - c0], vr[c - c0]
    auto apply = [&](int64_t r, int64_t c0, int64_t c1, const float* zr, const float* vr) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c], lo[c]};
        const acc_t an = bn_forward_value(to_acc<acc_t>(xr[c]), a, false);
        const float s = sigma[c] + sd * zr[c - c0], m = mu[c] + md * vr[c - c0];
        yr[c] = from_acc<scalar_t>(static_cast<acc_t>(s) * an + static_cast<acc_t>(m));
      }
    };
    if (rows * C <= kSegment) {  // the whole tile's noise in one go (row pairs share their draws)
      noise.rows(m0, rows, z, v);
      for (int64_t r = 0; r < rows; ++r) apply(r, 0, C, z + r * C, v + r * C);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c0 = 0; c0 < C; c0 += kSegment) {
        const int64_t c1 = std::min(C, c0 + kSegment);
        noise.row(m0 + r, c0, c1, z, v);
        apply(r, c0, c1, z, v);
      }
    }
  }
};

// Noisy BatchNorm (training only): g = dy * s, s regenerated from the seed in pass 1 and left in dx's
// memory (in scalar_t, as a materialized dy * s would be) for pass 2, which is BatchNorm's formula.
template <typename scalar_t, typename acc_t>
struct NoisyBatchNormBackward : BatchNormBackward<scalar_t, acc_t, false> {
  const NoiseDraw& noise;
  NoisyBatchNormBackward(const BackwardCommon<acc_t>& b, const NoiseDraw& nd) : BatchNormBackward<scalar_t, acc_t, false>(b), noise(nd) {}
  bool writes_in_sums() const { return true; }

  // g = dy * s of one planar segment (noise z), written to out and reduced like grad_sums_segment.
  void sums(const scalar_t* dy, const scalar_t* x, scalar_t* out, int64_t len, int64_t n, int64_t c, int64_t s0,
            double* s_dy, double* s_dy_xc, double* s_xc) const {
    alignas(64) float z[kSegment];
    noise.run(n, c, s0, len, z, nullptr);
    const float sigma = noise.sigma[c], sd = noise.ns.noise_std_spread;
    const acc_t mean = this->p.mean[c];
    acc_t p_dy[kLanes] = {}, p_dy_xc[kLanes] = {}, p_xc[kLanes] = {};
    auto body = [&](int64_t i, int64_t j) {
      const float s = sigma + sd * z[i];
      const scalar_t gs = from_acc<scalar_t>(to_acc<acc_t>(dy[i]) * static_cast<acc_t>(s));
      out[i] = gs;
      const acc_t gv = to_acc<acc_t>(gs);
      const acc_t xc = to_acc<acc_t>(x[i]) - mean;
      p_dy[j] += gv;
      p_dy_xc[j] += gv * xc;
      p_xc[j] += xc;
    };
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) body(i + j, j);
    }
    for (int64_t j = 0; i + j < len; ++j) body(i + j, j);
    *s_dy += fold_lanes(p_dy);
    *s_dy_xc += fold_lanes(p_dy_xc);
    *s_xc += fold_lanes(p_xc);
  }
  void sums_rows(const scalar_t* dy, const scalar_t* x, scalar_t* out, int64_t C, int64_t m0, int64_t rows, acc_t* s_dy,
                 acc_t* s_dy_xc, acc_t* s_xc) const {
    alignas(64) float z[kSegment];
    const acc_t* mean = this->p.mean.data();
    const float* sigma = noise.sigma.data();
    const float sd = noise.ns.noise_std_spread;
    // channels [c0, c1) of row r, their noise at zr[c - c0]
    auto apply = [&](int64_t r, int64_t c0, int64_t c1, const float* zr) {
      const int64_t off = r * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const float s = sigma[c] + sd * zr[c - c0];
        const scalar_t gs = from_acc<scalar_t>(to_acc<acc_t>(dy[off + c]) * static_cast<acc_t>(s));
        out[off + c] = gs;
        const acc_t gv = to_acc<acc_t>(gs);
        const acc_t xc = to_acc<acc_t>(x[off + c]) - mean[c];
        s_dy[c] += gv;
        s_dy_xc[c] += gv * xc;
        s_xc[c] += xc;
      }
    };
    if (rows * C <= kSegment) {  // the whole tile's noise in one go (row pairs share their draws)
      noise.rows(m0, rows, z, nullptr);
      for (int64_t r = 0; r < rows; ++r) apply(r, 0, C, z + r * C);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c0 = 0; c0 < C; c0 += kSegment) {
        noise.row(m0 + r, c0, std::min(C, c0 + kSegment), z, nullptr);
        apply(r, c0, std::min(C, c0 + kSegment), z);
      }
    }
  }
  void input_grad(const scalar_t*, const scalar_t* x, const scalar_t* g, scalar_t* out, int64_t len, int64_t n,
                  int64_t c, int64_t s0) const {
    BatchNormBackward<scalar_t, acc_t, false>::input_grad(g, x, nullptr, out, len, n, c, s0);
  }
  void input_grad_rows(const scalar_t*, const scalar_t* x, const scalar_t* g, scalar_t* out, int64_t C, int64_t m0,
                       int64_t rows) const {
    BatchNormBackward<scalar_t, acc_t, false>::input_grad_rows(g, x, nullptr, out, C, m0, rows);
  }
};

}  // namespace

template <>
struct NoisyBatchNormKernels<Cpu> {
  // BatchNorm statistics, then one elementwise pass with the noise epilogue.
  template <typename scalar_t>
  static void forward(ForwardCall& f, double eps, const NoiseSpec& ns) {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry& g = f.g;
    const scalar_t* xp = f.x.const_data_ptr<scalar_t>();
    acc_t* mp = f.mean.mutable_data_ptr<acc_t>();
    acc_t* vp = f.second.mutable_data_ptr<acc_t>();
    const std::vector<double> mean64 = bn_statistics<scalar_t, acc_t>(xp, g, mp, vp);
    ChannelParams<acc_t> p(g.C, mp, vp, eps, f.w.const_data_ptr<acc_t>(), f.b.const_data_ptr<acc_t>());
    p.set_residuals(mean64.data(), false);
    if (short_runs(g)) {  // as rows of C * S columns (see short_runs)
      const NoiseDraw draw(ns, g, true);
      normalize_pass(xp, f.y.mutable_data_ptr<scalar_t>(), Geometry{true, g.N, g.C * g.S, 1}, p.repeat(g.S),
                     NoisyBatchNormEpilogue<scalar_t, acc_t>{draw});
    } else {
      const NoiseDraw draw(ns, g);
      normalize_pass(xp, f.y.mutable_data_ptr<scalar_t>(), g, p, NoisyBatchNormEpilogue<scalar_t, acc_t>{draw});
    }
  }

  template <typename scalar_t>
  static void backward(BackwardCall& c, double eps, const NoiseSpec& ns) {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry& g = c.g;
    const ChannelParams<acc_t> p(g.C, c.mean.const_data_ptr<acc_t>(), c.second.const_data_ptr<acc_t>(), eps,
                                 c.w.const_data_ptr<acc_t>(), c.b.const_data_ptr<acc_t>());
    const scalar_t* dy = c.dy.const_data_ptr<scalar_t>();
    const scalar_t* x = c.x.const_data_ptr<scalar_t>();
    scalar_t* dx = c.out.dx.mutable_data_ptr<scalar_t>();
    std::vector<double> tot_dy(g.C, 0.0), tot_dy_xc(g.C, 0.0);
    const double M = static_cast<double>(g.rows());
    backward_geometry(g, p, tot_dy.data(), tot_dy_xc.data(),
                      [&](const Geometry& geo, const ChannelParams<acc_t>& params, int64_t F, double* s_dy,
                          double* s_dy_xc) {
                        const NoiseDraw draw(ns, g, F > 1);
                        NoisyBatchNormBackward<scalar_t, acc_t> pol(BackwardCommon<acc_t>{params, M, true}, draw);
                        backward_passes<scalar_t, acc_t>(dy, x, dx, geo, pol, s_dy, s_dy_xc, F);
                      });
    write_grad_sums(tot_dy.data(), tot_dy_xc.data(), p, c.out.sum_dy, c.out.sum_dy_xhat);
  }
};

template struct NoisyBatchNorm<Cpu>;

}  // namespace bnext
