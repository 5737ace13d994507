// Python bindings of the torch-free core (csrc/core), one function per core module.
#pragma once

#include <pybind11/pybind11.h>

namespace moe_ep::bindings {

void bind_placement(pybind11::module_& m);
void bind_perf(pybind11::module_& m);

}  // namespace moe_ep::bindings
