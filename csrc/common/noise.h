#pragma once
// Counter-based noise of noisy BatchNorm (the paper's Algorithm 1), torch-free, CPU and CUDA.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the
// generator of Random123 and cuRAND): a bijection of a 128-bit counter under a 64-bit key. Every
// random number is a pure function of (key, counter), so a kernel can draw the noise of element i
// anywhere, in any order, and the backward pass can draw it again instead of storing it.
//
// The noise of one call, with key = the 64-bit seed drawn from the torch generator:
//   per channel c:   (r0, r1, ., .) = philox(counter = (c_lo, c_hi, 1, 0), key)
//                    mu_c    = noise_mean * (2 u(r0) - 1)                 ~ U(-noise_mean, noise_mean)
//                    sigma_c = 1 + (noise_std - 1) * u(r1)                 ~ U(1, noise_std)
//   per pair of elements (2k, 2k + 1):
//                    (r0, r1, r2, r3) = philox(counter = (k_lo, k_hi, 0, 0), key)
//                    z_2k     = sqrt(-2 ln u'(r0)) * cos(2 pi u(r1))     ~ N(0, 1) (Box-Muller: the two
//                    z_2k+1   = sqrt(-2 ln u'(r0)) * sin(2 pi u(r1))     ~ N(0, 1)  are independent)
//   per element i:   s = sigma_c + noise_std_spread * z_i                 ~ N(sigma_c, noise_std_spread)
//                    m = mu_c + noise_mean_spread * (2 u(r_{2 + i % 2}) - 1)  ~ U(mu_c -+ noise_mean_spread)
//   with u(r) = (r >> 8) * 2^-24 in [0, 1) and u'(r) = ((r >> 8) + 1) * 2^-24 in (0, 1].
// One Philox call, one log and one sqrt serve two elements (all four words and both Box-Muller
// outputs are used): the CPU kernels are compute-bound on exactly these, so this halves their cost
// against one call per element.
// i is the LOGICAL index of the element in the NCHW-contiguous order, i = (n * C + c) * S + s,
// whatever the memory layout, so the same seed gives the same noise in both layouts and on CPU and
// CUDA. With a period P (noise_channels; P = C except under vmap, which folds B problems of P
// channels into B * P), channel c uses the channel noise of c % P and i = (n * P + c % P) * S + s.
// (The channel stream has counter word 2 = 1, so it never meets an element counter.)
// The noise is computed in fp32 for every input dtype; ln and cos are the polynomial
// approximations below (a few ulp of fp32), the same code on both sides, compiled without FMA
// contraction and with a correctly rounded sqrtf on both (-ffp-contract=off; nvcc --fmad=false and
// no --use_fast_math, setup.py): CPU and GPU noise are bitwise equal (tests/test_cuda_parity.py).
// The CUDA kernels draw a pair per thread (pair_noise). The CPU kernels draw 8 or 16
// elements at once (csrc/cpu/noise_vec.h) with these same operations in the same order, unfused,
// and a correctly rounded sqrt: bitwise equal to the functions below on every instruction set
// (tests/test_noisy_batch_norm.py).
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "macros.h"

namespace bnext {

struct Philox4 {
  uint32_t v[4];
};

BNEXT_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__) || defined(BNEXT_SIMT)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32 with 10 rounds (Random123's philox4x32_10: same constants, same round function).
BNEXT_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__) || defined(BNEXT_SIMT)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, hi0, lo0);
    philox_mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// u(r) in [0, 1) and u'(r) in (0, 1], 24 random bits each (exact in fp32).
BNEXT_HD float uniform_co(uint32_t r) { return static_cast<float>(r >> 8) * 5.9604644775390625e-8f; }
BNEXT_HD float uniform_oc(uint32_t r) { return static_cast<float>((r >> 8) + 1u) * 5.9604644775390625e-8f; }

BNEXT_HD uint32_t noise_float_bits(float f) {
#if defined(__CUDA_ARCH__) || defined(BNEXT_SIMT)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

BNEXT_HD float noise_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__) || defined(BNEXT_SIMT)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ln(u) for u in (0, 1] (positive normal floats): Cephes' logf, branch-free so that CPU loops
// vectorize. u = 2^e * m with m in [sqrt(1/2), sqrt(2)), ln(u) = e ln 2 + ln(m), ln(m) by a
// degree-9 polynomial in m - 1.
BNEXT_HD float noise_log(float u) {
  const uint32_t bits = noise_float_bits(u);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 126;
  float m = noise_bits_float((bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = m < 0.70710678118654752f;
  e = small ? e - 1 : e;
  const float y = small ? (m + m - 1.0f) : (m - 1.0f);
  const float z = y * y;
  float p = 7.0376836292e-2f;
  p = p * y - 1.1514610310e-1f;
  p = p * y + 1.1676998740e-1f;
  p = p * y - 1.2420140846e-1f;
  p = p * y + 1.4249322787e-1f;
  p = p * y - 1.6668057665e-1f;
  p = p * y + 2.0000714765e-1f;
  p = p * y - 2.4999993993e-1f;
  p = p * y + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float r = p * y * z;
  r += fe * -2.12194440e-4f;
  r += -0.5f * z;
  return (y + r) + fe * 0.693359375f;
}

// cos(2 pi u) and sin(2 pi u) for u in [0, 1), branch-free: quadrant q = floor(4u), angle a in
// [0, pi/4] within the (folded) quadrant, Cephes' sinf/cosf polynomials on [-pi/4, pi/4].
BNEXT_HD void noise_sincos_2pi(float u, float& cos_out, float& sin_out) {
  const float t = 4.0f * u;
  const int q = static_cast<int>(t);     // 0..3
  const float f = t - static_cast<float>(q);  // [0, 1): fraction of the quadrant
  const bool upper = f > 0.5f;
  const float a = (upper ? 1.0f - f : f) * 1.57079632679489662f;  // [0, pi/4]
  const float z = a * a;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  const float cos_phi = upper ? s : c;  // phi = f * pi / 2 is the angle within quadrant q
  const float sin_phi = upper ? c : s;
  // cos(q pi / 2 + phi): q = 0: cos phi, 1: -sin phi, 2: -cos phi, 3: sin phi
  const float rc = (q & 1) ? sin_phi : cos_phi;
  cos_out = (q == 1 || q == 2) ? -rc : rc;
  // sin(q pi / 2 + phi): q = 0: sin phi, 1: cos phi, 2: -sin phi, 3: -cos phi
  const float rs = (q & 1) ? cos_phi : sin_phi;
  sin_out = (q & 2) ? -rs : rs;
}

// The constants of one noisy BatchNorm call.
struct NoiseSpec {
  uint32_t key0, key1;     // the 64-bit seed
  float noise_mean;        // mu_c ~ U(-noise_mean, noise_mean)
  float noise_std;         // sigma_c ~ U(1, noise_std)
  float noise_mean_spread; // m ~ U(mu_c - spread, mu_c + spread)
  float noise_std_spread;  // s ~ N(sigma_c, spread^2): a standard deviation
  int64_t period;          // P = noise_channels (see above)
};

struct ChannelNoise {
  float mu, sigma;
};

// Noise constants of channel c (of the folded input: channel c % P is drawn).
BNEXT_HD ChannelNoise channel_noise(const NoiseSpec& ns, int64_t c) {
  const uint64_t uc = static_cast<uint64_t>(c % ns.period);
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(uc), static_cast<uint32_t>(uc >> 32), 1u, 0u, ns.key0, ns.key1);
  return ChannelNoise{ns.noise_mean * (2.0f * uniform_co(r.v[0]) - 1.0f),
                      1.0f + (ns.noise_std - 1.0f) * uniform_co(r.v[1])};
}

// The Philox words of the pair holding element i (logical NCHW index): counter i / 2.
BNEXT_HD Philox4 element_bits(const NoiseSpec& ns, int64_t i) {
  const uint64_t k = static_cast<uint64_t>(i) >> 1;
  return philox4x32_10(static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32), 0u, 0u, ns.key0, ns.key1);
}

// The standard normal z of element i from its pair's words: the cos (even i) or sin (odd i) half of
// one Box-Muller transform.
BNEXT_HD float element_normal(const Philox4& r, int64_t i) {
  float c, s;
  noise_sincos_2pi(uniform_co(r.v[1]), c, s);
  return sqrtf(-2.0f * noise_log(uniform_oc(r.v[0]))) * ((i & 1) ? s : c);
}

// 2 u - 1 in [-1, 1) of element i (its m = mu_c + noise_mean_spread * this).
BNEXT_HD float element_offset(const Philox4& r, int64_t i) {
  return 2.0f * uniform_co(r.v[2 + (i & 1)]) - 1.0f;
}

// Logical index of element (n, c, s) of an (N, C, S) input under period P (see above).
BNEXT_HD int64_t noise_index(int64_t n, int64_t c, int64_t s, int64_t P, int64_t S) {
  return (n * P + c % P) * S + s;
}

// Multiplicative noise s of element i (all the backward pass needs).
BNEXT_HD float noise_scale(const NoiseSpec& ns, const ChannelNoise& ch, int64_t i) {
  return ch.sigma + ns.noise_std_spread * element_normal(element_bits(ns, i), i);
}

struct ElementNoise {
  float s, m;
};

BNEXT_HD ElementNoise element_noise(const NoiseSpec& ns, const ChannelNoise& ch, int64_t i) {
  const Philox4 r = element_bits(ns, i);
  return ElementNoise{ch.sigma + ns.noise_std_spread * element_normal(r, i),
                      ch.mu + ns.noise_mean_spread * element_offset(r, i)};
}

// The noise of the pair of elements (j, j + 1), j even, both of channel ch: one Philox call, one
// log and one sincos. The same operations in the same order as element_noise(ns, ch, j) and
// element_noise(ns, ch, j + 1), so bitwise equal to them.
BNEXT_HD void pair_noise(const NoiseSpec& ns, const ChannelNoise& ch, int64_t j, ElementNoise& e0, ElementNoise& e1) {
  const Philox4 r = element_bits(ns, j);
  float c, s;
  noise_sincos_2pi(uniform_co(r.v[1]), c, s);
  const float radius = sqrtf(-2.0f * noise_log(uniform_oc(r.v[0])));
  e0 = ElementNoise{ch.sigma + ns.noise_std_spread * (radius * c),
                    ch.mu + ns.noise_mean_spread * (2.0f * uniform_co(r.v[2]) - 1.0f)};
  e1 = ElementNoise{ch.sigma + ns.noise_std_spread * (radius * s),
                    ch.mu + ns.noise_mean_spread * (2.0f * uniform_co(r.v[3]) - 1.0f)};
}

}  // namespace bnext
