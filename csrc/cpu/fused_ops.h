// The four fused CPU ops; each covers the whole tensor list in one parallel loop.
// Contract (checked cheaply here, thoroughly in freezeguard/ops.py): contiguous CPU
// tensors, companions of tensor i share its dtype and size, per-tensor scalars are
// contiguous fp32 [S], steps include the current update.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace freezeguard {

void masked_adamw_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                   const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                   const std::vector<double>& steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay);

at::Tensor segment_dot(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b);

void mask_shift_(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& delta, const at::Tensor& dm);

void user_update_(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& delta,
                  const std::vector<at::Tensor>& grad, const at::Tensor& m, double lr);

}  // namespace freezeguard
