// Elementwise passes of synchronized (cross-process) normalization, CPU. The statistics and the
// local gradient sums come from the existing kernels (batch_norm_stats, batch_norm_backward and
// lp_norm_backward in eval mode); bnext/distributed.py all-reduces them, and these two passes
// finish the job:
//   sync_backward_elementwise: dx = dx_eval - a_c - b_c * dir(x - center_c)  (csrc/common/sync_math.h)
//   noise_apply:               y = s * x + m (forward) or x * s (backward) with noisy BatchNorm's
//                              Philox noise at global sample offset n0 (csrc/common/noise.h)
// Both are pure elementwise maps over the input's layout (planar runs or interleaved rows,
// csrc/layout.h), parallel over fixed chunks: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/noise.h"
#include "../common/sync_math.h"
#include "../layout.h"
#include "../ops.h"
#include "isa.h"
#include "noise_vec.h"

namespace bnext {
namespace {

constexpr int64_t kChunkElems = 1 << 15;  // values per parallel task

// Calls body(offset, len, c) for the contiguous pieces of one channel (planar: a run of S values,
// interleaved: body_rows(row0, rows) over whole rows), in parallel over fixed chunks.
template <typename Planar, typename Rows>
void for_each_piece(const Geometry& g, const Planar& planar, const Rows& rows) {
  if (!g.interleaved) {
    const int64_t grain = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.S, 1));
    isa::parallel_for(0, g.N * g.C, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) planar(r / g.C, r % g.C);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.C, 1));
  isa::parallel_for(0, g.rows(), grain, [&](int64_t m0, int64_t m1) { rows(m0, m1); });
}

template <typename scalar_t>
void sync_backward_kernel(const scalar_t* ge, const scalar_t* x, scalar_t* dx, const Geometry& g,
                          const at::Tensor& center_t, const at::Tensor& a_t, const at::Tensor& b_t, bool sign) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t *center = center_t.const_data_ptr<acc_t>(), *a = a_t.const_data_ptr<acc_t>(),
              *b = b_t.const_data_ptr<acc_t>();
  const int64_t C = g.C, S = g.S;
  for_each_piece(
      g,
      [&](int64_t n, int64_t c) {
        const int64_t off = (n * C + c) * S;
        const acc_t cc = center[c], ac = a[c], bc = b[c];
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) {
          dx[off + s] = static_cast<scalar_t>(sync_backward_value<acc_t>(
              static_cast<acc_t>(ge[off + s]), static_cast<acc_t>(x[off + s]), cc, ac, bc, sign));
        }
      },
      [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t off = m * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            dx[off + c] = static_cast<scalar_t>(sync_backward_value<acc_t>(
                static_cast<acc_t>(ge[off + c]), static_cast<acc_t>(x[off + c]), center[c], a[c], b[c], sign));
          }
        }
      });
}

// The noise is drawn kTile values at a time through the vectorized generator (csrc/cpu/noise_vec.h,
// bitwise equal to element_noise), s and m formed exactly as element_noise forms them.
template <typename scalar_t, bool FORWARD>
void noise_apply_kernel(const scalar_t* in, scalar_t* out, const Geometry& g, const NoiseSpec& ns, int64_t n0) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kTile = 2048;
  const int64_t C = g.C, S = g.S, P = ns.period;
  std::vector<ChannelNoise> ch(C);
  for (int64_t c = 0; c < C; ++c) ch[c] = channel_noise(ns, c);
  const float sd = ns.noise_std_spread, md = ns.noise_mean_spread;
  // out[k] for k < len from in[k] and the noise z[k], v[k] of channel noise cn(k)
  auto apply = [&](const scalar_t* x, scalar_t* y, int64_t len, const float* z, const float* v, auto&& cn) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const ChannelNoise& c = cn(k);
      const acc_t s = static_cast<acc_t>(c.sigma + sd * z[k]);
      y[k] = FORWARD ? static_cast<scalar_t>(s * static_cast<acc_t>(x[k]) + static_cast<acc_t>(c.mu + md * v[k]))
                     : static_cast<scalar_t>(static_cast<acc_t>(x[k]) * s);
    }
  };
  for_each_piece(
      g,
      [&](int64_t n, int64_t c) {
        alignas(64) float z[kTile], v[kTile];
        const int64_t off = (n * C + c) * S, base = noise_index(n0 + n, c, 0, P, S);
        const ChannelNoise& cn = ch[c];
        for (int64_t s0 = 0; s0 < S; s0 += kTile) {
          const int64_t len = std::min(kTile, S - s0);
          noise_cpu::normal_block(ns, base + s0, 1, len, z, FORWARD ? v : nullptr);
          apply(in + off + s0, out + off + s0, len, z, v, [&](int64_t) -> const ChannelNoise& { return cn; });
        }
      },
      [&](int64_t m0, int64_t m1) {
        alignas(64) float z[kTile], v[kTile];
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t n = m / S, s = m % S, off = m * C;
          for (int64_t c0 = 0; c0 < C; c0 += kTile) {
            const int64_t c1 = std::min(C, c0 + kTile);
            noise_cpu::normal_row(ns, n0 + n, s, c0, c1, S, z, FORWARD ? v : nullptr);
            apply(in + off + c0, out + off + c0, c1 - c0, z, v,
                  [&](int64_t k) -> const ChannelNoise& { return ch[c0 + k]; });
          }
        }
      });
}

at::Tensor channel_acc(const Tensor& t, const char* name, const Tensor& input) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), "bnext.sync_backward_elementwise: ", name,
              " must be a 1-D tensor with one value per channel (", input.size(1), "), got shape ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), "bnext.sync_backward_elementwise: ", name, " is on ", t.device(),
              " but input is on ", input.device());
  return t.to(acc_dtype(input.scalar_type())).contiguous();
}

}  // namespace

Tensor sync_backward_elementwise_cpu(const Tensor& grad_eval, const Tensor& input, const Tensor& center,
                                     const Tensor& a, const Tensor& b, bool sign) {
  check_input(input);
  TORCH_CHECK(grad_eval.sizes() == input.sizes() && grad_eval.scalar_type() == input.scalar_type(),
              "bnext.sync_backward_elementwise: grad_eval must match input in shape and dtype, got ",
              grad_eval.sizes(), " ", grad_eval.scalar_type(), " vs ", input.sizes(), " ", input.scalar_type());
  const Tensor cc = channel_acc(center, "center", input), ac = channel_acc(a, "a", input),
               bc = channel_acc(b, "b", input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  const Tensor ge = match_layout(grad_eval, g);
  Tensor dx = empty_in_layout(x, g);
  if (g.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_sync_backward_cpu", [&] {
    sync_backward_kernel<scalar_t>(ge.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   dx.mutable_data_ptr<scalar_t>(), g, cc, ac, bc, sign);
  });
  return dx;
}

Tensor noise_apply_cpu(const Tensor& input, const Tensor& seed, at::ArrayRef<double> noise, int64_t noise_channels,
                       int64_t sample_offset, bool forward) {
  check_input(input);
  TORCH_CHECK(sample_offset >= 0, "bnext.noise_apply: sample_offset must be >= 0, got ", sample_offset);
  const NoiseSpec ns = noise_spec(seed, noise, noise_channels, input);
  Geometry g;
  const Tensor x = to_kernel_layout(input, &g);
  Tensor y = empty_in_layout(x, g);
  if (g.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnext_noise_apply_cpu", [&] {
    if (forward) {
      noise_apply_kernel<scalar_t, true>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, ns,
                                         sample_offset);
    } else {
      noise_apply_kernel<scalar_t, false>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, ns,
                                          sample_offset);
    }
  });
  return y;
}

}  // namespace bnext
