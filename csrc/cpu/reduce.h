#pragma once
// The CPU statistics drivers of the normalization ops (csrc/cpu/passes.h describes the skeleton):
// BatchNorm's mean / M2 (channel_stats, bn_statistics) and l_p's sum x, sum |x|^p or max |x| with
// its first arg-max (lp_channel_stats), for both layouts, reduced per planar (n, c) run, per row
// chunk of the interleaved layout or per row chunk of a short-run planar input seen as rows
// (short_runs). Also the work decomposition the passes share (kSegment, kChunkElems, the chunk sizes).
//
// Numerics: every reduction is done in short segments in the accumulation type (fp32, or fp64 for
// fp64 input) and the segment results are merged in fp64 in a fixed order (Welford / Chan merge for
// statistics, plain sums and the first-position arg-max merge for l_p). Segment statistics are
// two-pass over the cached segment, and sums are of x - pivot, so nothing cancels when |mean| >> std.
// Segments and merge order depend on the shape only, never on the number of threads or the
// instruction set: results are bitwise reproducible.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/lp_norm_math.h"
#include "../common/welford.h"
#include "../layout.h"
#include "convert.h"
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

inline int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1)); }

// Runs per parallel task for planar passes: about kChunkElems values each.
inline int64_t runs_per_chunk(const Geometry& g) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.S, 1)); }


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

// l_p statistics for either layout (the BatchNorm counterpart is channel_stats).
template <typename scalar_t, typename acc_t, LpKind P>
std::vector<LpPartial> lp_channel_stats(const scalar_t* x, const Geometry& g) {
  if (g.interleaved) return lp_interleaved_stats<scalar_t, acc_t, P>(x, g);
  if (short_runs(g)) return lp_rows_stats<scalar_t, acc_t, P>(x, g.N, g.C, g.S);
  return lp_planar_stats<scalar_t, acc_t, P>(x, g);
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

}  // namespace
}  // namespace bnext
