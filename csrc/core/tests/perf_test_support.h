// Helpers shared by the cost model's tests (test_perf*.cpp).
#pragma once

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "core/perf_comm.h"

namespace moe_ep::core {

// Nodes of 8 GPUs with H100-like links (NVLink 450 GB/s at 80 %, NIC 50 GB/s at 90 %) and the
// ideal GPU (efficiency 1, no fixed costs) unless a test shapes it.
inline HardwareSpec h100_like_nodes(int nodes) {
  HardwareSpec hw;
  hw.cluster.num_nodes = nodes;
  hw.cluster.gpus_per_node = 8;
  hw.cluster.intra_node.bandwidth_bytes_per_s = 450e9;
  hw.cluster.inter_node.bandwidth_bytes_per_s = 50e9;
  hw.cluster.gpu_memory_bytes = 80e9;
  hw.intra_node_efficiency = 0.8;
  hw.inter_node_efficiency = 0.9;
  return hw;
}

// `call` must throw std::invalid_argument whose message names `field`.
template <typename Call>
void expect_error_naming(Call&& call, const std::string& field) {
  try {
    call();
    ADD_FAILURE() << "expected an error naming " << field;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
  }
}

}  // namespace moe_ep::core
