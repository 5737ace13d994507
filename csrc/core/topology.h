// Description of a GPU cluster, shared by the placement planner and the cost model.
#pragma once

#include <stdexcept>

namespace moe_ep::core {

// One direction of a link, as seen by one GPU.
struct LinkSpec {
  double bandwidth_bytes_per_s = 0.0;
  double latency_s = 0.0;
};

struct ClusterSpec {
  int num_nodes = 1;
  int gpus_per_node = 8;
  LinkSpec intra_node;  // NVLink / NVSwitch, per GPU
  LinkSpec inter_node;  // the GPU's NIC (InfiniBand / RoCE)
  double gpu_memory_bytes = 0.0;

  int num_gpus() const { return num_nodes * gpus_per_node; }
  int node_of(int gpu) const { return gpu / gpus_per_node; }

  void validate() const {
    if (num_nodes < 1) throw std::invalid_argument("cluster: num_nodes must be >= 1");
    if (gpus_per_node < 1) throw std::invalid_argument("cluster: gpus_per_node must be >= 1");
    if (gpu_memory_bytes < 0) throw std::invalid_argument("cluster: gpu_memory_bytes must be >= 0");
  }
};

}  // namespace moe_ep::core
