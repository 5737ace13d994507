#include "core/node_assignment.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <utility>

#include "core/balanced_packing.h"

namespace moe_ep::core {

std::vector<int> assign_bins_to_nodes(const SlotLayout& bins, const std::vector<int>& capacity,
                                      const ClusterSpec& cluster) {
  const int num_nodes = cluster.num_nodes, num_gpus = cluster.num_gpus();
  std::vector<std::vector<int>> free_gpus(num_nodes);  // per node: slot counts of free GPUs
  for (int g = 0; g < num_gpus; ++g) free_gpus[cluster.node_of(g)].push_back(capacity[g]);
  std::vector<int> order(num_gpus);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return bins.gpu_load[a] > bins.gpu_load[b]; });
  std::vector<std::vector<int>> bins_of_node(num_nodes);
  std::vector<double> node_load(num_nodes, 0.0);
  std::set<std::pair<double, int>> nodes_by_load;
  for (int n = 0; n < num_nodes; ++n) nodes_by_load.emplace(0.0, n);
  for (int bin : order) {
    for (auto it = nodes_by_load.begin(); it != nodes_by_load.end(); ++it) {
      const int node = it->second;
      auto& free = free_gpus[node];
      auto slot_count = std::find(free.begin(), free.end(), capacity[bin]);
      if (slot_count == free.end()) continue;
      free.erase(slot_count);
      nodes_by_load.erase(it);
      bins_of_node[node].push_back(bin);
      node_load[node] += bins.gpu_load[bin];
      if (!free.empty()) nodes_by_load.emplace(node_load[node], node);
      break;
    }
  }
  // Node load stands in for link load here; swaps that gain less than 0.1% of it are noise
  // next to the routing's own variation, and at hundreds of nodes they would take most of
  // the planning time.
  constexpr double kMinGain = 1e-3;
  swap_to_balance(
      bins_of_node, node_load, bins.gpu_load,
      [&](int x, int, int y, int) { return capacity[x] == capacity[y]; }, 4 * num_nodes, kMinGain);

  std::vector<int> gpu(num_gpus, -1);
  for (int node = 0; node < num_nodes; ++node) {
    std::vector<int> members = bins_of_node[node];
    std::sort(members.begin(), members.end());
    std::vector<bool> taken(members.size(), false);
    for (int i = 0; i < cluster.gpus_per_node; ++i) {
      const int g = node * cluster.gpus_per_node + i;
      for (size_t b = 0; b < members.size(); ++b) {
        if (!taken[b] && capacity[members[b]] == capacity[g]) {
          taken[b] = true;
          gpu[members[b]] = g;
          break;
        }
      }
    }
  }
  return gpu;
}

}  // namespace moe_ep::core
