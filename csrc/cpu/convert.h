#pragma once
// Storage <-> accumulation type conversions of the CPU kernels: to_acc<acc_t>(x) and
// from_acc<scalar_t>(v), with fp16 / bf16 written out bit by bit so that they vectorize.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace bnext {
namespace {


// fp16 / bf16 <-> fp32 conversions written without branches, so that they vectorize with the loop
// around them: c10's scalar conversions did not (an fp16 forward ran 10x slower than fp32). Same bit
// manipulations as c10 (round to nearest even, NaN stays NaN), so the results are identical.
inline float f32_from_bits(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t bits_from_f32(float f) { return __builtin_bit_cast(uint32_t, f); }

inline float half_to_float(uint16_t h) {  // c10::detail::fp16_ieee_to_fp32_value
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * f32_from_bits(0x7800000u);  // 2^-112
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return f32_from_bits(sign | (two_w < (1u << 27) ? bits_from_f32(denormalized) : bits_from_f32(normalized)));
}

inline uint16_t float_to_half(float f) {  // c10::detail::fp16_ieee_from_fp32_value
  float base = (std::fabs(f) * f32_from_bits(239u << 23)) * f32_from_bits(17u << 23);  // * 2^112 * 2^-110
  const uint32_t w = bits_from_f32(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_from_f32(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline uint16_t float_to_bfloat16(float f) {  // c10::detail::round_to_nearest_even
  const uint32_t u = bits_from_f32(f);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) { return static_cast<acc_t>(v); }
template <>
inline float to_acc<float, c10::Half>(c10::Half v) { return half_to_float(v.x); }
template <>
inline float to_acc<float, c10::BFloat16>(c10::BFloat16 v) { return f32_from_bits(static_cast<uint32_t>(v.x) << 16); }

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) { return static_cast<scalar_t>(v); }
template <>
inline c10::Half from_acc<c10::Half, float>(float v) { return c10::Half(float_to_half(v), c10::Half::from_bits()); }
template <>
inline c10::BFloat16 from_acc<c10::BFloat16, float>(float v) {
  return c10::BFloat16(float_to_bfloat16(v), c10::BFloat16::from_bits());
}

// Per-channel constants of the elementwise passes: invstd, and the affine (mean + mean_lo,

}  // namespace
}  // namespace bnext
