// Python bindings of freezeguard._C. The GIL is released: the ops touch no Python objects
// once their arguments are converted, and other Python threads may keep working.
#include <torch/python.h>

#include "fused_ops.h"
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
  m.attr("PIECE_ELEMS") = freezeguard::kPieceElems;
}
