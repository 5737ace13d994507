// Whole expert groups on nodes, for group-limited routing (DeepSeek-V3: a token's 8 experts
// come from at most 4 of 8 groups). When every group and all its replicas live on one node,
// a token reaches at most topk_group nodes, whatever the loads. This is the layout of EPLB's
// hierarchical policy, built the same way and then improved:
//   1. groups to nodes: the heaviest group first onto the least loaded node among those
//      with fewer than num_groups / N groups (ties: the lowest node);
//   2. per node: replica counts and balanced packing (balanced_packing.h) over the node's
//      experts, ordered as EPLB orders them (the node's groups in the order they came, the
//      experts of a group by id), its slots and its GPUs;
//   3. with co-activation samples: group swaps between the node that receives the most
//      token copies (the sampled tokens that touch one of its groups) and any other, the
//      swap whose two nodes end lowest first, while a swap lowers that node's copies and
//      leaves every GPU at or below the largest GPU load before it.
// Step 2 only lowers EPLB's GPU maximum (it starts from EPLB's packing of every node). A
// node's copies depend only on the groups it holds, so without samples the groups stay
// where EPLB puts them and the link load is EPLB's; with samples step 3 only lowers it.
#pragma once

#include <optional>
#include <vector>

#include "core/slot_layout.h"
#include "core/topology.h"

namespace moe_ep::core {

// expert_group[e] in [0, num_groups), num_groups a multiple of the node count;
// capacity[g] = slots of GPU g; samples: rows of top_k expert ids (may be empty). Returns the
// layout on real GPUs, or nothing when a node's experts exceed its slots.
std::optional<SlotLayout> place_groups_on_nodes(const std::vector<double>& load,
                                                const std::vector<int>& expert_group,
                                                int num_groups, const std::vector<int>& capacity,
                                                const ClusterSpec& cluster,
                                                const std::vector<int>& samples, int top_k);

}  // namespace moe_ep::core
