// Re-planning one MoE layer from its previous placement (the rules are in placement.h):
// the plan starts from the previous slots, makes the changes a new slot count forces, then
// searches for changes that lower the load and the link load, and keeps the best state it
// passed through whose optional moves fit the budget.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "core/placement.h"
#include "core/topology.h"

namespace moe_ep::core {

struct Replanned {
  std::vector<std::pair<int, int>> gpu_expert;  // one (GPU, expert) pair per slot
  std::vector<int> count;                       // replicas per expert
  int moves = 0;                                // (GPU, expert) pairs the previous lacked
};

// stats holds previous_gpus / previous_phy2log (and optional samples, top_k ids a row);
// capacity[g] = slots of GPU g in the new plan (their sum is the slot total); max_moves: the
// optional moves allowed (-1: no limit); node_step: also lower the link load.
Replanned replan_layer(const LayerStats& stats, const std::vector<double>& load,
                       const std::vector<int>& capacity, int max_moves, const ClusterSpec& cluster,
                       bool node_step, int top_k);

}  // namespace moe_ep::core
