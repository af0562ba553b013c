#pragma once
// Stand-in for c10/cuda/CUDAGuard.h under the SIMT emulation: the emulated device holds CPU tensors.
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device& device) {
    TORCH_CHECK(device.is_cpu(), "bnext_simt: the emulated CUDA kernels take CPU tensors, got ", device);
  }
};
}  // namespace cuda
}  // namespace c10
