// The node step of a fresh plan: which node every packed bin (one GPU's slots) goes to.
// Bins only trade places with bins of the same slot count, so every GPU keeps its memory
// and the per-GPU loads stay exactly as the packing left them; what changes is the load
// of every node, which is what crosses its network links.
#pragma once

#include <vector>

#include "core/slot_layout.h"
#include "core/topology.h"

namespace moe_ep::core {

// Heaviest bin first onto the least loaded node with a free GPU of the bin's slot count,
// then bin swaps that lower the busiest node's load. Returns the GPU of every bin: the
// node's GPUs in index order, taken by its bins of matching slot count in bin order.
// capacity[g] = slots of bin g and of GPU g.
std::vector<int> assign_bins_to_nodes(const SlotLayout& bins, const std::vector<int>& capacity,
                                      const ClusterSpec& cluster);

}  // namespace moe_ep::core
