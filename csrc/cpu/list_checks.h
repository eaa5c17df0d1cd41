// Per-call bookkeeping of freezeguard/ops/validation.py and fg.optim.AdamW, done natively
//
// A 686-tensor UNet costs ~1.5 ms a call to validate in Python (attribute reads on every
// tensor of every list) and ~0.7 ms to bump its step counters through the dispatcher; a fused
// H100 AdamW step is 3-12 ms, so this bookkeeping was the gap to torch's fused optimizer.
// The rules are freezeguard/ops/validation.py's; on any failure the caller reruns the Python checks,
// which name the offending tensor. Python stays the single source of the error messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace freezeguard {

// {ok, all_contiguous}: ok when the lists have equal lengths and, position by position, dense
// fp32/bf16/fp16 tensors of one shape and one dtype, all on one device.
std::tuple<bool, bool> check_tensor_lists(const std::vector<std::vector<at::Tensor>>& lists);

// The values of one-element float32 CPU tensors (fg.optim.AdamW's step counters).
std::vector<double> read_step_counters(const std::vector<at::Tensor>& counters);

// counters[i] += value for each one-element float32 CPU tensor, with its version bumped.
void add_to_step_counters_(const std::vector<at::Tensor>& counters, double value);

}  // namespace freezeguard
