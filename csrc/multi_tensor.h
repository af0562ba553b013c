#pragma once
// Host-side argument checks and work decomposition shared by the CPU and CUDA multi-tensor ops
// (grad_stats, multi_axpy). Uses ATen, runs on the host only.
#include <ATen/ATen.h>

#include <vector>

namespace bnext {

// Elements per chunk: the unit of parallel work for both backends.
constexpr int64_t kMultiTensorChunk = 1 << 16;

inline bool is_multi_tensor_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks two equally long lists of pairwise equally shaped, same-dtype floating tensors on one
// device; messages name the op, the list and the index. Returns the common device (CPU if empty).
inline at::Device check_tensor_pairs(const char* op, const char* a_name, at::TensorList a,
                                     const char* b_name, at::TensorList b) {
  TORCH_CHECK_VALUE(a.size() == b.size(), op, ": ", a_name, " and ", b_name,
              " must have the same length, got len(", a_name, ")=", a.size(), " and len(", b_name,
              ")=", b.size());
  if (a.empty()) return at::Device(at::kCPU);
  const at::Device device = a[0].device();
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK_VALUE(a[i].defined() && b[i].defined(), op, ": ", a_name, "[", i, "] and ", b_name, "[", i,
                "] must be defined tensors");
    TORCH_CHECK_VALUE(a[i].sizes() == b[i].sizes(), op, ": ", a_name, "[", i, "] has shape ", a[i].sizes(),
                " but ", b_name, "[", i, "] has shape ", b[i].sizes());
    TORCH_CHECK_TYPE(is_multi_tensor_dtype(a[i].scalar_type()), op, ": ", a_name, "[", i,
                "] must be float64, float32, float16 or bfloat16, got ", a[i].scalar_type());
    TORCH_CHECK_TYPE(a[i].scalar_type() == b[i].scalar_type(), op, ": ", a_name, "[", i, "] has dtype ",
                a[i].scalar_type(), " but ", b_name, "[", i, "] has dtype ", b[i].scalar_type());
    TORCH_CHECK_VALUE(a[i].device() == device, op, ": ", a_name, "[", i, "] is on ", a[i].device(), " but ",
                a_name, "[0] is on ", device, " (all tensors must be on one device)");
    TORCH_CHECK_VALUE(b[i].device() == device, op, ": ", b_name, "[", i, "] is on ", b[i].device(), " but ",
                a_name, "[0] is on ", device, " (all tensors must be on one device)");
  }
  return device;
}

// Dense copies where needed (a no-op for the usual contiguous parameters and gradients).
inline std::vector<at::Tensor> dense(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// One chunk of one tensor: elements [begin, end) of tensor `index`.
struct Chunk {
  int64_t index;
  int64_t begin;
  int64_t end;
};

// The chunks of all tensors of the list, tensor by tensor, in element order.
inline std::vector<Chunk> chunk_list(at::TensorList ts) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t s = 0; s < n; s += kMultiTensorChunk)
      chunks.push_back(Chunk{static_cast<int64_t>(i), s, std::min(n, s + kMultiTensorChunk)});
  }
  return chunks;
}

}  // namespace bnext
