#pragma once
// Per-element BatchNorm formulas shared by CPU and CUDA (torch-free).
//
// Forward, per channel c with batch (or running) statistics mean_c, var_c:
//   invstd_c = 1 / sqrt(var_c + eps)
//   y = act((x - mean_c) * scale_c + shift_c),  scale_c = invstd_c * w_c,  shift_c = b_c
// We subtract the mean before scaling rather than folding everything into x * alpha + beta:
// with |mean| >> std the folded form cancels catastrophically in fp32.
//
// Backward (training), with g = dy * [y > 0] when the ReLU is fused, M values per channel,
// xc = x - mean_c:
//   sum_dy_c = sum g,   sum_dy_xc_c = sum g * xc     (one reduction pass)
//   dx = (g - sum_dy_c / M - xc * sum_dy_xc_c * invstd_c^2 / M) * invstd_c * w_c
//   dw_c = sum_dy_xc_c * invstd_c,  db_c = sum_dy_c
// In eval the statistics are constants: dx = g * invstd_c * w_c.
#include "macros.h"

namespace bnext {

template <typename acc_t>
struct ChannelAffine {
  acc_t mean;   // subtracted first
  acc_t scale;  // invstd * weight
  acc_t shift;  // bias
};

template <typename acc_t>
BNEXT_HD acc_t bn_forward_value(acc_t x, const ChannelAffine<acc_t>& a, bool relu) {
  const acc_t y = (x - a.mean) * a.scale + a.shift;
  return (relu && y <= acc_t(0)) ? acc_t(0) : y;  // NaN stays NaN, as torch.relu
}

// Gradient reaching the normalization output: dy masked by the fused ReLU (recomputed from x,
// so the forward output never has to be kept). Matches torch's threshold_backward: 0 where y <= 0
// (and dy where y is NaN).
template <typename acc_t>
BNEXT_HD acc_t bn_masked_grad(acc_t dy, acc_t x, const ChannelAffine<acc_t>& a, bool relu) {
  if (!relu) return dy;
  const acc_t y = (x - a.mean) * a.scale + a.shift;
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
};

template <typename acc_t>
BNEXT_HD acc_t bn_backward_train_value(acc_t g, acc_t x, const ChannelBackward<acc_t>& b) {
  return (g - b.mean_dy - (x - b.mean) * b.proj) * b.coeff;
}

}  // namespace bnext
