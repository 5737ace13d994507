#include "ops/deadline.h"

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <cstdlib>
#include <sstream>

namespace moe_ep::ops {
namespace {

constexpr Milliseconds kDefaultDeadline{60'000};

Milliseconds from_environment() {
  const char* value = std::getenv("MOE_EP_DEADLINE");
  if (value == nullptr || *value == '\0') return kDefaultDeadline;
  char* end = nullptr;
  const double seconds = std::strtod(value, &end);
  TORCH_CHECK(
      end != value && *end == '\0' && seconds > 0,
      "moe_ep: environment variable MOE_EP_DEADLINE must be a number of seconds > 0, got \"", value,
      "\"");
  return Milliseconds(static_cast<int64_t>(seconds * 1000));
}

std::atomic<int64_t>& default_milliseconds() {
  static std::atomic<int64_t> value{from_environment().count()};
  return value;
}

thread_local Milliseconds thread_deadline{0};

}  // namespace

Milliseconds collective_deadline() {
  return thread_deadline.count() > 0 ? thread_deadline : default_deadline();
}

Milliseconds default_deadline() { return Milliseconds(default_milliseconds().load()); }

void set_default_deadline(Milliseconds deadline) {
  TORCH_CHECK(deadline.count() > 0, "moe_ep: argument 'seconds' (the deadline) must be > 0");
  default_milliseconds().store(deadline.count());
}

Milliseconds set_thread_deadline(Milliseconds deadline) {
  TORCH_CHECK(deadline.count() >= 0, "moe_ep: argument 'seconds' (the deadline) must be >= 0");
  const Milliseconds previous = thread_deadline;
  thread_deadline = deadline;
  return previous;
}

void raise_collective_failure(std::string_view operation, std::string_view cause) {
  std::ostringstream message;
  message << "moe_ep: collective failed in " << operation << " (deadline "
          << static_cast<double>(collective_deadline().count()) / 1000
          << " s; the group cannot be used again): " << cause;
  C10_THROW_ERROR(DistBackendError, message.str());
}

at::Tensor wait_collective(const at::Tensor& t, std::string_view operation) {
  try {
    return c10d::wait_tensor(t);
  } catch (const std::exception& error) {
    raise_collective_failure(operation, error.what());
  }
}

}  // namespace moe_ep::ops
