#include "ops/host_reads.h"

#include <atomic>

namespace moe_ep::ops {
namespace {

std::atomic<int64_t> reads{0};

}  // namespace

void count_host_read() { reads.fetch_add(1, std::memory_order_relaxed); }

int64_t host_reads() { return reads.load(std::memory_order_relaxed); }

std::vector<int64_t> read_to_host(const at::Tensor& t) {
  count_host_read();
  const at::Tensor host = t.to(at::kCPU, at::kLong).contiguous();
  return {host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel()};
}

}  // namespace moe_ep::ops
