// Bindings that live beside the functions they bind (shared by csrc/cpu and csrc/cuda).
//
// A source file registers each of its Python-visible functions on the line after its
// definition; the module's PYBIND11_MODULE (bindings.cpp) then runs every registered binder.
// Adding an op is its code plus one registration line, with no header declaration and no
// edit of bindings.cpp:
//
//   void masked_sgd_momentum_(const std::vector<at::Tensor>& params, ...) { ... }
//   FG_BIND_NOGIL(masked_sgd_momentum_, "SGD with momentum, in place", py::arg("params"), ...);
//
// Registrars are static objects, constructed when the shared object is loaded, before Python
// calls its PyInit. They sit in object files linked straight into the module (never a static
// archive), so the linker keeps them. Within one file, binders run in source order: bind a
// class before the functions that take it, so their signatures name its Python type.
#pragma once

#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>

#include <vector>

namespace freezeguard {

namespace py = pybind11;

using Binder = void (*)(py::module_&);

// Function-local, so it exists before the first registrar of any file needs it, whatever the
// order in which files' static objects are constructed. Hidden: an inline function's static
// would otherwise be one process-wide (GNU unique) symbol, shared by every module that
// includes this header (freezeguard._C, freezeguard._cuda, a JIT-built copy of _C loaded next
// to the prebuilt one), and each module would bind the others' functions.
[[gnu::visibility("hidden")]] inline std::vector<Binder>& registered_binders() {
  static std::vector<Binder> binders;
  return binders;
}

struct Registrar {
  explicit Registrar(Binder binder) { registered_binders().push_back(binder); }
};

// Called once, from PYBIND11_MODULE.
inline void run_registered_binders(py::module_& m) {
  for (const Binder binder : registered_binders()) binder(m);
}

inline constexpr auto release_gil = py::call_guard<py::gil_scoped_release>();

}  // namespace freezeguard

// Binds function `name` (in scope here) as module.<name>. The arguments after `name` are
// pybind11::module_::def's: the docstring, then the py::arg(...)s.
#define FG_BIND(name, ...)                                                                 \
  static const ::freezeguard::Registrar fg_registrar_##name([](::pybind11::module_& m) { \
    m.def(#name, &name, __VA_ARGS__);                                                      \
  })

// As FG_BIND, releasing the GIL while the call runs: for a function that touches no Python
// object once its arguments are converted and runs long enough that other Python threads
// should keep working meanwhile (the CPU fused ops).
#define FG_BIND_NOGIL(name, ...)                                                           \
  static const ::freezeguard::Registrar fg_registrar_##name([](::pybind11::module_& m) { \
    m.def(#name, &name, __VA_ARGS__, ::freezeguard::release_gil);                          \
  })

// Any other binding (a class, a lambda): FG_BINDER(id) { ...statements using m... }
#define FG_BINDER(id)                                                         \
  static void fg_bind_##id(::pybind11::module_& m);                           \
  static const ::freezeguard::Registrar fg_registrar_##id(&fg_bind_##id);     \
  static void fg_bind_##id(::pybind11::module_& m)
