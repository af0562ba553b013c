// Kernels with planted defects, compiled against the SIMT emulation (csrc/simt/simt.h), to show
// what it reports (tests/test_simt.py, .ci/sanitize.sh thread). Each computes per-block sums of
// 256 floats the way csrc/cuda/reduce.cuh's block_merge does (shuffle tree per warp, warp results
// through __shared__ memory, a barrier, thread 0 adds them up), except for its defect:
//   none                 correct
//   missing_barrier      no __syncthreads between the shared-memory writes and reads
//   divergent_shuffle    the shuffle tree inside `if (lane < 16)` (half the warp never arrives)
//   exit_before_barrier  threads >= 128 return before the barrier
//   divergent_barrier    warp 0 waits at one __syncthreads, the other warps at another
//   shuffle_after_exit   lanes >= 16 return before the shuffle tree (inactive lanes in the mask)
#include <ATen/ATen.h>

#include <string>

namespace bnext_simt {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

enum Defect { kNone, kMissingBarrier, kDivergentShuffle, kExitBeforeBarrier, kDivergentBarrier, kShuffleAfterExit };

template <int DEFECT>
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float v = x[blockIdx.x * kThreads + threadIdx.x];
  if (DEFECT == kShuffleAfterExit && lane >= 16) return;
  if (DEFECT == kDivergentShuffle) {
    if (lane < 16)
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFull, v, offset);
  } else {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFull, v, offset);
  }
  __shared__ float per_warp[kThreads / 32];
  if (lane == 0) per_warp[warp] = v;
  if (DEFECT == kExitBeforeBarrier && threadIdx.x >= 128) return;
  if (DEFECT == kDivergentBarrier) {
    if (warp == 0) __syncthreads();
    else __syncthreads();
  } else if (DEFECT != kMissingBarrier) {
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += per_warp[w];
    out[blockIdx.x] = s;
  }
}

template <int DEFECT>
void run(const float* x, float* out, int64_t blocks) {
  launch(block_sum_kernel<DEFECT>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, current_stream(), x, out);
  launch_checked();
}

}  // namespace

// x: float32 of blocks * 256 values -> the per-block sums.
at::Tensor planted(const std::string& kernel, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() % kThreads == 0 && x.numel() > 0,
              "planted: float32 input of a multiple of 256 values");
  const at::Tensor xc = x.contiguous();
  const int64_t blocks = x.numel() / kThreads;
  at::Tensor out = at::zeros({blocks}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  if (kernel == "none") run<kNone>(xp, op, blocks);
  else if (kernel == "missing_barrier") run<kMissingBarrier>(xp, op, blocks);
  else if (kernel == "divergent_shuffle") run<kDivergentShuffle>(xp, op, blocks);
  else if (kernel == "exit_before_barrier") run<kExitBeforeBarrier>(xp, op, blocks);
  else if (kernel == "divergent_barrier") run<kDivergentBarrier>(xp, op, blocks);
  else if (kernel == "shuffle_after_exit") run<kShuffleAfterExit>(xp, op, blocks);
  else TORCH_CHECK(false, "planted: unknown kernel ", kernel);
  return out;
}

}  // namespace bnext_simt

namespace bnext_simt {
namespace {

template <size_t BYTES>
struct Params {
  char bytes[BYTES];
};

template <size_t BYTES>
__global__ void empty_kernel(Params<BYTES>) {}

}  // namespace

// Launches an empty kernel with the given configuration, to test the launch checks: grid and block
// as [x, y, z], parameters of 8 or 4096 or 4104 bytes, the current stream or the legacy default
// stream (0), with or without C10_CUDA_KERNEL_LAUNCH_CHECK after it.
void probe_launch(at::IntArrayRef grid, at::IntArrayRef block, int64_t param_bytes, bool current_stream_,
                  bool check) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "probe_launch: [x, y, z]");
  const dim3 g(static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]), static_cast<unsigned>(grid[2]));
  const dim3 b(static_cast<unsigned>(block[0]), static_cast<unsigned>(block[1]), static_cast<unsigned>(block[2]));
  cudaStream_t stream = current_stream_ ? current_stream() : nullptr;
  if (param_bytes == 8) launch(empty_kernel<8>, g, b, 0, stream, Params<8>{});
  else if (param_bytes == 4096) launch(empty_kernel<4096>, g, b, 0, stream, Params<4096>{});
  else if (param_bytes == 4104) launch(empty_kernel<4104>, g, b, 0, stream, Params<4104>{});
  else TORCH_CHECK(false, "probe_launch: param_bytes is 8, 4096 or 4104");
  if (check) launch_checked();
}

}  // namespace bnext_simt
