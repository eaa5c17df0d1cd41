// The fused CPU ops (one per op declared in freezeguard/backends/opspecs.py, plus the optimizer's
// step and its prepared variant), each bound to freezeguard._C right below its definition
// (op_registry.h). Each covers the whole tensor list in one parallel loop over a work table
// (work_table.h); the fp32 math lives in inner_loops.cpp.
// Contract (checked cheaply here, thoroughly in freezeguard/ops/validation.py): contiguous CPU
// tensors, companions of tensor i share its dtype and size, per-tensor scalars are
// contiguous fp32 [S], steps include the current update.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

#include "../op_registry.h"
#include "inner_loops.h"
#include "work_table.h"

namespace freezeguard {

template <typename T>
static T* ptr(const at::Tensor& t, int64_t offset) {
  return reinterpret_cast<T*>(t.data_ptr()) + offset;
}

// The update itself; inputs already checked. Bias corrections in double, as torch computes
// them on the host, and computed once per distinct step count (usually one for a whole model).
static void run_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                      const std::vector<double>& steps, double lr, double beta1, double beta2, double eps,
                      double weight_decay) {
  std::vector<AdamCoef> coef(params.size());
  double last_step = -1.0;
  AdamCoef last{};
  for (size_t i = 0; i < params.size(); ++i) {
    if (steps[i] != last_step) {
      const double bc1 = 1.0 - std::pow(beta1, steps[i]);
      const double bc2 = 1.0 - std::pow(beta2, steps[i]);
      last = {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
              static_cast<float>(beta2),  static_cast<float>(1.0 - beta2),
              static_cast<float>(std::sqrt(bc2)), static_cast<float>(eps),
              static_cast<float>(-(lr / bc1))};
      last_step = steps[i];
    }
    coef[i] = last;
  }
  const WorkTable table = make_work_table(params);
  for_each_piece(table, [&](int64_t, const Piece& pc) {
    const auto i = pc.tensor;
    dispatch_dtype(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      adamw_piece<T>(ptr<T>(params[i], pc.begin), ptr<T>(grads[i], pc.begin), ptr<T>(exp_avgs[i], pc.begin),
                     ptr<T>(exp_avg_sqs[i], pc.begin), pc.size, coef[i]);
    });
  });
}

void masked_adamw_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                   const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                   const std::vector<double>& steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay) {
  const char* op = "masked_adamw_";
  check_list(op, params, params, "params");
  check_list(op, params, grads, "grads");
  check_list(op, params, exp_avgs, "exp_avgs");
  check_list(op, params, exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK(steps.size() == params.size(), op, ": steps has ", steps.size(), " entries for ", params.size(),
              " tensors");
  for (const double s : steps) TORCH_CHECK(s >= 1.0, op, ": step counts must be >= 1");
  run_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay);
}
FG_BIND_NOGIL(masked_adamw_, "AdamW step of every listed tensor, in place", py::arg("params"), py::arg("grads"),
              py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"), py::arg("lr"), py::arg("beta1"),
              py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"));

static bool fits_step_contract(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                               const std::vector<at::Tensor>& counters) {
  const size_t n = params.size();
  if (grads.size() != n || exp_avgs.size() != n || exp_avg_sqs.size() != n || counters.size() != n) return false;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (!p.defined()) return false;
    const auto dt = p.scalar_type();
    if (!(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf)) return false;
    for (const at::Tensor* t : {&p, &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      // A tensor subclass (DTensor, a functional wrapper) has no plain storage behind
      // data_ptr(): it never reaches the kernel.
      if (!t->defined() || t->layout() != c10::kStrided || !t->device().is_cpu() || t->scalar_type() != dt ||
          !t->is_contiguous() || !t->has_storage() || t->unsafeGetTensorImpl()->is_python_dispatch() ||
          (t != &p && t->sizes() != p.sizes()))
        return false;
    }
    const at::Tensor& c = counters[i];
    if (!c.defined() || !c.device().is_cpu() || c.scalar_type() != at::kFloat || c.numel() != 1 ||
        c.layout() != c10::kStrided || !c.has_storage() || c.unsafeGetTensorImpl()->is_python_dispatch())
      return false;
    const float count = *c.const_data_ptr<float>();
    if (!(count >= 0.0f) || !std::isfinite(count)) return false;  // also refuses NaN
  }
  return true;
}

// fg.optim.AdamW's whole step in one call: the list rules of list_checks.cpp plus contiguity and
// the CPU device, the step counters (one-element float32 CPU tensors holding the count *before*
// this update) read, the update, and the counters bumped. Returns false, having written nothing,
// when the input does not fit that contract; the caller then runs the Python checks, which name
// the offending tensor, and the general path.
bool masked_adamw_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<at::Tensor>& step_counters, double lr, double beta1, double beta2,
                        double eps, double weight_decay) {
  if (!fits_step_contract(params, grads, exp_avgs, exp_avg_sqs, step_counters)) return false;
  std::vector<double> steps(params.size());
  for (size_t i = 0; i < params.size(); ++i) steps[i] = static_cast<double>(*step_counters[i].const_data_ptr<float>()) + 1.0;
  run_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay);
  for (size_t i = 0; i < params.size(); ++i) {
    // the same float32 rounding as `state["step"] += 1` in torch
    *step_counters[i].mutable_data_ptr<float>() = static_cast<float>(steps[i]);
    step_counters[i].unsafeGetTensorImpl()->bump_version();
  }
  return true;
}
FG_BIND_NOGIL(masked_adamw_step_,
              "fg.optim.AdamW's step: checks, step counters read and bumped, update; False (nothing written) "
              "when the input does not fit",
              py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
              py::arg("step_counters"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
              py::arg("weight_decay"));

// The lists an optimizer steps again and again (params, states, step counters), held natively
// so that a step converts no Python list at all: the gradients are read from params[i].grad().
// File-local (pybind11's own types are hidden; a type visible outside would draw a warning).
namespace {
struct AdamWLists {
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, step_counters;
};
}  // namespace
// Bound before masked_adamw_step_prepared_, whose signature then names freezeguard._C.AdamWLists.
// module_local: a JIT-built copy of this module may load next to the prebuilt one (tests/test_build.py)
FG_BINDER(AdamWLists) {
  py::class_<AdamWLists>(m, "AdamWLists", "params, exp_avgs, exp_avg_sqs, step counters held natively",
                         py::module_local())
      .def(py::init([](std::vector<at::Tensor> p, std::vector<at::Tensor> m1, std::vector<at::Tensor> m2,
                       std::vector<at::Tensor> c) {
             TORCH_CHECK(m1.size() == p.size() && m2.size() == p.size() && c.size() == p.size(),
                         "AdamWLists: the four lists differ in length");
             return AdamWLists{std::move(p), std::move(m1), std::move(m2), std::move(c)};
           }),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step_counters"))
      .def("__len__", [](const AdamWLists& l) { return l.params.size(); });
}

// masked_adamw_step_ over prepared lists with grads[i] = params[i].grad(). False, having written
// nothing, when any gradient is missing or anything does not fit; check_only: check, never write.
bool masked_adamw_step_prepared_(const AdamWLists& lists, double lr, double beta1, double beta2, double eps,
                                 double weight_decay, bool check_only) {
  std::vector<at::Tensor> grads;
  grads.reserve(lists.params.size());
  for (const auto& p : lists.params) {
    const at::Tensor& g = p.grad();
    if (!g.defined()) return false;
    grads.push_back(g);
  }
  if (check_only) return fits_step_contract(lists.params, grads, lists.exp_avgs, lists.exp_avg_sqs, lists.step_counters);
  return masked_adamw_step_(lists.params, grads, lists.exp_avgs, lists.exp_avg_sqs, lists.step_counters, lr, beta1,
                            beta2, eps, weight_decay);
}
FG_BIND_NOGIL(masked_adamw_step_prepared_,
              "masked_adamw_step_ over prepared lists, grads read from params[i].grad(); False (nothing written) "
              "when a grad is missing or anything does not fit",
              py::arg("lists"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
              py::arg("weight_decay"), py::arg("check_only") = false);

at::Tensor segment_dot(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  check_list("segment_dot", a, a, "a");
  check_list("segment_dot", a, b, "b");
  const WorkTable table = make_work_table(a);
  // One partial per piece, then a per-tensor sum in piece order: the result does not
  // depend on how threads picked up the pieces.
  std::vector<double> partial(table.pieces.size(), 0.0);
  for_each_piece(table, [&](int64_t j, const Piece& pc) {
    const auto i = pc.tensor;
    dispatch_dtype(a[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      partial[j] = dot_piece<T>(ptr<T>(a[i], pc.begin), ptr<T>(b[i], pc.begin), pc.size);
    });
  });
  std::vector<double> sums(a.size(), 0.0);
  for (size_t j = 0; j < table.pieces.size(); ++j) sums[table.pieces[j].tensor] += partial[j];
  at::Tensor out = at::empty({static_cast<int64_t>(a.size())}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (size_t i = 0; i < a.size(); ++i) o[i] = static_cast<float>(sums[i]);
  return out;
}
FG_BIND_NOGIL(segment_dot, "fp32 [S] tensor of <a_i, b_i>", py::arg("a"), py::arg("b"));

void mask_shift_(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& delta, const at::Tensor& dm) {
  check_list("mask_shift_", theta, theta, "theta");
  check_list("mask_shift_", theta, delta, "delta");
  const float* s = check_scalars("mask_shift_", dm, theta.size(), "dm");
  const WorkTable table = make_work_table(theta);
  for_each_piece(table, [&](int64_t, const Piece& pc) {
    const auto i = pc.tensor;
    dispatch_dtype(theta[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      shift_piece<T>(ptr<T>(theta[i], pc.begin), ptr<T>(delta[i], pc.begin), s[i], pc.size);
    });
  });
}
FG_BIND_NOGIL(mask_shift_, "theta_i += delta_i * dm[i], in place", py::arg("theta"), py::arg("delta"),
              py::arg("dm"));

void user_update_(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& delta,
                  const std::vector<at::Tensor>& grad, const at::Tensor& m, double lr) {
  check_list("user_update_", theta, theta, "theta");
  check_list("user_update_", theta, delta, "delta");
  check_list("user_update_", theta, grad, "grad");
  const float* mv = check_scalars("user_update_", m, theta.size(), "m");
  const float neg_lr = static_cast<float>(-lr);
  const WorkTable table = make_work_table(theta);
  for_each_piece(table, [&](int64_t, const Piece& pc) {
    const auto i = pc.tensor;
    const float keep = 1.0f - mv[i];  // the unfrozen share of tensor i
    dispatch_dtype(theta[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      user_piece<T>(ptr<T>(theta[i], pc.begin), ptr<T>(delta[i], pc.begin), ptr<T>(grad[i], pc.begin),
                    neg_lr * keep, keep, pc.size);
    });
  });
}
FG_BIND_NOGIL(user_update_, "simulated-user SGD step on the unfrozen share, in place", py::arg("theta"),
              py::arg("delta"), py::arg("grad"), py::arg("m"), py::arg("lr"));

// The AdamW simulated user (reference.user_adamw_); grads are only read. step >= 1 counts
// user steps including this one.
void user_adamw_(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& delta,
                 const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                 const std::vector<at::Tensor>& exp_avg_sqs, const at::Tensor& m, int64_t step, double lr,
                 double beta1, double beta2, double eps, double weight_decay) {
  const char* op = "user_adamw_";
  check_list(op, theta, theta, "theta");
  check_list(op, theta, delta, "delta");
  check_list(op, theta, grads, "grads");
  check_list(op, theta, exp_avgs, "exp_avgs");
  check_list(op, theta, exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK(step >= 1, op, ": step counts the current update and must be >= 1");
  const float* mv = check_scalars(op, m, theta.size(), "m");
  // Scalars rounded to fp32 once, as the reference's Python floats are when they meet fp32 tensors.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  std::vector<UserAdamCoef> coef(theta.size());
  for (size_t i = 0; i < theta.size(); ++i) {
    const double mi = static_cast<double>(mv[i]);
    coef[i] = {static_cast<float>(1.0 - mi), static_cast<float>(mi), static_cast<float>(1.0 - beta1),
               static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(std::sqrt(bc2)),
               static_cast<float>(eps), static_cast<float>(-lr / bc1), static_cast<float>(lr * weight_decay)};
  }
  const WorkTable table = make_work_table(theta);
  for_each_piece(table, [&](int64_t, const Piece& pc) {
    const auto i = pc.tensor;
    dispatch_dtype(theta[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      user_adamw_piece<T>(ptr<T>(theta[i], pc.begin), ptr<T>(delta[i], pc.begin), ptr<T>(grads[i], pc.begin),
                          ptr<T>(exp_avgs[i], pc.begin), ptr<T>(exp_avg_sqs[i], pc.begin), pc.size, coef[i]);
    });
  });
}
FG_BIND_NOGIL(user_adamw_, "AdamW simulated-user step, in place (grads only read)", py::arg("theta"),
              py::arg("delta"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("m"),
              py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
              py::arg("weight_decay"));

// SGD with momentum (reference.masked_sgd_momentum_): buffers start at zero.
void masked_sgd_momentum_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& momentum_buffers, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov) {
  const char* op = "masked_sgd_momentum_";
  check_list(op, params, params, "params");
  check_list(op, params, grads, "grads");
  check_list(op, params, momentum_buffers, "momentum_buffers");
  const SgdCoef coef{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                     static_cast<float>(weight_decay), nesterov};
  const WorkTable table = make_work_table(params);
  for_each_piece(table, [&](int64_t, const Piece& pc) {
    const auto i = pc.tensor;
    dispatch_dtype(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      sgd_momentum_piece<T>(ptr<T>(params[i], pc.begin), ptr<T>(grads[i], pc.begin),
                            ptr<T>(momentum_buffers[i], pc.begin), pc.size, coef);
    });
  });
}
FG_BIND_NOGIL(masked_sgd_momentum_, "SGD with momentum, in place", py::arg("params"), py::arg("grads"),
              py::arg("momentum_buffers"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
              py::arg("weight_decay"), py::arg("nesterov"));

}  // namespace freezeguard
