// Checks that the vectorized noise generator (csrc/cpu/noise_vec.h) and its scalar fallback are
// bitwise equal to the scalar definition (csrc/common/noise.h, one element at a time) over many
// counters, strides and keys, including odd starts and blocks whose 64-bit element or pair counters
// cross a multiple of 2^32 (the high-word paths no tensor in a test can reach).
// Built and run by tests/test_noisy_batch_norm.py; prints "noise_vec: OK" and the lanes checked.
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/noise_vec.h"

using namespace bnext;

// The definition, element by element: one Philox call per element, no sharing within a pair.
static void reference(uint32_t key0, uint32_t key1, int64_t i0, int64_t stride, int64_t len, float* z, float* v) {
  NoiseSpec ns{};
  ns.key0 = key0;
  ns.key1 = key1;
  for (int64_t k = 0; k < len; ++k) {
    const int64_t i = i0 + k * stride;
    const Philox4 r = element_bits(ns, i);
    z[k] = element_normal(r, i);
    v[k] = element_offset(r, i);
  }
}

static int check(const char* name, void (*gen)(uint32_t, uint32_t, int64_t, int64_t, int64_t, float*, float*),
                 long* checked) {
  const uint32_t keys[3][2] = {{0u, 0u}, {0x12345678u, 0x9abcdef1u}, {0xffffffffu, 0xfffffffeu}};
  const int64_t starts[6] = {0, 1, (int64_t(1) << 32) - 1000, (int64_t(1) << 33) - 1001, 123456789012345LL,
                             (int64_t(1) << 62) - 7};
  const int64_t strides[5] = {1, 2, 3, 4096, 65537};
  const int64_t len = 20011;  // not a multiple of any lane count: the scalar tail is exercised too
  std::vector<float> z0(len), v0(len), z1(len), v1(len);
  int bad = 0;
  for (const auto& key : keys)
    for (int64_t start : starts)
      for (int64_t stride : strides) {
        reference(key[0], key[1], start, stride, len, z0.data(), v0.data());
        gen(key[0], key[1], start, stride, len, z1.data(), v1.data());
        for (int64_t k = 0; k < len; ++k) {
          if (std::memcmp(&z0[k], &z1[k], 4) != 0 || std::memcmp(&v0[k], &v1[k], 4) != 0) {
            std::printf("%s: mismatch at start %lld stride %lld k %lld: z %a vs %a, v %a vs %a\n", name,
                        (long long)start, (long long)stride, (long long)k, z0[k], z1[k], v0[k], v1[k]);
            ++bad;
            break;
          }
        }
        gen(key[0], key[1], start, stride, len, z1.data(), nullptr);  // z only (the backward's call)
        if (std::memcmp(z0.data(), z1.data(), len * 4) != 0) {
          std::printf("%s: z-only call differs at start %lld stride %lld\n", name, (long long)start, (long long)stride);
          ++bad;
        }
        *checked += len;
      }
  return bad;
}

// normal_pairs-style generators: both halves of the pairs at even indices start + k * stride.
static int check_pairs(const char* name,
                       void (*gen)(uint32_t, uint32_t, int64_t, int64_t, int64_t, float*, float*, float*, float*),
                       long* checked) {
  const int64_t starts[4] = {0, (int64_t(1) << 33) - 1000, 123456789012344LL, (int64_t(1) << 62) - 8};
  const int64_t strides[4] = {2, 4, 4096, 65538};
  const int64_t len = 10007;
  std::vector<float> z(2 * len), v(2 * len), a0(len), a1(len), b0(len), b1(len);
  int bad = 0;
  for (int64_t start : starts)
    for (int64_t stride : strides) {
      gen(0x12345678u, 0x9abcdef1u, start, stride, len, a0.data(), a1.data(), b0.data(), b1.data());
      for (int64_t k = 0; k < len; ++k) {
        reference(0x12345678u, 0x9abcdef1u, start + k * stride, 1, 2, &z[2 * k], &v[2 * k]);
        if (std::memcmp(&z[2 * k], &a0[k], 4) || std::memcmp(&z[2 * k + 1], &a1[k], 4) ||
            std::memcmp(&v[2 * k], &b0[k], 4) || std::memcmp(&v[2 * k + 1], &b1[k], 4)) {
          std::printf("%s pairs: mismatch at start %lld stride %lld k %lld\n", name, (long long)start,
                      (long long)stride, (long long)k);
          ++bad;
          break;
        }
      }
      *checked += 2 * len;
    }
  return bad;
}

int main() {
  int bad = 0;
  long checked = 0;
  __builtin_cpu_init();
  bad += check("scalar", noise_cpu::scalar_block, &checked);
  bad += check_pairs("scalar", noise_cpu::scalar_pairs, &checked);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    bad += check("avx2", noise_cpu::normal_block_avx2, &checked);
    bad += check_pairs("avx2", noise_cpu::normal_pairs_avx2, &checked);
  }
  else std::printf("avx2: not supported by this CPU, skipped\n");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
  {
    bad += check("avx512", noise_cpu::normal_block_avx512, &checked);
    bad += check_pairs("avx512", noise_cpu::normal_pairs_avx512, &checked);
  }
  else std::printf("avx512: not supported by this CPU, skipped\n");
  if (bad) return 1;
  std::printf("noise_vec: OK (%ld values compared bitwise)\n", checked);
  return 0;
}
