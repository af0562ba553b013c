#pragma once
// Noisy BatchNorm's noise (csrc/common/noise.h) drawn many elements at a time on the CPU.
//
// The scalar definition costs one Philox4x32-10 call (20 32x32->64-bit multiplies), a log, a sqrt
// and a sincos per PAIR of elements (2k, 2k + 1), which the compiler leaves scalar. Here the same
// arithmetic runs on W = 16 (AVX-512) or 8 (AVX2) pairs at once, one pair per vector lane:
//   - Philox: a 32x32->64 multiply per lane is two vpmuludq (even and odd lanes) plus blends that
//     put the low and high halves back in their lanes (AVX-512: 64-bit lanes, see V512::philox);
//   - u, u', the log and the sincos: the SAME operations in the same order as the scalar functions
//     of noise.h (no FMA contraction: the build uses -ffp-contract=off and every step here is a
//     separate multiply or add), on IEEE single precision with round-to-nearest, and sqrt is the
//     correctly rounded vsqrtps like sqrtf. So every lane is bitwise equal to the scalar
//     definition (tests/native/noise_vec_check.cpp compares bits; tests/test_noisy_batch_norm.py runs every
//     instruction set through the ops); the CUDA kernels compile the same scalar code without FMA
//     contraction or fast math, so they are bitwise equal too (noise.h).
//   - consecutive indices (planar runs): one lane's pair fills two neighbouring outputs (the cos and
//     the sin half), interleaved on the way out: half the generator work per element; strided
//     indices (interleaved rows, stride S): each lane draws its element's pair and keeps the half
//     its parity selects (no saving there).
// The scalar fallback (baseline ISA, and the tails) evaluates noise.h directly, once per pair.
//
// What the kernels take from a call: for the elements with logical indices i0 + k * stride,
// k in [0, len),  z[k] = the standard normal of the element and v[k] = 2 u - 1 (optional), so
// that s = sigma_c + noise_std_spread * z and m = mu_c + noise_mean_spread * v exactly as
// element_noise computes them.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../common/noise.h"
#include "isa.h"

namespace bnext {
namespace noise_cpu {

// Lanes of the widest generator; callers size their buffers in multiples of it.
constexpr int64_t kMaxLanes = 16;

inline void scalar_block(uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len, float* z, float* v) {
  NoiseSpec ns{};
  ns.key0 = key0;
  ns.key1 = key1;
  Philox4 r{};
  uint64_t pair = ~uint64_t(0);  // the pair whose words r holds (neighbours share one call)
  for (int64_t k = 0; k < len; ++k) {
    const int64_t i = i0 + k * stride;
    if ((static_cast<uint64_t>(i) >> 1) != pair) {
      pair = static_cast<uint64_t>(i) >> 1;
      r = element_bits(ns, i);
    }
    z[k] = element_normal(r, i);
    if (v) v[k] = element_offset(r, i);
  }
}

// Both elements of the pairs (i, i + 1), i = i0 + k * stride even, k in [0, len): the even ones to
// z0 / v0, the odd ones to z1 / v1 (v0, v1 optional).
inline void scalar_pairs(uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len, float* z0, float* z1,
                         float* v0, float* v1) {
  NoiseSpec ns{};
  ns.key0 = key0;
  ns.key1 = key1;
  for (int64_t k = 0; k < len; ++k) {
    const int64_t i = i0 + k * stride;
    const Philox4 r = element_bits(ns, i);
    z0[k] = element_normal(r, i);
    z1[k] = element_normal(r, i + 1);
    if (v0) v0[k] = element_offset(r, i), v1[k] = element_offset(r, i + 1);
  }
}

#ifdef BNEXT_ISA_X86_DISPATCH
// Vector arguments of the generic functions would change ABI if they were ever called out of line
// (they are not: everything is inlined into the two entry points), which GCC notes at every use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// The generic functions below carry no target of their own: the two entry points are `flatten`, so
// everything under them is inlined into a function compiled for that instruction set (as in isa.h).
#define BNEXT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) inline
#define BNEXT_TARGET_AVX2 __attribute__((target("avx2,fma"))) inline
#define BNEXT_LANES inline

// The vector operations the generator needs, per instruction set. M is a lane mask.
struct V512 {
  using I = __m512i;
  using F = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  BNEXT_TARGET_AVX512 static I set1(uint32_t a) { return _mm512_set1_epi32(static_cast<int>(a)); }
  BNEXT_TARGET_AVX512 static F set1f(float a) { return _mm512_set1_ps(a); }
  BNEXT_TARGET_AVX512 static I load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  BNEXT_TARGET_AVX512 static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  BNEXT_TARGET_AVX512 static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  BNEXT_TARGET_AVX512 static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  BNEXT_TARGET_AVX512 static I bxor(I a, I b) { return _mm512_xor_si512(a, b); }
  BNEXT_TARGET_AVX512 static I band(I a, I b) { return _mm512_and_si512(a, b); }
  BNEXT_TARGET_AVX512 static I bor(I a, I b) { return _mm512_or_si512(a, b); }
  template <int n>
  BNEXT_TARGET_AVX512 static I srl(I a) { return _mm512_srli_epi32(a, n); }
  template <int n>
  BNEXT_TARGET_AVX512 static I sll(I a) { return _mm512_slli_epi32(a, n); }
  // hi:lo = a * m per lane (full 64-bit product of 32-bit unsigned values).
  BNEXT_TARGET_AVX512 static void mulhilo(I a, I m, I& hi, I& lo) {
    const I even = _mm512_mul_epu32(a, m);                         // lanes 0, 2, ...: 64-bit products
    const I odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);   // lanes 1, 3, ...
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
  BNEXT_TARGET_AVX512 static F to_float(I a) { return _mm512_cvtepi32_ps(a); }  // exact below 2^24
  BNEXT_TARGET_AVX512 static I trunc(F a) { return _mm512_cvttps_epi32(a); }
  BNEXT_TARGET_AVX512 static F as_float(I a) { return _mm512_castsi512_ps(a); }
  BNEXT_TARGET_AVX512 static I as_int(F a) { return _mm512_castps_si512(a); }
  BNEXT_TARGET_AVX512 static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  BNEXT_TARGET_AVX512 static F add(F a, F b) { return _mm512_add_ps(a, b); }
  BNEXT_TARGET_AVX512 static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  BNEXT_TARGET_AVX512 static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  BNEXT_TARGET_AVX512 static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  BNEXT_TARGET_AVX512 static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  BNEXT_TARGET_AVX512 static M nonzero(I a) { return _mm512_test_epi32_mask(a, a); }
  BNEXT_TARGET_AVX512 static F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
  // p[0 .. 2W) = a0, b0, a1, b1, ...
  BNEXT_TARGET_AVX512 static void store_interleaved(float* p, F a, F b) {
    const I lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const I hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_ps(p, _mm512_permutex2var_ps(a, lo, b));
    _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(a, hi, b));
  }

  // Philox4x32-10 of 16 counters (lo, hi, 0, 0); returns the four words. Each counter word sits in the low
  // half of a 64-bit lane (two vectors of 8 elements): one vpmuludq then gives the whole product, lo in
  // the low half (the next round reads only low halves, so the high half needs no clearing) and hi
  // one shift away, and the two xors of a round fold into one vpternlogd: 6 operations per 8 elements
  // and round instead of 10 with 32-bit lanes.
  BNEXT_TARGET_AVX512 static void philox(I lo, I hi, uint32_t k0, uint32_t k1, I& r0, I& r1, I& r2, I& r3) {
    const I m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
    I c0[2] = {_mm512_cvtepu32_epi64(_mm512_castsi512_si256(lo)), _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(lo, 1))};
    I c1[2] = {_mm512_cvtepu32_epi64(_mm512_castsi512_si256(hi)), _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(hi, 1))};
    I c2[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    I c3[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int round = 0; round < 10; ++round) {
      const I key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
      for (int h = 0; h < 2; ++h) {
        const I p0 = _mm512_mul_epu32(c0[h], m0), p1 = _mm512_mul_epu32(c2[h], m1);
        c0[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1[h], key0, 0x96);  // hi1 ^ c1 ^ k0
        c2[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3[h], key1, 0x96);  // hi0 ^ c3 ^ k1
        c1[h] = p1;  // lo1 (low half)
        c3[h] = p0;  // lo0
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // Low halves of the 16 lanes back into one vector, element order kept.
    const I even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    r0 = _mm512_permutex2var_epi32(c0[0], even, c0[1]);
    r1 = _mm512_permutex2var_epi32(c1[0], even, c1[1]);
    r2 = _mm512_permutex2var_epi32(c2[0], even, c2[1]);
    r3 = _mm512_permutex2var_epi32(c3[0], even, c3[1]);
  }
};

struct V256 {
  using I = __m256i;
  using F = __m256;
  using M = __m256;
  static constexpr int W = 8;
  BNEXT_TARGET_AVX2 static I set1(uint32_t a) { return _mm256_set1_epi32(static_cast<int>(a)); }
  BNEXT_TARGET_AVX2 static F set1f(float a) { return _mm256_set1_ps(a); }
  BNEXT_TARGET_AVX2 static I load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  BNEXT_TARGET_AVX2 static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  BNEXT_TARGET_AVX2 static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  BNEXT_TARGET_AVX2 static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  BNEXT_TARGET_AVX2 static I bxor(I a, I b) { return _mm256_xor_si256(a, b); }
  BNEXT_TARGET_AVX2 static I band(I a, I b) { return _mm256_and_si256(a, b); }
  BNEXT_TARGET_AVX2 static I bor(I a, I b) { return _mm256_or_si256(a, b); }
  template <int n>
  BNEXT_TARGET_AVX2 static I srl(I a) { return _mm256_srli_epi32(a, n); }
  template <int n>
  BNEXT_TARGET_AVX2 static I sll(I a) { return _mm256_slli_epi32(a, n); }
  BNEXT_TARGET_AVX2 static void mulhilo(I a, I m, I& hi, I& lo) {
    const I even = _mm256_mul_epu32(a, m);
    const I odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
  BNEXT_TARGET_AVX2 static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  BNEXT_TARGET_AVX2 static I trunc(F a) { return _mm256_cvttps_epi32(a); }
  BNEXT_TARGET_AVX2 static F as_float(I a) { return _mm256_castsi256_ps(a); }
  BNEXT_TARGET_AVX2 static I as_int(F a) { return _mm256_castps_si256(a); }
  BNEXT_TARGET_AVX2 static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  BNEXT_TARGET_AVX2 static F add(F a, F b) { return _mm256_add_ps(a, b); }
  BNEXT_TARGET_AVX2 static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  BNEXT_TARGET_AVX2 static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  BNEXT_TARGET_AVX2 static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  BNEXT_TARGET_AVX2 static M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  BNEXT_TARGET_AVX2 static M nonzero(I a) {
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()), _mm256_set1_epi32(-1)));
  }
  BNEXT_TARGET_AVX2 static F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  BNEXT_TARGET_AVX2 static void store_interleaved(float* p, F a, F b) {
    const F lo = _mm256_unpacklo_ps(a, b);  // a0 b0 a1 b1 | a4 b4 a5 b5
    const F hi = _mm256_unpackhi_ps(a, b);  // a2 b2 a3 b3 | a6 b6 a7 b7
    _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  BNEXT_TARGET_AVX2 static void philox(I lo, I hi, uint32_t k0, uint32_t k1, I& r0, I& r1, I& r2, I& r3);
};

// Philox4x32-10 on W counters (c0, c1, c2, c3 per lane), philox4x32_10 of noise.h lane by lane.
template <typename V>
BNEXT_LANES void philox_lanes(typename V::I& c0, typename V::I& c1, typename V::I& c2, typename V::I& c3,
                                    uint32_t k0, uint32_t k1) {
  const typename V::I m0 = V::set1(0xD2511F53u), m1 = V::set1(0xCD9E8D57u);
  for (int round = 0; round < 10; ++round) {
    typename V::I hi0, lo0, hi1, lo1;
    V::mulhilo(c0, m0, hi0, lo0);
    V::mulhilo(c2, m1, hi1, lo1);
    c0 = V::bxor(V::bxor(hi1, c1), V::set1(k0));
    c1 = lo1;
    c2 = V::bxor(V::bxor(hi0, c3), V::set1(k1));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Two vectors of V side by side (2W lanes): every operation is applied to both halves back to back,
// so the generator's long dependency chains (10 Philox rounds, the log and sincos polynomials) of two
// independent vectors interleave in the instruction stream. One vector alone leaves the core waiting
// on latencies: with AVX2, per element (z and v, one thread) V256 4.3 ns (3.9 with a 64-bit-lane
// Philox like V512's), Wide<V256> 2.9 ns,
// Wide<Wide<V256>> 2.4 ns, Wide<Wide<Wide<V256>>> 2.8 ns (out of registers). AVX-512 keeps V512
// alone (its 64-bit-lane Philox; the wide form has not been measured on an AVX-512 machine).
template <typename V>
struct Wide {
  struct I { typename V::I a, b; };
  struct F { typename V::F a, b; };
  struct M { typename V::M a, b; };
  static constexpr int W = 2 * V::W;
  BNEXT_LANES static I set1(uint32_t v) { return {V::set1(v), V::set1(v)}; }
  BNEXT_LANES static F set1f(float v) { return {V::set1f(v), V::set1f(v)}; }
  BNEXT_LANES static I load(const uint32_t* p) { return {V::load(p), V::load(p + V::W)}; }
  BNEXT_LANES static void store(float* p, F x) { V::store(p, x.a); V::store(p + V::W, x.b); }
  BNEXT_LANES static void store_interleaved(float* p, F x, F y) {
    V::store_interleaved(p, x.a, y.a);
    V::store_interleaved(p + 2 * V::W, x.b, y.b);
  }
#define BNEXT_WIDE2(name, T)                                                   \
  BNEXT_LANES static T name(T x, T y) { return {V::name(x.a, y.a), V::name(x.b, y.b)}; }
  BNEXT_WIDE2(add, I)
  BNEXT_WIDE2(sub, I)
  BNEXT_WIDE2(bxor, I)
  BNEXT_WIDE2(band, I)
  BNEXT_WIDE2(bor, I)
  BNEXT_WIDE2(add, F)
  BNEXT_WIDE2(sub, F)
  BNEXT_WIDE2(mul, F)
#undef BNEXT_WIDE2
  template <int n>
  BNEXT_LANES static I srl(I x) { return {V::template srl<n>(x.a), V::template srl<n>(x.b)}; }
  template <int n>
  BNEXT_LANES static I sll(I x) { return {V::template sll<n>(x.a), V::template sll<n>(x.b)}; }
  BNEXT_LANES static void mulhilo(I x, I m, I& hi, I& lo) {
    V::mulhilo(x.a, m.a, hi.a, lo.a);
    V::mulhilo(x.b, m.b, hi.b, lo.b);
  }
  BNEXT_LANES static F to_float(I x) { return {V::to_float(x.a), V::to_float(x.b)}; }
  BNEXT_LANES static I trunc(F x) { return {V::trunc(x.a), V::trunc(x.b)}; }
  BNEXT_LANES static F as_float(I x) { return {V::as_float(x.a), V::as_float(x.b)}; }
  BNEXT_LANES static I as_int(F x) { return {V::as_int(x.a), V::as_int(x.b)}; }
  BNEXT_LANES static F sqrt(F x) { return {V::sqrt(x.a), V::sqrt(x.b)}; }
  BNEXT_LANES static M lt(F x, F y) { return {V::lt(x.a, y.a), V::lt(x.b, y.b)}; }
  BNEXT_LANES static M gt(F x, F y) { return {V::gt(x.a, y.a), V::gt(x.b, y.b)}; }
  BNEXT_LANES static M nonzero(I x) { return {V::nonzero(x.a), V::nonzero(x.b)}; }
  BNEXT_LANES static F select(M m, F x, F y) { return {V::select(m.a, x.a, y.a), V::select(m.b, x.b, y.b)}; }
  BNEXT_LANES static void philox(I lo, I hi, uint32_t k0, uint32_t k1, I& r0, I& r1, I& r2, I& r3);
};

// noise_log of noise.h, lane by lane (same operations, same order).
template <typename V>
BNEXT_LANES typename V::F log_lanes(typename V::F u) {
  using F = typename V::F;
  const typename V::I bits = V::as_int(u);
  const F e0 = V::to_float(V::sub(V::band(V::template srl<23>(bits), V::set1(0xffu)), V::set1(126u)));
  const F m = V::as_float(V::bor(V::band(bits, V::set1(0x007fffffu)), V::set1(0x3f000000u)));
  const typename V::M small = V::lt(m, V::set1f(0.70710678118654752f));
  const F one = V::set1f(1.0f);
  const F fe = V::select(small, V::sub(e0, one), e0);  // e - 1 is exact: |e| < 2^24
  const F y = V::select(small, V::sub(V::add(m, m), one), V::sub(m, one));
  const F z = V::mul(y, y);
  F p = V::set1f(7.0376836292e-2f);
  p = V::sub(V::mul(p, y), V::set1f(1.1514610310e-1f));
  p = V::add(V::mul(p, y), V::set1f(1.1676998740e-1f));
  p = V::sub(V::mul(p, y), V::set1f(1.2420140846e-1f));
  p = V::add(V::mul(p, y), V::set1f(1.4249322787e-1f));
  p = V::sub(V::mul(p, y), V::set1f(1.6668057665e-1f));
  p = V::add(V::mul(p, y), V::set1f(2.0000714765e-1f));
  p = V::sub(V::mul(p, y), V::set1f(2.4999993993e-1f));
  p = V::add(V::mul(p, y), V::set1f(3.3333331174e-1f));
  F r = V::mul(V::mul(p, y), z);
  r = V::add(r, V::mul(fe, V::set1f(-2.12194440e-4f)));
  r = V::add(r, V::mul(V::set1f(-0.5f), z));
  return V::add(V::add(y, r), V::mul(fe, V::set1f(0.693359375f)));
}

// noise_sincos_2pi of noise.h, lane by lane. The sign flips are xors of the sign bit, which is
// what negation does.
template <typename V>
BNEXT_LANES void sincos_2pi_lanes(typename V::F u, typename V::F& cos_out, typename V::F& sin_out) {
  using F = typename V::F;
  using I = typename V::I;
  const F t = V::mul(V::set1f(4.0f), u);
  const I q = V::trunc(t);
  const F f = V::sub(t, V::to_float(q));
  const typename V::M upper = V::gt(f, V::set1f(0.5f));
  const F a = V::mul(V::select(upper, V::sub(V::set1f(1.0f), f), f), V::set1f(1.57079632679489662f));
  const F z = V::mul(a, a);
  F c = V::sub(V::mul(V::set1f(2.443315711809948e-5f), z), V::set1f(1.388731625493765e-3f));
  c = V::add(V::mul(c, z), V::set1f(4.166664568298827e-2f));
  c = V::add(V::sub(V::mul(V::mul(c, z), z), V::mul(V::set1f(0.5f), z)), V::set1f(1.0f));
  F s = V::add(V::mul(V::set1f(-1.9515295891e-4f), z), V::set1f(8.3321608736e-3f));
  s = V::sub(V::mul(s, z), V::set1f(1.6666654611e-1f));
  s = V::add(V::mul(V::mul(s, z), a), a);
  const F cos_phi = V::select(upper, s, c);
  const F sin_phi = V::select(upper, c, s);
  const typename V::M odd_q = V::nonzero(V::band(q, V::set1(1u)));
  const F rc = V::select(odd_q, sin_phi, cos_phi);
  const F rs = V::select(odd_q, cos_phi, sin_phi);
  const I flip_cos = V::template sll<30>(V::band(V::add(q, V::set1(1u)), V::set1(2u)));  // q = 1, 2 -> sign bit
  const I flip_sin = V::template sll<30>(V::band(q, V::set1(2u)));                       // q = 2, 3
  cos_out = V::as_float(V::bxor(V::as_int(rc), flip_cos));
  sin_out = V::as_float(V::bxor(V::as_int(rs), flip_sin));
}

// V256 runs the generic 32-bit-lane rounds: it only serves the vectors that Wide<Wide<V256>>'s steps
// leave over (a 64-bit-lane form like V512's was ~10% faster for single vectors, not worth a copy).
BNEXT_LANES void V256::philox(I lo, I hi, uint32_t k0, uint32_t k1, I& r0, I& r1, I& r2, I& r3) {
  r0 = lo;
  r1 = hi;
  r2 = set1(0u);
  r3 = set1(0u);
  philox_lanes<V256>(r0, r1, r2, r3, k0, k1);
}

template <typename V>
BNEXT_LANES void Wide<V>::philox(I lo, I hi, uint32_t k0, uint32_t k1, I& r0, I& r1, I& r2, I& r3) {
  // The generic 32-bit-lane rounds, interleaved over both halves (with AVX2, measured faster than
  // two calls of V256's own 64-bit-lane Philox: 2.9 vs 3.1 ns per element).
  r0 = lo;
  r1 = hi;
  r2 = set1(0u);
  r3 = set1(0u);
  philox_lanes<Wide<V>>(r0, r1, r2, r3, k0, k1);
}

// Both elements of W pairs whose counters are (lo, hi, 0, 0) per lane: z and v of the even
// (2k) and the odd (2k + 1) element, as element_normal and element_offset compute them.
template <typename V>
struct PairLanes {
  typename V::F z_even, z_odd, v_even, v_odd;
};

template <typename V>
BNEXT_LANES void pair_lanes(typename V::I lo, typename V::I hi, uint32_t key0, uint32_t key1, PairLanes<V>& out) {
  using F = typename V::F;
  typename V::I c0, c1, c2, c3;
  V::philox(lo, hi, key0, key1, c0, c1, c2, c3);
  const F two_24 = V::set1f(5.9604644775390625e-8f);
  const F u0 = V::mul(V::to_float(V::add(V::template srl<8>(c0), V::set1(1u))), two_24);  // uniform_oc
  const F u1 = V::mul(V::to_float(V::template srl<8>(c1)), two_24);                       // uniform_co
  const F radius = V::sqrt(V::mul(V::set1f(-2.0f), log_lanes<V>(u0)));
  F co, si;
  sincos_2pi_lanes<V>(u1, co, si);
  const F u2 = V::mul(V::to_float(V::template srl<8>(c2)), two_24);
  const F u3 = V::mul(V::to_float(V::template srl<8>(c3)), two_24);
  out.z_even = V::mul(radius, co);
  out.z_odd = V::mul(radius, si);
  out.v_even = V::sub(V::mul(V::set1f(2.0f), u2), V::set1f(1.0f));
  out.v_odd = V::sub(V::mul(V::set1f(2.0f), u3), V::set1f(1.0f));
}

// Consecutive indices i0 .. i0 + len: W pairs (2W elements) per step, the pair counters j .. j + W
// as (low word, high word) lane vectors. A vector whose low words would wrap (at most one per 2^32
// pairs) and an odd first index take the scalar path. Returns how many elements it wrote (the
// rest, shorter than a step, is the caller's: a narrower type or the scalar path).
template <typename V>
BNEXT_LANES int64_t normal_run_lanes(uint32_t key0, uint32_t key1, int64_t i0, int64_t len, float* z, float* v) {
  constexpr int W = V::W;
  uint32_t step[W];
  for (int k = 0; k < W; ++k) step[k] = static_cast<uint32_t>(k);
  const typename V::I lane_step = V::load(step);
  int64_t k = 0;
  if ((i0 & 1) && len > 0) {  // the odd half of a pair that starts before i0
    scalar_block(key0, key1, i0, 1, 1, z, v);
    k = 1;
  }
  for (; k + 2 * W <= len; k += 2 * W) {
    const uint64_t first = static_cast<uint64_t>(i0 + k) >> 1, last = first + W - 1;
    if ((first >> 32) != (last >> 32)) {
      scalar_block(key0, key1, i0 + k, 1, 2 * W, z + k, v ? v + k : nullptr);
      continue;
    }
    const typename V::I lo = V::add(V::set1(static_cast<uint32_t>(first)), lane_step);
    PairLanes<V> p;
    pair_lanes<V>(lo, V::set1(static_cast<uint32_t>(first >> 32)), key0, key1, p);
    V::store_interleaved(z + k, p.z_even, p.z_odd);
    if (v) V::store_interleaved(v + k, p.v_even, p.v_odd);
  }
  return k;
}

// Strided indices i0 + k * stride, one lane each. BOTH = false: the element's own value, the half of
// its pair that its parity selects, to z0 (and v0). BOTH = true (i even, scalar_pairs): both elements
// of the pair (i, i + 1), the even one to z0 / v0, the odd one to z1 / v1. Within a vector the high
// word of the index is constant unless the low words wrap, which is checked; such vectors (at most one
// per 2^32 elements) take the scalar path. Returns how many lanes it wrote (whole vectors only).
template <typename V, bool BOTH>
BNEXT_LANES int64_t strided_lanes(uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len, float* z0,
                                  float* z1, float* v0, float* v1) {
  constexpr int W = V::W;
  uint32_t step[W];
  for (int k = 0; k < W; ++k) step[k] = static_cast<uint32_t>(static_cast<uint64_t>(k) * static_cast<uint64_t>(stride));
  const typename V::I lane_step = V::load(step);
  int64_t k = 0;
  for (; k + W <= len; k += W) {
    const uint64_t first = static_cast<uint64_t>(i0 + k * stride);
    const uint64_t last = static_cast<uint64_t>(i0 + (k + W - 1) * stride);
    if ((first >> 32) != (last >> 32)) {
      if (BOTH) {
        scalar_pairs(key0, key1, static_cast<int64_t>(first), stride, W, z0 + k, z1 + k, v0 ? v0 + k : nullptr,
                     v1 ? v1 + k : nullptr);
      } else {
        scalar_block(key0, key1, static_cast<int64_t>(first), stride, W, z0 + k, v0 ? v0 + k : nullptr);
      }
      continue;
    }
    const uint32_t hi = static_cast<uint32_t>(first >> 32);
    const typename V::I idx = V::add(V::set1(static_cast<uint32_t>(first)), lane_step);  // low words of i
    // pair counter i >> 1 = (low word >> 1 | hi << 31, hi >> 1)
    PairLanes<V> p;
    pair_lanes<V>(V::bor(V::template srl<1>(idx), V::set1(hi << 31)), V::set1(hi >> 1), key0, key1, p);
    if (BOTH) {
      V::store(z0 + k, p.z_even);
      V::store(z1 + k, p.z_odd);
      if (v0) V::store(v0 + k, p.v_even), V::store(v1 + k, p.v_odd);
    } else {
      const typename V::M odd = V::nonzero(V::band(idx, V::set1(1u)));
      V::store(z0 + k, V::select(odd, p.z_odd, p.z_even));
      if (v0) V::store(v0 + k, V::select(odd, p.v_odd, p.v_even));
    }
  }
  return k;
}

// The generators run the widest type Vw as far as it goes, then the narrower Vn (when different),
// then the scalar definition for what is left: AVX2 uses Wide<Wide<V256>> (4 vectors, 32 lanes,
// interleaved; measured 2.4 vs 3.9 ns per element for V256 alone), then V256 (8 lanes) for shorter runs.
template <typename Vw, typename Vn>
BNEXT_LANES void normal_block_lanes(uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len,
                                    float* z, float* v) {
  int64_t k = 0;
  if (stride == 1) {
    k = normal_run_lanes<Vw>(key0, key1, i0, len, z, v);
    if (!std::is_same<Vw, Vn>::value) k += normal_run_lanes<Vn>(key0, key1, i0 + k, len - k, z + k, v ? v + k : nullptr);
  } else {
    k = strided_lanes<Vw, false>(key0, key1, i0, stride, len, z, nullptr, v, nullptr);
    if (!std::is_same<Vw, Vn>::value)
      k += strided_lanes<Vn, false>(key0, key1, i0 + k * stride, stride, len - k, z + k, nullptr, v ? v + k : nullptr,
                                    nullptr);
  }
  scalar_block(key0, key1, i0 + k * stride, stride, len - k, z + k, v ? v + k : nullptr);
}

template <typename Vw, typename Vn>
BNEXT_LANES void normal_pairs_chain(uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len, float* z0,
                                    float* z1, float* v0, float* v1) {
  int64_t k = strided_lanes<Vw, true>(key0, key1, i0, stride, len, z0, z1, v0, v1);
  if (!std::is_same<Vw, Vn>::value)
    k += strided_lanes<Vn, true>(key0, key1, i0 + k * stride, stride, len - k, z0 + k, z1 + k, v0 ? v0 + k : nullptr,
                                 v1 ? v1 + k : nullptr);
  scalar_pairs(key0, key1, i0 + k * stride, stride, len - k, z0 + k, z1 + k, v0 ? v0 + k : nullptr,
               v1 ? v1 + k : nullptr);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"), flatten, noinline)) inline void normal_block_avx512(
    uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len, float* z, float* v) {
  normal_block_lanes<V512, V512>(key0, key1, i0, stride, len, z, v);
}

__attribute__((target("avx2,fma"), flatten, noinline)) inline void normal_block_avx2(uint32_t key0, uint32_t key1, int64_t i0,
                                                                            int64_t stride, int64_t len, float* z,
                                                                            float* v) {
  normal_block_lanes<Wide<Wide<V256>>, V256>(key0, key1, i0, stride, len, z, v);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"), flatten, noinline)) inline void normal_pairs_avx512(
    uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len, float* z0, float* z1, float* v0, float* v1) {
  normal_pairs_chain<V512, V512>(key0, key1, i0, stride, len, z0, z1, v0, v1);
}

__attribute__((target("avx2,fma"), flatten, noinline)) inline void normal_pairs_avx2(
    uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len, float* z0, float* z1, float* v0, float* v1) {
  normal_pairs_chain<Wide<Wide<V256>>, V256>(key0, key1, i0, stride, len, z0, z1, v0, v1);
}

#undef BNEXT_TARGET_AVX512
#undef BNEXT_TARGET_AVX2
#undef BNEXT_LANES
#pragma GCC diagnostic pop
#endif  // BNEXT_ISA_X86_DISPATCH

// z[k] (and v[k] when v is not null) of the elements with logical indices i0 + k * stride,
// k in [0, len), on the widest instruction set allowed (isa::current()).
inline void normal_block(const NoiseSpec& ns, int64_t i0, int64_t stride, int64_t len, float* z, float* v) {
#ifdef BNEXT_ISA_X86_DISPATCH
  switch (isa::current()) {
    case isa::Isa::kAvx512: normal_block_avx512(ns.key0, ns.key1, i0, stride, len, z, v); return;
    case isa::Isa::kAvx2: normal_block_avx2(ns.key0, ns.key1, i0, stride, len, z, v); return;
    case isa::Isa::kBaseline: break;
  }
#endif
  scalar_block(ns.key0, ns.key1, i0, stride, len, z, v);
}

// Both halves of the pairs (i, i + 1) at even indices i = i0 + k * stride, k in [0, len): z0 / v0 the
// even elements, z1 / v1 the odd ones (v0 and v1 both null or both not). Interleaved layouts with an
// even S use it for two neighbouring rows (s, s + 1) at once: one draw per pair instead of per element.
inline void normal_pairs(const NoiseSpec& ns, int64_t i0, int64_t stride, int64_t len, float* z0, float* z1, float* v0,
                         float* v1) {
#ifdef BNEXT_ISA_X86_DISPATCH
  switch (isa::current()) {
    case isa::Isa::kAvx512: normal_pairs_avx512(ns.key0, ns.key1, i0, stride, len, z0, z1, v0, v1); return;
    case isa::Isa::kAvx2: normal_pairs_avx2(ns.key0, ns.key1, i0, stride, len, z0, z1, v0, v1); return;
    case isa::Isa::kBaseline: break;
  }
#endif
  scalar_pairs(ns.key0, ns.key1, i0, stride, len, z0, z1, v0, v1);
}

// Calls piece(a, b) for the pieces [a, b) of channels [c0, c1) that do not cross a multiple of the
// period P: within one piece the logical indices of an interleaved row step by S.
template <typename Piece>
inline void period_pieces(int64_t c0, int64_t c1, int64_t P, Piece&& piece) {
  for (int64_t a = c0; a < c1;) {
    const int64_t b = std::min(c1, (a / P + 1) * P);
    piece(a, b);
    a = b;
  }
}

// Interleaved layouts: z (and v) of channels [c0, c1) of sample n at spatial position s.
inline void normal_row(const NoiseSpec& ns, int64_t n, int64_t s, int64_t c0, int64_t c1, int64_t S, float* z,
                       float* v) {
  period_pieces(c0, c1, ns.period, [&](int64_t a, int64_t b) {
    normal_block(ns, noise_index(n, a, s, ns.period, S), S, b - a, z + (a - c0), v ? v + (a - c0) : nullptr);
  });
}

// The rows s (even) and s + 1 of sample n together, S even: their elements are the pairs (i, i + 1),
// one draw each; row s to z0 / v0, row s + 1 to z1 / v1 (channels [c0, c1); v0, v1 optional).
inline void normal_row_pair(const NoiseSpec& ns, int64_t n, int64_t s, int64_t c0, int64_t c1, int64_t S, float* z0,
                            float* z1, float* v0, float* v1) {
  period_pieces(c0, c1, ns.period, [&](int64_t a, int64_t b) {
    const int64_t o = a - c0;
    normal_pairs(ns, noise_index(n, a, s, ns.period, S), S, b - a, z0 + o, z1 + o, v0 ? v0 + o : nullptr,
                 v1 ? v1 + o : nullptr);
  });
}

}  // namespace noise_cpu
}  // namespace bnext
