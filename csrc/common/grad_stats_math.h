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

template <typename T>
BNEXT_HD T axpy_value(T x, T d, T eta) {
  return x - eta * d;
}

}  // namespace bnext
