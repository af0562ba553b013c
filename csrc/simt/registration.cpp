// The test-only extension of the SIMT emulation (tests/simt.py): the CUDA backend's entry points
// (csrc/entry.h's Op<Cuda>, compiled from csrc/cuda/<op>.cu under BNEXT_SIMT) registered for CPU
// tensors in the namespace bnext_simt, whose schemas tests/simt.py copies from torch.ops.bnext;
// and bnext_simt_ctl, the emulator's controls (SM count, thread mode, launch statistics) and probes
// (the half/bfloat16 conversions and integer intrinsics, the planted-defect kernels of planted.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops.h"
#include "half.h"
// One translation unit for the extension's own parts (each ATen-including file costs ~30 s of
// compile): the planted kernels and the device-independent running-stats op.
#include "../running_stats.cpp"
#include "planted.cpp"

// BNEXT_SIMT_BATCH_NORM_ONLY: the ThreadSanitizer build (tests/simt.py) compiles only
// csrc/cuda/batch_norm.cu, the subset that build runs (it takes as long as the full one per file).
TORCH_LIBRARY_IMPL(bnext_simt, CPU, m) {
  m.impl("batch_norm_forward", &bnext::BatchNorm<bnext::Cuda>::forward);
  m.impl("batch_norm_backward", &bnext::BatchNorm<bnext::Cuda>::backward);
  m.impl("update_running_stats", &bnext::update_running_stats);
#ifndef BNEXT_SIMT_BATCH_NORM_ONLY
  m.impl("noisy_batch_norm_forward", &bnext::NoisyBatchNorm<bnext::Cuda>::forward);
  m.impl("noisy_batch_norm_backward", &bnext::NoisyBatchNorm<bnext::Cuda>::backward);
  m.impl("lp_norm_forward", &bnext::LpNorm<bnext::Cuda>::forward);
  m.impl("lp_norm_backward", &bnext::LpNorm<bnext::Cuda>::backward);
  m.impl("grad_stats", &bnext::GradStats<bnext::Cuda>::grad_stats);
  m.impl("multi_axpy", &bnext::GradStats<bnext::Cuda>::multi_axpy);
  m.impl("batch_norm_stats", &bnext::Sync<bnext::Cuda>::batch_norm_stats);
  m.impl("lp_norm_stats", &bnext::Sync<bnext::Cuda>::lp_norm_stats);
  m.impl("sync_backward_elementwise", &bnext::Sync<bnext::Cuda>::sync_backward_elementwise);
  m.impl("noise_apply", &bnext::Sync<bnext::Cuda>::noise_apply);
#endif
}

namespace {

// float32 -> the 16-bit patterns of __float2half_rn and __float2bfloat16_rn.
std::tuple<at::Tensor, at::Tensor> to_16bit(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "to_16bit: float32 input");
  const at::Tensor xc = x.contiguous();
  at::Tensor h = at::empty(x.sizes(), x.options().dtype(at::kInt)), b = at::empty_like(h);
  const float* p = xc.const_data_ptr<float>();
  int32_t* hp = h.mutable_data_ptr<int32_t>();
  int32_t* bp = b.mutable_data_ptr<int32_t>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    hp[i] = __float2half_rn(p[i]).__x;
    bp[i] = __float2bfloat16_rn(p[i]).__x;
  }
  return {h, b};
}

// 16-bit patterns (int32 tensor) -> float32 through __half2float and __bfloat162float.
std::tuple<at::Tensor, at::Tensor> from_16bit(const at::Tensor& bits) {
  TORCH_CHECK(bits.scalar_type() == at::kInt, "from_16bit: int32 input");
  const at::Tensor bc = bits.contiguous();
  at::Tensor h = at::empty(bits.sizes(), bits.options().dtype(at::kFloat)), b = at::empty_like(h);
  const int32_t* p = bc.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < bits.numel(); ++i) {
    h.mutable_data_ptr<float>()[i] = __half2float(__half{static_cast<uint16_t>(p[i])});
    b.mutable_data_ptr<float>()[i] = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(p[i])});
  }
  return {h, b};
}

// __umulhi of two int64 tensors holding uint32 values.
at::Tensor umulhi(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kLong && b.scalar_type() == at::kLong && a.sizes() == b.sizes(), "umulhi");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty_like(ac);
  for (int64_t i = 0; i < a.numel(); ++i)
    out.mutable_data_ptr<int64_t>()[i] = __umulhi(static_cast<unsigned>(ac.const_data_ptr<int64_t>()[i]),
                                                  static_cast<unsigned>(bc.const_data_ptr<int64_t>()[i]));
  return out;
}

}  // namespace

TORCH_LIBRARY(bnext_simt_ctl, m) {
  m.def("set_sm_count(int n) -> ()", [](int64_t n) { bnext_simt::set_sm_count(static_cast<int>(n)); });
  m.def("sm_count() -> int", []() -> int64_t { return bnext_simt::sm_count(); });
  m.def("set_mode(str mode) -> ()", [](const std::string& mode) { bnext_simt::set_mode(mode); });
  m.def("mode() -> str", []() { return bnext_simt::mode(); });
  // [launches, blocks, threads, largest grid.x, largest grid.y] since the last reset
  m.def("launch_stats(bool reset) -> int[]", [](bool reset) {
    bnext_simt::LaunchStats& s = bnext_simt::launch_stats();
    std::vector<int64_t> v{s.launches, s.blocks, s.threads, s.max_grid_x, s.max_grid_y};
    if (reset) s = bnext_simt::LaunchStats{};
    return v;
  });
  m.def("to_16bit(Tensor x) -> (Tensor, Tensor)", &to_16bit);
  m.def("from_16bit(Tensor bits) -> (Tensor, Tensor)", &from_16bit);
  m.def("umulhi(Tensor a, Tensor b) -> Tensor", &umulhi);
  m.def("planted(str kernel, Tensor x) -> Tensor", &bnext_simt::planted);
  m.def("probe_launch(int[] grid, int[] block, int param_bytes, bool current_stream, bool check) -> ()",
        &bnext_simt::probe_launch);
}
