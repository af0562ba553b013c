#pragma once
// SIMT emulation of the CUDA execution model on the CPU (test-only, never installed): what the
// kernels of csrc/cuda need, written from the semantics of the CUDA C++ Programming Guide, so that
// `g++ -DBNEXT_SIMT` compiles the real csrc/cuda/<op>.cu as host C++ and runs every kernel.
//
//   execution   a launch runs its blocks one after another; within a block every CUDA thread is a
//               fiber (ucontext, its own stack) switched only where a thread must wait for others
//               (__syncthreads, warp shuffles), or, in the "os" mode, an OS thread (for
//               ThreadSanitizer: a missing barrier is then a data race it reports).
//   built-ins   threadIdx, blockIdx, blockDim, gridDim (per thread); __shared__ variables are
//               function statics, one copy used by one block at a time (blocks run one after
//               another), so a block that reads before its own write sees the previous block's
//               values or zeros, not its own (GCC ignores a section attribute on the statics of
//               templates, so the emulator cannot fill them with a poison at each block start).
//   __syncthreads   a block barrier. Reported as an error (the launch throws): a thread that
//               exits, or waits at another barrier or a shuffle, while others wait at the barrier
//               ("allowed in conditional code only if the conditional evaluates identically across
//               the entire thread block").
//   __shfl_down_sync  a per-warp exchange: every lane of the mask must reach the same call site
//               with the same mask; a lane that exited, waits elsewhere or is not in the mask
//               while the mask names it is an error ("threads named in mask must execute the same
//               intrinsic").
//   intrinsics  __umulhi, __float_as_uint, __uint_as_float, __fmul_rn, __fadd_rn, __fsub_rn,
//               __dmul_rn, __dadd_rn, __dsub_rn with CUDA's rounding (IEEE round-to-nearest-even,
//               never contracted: the emulator is compiled with -ffp-contract=off).
//   launch      launch(kernel, grid, block, shared_bytes, stream, args...) (csrc/cuda/launch.cuh)
//               checks the launch limits (grid.x <= 2^31 - 1, grid.y/z <= 65535, block <= 1024
//               threads with z <= 64, kernel parameters <= 4 KB, no dynamic shared memory), that the
//               stream is the current one and that the previous launch was checked
//               (C10_CUDA_KERNEL_LAUNCH_CHECK), then runs the grid to completion.
//   device      cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount) returns an adjustable SM
//               count (set_sm_count), so the reduction plans of small and large GPUs both run.
//
// Files: simt.h (this: built-ins, intrinsics, launch), simt.cpp (runtime: launch checks, block
// scheduler, barrier and warp exchange), half.h (__half, __nv_bfloat16), include/ (stand-ins for
// cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and c10/cuda's CUDAException.h, CUDAStream.h,
// CUDAGuard.h, first on the include path, so csrc/cuda's includes reach the emulator unchanged;
// cuda_runtime.h is force-included in every file, as nvcc does), cuda_<op>.cpp (csrc/cuda/<op>.cu
// compiled as C++), registration.cpp (torch.ops.bnext_simt and bnext_simt_ctl; includes
// planted.cpp, kernels with planted defects and launch probes). tests/simt.py builds them.
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "half.h"  // bnext_simt::float_bits / bits_float, which the bit-cast intrinsics below use

// --- qualifiers ---------------------------------------------------------------------------------
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
// Block-shared storage: static variables (blocks run one at a time; see above).
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace bnext_simt {

// Where a thread waits: the call site of a barrier or shuffle.
struct Site {
  const char* what;
  const char* file;
  int line;
  int id;  // __COUNTER__: distinguishes two call sites on one line
};

struct Thread {
  uint3 idx;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  int tid;  // linear index in the block
};

Thread* current_thread();

void syncthreads(const Site& site);
uint64_t shfl_down_bits(unsigned mask, uint64_t bits, unsigned delta, int width, const Site& site);
[[noreturn]] void device_assert_failed(const char* cond, const char* msg, const char* file, int line);

template <typename T>
T shfl_down(unsigned mask, T v, unsigned delta, int width, const Site& site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move 4 or 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = shfl_down_bits(mask, bits, delta, width, site);
  memcpy(&v, &bits, sizeof(T));
  return v;
}

// --- the device --------------------------------------------------------------------------------
void set_sm_count(int sms);
int sm_count();
cudaStream_t current_stream();
void set_mode(const std::string& mode);  // "fiber" or "os"
std::string mode();

// Launch statistics (for tests: how many blocks a plan used).
struct LaunchStats {
  int64_t launches = 0, blocks = 0, threads = 0;
  int64_t max_grid_x = 0, max_grid_y = 0;
};
LaunchStats& launch_stats();

// Runs body(ctx) for every thread of the grid; throws std::runtime_error on a launch error or a
// fault reported by a thread.
void run_grid(dim3 grid, dim3 block, size_t param_bytes, size_t shared_bytes, cudaStream_t stream,
              void (*body)(void*), void* ctx);
// C10_CUDA_KERNEL_LAUNCH_CHECK: marks the last launch checked.
void launch_checked();

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, A&&... args) {
  // The parameters as the kernel receives them (each thread gets its own copy of the values,
  // as each CUDA thread reads the same parameter space).
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
    static void body(void* ctx) {
      Call& c = *static_cast<Call*>(ctx);
      std::apply(c.kernel, c.params);
    }
  };
  Call call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_grid(grid, block, (size_t(0) + ... + sizeof(std::decay_t<P>)), shared_bytes, stream, &Call::body, &call);
}

}  // namespace bnext_simt

#define threadIdx (::bnext_simt::current_thread()->idx)
#define blockIdx (::bnext_simt::current_thread()->block_idx)
#define blockDim (::bnext_simt::current_thread()->block_dim)
#define gridDim (::bnext_simt::current_thread()->grid_dim)
constexpr int warpSize = 32;

#define BNEXT_SIMT_SITE(what) (::bnext_simt::Site{what, __FILE__, __LINE__, __COUNTER__})
#define __syncthreads() ::bnext_simt::syncthreads(BNEXT_SIMT_SITE("__syncthreads"))
#define __shfl_down_sync(mask, var, delta, ...) \
  ::bnext_simt::shfl_down(mask, var, delta, ::bnext_simt::shfl_width(__VA_ARGS__), BNEXT_SIMT_SITE("__shfl_down_sync"))

namespace bnext_simt {
constexpr int shfl_width(int w = 32) { return w; }
}  // namespace bnext_simt

// --- intrinsics (CUDA Math API: integer and single/double precision intrinsics) -----------------
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
}
inline unsigned __float_as_uint(float f) { return bnext_simt::float_bits(f); }
inline float __uint_as_float(unsigned u) { return bnext_simt::bits_float(u); }
// One IEEE operation, rounded to nearest even (x86-64 SSE arithmetic; -ffp-contract=off keeps a
// product and a sum from being fused, as the _rn intrinsics are never fused on the device).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
