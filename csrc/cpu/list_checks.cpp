// Per-call bookkeeping of freezeguard/ops/validation.py and fg.optim.AdamW, done natively
//
// A 686-tensor UNet costs ~1.5 ms a call to validate in Python (attribute reads on every
// tensor of every list) and ~0.7 ms to bump its step counters through the dispatcher; a fused
// H100 AdamW step is 3-12 ms, so this bookkeeping was the gap to torch's fused optimizer.
// The rules are freezeguard/ops/validation.py's; on any failure the caller reruns the Python checks,
// which name the offending tensor. Python stays the single source of the error messages.
// Nothing here allocates or dispatches: it reads tensor metadata only. These calls are cheap,
// so their bindings (FG_BIND, op_registry.h) keep the GIL.
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <vector>

#include "../op_registry.h"

namespace freezeguard {

static bool supported_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

// {ok, all_contiguous}: ok when the lists have equal lengths and, position by position, dense
// fp32/bf16/fp16 tensors of one shape and one dtype, all on one device.
std::tuple<bool, bool> check_tensor_lists(const std::vector<std::vector<at::Tensor>>& lists) {
  if (lists.empty()) return {true, true};
  const size_t n = lists[0].size();
  for (const auto& list : lists) {
    if (list.size() != n) return {false, false};
  }
  bool contiguous = true;
  bool have_device = false;
  c10::Device device(c10::DeviceType::CPU);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& first = lists[0][i];
    for (const auto& list : lists) {
      const at::Tensor& t = list[i];
      if (!t.defined() || t.layout() != c10::kStrided || !supported_dtype(t.scalar_type()) ||
          t.unsafeGetTensorImpl()->is_python_dispatch())
        return {false, false};
      if (t.scalar_type() != first.scalar_type() || t.sizes() != first.sizes()) return {false, false};
      if (!have_device) {
        device = t.device();
        have_device = true;
      } else if (t.device() != device) {
        return {false, false};
      }
      contiguous = contiguous && t.is_contiguous();
    }
  }
  return {true, contiguous};
}
FG_BIND(check_tensor_lists, "(ok, all_contiguous) of parallel tensor lists under freezeguard.ops' rules",
        py::arg("lists"));

static void check_counter(const at::Tensor& c) {
  TORCH_CHECK(c.defined() && c.device().is_cpu() && c.scalar_type() == c10::ScalarType::Float &&
                  c.numel() == 1 && c.layout() == c10::kStrided,
              "step counters must be one-element float32 CPU tensors");
}

// The values of one-element float32 CPU tensors (fg.optim.AdamW's step counters).
std::vector<double> read_step_counters(const std::vector<at::Tensor>& counters) {
  for (const auto& c : counters) check_counter(c);  // all checked first: nothing half-read
  std::vector<double> out;
  out.reserve(counters.size());
  for (const auto& c : counters) out.push_back(*c.const_data_ptr<float>());
  return out;
}
FG_BIND(read_step_counters, "values of float32 CPU scalar tensors", py::arg("counters"));

// counters[i] += value for each one-element float32 CPU tensor, with its version bumped.
void add_to_step_counters_(const std::vector<at::Tensor>& counters, double value) {
  for (const auto& c : counters) check_counter(c);  // all checked first: nothing half-applied
  for (const auto& c : counters) {
    float* p = c.mutable_data_ptr<float>();
    *p = static_cast<float>(static_cast<double>(*p) + value);
    c.unsafeGetTensorImpl()->bump_version();  // as an in-place torch op would
  }
}
FG_BIND(add_to_step_counters_, "counters[i] += value, in place", py::arg("counters"), py::arg("value"));

}  // namespace freezeguard
