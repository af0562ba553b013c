#pragma once
// The CUDA elementwise passes shared by the normalization ops: elementwise_kernel over both layouts
// with an op (AffineEpilogue: BatchNorm's and l_p's forward, BatchNormBackward: BatchNorm's training
// dx), the per-channel scale kernel, and the noise kernel (noisy BatchNorm, noise_apply) that draws
// an element pair's noise with one Philox call. Same semantics as csrc/cpu/passes.h.
//
// Formulas: csrc/common/batch_norm_math.h, noise.h. invstd = 1 / sqrt(var + eps) (or l_p's
// 1 / (N + eps)) is computed in fp64 per channel, as the CPU path does, and the elementwise passes
// compute ((x - mean) - mean_lo) * scale, not x * alpha + beta: mean_lo is the residual of the
// fp64 mean that the saved acc_t mean leaves out (null pointers: 0), as csrc/cpu/passes.h carries it.
// setup.py compiles with --fmad=false and IEEE division and sqrt (no --use_fast_math), as the CPU
// build compiles with -ffp-contract=off: every per-element formula rounds the same way on both
// sides, which is what makes the noise bitwise equal to the CPU's.
#include "../common/noise.h"
#include "reduce.cuh"

namespace bnext {
namespace {

// Which statistic a per-channel scale comes from: BatchNorm's variance, invstd = 1 / sqrt(var + eps),
// or l_p's norm, inv = 1 / (N + eps) (CPU: ChannelParams, lp_params).
enum class ScaleOf { kVariance, kNorm };

// Per channel: invstd in fp64 (as the CPU path), rounded to acc_t; scale = invstd * weight in acc_t.
// `invstd_out` may be null.
template <typename acc_t, ScaleOf KIND>
__global__ void __launch_bounds__(kThreads)
channel_scale_kernel(const acc_t* __restrict__ second, const acc_t* __restrict__ weight, double eps, int64_t C,
                     acc_t* __restrict__ invstd_out, acc_t* __restrict__ scale) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc_t invstd = KIND == ScaleOf::kVariance ? bn_invstd(second[c], eps)
                                                    : static_cast<acc_t>(1.0 / (static_cast<double>(second[c]) + eps));
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

// The residual of channel c's mean, or 0 when none is carried (a null vector).
template <typename acc_t>
__device__ acc_t residual_at(const acc_t* mean_lo, int64_t c) {
  return mean_lo != nullptr ? mean_lo[c] : acc_t(0);
}

// y = act(((x - mean) - mean_lo) * scale + shift)   (bn_forward_value)
template <typename scalar_t, typename acc_t, bool RELU>
struct AffineEpilogue {
  using Item = acc_t;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;
  const acc_t* __restrict__ mean_lo = nullptr;

  __device__ ChannelAffine<acc_t> affine(int64_t c) const {
    return ChannelAffine<acc_t>{mean[c], scale[c], shift[c], residual_at(mean_lo, c)};
  }
  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  __device__ void apply(int64_t i, const Item& v, int64_t c) const {
    store(y + i, bn_forward_value(v, affine(c), RELU));
  }
};

// Training dx = (g - mean_dy - (x - mean - lo) * proj) * invstd * w,  g = masked dy
// (bn_masked_grad, bn_backward_train_value); the mask with the forward's residual mean_lo, the
// centring with the backward's lo (bn_recentre). Null residuals are 0.
template <typename scalar_t, typename acc_t, bool RELU>
struct BatchNormBackward {
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
  const acc_t* __restrict__ mean_lo;
  const acc_t* __restrict__ lo;

  __device__ Item load(int64_t i) const { return Item{to_acc(x[i]), to_acc(dy[i])}; }
  __device__ void apply(int64_t i, const Item& v, int64_t c) const {
    const ChannelAffine<acc_t> a{mean[c], scale[c], shift[c], residual_at(mean_lo, c)};
    const acc_t g = bn_masked_grad(v.dy, v.x, a, RELU);
    store(dx + i, bn_backward_train_value(g, v.x, ChannelBackward<acc_t>{mean[c], mean_dy[c], proj[c], scale[c],
                                                                          residual_at(lo, c)}));
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

// Enough blocks for kBlocksPerSM resident per SM, each looping over its tiles.
template <typename Op>
void launch_elementwise(const Op& op, const Geometry& g, int sms, cudaStream_t stream) {
  constexpr int64_t kTile = kThreads * kUnroll;
  const int64_t inner = g.interleaved ? 1 : g.S;
  const int64_t blocks = std::min<int64_t>(ceil_div(g.numel(), kTile), kBlocksPerSM * sms);
  launch(elementwise_kernel<Op>, static_cast<unsigned>(blocks), kThreads, 0, stream,
      op, g.numel(), inner, g.C, digit_step(kThreads, inner, g.C), digit_step((blocks - 1) * kTile, inner, g.C));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned channel_blocks(int64_t C) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(C, kThreads), 1 << 16)));
}

template <typename acc_t, ScaleOf KIND>
void launch_channel_scale(const at::Tensor& second, const at::Tensor& weight, double eps, acc_t* invstd,
                          at::Tensor& scale, cudaStream_t stream) {
  const int64_t C = second.numel();
  launch(channel_scale_kernel<acc_t, KIND>, channel_blocks(C), kThreads, 0, stream,
      second.const_data_ptr<acc_t>(), weight.const_data_ptr<acc_t>(), eps, C, invstd, scale.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// The per-channel noise constants (mu_c, sigma_c) as fp32 vectors on the input's device.
std::pair<at::Tensor, at::Tensor> channel_noise_vectors(const NoiseSpec& ns, int64_t C, const at::Tensor& like,
                                                        cudaStream_t stream) {
  at::Tensor mu = at::empty({C}, like.options().dtype(at::kFloat)), sigma = at::empty_like(mu);
  launch(channel_noise_kernel, channel_blocks(C), kThreads, 0, stream, ns, C, mu.mutable_data_ptr<float>(),
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
    launch(noise_kernel<Op, true>, static_cast<unsigned>(blocks), kThreads, 0, stream, op, ns, mup, sigmap, u, step);
  } else {
    launch(noise_kernel<Op, false>, static_cast<unsigned>(blocks), kThreads, 0, stream, op, ns, mup, sigmap, u, step);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// noise_apply, and noisy BatchNorm's g = dy * s: FORWARD: y = s * x + m; else y = x * s; element (n, c, s) drawn at global sample n0 + n (the
// sample offset goes to launch_noise).
template <typename scalar_t, typename acc_t, bool FORWARD>
struct NoiseApplyOp {
  using Item = acc_t;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;

  __device__ Item load(int64_t i) const { return to_acc(x[i]); }
  __device__ void apply(int64_t i, const Item& v, int64_t, const ElementNoise& e) const {
    if (FORWARD) store(y + i, static_cast<acc_t>(e.s) * v + static_cast<acc_t>(e.m));
    else store(y + i, v * static_cast<acc_t>(e.s));
  }
};

}  // namespace
}  // namespace bnext
