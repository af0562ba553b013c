// The one place where bnext's operator schemas are declared and backends registered.
// The forward ops' autograd is in C++ (csrc/autograd.cpp); fake (meta) kernels, vmap rules and the
// double-backward composites are registered from Python (bnext/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

#ifndef BNEXT_TORCH_VERSION
#define BNEXT_TORCH_VERSION "unknown"
#endif
#ifndef BNEXT_CUDA_ARCHS
#define BNEXT_CUDA_ARCHS ""
#endif

extern "C" {
// `import bnext._C` loads this shared object (and with it the registrations below).
static PyObject* bnext_build_info(PyObject*, PyObject*) {
#ifdef BNEXT_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  return Py_BuildValue("{s:s,s:O,s:s}", "torch_version", BNEXT_TORCH_VERSION, "cuda", cuda,
                       "cuda_archs", BNEXT_CUDA_ARCHS);
}

static PyMethodDef bnext_methods[] = {
    {"build_info", bnext_build_info, METH_NOARGS, "What this extension was compiled with."},
    {nullptr, nullptr, 0, nullptr}};

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, bnext_methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(bnext, m) {
  // Functional BatchNorm (+ optional fused ReLU). Returns (output, mean, var) where mean/var
  // (biased) are the statistics used; the running-stat update is the separate op
  // update_running_stats, so that the differentiable op stays functional (torch.compile
  // functionalizes the small mutating op on its own).
  m.def("batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, sum_dy, sum_dy_xhat): grad_bias = sum_dy, grad_weight = sum_dy_xhat.
  m.def("batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor var, bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // Noisy BatchNorm, training mode (eval is batch_norm_forward). seed: 0-d int64 CPU tensor (the
  // Philox key); noise = [noise_mean, noise_std, noise_mean_spread, noise_std_spread].
  m.def("noisy_batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, float eps, Tensor seed, "
        "float[] noise, int noise_channels) -> (Tensor, Tensor, Tensor)");
  m.def("noisy_batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor var, float eps, Tensor seed, float[] noise, int noise_channels) -> (Tensor, Tensor, Tensor)");
  // l_p normalization, p in {1, 2, inf}: returns (output, mean, norm, argmax).
  m.def("lp_norm_forward(Tensor input, float p, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_norm, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lp_norm_backward(Tensor grad_out, Tensor input, float p, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor norm, Tensor argmax, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // Double backward (create_graph=True): (grad_input, grad_weight, grad_bias) composed of
  // differentiable torch ops (CompositeImplicitAutograd, bnext/ops/<op>.py), what the C++ autograd of
  // the forward ops calls when grad mode is on in backward; an empty tensor for an absent parameter.
  m.def("batch_norm_backward_composite(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor var, bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def("noisy_batch_norm_backward_composite(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor var, float eps, Tensor seed, float[] noise, int noise_channels) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("lp_norm_backward_composite(Tensor grad_out, Tensor input, float p, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor norm, Tensor argmax, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // In place: running = (1 - momentum) * running + momentum * batch, var (or norm) * var_correction.
  m.def("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
        "float momentum, float var_correction) -> ()");
  // Multi-tensor gradient statistics (csrc/cpu/grad_stats.cpp): row i of the (len(a), 4) fp64
  // result is [||a_i||^2, ||b_i||^2, ||a_i - b_i||^2, <a_i, b_i>].
  m.def("grad_stats(Tensor[] a, Tensor[] b) -> Tensor");
  // out_i[k] = x_i - etas[k] * d_i, each out_i of shape (len(etas), *x_i.shape).
  m.def("multi_axpy(Tensor[] x, Tensor[] d, float[] etas) -> Tensor[]");
  // Synchronized normalization (bnext/distributed.py): local BatchNorm statistics (mean, m2) in
  // fp64; local l_p statistics (sum x, sum |x|^p or max |x|, arg-max position); the training dx from the eval dx and all-reduced per-channel coefficients,
  // dx = grad_eval - a - b * dir(x - center) (csrc/common/sync_math.h); noisy BatchNorm's noise at a
  // global sample offset (forward: s * x + m, backward: x * s).
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  m.def("lp_norm_stats(Tensor input, float p) -> (Tensor, Tensor, Tensor)");
  m.def("sync_backward_elementwise(Tensor grad_eval, Tensor input, Tensor center, Tensor a, Tensor b, "
        "bool sign) -> Tensor");
  m.def("noise_apply(Tensor input, Tensor seed, float[] noise, int noise_channels, int sample_offset, "
        "bool forward) -> Tensor");
}

// The same kernels table for every backend: Op<Backend>::f (csrc/ops.h).
template <class Backend>
void register_backend(torch::Library& m) {
  m.impl("batch_norm_forward", &bnext::BatchNorm<Backend>::forward);
  m.impl("batch_norm_backward", &bnext::BatchNorm<Backend>::backward);
  m.impl("noisy_batch_norm_forward", &bnext::NoisyBatchNorm<Backend>::forward);
  m.impl("noisy_batch_norm_backward", &bnext::NoisyBatchNorm<Backend>::backward);
  m.impl("lp_norm_forward", &bnext::LpNorm<Backend>::forward);
  m.impl("lp_norm_backward", &bnext::LpNorm<Backend>::backward);
  m.impl("grad_stats", &bnext::GradStats<Backend>::grad_stats);
  m.impl("multi_axpy", &bnext::GradStats<Backend>::multi_axpy);
  m.impl("batch_norm_stats", &bnext::Sync<Backend>::batch_norm_stats);
  m.impl("lp_norm_stats", &bnext::Sync<Backend>::lp_norm_stats);
  m.impl("sync_backward_elementwise", &bnext::Sync<Backend>::sync_backward_elementwise);
  m.impl("noise_apply", &bnext::Sync<Backend>::noise_apply);
  m.impl("update_running_stats", &bnext::update_running_stats);
}

TORCH_LIBRARY_IMPL(bnext, CPU, m) { register_backend<bnext::Cpu>(m); }

#ifdef BNEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(bnext, CUDA, m) { register_backend<bnext::Cuda>(m); }
#endif
