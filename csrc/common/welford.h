#pragma once
// Welford running statistics and Chan's parallel merge (torch-free).
//
// A state holds (count, mean, m2) with m2 = sum (x - mean)^2. Merging two states:
//   n = na + nb, d = mean_b - mean_a,
//   mean = mean_a + d * nb / n,  m2 = m2_a + m2_b + d^2 * na * nb / n.
// Both update and merge only ever subtract numbers of similar size, so the variance stays
// accurate when |mean| >> std (the naive sum-of-squares formula loses everything there).
#include <stdint.h>
#include "macros.h"

namespace bnext {

template <typename T>
struct WelfordState {
  T mean;
  T m2;
  int64_t count;
};

template <typename T>
BNEXT_HD WelfordState<T> welford_init() {
  return WelfordState<T>{T(0), T(0), 0};
}

template <typename T>
BNEXT_HD void welford_update(WelfordState<T>& s, T x) {
  s.count += 1;
  const T delta = x - s.mean;
  s.mean += delta / static_cast<T>(s.count);
  s.m2 += delta * (x - s.mean);
}

template <typename T>
BNEXT_HD WelfordState<T> welford_merge(const WelfordState<T>& a, const WelfordState<T>& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const int64_t n = a.count + b.count;
  const T nb_over_n = static_cast<T>(b.count) / static_cast<T>(n);
  const T delta = b.mean - a.mean;
  WelfordState<T> out;
  out.count = n;
  out.mean = a.mean + delta * nb_over_n;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<T>(a.count) * nb_over_n;
  return out;
}

// Biased (population) variance, the one used to normalize.
template <typename T>
BNEXT_HD T welford_variance(const WelfordState<T>& s) {
  return s.count > 0 ? s.m2 / static_cast<T>(s.count) : T(0);
}

}  // namespace bnext
