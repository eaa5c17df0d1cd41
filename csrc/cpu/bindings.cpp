// Python bindings of freezeguard._C. The GIL is released: the ops touch no Python objects
// once their arguments are converted, and other Python threads may keep working.
#include <torch/python.h>

#include "fused_ops.h"
#include "list_checks.h"
#include "work_table.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "freezeguard fused CPU ops (one parallel pass over a whole tensor list per op)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("masked_adamw_", &freezeguard::masked_adamw_, "AdamW step of every listed tensor, in place",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), nogil);
  m.def("masked_adamw_step_", &freezeguard::masked_adamw_step_,
        "fg.optim.AdamW's step: checks, step counters read and bumped, update; False (nothing written) "
        "when the input does not fit",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step_counters"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), nogil);
  // module_local: a JIT-built copy of this module may load next to the prebuilt one (tests/test_build.py)
  py::class_<freezeguard::AdamWLists>(m, "AdamWLists", "params, exp_avgs, exp_avg_sqs, step counters held natively",
                                      py::module_local())
      .def(py::init([](std::vector<at::Tensor> p, std::vector<at::Tensor> m1, std::vector<at::Tensor> m2,
                       std::vector<at::Tensor> c) {
             TORCH_CHECK(m1.size() == p.size() && m2.size() == p.size() && c.size() == p.size(),
                         "AdamWLists: the four lists differ in length");
             return freezeguard::AdamWLists{std::move(p), std::move(m1), std::move(m2), std::move(c)};
           }),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step_counters"))
      .def("__len__", [](const freezeguard::AdamWLists& l) { return l.params.size(); });
  m.def("masked_adamw_step_prepared_", &freezeguard::masked_adamw_step_prepared_,
        "masked_adamw_step_ over prepared lists, grads read from params[i].grad(); False (nothing written) "
        "when a grad is missing or anything does not fit",
        py::arg("lists"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("check_only") = false, nogil);
  m.def("segment_dot", &freezeguard::segment_dot, "fp32 [S] tensor of <a_i, b_i>", py::arg("a"), py::arg("b"),
        nogil);
  m.def("mask_shift_", &freezeguard::mask_shift_, "theta_i += delta_i * dm[i], in place", py::arg("theta"),
        py::arg("delta"), py::arg("dm"), nogil);
  m.def("user_update_", &freezeguard::user_update_, "simulated-user SGD step on the unfrozen share, in place",
        py::arg("theta"), py::arg("delta"), py::arg("grad"), py::arg("m"), py::arg("lr"), nogil);
  m.def("user_adamw_", &freezeguard::user_adamw_, "AdamW simulated-user step, in place (grads only read)",
        py::arg("theta"), py::arg("delta"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("m"), py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), nogil);
  m.def("masked_sgd_momentum_", &freezeguard::masked_sgd_momentum_, "SGD with momentum, in place",
        py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"), py::arg("lr"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), nogil);
  // Bookkeeping shortcuts (list_checks.h): cheap, so they keep the GIL.
  m.def("check_tensor_lists", &freezeguard::check_tensor_lists,
        "(ok, all_contiguous) of parallel tensor lists under freezeguard.ops' rules", py::arg("lists"));
  m.def("read_step_counters", &freezeguard::read_step_counters, "values of float32 CPU scalar tensors",
        py::arg("counters"));
  m.def("add_to_step_counters_", &freezeguard::add_to_step_counters_, "counters[i] += value, in place",
        py::arg("counters"), py::arg("value"));
  m.attr("PIECE_ELEMS") = freezeguard::kPieceElems;
}
