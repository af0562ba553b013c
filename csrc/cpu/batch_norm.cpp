// BatchNorm (+ fused ReLU), CPU kernels: BatchNorm's statistics (csrc/cpu/reduce.h), then the affine
// elementwise pass; backward through backward_passes with the BatchNormBackward policy
// (csrc/cpu/passes.h). The entry points (checks, layout, outputs, dispatch) are csrc/entry.h's
// BatchNorm<Cpu>.
#include "../entry.h"
#include "passes.h"

namespace bnext {

template <>
struct BatchNormKernels<Cpu> {
  template <typename scalar_t, bool RELU>
  static void forward(ForwardCall& f, bool training, double eps) {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry& g = f.g;
    const scalar_t* xp = f.x.const_data_ptr<scalar_t>();
    acc_t* mp = f.mean.mutable_data_ptr<acc_t>();
    acc_t* vp = f.second.mutable_data_ptr<acc_t>();
    std::vector<double> mean64;
    if (training) mean64 = bn_statistics<scalar_t, acc_t>(xp, g, mp, vp);
    ChannelParams<acc_t> p(g.C, mp, vp, eps, f.w.const_data_ptr<acc_t>(), f.b.const_data_ptr<acc_t>());
    if (training) p.set_residuals(mean64.data(), false);
    affine_pass<scalar_t, acc_t, RELU>(xp, f.y.mutable_data_ptr<scalar_t>(), g, p);
  }

  template <typename scalar_t, bool RELU>
  static void backward(BackwardCall& c, bool training, double eps) {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry& g = c.g;
    ChannelParams<acc_t> p(g.C, c.mean.const_data_ptr<acc_t>(), c.second.const_data_ptr<acc_t>(), eps,
                           c.w.const_data_ptr<acc_t>(), c.b.const_data_ptr<acc_t>());
    const scalar_t* dy = c.dy.const_data_ptr<scalar_t>();
    const scalar_t* x = c.x.const_data_ptr<scalar_t>();
    scalar_t* dx = c.out.dx.mutable_data_ptr<scalar_t>();
    if (RELU && training && p.any_residual_matters()) {
      // The ReLU mask needs the forward's residual before pass 1: the forward's statistics once more
      // (same code, same input: the same fp64 mean bitwise). Only at |mean| >= 256 std.
      std::vector<acc_t> m(g.C);
      const std::vector<double> mean64 = bn_statistics<scalar_t, acc_t>(x, g, m.data(), nullptr);
      p.set_residuals(mean64.data(), false);
    }
    std::vector<double> tot_dy(g.C, 0.0), tot_dy_xc(g.C, 0.0);
    const double M = static_cast<double>(g.rows());
    backward_geometry(g, p, tot_dy.data(), tot_dy_xc.data(),
                      [&](const Geometry& geo, const ChannelParams<acc_t>& params, int64_t F, double* s_dy,
                          double* s_dy_xc) {
                        BatchNormBackward<scalar_t, acc_t, RELU> pol(BackwardCommon<acc_t>{params, M, training});
                        backward_passes<scalar_t, acc_t>(dy, x, dx, geo, pol, s_dy, s_dy_xc, F);
                      });
    write_grad_sums(tot_dy.data(), tot_dy_xc.data(), p, c.out.sum_dy, c.out.sum_dy_xhat);
  }
};

template struct BatchNorm<Cpu>;

}  // namespace bnext
