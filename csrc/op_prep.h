// Host-side argument checks and tensor preparation shared by the CPU and CUDA
// registrations: each op's kernels see the same contiguous, typed inputs and
// the same output allocation whatever the device.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

namespace nrrdd {

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_labels(const at::Tensor& labels, int64_t batch, const at::Tensor& like,
                         const char* name) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, name, " must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == batch, name, " must have shape (", batch,
              "), got ", labels.sizes());
  TORCH_CHECK(labels.device() == like.device(), name, " is on ", labels.device(), ", expected ",
              like.device());
}

// ---------------------------------------------------------------- CAM
struct CamInputs {
  at::Tensor features, weight, labels;  // contiguous; weight (classes, K, hw) or (classes, K, 1)
  int64_t B, K, h, w, classes;
  bool spatial_weight;
};

inline CamInputs prepare_cam(const at::Tensor& features, const at::Tensor& fc_weight,
                             const at::Tensor& labels) {
  TORCH_CHECK(features.dim() == 4, "features must be (B,K,h,w), got ", features.sizes());
  TORCH_CHECK(fc_weight.dim() == 2 || fc_weight.dim() == 4,
              "fc_weight must be (classes,K) or (classes,K,h,w), got ", fc_weight.sizes());
  TORCH_CHECK(fc_weight.size(1) == features.size(1), "fc_weight has ", fc_weight.size(1),
              " input channels, features have ", features.size(1));
  TORCH_CHECK(fc_weight.device() == features.device(), "fc_weight and features are on different devices");
  const bool spatial = fc_weight.dim() == 4;
  if (spatial) {
    TORCH_CHECK(fc_weight.size(2) == features.size(2) && fc_weight.size(3) == features.size(3),
                "fc_weight's spatial size does not match the features'");
  }
  check_labels(labels, features.size(0), features, "labels");
  CamInputs in;
  in.features = features.contiguous();
  in.weight = fc_weight.to(features.scalar_type()).contiguous();
  in.labels = labels.contiguous();
  in.B = features.size(0);
  in.K = features.size(1);
  in.h = features.size(2);
  in.w = features.size(3);
  in.classes = fc_weight.size(0);
  in.spatial_weight = spatial;
  return in;
}

// ------------------------------------------------------- masked steps
// In-place ops accept any strides: kernels run on contiguous tensors and the
// results are copied back where the caller's tensor was not contiguous.
struct InPlace {
  at::Tensor user, work;
  explicit InPlace(const at::Tensor& t) : user(t), work(t.contiguous()) {}
  void commit() {
    if (!work.is_same(user)) user.copy_(work);
  }
};

struct StepInputs {
  at::Tensor grad, cam;          // contiguous; cam in the accumulation type of x
  at::Tensor clamp_min, clamp_max;  // float32 (C,) or undefined
  int64_t B, C, H, W, h, w;
};

inline StepInputs prepare_step(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& cam,
                               const c10::optional<at::Tensor>& clamp_min,
                               const c10::optional<at::Tensor>& clamp_max) {
  TORCH_CHECK(x.dim() == 4, "x must be (B,C,H,W), got ", x.sizes());
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad has shape ", grad.sizes(), ", x has ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad and x have different dtypes");
  TORCH_CHECK(cam.dim() == 3 && cam.size(0) == x.size(0), "cam must be (B,h,w) with B = ",
              x.size(0), ", got ", cam.sizes());
  TORCH_CHECK(grad.device() == x.device() && cam.device() == x.device(),
              "x, grad and cam must be on one device");
  StepInputs in;
  in.grad = grad.contiguous();
  in.cam = cam.to(acc_type(x)).contiguous();
  in.B = x.size(0);
  in.C = x.size(1);
  in.H = x.size(2);
  in.W = x.size(3);
  in.h = cam.size(1);
  in.w = cam.size(2);
  auto bound = [&](const c10::optional<at::Tensor>& b, const char* name) {
    if (!b.has_value()) return at::Tensor();
    TORCH_CHECK(b->dim() == 1 && b->size(0) == in.C, name, " must have one value per channel (",
                in.C, "), got ", b->sizes());
    TORCH_CHECK(b->device() == x.device(), name, " is on ", b->device(), ", x on ", x.device());
    return b->to(at::kFloat).contiguous();
  };
  in.clamp_min = bound(clamp_min, "clamp_min");
  in.clamp_max = bound(clamp_max, "clamp_max");
  return in;
}

inline void check_moment(const at::Tensor& m, const at::Tensor& x, const char* name) {
  TORCH_CHECK(m.sizes() == x.sizes(), name, " has shape ", m.sizes(), ", x has ", x.sizes());
  TORCH_CHECK(m.scalar_type() == x.scalar_type(), name, " and x have different dtypes");
  TORCH_CHECK(m.device() == x.device(), name, " is on ", m.device(), ", x on ", x.device());
}

// The Adam state's checks; returns lr_scale as a float32 one-element tensor (or undefined).
inline at::Tensor check_adam_state(const at::Tensor& x, const at::Tensor& exp_avg,
                                   const at::Tensor& exp_avg_sq, const at::Tensor& step,
                                   const c10::optional<at::Tensor>& lr_scale) {
  check_moment(exp_avg, x, "exp_avg");
  check_moment(exp_avg_sq, x, "exp_avg_sq");
  TORCH_CHECK(step.numel() == 1 && step.device() == x.device(), "step must be one element on x's device");
  if (!lr_scale.has_value()) return at::Tensor();
  TORCH_CHECK(lr_scale->numel() == 1 && lr_scale->device() == x.device(),
              "lr_scale must be one element on x's device");
  return lr_scale->scalar_type() == at::kFloat && lr_scale->is_contiguous()
             ? *lr_scale
             : lr_scale->to(at::kFloat).contiguous();
}

inline const float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

// ------------------------------------------------------ BN statistics
// x (N, C, *) viewed as (outer, C, inner): contiguous -> (N, C, prod(*));
// channels-last -> (N * prod(*), C, 1). Any other layout is made contiguous.
struct ChannelView {
  at::Tensor x;
  int64_t outer, C, inner;
};

inline ChannelView channel_view(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "x must be (N, C, ...), got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  int64_t inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) inner *= x.size(d);
  if (x.is_contiguous()) return {x, N, C, inner};
  if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    return {x, N * inner, C, 1};
  }
  return {x.contiguous(), N, C, inner};
}

inline void check_running(const at::Tensor& t, int64_t C, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, name, " must have shape (", C, "), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), ", x on ", x.device());
}

// The folded op's per-channel affine map (scale s, shift t) as contiguous
// tensors of `dtype` (the dtype the statistics are finished in).
inline std::pair<at::Tensor, at::Tensor> prepare_affine(const at::Tensor& scale, const at::Tensor& shift,
                                                       int64_t C, const at::Tensor& y,
                                                       at::ScalarType dtype) {
  check_running(scale, C, y, "scale");
  check_running(shift, C, y, "shift");
  return {scale.to(dtype).contiguous(), shift.to(dtype).contiguous()};
}

// ------------------------------------------------------------ DBR rows
inline void check_logits(const at::Tensor& logits, const at::Tensor& y_org, const at::Tensor& y_aug) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (B, classes), got ", logits.sizes());
  check_labels(y_org, logits.size(0), logits, "y_org");
  check_labels(y_aug, logits.size(0), logits, "y_aug");
}

inline at::Tensor target_or_undefined(const c10::optional<at::Tensor>& t, const at::Tensor& logits,
                                      const char* name) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == logits.size(0), name, " must have shape (",
              logits.size(0), "), got ", t->sizes());
  TORCH_CHECK(t->device() == logits.device(), name, " is on ", t->device(), ", logits on ",
              logits.device());
  return t->to(acc_type(logits)).contiguous();
}

}  // namespace nrrdd
