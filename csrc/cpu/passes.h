#pragma once
// The CPU skeleton shared by the normalization ops (batch_norm, noisy_batch_norm, lp_norm: each op's
// policies and entry points are in csrc/cpu/<op>.cpp), ../shared/DESIGN.md "One skeleton for three
// layers":
//
//   forward:  statistics pass (csrc/cpu/reduce.h: BatchNorm's mean / M2, or l_p's sum and sum |x|^p
//             or max |x| with its first arg-max) -> per-channel (mean, scale, shift) (ChannelParams)
//             -> one elementwise pass (normalize_pass with an epilogue: AffineEpilogue (+ ReLU) here,
//             NoisyBatchNormEpilogue, affine then noise s * a + m, in noisy_batch_norm.cpp)
//   backward: reduction pass (sum g, sum g * (x - mean); g = dy, dy masked by the ReLU, or dy * s)
//             -> one elementwise pass writing dx (backward_passes over a backward policy:
//             BatchNormBackward here, NoisyBatchNormBackward and LpNormBackward in their op's file)
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
// layout (see short_runs, backward_geometry), so that a run does not cost a reduction and a merge of
// its own. Re-reading a block of channels from cache instead (one trip to memory per tensor) was
// tried and measured 1.2-2x slower on a 2-core EPYC (single-thread microbenchmark at 128x64x32x32
// and 256x128x16x16): a block is N pieces of a few KB, N*C*S apart, and such short strided pieces
// stream at half the speed of one long run, with or without software prefetch (tried at several
// distances) or huge pages. Pieces reach streaming speed only at ~64 KB, and blocks of such pieces
// (several MB per thread) lose the cache re-read.
// Interleaved (channels-last) layout: rows are cut into fixed-size chunks (for the BatchNorm
// statistics with many channels, tiles of rows x channels: interleaved_chunks), each chunk produces
// per-channel partial results (vectorized over C), merged in chunk order (merge_partials). (Looping
// over blocks of channels with the rows inside, to keep a block's constants and sums in local
// arrays, was tried and measured 1.3-1.7x slower.)
// Large planar outputs are written with non-temporal stores (see kStreamingStoreBytes): a plain store
// first reads every destination line from memory, which makes x -> y cost three tensor transfers
// instead of two.
//
// Numerics: the reductions are csrc/cpu/reduce.h's (short segments in the accumulation type, merged
// in fp64 in a fixed order); the gradient sums of the backward passes are reduced the same way.
// Segments and merge order depend on the shape only, never on the number of threads or the
// instruction set: results are bitwise reproducible (the build disables FMA contraction, see
// setup.py, so the AVX paths round exactly like the baseline one). The centring x - mean is exact:
// the mean is kept as its acc_t rounding plus a residual (batch_norm_math.h,
// ChannelParams::set_residuals, BackwardCommon::centre).
#include <ATen/ATen.h>

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
#include "../layout.h"
#include "convert.h"
#include "reduce.h"

namespace bnext {
namespace {

// Planar outputs at least this large are written with non-temporal stores: they would not stay in the
// last-level cache for their consumer anyway (about half the L3 of current server parts). Measured at
// 2 threads, 33.5 MB fp32, same process A/B: planar training forward 2.2 vs 2.6-2.8 ms, backward
// 3.3-3.5 vs 3.9 ms; the interleaved passes got slower (2.9-3.1 vs 2.7-3.0 ms forward): their per-row
// loops over C cost enough instructions that the extra copy out of the tile outweighs the saved reads,
// so they keep plain stores.
constexpr int64_t kStreamingStoreBytes = 16 << 20;

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
        buffer_(streaming_ ? max_tile * static_cast<int64_t>(sizeof(scalar_t)) + kPage + kLine : 0) {}
  ~OutputTiles() {
    if (streaming_) stream_fence();
  }
  // The tile for the values written to dst, computed from the values at `src`: placed half a page
  // from src modulo the page size. A load that follows a store to the same address modulo 4 KB waits
  // for that store (4K aliasing); with the tile a few lines behind the input stream every load of
  // the pass did, and where the heap put the tile decided the speed: the planar training backward at
  // 128x128x16x16 took 1.7 to 3.4 ms from one process to the next.
  scalar_t* begin(scalar_t* dst, const void* src) {
    if (!streaming_) return dst;
    const uintptr_t base = (reinterpret_cast<uintptr_t>(buffer_.data()) + kLine - 1) / kLine * kLine;
    const uintptr_t want = (reinterpret_cast<uintptr_t>(src) + kPage / 2) % kPage / kLine * kLine;
    tile_ = reinterpret_cast<scalar_t*>(base + (want + kPage - base % kPage) % kPage);
    return tile_;
  }
  void end(scalar_t* dst, int64_t n) {
    if (streaming_) stream_store(dst, tile_, n * static_cast<int64_t>(sizeof(scalar_t)));
  }

 private:
  static constexpr uintptr_t kPage = 4096, kLine = 64;
  bool streaming_;
  std::vector<char> buffer_;
  scalar_t* tile_ = nullptr;
};

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
          epi.run(xp + off, out.begin(yp + off, xp + off), len, n, c, s0, p.affine(c));
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
      epi.rows(xp + t0 * C, out.begin(yp + t0 * C, xp + t0 * C), C, t0, rows, p);
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

// g = dy masked by the fused ReLU (RELU), the CPU loops' form of bn_masked_grad: the same values (+0
// where y <= 0, dy elsewhere, dy where y is NaN), written as a bitwise AND of dy with the mask. As a
// select, GCC folded it into an AVX-512 masked load of dy that waits for x's arithmetic (channels-last
// training backward with ReLU, 128x64x32x32 fp32, 1 thread: 10.3 -> 8.8 ms; 6.1 ms without ReLU). GCC
// still emits a masked load in some loops; see staged_dy for the planar ones.
template <typename acc_t, bool RELU>
inline acc_t masked_grad(acc_t dy, acc_t x, const ChannelAffine<acc_t>& a) {
  if constexpr (RELU) {
    using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
    const acc_t y = centred(x, a.mean, a.mean_lo) * a.scale + a.shift;
    const bits_t keep = y <= acc_t(0) ? bits_t(0) : ~bits_t(0);
    return __builtin_bit_cast(acc_t, __builtin_bit_cast(bits_t, dy) & keep);
  } else {
    return dy;
  }
}

// With the fused ReLU, GCC turns masked_grad's AND into a masked load of dy, which cannot issue
// before x's arithmetic has made the mask; from memory, that serializes the two streams (the planar
// training backward with ReLU took 3x the time of the one without). Copying the segment's dy to an
// L1 buffer first streams it with plain loads, and the masked loads then hit L1 (planar training
// backward with ReLU, 128x128x16x16, 1 thread: 5.1-5.3 -> 2.5-3.7 ms; staging the interleaved rows
// the same way was not measurably faster, so they read dy directly).
template <bool RELU, typename scalar_t>
inline const scalar_t* staged_dy(const scalar_t* dy, int64_t len, scalar_t* buffer) {
  if (!RELU) return dy;
  std::memcpy(buffer, dy, sizeof(scalar_t) * len);
  return buffer;
}

// Sums of g and g * (x - mean) over one segment (len <= kSegment), g = dy masked by the recomputed
// ReLU. With WRITE_EVAL_GRAD the eval-mode input gradient g * scale is written in the same pass.
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
void grad_sums_segment(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                       const ChannelAffine<acc_t>& a, double* sum_dy, double* sum_dy_xc, double* sum_xc) {
  acc_t p_dy[kLanes] = {}, p_dy_xc[kLanes] = {}, p_xc[kLanes] = {};
  alignas(64) scalar_t dy_buffer[RELU ? kSegment : 1];
  dy = staged_dy<RELU>(dy, len, dy_buffer);
  auto body = [&](int64_t i, int64_t j) {
    const acc_t xv = to_acc<acc_t>(x[i]);
    const acc_t gv = masked_grad<acc_t, RELU>(to_acc<acc_t>(dy[i]), xv, a);
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
      const acc_t gv = masked_grad<acc_t, RELU>(to_acc<acc_t>(dy[off + c]), xv, a);
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
struct BatchNormBackward : BackwardCommon<acc_t> {
  std::vector<acc_t> mean_dy, proj;
  BatchNormBackward(const BackwardCommon<acc_t>& b) : BackwardCommon<acc_t>(b) {}
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
    alignas(64) scalar_t dy_buffer[RELU ? kSegment : 1];
    dy = staged_dy<RELU>(dy, len, dy_buffer);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t xv = to_acc<acc_t>(x[i]);
      const acc_t gv = masked_grad<acc_t, RELU>(to_acc<acc_t>(dy[i]), xv, a);
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
        const acc_t gv = masked_grad<acc_t, RELU>(to_acc<acc_t>(dy[off + c]), xv, af);
        out[off + c] = from_acc<scalar_t>(bn_backward_train_value(gv, xv, k));
      }
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
          pol.sums(dy + off, x + off, writes ? out.begin(dx + off, x + off) : nullptr, len, n, c, s0, &run_dy[r], &run_dy_xc[r],
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
          pol.input_grad(dy + off, x + off, dx + off, out.begin(dx + off, x + off), len, n, c, s0);
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
        pol.sums_rows(dy + off, x + off, writes ? out.begin(dx + off, x + off) : nullptr, C, t0, rows, s_dy.data(),
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
      pol.input_grad_rows(dy + off, x + off, dx + off, out.begin(dx + off, x + off), C, t0, rows);
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

// Calls body(geo, params, F, tot_dy, tot_dy_xc) for the backward passes of an input of geometry g
// with per-channel constants p: a short-run planar input as rows of C * S columns (geo, F = S
// columns per channel, params repeated per column, totals per column), any other as it is (F = 1);
// the per-channel totals land in tot_dy / tot_dy_xc.
template <typename acc_t, typename Body>
void backward_geometry(const Geometry& g, const ChannelParams<acc_t>& p, double* tot_dy, double* tot_dy_xc,
                       Body&& body) {
  if (!short_runs(g)) {
    body(g, p, int64_t(1), tot_dy, tot_dy_xc);
    return;
  }
  const int64_t K = g.C * g.S;
  const ChannelParams<acc_t> pc = p.repeat(g.S);
  std::vector<double> col_dy(K, 0.0), col_dy_xc(K, 0.0);
  body(Geometry{true, g.N, K, 1}, pc, g.S, col_dy.data(), col_dy_xc.data());
  for (int64_t c = 0; c < g.C; ++c) tot_dy[c] = col_dy[c * g.S], tot_dy_xc[c] = col_dy_xc[c * g.S];
}

}  // namespace
}  // namespace bnext
