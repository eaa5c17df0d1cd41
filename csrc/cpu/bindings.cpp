// The module freezeguard._C. Its functions are bound beside their definitions (fused_ops.cpp,
// list_checks.cpp, through op_registry.h); adding one never touches this file.
#include "../op_registry.h"
#include "work_table.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "freezeguard fused CPU ops (one parallel pass over a whole tensor list per op)";
  freezeguard::run_registered_binders(m);
  m.attr("PIECE_ELEMS") = freezeguard::kPieceElems;
}
