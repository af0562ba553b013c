#pragma once
// Synchronized (cross-process) normalization: the per-element math of the training-mode input
// gradient once the per-channel sums have been all-reduced (torch-free, CPU and CUDA).
//
// Every layer's training dx is its eval-mode dx (statistics held constant, computed together with
// the local sums by the existing backward kernels) minus a per-channel correction:
//   dx = dx_eval - a_c - b_c * dir(x - center_c),   dir(d) = d (LINEAR) or sign(d) (SIGN)
//   BatchNorm:  center = mean, a = w invstd sum_dy / M, b = w invstd^3 sum_dy_xc / M   (LINEAR)
//   l_1:        center = 0,    a = w/d sum_dy / M,      b = w/d q                        (SIGN)
//   l_2:        center = 0,    a = w/d sum_dy / M,      b = w/d q                        (LINEAR)
//   l_inf:      a as above, b = 0, plus a one-element fix at the global arg-max (in Python)
// with M the GLOBAL count and the sums all-reduced over ranks (bnext/distributed.py forms a, b in
// fp64). The fused ReLU needs no mask here: it is inside dx_eval and inside the sums, and the
// correction applies to every element (d x_hat / d x does not depend on the mask).
//
// Noisy BatchNorm across ranks uses noise.h with the sample index made global: element (n, c, s)
// of rank r draws the noise of logical index noise_index(n0_r + n, c, s, P, S), n0_r = the number of
// samples on ranks < r. The channel noise (mu_c, sigma_c) depends on the key only, so it is the
// same on every rank; the per-element noise differs across ranks (different counters), and the
// whole is exactly the noise a single process would draw on the concatenated batch.
#include "macros.h"

namespace bnext {

template <typename acc_t>
BNEXT_HD acc_t sync_backward_value(acc_t grad_eval, acc_t x, acc_t center, acc_t a, acc_t b, bool sign) {
  const acc_t d = x - center;
  const acc_t dir = sign ? (d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0))) : d;
  return grad_eval - a - b * dir;
}

}  // namespace bnext
