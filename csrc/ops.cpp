// The op schemas of the nrrdd library: the one place that states every op's
// signature. Kernels are registered per device in cpu/ and cuda/; autograd and
// fake kernels from Python (nrrdd_ext/_registration.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import nrrdd_ext._C` loads this shared object, which runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(nrrdd, m) {
  // Normalised class activation map (B,K,h,w) -> (B,h,w).
  m.def("cam(Tensor features, Tensor fc_weight, Tensor labels) -> Tensor");
  // max(0, eps - bilinear_upsample(cam, size)) -> (B,1,H,W).
  m.def("non_critical_mask(Tensor cam, SymInt[] size, float eps) -> Tensor");
  // Masked Adam step with the mask computed on the fly from the CAM.
  m.def(
      "masked_adam_step_(Tensor(a!) x, Tensor grad, Tensor cam, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!) step, Tensor? lr_scale, float lr, float beta1, "
      "float beta2, float eps, float cam_eps, Tensor? clamp_min, Tensor? clamp_max) -> ()");
  m.def(
      "masked_sgd_step_(Tensor(a!) x, Tensor grad, Tensor cam, float lr, float cam_eps, "
      "Tensor? clamp_min, Tensor? clamp_max) -> ()");
  // BN-statistic loss: (loss, mean, var, coef), coef (2,C) = the per-channel
  // gradient coefficients A, B with dL/dx = g * (A_c + B_c * (x - mean_c)).
  m.def("bn_stat_loss(Tensor x, Tensor running_mean, Tensor running_var) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same loss for a BatchNorm folded into the conv before it: y = scale * x + shift
  // is the folded conv's output; the statistics of x = (y - shift) / scale are
  // matched. Returns y's mean/var and the coefficients w.r.t. y (same backward op).
  m.def(
      "folded_bn_stat_loss(Tensor y, Tensor scale, Tensor shift, Tensor running_mean, "
      "Tensor running_var) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_stat_loss_backward(Tensor grad_loss, Tensor x, Tensor mean, Tensor coef) -> Tensor");
  // Per-row cross entropies to two labels: (d_org, d_aug, logsumexp).
  m.def("ce_pair(Tensor logits, Tensor y_org, Tensor y_aug) -> (Tensor, Tensor, Tensor)");
  // DBR / label-refinement rows: (loss_rows, coef (B,4), logsumexp).
  m.def(
      "dbr_rows(Tensor logits, Tensor y_org, Tensor y_aug, Tensor? d_org_t, Tensor? d_aug_t, "
      "float r, float alpha) -> (Tensor, Tensor, Tensor)");
  // grad = (c0 + c1) softmax(logits) - c0 onehot(y_org) - c1 onehot(y_aug), coef (B,2).
  m.def("two_ce_backward(Tensor coef, Tensor logits, Tensor lse, Tensor y_org, Tensor y_aug) -> Tensor");
}
