// Argument checks of the cost model: a bad field raises std::invalid_argument naming it
// (surfaced as ValueError in Python).
#pragma once

#include <stdexcept>
#include <string>

namespace moe_ep::core {

inline void perf_require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace moe_ep::core
