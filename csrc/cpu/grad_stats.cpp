// Multi-tensor ops over lists of tensors, CPU kernels: grad_stats and multi_axpy. The entry points
// (checks, dense copies, outputs) are csrc/entry.h's GradStats<Cpu>.
//
// grad_stats(a, b) -> (len(a), 4) fp64, row i = [ ||a_i||^2, ||b_i||^2, ||a_i - b_i||^2, <a_i, b_i> ]
// multi_axpy(x, d, etas) -> list, out_i has shape (K, *x_i.shape), out_i[k] = x_i - etas[k] * d_i
// Per-element formulas: csrc/common/grad_stats_math.h.
//
// Work: every tensor is cut into chunks of kMultiTensorChunk elements and the chunks of all
// tensors form one list, processed in a single at::parallel_for (one parallel region, whatever
// the number or sizes of the tensors). grad_stats writes one partial row per chunk and adds the
// partials of a pair in chunk order afterwards, so results do not depend on the thread count.
// multi_axpy reads each chunk of x and d once and writes its K outputs while it is in cache.
//
// Numerics: grad_stats does every product and sum in fp64 (converting fp32/fp16/bf16 to fp64 is
// exact, so each product is exact to fp64 rounding), with kLanes independent accumulators per sum
// so the adds do not serialize. multi_axpy computes in the op-math type (fp32, fp64 for fp64)
// and rounds once to the tensor's dtype.
// The loops run compiled for AVX2/AVX-512 when the CPU has them (csrc/cpu/isa.h): with baseline
// SSE2 code one core reduced at 12.6 GB/s, with AVX2 at 20.6 GB/s (a single-thread microbenchmark,
// 60 MB fp32 pairs). The lane structure is explicit and fp contraction is off, so every ISA gives
// bit-identical results.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/grad_stats_math.h"
#include "../entry.h"
#include "../multi_tensor.h"
#include "isa.h"

namespace bnext {
namespace {

constexpr int64_t kLanes = 16;

// The four sums of a[0..len) and b[0..len), in fp64, added into out[0..4).
template <typename scalar_t>
void chunk_pair_sums(const scalar_t* a, const scalar_t* b, int64_t len, double* out) {
  double aa[kLanes] = {}, bb[kLanes] = {}, dd[kLanes] = {}, ab[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j)
      pair_sums_add(static_cast<double>(a[i + j]), static_cast<double>(b[i + j]), aa[j], bb[j], dd[j], ab[j]);
  }
  for (int64_t j = 0; i + j < len; ++j)
    pair_sums_add(static_cast<double>(a[i + j]), static_cast<double>(b[i + j]), aa[j], bb[j], dd[j], ab[j]);
  for (int64_t j = 0; j < kLanes; ++j) out[0] += aa[j], out[1] += bb[j], out[2] += dd[j], out[3] += ab[j];
}

// out[k * numel + i] = x[i] - etas[k] * d[i] for i in [begin, end), k in [0, K).
template <typename scalar_t>
void chunk_axpy(const scalar_t* x, const scalar_t* d, scalar_t* out, int64_t numel, int64_t begin,
                int64_t end, const std::vector<double>& etas) {
  using acc_t = at::opmath_type<scalar_t>;
  for (size_t k = 0; k < etas.size(); ++k) {
    const acc_t eta = static_cast<acc_t>(etas[k]);
    scalar_t* o = out + static_cast<int64_t>(k) * numel;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i)
      o[i] = static_cast<scalar_t>(axpy_value(static_cast<acc_t>(x[i]), static_cast<acc_t>(d[i]), eta));
  }
}

}  // namespace

template <>
struct GradStatsKernels<Cpu> {
  static Tensor grad_stats(const std::vector<Tensor>& da, const std::vector<Tensor>& db) {
    const int64_t n = static_cast<int64_t>(da.size());
    Tensor out = at::zeros({n, 4}, at::TensorOptions().dtype(at::kDouble));
    const auto chunks = chunk_list(da);
    const int64_t nchunks = static_cast<int64_t>(chunks.size());
    std::vector<double> partial(4 * nchunks, 0.0);
    isa::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        const Tensor& ta = da[ch.index];
        const Tensor& tb = db[ch.index];
        dispatch_floating(ta.scalar_type(), [&](auto tag) {
          using scalar_t = decltype(tag);
          chunk_pair_sums(ta.const_data_ptr<scalar_t>() + ch.begin, tb.const_data_ptr<scalar_t>() + ch.begin,
                          ch.end - ch.begin, &partial[4 * c]);
        });
      }
    });
    double* o = out.mutable_data_ptr<double>();
    for (int64_t c = 0; c < nchunks; ++c)
      for (int64_t j = 0; j < 4; ++j) o[4 * chunks[c].index + j] += partial[4 * c + j];
    return out;
  }

  static void multi_axpy(const std::vector<Tensor>& dx, const std::vector<Tensor>& dd, std::vector<Tensor>& out,
                         at::ArrayRef<double> etas) {
    const std::vector<double> eta_vec(etas.begin(), etas.end());
    const auto chunks = chunk_list(dx);
    isa::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t i = ch.index;
        dispatch_floating(dx[i].scalar_type(), [&](auto tag) {
          using scalar_t = decltype(tag);
          chunk_axpy(dx[i].const_data_ptr<scalar_t>(), dd[i].const_data_ptr<scalar_t>(),
                     out[i].mutable_data_ptr<scalar_t>(), dx[i].numel(), ch.begin, ch.end, eta_vec);
        });
      }
    });
  }
};

template struct GradStats<Cpu>;

}  // namespace bnext
