#pragma once
// The CUDA skeleton shared by every normalization op: storage conversions, reduction states and
// policies, the reduction, merge and elementwise kernels and their host launchers, and BatchNorm's
// own passes. Same semantics as csrc/cpu/normalization.cpp. Each op's entry points live in their own
// .cu file (batch_norm.cu, noisy_batch_norm.cu, lp_norm.cu, sync_normalization.cu) so that nvcc
// compiles them side by side; everything here has internal linkage (one copy per .cu file).
//
// Formulas: csrc/common/batch_norm_math.h. Statistics: csrc/common/welford.h. The kernels call
// those torch-free __host__ __device__ functions, so the CPU tests exercise the per-element math.
//
// Passes (x is read in one of the two layouts of csrc/layout.h):
//   forward, training: reduce (Welford partials per (row group, channel))  -> merge per channel
//                      -> per-channel scale  -> elementwise y
//   forward, eval:     per-channel scale -> elementwise y
//   backward:          per-channel scale -> reduce (sum g, sum g * (x - mean); eval also writes dx)
//                      -> merge per channel -> training: elementwise dx
// The reductions are one templated kernel per layout over a small policy (what is loaded and
// accumulated per element: Welford state, or the two gradient sums):
//   planar (NCHW):       block (c, g) walks the g-th slice of channel c's N*S values;
//   interleaved (NHWC):  block (channel tile, g) reads whole rows of `width` consecutive channels,
//                        so a warp's loads are contiguous; lanes holding the same channel are
//                        merged with warp shuffles, then warps through shared memory.
// Both write one partial per (g, c); a second kernel merges a channel's partials with one warp.
// How many row groups g a channel is split into depends on the shape and the SM count only, so
// results are deterministic on a given GPU model.
//
// Numerics: per-thread accumulation is in the accumulation type acc_t (fp32 for fp16/bf16/fp32,
// fp64 for fp64) over at most kMaxPerThread values, then combined by trees (shuffles, shared
// memory, the merge warp). Statistics use Welford updates and Chan merges, so nothing cancels
// when |mean| >> std; the gradient sums take g * (x - mean), never g * x - mean * sum g.
// invstd = 1 / sqrt(var + eps) is computed in fp64 per channel, as the CPU path does, and the
// elementwise passes compute (x - mean) * scale, not x * alpha + beta.
// setup.py compiles with --fmad=false and IEEE division and sqrt (no --use_fast_math), as the CPU
// build compiles with -ffp-contract=off: every per-element formula rounds the same way on both
// sides, which is what makes the noise bitwise equal to the CPU's.
//
// Indexing is 64-bit wherever an index spans the tensor. Element (flat index i) -> channel is
// tracked with a "digits" cursor: one division per thread, then only adds and compares.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../common/batch_norm_math.h"
#include "../common/lp_norm_math.h"
#include "../common/noise.h"
#include "../common/sync_math.h"
#include "../common/welford.h"
#include "../layout.h"
#include "../ops.h"

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
// Storage types and conversions (torch-free): c10::Half / c10::BFloat16 tensors are read as the
// CUDA types with explicit round-to-nearest conversions (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__, so implicit ones do not exist).
// ---------------------------------------------------------------------------------------------

template <typename T> struct DeviceScalar { using type = T; };
template <> struct DeviceScalar<c10::Half> { using type = __half; };
template <> struct DeviceScalar<c10::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

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
// Reduction states: identity, merge and warp shuffle for each.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct GradSums {
  T dy;     // sum g
  T dy_xc;  // sum g * (x - mean)
};

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
  static __device__ State identity() { return State{T(0), T(0)}; }
  static __device__ State merge(const State& a, const State& b) { return State{a.dy + b.dy, a.dy_xc + b.dy_xc}; }
  static __device__ State shfl_down(const State& s, int offset) {
    return State{__shfl_down_sync(kFullMask, s.dy, offset), __shfl_down_sync(kFullMask, s.dy_xc, offset)};
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

// ---------------------------------------------------------------------------------------------
// Reduction policies: what a reduction loads per element and how it accumulates it.
//   Channel channel(c)                    per-channel constants, loaded once per thread
//   Item load(i)                          the element's inputs (issued kUnroll at a time)
//   accumulate(state, item, channel, i, pos)   i: flat offset, pos: position n * S + s of the
//                                             element within its channel (known to both reduce
//                                             kernels without a division)
// ---------------------------------------------------------------------------------------------

// Batch statistics: Welford update per element (csrc/common/welford.h).
template <typename scalar_t, typename acc_t>
struct StatsPolicy {
  using State = WelfordState<acc_t>;
  using Item = acc_t;
  struct Channel {};
  const scalar_t* __restrict__ x;

  __device__ Channel channel(int64_t) const { return Channel{}; }
  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  __device__ void accumulate(State& s, const Item& v, const Channel&, int64_t, int64_t) const { welford_update(s, v); }
};

// Backward sums: g = dy masked by the ReLU recomputed from x (bn_masked_grad),
//   sum_dy += g,  sum_dy_xc += g * (x - mean).
// WRITE_EVAL_GRAD (eval mode, statistics are constants): also dx = g * invstd * w in this pass.
template <typename scalar_t, typename acc_t, bool RELU, bool WRITE_EVAL_GRAD>
struct GradPolicy {
  using State = GradSums<acc_t>;
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

  __device__ Channel channel(int64_t c) const { return Channel{mean[c], scale[c], shift[c]}; }
  __device__ Item load(int64_t i) const { return Item{to_acc(x[i]), to_acc(dy[i])}; }
  __device__ void accumulate(State& s, const Item& v, const Channel& a, int64_t i, int64_t) const {
    const acc_t g = bn_masked_grad(v.dy, v.x, a, RELU);
    s.dy += g;
    s.dy_xc += g * (v.x - a.mean);
    if (WRITE_EVAL_GRAD) store(dx + i, g * a.scale);
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
  State s = StateOps<State>::identity();
  int64_t j = g * per_group + threadIdx.x;
  Digits d = digits_of(j, S, N);
  for (; j < end; j += kThreads * kUnroll) {
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
  s = block_merge(s, 1);
  if (threadIdx.x == 0) partial[g * C + c] = s;
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
  State s = StateOps<State>::identity();
  if (c < C) {
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
  s = block_merge(s, width);  // every thread takes part in the shuffles
  if (static_cast<int>(threadIdx.x) < width && c < C) partial[g * C + c] = s;
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

// Batch statistics: mean and biased variance.
template <typename acc_t>
struct StatsFinish {
  acc_t* mean;
  acc_t* var;
  __device__ void operator()(int64_t c, const WelfordState<acc_t>& s) const {
    mean[c] = s.mean;
    var[c] = welford_variance(s);
  }
};

// Backward sums, as the CPU path forms them (fp64 arithmetic on the channel totals):
//   sum_dy = sum g,  sum_dy_xhat = sum g * (x - mean) * invstd,
//   training: mean_dy = sum_dy / M,  proj = sum g * (x - mean) * invstd^2 / M.
template <typename acc_t>
struct GradFinish {
  const acc_t* invstd;
  acc_t* sum_dy;
  acc_t* sum_dy_xhat;
  acc_t* mean_dy;  // null in eval
  acc_t* proj;     // null in eval
  double M;
  __device__ void operator()(int64_t c, const GradSums<acc_t>& s) const {
    const double inv = static_cast<double>(invstd[c]);
    const double s_dy = static_cast<double>(s.dy), s_dy_xc = static_cast<double>(s.dy_xc);
    sum_dy[c] = s.dy;
    sum_dy_xhat[c] = static_cast<acc_t>(s_dy_xc * inv);
    if (mean_dy != nullptr) {
      mean_dy[c] = static_cast<acc_t>(s_dy / M);
      proj[c] = static_cast<acc_t>(s_dy_xc * inv * inv / M);
    }
  }
};

// Per channel: invstd = 1 / sqrt(var + eps) in fp64 (as the CPU path), rounded to acc_t;
// scale = invstd * weight in acc_t. `invstd_out` may be null.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
channel_scale_kernel(const acc_t* __restrict__ var, const acc_t* __restrict__ weight, double eps, int64_t C,
                     acc_t* __restrict__ invstd_out, acc_t* __restrict__ scale) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc_t invstd = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(var[c]) + eps));
    if (invstd_out != nullptr) invstd_out[c] = invstd;
    scale[c] = invstd * weight[c];
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels: one over both layouts, channel of flat index i = (i / inner) % C with
// inner = S (planar) or 1 (interleaved). The array is cut into tiles of kThreads * kUnroll
// elements; block b takes tiles b, b + gridDim.x, ... (grid-stride, so the one division per
// thread is amortized), and in a tile thread t handles t + k * kThreads: loads first, then
// computes and stores.
// ---------------------------------------------------------------------------------------------

// y = act((x - mean) * scale + shift)   (bn_forward_value)
template <typename scalar_t, typename acc_t, bool RELU>
struct ForwardOp {
  using Item = acc_t;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;

  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  __device__ void apply(int64_t i, const Item& v, int64_t c) const {
    store(y + i, bn_forward_value(v, ChannelAffine<acc_t>{mean[c], scale[c], shift[c]}, RELU));
  }
};

// Training dx = (g - mean_dy - (x - mean) * proj) * invstd * w,  g = masked dy
// (bn_masked_grad, bn_backward_train_value).
template <typename scalar_t, typename acc_t, bool RELU>
struct BackwardOp {
  struct Item {
    acc_t x, dy;
  };
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ dy;
  scalar_t* __restrict__ dx;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ scale;  // invstd * weight
  const acc_t* __restrict__ shift;  // bias (for the ReLU mask)
  const acc_t* __restrict__ mean_dy;
  const acc_t* __restrict__ proj;

  __device__ Item load(int64_t i) const { return Item{to_acc(x[i]), to_acc(dy[i])}; }
  __device__ void apply(int64_t i, const Item& v, int64_t c) const {
    const acc_t g = bn_masked_grad(v.dy, v.x, ChannelAffine<acc_t>{mean[c], scale[c], shift[c]}, RELU);
    store(dx + i, bn_backward_train_value(g, v.x, ChannelBackward<acc_t>{mean[c], mean_dy[c], proj[c], scale[c]}));
  }
};

// `step` = digit_step(kThreads, inner, C) moves to the thread's next element in the tile, `jump`
// = digit_step((gridDim.x - 1) * tile, inner, C) from the end of one of its tiles to its next.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(Op op, int64_t numel, int64_t inner, int64_t C, DigitStep step, DigitStep jump) {
  constexpr int64_t kTile = kThreads * kUnroll;
  const int64_t tile_stride = static_cast<int64_t>(gridDim.x) * kTile;
  int64_t start = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  Digits d = digits_of(start, inner, C);
  for (; start < numel; start += tile_stride) {
    typename Op::Item item[kUnroll];
    int64_t channel[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      channel[k] = d.q;
      if (start + k * kThreads < numel) item[k] = op.load(start + k * kThreads);
      advance(d, step, inner, C);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (start + k * kThreads < numel) op.apply(start + k * kThreads, item[k], channel[k]);
    }
    advance(d, jump, inner, C);
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
    interleaved_reduce_kernel<Policy><<<grid, kThreads, 0, stream>>>(p, g.rows(), g.C, plan.width, plan.per_group, partial);
  } else {
    planar_reduce_kernel<Policy><<<grid, kThreads, 0, stream>>>(p, g.N, g.C, g.S, plan.per_group,
                                                                digit_step(kThreads, g.S, g.N), partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned merge_blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(g.C, kWarps), 1 << 16));
  merge_partials_kernel<State, Finish><<<merge_blocks, kThreads, 0, stream>>>(partial, plan.groups, g.C, finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Enough blocks for kBlocksPerSM resident per SM, each looping over its tiles.
template <typename Op>
void launch_elementwise(const Op& op, const Geometry& g, int sms, cudaStream_t stream) {
  constexpr int64_t kTile = kThreads * kUnroll;
  const int64_t inner = g.interleaved ? 1 : g.S;
  const int64_t blocks = std::min<int64_t>(ceil_div(g.numel(), kTile), kBlocksPerSM * sms);
  elementwise_kernel<Op><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      op, g.numel(), inner, g.C, digit_step(kThreads, inner, g.C), digit_step((blocks - 1) * kTile, inner, g.C));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_channel_scale(const at::Tensor& var, const at::Tensor& weight, double eps, acc_t* invstd,
                          at::Tensor& scale, cudaStream_t stream) {
  const int64_t C = var.numel();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(C, kThreads), 1 << 16));
  channel_scale_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
      var.const_data_ptr<acc_t>(), weight.const_data_ptr<acc_t>(), eps, C, invstd, scale.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
const typename DeviceScalar<scalar_t>::type* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename DeviceScalar<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename DeviceScalar<scalar_t>::type* device_ptr_mut(at::Tensor& t) {
  return reinterpret_cast<typename DeviceScalar<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

template <typename scalar_t, bool RELU>
void forward_impl(const at::Tensor& x, at::Tensor& y, const Geometry& g, bool training, double eps,
                  const at::Tensor& weight, const at::Tensor& bias, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  using dev_t = typename DeviceScalar<scalar_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.device());
  const dev_t* xp = device_ptr<scalar_t>(x);
  if (training) {
    reduce_and_merge(StatsPolicy<dev_t, acc_t>{xp}, g, x, sms,
                     StatsFinish<acc_t>{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>()}, stream);
  }
  at::Tensor scale = at::empty({g.C}, mean.options());
  launch_channel_scale<acc_t>(var, weight, eps, nullptr, scale, stream);
  launch_elementwise(ForwardOp<dev_t, acc_t, RELU>{xp, device_ptr_mut<scalar_t>(y), mean.const_data_ptr<acc_t>(),
                                                  scale.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>()},
                     g, sms, stream);
}

template <typename scalar_t, bool RELU>
void backward_impl(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const Geometry& g,
                   bool training, double eps, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& mean_t, const at::Tensor& var_t, at::Tensor& sum_dy, at::Tensor& sum_dy_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  using dev_t = typename DeviceScalar<scalar_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x_t.device());
  const dev_t* x = device_ptr<scalar_t>(x_t);
  const dev_t* dy = device_ptr<scalar_t>(dy_t);
  dev_t* dx = device_ptr_mut<scalar_t>(dx_t);
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  const acc_t* shift = bias.const_data_ptr<acc_t>();

  at::Tensor invstd = at::empty({g.C}, mean_t.options());
  at::Tensor scale = at::empty({g.C}, mean_t.options());
  launch_channel_scale<acc_t>(var_t, weight, eps, invstd.mutable_data_ptr<acc_t>(), scale, stream);
  const acc_t* scale_p = scale.const_data_ptr<acc_t>();

  at::Tensor mean_dy, proj;
  if (training) {
    mean_dy = at::empty({g.C}, mean_t.options());
    proj = at::empty({g.C}, mean_t.options());
  }
  const GradFinish<acc_t> finish{invstd.const_data_ptr<acc_t>(), sum_dy.mutable_data_ptr<acc_t>(),
                                 sum_dy_xhat.mutable_data_ptr<acc_t>(),
                                 training ? mean_dy.mutable_data_ptr<acc_t>() : nullptr,
                                 training ? proj.mutable_data_ptr<acc_t>() : nullptr, static_cast<double>(g.rows())};
  with_bool(!training, [&](auto write_eval) {
    using Policy = GradPolicy<dev_t, acc_t, RELU, decltype(write_eval)::value>;
    reduce_and_merge(Policy{x, dy, dx, mean, scale_p, shift}, g, x_t, sms, finish, stream);
  });
  if (!training) return;
  launch_elementwise(BackwardOp<dev_t, acc_t, RELU>{x, dy, dx, mean, scale_p, shift, mean_dy.const_data_ptr<acc_t>(),
                                                   proj.const_data_ptr<acc_t>()},
                     g, sms, stream);
}

void check_cuda_input(const at::Tensor& input, const char* op) {
  check_input(input);
  TORCH_CHECK(input.is_cuda(), "bnext.", op, ": the CUDA kernel got input on ", input.device());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), "bnext: ", name, " is on ", t.device(), " but input is on ",
              input.device());
}


// ---------------------------------------------------------------------------------------------
// Noise passes (noisy BatchNorm, noise_apply). One thread per unit: the pair of elements
// (n, c, s) and (n, c, s + 1), s even, whose noise one Philox call, one log and one sincos give
// (pair_noise of csrc/common/noise.h: they are the logical indices 2k, 2k + 1 of one (n, c) when S
// is even), or, when S is odd (a logical pair would straddle two channels), one element with its
// own draw. Unit u = (d0 * R1 + d1) * R2 + d2 is tracked by a three-digit cursor, planar
// (n, c, s / w), interleaved (n, s / w, c), w = 2 for pairs, else 1: the divisions happen once per
// thread (cursor_of), each grid-stride step only adds and carries.
// ---------------------------------------------------------------------------------------------

struct Cursor3 {
  int64_t d0, d1, d2;
};

BNEXT_HD Cursor3 cursor_of(int64_t u, int64_t R1, int64_t R2) {
  const int64_t t = u / R2;
  return Cursor3{t / R1, t % R1, u % R2};
}

// Adds `step` (its d1 < R1, d2 < R2, so one carry per digit suffices; d0 is unbounded).
BNEXT_HD void advance3(Cursor3& c, const Cursor3& step, int64_t R1, int64_t R2) {
  c.d0 += step.d0;
  c.d1 += step.d1;
  c.d2 += step.d2;
  if (c.d2 >= R2) {
    c.d2 -= R2;
    c.d1 += 1;
  }
  if (c.d1 >= R1) {
    c.d1 -= R1;
    c.d0 += 1;
  }
}

struct NoiseUnits {
  int64_t C, S;
  bool interleaved;
  int64_t n0;     // global index of sample 0 (noise_apply's sample_offset; 0 otherwise)
  int64_t R1, R2; // digit radices (see above)
  int64_t count;  // units
};

// Op: Item load(i); apply(i, item, c, ElementNoise). Loads of a pair are issued before the applies.
template <typename Op, bool PAIRED>
__global__ void __launch_bounds__(kThreads)
noise_kernel(Op op, NoiseSpec ns, const float* __restrict__ mu, const float* __restrict__ sigma, NoiseUnits u,
             Cursor3 step) {
  constexpr int64_t W = PAIRED ? 2 : 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t unit = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  Cursor3 cur = cursor_of(unit, u.R1, u.R2);
  for (; unit < u.count; unit += stride, advance3(cur, step, u.R1, u.R2)) {
    const int64_t n = cur.d0;
    const int64_t c = u.interleaved ? cur.d2 : cur.d1;
    const int64_t s = (u.interleaved ? cur.d1 : cur.d2) * W;
    const int64_t i0 = u.interleaved ? (n * u.S + s) * u.C + c : (n * u.C + c) * u.S + s;
    // noise_index(n0 + n, c, s, P, S), without the division when c < P (always, outside vmap)
    const int64_t cp = c < ns.period ? c : c % ns.period;
    const int64_t j0 = ((u.n0 + n) * ns.period + cp) * u.S + s;
    const ChannelNoise ch{mu[c], sigma[c]};
    if (PAIRED) {
      const int64_t i1 = i0 + (u.interleaved ? u.C : 1);
      const typename Op::Item v0 = op.load(i0), v1 = op.load(i1);
      ElementNoise e0, e1;
      pair_noise(ns, ch, j0, e0, e1);
      op.apply(i0, v0, c, e0);
      op.apply(i1, v1, c, e1);
    } else {
      op.apply(i0, op.load(i0), c, element_noise(ns, ch, j0));
    }
  }
}

__global__ void __launch_bounds__(kThreads)
channel_noise_kernel(NoiseSpec ns, int64_t C, float* __restrict__ mu, float* __restrict__ sigma) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    const ChannelNoise ch = channel_noise(ns, c);
    mu[c] = ch.mu;
    sigma[c] = ch.sigma;
  }
}

unsigned channel_blocks(int64_t C) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(C, kThreads), 1 << 16)));
}

// The per-channel noise constants (mu_c, sigma_c) as fp32 vectors on the input's device.
std::pair<at::Tensor, at::Tensor> channel_noise_vectors(const NoiseSpec& ns, int64_t C, const at::Tensor& like,
                                                        cudaStream_t stream) {
  at::Tensor mu = at::empty({C}, like.options().dtype(at::kFloat)), sigma = at::empty_like(mu);
  channel_noise_kernel<<<channel_blocks(C), kThreads, 0, stream>>>(ns, C, mu.mutable_data_ptr<float>(),
                                                                    sigma.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mu, sigma};
}

// Runs `op` over every element of `g` with its noise (samples numbered from n0).
template <typename Op>
void launch_noise(const Op& op, const Geometry& g, const NoiseSpec& ns, const at::Tensor& mu,
                  const at::Tensor& sigma, int64_t n0, int sms, cudaStream_t stream) {
  const bool paired = g.S % 2 == 0;
  const int64_t w = paired ? 2 : 1;
  NoiseUnits u{g.C, g.S, g.interleaved, n0, g.interleaved ? g.S / w : g.C, g.interleaved ? g.C : g.S / w,
               g.numel() / w};
  const int64_t blocks = std::min<int64_t>(ceil_div(u.count, kThreads), kBlocksPerSM * sms);
  const Cursor3 step = cursor_of(blocks * kThreads, u.R1, u.R2);
  const float* mup = mu.const_data_ptr<float>();
  const float* sigmap = sigma.const_data_ptr<float>();
  if (paired) {
    noise_kernel<Op, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, ns, mup, sigmap, u, step);
  } else {
    noise_kernel<Op, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, ns, mup, sigmap, u, step);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --- l_p statistics (lp_norm and lp_norm_stats) -----------------------------------------------

template <typename T>
struct LpState {
  T sum;               // sum x
  T pow;               // sum |x|^p (p = 1, 2)
  MaxAbs<T> max;       // p = inf
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

template <typename scalar_t, typename acc_t, LpKind P>
struct LpStatsPolicy {
  using State = LpState<acc_t>;
  using Item = acc_t;
  struct Channel {};
  const scalar_t* __restrict__ x;

  __device__ Channel channel(int64_t) const { return Channel{}; }
  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  // Each thread sees its channel's values in increasing position, so the strict comparison of
  // maxabs_update keeps the first arg-max; merges break ties by position.
  __device__ void accumulate(State& s, const Item& v, const Channel&, int64_t, int64_t pos) const {
    s.sum += v;
    if (P == LpKind::kLinf) maxabs_update(s.max, v, pos);
    else s.pow += lp_power(v, P);
  }
};

}  // namespace
}  // namespace bnext
