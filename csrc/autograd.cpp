// Autograd of the three normalization forward ops, in C++ (TORCH_LIBRARY_IMPL(bnext, Autograd)).
//
// A torch.library autograd registered from Python costs ~45 us per forward and ~65 us per
// backward in Python bookkeeping, more than the kernels themselves on a (128, 512) input; these
// torch::autograd::Functions do the same bookkeeping in ~2 us. Each one:
//   forward:  runs the op below autograd and saves what the backward kernel reads (input, weight,
//             bias and the statistics the forward returned; nothing input-sized is computed);
//   backward: with grad mode off (the ordinary backward), the registered backward op, whose sums
//             become grad_weight/grad_bias in the parameters' dtype; with grad mode on
//             (create_graph=True, i.e. a second derivative is wanted), the *_backward_composite op,
//             implemented in bnext/ops/<op>.py as a CompositeImplicitAutograd composition of
//             differentiable torch ops, so autograd records the first derivative as a graph.
// The statistics outputs (mean, var / norm, argmax) are non-differentiable, as before. Fake
// kernels and vmap rules of the ops stay in bnext/ops/<op>.py: they sit on other dispatch keys, and
// torch.compile traces through these Functions like through any autograd kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace bnext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool requires_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }

OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// Which of (input, weight, bias) need a gradient, recorded at forward time as one integer.
int64_t grad_mask(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  return (input.requires_grad() ? 1 : 0) | (requires_grad(weight) ? 2 : 0) | (requires_grad(bias) ? 4 : 0);
}

// The kernels return grad_weight/grad_bias in the accumulation dtype; autograd wants each
// parameter's own dtype. Undefined where the parameter is absent or needs no gradient (where the
// composites return an empty placeholder).
Tensor param_grad(const Tensor& g, const Tensor& param, bool needed) {
  if (!needed || !param.defined() || !g.defined()) return Tensor();
  return g.scalar_type() == param.scalar_type() ? g : g.to(param.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps, relu)
// ---------------------------------------------------------------------------------------------
using BnForwardSig = Tensor3(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, bool, double, bool);
using BnBackwardSig = Tensor3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                              const Tensor&, bool, double, bool);

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double eps, bool relu) {
    static auto op = find_op<BnForwardSig>("bnext::batch_norm_forward");
    const int64_t mask = grad_mask(input, weight, bias);
    Tensor out, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, mean, var) = op.call(input, weight, bias, running_mean, running_var, training, eps, relu);
    }
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, var});
    ctx->saved_data["flags"] = mask | (training ? 8 : 0) | (relu ? 16 : 0);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);  // (no zero tensors for the statistics' absent gradients)
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);
    static auto bwd = find_op<BnBackwardSig>("bnext::batch_norm_backward");
    static auto composite = find_op<BnBackwardSig>("bnext::batch_norm_backward_composite");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &var = saved[4];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool training = flags & 8, relu = flags & 16;
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw, db) = composite.call(grads[0], input, optional_of(weight), optional_of(bias), mean, var,
                                            training, eps, relu);
    } else {
      // The kernel's sums: grad_bias = sum_dy, grad_weight = sum_dy_xhat.
      at::AutoDispatchBelowADInplaceOrView below;  // grad mode is off: skip the autograd fallback
      std::tie(dx, db, dw) = bwd.call(grads[0], input, optional_of(weight), optional_of(bias), mean, var,
                                      training, eps, relu);
    }
    return {(flags & 1) ? dx : Tensor(), param_grad(dw, weight, flags & 2), param_grad(db, bias, flags & 4),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Without a gradient to record (no_grad, eval, frozen inputs), the op runs below autograd directly:
// no context, nothing saved.
bool records_graph(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  return at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) || requires_grad(bias));
}

Tensor3 batch_norm_forward_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                    const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                    double eps, bool relu) {
  if (!records_graph(input, weight, bias)) {
    static auto op = find_op<BnForwardSig>("bnext::batch_norm_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, running_mean, running_var, training, eps, relu);
  }
  auto r = BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, eps, relu);
  return {r[0], r[1], r[2]};
}

// ---------------------------------------------------------------------------------------------
// noisy_batch_norm_forward(input, weight, bias, eps, seed, noise, noise_channels)
// ---------------------------------------------------------------------------------------------
using NoisyForwardSig = Tensor3(const Tensor&, const OptTensor&, const OptTensor&, double, const Tensor&,
                                at::ArrayRef<double>, int64_t);
using NoisyBackwardSig = Tensor3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                 const Tensor&, double, const Tensor&, at::ArrayRef<double>, int64_t);

struct NoisyBatchNormFunction : public torch::autograd::Function<NoisyBatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps, const Tensor& seed, at::ArrayRef<double> noise,
                               int64_t noise_channels) {
    static auto op = find_op<NoisyForwardSig>("bnext::noisy_batch_norm_forward");
    const int64_t mask = grad_mask(input, weight, bias);
    Tensor out, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, mean, var) = op.call(input, weight, bias, eps, seed, noise, noise_channels);
    }
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, var, seed});
    ctx->saved_data["flags"] = mask;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["noise"] = noise.vec();
    ctx->saved_data["noise_channels"] = noise_channels;
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(7);
    static auto bwd = find_op<NoisyBackwardSig>("bnext::noisy_batch_norm_backward");
    static auto composite = find_op<NoisyBackwardSig>("bnext::noisy_batch_norm_backward_composite");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &var = saved[4],
                 &seed = saved[5];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const std::vector<double> noise = ctx->saved_data["noise"].toDoubleVector();
    const int64_t noise_channels = ctx->saved_data["noise_channels"].toInt();
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw, db) = composite.call(grads[0], input, optional_of(weight), optional_of(bias), mean, var,
                                            eps, seed, noise, noise_channels);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;  // grad mode is off: skip the autograd fallback
      std::tie(dx, db, dw) = bwd.call(grads[0], input, optional_of(weight), optional_of(bias), mean, var, eps,
                                      seed, noise, noise_channels);
    }
    return {(flags & 1) ? dx : Tensor(), param_grad(dw, weight, flags & 2), param_grad(db, bias, flags & 4),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor3 noisy_batch_norm_forward_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                          double eps, const Tensor& seed, at::ArrayRef<double> noise,
                                          int64_t noise_channels) {
  if (!records_graph(input, weight, bias)) {
    static auto op = find_op<NoisyForwardSig>("bnext::noisy_batch_norm_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, eps, seed, noise, noise_channels);
  }
  auto r = NoisyBatchNormFunction::apply(input, weight, bias, eps, seed, noise, noise_channels);
  return {r[0], r[1], r[2]};
}

// ---------------------------------------------------------------------------------------------
// lp_norm_forward(input, p, weight, bias, running_mean, running_norm, training, eps)
// ---------------------------------------------------------------------------------------------
using LpForwardSig = Tensor4(const Tensor&, double, const OptTensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, bool, double);
using LpBackwardSig = Tensor3(const Tensor&, const Tensor&, double, const OptTensor&, const OptTensor&,
                              const Tensor&, const Tensor&, const Tensor&, bool, double);

struct LpNormFunction : public torch::autograd::Function<LpNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, double p, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_norm,
                               bool training, double eps) {
    static auto op = find_op<LpForwardSig>("bnext::lp_norm_forward");
    const int64_t mask = grad_mask(input, weight, bias);
    Tensor out, mean, norm, argmax;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, mean, norm, argmax) = op.call(input, p, weight, bias, running_mean, running_norm, training, eps);
    }
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, norm, argmax});
    ctx->saved_data["flags"] = mask | (training ? 8 : 0);
    ctx->saved_data["p"] = p;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, norm, argmax});
    ctx->set_materialize_grads(false);
    return {out, mean, norm, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);
    static auto bwd = find_op<LpBackwardSig>("bnext::lp_norm_backward");
    static auto composite = find_op<LpBackwardSig>("bnext::lp_norm_backward_composite");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &norm = saved[4],
                 &argmax = saved[5];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const double p = ctx->saved_data["p"].toDouble(), eps = ctx->saved_data["eps"].toDouble();
    const bool training = flags & 8;
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw, db) = composite.call(grads[0], input, p, optional_of(weight), optional_of(bias), mean, norm,
                                            argmax, training, eps);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;  // grad mode is off: skip the autograd fallback
      std::tie(dx, db, dw) = bwd.call(grads[0], input, p, optional_of(weight), optional_of(bias), mean, norm,
                                      argmax, training, eps);
    }
    return {(flags & 1) ? dx : Tensor(), Tensor(), param_grad(dw, weight, flags & 2),
            param_grad(db, bias, flags & 4), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor4 lp_norm_forward_autograd(const Tensor& input, double p, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_norm, bool training,
                                 double eps) {
  if (!records_graph(input, weight, bias)) {
    static auto op = find_op<LpForwardSig>("bnext::lp_norm_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, p, weight, bias, running_mean, running_norm, training, eps);
  }
  auto r = LpNormFunction::apply(input, p, weight, bias, running_mean, running_norm, training, eps);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace bnext

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_norm_forward", TORCH_FN(bnext::batch_norm_forward_autograd));
  m.impl("noisy_batch_norm_forward", TORCH_FN(bnext::noisy_batch_norm_forward_autograd));
  m.impl("lp_norm_forward", TORCH_FN(bnext::lp_norm_forward_autograd));
}
