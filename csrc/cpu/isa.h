#pragma once
// Instruction-set dispatch for the CPU kernels (every csrc/cpu/*.cpp runs its parallel loops through it).
//
// The extension is compiled for the baseline x86-64 ISA (SSE2) so that it loads on any x86-64 CPU.
// A parallel loop body is compiled two more times, for AVX2+FMA and for AVX-512, by calling it
// from the `isa_call_avx2` / `isa_call_avx512` trampolines: functions with a GCC `target` attribute
// and `flatten`, which inlines every direct call below them, so the whole loop nest is vectorized
// for that ISA inside the trampoline. Only the trampolines contain wider instructions, and they run
// only when __builtin_cpu_supports says the CPU (and OS) has the ISA. Bodies must call their kernels
// directly (no function pointers), or `flatten` cannot reach them.
// BNEXT_CPU_ISA=baseline|avx2|avx512 in the environment caps the choice (for tests and benchmarks).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace bnext {
namespace isa {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__GNUC__) && defined(__x86_64__)
#define BNEXT_ISA_X86_DISPATCH 1

template <typename F>
__attribute__((target("avx2,fma,f16c,bmi,bmi2"), flatten)) void isa_call_avx2(const F& f, int64_t b, int64_t e) {
  f(b, e);
}

template <typename F>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2"), flatten)) void isa_call_avx512(
    const F& f, int64_t b, int64_t e) {
  f(b, e);
}

inline Isa supported() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  return avx2 ? Isa::kAvx2 : Isa::kBaseline;
}
#else
inline Isa supported() { return Isa::kBaseline; }
#endif

inline Isa detect() {
  Isa best = supported();
  if (const char* cap = std::getenv("BNEXT_CPU_ISA")) {
    if (std::strcmp(cap, "baseline") == 0) best = Isa::kBaseline;
    else if (std::strcmp(cap, "avx2") == 0) best = std::min(best, Isa::kAvx2);
    else TORCH_CHECK(std::strcmp(cap, "avx512") == 0, "bnext: BNEXT_CPU_ISA must be baseline, avx2 or avx512, got '", cap, "'");
  }
  return best;
}

inline Isa current() {
  static const Isa best = detect();
  return best;
}

// at::parallel_for whose body runs compiled for the best instruction set of this CPU.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
#ifdef BNEXT_ISA_X86_DISPATCH
  switch (current()) {
    case Isa::kAvx512:
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { isa_call_avx512(body, b, e); });
      return;
    case Isa::kAvx2:
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { isa_call_avx2(body, b, e); });
      return;
    case Isa::kBaseline:
      break;
  }
#endif
  at::parallel_for(begin, end, grain, body);
}

}  // namespace isa
}  // namespace bnext
