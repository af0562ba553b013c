#pragma once
// Stand-in for the CUDA runtime header under the SIMT emulation (csrc/simt/simt.h): csrc/simt/include
// comes first on the emulator's include path, so csrc/cuda includes these files unchanged.
#include "../simt.h"

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = bnext_simt::sm_count();
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "invalid configuration";
}
