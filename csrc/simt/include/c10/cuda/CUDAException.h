#pragma once
// Stand-in for c10/cuda/CUDAException.h under the SIMT emulation: C10_CUDA_CHECK throws on an error
// code; C10_CUDA_KERNEL_LAUNCH_CHECK marks the last launch checked (the emulator reports a launch
// that was never checked). The device-side assertion of torch's kernels becomes a thread fault
// that makes the launch throw.
#include <c10/util/Exception.h>
#include <torch/headeronly/macros/Macros.h>

#include "../../../simt.h"
#include "../../cuda_runtime.h"

#define C10_CUDA_CHECK(expr)                                                                    \
  do {                                                                                          \
    const cudaError_t bnext_simt_err = (expr);                                                  \
    TORCH_CHECK(bnext_simt_err == cudaSuccess, "CUDA error (simt): ", cudaGetErrorString(bnext_simt_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::bnext_simt::launch_checked()

#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  do {                                    \
    if (!(cond)) ::bnext_simt::device_assert_failed(#cond, msg, __FILE__, __LINE__); \
  } while (0)
