// See list_checks.h. Nothing here allocates or dispatches: it reads tensor metadata only.
#include "list_checks.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace freezeguard {

static bool supported_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

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

static void check_counter(const at::Tensor& c) {
  TORCH_CHECK(c.defined() && c.device().is_cpu() && c.scalar_type() == c10::ScalarType::Float &&
                  c.numel() == 1 && c.layout() == c10::kStrided,
              "step counters must be one-element float32 CPU tensors");
}

std::vector<double> read_step_counters(const std::vector<at::Tensor>& counters) {
  for (const auto& c : counters) check_counter(c);  // all checked first: nothing half-read
  std::vector<double> out;
  out.reserve(counters.size());
  for (const auto& c : counters) out.push_back(*c.const_data_ptr<float>());
  return out;
}

void add_to_step_counters_(const std::vector<at::Tensor>& counters, double value) {
  for (const auto& c : counters) check_counter(c);  // all checked first: nothing half-applied
  for (const auto& c : counters) {
    float* p = c.mutable_data_ptr<float>();
    *p = static_cast<float>(static_cast<double>(*p) + value);
    c.unsafeGetTensorImpl()->bump_version();  // as an in-place torch op would
  }
}

}  // namespace freezeguard
