// The running-statistics update of the normalization ops, one call instead of the six tensor ops
// (two mul_, two add_, a cast and the Bessel factor) it took from Python:
//     running_mean = (1 - momentum) * running_mean + momentum * mean
//     running_var  = (1 - momentum) * running_var  + momentum * var * var_correction
// var_correction = n / (n - 1) turns the biased batch variance into the unbiased one (BatchNorm);
// 1 keeps the statistic as it is (the l_p norm). Computed in double and rounded once, as
// torch's own batch_norm update does on the CPU. Runs on any device (the CPU path is a loop over C
// values; elsewhere it is composed of ATen ops).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "ops.h"

namespace bnext {
namespace {

template <typename run_t, typename stat_t>
void blend(run_t* running, const stat_t* stat, int64_t n, double keep, double take) {
  for (int64_t i = 0; i < n; ++i) {
    running[i] = static_cast<run_t>(keep * static_cast<double>(running[i]) + take * static_cast<double>(stat[i]));
  }
}

// running <- keep * running + take * stat, for a float/double running tensor on the CPU.
void blend_cpu(const Tensor& running, const Tensor& stat, double keep, double take) {
  const Tensor s = stat.contiguous();
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "bnext.update_running_stats", [&] {
    using run_t = scalar_t;
    run_t* r = running.data_ptr<run_t>();
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "bnext.update_running_stats", [&] {
      blend(r, s.const_data_ptr<scalar_t>(), running.numel(), keep, take);
    });
  });
}

void check_stat(const Tensor& running, const char* running_name, const Tensor& stat, const char* stat_name) {
  TORCH_CHECK(running.dim() == 1 && stat.dim() == 1 && running.numel() == stat.numel(), "bnext: ", running_name,
              " has shape ", running.sizes(), " but the batch ", stat_name, " has shape ", stat.sizes());
  TORCH_CHECK(running.device() == stat.device(), "bnext: ", running_name, " is on ", running.device(),
              " but the batch statistics are on ", stat.device());
}

void update_one(const Tensor& running, const Tensor& stat, double momentum, double factor) {
  const double keep = 1.0 - momentum, take = momentum * factor;
  const bool fast = running.device().is_cpu() && running.is_contiguous() &&
                    (running.scalar_type() == at::kFloat || running.scalar_type() == at::kDouble) &&
                    (stat.scalar_type() == at::kFloat || stat.scalar_type() == at::kDouble);
  if (fast) {
    blend_cpu(running, stat, keep, take);
    return;
  }
  // Other dtypes (half running statistics), layouts or devices: the same formula in the wider
  // of double (CPU) / float (elsewhere, where double may be slow) and one rounding.
  const auto wide = running.device().is_cpu() ? at::kDouble : at::kFloat;
  running.copy_(running.to(wide).mul_(keep).add_(stat.to(wide), take));
}

}  // namespace

void update_running_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                          const Tensor& var, double momentum, double var_correction) {
  check_stat(running_mean, "running_mean", mean, "mean");
  check_stat(running_var, "running_var (running_norm of lp_norm)", var, "variance (norm)");
  update_one(running_mean, mean, momentum, 1.0);
  update_one(running_var, var, momentum, var_correction);
}

}  // namespace bnext
