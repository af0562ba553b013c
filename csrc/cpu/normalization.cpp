// The normalization layers' CPU kernels: BatchNorm (+ fused ReLU), noisy BatchNorm and l_p
// normalization, one skeleton (../shared/DESIGN.md "One skeleton for three layers"):
//
//   forward:  statistics pass (policy: BatchNorm's mean / M2, or l_p's sum and sum |x|^p or max |x|
//             with its first arg-max) -> per-channel (mean, scale, shift) -> one elementwise pass
//             (epilogue: affine (+ ReLU), or affine then noise s * a + m with s, m drawn in the pass)
//   backward: reduction pass (sum g, sum g * (x - mean); g = dy, dy masked by the ReLU, or dy * s)
//             -> one elementwise pass writing dx (BatchNorm's formula, or l_p's)
//
// Formulas: csrc/common/batch_norm_math.h, lp_norm_math.h, noise.h (torch-free, shared with CUDA).
// Statistics: csrc/common/welford.h. Noise generator, vectorized: csrc/cpu/noise_vec.h.
//
// Every pass streams through memory in order (one tensor read or written once = one pass):
//   training forward: statistics (read x), then normalization (read x, write y);
//   training backward: gradient sums (read dy and x), then dx (read dy and x, write dx);
//   eval: one pass each way (the statistics are known; eval backward writes dx with the sums).
// The variants keep those passes: noisy BatchNorm draws its noise inside the elementwise pass
// (forward) and the sums pass (backward, which leaves g = dy * s in dx's memory for the dx pass, so
// the noise is drawn once per call); l_p's dx pass for p = inf does not read x (only the arg-max
// element has a direction term, patched after the pass).
// Planar (NCHW) layout: the (n, c) runs are walked in memory order, parallel over runs; reductions
// produce one partial per run, merged per channel in n order. Short runs (S <= kShortRun) are the
// exception: all three layers treat such an input as rows of C * S columns, like the interleaved
// layout (see short_runs), so that a run does not cost a reduction and a merge of its own. Re-reading a block of channels from
// cache instead (one trip to memory per tensor) was tried and measured 1.2-2x slower on this 2-core
// EPYC (single-thread microbenchmark at 128x64x32x32 and 256x128x16x16): a block is N pieces of a
// few KB, N*C*S apart, and such short strided pieces stream at half the speed of one long run, with
// or without software prefetch (tried at several distances) or huge pages. Pieces reach streaming
// speed only at ~64 KB, and blocks of such pieces (several MB per thread) lose the cache re-read.
// Interleaved (channels-last) layout: rows are cut into fixed-size chunks (for the BatchNorm
// statistics with many channels, tiles of rows x channels: interleaved_chunks), each chunk produces
// per-channel partial results (vectorized over C), merged in chunk order (merge_partials). (Looping over blocks of
// channels with the rows inside, to keep a block's constants and sums in local arrays, was tried and
// measured 1.3-1.7x slower.)
// Large planar outputs are written with non-temporal stores (see kStreamingStoreBytes): a plain store
// first reads every destination line from memory, which makes x -> y cost three tensor transfers
// instead of two.
//
// Numerics: every reduction is done in short segments (one (n, c) run of at most kSegment values, or
// one chunk of rows, interleaved or short-run planar) in the accumulation type (fp32, or fp64 for fp64 input), and the segment
// results are merged in fp64 in a fixed order (Welford merge for statistics, plain sums for gradients).
// Segment statistics are two-pass over the cached segment, and sums are of x - pivot, so nothing
// cancels when |mean| >> std. Segments and merge order depend on the shape only, never on the number
// of threads or the instruction set: results are bitwise reproducible (the build disables FMA
// contraction, see setup.py, so the AVX paths round exactly like the baseline one). The centring
// x - mean is exact: the mean is kept as its acc_t rounding plus a residual (batch_norm_math.h,
// ChannelParams::set_residuals, BackwardCommon::centre).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>  // _mm_stream_si128, _mm_sfence: baseline x86-64
#endif

#include "../common/batch_norm_math.h"
#include "../common/lp_norm_math.h"
#include "../common/noise.h"
#include "../common/welford.h"
#include "../layout.h"
#include "../ops.h"
#include "isa.h"
#include "noise_vec.h"

namespace bnext {
namespace {

// Instruction sets: the parallel loops run through isa::parallel_for (csrc/cpu/isa.h), which compiles
// each loop body for the baseline x86-64 ISA, AVX2+FMA and AVX-512 and picks one at run time, so the
// build never needs -march=native and never runs an instruction the CPU lacks.
using isa::parallel_for;

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

// Longest run reduced in the accumulation type before it is folded into fp64; also the tile of
// values computed before a non-temporal flush (8 KB of fp32 in L1).
constexpr int64_t kSegment = 2048;
// Elements per chunk of the parallel passes (~128 KB of fp32: an interleaved chunk stays in L2
// between the two sweeps of its statistics).
constexpr int64_t kChunkElems = 1 << 15;
// Planar outputs at least this large are written with non-temporal stores: they would not stay in the
// last-level cache for their consumer anyway (about half the L3 of current server parts). Measured at
// 2 threads, 33.5 MB fp32, same process A/B: planar training forward 2.2 vs 2.6-2.8 ms, backward
// 3.3-3.5 vs 3.9 ms; the interleaved passes got slower (2.9-3.1 vs 2.7-3.0 ms forward): their per-row
// loops over C cost enough instructions that the extra copy out of the tile outweighs the saved reads,
// so they keep plain stores.
constexpr int64_t kStreamingStoreBytes = 16 << 20;

inline int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1)); }

// Runs per parallel task for planar passes: about kChunkElems values each.
inline int64_t runs_per_chunk(const Geometry& g) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.S, 1)); }

// Copies `bytes` from a cached tile to dst with non-temporal stores (movntdq is SSE2, so the baseline
// build has it too; write-combining merges the 16-byte stores into whole lines). The unaligned head
// and tail are plain copies. The stores are weakly ordered: a task that used them ends with
// stream_fence() before another thread may read its output.
inline void stream_store(void* dst, const void* src, int64_t bytes) {
#if defined(__SSE2__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Where a task of an elementwise pass writes its values: straight into the output, or, for planar
// outputs of at least kStreamingStoreBytes, into a cached tile that is then streamed out.
//   scalar_t* out = tiles.begin(dst);  ...write n values to out...;  tiles.end(dst, n);
template <typename scalar_t>
class OutputTiles {
 public:
  OutputTiles(const Geometry& g, int64_t max_tile)
      : streaming_(!g.interleaved && g.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamingStoreBytes),
        tile_(streaming_ ? max_tile : 0) {}
  ~OutputTiles() {
    if (streaming_) stream_fence();
  }
  scalar_t* begin(scalar_t* dst) { return streaming_ ? tile_.data() : dst; }
  void end(scalar_t* dst, int64_t n) {
    if (streaming_) stream_store(dst, tile_.data(), n * static_cast<int64_t>(sizeof(scalar_t)));
  }

 private:
  bool streaming_;
  std::vector<scalar_t> tile_;
};

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
// invstd * w, b); mean_lo is the residual of the mean (batch_norm_math.h), 0 unless set.
template <typename acc_t>
struct ChannelParams {
  std::vector<acc_t> invstd, mean, scale, shift, mean_lo;
  ChannelParams(int64_t C, const acc_t* m, const acc_t* v, double eps, const acc_t* w, const acc_t* b)
      : invstd(C), mean(m, m + C), scale(C), shift(b, b + C), mean_lo(C, acc_t(0)) {
    for (int64_t c = 0; c < C; ++c) {
      invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(v[c]) + eps));
      scale[c] = invstd[c] * w[c];
    }
  }
  // With invstd given (l_p: 1 / (N + eps)).
  ChannelParams(int64_t C, const acc_t* m, const acc_t* inv, const acc_t* w, const acc_t* b)
      : invstd(inv, inv + C), mean(m, m + C), scale(C), shift(b, b + C), mean_lo(C, acc_t(0)) {
    for (int64_t c = 0; c < C; ++c) scale[c] = invstd[c] * w[c];
  }
  // mean_lo = mean64 - mean (rounded) for the channels whose mean is the rounding of mean64: all of
  // them (`always`, l_p, whose norm gives no scale to compare with), or those where
  // bn_mean_residual_matters (BatchNorm: then the backward, deciding from the same saved
  // statistics, recomputes the same residual for its ReLU mask).
  void set_residuals(const double* mean64, bool always) {
    for (size_t c = 0; c < mean.size(); ++c) {
      const bool use = static_cast<acc_t>(mean64[c]) == mean[c] &&
                       (always || bn_mean_residual_matters(mean[c], invstd[c]));
      mean_lo[c] = use ? static_cast<acc_t>(mean64[c] - static_cast<double>(mean[c])) : acc_t(0);
    }
  }
  bool any_residual_matters() const {
    for (size_t c = 0; c < mean.size(); ++c)
      if (bn_mean_residual_matters(mean[c], invstd[c])) return true;
    return false;
  }
  ChannelAffine<acc_t> affine(int64_t c) const { return {mean[c], scale[c], shift[c], mean_lo[c]}; }
  // The constants of the columns of a short-run planar input seen as rows (F = S columns per channel).
  ChannelParams repeat(int64_t F) const {
    ChannelParams r = *this;
    for (auto* v : {&r.invstd, &r.mean, &r.scale, &r.shift, &r.mean_lo}) *v = repeat_each(*v, F);
    return r;
  }

 private:
  static std::vector<acc_t> repeat_each(const std::vector<acc_t>& v, int64_t F) {
    std::vector<acc_t> out;
    out.reserve(v.size() * F);
    for (const acc_t& a : v) out.insert(out.end(), F, a);
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

// Reductions keep kLanes independent partial sums: a single accumulator would serialize on the
// add latency (measured: the statistics pass ran at a third of memory bandwidth).
constexpr int64_t kLanes = 32;

// Adds the lanes pairwise in a fixed tree: a dependency chain of 5 adds instead of 32 per run (one
// run can be only 256 values long), and the same rounding on every instruction set.
template <typename acc_t>
inline acc_t fold_lanes(acc_t* part) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) part[j] += part[j + w];
  }
  return part[0];
}

// sum over i of f(i) for i in [0, len), with kLanes independent accumulators.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t len, F&& f) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) part[j] += f(i + j);
  }
  for (int64_t j = 0; i + j < len; ++j) part[j] += f(i + j);
  return fold_lanes(part);
}

// Two passes over a short contiguous run (cached): mean of x - pivot, then squared deviations.
template <typename scalar_t, typename acc_t>
WelfordState<double> segment_stats(const scalar_t* x, int64_t len) {
  const acc_t pivot = to_acc<acc_t>(x[0]);
  const acc_t sum = lane_sum<acc_t>(len, [&](int64_t i) { return to_acc<acc_t>(x[i]) - pivot; });
  const acc_t mean = pivot + sum / static_cast<acc_t>(len);
  const acc_t m2 = lane_sum<acc_t>(len, [&](int64_t i) {
    const acc_t d = to_acc<acc_t>(x[i]) - mean;
    return d * d;
  });
  return WelfordState<double>{static_cast<double>(pivot) + static_cast<double>(sum) / len,
                              static_cast<double>(m2), len};
}

template <typename scalar_t, typename acc_t>
WelfordState<double> run_stats(const scalar_t* run, int64_t len) {
  auto total = welford_init<double>();
  for (int64_t s0 = 0; s0 < len; s0 += kSegment) {
    total = welford_merge(total, segment_stats<scalar_t, acc_t>(run + s0, std::min(kSegment, len - s0)));
  }
  return total;
}

// Per-channel merge of B partial states laid out [b * C + c], in fp64 and in b order whatever the
// thread count: the mean as the count-weighted mean of the partial means around the first one, then
// m2 = sum_b m2_b + n_b (mean_b - mean)^2 (Chan's formula for many parts at once). Unlike a chain of
// pairwise merges it makes no division per partial, and the loops over C vectorize.
inline std::vector<WelfordState<double>> merge_partials(const std::vector<WelfordState<double>>& part, int64_t B,
                                                        int64_t C) {
  std::vector<WelfordState<double>> total(C, welford_init<double>());
  if (B == 0) return total;
  std::vector<double> shift(C, 0.0), m2(C, 0.0);
  std::vector<int64_t> count(C, 0);
  for (int64_t b = 0; b < B; ++b) {
    const WelfordState<double>* row = &part[b * C];
    for (int64_t c = 0; c < C; ++c) {
      shift[c] += static_cast<double>(row[c].count) * (row[c].mean - part[c].mean);
      count[c] += row[c].count;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    total[c].count = count[c];
    total[c].mean = count[c] > 0 ? part[c].mean + shift[c] / static_cast<double>(count[c]) : 0.0;
  }
  for (int64_t b = 0; b < B; ++b) {
    const WelfordState<double>* row = &part[b * C];
    for (int64_t c = 0; c < C; ++c) {
      const double d = row[c].mean - total[c].mean;
      m2[c] += row[c].m2 + static_cast<double>(row[c].count) * d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) total[c].m2 = m2[c];
  return total;
}

template <typename scalar_t, typename acc_t>
std::vector<WelfordState<double>> planar_stats(const scalar_t* x, const Geometry& g) {
  std::vector<WelfordState<double>> per_run(g.N * g.C);
  parallel_for(0, g.N * g.C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) per_run[r] = run_stats<scalar_t, acc_t>(x + r * g.S, g.S);
  });
  return merge_partials(per_run, g.N, g.C);
}

// Planar inputs with short runs (S <= kShortRun) are treated as an (N, C * S) row-major array, the
// S columns of a channel side by side (NCHW with S = 1 IS the (N, C) array): the statistics and the
// BatchNorm passes then run over whole rows, vectorized over C * S contiguous values, and a run no
// longer costs a reduction of its own plus a merge (~190 ns per 16-value run). Interleaved inputs
// are the same array with one column per channel.
// Measured (1 thread, BN+ReLU forward+backward): S = 16 and 4 are 2.4x and 12x faster as rows; at
// S = 64 the per-run path was the faster one (0.47 vs 0.66-0.73 ms at 128x32x8x8, with the per-column
// integer division since removed from the rows path; not remeasured), so the rows cover S <= 32.
constexpr int64_t kShortRun = 32;
inline bool short_runs(const Geometry& g) { return !g.interleaved && g.S <= kShortRun; }

// Rows per chunk of the row-major statistics: about kChunkElems values, and at least kMinChunkRows
// rows so that the per-chunk work over the columns (pivots, folds, one merge per channel) stays a
// small part of the chunk's; a chunk (at most 8 * K values) is read twice while cached.
constexpr int64_t kMinChunkRows = 8;
inline int64_t stats_rows_per_chunk(int64_t K) { return std::max(kMinChunkRows, rows_per_chunk(K)); }

// Per-channel statistics of rows [r0, r1) of a row-major (R, C * F) array, F columns per channel,
// written to `out`. Two passes over the cached rows: the mean of x - pivot (pivot: the channel's
// first value in the chunk), then the squared deviations from the chunk's mean, so nothing cancels
// at |mean| >> std. Column sums are folded per channel in column order (acc_t).
template <typename scalar_t, typename acc_t>
void rows_chunk_stats(const scalar_t* x, int64_t C, int64_t F, int64_t r0, int64_t r1, acc_t* sum, acc_t* m2,
                      acc_t* ref, WelfordState<double>* out) {
  const int64_t K = C * F;
  const scalar_t* first = x + r0 * K;
  for (int64_t c = 0; c < C; ++c) {  // (no k / F: an integer division per column cost as much as the sums)
    const acc_t pivot = to_acc<acc_t>(first[c * F]);
    for (int64_t j = 0; j < F; ++j) sum[c * F + j] = 0, m2[c * F + j] = 0, ref[c * F + j] = pivot;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) sum[k] += to_acc<acc_t>(row[k]) - ref[k];
  }
  const int64_t count = (r1 - r0) * F;
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
  for (int64_t c = 0; c < C; ++c) {
    acc_t s = 0;
    for (int64_t j = 0; j < F; ++j) s += sum[c * F + j];
    const acc_t pivot = ref[c * F];
    out[c] = WelfordState<double>{static_cast<double>(pivot) + static_cast<double>(s) / count, 0.0, count};
    const acc_t mean = pivot + s * inv_count;
    for (int64_t j = 0; j < F; ++j) ref[c * F + j] = mean;  // ref now holds the chunk's means
  }
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const acc_t d = to_acc<acc_t>(row[k]) - ref[k];
      m2[k] += d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t q = 0;
    for (int64_t j = 0; j < F; ++j) q += m2[c * F + j];
    out[c].m2 = static_cast<double>(q);
  }
}

// Statistics of an (R, C * F) row-major array: fixed chunks of rows, merged per channel in chunk
// order (the chunks depend on the shape only, never on the thread count).
template <typename scalar_t, typename acc_t>
std::vector<WelfordState<double>> rows_stats(const scalar_t* x, int64_t R, int64_t C, int64_t F) {
  const int64_t K = C * F, rpc = stats_rows_per_chunk(K);
  const int64_t nchunks = (R + rpc - 1) / rpc;
  std::vector<WelfordState<double>> partial(nchunks * C);
  parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> sum(K), m2(K), ref(K);
    for (int64_t b = b0; b < b1; ++b) {
      rows_chunk_stats<scalar_t, acc_t>(x, C, F, b * rpc, std::min(R, (b + 1) * rpc), sum.data(), m2.data(),
                                        ref.data(), &partial[b * C]);
    }
  });
  return merge_partials(partial, nchunks, C);
}

// Per-channel statistics of rows [r0, r1) and channels [c0, c1) of an interleaved (M, C) array,
// written to out[c - c0].
template <typename scalar_t, typename acc_t>
void interleaved_chunk_stats(const scalar_t* x, int64_t C, int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                             acc_t* sum, acc_t* m2, acc_t* mean, WelfordState<double>* out) {
  const int64_t W = c1 - c0;
  const scalar_t* pivot = x + r0 * C + c0;
  for (int64_t c = 0; c < W; ++c) sum[c] = 0, m2[c] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C + c0;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) sum[c] += to_acc<acc_t>(row[c]) - to_acc<acc_t>(pivot[c]);
  }
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(r1 - r0);
#pragma omp simd
  for (int64_t c = 0; c < W; ++c) mean[c] = to_acc<acc_t>(pivot[c]) + sum[c] * inv_rows;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C + c0;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      const acc_t d = to_acc<acc_t>(row[c]) - mean[c];
      m2[c] += d * d;
    }
  }
  const double inv_rows64 = 1.0 / static_cast<double>(r1 - r0);
  for (int64_t c = 0; c < W; ++c) {
    const double m = static_cast<double>(to_acc<acc_t>(pivot[c])) + static_cast<double>(sum[c]) * inv_rows64;
    out[c] = WelfordState<double>{m, static_cast<double>(m2[c]), r1 - r0};
  }
}

// Chunks of the interleaved statistics: `rows` rows by `cols` channels, about kChunkElems values
// (read twice while cached). Every chunk leaves one partial per channel, and finishing and merging
// one costs about as much as reducing 20-40 values, so a chunk keeps at least kStatsRows rows: with
// many channels it covers a tile of them instead of whole rows (256 x 4096: 16k partials instead of
// 131k with 8-row chunks, the statistics 0.75 -> ~0.2 ms).
constexpr int64_t kStatsRows = 64;
struct InterleavedChunks {
  int64_t rows, cols, row_blocks, col_blocks;
};
inline InterleavedChunks interleaved_chunks(int64_t M, int64_t C) {
  const int64_t cols = C * kStatsRows > kChunkElems ? kChunkElems / kStatsRows : std::max<int64_t>(C, 1);
  const int64_t rows = std::max<int64_t>(1, kChunkElems / cols);
  return {rows, cols, (M + rows - 1) / rows, (C + cols - 1) / cols};
}

template <typename scalar_t, typename acc_t>
std::vector<WelfordState<double>> interleaved_stats(const scalar_t* x, const Geometry& g) {
  const int64_t C = g.C, M = g.rows();
  const InterleavedChunks t = interleaved_chunks(M, C);
  std::vector<WelfordState<double>> partial(t.row_blocks * C);  // [row block * C + channel]
  parallel_for(0, t.row_blocks * t.col_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> sum(t.cols), m2(t.cols), mean(t.cols);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rb = b / t.col_blocks, c0 = (b % t.col_blocks) * t.cols, c1 = std::min(C, c0 + t.cols);
      interleaved_chunk_stats<scalar_t, acc_t>(x, C, c0, c1, rb * t.rows, std::min(M, (rb + 1) * t.rows), sum.data(),
                                               m2.data(), mean.data(), &partial[rb * C + c0]);
    }
  });
  return merge_partials(partial, t.row_blocks, C);
}

// BatchNorm statistics for either layout: short-run planar inputs as rows with F = S columns per
// channel; interleaved inputs keep their own loop (with rows_stats at F = 1 the training forward at
// 256x4096 measured 2.5x slower: its per-chunk loops over F do not vectorize); long planar runs one
// by one.
template <typename scalar_t, typename acc_t>
std::vector<WelfordState<double>> channel_stats(const scalar_t* x, const Geometry& g) {
  if (g.interleaved) return interleaved_stats<scalar_t, acc_t>(x, g);
  if (short_runs(g)) return rows_stats<scalar_t, acc_t>(x, g.N, g.C, g.S);
  return planar_stats<scalar_t, acc_t>(x, g);
}


// l_p statistics (the second statistics policy): per channel sum x, and sum |x|^p (p = 1, 2) or
// max |x| with the first position attaining it (p = inf), csrc/common/lp_norm_math.h. Reduced like
// BatchNorm's: per planar (n, c) run or per interleaved row chunk, in acc_t over segments of at most
// kSegment values, merged in fp64 in a fixed order (the arg-max merge keeps the smaller position on
// a tie), so results do not depend on the thread count.
struct LpPartial {
  double sum = 0, pow = 0;
  MaxAbs<double> max = maxabs_init<double>();
};

inline void lp_merge(LpPartial& a, const LpPartial& b) {
  a.sum += b.sum;
  a.pow += b.pow;
  a.max = maxabs_merge(a.max, b.max);
}

// One segment (len <= kSegment) of a planar run; `pos0` is the position of x[0] within its channel.
// For p = inf the segment's max |x| is recorded with pos0, the segment's start, as its index: the merge
// then keeps the first segment attaining the channel's maximum, and lp_planar_stats finds the element
// in that one segment per channel (a scan of every segment cost more than the rest of the pass).
template <typename scalar_t, typename acc_t, LpKind P>
void lp_segment_stats(const scalar_t* x, int64_t len, int64_t pos0, LpPartial& out) {
  out.sum += static_cast<double>(lane_sum<acc_t>(len, [&](int64_t i) { return to_acc<acc_t>(x[i]); }));
  if (P != LpKind::kLinf) {
    out.pow += static_cast<double>(lane_sum<acc_t>(len, [&](int64_t i) { return lp_power(to_acc<acc_t>(x[i]), P); }));
    return;
  }
  // maxabs_beats: NaN counts as the maximum (as torch.amax/argmax), so a channel holding one gets N_inf = NaN.
  acc_t mx[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) mx[j] = acc_t(-1);
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t a = std::abs(to_acc<acc_t>(x[i + j]));
      mx[j] = maxabs_beats(a, mx[j]) ? a : mx[j];
    }
  }
  for (int64_t j = 0; i + j < len; ++j) {
    const acc_t a = std::abs(to_acc<acc_t>(x[i + j]));
    mx[j] = maxabs_beats(a, mx[j]) ? a : mx[j];
  }
  acc_t best = acc_t(-1);
  for (int64_t j = 0; j < kLanes; ++j) best = maxabs_beats(mx[j], best) ? mx[j] : best;
  if (!(best < acc_t(0))) out.max = maxabs_merge(out.max, MaxAbs<double>{static_cast<double>(best), pos0});
}

template <typename scalar_t, typename acc_t, LpKind P>
std::vector<LpPartial> lp_planar_stats(const scalar_t* x, const Geometry& g) {
  std::vector<LpPartial> per_run(g.N * g.C);
  parallel_for(0, g.N * g.C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t s0 = 0; s0 < g.S; s0 += kSegment) {
        lp_segment_stats<scalar_t, acc_t, P>(x + r * g.S + s0, std::min(kSegment, g.S - s0), (r / g.C) * g.S + s0,
                                             per_run[r]);
      }
    }
  });
  std::vector<LpPartial> total(g.C);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c) lp_merge(total[c], per_run[n * g.C + c]);
  if (P == LpKind::kLinf) {
    // max.index is the start n * S + s0 of the first segment attaining the maximum: the first element
    // attaining it lies in that segment.
    for (int64_t c = 0; c < g.C; ++c) {
      MaxAbs<double>& m = total[c].max;
      if (m.index < 0) continue;
      const int64_t n = m.index / g.S, s0 = m.index % g.S, len = std::min(kSegment, g.S - s0);
      const scalar_t* seg = x + (n * g.C + c) * g.S + s0;
      const acc_t best = static_cast<acc_t>(m.max);
      for (int64_t k = 0; k < len; ++k) {
        if (maxabs_same(std::abs(to_acc<acc_t>(seg[k])), best)) {
          m.index += k;
          break;
        }
      }
    }
  }
  return total;
}

// Rows [r0, r1) of an interleaved (M, C) array, per channel (r1 - r0 <= kSegment).
template <typename scalar_t, typename acc_t, LpKind P>
void lp_chunk_stats(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, double* sum, double* pw, acc_t* mx,
                    int64_t* arg, LpPartial* out) {
  for (int64_t c = 0; c < C; ++c) sum[c] = 0, pw[c] = 0, mx[c] = acc_t(-1), arg[c] = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C;
    if (P == LpKind::kLinf) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = to_acc<acc_t>(row[c]);
        sum[c] += v;
        const acc_t a = std::abs(v);
        const bool better = maxabs_beats(a, mx[c]);  // strict: rows arrive in increasing position
        mx[c] = better ? a : mx[c];
        arg[c] = better ? r : arg[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = to_acc<acc_t>(row[c]);
        // |v| with std::abs and the widening written out: the ternary abs of lp_power widened
        // implicitly kept this loop from vectorizing for p = 1 (7x slower).
        const acc_t a = std::abs(v);
        sum[c] += static_cast<double>(v);
        pw[c] += static_cast<double>(P == LpKind::kL2 ? a * a : a);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    out[c].sum = sum[c];
    out[c].pow = pw[c];
    out[c].max = arg[c] >= 0 ? MaxAbs<double>{static_cast<double>(mx[c]), arg[c]} : maxabs_init<double>();
  }
}

template <typename scalar_t, typename acc_t, LpKind P>
std::vector<LpPartial> lp_interleaved_stats(const scalar_t* x, const Geometry& g) {
  const int64_t C = g.C, M = g.rows(), rpc = std::min<int64_t>(kSegment, rows_per_chunk(C));
  const int64_t nchunks = (M + rpc - 1) / rpc;
  std::vector<LpPartial> partial(nchunks * C);
  parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    // fp64 sums: fp32 sums over up to kSegment rows lose the mean at |mean| >> std (and |x|^p to a few
    // 1e-6 with fp16-range values).
    std::vector<double> sum(C), pw(C);
    std::vector<acc_t> mx(C);
    std::vector<int64_t> arg(C);
    for (int64_t b = b0; b < b1; ++b) {
      lp_chunk_stats<scalar_t, acc_t, P>(x, C, b * rpc, std::min(M, (b + 1) * rpc), sum.data(), pw.data(), mx.data(),
                                         arg.data(), &partial[b * C]);
    }
  });
  std::vector<LpPartial> total(C);
  for (int64_t b = 0; b < nchunks; ++b)
    for (int64_t c = 0; c < C; ++c) lp_merge(total[c], partial[b * C + c]);
  return total;
}

// l_p statistics of a short-run planar input as rows of C * F columns (see short_runs): per column over
// chunks of rows (lp_chunk_stats), folded per channel in column order with the column's arg-max at
// position n * F + j (j its column within the channel: the element's own position, so that the merge,
// keeping the smaller position on a tie, finds the channel's first maximum), merged in chunk order.
template <typename scalar_t, typename acc_t, LpKind P>
std::vector<LpPartial> lp_rows_stats(const scalar_t* x, int64_t R, int64_t C, int64_t F) {
  const int64_t K = C * F, rpc = std::min<int64_t>(kSegment, stats_rows_per_chunk(K));
  const int64_t nchunks = (R + rpc - 1) / rpc;
  std::vector<LpPartial> partial(nchunks * C);
  parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> sum(K), pw(K);
    std::vector<acc_t> mx(K);
    std::vector<int64_t> arg(K);
    std::vector<LpPartial> col(K);
    for (int64_t b = b0; b < b1; ++b) {
      lp_chunk_stats<scalar_t, acc_t, P>(x, K, b * rpc, std::min(R, (b + 1) * rpc), sum.data(), pw.data(), mx.data(),
                                         arg.data(), col.data());
      for (int64_t c = 0; c < C; ++c) {
        LpPartial t;
        for (int64_t j = 0; j < F; ++j) {
          LpPartial q = col[c * F + j];
          if (q.max.index >= 0) q.max.index = q.max.index * F + j;
          lp_merge(t, q);
        }
        partial[b * C + c] = t;
      }
    }
  });
  std::vector<LpPartial> total(C);
  for (int64_t b = 0; b < nchunks; ++b)
    for (int64_t c = 0; c < C; ++c) lp_merge(total[c], partial[b * C + c]);
  return total;
}

// ---------------------------------------------------------------------------------------------
// Forward: statistics (BatchNorm's or l_p's) -> per-channel (mean, scale, shift) -> one elementwise
// pass y = epilogue((x - mean) * scale + shift). Epilogues: the affine map with or without ReLU
// (BatchNorm, l_p), and the affine map followed by the noise s * a + m (noisy BatchNorm).
// An epilogue supplies
//   run(x, y, len, n, c, s0, affine):  planar: values s0 .. s0 + len of run (n, c)
//   rows(x, y, C, m0, rows, params):   interleaved: rows m0 .. m0 + rows (m = n * S + s)
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, bool RELU>
void normalize_run(const scalar_t* x, scalar_t* y, int64_t len, const ChannelAffine<acc_t>& a) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i)
    y[i] = from_acc<scalar_t>(bn_forward_value(to_acc<acc_t>(x[i]), a, RELU));
}

// `rows` consecutive rows of an interleaved array.
template <typename scalar_t, typename acc_t, bool RELU>
void normalize_rows(const scalar_t* x, scalar_t* y, int64_t C, int64_t rows, const ChannelParams<acc_t>& p) {
  const acc_t *mean = p.mean.data(), *scale = p.scale.data(), *shift = p.shift.data(), *lo = p.mean_lo.data();
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c], lo[c]};
      y[r * C + c] = from_acc<scalar_t>(bn_forward_value(to_acc<acc_t>(x[r * C + c]), a, RELU));
    }
  }
}

template <typename scalar_t, typename acc_t, bool RELU>
struct AffineEpilogue {
  void run(const scalar_t* x, scalar_t* y, int64_t len, int64_t, int64_t, int64_t, const ChannelAffine<acc_t>& a) const {
    normalize_run<scalar_t, acc_t, RELU>(x, y, len, a);
  }
  void rows(const scalar_t* x, scalar_t* y, int64_t C, int64_t, int64_t rows, const ChannelParams<acc_t>& p) const {
    normalize_rows<scalar_t, acc_t, RELU>(x, y, C, rows, p);
  }
};

// Noise of one noisy BatchNorm call as the elementwise passes draw it: per-channel (mu, sigma) once,
// then z (and v) for a stretch of elements at a time through the vectorized generator
// (csrc/cpu/noise_vec.h), bitwise equal to element_noise of csrc/common/noise.h.
// With `as_columns` a short-run planar input is drawn as the rows of C * S columns its passes see
// (short_runs): mu and sigma are repeated per column, and a row's elements have consecutive indices
// within each block of P * S columns (noise_index: (n * P + c % P) * S + s = n * P * S + k % (P * S)
// for column k = c * S + s).
struct NoiseDraw {
  const NoiseSpec& ns;
  const Geometry& g;
  bool columns;
  std::vector<float> mu, sigma;  // per channel, or per column with `columns`
  NoiseDraw(const NoiseSpec& spec, const Geometry& geo, bool as_columns = false)
      : ns(spec), g(geo), columns(as_columns) {
    const int64_t F = columns ? g.S : 1;
    mu.resize(g.C * F);
    sigma.resize(g.C * F);
    for (int64_t c = 0; c < g.C; ++c) {
      const ChannelNoise ch = channel_noise(ns, c);
      for (int64_t j = 0; j < F; ++j) mu[c * F + j] = ch.mu, sigma[c * F + j] = ch.sigma;
    }
  }
  // Columns [k0, k1) of row n of the column view, in pieces that do not cross a block of P * S columns.
  void column_row(int64_t n, int64_t k0, int64_t k1, float* z, float* v) const {
    const int64_t B = ns.period * g.S;
    for (int64_t a = k0; a < k1;) {
      const int64_t b = std::min(k1, (a / B + 1) * B);
      noise_cpu::normal_block(ns, n * B + a % B, 1, b - a, z + (a - k0), v ? v + (a - k0) : nullptr);
      a = b;
    }
  }
  // Planar: the len (<= kSegment) consecutive values s0.. of run (n, c) have consecutive indices.
  void run(int64_t n, int64_t c, int64_t s0, int64_t len, float* z, float* v) const {
    noise_cpu::normal_block(ns, noise_index(n, c, s0, ns.period, g.S), 1, len, z, v);
  }
  // Interleaved: channels [c0, c1) of row m = n * S + s, in pieces that do not cross a multiple of
  // the period P (within one, the indices step by S).
  void row(int64_t m, int64_t c0, int64_t c1, float* z, float* v) const {
    if (columns) return column_row(m, c0, c1, z, v);
    noise_cpu::normal_row(ns, m / g.S, m % g.S, c0, c1, g.S, z, v);
  }
  // Interleaved, whole rows: z[r * C + c] for rows m0 .. m0 + rows. With S even, rows (s, s + 1), s even,
  // hold the two elements of each pair (their indices differ by 1, the first even), so both rows come
  // from one draw per pair; other rows are drawn alone.
  void rows(int64_t m0, int64_t rows, float* z, float* v) const {
    if (columns) {
      const int64_t K = g.C * g.S;
      for (int64_t r = 0; r < rows; ++r) column_row(m0 + r, 0, K, z + r * K, v ? v + r * K : nullptr);
      return;
    }
    const int64_t C = g.C, S = g.S;
    if (C < kNarrowRow && S >= kNarrowRow) return channel_runs(m0, rows, z, v);
    for (int64_t r = 0; r < rows;) {
      const int64_t m = m0 + r, n = m / S, s = m % S;
      if (S % 2 == 0 && s % 2 == 0 && r + 1 < rows) {
        noise_cpu::normal_row_pair(ns, n, s, 0, C, S, z + r * C, z + (r + 1) * C, v ? v + r * C : nullptr,
                                   v ? v + (r + 1) * C : nullptr);
        r += 2;
      } else {
        row(m, 0, C, z + r * C, v ? v + r * C : nullptr);
        r += 1;
      }
    }
  }

 private:
  // A row of fewer than kNarrowRow channels fills less than one vector of the generator, which then
  // draws most values on its scalar tail (~35 ns each instead of ~2.5; 128x8x32x32 channels-last
  // forward+backward took 41 ms against 2.7 ms planar). Along s the indices of one channel are
  // consecutive, so rows m0.. are drawn as one contiguous block per (sample, channel), the vector
  // generator's fast case, and scattered into the row-major tile: the same values (the generator is
  // counter-based: a value depends on its index only).
  static constexpr int64_t kNarrowRow = 16;
  void channel_runs(int64_t m0, int64_t rows, float* z, float* v) const {
    const int64_t C = g.C, S = g.S;
    alignas(64) float zc[kSegment], vc[kSegment];
    for (int64_t r = 0; r < rows;) {
      const int64_t m = m0 + r, n = m / S, s = m % S;
      const int64_t len = std::min({rows - r, S - s, kSegment});  // rows of one sample
      for (int64_t c = 0; c < C; ++c) {
        noise_cpu::normal_block(ns, noise_index(n, c, s, ns.period, S), 1, len, zc, v ? vc : nullptr);
        for (int64_t i = 0; i < len; ++i) z[(r + i) * C + c] = zc[i];
        if (v)
          for (int64_t i = 0; i < len; ++i) v[(r + i) * C + c] = vc[i];
      }
      r += len;
    }
  }
};

// y = s * a + m, a = the affine normalization; s, m as element_noise computes them (fp32), the product
// and sum in acc_t.
template <typename scalar_t, typename acc_t>
struct NoiseEpilogue {
  const NoiseDraw& noise;
  void run(const scalar_t* x, scalar_t* y, int64_t len, int64_t n, int64_t c, int64_t s0,
           const ChannelAffine<acc_t>& a) const {
    alignas(64) float z[kSegment], v[kSegment];
    noise.run(n, c, s0, len, z, v);
    const float sigma = noise.sigma[c], mu = noise.mu[c];
    const float sd = noise.ns.noise_std_spread, md = noise.ns.noise_mean_spread;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t an = bn_forward_value(to_acc<acc_t>(x[i]), a, false);
      const float s = sigma + sd * z[i], m = mu + md * v[i];
      y[i] = from_acc<scalar_t>(static_cast<acc_t>(s) * an + static_cast<acc_t>(m));
    }
  }
  void rows(const scalar_t* x, scalar_t* y, int64_t C, int64_t m0, int64_t rows, const ChannelParams<acc_t>& p) const {
    alignas(64) float z[kSegment], v[kSegment];
    const acc_t *mean = p.mean.data(), *scale = p.scale.data(), *shift = p.shift.data(), *lo = p.mean_lo.data();
    const float *sigma = noise.sigma.data(), *mu = noise.mu.data();
    const float sd = noise.ns.noise_std_spread, md = noise.ns.noise_mean_spread;
    // channels [c0, c1) of row r, their noise at zr[c - c0], vr[c - c0]
    auto apply = [&](int64_t r, int64_t c0, int64_t c1, const float* zr, const float* vr) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c], lo[c]};
        const acc_t an = bn_forward_value(to_acc<acc_t>(xr[c]), a, false);
        const float s = sigma[c] + sd * zr[c - c0], m = mu[c] + md * vr[c - c0];
        yr[c] = from_acc<scalar_t>(static_cast<acc_t>(s) * an + static_cast<acc_t>(m));
      }
    };
    if (rows * C <= kSegment) {  // the whole tile's noise in one go (row pairs share their draws)
      noise.rows(m0, rows, z, v);
      for (int64_t r = 0; r < rows; ++r) apply(r, 0, C, z + r * C, v + r * C);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c0 = 0; c0 < C; c0 += kSegment) {
        const int64_t c1 = std::min(C, c0 + kSegment);
        noise.row(m0 + r, c0, c1, z, v);
        apply(r, c0, c1, z, v);
      }
    }
  }
};

// The elementwise pass: reads x once, writes y once (non-temporal for large planar outputs).
template <typename scalar_t, typename acc_t, typename Epilogue>
void normalize_pass(const scalar_t* xp, scalar_t* yp, const Geometry& g, const ChannelParams<acc_t>& p,
                    const Epilogue& epi) {
  const int64_t C = g.C;
  if (!g.interleaved) {
    parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
      OutputTiles<scalar_t> out(g, kSegment);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / C, c = r % C;
        for (int64_t s0 = 0; s0 < g.S; s0 += kSegment) {
          const int64_t off = r * g.S + s0, len = std::min(kSegment, g.S - s0);
          epi.run(xp + off, out.begin(yp + off), len, n, c, s0, p.affine(c));
          out.end(yp + off, len);
        }
      }
    });
    return;
  }
  const int64_t rows_per_tile = std::max<int64_t>(1, kSegment / C);
  parallel_for(0, g.rows(), rows_per_chunk(C), [&](int64_t r0, int64_t r1) {
    OutputTiles<scalar_t> out(g, rows_per_tile * C);
    for (int64_t t0 = r0; t0 < r1; t0 += rows_per_tile) {
      const int64_t rows = std::min(rows_per_tile, r1 - t0);
      epi.rows(xp + t0 * C, out.begin(yp + t0 * C), C, t0, rows, p);
      out.end(yp + t0 * C, rows * C);
    }
  });
}

// The affine elementwise pass (BatchNorm, l_p), either layout; short-run planar inputs run as rows
// of C * S columns.
template <typename scalar_t, typename acc_t, bool RELU>
void affine_pass(const scalar_t* xp, scalar_t* yp, const Geometry& g, const ChannelParams<acc_t>& p) {
  if (!short_runs(g)) {
    normalize_pass(xp, yp, g, p, AffineEpilogue<scalar_t, acc_t, RELU>{});
    return;
  }
  const ChannelParams<acc_t> pc = p.repeat(g.S);
  const int64_t K = g.C * g.S;
  parallel_for(0, g.N, rows_per_chunk(K), [&](int64_t r0, int64_t r1) {
    normalize_rows<scalar_t, acc_t, RELU>(xp + r0 * K, yp + r0 * K, K, r1 - r0, pc);
  });
}

// BatchNorm statistics of x into mean / var (biased), acc_t, and the fp64 mean (returned).
template <typename scalar_t, typename acc_t>
std::vector<double> bn_statistics(const scalar_t* xp, const Geometry& g, acc_t* mp, acc_t* vp) {
  const auto st = channel_stats<scalar_t, acc_t>(xp, g);
  std::vector<double> mean64(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    mean64[c] = st[c].mean;
    mp[c] = static_cast<acc_t>(st[c].mean);
    if (vp) vp[c] = static_cast<acc_t>(welford_variance(st[c]));
  }
  return mean64;
}

template <typename scalar_t, bool RELU>
void forward_kernel(const at::Tensor& x, at::Tensor& y, const Geometry& g, bool training, double eps,
                    const at::Tensor& weight, const at::Tensor& bias, at::Tensor& mean,
                    at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  std::vector<double> mean64;
  if (training) mean64 = bn_statistics<scalar_t, acc_t>(xp, g, mp, vp);
  ChannelParams<acc_t> p(g.C, mp, vp, eps, weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>());
  if (training) p.set_residuals(mean64.data(), false);
  affine_pass<scalar_t, acc_t, RELU>(xp, y.mutable_data_ptr<scalar_t>(), g, p);
}

// ---------------------------------------------------------------------------------------------
// Backward: pass 1 reduces sum g and sum g * (x - mean) per channel (g = the gradient reaching the
// affine normalization), pass 2 (training) writes dx from those sums. A backward policy supplies
//   sums(dy, x, out, len, n, c, s0, sum_dy, sum_dy_xc)     planar segment, pass 1
//   sums_rows(dy, x, out, C, m0, rows, s_dy, s_dy_xc)       interleaved rows, pass 1
//   prepare(tot_dy, tot_dy_xc)                             per-channel coefficients of pass 2
//   input_grad(dy, x, g, out, len, n, c, s0)               planar segment, pass 2
//   input_grad_rows(dy, x, g, out, C, m0, rows)            interleaved rows, pass 2
//   writes_in_sums(training): whether pass 1 writes to `out` (dx's memory)
// where `g` points at what pass 1 left in dx's memory (noisy BatchNorm keeps g = dy * s there, so
// that the noise is drawn once).
// Policies: BatchNorm (g = dy, masked by the fused ReLU; eval writes dx in pass 1), noisy BatchNorm
// (g = dy * s with s regenerated from the seed), l_p (dx = (g - mean_dy - q * dir(x)) * coeff).
// ---------------------------------------------------------------------------------------------

// bn_masked_grad for the interleaved loops, as a bitwise AND of dy with the ReLU's mask: the same
// values (+0 where y <= 0, dy elsewhere, dy where y is NaN), but written as a select GCC folds it
// into an AVX-512 masked load of dy that waits for x's arithmetic. Measured on the channels-last
// training backward with ReLU (128x64x32x32 fp32, 1 thread): 10.3 -> 8.8 ms (6.1 ms without ReLU;
// GCC still emits a masked load in the sums pass, the dx pass no longer does; staging dy in an L1
// tile first made no difference).
template <typename acc_t>
inline acc_t relu_masked_grad(acc_t dy, acc_t x, const ChannelAffine<acc_t>& a) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  const acc_t y = centred(x, a.mean, a.mean_lo) * a.scale + a.shift;
  const bits_t keep = y <= acc_t(0) ? bits_t(0) : ~bits_t(0);
  return __builtin_bit_cast(acc_t, __builtin_bit_cast(bits_t, dy) & keep);
}

template <typename acc_t, bool RELU>
inline acc_t masked_grad_rows(acc_t dy, acc_t x, const ChannelAffine<acc_t>& a) {
  if constexpr (RELU) {
    return relu_masked_grad(dy, x, a);
  } else {
    return dy;
  }
}

// Sums of g and g * (x - mean) over one segment (len <= kSegment), g = dy masked by the recomputed
// ReLU. With WRITE_EVAL_GRAD the eval-mode input gradient g * scale is written in the same pass.
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
void grad_sums_segment(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                       const ChannelAffine<acc_t>& a, double* sum_dy, double* sum_dy_xc, double* sum_xc) {
  acc_t p_dy[kLanes] = {}, p_dy_xc[kLanes] = {}, p_xc[kLanes] = {};
  auto body = [&](int64_t i, int64_t j) {
    const acc_t xv = to_acc<acc_t>(x[i]);
    const acc_t gv = bn_masked_grad(to_acc<acc_t>(dy[i]), xv, a, RELU);
    p_dy[j] += gv;
    p_dy_xc[j] += gv * (xv - a.mean);
    p_xc[j] += xv - a.mean;
    if (WRITE_EVAL_GRAD) dx[i] = from_acc<scalar_t>(gv * a.scale);
  };
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) body(i + j, j);
  }
  for (int64_t j = 0; i + j < len; ++j) body(i + j, j);
  *sum_dy += fold_lanes(p_dy);
  *sum_dy_xc += fold_lanes(p_dy_xc);
  *sum_xc += fold_lanes(p_xc);
}

// Interleaved: per-channel sums over `rows` rows in acc_t, added to s_dy / s_dy_xc. With
// WRITE_EVAL_GRAD the eval-mode input gradient is written to dx in the same pass.
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
void interleaved_grad_sums(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C, int64_t rows,
                           const ChannelParams<acc_t>& p, acc_t* s_dy, acc_t* s_dy_xc, acc_t* s_xc) {
  const acc_t *mean = p.mean.data(), *scale = p.scale.data(), *shift = p.shift.data(), *lo = p.mean_lo.data();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c], lo[c]};
      const acc_t xv = to_acc<acc_t>(x[off + c]);
      const acc_t gv = masked_grad_rows<acc_t, RELU>(to_acc<acc_t>(dy[off + c]), xv, a);
      s_dy[c] += gv;
      s_dy_xc[c] += gv * (xv - mean[c]);
      s_xc[c] += xv - mean[c];
      if (WRITE_EVAL_GRAD) dx[off + c] = from_acc<scalar_t>(gv * scale[c]);
    }
  }
}

// What every policy knows: the forward's per-channel constants and the count M.
// Pass 1 centres on the saved acc_t mean m (p.mean; the ReLU mask uses p.mean_lo, the forward's
// residual); `centre` then moves the sums to the exact batch mean m + delta, delta = sum (x - m) / M,
// and keeps delta (rounded) as `lo` for pass 2 -- when m is the rounding of that mean, i.e. the
// statistics are this input's (not, say, another rank's or made-up ones, which are used as given).
template <typename acc_t>
struct BackwardCommon {
  const ChannelParams<acc_t>& p;  // p.scale = invstd * w: dx = (...) * p.scale
  double M;                       // values per channel
  bool training;
  std::vector<acc_t> lo = {};     // residual of the mean in pass 2, from centre()

  void centre(const double* tot_dy, double* tot_dy_xc, const double* tot_xc) {
    const int64_t C = static_cast<int64_t>(p.mean.size());
    lo.assign(C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      const double m = static_cast<double>(p.mean[c]), delta = tot_xc[c] / M;
      if (!(static_cast<acc_t>(m + delta) == p.mean[c])) continue;
      tot_dy_xc[c] -= delta * tot_dy[c];  // sum g (x - m - delta) = sum g (x - m) - delta sum g
      lo[c] = static_cast<acc_t>(delta);
    }
  }

  // BatchNorm's training-mode coefficients of dx from the channel's fp64 sums.
  ChannelBackward<acc_t> coeffs(int64_t c, double s_dy, double s_dy_xc) const {
    const double inv = static_cast<double>(p.invstd[c]);
    return ChannelBackward<acc_t>{p.mean[c], static_cast<acc_t>(s_dy / M), static_cast<acc_t>(s_dy_xc * inv * inv / M),
                                  p.scale[c]};
  }
};

// BatchNorm (+ fused ReLU): g = dy masked by the ReLU; eval writes dx = g * scale in pass 1.
template <typename scalar_t, typename acc_t, bool RELU>
struct BnBackward : BackwardCommon<acc_t> {
  std::vector<acc_t> mean_dy, proj;
  BnBackward(const BackwardCommon<acc_t>& b) : BackwardCommon<acc_t>(b) {}
  bool writes_in_sums() const { return !this->training; }

  void sums(const scalar_t* dy, const scalar_t* x, scalar_t* out, int64_t len, int64_t, int64_t c, int64_t,
            double* s_dy, double* s_dy_xc, double* s_xc) const {
    if (this->training) {
      grad_sums_segment<scalar_t, acc_t, RELU, false>(dy, x, nullptr, len, this->p.affine(c), s_dy, s_dy_xc, s_xc);
    } else {
      grad_sums_segment<scalar_t, acc_t, RELU, true>(dy, x, out, len, this->p.affine(c), s_dy, s_dy_xc, s_xc);
    }
  }
  void sums_rows(const scalar_t* dy, const scalar_t* x, scalar_t* out, int64_t C, int64_t, int64_t rows, acc_t* s_dy,
                 acc_t* s_dy_xc, acc_t* s_xc) const {
    if (this->training) {
      interleaved_grad_sums<scalar_t, acc_t, RELU, false>(dy, x, nullptr, C, rows, this->p, s_dy, s_dy_xc, s_xc);
    } else {
      interleaved_grad_sums<scalar_t, acc_t, RELU, true>(dy, x, out, C, rows, this->p, s_dy, s_dy_xc, s_xc);
    }
  }
  void prepare(const double* tot_dy, const double* tot_dy_xc) {
    const int64_t C = static_cast<int64_t>(this->p.mean.size());
    mean_dy.resize(C);
    proj.resize(C);
    for (int64_t c = 0; c < C; ++c) {
      const auto k = this->coeffs(c, tot_dy[c], tot_dy_xc[c]);
      mean_dy[c] = k.mean_dy;
      proj[c] = k.proj;
    }
  }
  void input_grad(const scalar_t* dy, const scalar_t* x, const scalar_t*, scalar_t* out, int64_t len, int64_t,
                  int64_t c, int64_t) const {
    const ChannelAffine<acc_t> a = this->p.affine(c);
    const ChannelBackward<acc_t> k{a.mean, mean_dy[c], proj[c], a.scale, this->lo[c]};
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t xv = to_acc<acc_t>(x[i]);
      const acc_t gv = bn_masked_grad(to_acc<acc_t>(dy[i]), xv, a, RELU);
      out[i] = from_acc<scalar_t>(bn_backward_train_value(gv, xv, k));
    }
  }
  void input_grad_rows(const scalar_t* dy, const scalar_t* x, const scalar_t*, scalar_t* out, int64_t C, int64_t,
                       int64_t rows) const {
    const acc_t *mean = this->p.mean.data(), *scale = this->p.scale.data(), *shift = this->p.shift.data();
    const acc_t *mlo = this->p.mean_lo.data(), *lo = this->lo.data();
    const acc_t *mdy = mean_dy.data(), *pj = proj.data();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const ChannelAffine<acc_t> af{mean[c], scale[c], shift[c], mlo[c]};
        const ChannelBackward<acc_t> k{mean[c], mdy[c], pj[c], scale[c], lo[c]};
        const acc_t xv = to_acc<acc_t>(x[off + c]);
        const acc_t gv = masked_grad_rows<acc_t, RELU>(to_acc<acc_t>(dy[off + c]), xv, af);
        out[off + c] = from_acc<scalar_t>(bn_backward_train_value(gv, xv, k));
      }
    }
  }
};

// Noisy BatchNorm (training only): g = dy * s, s regenerated from the seed in pass 1 and left in dx's
// memory (in scalar_t, as a materialized dy * s would be) for pass 2, which is BatchNorm's formula.
template <typename scalar_t, typename acc_t>
struct NoisyBackward : BnBackward<scalar_t, acc_t, false> {
  const NoiseDraw& noise;
  NoisyBackward(const BackwardCommon<acc_t>& b, const NoiseDraw& nd) : BnBackward<scalar_t, acc_t, false>(b), noise(nd) {}
  bool writes_in_sums() const { return true; }

  // g = dy * s of one planar segment (noise z), written to out and reduced like grad_sums_segment.
  void sums(const scalar_t* dy, const scalar_t* x, scalar_t* out, int64_t len, int64_t n, int64_t c, int64_t s0,
            double* s_dy, double* s_dy_xc, double* s_xc) const {
    alignas(64) float z[kSegment];
    noise.run(n, c, s0, len, z, nullptr);
    const float sigma = noise.sigma[c], sd = noise.ns.noise_std_spread;
    const acc_t mean = this->p.mean[c];
    acc_t p_dy[kLanes] = {}, p_dy_xc[kLanes] = {}, p_xc[kLanes] = {};
    auto body = [&](int64_t i, int64_t j) {
      const float s = sigma + sd * z[i];
      const scalar_t gs = from_acc<scalar_t>(to_acc<acc_t>(dy[i]) * static_cast<acc_t>(s));
      out[i] = gs;
      const acc_t gv = to_acc<acc_t>(gs);
      const acc_t xc = to_acc<acc_t>(x[i]) - mean;
      p_dy[j] += gv;
      p_dy_xc[j] += gv * xc;
      p_xc[j] += xc;
    };
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) body(i + j, j);
    }
    for (int64_t j = 0; i + j < len; ++j) body(i + j, j);
    *s_dy += fold_lanes(p_dy);
    *s_dy_xc += fold_lanes(p_dy_xc);
    *s_xc += fold_lanes(p_xc);
  }
  void sums_rows(const scalar_t* dy, const scalar_t* x, scalar_t* out, int64_t C, int64_t m0, int64_t rows, acc_t* s_dy,
                 acc_t* s_dy_xc, acc_t* s_xc) const {
    alignas(64) float z[kSegment];
    const acc_t* mean = this->p.mean.data();
    const float* sigma = noise.sigma.data();
    const float sd = noise.ns.noise_std_spread;
    // channels [c0, c1) of row r, their noise at zr[c - c0]
    auto apply = [&](int64_t r, int64_t c0, int64_t c1, const float* zr) {
      const int64_t off = r * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const float s = sigma[c] + sd * zr[c - c0];
        const scalar_t gs = from_acc<scalar_t>(to_acc<acc_t>(dy[off + c]) * static_cast<acc_t>(s));
        out[off + c] = gs;
        const acc_t gv = to_acc<acc_t>(gs);
        const acc_t xc = to_acc<acc_t>(x[off + c]) - mean[c];
        s_dy[c] += gv;
        s_dy_xc[c] += gv * xc;
        s_xc[c] += xc;
      }
    };
    if (rows * C <= kSegment) {  // the whole tile's noise in one go (row pairs share their draws)
      noise.rows(m0, rows, z, nullptr);
      for (int64_t r = 0; r < rows; ++r) apply(r, 0, C, z + r * C);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c0 = 0; c0 < C; c0 += kSegment) {
        noise.row(m0 + r, c0, std::min(C, c0 + kSegment), z, nullptr);
        apply(r, c0, std::min(C, c0 + kSegment), z);
      }
    }
  }
  void input_grad(const scalar_t*, const scalar_t* x, const scalar_t* g, scalar_t* out, int64_t len, int64_t n,
                  int64_t c, int64_t s0) const {
    BnBackward<scalar_t, acc_t, false>::input_grad(g, x, nullptr, out, len, n, c, s0);
  }
  void input_grad_rows(const scalar_t*, const scalar_t* x, const scalar_t* g, scalar_t* out, int64_t C, int64_t m0,
                       int64_t rows) const {
    BnBackward<scalar_t, acc_t, false>::input_grad_rows(g, x, nullptr, out, C, m0, rows);
  }
};

// l_p: the sums are BatchNorm's (invstd := 1 / (N + eps)); pass 2 is lp_backward_train_value. For
// p = inf, dir(x) is zero except at the channel's arg-max, so pass 2 does not read x and `finish`
// corrects the arg-max elements afterwards.
template <typename scalar_t, typename acc_t, LpKind P>
struct LpBackwardPolicy : BnBackward<scalar_t, acc_t, false> {
  const acc_t* norm;          // N per channel
  const int64_t* argmax;      // p = inf: position n * S + s of each channel's arg-max
  double eps;
  const acc_t* weight;
  std::vector<LpBackward<acc_t>> k;
  std::vector<acc_t> mean_dy_, q_, coeff_;  // k by field, for the interleaved rows (vectorized over C)
  LpBackwardPolicy(const BackwardCommon<acc_t>& b, const acc_t* nrm, const int64_t* am, double e, const acc_t* w)
      : BnBackward<scalar_t, acc_t, false>(b), norm(nrm), argmax(am), eps(e), weight(w) {}

  void prepare(const double* tot_dy, const double* tot_dy_xc) {
    const int64_t C = static_cast<int64_t>(this->p.mean.size());
    k.resize(C);
    for (int64_t c = 0; c < C; ++c) {
      k[c] = lp_backward_coeffs<acc_t>(P, tot_dy[c], tot_dy_xc[c], static_cast<double>(norm[c]), eps,
                                       static_cast<double>(weight[c]), this->M, argmax[c]);
      mean_dy_.push_back(k[c].mean_dy);
      q_.push_back(k[c].q);
      coeff_.push_back(k[c].coeff);
    }
  }
  // dN/dx direction (lp_norm_math.h), sign(0) = 0, written without branches so that loops vectorize.
  static acc_t dir(acc_t xv) {
    if (P == LpKind::kL2) return xv;
    return static_cast<acc_t>(xv > acc_t(0)) - static_cast<acc_t>(xv < acc_t(0));
  }
  void input_grad(const scalar_t* dy, const scalar_t* x, const scalar_t*, scalar_t* out, int64_t len, int64_t,
                  int64_t c, int64_t) const {
    const acc_t mdy = k[c].mean_dy, q = k[c].q, coeff = k[c].coeff;
    if (P == LpKind::kLinf) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] = from_acc<scalar_t>((to_acc<acc_t>(dy[i]) - mdy) * coeff);
      return;
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      out[i] = from_acc<scalar_t>((to_acc<acc_t>(dy[i]) - mdy - q * dir(to_acc<acc_t>(x[i]))) * coeff);
  }
  void input_grad_rows(const scalar_t* dy, const scalar_t* x, const scalar_t*, scalar_t* out, int64_t C, int64_t,
                       int64_t rows) const {
    const acc_t *mdy = mean_dy_.data(), *q = q_.data(), *coeff = coeff_.data();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = P == LpKind::kLinf ? acc_t(0) : q[c] * dir(to_acc<acc_t>(x[off + c]));
        out[off + c] = from_acc<scalar_t>((to_acc<acc_t>(dy[off + c]) - mdy[c] - d) * coeff[c]);
      }
    }
  }
  // p = inf: the arg-max elements of the input of geometry g, after pass 2 (dx must already hold every
  // other value). F > 1: the policy ran over the columns of a short-run input, F per channel.
  void finish(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g, int64_t F = 1) const {
    if (P != LpKind::kLinf) return;
    for (int64_t c = 0; c < g.C; ++c) {
      const LpBackward<acc_t>& kc = k[c * F];
      const int64_t pos = kc.argmax;
      if (pos < 0) continue;
      const int64_t off = g.interleaved ? pos * g.C + c : ((pos / g.S) * g.C + c) * g.S + pos % g.S;
      dx[off] = from_acc<scalar_t>(
          lp_backward_train_value(to_acc<acc_t>(dy[off]), to_acc<acc_t>(x[off]), pos, kc, LpKind::kLinf));
    }
  }
};

// Rows per chunk of the interleaved backward sums: pass 1 reads each value once (no second sweep to
// keep cached), so only the per-chunk cost matters (three C-wide accumulators cleared, one fp64
// partial per channel), and a chunk keeps at least kStatsRows rows, up to kSegment in acc_t.
inline int64_t grad_rows_per_chunk(int64_t C) {
  return std::min(kSegment, std::max(kStatsRows, rows_per_chunk(C)));
}

// The two passes for either layout. Sums per planar run (merged per channel in n order) or per
// interleaved chunk (merged in chunk order), in fp64 totals; training then writes dx.
// Interleaved with F > 1: g is a short-run planar input seen as rows of g.C = C * F columns, F per
// channel, and the policy's constants are per column (ChannelParams::repeat); each chunk's column
// sums are folded per channel (column order), and the totals come back per column (each column holds
// its channel's), so that pass 2 runs over columns.
template <typename scalar_t, typename acc_t, typename Policy>
void backward_passes(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g, Policy& pol,
                     double* tot_dy, double* tot_dy_xc, int64_t F = 1) {
  const int64_t C = g.C;
  const bool writes = pol.writes_in_sums();
  if (!g.interleaved) {
    std::vector<double> run_dy(g.N * C, 0.0), run_dy_xc(g.N * C, 0.0), run_xc(g.N * C, 0.0);
    parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
      OutputTiles<scalar_t> out(g, writes ? kSegment : 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / C, c = r % C;
        for (int64_t s0 = 0; s0 < g.S; s0 += kSegment) {
          const int64_t off = r * g.S + s0, len = std::min(kSegment, g.S - s0);
          pol.sums(dy + off, x + off, writes ? out.begin(dx + off) : nullptr, len, n, c, s0, &run_dy[r], &run_dy_xc[r],
                   &run_xc[r]);
          if (writes) out.end(dx + off, len);
        }
      }
    });
    std::vector<double> tot_xc(C, 0.0);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < C; ++c)
        tot_dy[c] += run_dy[n * C + c], tot_dy_xc[c] += run_dy_xc[n * C + c], tot_xc[c] += run_xc[n * C + c];
    if (!pol.training) return;
    pol.centre(tot_dy, tot_dy_xc, tot_xc.data());
    pol.prepare(tot_dy, tot_dy_xc);
    parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
      OutputTiles<scalar_t> out(g, kSegment);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / C, c = r % C;
        for (int64_t s0 = 0; s0 < g.S; s0 += kSegment) {
          const int64_t off = r * g.S + s0, len = std::min(kSegment, g.S - s0);
          pol.input_grad(dy + off, x + off, dx + off, out.begin(dx + off), len, n, c, s0);
          out.end(dx + off, len);
        }
      }
    });
    return;
  }
  const int64_t M_rows = g.rows(), rpc = grad_rows_per_chunk(C), Cr = C / F;
  const int64_t nchunks = (M_rows + rpc - 1) / rpc, rows_per_tile = std::max<int64_t>(1, kSegment / C);
  std::vector<double> part_dy(nchunks * Cr), part_dy_xc(nchunks * Cr), part_xc(nchunks * Cr);
  parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> s_dy(C), s_dy_xc(C), s_xc(C);
    OutputTiles<scalar_t> out(g, writes ? rows_per_tile * C : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      std::fill(s_dy.begin(), s_dy.end(), acc_t(0));
      std::fill(s_dy_xc.begin(), s_dy_xc.end(), acc_t(0));
      std::fill(s_xc.begin(), s_xc.end(), acc_t(0));
      const int64_t r1 = std::min(M_rows, (blk + 1) * rpc);
      for (int64_t t0 = blk * rpc; t0 < r1; t0 += rows_per_tile) {
        const int64_t rows = std::min(rows_per_tile, r1 - t0), off = t0 * C;
        pol.sums_rows(dy + off, x + off, writes ? out.begin(dx + off) : nullptr, C, t0, rows, s_dy.data(),
                      s_dy_xc.data(), s_xc.data());
        if (writes) out.end(dx + off, rows * C);
      }
      if (F == 1) {  // plain interleaved: no fold (a loop over F per channel does not vectorize)
        for (int64_t c = 0; c < C; ++c)
          part_dy[blk * C + c] = s_dy[c], part_dy_xc[blk * C + c] = s_dy_xc[c], part_xc[blk * C + c] = s_xc[c];
        continue;
      }
      for (int64_t c = 0; c < Cr; ++c) {
        acc_t a = 0, b = 0, d = 0;
        for (int64_t j = 0; j < F; ++j) a += s_dy[c * F + j], b += s_dy_xc[c * F + j], d += s_xc[c * F + j];
        part_dy[blk * Cr + c] = a, part_dy_xc[blk * Cr + c] = b, part_xc[blk * Cr + c] = d;
      }
    }
  });
  std::vector<double> ch_dy(Cr, 0.0), ch_dy_xc(Cr, 0.0), ch_xc(Cr, 0.0);
  for (int64_t blk = 0; blk < nchunks; ++blk)
    for (int64_t c = 0; c < Cr; ++c)
      ch_dy[c] += part_dy[blk * Cr + c], ch_dy_xc[c] += part_dy_xc[blk * Cr + c], ch_xc[c] += part_xc[blk * Cr + c];
  std::vector<double> tot_xc(C);
  for (int64_t c = 0; c < Cr; ++c)
    for (int64_t k = c * F; k < (c + 1) * F; ++k) tot_dy[k] += ch_dy[c], tot_dy_xc[k] += ch_dy_xc[c], tot_xc[k] = ch_xc[c];
  if (!pol.training) return;
  pol.centre(tot_dy, tot_dy_xc, tot_xc.data());
  pol.prepare(tot_dy, tot_dy_xc);
  parallel_for(0, M_rows, rpc, [&](int64_t r0, int64_t r1) {
    OutputTiles<scalar_t> out(g, rows_per_tile * C);
    for (int64_t t0 = r0; t0 < r1; t0 += rows_per_tile) {
      const int64_t rows = std::min(rows_per_tile, r1 - t0), off = t0 * C;
      pol.input_grad_rows(dy + off, x + off, dx + off, out.begin(dx + off), C, t0, rows);
      out.end(dx + off, rows * C);
    }
  });
}

// (sum_dy, sum_dy_xhat) outputs from the fp64 totals: sum_dy_xhat = sum g * (x - mean) * invstd.
template <typename acc_t>
void write_grad_sums(const double* tot_dy, const double* tot_dy_xc, const ChannelParams<acc_t>& p, at::Tensor& sum_dy,
                     at::Tensor& sum_dy_xhat) {
  acc_t* out_dy = sum_dy.mutable_data_ptr<acc_t>();
  acc_t* out_dy_xhat = sum_dy_xhat.mutable_data_ptr<acc_t>();
  for (size_t c = 0; c < p.mean.size(); ++c) {
    out_dy[c] = static_cast<acc_t>(tot_dy[c]);
    out_dy_xhat[c] = static_cast<acc_t>(tot_dy_xc[c] * static_cast<double>(p.invstd[c]));
  }
}

template <typename scalar_t, bool RELU>
void backward_kernel(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const Geometry& g,
                     bool training, double eps, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& mean_t, const at::Tensor& var_t, at::Tensor& sum_dy_t,
                     at::Tensor& sum_dy_xhat_t) {
  using acc_t = at::opmath_type<scalar_t>;
  ChannelParams<acc_t> p(g.C, mean_t.const_data_ptr<acc_t>(), var_t.const_data_ptr<acc_t>(), eps,
                         weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>());
  if (RELU && training && p.any_residual_matters()) {
    // The ReLU mask needs the forward's residual before pass 1: the forward's statistics once more
    // (same code, same input: the same fp64 mean bitwise). Only at |mean| >= 256 std.
    std::vector<acc_t> m(g.C);
    const std::vector<double> mean64 = bn_statistics<scalar_t, acc_t>(x_t.const_data_ptr<scalar_t>(), g, m.data(), nullptr);
    p.set_residuals(mean64.data(), false);
  }
  std::vector<double> tot_dy(g.C, 0.0), tot_dy_xc(g.C, 0.0);
  const scalar_t* dy = dy_t.const_data_ptr<scalar_t>();
  const scalar_t* x = x_t.const_data_ptr<scalar_t>();
  scalar_t* dx = dx_t.mutable_data_ptr<scalar_t>();
  if (short_runs(g)) {  // as rows of C * S columns (see short_runs)
    const int64_t K = g.C * g.S;
    const ChannelParams<acc_t> pc = p.repeat(g.S);
    BnBackward<scalar_t, acc_t, RELU> pol(BackwardCommon<acc_t>{pc, static_cast<double>(g.rows()), training});
    std::vector<double> col_dy(K, 0.0), col_dy_xc(K, 0.0);
    backward_passes<scalar_t, acc_t>(dy, x, dx, Geometry{true, g.N, K, 1}, pol, col_dy.data(), col_dy_xc.data(), g.S);
    for (int64_t c = 0; c < g.C; ++c) tot_dy[c] = col_dy[c * g.S], tot_dy_xc[c] = col_dy_xc[c * g.S];
  } else {
    BnBackward<scalar_t, acc_t, RELU> pol(BackwardCommon<acc_t>{p, static_cast<double>(g.rows()), training});
    backward_passes<scalar_t, acc_t>(dy, x, dx, g, pol, tot_dy.data(), tot_dy_xc.data());
  }
  write_grad_sums(tot_dy.data(), tot_dy_xc.data(), p, sum_dy_t, sum_dy_xhat_t);
}

// l_p: the per-channel constants of the elementwise passes, invstd := 1 / (N + eps) (in fp64).
template <typename acc_t>
ChannelParams<acc_t> lp_params(int64_t C, const at::Tensor& mean, const at::Tensor& norm, double eps,
                               const at::Tensor& w, const at::Tensor& b) {
  std::vector<acc_t> inv(C);
  const acc_t* n = norm.const_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) inv[c] = static_cast<acc_t>(1.0 / (static_cast<double>(n[c]) + eps));
  return ChannelParams<acc_t>(C, mean.const_data_ptr<acc_t>(), inv.data(), w.const_data_ptr<acc_t>(),
                              b.const_data_ptr<acc_t>());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool relu) {
  check_input(input);
  check_forward_args("batch_norm", input, weight, bias, running_mean, running_var, "running_var", eps);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  const auto dev = input.device();
  Tensor y = empty_in_layout(x, g);
  Tensor mean, var;
  std::tie(mean, var) = forward_statistics(input, g.C, training, running_mean, running_var,
                                        "bnext.batch_norm: running_mean and running_var");
  if (g.numel() == 0) return {y, mean, var};
  const Tensor w = channel_vector(weight, g.C, acc, dev, 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, dev, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_forward_cpu", [&] {
    with_bool(relu, [&](auto RELU) {
      forward_kernel<scalar_t, decltype(RELU)::value>(x, y, g, training, eps, w, b, mean, var);
    });
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training,
    double eps, bool relu) {
  check_input(input);
  check_backward_args("batch_norm", grad_out, input, weight, bias, mean, var, "var", eps);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  const auto dev = input.device();
  BackwardOutputs out = backward_outputs(x, g);
  if (g.numel() == 0) return out.tuple();
  const Tensor w = channel_vector(weight, g.C, acc, dev, 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, dev, 0.0);
  const Tensor m = mean.to(acc).contiguous();
  const Tensor v = var.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_backward_cpu", [&] {
    with_bool(relu, [&](auto RELU) {
      backward_kernel<scalar_t, decltype(RELU)::value>(dy, x, out.dx, g, training, eps, w, b, m, v, out.sum_dy,
                                                       out.sum_dy_xhat);
    });
  });
  return out.tuple();
}

// Noisy BatchNorm, training: BatchNorm statistics, then one elementwise pass with the noise epilogue.
std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels) {
  check_input(input);
  check_forward_args("noisy_batch_norm", input, weight, bias, std::nullopt, std::nullopt, "", eps);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  Tensor y = empty_in_layout(x, g);
  Tensor mean, var;
  std::tie(mean, var) = forward_statistics(input, g.C, true, std::nullopt, std::nullopt, "");
  if (g.numel() == 0) return {y, mean, var};
  const Tensor w = channel_vector(weight, g.C, acc, input.device(), 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, input.device(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_noisy_bn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    const std::vector<double> mean64 = bn_statistics<scalar_t, acc_t>(xp, g, mp, vp);
    ChannelParams<acc_t> p(g.C, mp, vp, eps, w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>());
    p.set_residuals(mean64.data(), false);
    if (short_runs(g)) {  // as rows of C * S columns (see short_runs)
      const NoiseDraw draw(ns, g, true);
      normalize_pass(xp, y.mutable_data_ptr<scalar_t>(), Geometry{true, g.N, g.C * g.S, 1}, p.repeat(g.S),
                     NoiseEpilogue<scalar_t, acc_t>{draw});
    } else {
      const NoiseDraw draw(ns, g);
      normalize_pass(xp, y.mutable_data_ptr<scalar_t>(), g, p, NoiseEpilogue<scalar_t, acc_t>{draw});
    }
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> noisy_batch_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, const Tensor& seed,
    at::ArrayRef<double> noise, int64_t noise_channels) {
  check_input(input);
  check_backward_args("noisy_batch_norm", grad_out, input, weight, bias, mean, var, "var", eps);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  BackwardOutputs out = backward_outputs(x, g);
  if (g.numel() == 0) return out.tuple();
  const Tensor w = channel_vector(weight, g.C, acc, input.device(), 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, input.device(), 0.0);
  const Tensor m = mean.to(acc).contiguous();
  const Tensor v = var.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_noisy_bn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelParams<acc_t> p(g.C, m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), eps,
                                 w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>());
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = out.dx.mutable_data_ptr<scalar_t>();
    std::vector<double> tot_dy(g.C, 0.0), tot_dy_xc(g.C, 0.0);
    if (short_runs(g)) {  // as rows of C * S columns, like BatchNorm's backward
      const int64_t K = g.C * g.S;
      const ChannelParams<acc_t> pc = p.repeat(g.S);
      const NoiseDraw draw(ns, g, true);
      NoisyBackward<scalar_t, acc_t> pol(BackwardCommon<acc_t>{pc, static_cast<double>(g.rows()), true}, draw);
      std::vector<double> col_dy(K, 0.0), col_dy_xc(K, 0.0);
      backward_passes<scalar_t, acc_t>(dyp, xp, dxp, Geometry{true, g.N, K, 1}, pol, col_dy.data(), col_dy_xc.data(),
                                       g.S);
      for (int64_t c = 0; c < g.C; ++c) tot_dy[c] = col_dy[c * g.S], tot_dy_xc[c] = col_dy_xc[c * g.S];
    } else {
      const NoiseDraw draw(ns, g);
      NoisyBackward<scalar_t, acc_t> pol(BackwardCommon<acc_t>{p, static_cast<double>(g.rows()), true}, draw);
      backward_passes<scalar_t, acc_t>(dyp, xp, dxp, g, pol, tot_dy.data(), tot_dy_xc.data());
    }
    write_grad_sums(tot_dy.data(), tot_dy_xc.data(), p, out.sum_dy, out.sum_dy_xhat);
  });
  return out.tuple();
}

// l_p: the l_p statistics policy, then BatchNorm's elementwise pass with invstd = 1 / (N + eps).
std::tuple<Tensor, Tensor, Tensor, Tensor> lp_norm_forward_cpu(
    const Tensor& input, double p, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_norm, bool training, double eps) {
  check_input(input);
  check_forward_args("lp_norm", input, weight, bias, running_mean, running_norm, "running_norm", eps);
  const LpKind kind = lp_kind(p);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  Tensor y = empty_in_layout(x, g);
  Tensor mean, norm;
  std::tie(mean, norm) = forward_statistics(input, g.C, training, running_mean, running_norm,
                                         "bnext.lp_norm: running_mean and running_norm");
  Tensor argmax = at::full({g.C}, -1, input.options().dtype(at::kLong));
  if (g.numel() == 0) return {y, mean, norm, argmax};
  const Tensor w = channel_vector(weight, g.C, acc, input.device(), 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, input.device(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_lp_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<double> mean64;
    if (training) {
      std::vector<LpPartial> st;
      with_lp_kind(kind, [&](auto P) {
        constexpr LpKind kP = decltype(P)::value;
        if (g.interleaved) {
          st = lp_interleaved_stats<scalar_t, acc_t, kP>(xp, g);
        } else if (short_runs(g)) {
          st = lp_rows_stats<scalar_t, acc_t, kP>(xp, g.N, g.C, g.S);
        } else {
          st = lp_planar_stats<scalar_t, acc_t, kP>(xp, g);
        }
      });
      const double M = static_cast<double>(g.rows());
      acc_t* mp = mean.mutable_data_ptr<acc_t>();
      acc_t* np = norm.mutable_data_ptr<acc_t>();
      int64_t* am = argmax.mutable_data_ptr<int64_t>();
      for (int64_t c = 0; c < g.C; ++c) {
        mean64.push_back(st[c].sum / M);
        mp[c] = static_cast<acc_t>(st[c].sum / M);
        np[c] = static_cast<acc_t>(lp_norm_value(kind, st[c].pow, st[c].max.max, M));
        am[c] = kind == LpKind::kLinf ? st[c].max.index : -1;
      }
    }
    ChannelParams<acc_t> params = lp_params<acc_t>(g.C, mean, norm, eps, w, b);
    if (training) params.set_residuals(mean64.data(), true);
    affine_pass<scalar_t, acc_t, false>(xp, y.mutable_data_ptr<scalar_t>(), g, params);
  });
  return {y, mean, norm, argmax};
}

std::tuple<Tensor, Tensor, Tensor> lp_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, double p, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& norm, const Tensor& argmax, bool training,
    double eps) {
  check_input(input);
  check_backward_args("lp_norm", grad_out, input, weight, bias, mean, norm, "norm", eps);
  const LpKind kind = lp_kind(p);
  check_lp_argmax(argmax, input, training && kind == LpKind::kLinf);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  BackwardOutputs out = backward_outputs(x, g);
  if (g.numel() == 0) return out.tuple();
  const Tensor w = channel_vector(weight, g.C, acc, input.device(), 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, input.device(), 0.0);
  const Tensor m = mean.to(acc).contiguous(), nrm = norm.to(acc).contiguous(), am = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_lp_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelParams<acc_t> params = lp_params<acc_t>(g.C, m, nrm, eps, w, b);
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = out.dx.mutable_data_ptr<scalar_t>();
    std::vector<double> tot_dy(g.C, 0.0), tot_dy_xc(g.C, 0.0);
    const acc_t *np = nrm.const_data_ptr<acc_t>(), *wp = w.const_data_ptr<acc_t>();
    const int64_t* ap = am.const_data_ptr<int64_t>();
    with_lp_kind(kind, [&](auto P) {
      using Policy = LpBackwardPolicy<scalar_t, acc_t, decltype(P)::value>;
      if (short_runs(g)) {  // as rows of C * S columns, the per-channel constants repeated per column
        const int64_t F = g.S, K = g.C * F;
        std::vector<acc_t> n_col(K), w_col(K);
        std::vector<int64_t> a_col(K);
        const bool has_argmax = am.numel() == g.C;  // only p = inf training needs (and checks) it
        for (int64_t k = 0; k < K; ++k)
          n_col[k] = np[k / F], w_col[k] = wp[k / F], a_col[k] = has_argmax ? ap[k / F] : -1;
        const ChannelParams<acc_t> pc = params.repeat(F);  // (BackwardCommon keeps a reference)
        Policy pol(BackwardCommon<acc_t>{pc, static_cast<double>(g.rows()), training}, n_col.data(),
                   a_col.data(), eps, w_col.data());
        std::vector<double> col_dy(K, 0.0), col_dy_xc(K, 0.0);
        backward_passes<scalar_t, acc_t>(dyp, xp, dxp, Geometry{true, g.N, K, 1}, pol, col_dy.data(),
                                         col_dy_xc.data(), F);
        if (training) pol.finish(dyp, xp, dxp, g, F);
        for (int64_t c = 0; c < g.C; ++c) tot_dy[c] = col_dy[c * F], tot_dy_xc[c] = col_dy_xc[c * F];
        return;
      }
      Policy pol(BackwardCommon<acc_t>{params, static_cast<double>(g.rows()), training}, np, ap, eps, wp);
      backward_passes<scalar_t, acc_t>(dyp, xp, dxp, g, pol, tot_dy.data(), tot_dy_xc.data());
      if (training) pol.finish(dyp, xp, dxp, g);
    });
    write_grad_sums(tot_dy.data(), tot_dy_xc.data(), params, out.sum_dy, out.sum_dy_xhat);
  });
  return out.tuple();
}

// Local per-channel statistics for synchronized BatchNorm (bnext/distributed.py merges them across
// ranks): the training forward's statistics pass, returned as fp64 (mean, m2), m2 = sum (x - mean)^2.
// An empty input gives zeros (count 0: the merge skips it).
std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  check_input(input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor mean = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor m2 = at::zeros({g.C}, input.options().dtype(at::kDouble));
  if (g.numel() == 0) return {mean, m2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const auto st = channel_stats<scalar_t, acc_t>(xp, g);
    double *mp = mean.mutable_data_ptr<double>(), *qp = m2.mutable_data_ptr<double>();
    for (int64_t c = 0; c < g.C; ++c) mp[c] = st[c].mean, qp[c] = st[c].m2;
  });
  return {mean, m2};
}

// Local per-channel l_p statistics for synchronized l_p normalization (bnext/distributed.py sums or
// maxes them across ranks): fp64 (sum x, sum |x|^p for p = 1, 2 or max |x| for p = inf) and, for
// p = inf, the position n * S + s of the first arg-max (else -1). Zeros and -1 for an empty input.
std::tuple<Tensor, Tensor, Tensor> lp_norm_stats_cpu(const Tensor& input, double p) {
  check_input(input);
  const LpKind kind = lp_kind(p);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor sum = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor power = at::zeros({g.C}, input.options().dtype(at::kDouble));
  Tensor argmax = at::full({g.C}, -1, input.options().dtype(at::kLong));
  if (g.numel() == 0) return {sum, power, argmax};
  std::vector<LpPartial> st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_lp_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    with_lp_kind(kind, [&](auto P) {
      constexpr LpKind kP = decltype(P)::value;
      st = g.interleaved ? lp_interleaved_stats<scalar_t, acc_t, kP>(xp, g) : lp_planar_stats<scalar_t, acc_t, kP>(xp, g);
    });
  });
  double *sp = sum.mutable_data_ptr<double>(), *pp = power.mutable_data_ptr<double>();
  int64_t* ap = argmax.mutable_data_ptr<int64_t>();
  for (int64_t c = 0; c < g.C; ++c) {
    sp[c] = st[c].sum;
    pp[c] = kind == LpKind::kLinf ? st[c].max.max : st[c].pow;
    ap[c] = kind == LpKind::kLinf ? st[c].max.index : -1;
  }
  return {sum, power, argmax};
}

}  // namespace bnext
