// Multi-tensor ops over lists of tensors, CUDA kernels: grad_stats and multi_axpy. Same semantics as
// csrc/cpu/grad_stats.cpp; per-element formulas in csrc/common/grad_stats_math.h. The entry points
// (checks, dense copies, outputs) are csrc/entry.h's GradStats<Cuda>.
//
// Multi-tensor-apply style: every tensor is cut into chunks of kMultiTensorChunk elements
// (csrc/multi_tensor.h), one block per chunk. One launch covers the chunks of up to kMaxTensors
// tensors, whose metadata (pointers, sizes, dtypes, first chunk) travels BY VALUE as a kernel
// argument: no host-to-device copy, so nothing synchronizes the host with the stream and a CUDA
// graph captures the call as it is; a longer list takes several launches. A block finds its tensor
// by scanning the launch's first-chunk column (at most kMaxTensors compares). Tensors of different
// dtypes can share a launch: a block switches on its tensor's dtype once.
//
// grad_stats: launch 1 writes one fp64 partial row per chunk (block tree reduction: warp shuffles,
// then shared memory); launch 2 adds each pair's partial rows in a fixed order, one block per
// pair. No atomics, so the result is deterministic.
// multi_axpy: each block reads its chunk of x and d once and writes up to kMaxEtas of the K outputs
// (more step sizes take more launches).
//
// Numerics: grad_stats multiplies and adds in fp64 (as the CPU path); multi_axpy computes in
// fp32 (fp64 for fp64), product and difference rounded separately (axpy_value), and rounds once to
// the tensor's dtype.
#if !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE) && defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
// CPU builds of torch ship c10/cuda headers without this generated file (compile-only checks).
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <vector>

#include "../common/grad_stats_math.h"
#include "../entry.h"
#include "../multi_tensor.h"
#include "launch.cuh"

namespace bnext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

// Element types as seen by the kernels; the dtype code travels in the metadata.
enum DtypeCode : int64_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_INTERNAL_ASSERT(false, "bnext: unexpected dtype ", t);
  }
  return -1;
}

// Per-tensor metadata of one launch.
struct TensorMeta {
  int64_t a;            // const pointer: a_i (grad_stats) or x_i (multi_axpy)
  int64_t b;            // const pointer: b_i or d_i
  int64_t out;          // pointer: out_i (multi_axpy only)
  int64_t numel;
  int64_t dtype;        // DtypeCode
  int64_t first_chunk;  // index of the tensor's first chunk, counted from the launch's first
};

// Kernel parameters are limited to 4 KB: 48 tensors (2.3 KB) plus 64 step sizes (0.5 KB) fit. The
// kernels take them as __grid_constant__ (sm_70+), so that indexing them by a run-time tensor number
// reads the parameter space instead of copying the whole table into each thread's local memory.
constexpr int kMaxTensors = 48;
constexpr int kMaxEtas = 64;

struct LaunchMeta {
  TensorMeta t[kMaxTensors];
  int64_t count;  // tensors in this launch
};

struct Etas {
  double v[kMaxEtas];
};

// The tensor of chunk c of the launch: the last one starting at or before c (an empty tensor has no
// chunk and shares its first_chunk with the next one, which wins).
__device__ int64_t tensor_of_chunk(const LaunchMeta& m, int64_t c) {
  int64_t t = 0;
  for (int64_t k = 1; k < m.count; ++k) {
    if (m.t[k].first_chunk <= c) t = k;
  }
  return t;
}

// Load/store in the op-math type: fp32 for fp16/bf16/fp32, fp64 for fp64.
template <typename T> struct Io;
template <> struct Io<float> {
  using acc_t = float;
  __device__ static float load(const float* p, int64_t i) { return p[i]; }
  __device__ static void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Io<double> {
  using acc_t = double;
  __device__ static double load(const double* p, int64_t i) { return p[i]; }
  __device__ static void store(double* p, int64_t i, double v) { p[i] = v; }
};
template <> struct Io<__half> {
  using acc_t = float;
  __device__ static float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  __device__ static void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};
template <> struct Io<__nv_bfloat16> {
  using acc_t = float;
  __device__ static float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  __device__ static void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
};

// Calls f(T{}) with T the element type of `code`; the switch is uniform across a block.
template <typename F>
__device__ void with_element_type(int64_t code, F&& f) {
  switch (code) {
    case kF32: f(float{}); break;
    case kF64: f(double{}); break;
    case kF16: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

// Sum of v over the block, valid in thread 0.
__device__ double block_sum(double v, double* shared) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? shared[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Writes the block's four sums (aa, bb, dd, ab) to out[0..4) from thread 0.
__device__ void store_block_sums(double aa, double bb, double dd, double ab, double* out) {
  __shared__ double shared[kWarps];
  aa = block_sum(aa, shared);
  bb = block_sum(bb, shared);
  dd = block_sum(dd, shared);
  ab = block_sum(ab, shared);
  if (threadIdx.x == 0) out[0] = aa, out[1] = bb, out[2] = dd, out[3] = ab;
}

// Launch 1: block c reduces chunk c of its pair into partial[4c .. 4c+4).
__global__ void grad_stats_chunk_kernel(const __grid_constant__ LaunchMeta meta, double* __restrict__ partial) {
  const int64_t c = blockIdx.x;
  const TensorMeta m = meta.t[tensor_of_chunk(meta, c)];
  const int64_t begin = (c - m.first_chunk) * kMultiTensorChunk;
  const int64_t end = begin + kMultiTensorChunk < m.numel ? begin + kMultiTensorChunk : m.numel;
  double aa = 0, bb = 0, dd = 0, ab = 0;
  with_element_type(m.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* a = reinterpret_cast<const T*>(m.a);
    const T* b = reinterpret_cast<const T*>(m.b);
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
      pair_sums_add(static_cast<double>(Io<T>::load(a, i)), static_cast<double>(Io<T>::load(b, i)), aa, bb, dd, ab);
  });
  store_block_sums(aa, bb, dd, ab, partial + 4 * c);
}

// Launch 2: block p adds the partial rows of pair p of the launch into out[4p .. 4p+4).
__global__ void grad_stats_finalize_kernel(const __grid_constant__ LaunchMeta meta, const double* __restrict__ partial,
                                           double* __restrict__ out) {
  for (int64_t p = blockIdx.x; p < meta.count; p += gridDim.x) {
    const TensorMeta m = meta.t[p];
    const int64_t nchunks = (m.numel + kMultiTensorChunk - 1) / kMultiTensorChunk;
    double aa = 0, bb = 0, dd = 0, ab = 0;
    for (int64_t k = threadIdx.x; k < nchunks; k += kThreads) {
      const double* row = partial + 4 * (m.first_chunk + k);
      aa += row[0], bb += row[1], dd += row[2], ab += row[3];
    }
    store_block_sums(aa, bb, dd, ab, out + 4 * p);
  }
}

// Block c writes chunk c of out_i[k0 + k] = x_i - etas[k] * d_i, k < K.
__global__ void multi_axpy_kernel(const __grid_constant__ LaunchMeta meta, const __grid_constant__ Etas etas, int64_t k0,
                                  int64_t K) {
  const int64_t c = blockIdx.x;
  const TensorMeta m = meta.t[tensor_of_chunk(meta, c)];
  const int64_t begin = (c - m.first_chunk) * kMultiTensorChunk;
  const int64_t end = begin + kMultiTensorChunk < m.numel ? begin + kMultiTensorChunk : m.numel;
  with_element_type(m.dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename Io<T>::acc_t;
    const T* x = reinterpret_cast<const T*>(m.a);
    const T* d = reinterpret_cast<const T*>(m.b);
    T* out = reinterpret_cast<T*>(m.out);
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const acc_t xv = Io<T>::load(x, i), dv = Io<T>::load(d, i);
      for (int64_t k = 0; k < K; ++k)
        Io<T>::store(out, (k0 + k) * m.numel + i, axpy_value(xv, dv, static_cast<acc_t>(etas.v[k])));
    }
  });
}

// The launches of a list: tensors [begin, begin + meta.count), `chunks` blocks, the first of them
// chunk `chunk_base` of the whole list.
struct LaunchGroup {
  LaunchMeta meta;
  int64_t begin, chunks, chunk_base;
};

std::vector<LaunchGroup> launch_groups(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                                       std::vector<at::Tensor>* out) {
  std::vector<LaunchGroup> groups;
  int64_t chunk_base = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (groups.empty() || groups.back().meta.count == kMaxTensors) {
      groups.push_back(LaunchGroup{});
      groups.back().begin = static_cast<int64_t>(i);
      groups.back().chunk_base = chunk_base;
    }
    LaunchGroup& g = groups.back();
    const int64_t numel = a[i].numel();
    g.meta.t[g.meta.count++] =
        TensorMeta{reinterpret_cast<int64_t>(a[i].const_data_ptr()), reinterpret_cast<int64_t>(b[i].const_data_ptr()),
                   out ? reinterpret_cast<int64_t>((*out)[i].mutable_data_ptr()) : 0, numel,
                   dtype_code(a[i].scalar_type()), g.chunks};
    const int64_t nchunks = (numel + kMultiTensorChunk - 1) / kMultiTensorChunk;
    g.chunks += nchunks;
    chunk_base += nchunks;
  }
  return groups;
}

}  // namespace

template <>
struct GradStatsKernels<Cuda> {
  static Tensor grad_stats(const std::vector<Tensor>& da, const std::vector<Tensor>& db) {
    const int64_t n = static_cast<int64_t>(da.size());
    const std::vector<LaunchGroup> groups = launch_groups(da, db, nullptr);
    int64_t nchunks = 0;
    for (const auto& g : groups) nchunks += g.chunks;
    const auto f64 = at::TensorOptions().dtype(at::kDouble).device(da[0].device());
    at::Tensor partial = at::empty({std::max<int64_t>(nchunks, 1), 4}, f64);
    at::Tensor out = at::empty({n, 4}, f64);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    for (const auto& g : groups) {
      double* part = partial.mutable_data_ptr<double>() + 4 * g.chunk_base;
      if (g.chunks > 0) {
        launch(grad_stats_chunk_kernel, static_cast<unsigned>(g.chunks), kThreads, 0, stream, g.meta, part);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      launch(grad_stats_finalize_kernel, static_cast<unsigned>(g.meta.count), kThreads, 0, stream,
          g.meta, part, out.mutable_data_ptr<double>() + 4 * g.begin);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return out;
  }

  static void multi_axpy(const std::vector<Tensor>& dx, const std::vector<Tensor>& dd, std::vector<Tensor>& out,
                         at::ArrayRef<double> etas) {
    const int64_t K = static_cast<int64_t>(etas.size());
    const std::vector<LaunchGroup> groups = launch_groups(dx, dd, &out);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    for (int64_t k0 = 0; k0 < K; k0 += kMaxEtas) {
      const int64_t kn = std::min<int64_t>(kMaxEtas, K - k0);
      Etas e{};
      for (int64_t k = 0; k < kn; ++k) e.v[k] = etas[k0 + k];
      for (const auto& g : groups) {
        if (g.chunks == 0) continue;
        launch(multi_axpy_kernel, static_cast<unsigned>(g.chunks), kThreads, 0, stream, g.meta, e, k0, kn);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
};

template struct GradStats<Cuda>;

}  // namespace bnext
