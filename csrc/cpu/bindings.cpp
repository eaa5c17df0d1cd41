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
  m.def("segment_dot", &freezeguard::segment_dot, "fp32 [S] tensor of <a_i, b_i>", py::arg("a"), py::arg("b"),
        nogil);
  m.def("mask_shift_", &freezeguard::mask_shift_, "theta_i += delta_i * dm[i], in place", py::arg("theta"),
        py::arg("delta"), py::arg("dm"), nogil);
  m.def("user_update_", &freezeguard::user_update_, "simulated-user SGD step on the unfrozen share, in place",
        py::arg("theta"), py::arg("delta"), py::arg("grad"), py::arg("m"), py::arg("lr"), nogil);
  // Bookkeeping shortcuts (list_checks.h): cheap, so they keep the GIL.
  m.def("check_tensor_lists", &freezeguard::check_tensor_lists,
        "(ok, all_contiguous) of parallel tensor lists under freezeguard.ops' rules", py::arg("lists"));
  m.def("read_step_counters", &freezeguard::read_step_counters, "values of float32 CPU scalar tensors",
        py::arg("counters"));
  m.def("add_to_step_counters_", &freezeguard::add_to_step_counters_, "counters[i] += value, in place",
        py::arg("counters"), py::arg("value"));
  m.attr("PIECE_ELEMS") = freezeguard::kPieceElems;
}
