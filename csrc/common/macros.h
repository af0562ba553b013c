#pragma once
// Torch-free helpers shared by the CPU (g++) and CUDA (nvcc) kernels.
// BNEXT_HD marks math that runs on both sides: the CPU tests then exercise the very
// functions the GPU kernels call.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define BNEXT_HD __host__ __device__ __forceinline__
#else
#define BNEXT_HD inline
#endif
