// Small helpers shared by the placement planner's files.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace moe_ep::core {

// Bad input: std::invalid_argument whose message starts with the offending field.
[[noreturn]] inline void fail(const std::string& field, const std::string& why) {
  throw std::invalid_argument(field + ": " + why);
}

// Relative tolerance for "strictly better" so that rounding never makes a search cycle.
inline double improvement_epsilon(double scale) { return 1e-12 * std::max(1.0, std::abs(scale)); }

}  // namespace moe_ep::core
