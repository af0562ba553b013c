#pragma once
// The CUDA reductions shared by the normalization ops: launch configuration, the digits cursor,
// reduction states and policies (BatchNormStatsPolicy: Welford; LpNormStatsPolicy: sum x, sum |x|^p
// or max |x| with its first arg-max; GradSumsPolicy: the backward sums of BatchNorm and l_p), the
// reduce and merge kernels and reduce_and_merge(Policy, Finish), which every op's statistics and
// gradient sums go through. Same numerics as csrc/cpu/reduce.h: per-thread partials in acc_t around
// a per-thread shift, merged in fp64.
//
// The reductions are one templated kernel per layout (csrc/layout.h) over a small policy (what is
// loaded and accumulated per element):
//   planar (NCHW):       block (c, g) walks the g-th slice of channel c's N*S values;
//   interleaved (NHWC):  block (channel tile, g) reads whole rows of `width` consecutive channels,
//                        so a warp's loads are contiguous; lanes holding the same channel are
//                        merged with warp shuffles, then warps through shared memory.
// Both write one partial per (g, c); a second kernel merges a channel's partials with one warp and
// hands the total to the op's Finish. How many row groups g a channel is split into depends on the
// shape and the SM count only, so results are deterministic on a given GPU model.
//
// Numerics (as csrc/cpu/reduce.h's segments): each thread accumulates its values (at most
// kMaxPerThread, unless the grid's y limit forces more) in the accumulation type acc_t (fp32 for
// fp16/bf16/fp32, fp64 for fp64), the statistics around a per-thread shift, its first value: a
// Welford state of x - shift (BatchNorm), the sum of x - shift (l_p). The thread's partial is then
// made fp64 (Policy::State: shift + mean, count * shift + sum) and every merge after it (shuffles,
// shared memory, the merge warp) is in fp64, Chan's formula for Welford states. So the statistics
// keep the fp64 mean, to much better than an fp32 ulp of it when |mean| >> std, and nothing
// cancels. The gradient sums take g * (x - mean), never g * x - mean * sum g, and also sum x - mean,
// which recentres them on the exact batch mean (bn_recentre, csrc/common/batch_norm_math.h).
//
// Indexing is 64-bit wherever an index spans the tensor. Element (flat index i) -> channel is
// tracked with a "digits" cursor: one division per thread, then only adds and compares.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "../common/batch_norm_math.h"
#include "../common/lp_norm_math.h"
#include "../common/welford.h"
#include "../layout.h"
#include "convert.cuh"
#include "launch.cuh"

namespace bnext {
namespace {

constexpr int kThreads = 256;                 // threads per block, every kernel
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kUnroll = 4;                    // independent loads in flight per thread
constexpr int64_t kMinPerThread = 16;         // fewest values a reduction thread is given
constexpr int64_t kMaxPerThread = 1024;       // most values one thread accumulates sequentially
constexpr int64_t kBlocksPerSM = 8;           // grid target per SM (2048 threads), fills the GPU
constexpr int64_t kMaxGridY = 65535;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Digits cursor: a flat index i = q * inner + r, with q taken modulo `wrap`.
//   elementwise: inner = S (planar) or 1 (interleaved), wrap = C   ->  q is the channel of i
//   planar reduction over a channel's values j = n * S + s: inner = S, wrap = N -> (n, s)
// Starting from digits_of(i) (one division per thread), advance() moves by a fixed stride
// without dividing: r + dr < 2 * inner and q + dq + 1 < 2 * wrap, so one carry each suffices.
// ---------------------------------------------------------------------------------------------

BNEXT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct Digits {
  int64_t q, r;
};
struct DigitStep {
  int64_t dq, dr;
};

BNEXT_HD Digits digits_of(int64_t i, int64_t inner, int64_t wrap) {
  return Digits{(i / inner) % wrap, i % inner};
}

BNEXT_HD DigitStep digit_step(int64_t stride, int64_t inner, int64_t wrap) {
  return DigitStep{(stride / inner) % wrap, stride % inner};
}

BNEXT_HD void advance(Digits& d, const DigitStep& s, int64_t inner, int64_t wrap) {
  d.r += s.dr;
  d.q += s.dq;
  if (d.r >= inner) {
    d.r -= inner;
    d.q += 1;
  }
  if (d.q >= wrap) d.q -= wrap;
}

// ---------------------------------------------------------------------------------------------
// Reduction states: identity, merge and warp shuffle for each. These are the fp64 partials
// (Policy::State) that threads, blocks and the merge warp combine; a thread accumulates its own
// values in a Policy::Local in acc_t first.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct GradSums {
  T dy;     // sum g
  T dy_xc;  // sum g * (x - mean)
  T xc;     // sum x - mean (recentring, bn_recentre)
};

// The shift of a thread's accumulation: its first value, or 0 when that is not finite (an inf shift
// would turn the finite values' differences into inf - inf).
template <typename T>
__device__ T shift_for(T first) {
  return first - first == T(0) ? first : T(0);
}

template <typename State> struct StateOps;

template <typename T>
struct StateOps<WelfordState<T>> {
  using State = WelfordState<T>;
  static __device__ State identity() { return welford_init<T>(); }
  static __device__ State merge(const State& a, const State& b) { return welford_merge(a, b); }
  static __device__ State shfl_down(const State& s, int offset) {
    return State{__shfl_down_sync(kFullMask, s.mean, offset), __shfl_down_sync(kFullMask, s.m2, offset),
                 static_cast<int64_t>(__shfl_down_sync(kFullMask, static_cast<long long>(s.count), offset))};
  }
};

template <typename T>
struct StateOps<GradSums<T>> {
  using State = GradSums<T>;
  static __device__ State identity() { return State{T(0), T(0), T(0)}; }
  static __device__ State merge(const State& a, const State& b) {
    return State{a.dy + b.dy, a.dy_xc + b.dy_xc, a.xc + b.xc};
  }
  static __device__ State shfl_down(const State& s, int offset) {
    return State{__shfl_down_sync(kFullMask, s.dy, offset), __shfl_down_sync(kFullMask, s.dy_xc, offset),
                 __shfl_down_sync(kFullMask, s.xc, offset)};
  }
};

// Merges, over the block, the states of threads that hold the same channel: thread t holds
// channel t % width (width a power of two <= 32; 1 when the whole block reduces one channel).
// Lanes l, l + width, l + 2 width, ... are merged by a shuffle tree, then the warps in order
// through shared memory. The result for channel t is returned in threads t < width.
template <typename State>
__device__ State block_merge(State s, int width) {
  using Ops = StateOps<State>;
  for (int offset = kWarpSize / 2; offset >= width; offset >>= 1) s = Ops::merge(s, Ops::shfl_down(s, offset));
  __shared__ State per_warp[kWarps][kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane < width) per_warp[warp][lane] = s;
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < width) {
    s = per_warp[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w) s = Ops::merge(s, per_warp[w][threadIdx.x]);
  }
  return s;
}

template <typename T>
struct LpState {
  T sum;               // sum x
  T pow;               // sum |x|^p (p = 1, 2)
  MaxAbs<T> max;       // p = inf
};

// A thread's l_p accumulation: sum (x - shift) (shift_for its first value), sum |x|^p, max |x|.
template <typename T>
struct LpLocal {
  T shift;
  T sum;
  T pow;
  MaxAbs<T> max;
  int64_t count;
};

template <typename T>
struct StateOps<LpState<T>> {
  using State = LpState<T>;
  static __device__ State identity() { return State{T(0), T(0), maxabs_init<T>()}; }
  static __device__ State merge(const State& a, const State& b) {
    return State{a.sum + b.sum, a.pow + b.pow, maxabs_merge(a.max, b.max)};
  }
  static __device__ State shfl_down(const State& s, int offset) {
    return State{__shfl_down_sync(kFullMask, s.sum, offset), __shfl_down_sync(kFullMask, s.pow, offset),
                 MaxAbs<T>{__shfl_down_sync(kFullMask, s.max.max, offset),
                           static_cast<int64_t>(__shfl_down_sync(kFullMask, static_cast<long long>(s.max.index), offset))}};
  }
};

// ---------------------------------------------------------------------------------------------
// Reduction policies: what a reduction loads per element and how it accumulates it.
//   Local start()                         a thread's empty accumulator (acc_t)
//   Channel channel(c)                    per-channel constants, loaded once per thread
//   Item load(i)                          the element's inputs (issued kUnroll at a time)
//   accumulate(local, item, channel, i, pos)   i: flat offset, pos: position n * S + s of the
//                                             element within its channel (known to both reduce
//                                             kernels without a division)
//   State partial(local)                  the thread's fp64 partial, merged from there on
// reads(channel) (a free function, true unless overloaded) says whether a thread loads its
// channel's values at all.
// ---------------------------------------------------------------------------------------------

template <typename Channel>
__device__ bool reads(const Channel&) {
  return true;
}

// BatchNormStatsPolicy's channel: `live` unless only the channels whose mean residual matters are
// wanted (the BatchNorm+ReLU backward recomputing the forward's residual).
struct StatsChannel {
  bool live;
};
__device__ bool reads(const StatsChannel& ch) { return ch.live; }

// A thread's Welford state of x - shift (shift_for its first value).
template <typename T>
struct ShiftedWelford {
  T shift;
  WelfordState<T> d;
};

// Batch statistics: Welford update per element (csrc/common/welford.h) around the thread's shift.
// With `mean` and `invstd` (the saved statistics) only the channels where bn_mean_residual_matters
// are read; the others' partials are empty.
template <typename scalar_t, typename acc_t>
struct BatchNormStatsPolicy {
  using State = WelfordState<double>;
  using Local = ShiftedWelford<acc_t>;
  using Item = acc_t;
  using Channel = StatsChannel;
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ mean = nullptr;
  const acc_t* __restrict__ invstd = nullptr;

  __device__ Local start() const { return Local{acc_t(0), welford_init<acc_t>()}; }
  __device__ Channel channel(int64_t c) const {
    return Channel{mean == nullptr || bn_mean_residual_matters(mean[c], invstd[c])};
  }
  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  __device__ void accumulate(Local& s, const Item& v, const Channel&, int64_t, int64_t) const {
    if (s.d.count == 0) s.shift = shift_for(v);
    welford_update(s.d, v - s.shift);
  }
  __device__ State partial(const Local& s) const {
    return State{static_cast<double>(s.shift) + static_cast<double>(s.d.mean), static_cast<double>(s.d.m2), s.d.count};
  }
};

// Backward sums: g = dy masked by the ReLU recomputed from x (bn_masked_grad),
//   sum_dy += g,  sum_dy_xc += g * (x - mean).
// WRITE_EVAL_GRAD (eval mode, statistics are constants): also dx = g * invstd * w in this pass.
// mean_lo: the forward's residual of the mean (the ReLU mask is the forward's), or null (0).
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
struct GradSumsPolicy {
  using State = GradSums<double>;
  using Local = GradSums<acc_t>;
  struct Item {
    acc_t x, dy;
  };
  using Channel = ChannelAffine<acc_t>;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ dy;
  scalar_t* __restrict__ dx;  // written only with WRITE_EVAL_GRAD
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ scale;  // invstd * weight
  const acc_t* __restrict__ shift;  // bias
  const acc_t* __restrict__ mean_lo = nullptr;

  __device__ Local start() const { return Local{acc_t(0), acc_t(0), acc_t(0)}; }
  __device__ Channel channel(int64_t c) const {
    return Channel{mean[c], scale[c], shift[c], mean_lo != nullptr ? mean_lo[c] : acc_t(0)};
  }
  __device__ Item load(int64_t i) const { return Item{to_acc(x[i]), to_acc(dy[i])}; }
  __device__ void accumulate(Local& s, const Item& v, const Channel& a, int64_t i, int64_t) const {
    const acc_t g = bn_masked_grad(v.dy, v.x, a, RELU);
    const acc_t xc = v.x - a.mean;
    s.dy += g;
    s.dy_xc += g * xc;
    s.xc += xc;
    if (WRITE_EVAL_GRAD) store(dx + i, g * a.scale);
  }
  __device__ State partial(const Local& s) const {
    return State{static_cast<double>(s.dy), static_cast<double>(s.dy_xc), static_cast<double>(s.xc)};
  }
};

// l_p statistics: sum (x - shift), and sum |x|^p or the first max |x|, per thread; the partial's sum
// is count * shift + sum in fp64 (for an fp32 shift an exact product: 24 bits times a count far
// below 2^29).
template <typename scalar_t, typename acc_t, LpKind P>
struct LpNormStatsPolicy {
  using State = LpState<double>;
  using Local = LpLocal<acc_t>;
  using Item = acc_t;
  struct Channel {};
  const scalar_t* __restrict__ x;

  __device__ Local start() const { return Local{acc_t(0), acc_t(0), acc_t(0), maxabs_init<acc_t>(), 0}; }
  __device__ Channel channel(int64_t) const { return Channel{}; }
  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  // Each thread sees its channel's values in increasing position, so the strict comparison of
  // maxabs_update keeps the first arg-max; merges break ties by position.
  __device__ void accumulate(Local& s, const Item& v, const Channel&, int64_t, int64_t pos) const {
    if (s.count == 0) s.shift = shift_for(v);
    s.count += 1;
    s.sum += v - s.shift;
    if (P == LpKind::kLinf) maxabs_update(s.max, v, pos);
    else s.pow += lp_power(v, P);
  }
  __device__ State partial(const Local& s) const {
    return State{static_cast<double>(s.count) * static_cast<double>(s.shift) + static_cast<double>(s.sum),
                 static_cast<double>(s.pow), MaxAbs<double>{static_cast<double>(s.max.max), s.max.index}};
  }
};

// ---------------------------------------------------------------------------------------------
// Reduction kernels
// ---------------------------------------------------------------------------------------------

// Planar x[n][c][s]. Block (c, g) reduces values j in [g * per_group, (g + 1) * per_group) of
// channel c, value j = n * S + s at offset (n * C + c) * S + s; consecutive threads take
// consecutive j, so reads are contiguous within each run of S. `step` = digit_step(kThreads, S, N)
// moves a thread's (n, s) to its next value. Writes partial[g * C + c].
template <typename Policy>
__global__ void __launch_bounds__(kThreads)
planar_reduce_kernel(Policy p, int64_t N, int64_t C, int64_t S, int64_t per_group, DigitStep step,
                     typename Policy::State* __restrict__ partial) {
  using State = typename Policy::State;
  const int64_t c = blockIdx.x, g = blockIdx.y;
  const int64_t end = min64(N * S, (g + 1) * per_group);
  const auto channel = p.channel(c);
  typename Policy::Local s = p.start();
  int64_t j = g * per_group + threadIdx.x;
  Digits d = digits_of(j, S, N);
  for (; j < end && reads(channel); j += kThreads * kUnroll) {
    typename Policy::Item item[kUnroll];
    int64_t offset[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      offset[k] = (d.q * C + c) * S + d.r;
      if (j + k * kThreads < end) item[k] = p.load(offset[k]);
      advance(d, step, S, N);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (j + k * kThreads < end) p.accumulate(s, item[k], channel, offset[k], j + k * kThreads);
    }
  }
  const State total = block_merge(p.partial(s), 1);
  if (threadIdx.x == 0) partial[g * C + c] = total;
}

// Interleaved x[m][c] (M rows of C channels). The block is `width` channels x (kThreads / width)
// rows: thread t reads channel blockIdx.x * width + t % width of rows t / width + k * height in
// row group g = blockIdx.y. Writes partial[g * C + c].
template <typename Policy>
__global__ void __launch_bounds__(kThreads)
interleaved_reduce_kernel(Policy p, int64_t M, int64_t C, int width, int64_t rows_per_group,
                          typename Policy::State* __restrict__ partial) {
  using State = typename Policy::State;
  const int height = kThreads / width;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * width + threadIdx.x % width;
  const int64_t g = blockIdx.y;
  const int64_t end = min64(M, (g + 1) * rows_per_group);
  typename Policy::Local s = p.start();
  if (c < C && reads(p.channel(c))) {
    const auto channel = p.channel(c);
    for (int64_t row = g * rows_per_group + threadIdx.x / width; row < end; row += height * kUnroll) {
      typename Policy::Item item[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        if (row + k * height < end) item[k] = p.load((row + k * height) * C + c);
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        if (row + k * height < end) p.accumulate(s, item[k], channel, (row + k * height) * C + c, row + k * height);
      }
    }
  }
  const State total = block_merge(p.partial(s), width);  // every thread takes part in the shuffles
  if (static_cast<int>(threadIdx.x) < width && c < C) partial[g * C + c] = total;
}

// Per channel: merge the G partials (one warp per channel: lane l takes g = l, l + 32, ... in
// order, then a shuffle tree), and hand the total to `finish(c, total)`.
template <typename State, typename Finish>
__global__ void __launch_bounds__(kThreads)
merge_partials_kernel(const State* __restrict__ partial, int64_t G, int64_t C, Finish finish) {
  using Ops = StateOps<State>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarps;
  // c is uniform across a warp, so every lane of a warp runs the same iterations.
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; c < C; c += warps_in_grid) {
    State s = Ops::identity();
    for (int64_t g = lane; g < G; g += kWarpSize) s = Ops::merge(s, partial[g * C + c]);
    for (int offset = kWarpSize / 2; offset >= 1; offset >>= 1) s = Ops::merge(s, Ops::shfl_down(s, offset));
    if (lane == 0) finish(c, s);
  }
}


// ---------------------------------------------------------------------------------------------
// Host-side launch helpers
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

// Grid of a reduction: grid.x = channel tiles, grid.y = G groups of `per_group` values (planar:
// flat (n, s) values of the channel; interleaved: rows).
struct ReducePlan {
  int width;          // channels per block (1 for planar)
  int64_t tiles;      // grid.x
  int64_t groups;     // grid.y = G
  int64_t per_group;  // values (planar) or rows (interleaved) per block
};

ReducePlan plan_reduce(const Geometry& g, int sms) {
  ReducePlan plan;
  if (g.interleaved) {
    plan.width = 1;
    while (plan.width < 32 && plan.width < g.C) plan.width *= 2;
    plan.tiles = ceil_div(g.C, plan.width);
  } else {
    plan.width = 1;
    plan.tiles = g.C;
  }
  const int64_t values = g.interleaved ? g.rows() : g.N * g.S;  // per channel
  const int64_t threads_per_channel = kThreads / plan.width;
  // Enough blocks to fill the GPU, no thread with more than kMaxPerThread values, and none
  // with fewer than kMinPerThread unless the channel is that small.
  int64_t G = std::max(ceil_div(kBlocksPerSM * sms, plan.tiles), ceil_div(values, threads_per_channel * kMaxPerThread));
  G = std::min(G, ceil_div(values, threads_per_channel * kMinPerThread));
  G = std::max<int64_t>(1, std::min(G, kMaxGridY));
  plan.per_group = ceil_div(values, G);
  plan.groups = ceil_div(values, plan.per_group);
  TORCH_INTERNAL_ASSERT(plan.tiles <= std::numeric_limits<int32_t>::max(), "bnext: too many channels: ", g.C);
  return plan;
}

template <typename State>
State* partial_buffer(at::Tensor& storage, const ReducePlan& plan, const Geometry& g, const at::Tensor& like) {
  storage = at::empty({plan.groups * g.C * static_cast<int64_t>(sizeof(State))}, like.options().dtype(at::kByte));
  return reinterpret_cast<State*>(storage.mutable_data_ptr());
}

// Reduce in the layout of `g`, then merge each channel's partials into `finish`.
template <typename Policy, typename Finish>
void reduce_and_merge(const Policy& p, const Geometry& g, const at::Tensor& like, int sms, Finish finish,
                      cudaStream_t stream) {
  using State = typename Policy::State;
  const ReducePlan plan = plan_reduce(g, sms);
  at::Tensor storage;
  State* partial = partial_buffer<State>(storage, plan, g, like);
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.groups));
  if (g.interleaved) {
    launch(interleaved_reduce_kernel<Policy>, grid, kThreads, 0, stream, p, g.rows(), g.C, plan.width, plan.per_group, partial);
  } else {
    launch(planar_reduce_kernel<Policy>, grid, kThreads, 0, stream, p, g.N, g.C, g.S, plan.per_group,
           digit_step(kThreads, g.S, g.N), partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned merge_blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(g.C, kWarps), 1 << 16));
  launch(merge_partials_kernel<State, Finish>, merge_blocks, kThreads, 0, stream, partial, plan.groups, g.C, finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


}  // namespace
}  // namespace bnext
