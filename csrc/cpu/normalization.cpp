// BatchNorm (+ fused ReLU) CPU kernels.
//
// Formulas: csrc/common/batch_norm_math.h. Statistics: csrc/common/welford.h.
//
// Every pass streams through memory in order (one tensor read or written once = one pass):
//   training forward: statistics (read x), then normalization (read x, write y);
//   training backward: gradient sums (read dy and x), then dx (read dy and x, write dx);
//   eval: one pass each way (the statistics are known; eval backward writes dx with the sums).
// Planar (NCHW) layout: the (n, c) runs are walked in memory order, parallel over runs; reductions
// produce one partial per run, merged per channel in n order. Re-reading a block of channels from
// cache instead (one trip to memory per tensor) was tried and measured 1.2-2x slower on this 2-core
// EPYC (single-thread microbenchmark at 128x64x32x32 and 256x128x16x16): a block is N pieces of a
// few KB, N*C*S apart, and such short strided pieces stream at half the speed of one long run, with
// or without software prefetch (tried at several distances) or huge pages. Pieces reach streaming
// speed only at ~64 KB, and blocks of such pieces (several MB per thread) lose the cache re-read.
// Interleaved (channels-last) layout: rows are cut into fixed-size chunks, each chunk produces
// per-channel partial results (vectorized over C), merged in chunk order. (Looping over blocks of
// channels with the rows inside, to keep a block's constants and sums in local arrays, was tried and
// measured 1.3-1.7x slower.)
// Large planar outputs are written with non-temporal stores (see kStreamingStoreBytes): a plain store
// first reads every destination line from memory, which makes x -> y cost three tensor transfers
// instead of two.
//
// Numerics: every reduction is done in short segments (one (n, c) run of at most kSegment values, or
// one interleaved chunk) in the accumulation type (fp32, or fp64 for fp64 input), and the segment
// results are merged in fp64 in a fixed order (Welford merge for statistics, plain sums for gradients).
// Segment statistics are two-pass over the cached segment, and sums are of x - pivot, so nothing
// cancels when |mean| >> std. Segments and merge order depend on the shape only, never on the number
// of threads or the instruction set: results are bitwise reproducible (the build disables FMA
// contraction, see setup.py, so the AVX paths round exactly like the baseline one).
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
#include "../common/welford.h"
#include "../layout.h"
#include "../ops.h"
#include "isa.h"

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

template <bool B>
using Bool = std::integral_constant<bool, B>;

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) f(Bool<true>{}); else f(Bool<false>{});
}

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

// Per-channel constants of the forward formula: invstd, and the affine (mean, invstd * w, b).
template <typename acc_t>
struct ChannelParams {
  std::vector<acc_t> invstd, mean, scale, shift;
  ChannelParams(int64_t C, const acc_t* m, const acc_t* v, double eps, const acc_t* w, const acc_t* b)
      : invstd(C), mean(m, m + C), scale(C), shift(b, b + C) {
    for (int64_t c = 0; c < C; ++c) {
      invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(v[c]) + eps));
      scale[c] = invstd[c] * w[c];
    }
  }
  ChannelAffine<acc_t> affine(int64_t c) const { return {mean[c], scale[c], shift[c]}; }
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

template <typename scalar_t, typename acc_t>
std::vector<WelfordState<double>> planar_stats(const scalar_t* x, const Geometry& g) {
  std::vector<WelfordState<double>> per_run(g.N * g.C);
  parallel_for(0, g.N * g.C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) per_run[r] = run_stats<scalar_t, acc_t>(x + r * g.S, g.S);
  });
  std::vector<WelfordState<double>> total(g.C, welford_init<double>());
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c) total[c] = welford_merge(total[c], per_run[n * g.C + c]);
  return total;
}

// Per-channel statistics of rows [r0, r1) of an interleaved (M, C) array, written to `out`.
template <typename scalar_t, typename acc_t>
void interleaved_chunk_stats(const scalar_t* x, int64_t C, int64_t r0, int64_t r1,
                             acc_t* sum, acc_t* m2, acc_t* mean, WelfordState<double>* out) {
  const scalar_t* pivot = x + r0 * C;
  for (int64_t c = 0; c < C; ++c) sum[c] = 0, m2[c] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sum[c] += to_acc<acc_t>(row[c]) - to_acc<acc_t>(pivot[c]);
  }
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(r1 - r0);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) mean[c] = to_acc<acc_t>(pivot[c]) + sum[c] * inv_rows;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = to_acc<acc_t>(row[c]) - mean[c];
      m2[c] += d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const double m = static_cast<double>(to_acc<acc_t>(pivot[c])) + static_cast<double>(sum[c]) / (r1 - r0);
    out[c] = WelfordState<double>{m, static_cast<double>(m2[c]), r1 - r0};
  }
}

template <typename scalar_t, typename acc_t>
std::vector<WelfordState<double>> interleaved_stats(const scalar_t* x, const Geometry& g) {
  const int64_t C = g.C, M = g.rows(), rpc = rows_per_chunk(C);
  const int64_t nchunks = (M + rpc - 1) / rpc;
  std::vector<WelfordState<double>> partial(nchunks * C);
  parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> sum(C), m2(C), mean(C);
    for (int64_t b = b0; b < b1; ++b) {
      interleaved_chunk_stats<scalar_t, acc_t>(x, C, b * rpc, std::min(M, (b + 1) * rpc), sum.data(),
                                               m2.data(), mean.data(), &partial[b * C]);
    }
  });
  std::vector<WelfordState<double>> total(C, welford_init<double>());
  for (int64_t b = 0; b < nchunks; ++b)
    for (int64_t c = 0; c < C; ++c) total[c] = welford_merge(total[c], partial[b * C + c]);
  return total;
}

// ---------------------------------------------------------------------------------------------
// Forward
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
  const acc_t *mean = p.mean.data(), *scale = p.scale.data(), *shift = p.shift.data();
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c]};
      y[r * C + c] = from_acc<scalar_t>(bn_forward_value(to_acc<acc_t>(x[r * C + c]), a, RELU));
    }
  }
}

template <typename scalar_t, bool RELU>
void forward_kernel(const at::Tensor& x, at::Tensor& y, const Geometry& g, bool training, double eps,
                    const at::Tensor& weight, const at::Tensor& bias, at::Tensor& mean,
                    at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  const int64_t C = g.C;

  if (training) {
    const auto st = g.interleaved ? interleaved_stats<scalar_t, acc_t>(xp, g) : planar_stats<scalar_t, acc_t>(xp, g);
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = static_cast<acc_t>(st[c].mean);
      vp[c] = static_cast<acc_t>(welford_variance(st[c]));
    }
  }
  const ChannelParams<acc_t> p(C, mp, vp, eps, weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>());
  if (!g.interleaved) {
    parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
      OutputTiles<scalar_t> out(g, kSegment);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t s0 = 0; s0 < g.S; s0 += kSegment) {
          const int64_t off = r * g.S + s0, len = std::min(kSegment, g.S - s0);
          normalize_run<scalar_t, acc_t, RELU>(xp + off, out.begin(yp + off), len, p.affine(r % C));
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
      normalize_rows<scalar_t, acc_t, RELU>(xp + t0 * C, out.begin(yp + t0 * C), C, rows, p);
      out.end(yp + t0 * C, rows * C);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Sums of g and g * (x - mean) over one segment (len <= kSegment), g = dy masked by the recomputed
// ReLU. With WRITE_EVAL_GRAD the eval-mode input gradient g * invstd * w is written in the same pass.
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
void grad_sums_segment(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                       const ChannelAffine<acc_t>& a, double* sum_dy, double* sum_dy_xc) {
  acc_t p_dy[kLanes] = {}, p_dy_xc[kLanes] = {};
  auto body = [&](int64_t i, int64_t j) {
    const acc_t xv = to_acc<acc_t>(x[i]);
    const acc_t gv = bn_masked_grad(to_acc<acc_t>(dy[i]), xv, a, RELU);
    p_dy[j] += gv;
    p_dy_xc[j] += gv * (xv - a.mean);
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
}

template <typename scalar_t, typename acc_t, bool RELU>
void input_grad_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                    const ChannelAffine<acc_t>& a, const ChannelBackward<acc_t>& k) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t xv = to_acc<acc_t>(x[i]);
    const acc_t gv = bn_masked_grad(to_acc<acc_t>(dy[i]), xv, a, RELU);
    dx[i] = from_acc<scalar_t>(bn_backward_train_value(gv, xv, k));
  }
}

// Interleaved: per-channel sums over `rows` rows in acc_t, added to s_dy / s_dy_xc. With
// WRITE_EVAL_GRAD the eval-mode input gradient is written to dx in the same pass.
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
void interleaved_grad_sums(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C, int64_t rows,
                           const ChannelParams<acc_t>& p, acc_t* s_dy, acc_t* s_dy_xc) {
  const acc_t *mean = p.mean.data(), *scale = p.scale.data(), *shift = p.shift.data();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c]};
      const acc_t xv = to_acc<acc_t>(x[off + c]);
      const acc_t gv = bn_masked_grad(to_acc<acc_t>(dy[off + c]), xv, a, RELU);
      s_dy[c] += gv;
      s_dy_xc[c] += gv * (xv - mean[c]);
      if (WRITE_EVAL_GRAD) dx[off + c] = from_acc<scalar_t>(gv * scale[c]);
    }
  }
}

template <typename scalar_t, typename acc_t, bool RELU>
void interleaved_input_grad_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C, int64_t rows,
                                 const ChannelParams<acc_t>& p, const acc_t* mean_dy, const acc_t* proj) {
  const acc_t *mean = p.mean.data(), *scale = p.scale.data(), *shift = p.shift.data();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const ChannelAffine<acc_t> af{mean[c], scale[c], shift[c]};
      const ChannelBackward<acc_t> k{mean[c], mean_dy[c], proj[c], scale[c]};
      const acc_t xv = to_acc<acc_t>(x[off + c]);
      const acc_t gv = bn_masked_grad(to_acc<acc_t>(dy[off + c]), xv, af, RELU);
      dx[off + c] = from_acc<scalar_t>(bn_backward_train_value(gv, xv, k));
    }
  }
}

// Everything the backward passes share.
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* dy;
  const scalar_t* x;
  scalar_t* dx;
  const Geometry& g;
  const ChannelParams<acc_t>& p;  // dx = (...) * p.scale, p.scale = invstd * w
  double M;                       // values per channel

  // Training-mode coefficients of dx from the channel's fp64 sums.
  ChannelBackward<acc_t> coeffs(int64_t c, double s_dy, double s_dy_xc) const {
    const double inv = static_cast<double>(p.invstd[c]);
    return ChannelBackward<acc_t>{p.mean[c], static_cast<acc_t>(s_dy / M),
                                  static_cast<acc_t>(s_dy_xc * inv * inv / M), p.scale[c]};
  }
};

// Planar: sums per run in memory order (eval: dx written in the same pass), merged per channel in
// n order; training then streams once more to write dx.
template <typename scalar_t, typename acc_t, bool RELU>
void planar_backward(const BackwardArgs<scalar_t, acc_t>& a, bool training, double* tot_dy, double* tot_dy_xc) {
  const Geometry& g = a.g;
  const int64_t C = g.C;
  std::vector<double> run_dy(g.N * C, 0.0), run_dy_xc(g.N * C, 0.0);
  parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
    OutputTiles<scalar_t> out(g, training ? 0 : kSegment);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t s0 = 0; s0 < g.S; s0 += kSegment) {
        const int64_t off = r * g.S + s0, len = std::min(kSegment, g.S - s0);
        if (training) {
          grad_sums_segment<scalar_t, acc_t, RELU, false>(a.dy + off, a.x + off, nullptr, len, a.p.affine(r % C),
                                                          &run_dy[r], &run_dy_xc[r]);
        } else {
          grad_sums_segment<scalar_t, acc_t, RELU, true>(a.dy + off, a.x + off, out.begin(a.dx + off), len,
                                                         a.p.affine(r % C), &run_dy[r], &run_dy_xc[r]);
          out.end(a.dx + off, len);
        }
      }
    }
  });
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < C; ++c) tot_dy[c] += run_dy[n * C + c], tot_dy_xc[c] += run_dy_xc[n * C + c];
  if (!training) return;
  std::vector<ChannelBackward<acc_t>> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = a.coeffs(c, tot_dy[c], tot_dy_xc[c]);
  parallel_for(0, g.N * C, runs_per_chunk(g), [&](int64_t r0, int64_t r1) {
    OutputTiles<scalar_t> out(g, kSegment);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t s0 = 0; s0 < g.S; s0 += kSegment) {
        const int64_t off = r * g.S + s0, len = std::min(kSegment, g.S - s0);
        input_grad_run<scalar_t, acc_t, RELU>(a.dy + off, a.x + off, out.begin(a.dx + off), len, a.p.affine(r % C),
                                              k[r % C]);
        out.end(a.dx + off, len);
      }
    }
  });
}

// Interleaved: per-chunk sums (eval: dx written in the same pass), merged in chunk order; training
// then streams once more to write dx.
template <typename scalar_t, typename acc_t, bool RELU>
void interleaved_backward(const BackwardArgs<scalar_t, acc_t>& a, bool training, double* tot_dy,
                          double* tot_dy_xc) {
  const int64_t C = a.g.C, M_rows = a.g.rows(), rpc = rows_per_chunk(C);
  const int64_t nchunks = (M_rows + rpc - 1) / rpc, rows_per_tile = std::max<int64_t>(1, kSegment / C);
  std::vector<double> part_dy(nchunks * C), part_dy_xc(nchunks * C);
  parallel_for(0, nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> s_dy(C), s_dy_xc(C);
    OutputTiles<scalar_t> out(a.g, training ? 0 : rows_per_tile * C);
    for (int64_t blk = b0; blk < b1; ++blk) {
      std::fill(s_dy.begin(), s_dy.end(), acc_t(0));
      std::fill(s_dy_xc.begin(), s_dy_xc.end(), acc_t(0));
      const int64_t r1 = std::min(M_rows, (blk + 1) * rpc);
      for (int64_t t0 = blk * rpc; t0 < r1; t0 += rows_per_tile) {
        const int64_t rows = std::min(rows_per_tile, r1 - t0), off = t0 * C;
        if (training) {
          interleaved_grad_sums<scalar_t, acc_t, RELU, false>(a.dy + off, a.x + off, nullptr, C, rows, a.p,
                                                              s_dy.data(), s_dy_xc.data());
        } else {
          interleaved_grad_sums<scalar_t, acc_t, RELU, true>(a.dy + off, a.x + off, out.begin(a.dx + off), C, rows,
                                                             a.p, s_dy.data(), s_dy_xc.data());
          out.end(a.dx + off, rows * C);
        }
      }
      for (int64_t c = 0; c < C; ++c) part_dy[blk * C + c] = s_dy[c], part_dy_xc[blk * C + c] = s_dy_xc[c];
    }
  });
  for (int64_t blk = 0; blk < nchunks; ++blk)
    for (int64_t c = 0; c < C; ++c) tot_dy[c] += part_dy[blk * C + c], tot_dy_xc[c] += part_dy_xc[blk * C + c];
  if (!training) return;

  std::vector<acc_t> mean_dy(C), proj(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto k = a.coeffs(c, tot_dy[c], tot_dy_xc[c]);
    mean_dy[c] = k.mean_dy;
    proj[c] = k.proj;
  }
  parallel_for(0, M_rows, rpc, [&](int64_t r0, int64_t r1) {
    OutputTiles<scalar_t> out(a.g, rows_per_tile * C);
    for (int64_t t0 = r0; t0 < r1; t0 += rows_per_tile) {
      const int64_t rows = std::min(rows_per_tile, r1 - t0), off = t0 * C;
      interleaved_input_grad_rows<scalar_t, acc_t, RELU>(a.dy + off, a.x + off, out.begin(a.dx + off), C, rows, a.p,
                                                         mean_dy.data(), proj.data());
      out.end(a.dx + off, rows * C);
    }
  });
}

template <typename scalar_t, bool RELU>
void backward_kernel(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const Geometry& g,
                     bool training, double eps, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& mean_t, const at::Tensor& var_t, at::Tensor& sum_dy_t,
                     at::Tensor& sum_dy_xhat_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  const ChannelParams<acc_t> p(C, mean_t.const_data_ptr<acc_t>(), var_t.const_data_ptr<acc_t>(), eps,
                               weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>());
  const BackwardArgs<scalar_t, acc_t> a{dy_t.const_data_ptr<scalar_t>(), x_t.const_data_ptr<scalar_t>(),
                                        dx_t.mutable_data_ptr<scalar_t>(), g, p, static_cast<double>(g.rows())};
  std::vector<double> tot_dy(C, 0.0), tot_dy_xc(C, 0.0);
  if (g.interleaved) {
    interleaved_backward<scalar_t, acc_t, RELU>(a, training, tot_dy.data(), tot_dy_xc.data());
  } else {
    planar_backward<scalar_t, acc_t, RELU>(a, training, tot_dy.data(), tot_dy_xc.data());
  }
  acc_t* out_dy = sum_dy_t.mutable_data_ptr<acc_t>();
  acc_t* out_dy_xhat = sum_dy_xhat_t.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    out_dy[c] = static_cast<acc_t>(tot_dy[c]);
    out_dy_xhat[c] = static_cast<acc_t>(tot_dy_xc[c] * static_cast<double>(p.invstd[c]));
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool relu) {
  check_input(input);
  check_channel_arg(weight, "weight", input);
  check_channel_arg(bias, "bias", input);
  check_channel_arg(running_mean, "running_mean", input);
  check_channel_arg(running_var, "running_var", input);
  check_eps("bnext.batch_norm", eps);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const auto acc = acc_dtype(input.scalar_type());
  const auto dev = input.device();
  Tensor y = empty_in_layout(x, g);
  Tensor mean, var;
  if (training) {
    // An empty batch (allowed by torch) has undefined statistics: NaN, and the Python wrapper
    // leaves the running stats alone, as torch does.
    mean = at::full({g.C}, NAN, input.options().dtype(acc));
    var = at::full({g.C}, NAN, input.options().dtype(acc));
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                "bnext.batch_norm: running_mean and running_var are required when training=False");
    mean = running_mean->to(acc).clone();
    var = running_var->to(acc).clone();
  }
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
  check_backward_args("bnext.batch_norm backward", grad_out, input, weight, bias, mean, var, "var", eps);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnext.batch_norm backward: grad_out shape ",
              grad_out.sizes(), " differs from input shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "bnext.batch_norm backward: grad_out dtype ",
              grad_out.scalar_type(), " differs from input dtype ", input.scalar_type());
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor dy = match_layout(grad_out, g);
  const auto acc = acc_dtype(input.scalar_type());
  const auto dev = input.device();
  Tensor dx = empty_in_layout(x, g);
  Tensor sum_dy = at::zeros({g.C}, input.options().dtype(acc));
  Tensor sum_dy_xhat = at::zeros({g.C}, input.options().dtype(acc));
  if (g.numel() == 0) return {dx, sum_dy, sum_dy_xhat};
  const Tensor w = channel_vector(weight, g.C, acc, dev, 1.0);
  const Tensor b = channel_vector(bias, g.C, acc, dev, 0.0);
  const Tensor m = mean.to(acc).contiguous();
  const Tensor v = var.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_batch_norm_backward_cpu", [&] {
    with_bool(relu, [&](auto RELU) {
      backward_kernel<scalar_t, decltype(RELU)::value>(dy, x, dx, g, training, eps, w, b, m, v, sum_dy, sum_dy_xhat);
    });
  });
  return {dx, sum_dy, sum_dy_xhat};
}

}  // namespace bnext
