// The fused CPU ops (one per op declared in freezeguard/backends/opspecs.py, plus the optimizer's
// step and its prepared variant); each covers the whole tensor list in one parallel loop.
// Contract (checked cheaply here, thoroughly in freezeguard/ops/validation.py): contiguous CPU
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

// fg.optim.AdamW's whole step in one call: the list rules of list_checks.h plus contiguity and
// the CPU device, the step counters (one-element float32 CPU tensors holding the count *before*
// this update) read, the update, and the counters bumped. Returns false, having written nothing,
// when the input does not fit that contract; the caller then runs the Python checks, which name
// the offending tensor, and the general path.
bool masked_adamw_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<at::Tensor>& step_counters, double lr, double beta1, double beta2,
                        double eps, double weight_decay);

// The lists an optimizer steps again and again (params, states, step counters), held natively
// so that a step converts no Python list at all: the gradients are read from params[i].grad().
struct AdamWLists {
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, step_counters;
};

// masked_adamw_step_ over prepared lists with grads[i] = params[i].grad(). False, having written
// nothing, when any gradient is missing or anything does not fit; check_only: check, never write.
bool masked_adamw_step_prepared_(const AdamWLists& lists, double lr, double beta1, double beta2, double eps,
                                 double weight_decay, bool check_only);

at::Tensor segment_dot(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b);

void mask_shift_(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& delta, const at::Tensor& dm);

void user_update_(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& delta,
                  const std::vector<at::Tensor>& grad, const at::Tensor& m, double lr);

// The AdamW simulated user (reference.user_adamw_); grads are only read. step >= 1 counts
// user steps including this one.
void user_adamw_(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& delta,
                 const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                 const std::vector<at::Tensor>& exp_avg_sqs, const at::Tensor& m, int64_t step, double lr,
                 double beta1, double beta2, double eps, double weight_decay);

// SGD with momentum (reference.masked_sgd_momentum_): buffers start at zero.
void masked_sgd_momentum_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& momentum_buffers, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov);

}  // namespace freezeguard
