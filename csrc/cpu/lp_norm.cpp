// l_p normalization (p = 1, 2, inf), CPU kernels (formulas: csrc/common/lp_norm_math.h):
//   forward:  l_p's statistics (lp_channel_stats, csrc/cpu/reduce.h: sum x, and sum |x|^p or max |x|
//             with its first arg-max), then BatchNorm's affine elementwise pass with
//             invstd := 1 / (N + eps) (lp_params);
//   backward: backward_passes with the LpNormBackward policy: BatchNorm's sums, then
//             dx = (g - mean_dy - q * dir(x)) * coeff (p = inf: the arg-max elements afterwards).
// The entry points (checks, layout, outputs, dispatch) are csrc/entry.h's LpNorm<Cpu>.
#include "../common/lp_norm_math.h"
#include "../entry.h"
#include "passes.h"

namespace bnext {
namespace {

// l_p: the sums are BatchNorm's (invstd := 1 / (N + eps)); pass 2 is lp_backward_train_value. For
// p = inf, dir(x) is zero except at the channel's arg-max, so pass 2 does not read x and `finish`
// corrects the arg-max elements afterwards.
template <typename scalar_t, typename acc_t, LpKind P>
struct LpNormBackward : BatchNormBackward<scalar_t, acc_t, false> {
  const acc_t* norm;          // N per channel
  const int64_t* argmax;      // p = inf: position n * S + s of each channel's arg-max
  double eps;
  const acc_t* weight;
  std::vector<LpBackward<acc_t>> k;
  std::vector<acc_t> mean_dy_, q_, coeff_;  // k by field, for the interleaved rows (vectorized over C)
  LpNormBackward(const BackwardCommon<acc_t>& b, const acc_t* nrm, const int64_t* am, double e, const acc_t* w)
      : BatchNormBackward<scalar_t, acc_t, false>(b), norm(nrm), argmax(am), eps(e), weight(w) {}

  void prepare(const double* tot_dy, const double* tot_dy_xc) {
    const int64_t C = static_cast<int64_t>(this->p.mean.size());
    k.resize(C);
    for (int64_t c = 0; c < C; ++c) {
      k[c] = lp_backward_coeffs<acc_t>(P, tot_dy[c], tot_dy_xc[c], static_cast<double>(norm[c]), eps,
                                       static_cast<double>(weight[c]), this->M, argmax[c]);
      mean_dy_.push_back(k[c].mean_dy);
      q_.push_back(k[c].q);
      coeff_.push_back(k[c].coeff);
    }
  }
  // dN/dx direction (lp_norm_math.h), sign(0) = 0, written without branches so that loops vectorize.
  static acc_t dir(acc_t xv) {
    if (P == LpKind::kL2) return xv;
    return static_cast<acc_t>(xv > acc_t(0)) - static_cast<acc_t>(xv < acc_t(0));
  }
  void input_grad(const scalar_t* dy, const scalar_t* x, const scalar_t*, scalar_t* out, int64_t len, int64_t,
                  int64_t c, int64_t) const {
    const acc_t mdy = k[c].mean_dy, q = k[c].q, coeff = k[c].coeff;
    if (P == LpKind::kLinf) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] = from_acc<scalar_t>((to_acc<acc_t>(dy[i]) - mdy) * coeff);
      return;
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      out[i] = from_acc<scalar_t>((to_acc<acc_t>(dy[i]) - mdy - q * dir(to_acc<acc_t>(x[i]))) * coeff);
  }
  void input_grad_rows(const scalar_t* dy, const scalar_t* x, const scalar_t*, scalar_t* out, int64_t C, int64_t,
                       int64_t rows) const {
    const acc_t *mdy = mean_dy_.data(), *q = q_.data(), *coeff = coeff_.data();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = P == LpKind::kLinf ? acc_t(0) : q[c] * dir(to_acc<acc_t>(x[off + c]));
        out[off + c] = from_acc<scalar_t>((to_acc<acc_t>(dy[off + c]) - mdy[c] - d) * coeff[c]);
      }
    }
  }
  // p = inf: the arg-max elements of the input of geometry g, after pass 2 (dx must already hold every
  // other value). F > 1: the policy ran over the columns of a short-run input, F per channel.
  void finish(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g, int64_t F = 1) const {
    if (P != LpKind::kLinf) return;
    for (int64_t c = 0; c < g.C; ++c) {
      const LpBackward<acc_t>& kc = k[c * F];
      const int64_t pos = kc.argmax;
      if (pos < 0) continue;
      const int64_t off = g.interleaved ? pos * g.C + c : ((pos / g.S) * g.C + c) * g.S + pos % g.S;
      dx[off] = from_acc<scalar_t>(
          lp_backward_train_value(to_acc<acc_t>(dy[off]), to_acc<acc_t>(x[off]), pos, kc, LpKind::kLinf));
    }
  }
};

// l_p: the per-channel constants of the elementwise passes, invstd := 1 / (N + eps) (in fp64).
template <typename acc_t>
ChannelParams<acc_t> lp_params(int64_t C, const at::Tensor& mean, const at::Tensor& norm, double eps,
                               const at::Tensor& w, const at::Tensor& b) {
  std::vector<acc_t> inv(C);
  const acc_t* n = norm.const_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) inv[c] = static_cast<acc_t>(1.0 / (static_cast<double>(n[c]) + eps));
  return ChannelParams<acc_t>(C, mean.const_data_ptr<acc_t>(), inv.data(), w.const_data_ptr<acc_t>(),
                              b.const_data_ptr<acc_t>());
}

}  // namespace

template <>
struct LpNormKernels<Cpu> {
  // The l_p statistics, then BatchNorm's elementwise pass with invstd = 1 / (N + eps).
  template <typename scalar_t>
  static void forward(ForwardCall& f, at::Tensor& argmax, LpKind kind, bool training, double eps) {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry& g = f.g;
    const scalar_t* xp = f.x.const_data_ptr<scalar_t>();
    std::vector<double> mean64;
    if (training) {
      std::vector<LpPartial> st;
      with_lp_kind(kind, [&](auto P) { st = lp_channel_stats<scalar_t, acc_t, decltype(P)::value>(xp, g); });
      const double M = static_cast<double>(g.rows());
      acc_t* mp = f.mean.mutable_data_ptr<acc_t>();
      acc_t* np = f.second.mutable_data_ptr<acc_t>();
      int64_t* am = argmax.mutable_data_ptr<int64_t>();
      for (int64_t c = 0; c < g.C; ++c) {
        mean64.push_back(st[c].sum / M);
        mp[c] = static_cast<acc_t>(st[c].sum / M);
        np[c] = static_cast<acc_t>(lp_norm_value(kind, st[c].pow, st[c].max.max, M));
        am[c] = kind == LpKind::kLinf ? st[c].max.index : -1;
      }
    }
    ChannelParams<acc_t> params = lp_params<acc_t>(g.C, f.mean, f.second, eps, f.w, f.b);
    if (training) params.set_residuals(mean64.data(), true);
    affine_pass<scalar_t, acc_t, false>(xp, f.y.mutable_data_ptr<scalar_t>(), g, params);
  }

  template <typename scalar_t>
  static void backward(BackwardCall& c, const at::Tensor& argmax, LpKind kind, bool training, double eps) {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry& g = c.g;
    const ChannelParams<acc_t> params = lp_params<acc_t>(g.C, c.mean, c.second, eps, c.w, c.b);
    const scalar_t* dyp = c.dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = c.x.const_data_ptr<scalar_t>();
    scalar_t* dxp = c.out.dx.mutable_data_ptr<scalar_t>();
    std::vector<double> tot_dy(g.C, 0.0), tot_dy_xc(g.C, 0.0);
    const acc_t *np = c.second.const_data_ptr<acc_t>(), *wp = c.w.const_data_ptr<acc_t>();
    const int64_t* ap = argmax.const_data_ptr<int64_t>();
    const double M = static_cast<double>(g.rows());
    with_lp_kind(kind, [&](auto P) {
      backward_geometry(g, params, tot_dy.data(), tot_dy_xc.data(),
                        [&](const Geometry& geo, const ChannelParams<acc_t>& pk, int64_t F, double* s_dy,
                            double* s_dy_xc) {
                          // Per column (F > 1): the per-channel constants repeated F times.
                          const int64_t K = geo.C;
                          std::vector<acc_t> n_col, w_col;
                          std::vector<int64_t> a_col;
                          if (F > 1) {
                            n_col.resize(K), w_col.resize(K), a_col.resize(K);
                            const bool has_argmax = argmax.numel() == g.C;  // only p = inf training needs it
                            for (int64_t k = 0; k < K; ++k)
                              n_col[k] = np[k / F], w_col[k] = wp[k / F], a_col[k] = has_argmax ? ap[k / F] : -1;
                          }
                          LpNormBackward<scalar_t, acc_t, decltype(P)::value> pol(
                              BackwardCommon<acc_t>{pk, M, training}, F > 1 ? n_col.data() : np,
                              F > 1 ? a_col.data() : ap, eps, F > 1 ? w_col.data() : wp);
                          backward_passes<scalar_t, acc_t>(dyp, xp, dxp, geo, pol, s_dy, s_dy_xc, F);
                          if (training) pol.finish(dyp, xp, dxp, g, F);
                        });
    });
    write_grad_sums(tot_dy.data(), tot_dy_xc.data(), params, c.out.sum_dy, c.out.sum_dy_xhat);
  }
};

template struct LpNorm<Cpu>;

}  // namespace bnext
