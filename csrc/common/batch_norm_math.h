#pragma once
// Per-element BatchNorm formulas shared by CPU and CUDA (torch-free).
//
// Forward, per channel c with batch (or running) statistics mean_c, var_c:
//   invstd_c = 1 / sqrt(var_c + eps)
//   y = act((x - mean_c) * scale_c + shift_c),  scale_c = invstd_c * w_c,  shift_c = b_c
// We subtract the mean before scaling rather than folding everything into x * alpha + beta:
// with |mean| >> std the folded form cancels catastrophically in fp32.
// The centring is exact: the mean is an acc_t value `mean` (the saved statistic, the rounding of
// the fp64 mean) plus the residual `mean_lo` (fp64 mean - mean, rounded), and
//   x - mean_c := (x - mean) - mean_lo.
// x - mean is exact where it matters (|x - mean| <= |mean|, Sterbenz), so x - mean_c is the exact
// difference up to one rounding of the result; rounding the mean alone would shift every centred
// value by up to 2^-24 |mean| in fp32 (6.6e-3 std at |mean| = 1.1e5 std). mean_lo = 0 gives the
// plain form bitwise.
//
// Backward (training), with g = dy * [y > 0] when the ReLU is fused, M values per channel,
// xc = x - mean_c:
//   sum_dy_c = sum g,   sum_dy_xc_c = sum g * xc     (one reduction pass)
//   dx = (g - sum_dy_c / M - xc * sum_dy_xc_c * invstd_c^2 / M) * invstd_c * w_c
//   dw_c = sum_dy_xc_c * invstd_c,  db_c = sum_dy_c
// In eval the statistics are constants: dx = g * invstd_c * w_c.
// The sums of pass 1 are taken around the saved acc_t mean m and moved to the batch mean
// m + delta, delta = sum (x - m) / M (bn_recentre); delta (rounded) is the residual of pass 2.
#include <math.h>

#include "macros.h"

namespace bnext {

template <typename acc_t>
struct ChannelAffine {
  acc_t mean;              // subtracted first
  acc_t scale;             // invstd * weight
  acc_t shift;             // bias
  acc_t mean_lo = acc_t(0);  // residual of the mean, subtracted second
};

// x - mean - mean_lo, the exactly centred value.
template <typename acc_t>
BNEXT_HD acc_t centred(acc_t x, acc_t mean, acc_t mean_lo) {
  return (x - mean) - mean_lo;
}

// Whether the residual of a BatchNorm mean is worth carrying: |mean| * invstd >= 256, i.e. rounding
// the mean alone would move x - mean by more than 2^-16 std in fp32 (1.5e-5 of a normalized unit,
// below the other fp32 errors of y and dx). Below it mean_lo = 0 and the kernels run the plain form;
// forward and backward decide it from the same saved (mean, var), so the ReLU mask recomputed in
// backward is the forward's.
template <typename acc_t>
BNEXT_HD bool bn_mean_residual_matters(acc_t mean, acc_t invstd) {
  const acc_t m = mean < acc_t(0) ? -mean : mean;
  return m * invstd >= acc_t(256);
}

// invstd = 1 / sqrt(var + eps), formed in fp64 and rounded to acc_t (as csrc/cpu/passes.h's
// ChannelParams forms it).
template <typename acc_t>
BNEXT_HD acc_t bn_invstd(acc_t var, double eps) {
  return static_cast<acc_t>(1.0 / sqrt(static_cast<double>(var) + eps));
}

// The residual carried with a saved mean (csrc/cpu/passes.h, ChannelParams::set_residuals):
// mean64 - mean, rounded, when `mean` is the rounding of the fp64 mean `mean64` and the residual is
// carried (`always`: l_p; BatchNorm where bn_mean_residual_matters), else 0.
template <typename acc_t>
BNEXT_HD acc_t bn_mean_residual(double mean64, acc_t mean, acc_t invstd, bool always) {
  const bool use = static_cast<acc_t>(mean64) == mean && (always || bn_mean_residual_matters(mean, invstd));
  return use ? static_cast<acc_t>(mean64 - static_cast<double>(mean)) : acc_t(0);
}

template <typename acc_t>
BNEXT_HD acc_t bn_forward_value(acc_t x, const ChannelAffine<acc_t>& a, bool relu) {
  const acc_t y = centred(x, a.mean, a.mean_lo) * a.scale + a.shift;
  return (relu && y <= acc_t(0)) ? acc_t(0) : y;  // NaN stays NaN, as torch.relu
}

// Gradient reaching the normalization output: dy masked by the fused ReLU (recomputed from x,
// so the forward output never has to be kept). Matches torch's threshold_backward: 0 where y <= 0
// (and dy where y is NaN).
template <typename acc_t>
BNEXT_HD acc_t bn_masked_grad(acc_t dy, acc_t x, const ChannelAffine<acc_t>& a, bool relu) {
  if (!relu) return dy;
  const acc_t y = centred(x, a.mean, a.mean_lo) * a.scale + a.shift;
  return y <= acc_t(0) ? acc_t(0) : dy;
}

// Coefficients of the training-mode input gradient, per channel:
//   dx = (g - mean_dy - xc * proj) * coeff
template <typename acc_t>
struct ChannelBackward {
  acc_t mean;     // batch mean (xc = x - mean)
  acc_t mean_dy;  // sum_dy / M
  acc_t proj;     // sum_dy_xc * invstd^2 / M
  acc_t coeff;    // invstd * weight
  acc_t mean_lo = acc_t(0);  // residual of the mean (xc = x - mean - mean_lo)
};

// Recentring of the training backward's fp64 sums (csrc/cpu/passes.h, BackwardCommon::centre): pass 1
// summed g * (x - mean) and x - mean around the saved acc_t mean; delta = sum (x - mean) / M moves
// them to the batch mean mean + delta, sum g (x - mean - delta) = sum g (x - mean) - delta sum g,
// when `mean` is the rounding of mean + delta (the statistics are this input's; others, say another
// rank's, are used as given). Returns delta rounded to acc_t (pass 2's mean_lo), or 0.
template <typename acc_t>
BNEXT_HD acc_t bn_recentre(acc_t mean, double M, double sum_dy, double sum_xc, double* sum_dy_xc) {
  const double delta = sum_xc / M;
  if (!(static_cast<acc_t>(static_cast<double>(mean) + delta) == mean)) return acc_t(0);
  *sum_dy_xc -= delta * sum_dy;
  return static_cast<acc_t>(delta);
}

template <typename acc_t>
BNEXT_HD acc_t bn_backward_train_value(acc_t g, acc_t x, const ChannelBackward<acc_t>& b) {
  return (g - b.mean_dy - centred(x, b.mean, b.mean_lo) * b.proj) * b.coeff;
}

}  // namespace bnext
