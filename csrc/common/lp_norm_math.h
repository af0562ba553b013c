#pragma once
// l_p normalization (p in {1, 2, inf}), the per-element and per-channel math shared by CPU and
// CUDA (torch-free). It reuses BatchNorm's skeleton (batch_norm_math.h): only the statistics and
// the training-mode input gradient differ.
//
// Forward, per channel c over its M values (batch and spatial dims), norm taken BEFORE centering:
//   mean = sum x / M,   N_1 = sum |x| / M,   N_2 = sqrt(sum x^2 / M),   N_inf = max |x|
//   z = (x - mean) * w / (N + eps) + b     = bn_forward_value with invstd := 1 / (N + eps)
// Backward, g = dy, xc = x - mean, d = N + eps, coeff = w / d, sums (BatchNorm's reduction):
//   sum_dy = sum g,  sum_dy_xc = sum g * xc
//   dx_i = (g_i - sum_dy / M - q * dir_i) * coeff,   q and dir_i per p:
//     p = 1:   dir_i = sign(x_i)                         q = sum_dy_xc / (d M)
//     p = 2:   dir_i = x_i                               q = sum_dy_xc / (d M N)   (0 when N = 0)
//     p = inf: dir_i = sign(x_i) if i is the arg-max     q = sum_dy_xc / d
//              else 0
//   (dN/dx_i = sign(x_i) / M, x_i / (M N), and sign(x_i) [i = argmax] respectively.)
//   dw = sum_dy_xc / d,  db = sum_dy.  In eval (running mean/norm are constants): dx = g * coeff.
// Subgradients: sign(0) = 0 (as torch's abs); p = 2 with N = 0 (an all-zero channel) gives q = 0;
// p = inf at ties: max |x| is attained by several elements, and the whole gradient of the max goes
// to ONE of them, the first in the logical NCHW order (smallest n, then smallest spatial index):
// the "argmax" of the channel, found by the forward statistics pass and kept for backward.
#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace bnext {

// p as the kernels see it.
enum class LpKind : int { kL1 = 1, kL2 = 2, kLinf = 0 };

// Power-sum term of one value (p = 1, 2).
template <typename acc_t>
BNEXT_HD acc_t lp_power(acc_t x, LpKind p) {
  const acc_t a = x < acc_t(0) ? -x : x;
  return p == LpKind::kL2 ? a * a : a;
}

// Running (max |x|, first index attaining it) of a channel; merge keeps the larger maximum and, on
// a tie, the smaller index, so the result does not depend on how the values were split up.
template <typename acc_t>
struct MaxAbs {
  acc_t max;
  int64_t index;  // -1 while empty
};

// |x| = a replaces the running maximum m: larger, or NaN over a number. NaN is the maximum, as in
// torch.amax (which propagates it) and torch.argmax (the first NaN): N_inf of a channel holding a
// NaN is NaN, like its mean and N_1, N_2.
template <typename acc_t>
BNEXT_HD bool maxabs_beats(acc_t a, acc_t m) {
  return a > m || (a != a && m == m);
}

template <typename acc_t>
BNEXT_HD bool maxabs_same(acc_t a, acc_t m) {
  return a == m || (a != a && m != m);
}

template <typename acc_t>
BNEXT_HD MaxAbs<acc_t> maxabs_init() {
  return MaxAbs<acc_t>{acc_t(-1), -1};
}

template <typename acc_t>
BNEXT_HD void maxabs_update(MaxAbs<acc_t>& s, acc_t x, int64_t index) {
  const acc_t a = x < acc_t(0) ? -x : x;
  if (maxabs_beats(a, s.max)) {  // strict: the first index of a tie is kept (indices arrive in increasing order)
    s.max = a;
    s.index = index;
  }
}

template <typename acc_t>
BNEXT_HD MaxAbs<acc_t> maxabs_merge(const MaxAbs<acc_t>& a, const MaxAbs<acc_t>& b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (maxabs_beats(b.max, a.max) || (maxabs_same(b.max, a.max) && b.index < a.index)) return b;
  return a;
}

// The norm N of a channel from its statistics (M values; `power_sum` for p = 1, 2; `max` for inf).
BNEXT_HD double lp_norm_value(LpKind p, double power_sum, double max_abs, double M) {
  if (p == LpKind::kLinf) return max_abs;
  if (p == LpKind::kL1) return power_sum / M;
  return sqrt(power_sum / M);
}

// Coefficients of the training-mode input gradient of one channel:
//   dx = (g - mean_dy - q * dir(x, i)) * coeff
template <typename acc_t>
struct LpBackward {
  acc_t mean_dy;  // sum_dy / M
  acc_t q;
  acc_t coeff;    // w / (N + eps)
  int64_t argmax; // p = inf: position of the arg-max within the channel (n * S + s); else -1
};

// From the channel's sums in fp64 (d = N + eps).
template <typename acc_t>
BNEXT_HD LpBackward<acc_t> lp_backward_coeffs(LpKind p, double sum_dy, double sum_dy_xc, double norm, double eps,
                                              double weight, double M, int64_t argmax) {
  const double d = norm + eps;
  double q;
  if (p == LpKind::kL1) q = sum_dy_xc / (d * M);
  else if (p == LpKind::kL2) q = norm > 0 ? sum_dy_xc / (d * M * norm) : 0.0;
  else q = sum_dy_xc / d;
  return LpBackward<acc_t>{static_cast<acc_t>(sum_dy / M), static_cast<acc_t>(q), static_cast<acc_t>(weight / d),
                           p == LpKind::kLinf ? argmax : int64_t(-1)};
}

// dx of one element; `pos` is its position within the channel (n * S + s), used for p = inf only.
template <typename acc_t>
BNEXT_HD acc_t lp_backward_train_value(acc_t g, acc_t x, int64_t pos, const LpBackward<acc_t>& k, LpKind p) {
  const acc_t sgn = x > acc_t(0) ? acc_t(1) : (x < acc_t(0) ? acc_t(-1) : acc_t(0));
  acc_t dir;
  if (p == LpKind::kL2) dir = x;
  else if (p == LpKind::kL1) dir = sgn;
  else dir = pos == k.argmax ? sgn : acc_t(0);
  return (g - k.mean_dy - k.q * dir) * k.coeff;
}

}  // namespace bnext
