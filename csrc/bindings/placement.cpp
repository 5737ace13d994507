#include "bindings/bindings.h"

namespace moe_ep::bindings {

void bind_placement(pybind11::module_& /*m*/) {}  // filled in by the placement work

}  // namespace moe_ep::bindings
