#pragma once
// Per-element math of the multi-tensor ops grad_stats and multi_axpy (torch-free, CPU and CUDA).
//
// grad_stats, for one pair of equally shaped tensors (a, b), accumulates four sums:
//   aa = sum a^2,   bb = sum b^2,   dd = sum (a - b)^2,   ab = sum a * b.
// dd is accumulated directly rather than derived as aa + bb - 2 ab: when a ~ b (the gradient
// barely changed) the derived form cancels catastrophically.
// multi_axpy writes, for each step size eta_k, out_k = x - eta_k * d.
#include "macros.h"

namespace bnext {

template <typename T>
struct PairSums {
  T aa, bb, dd, ab;
};

template <typename T>
BNEXT_HD void pair_sums_add(T a, T b, T& aa, T& bb, T& dd, T& ab) {
  const T d = a - b;
  aa += a * a;
  bb += b * b;
  dd += d * d;
  ab += a * b;
}

template <typename T>
BNEXT_HD PairSums<T> pair_sums_merge(const PairSums<T>& x, const PairSums<T>& y) {
  return PairSums<T>{x.aa + y.aa, x.bb + y.bb, x.dd + y.dd, x.ab + y.ab};
}

// out = x - eta * d rounded twice, the product and then the difference, on CPU and CUDA alike: the
// CPU build never contracts (-ffp-contract=off), and nvcc would fuse the two into one FMA (one
// rounding) unless told otherwise. The _rn intrinsics are never contracted, whatever the nvcc
// flags, so multi_axpy is bitwise equal on both sides (tests/test_grad_stats.py, exact).
BNEXT_HD float axpy_value(float x, float d, float eta) {
#if defined(__CUDA_ARCH__) || defined(BNEXT_SIMT)
  return __fsub_rn(x, __fmul_rn(eta, d));
#else
  return x - eta * d;
#endif
}

BNEXT_HD double axpy_value(double x, double d, double eta) {
#if defined(__CUDA_ARCH__) || defined(BNEXT_SIMT)
  return __dsub_rn(x, __dmul_rn(eta, d));
#else
  return x - eta * d;
#endif
}

}  // namespace bnext
