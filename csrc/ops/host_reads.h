// The host-read counter behind moe_ep.debug.host_reads(): every place where moe_ep's host
// code needs a value that a kernel computed (on CUDA a device-to-host copy that drains the
// stream and leaves the GPU idle until the host launches again). It counts the same places on
// CPU tensors, so that the CPU CI holds the hot path to the budget the GPU needs. A CPU op
// kernel reading its own inputs is the device's work, not a host read, and is not counted.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace moe_ep::ops {

void count_host_read();
int64_t host_reads();

// The values of an integer tensor on the host (int64), in one counted read.
std::vector<int64_t> read_to_host(const at::Tensor& t);

}  // namespace moe_ep::ops
