#pragma once
// Stand-in for c10/cuda/CUDAStream.h under the SIMT emulation: one current stream, a handle that
// is not the legacy default stream (0), so a launch on another stream is reported.
#include "../../../simt.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return bnext_simt::current_stream(); }
  operator cudaStream_t() const { return stream(); }
};
inline CUDAStream getCurrentCUDAStream(int8_t /*device*/ = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10
