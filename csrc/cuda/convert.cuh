#pragma once
// Storage <-> accumulation type conversions of the CUDA kernels: to_acc(x) and store(p, v), and the
// device pointer of a tensor as the CUDA storage type (device_ptr). Everything in csrc/cuda/*.cuh has
// internal linkage (one copy per .cu file, so that nvcc compiles the op files side by side).
#include <ATen/ATen.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace bnext {
namespace {

// Storage types and conversions (torch-free): c10::Half / c10::BFloat16 tensors are read as the
// CUDA types with explicit round-to-nearest conversions (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__, so implicit ones do not exist).
// ---------------------------------------------------------------------------------------------

template <typename T> struct DeviceScalar { using type = T; };
template <> struct DeviceScalar<c10::Half> { using type = __half; };
template <> struct DeviceScalar<c10::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

template <typename scalar_t>
const typename DeviceScalar<scalar_t>::type* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename DeviceScalar<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename DeviceScalar<scalar_t>::type* device_ptr_mut(at::Tensor& t) {
  return reinterpret_cast<typename DeviceScalar<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

}  // namespace
}  // namespace bnext
