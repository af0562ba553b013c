#pragma once
// The one way csrc/cuda launches a kernel: launch(kernel, grid, block, shared_bytes, stream, args...)
// is `kernel<<<grid, block, shared_bytes, stream>>>(args...)` under nvcc, and under BNEXT_SIMT the
// SIMT emulation's launch (csrc/simt/simt.h), which checks the launch limits and runs the grid on
// the CPU. Follow every launch with C10_CUDA_KERNEL_LAUNCH_CHECK().
#include <cuda_runtime.h>

#include <utility>

namespace bnext {
namespace {

#if defined(BNEXT_SIMT)
using bnext_simt::launch;
#else
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, A&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<A>(args)...);
}
#endif

}  // namespace
}  // namespace bnext
