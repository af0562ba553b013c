#pragma once
// __half and __nv_bfloat16 for the SIMT emulation (csrc/simt/simt.h), with CUDA's conversions:
// to float exactly; from float rounded to nearest even (__float2half_rn, __float2bfloat16_rn),
// overflow to infinity, subnormal halves kept, NaN to the canonical NaN 0x7fff (what the CUDA
// headers' host conversions return). Storage is the 16-bit pattern, as in CUDA, so a c10::Half or
// c10::BFloat16 tensor is read through reinterpret_cast as on the device.
#include <stdint.h>
#include <string.h>

struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};

namespace bnext_simt {
inline uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
// Rounds m / 2^s to the nearest integer, ties to even (1 <= s <= 31).
inline uint32_t shift_rne(uint32_t m, int s) {
  const uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
  return (rem > half || (rem == half && (q & 1u))) ? q + 1u : q;
}
}  // namespace bnext_simt

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  if (e == 0x1fu) return bnext_simt::bits_float(sign | 0x7f800000u | (m << 13));  // inf, NaN
  if (e == 0) {
    // zero or subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bnext_simt::bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t x = bnext_simt::float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{0x7fffu};                              // NaN
  if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (a >= 0x38800000u) {                                                    // normal half (>= 2^-14)
    // rebias the exponent (127 -> 15), then round the 23-bit mantissa to 10 bits; a carry out of
    // the mantissa correctly increments the exponent
    const uint32_t biased = a - (112u << 23);
    return __half{static_cast<uint16_t>(sign | bnext_simt::shift_rne(biased, 13))};
  }
  const int E = static_cast<int>(a >> 23);  // subnormal half: round (1.m * 2^(E-127)) / 2^-24
  if (E < 102) return __half{sign};          // below 2^-25: rounds to zero
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  return __half{static_cast<uint16_t>(sign | bnext_simt::shift_rne(m, 126 - E))};
}

inline float __bfloat162float(__nv_bfloat16 b) { return bnext_simt::bits_float(static_cast<uint32_t>(b.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = bnext_simt::float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};  // NaN
  return __nv_bfloat16{static_cast<uint16_t>(bnext_simt::shift_rne(x, 16) )};
}
