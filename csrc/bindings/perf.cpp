#include "bindings/bindings.h"

namespace moe_ep::bindings {

void bind_perf(pybind11::module_& /*m*/) {}  // filled in by the perf work

}  // namespace moe_ep::bindings
