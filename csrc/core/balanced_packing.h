// Balanced packing: the replica counts of one layer and the packing of its slots onto GPUs
// (or bins) so that the most loaded GPU carries as little as possible.
//
// Two packings; the first wins when its maximum is no higher than the second's before or
// after the second's swaps:
//   1. spread: an expert never gets more replicas than there are GPUs with room, and a slot
//      passes over the GPUs that already hold its expert (two replicas of one expert on a
//      GPU do the work of one slot in two);
//   2. EPLB's: the counts and the first packing exactly as DeepSeek's EPLB makes them
//      (below), so this one starts where EPLB ends. It may hold two replicas of an expert
//      on a GPU, and sometimes that is what balances best (loads 2, 1.5, 0.5 in two GPUs of
//      two slots: {A, A} {B, C} peaks at 2.0, every layout without it at 2.5 or more);
//      after the swaps, separate_replicas moves such doubles apart where the maximum allows.
// EPLB's rules: each extra replica goes to the expert with the highest load per replica
// (ties: the lowest expert id); slots in physical order (the first replica of every expert
// by id, then the extra replicas as they were created), sorted heaviest first (ties keep
// that order), each into the lightest GPU with room (ties: the lowest GPU id). Both
// packings are then improved by slot swaps between the heaviest GPU and any other
// (swap_to_balance), so the maximum is never above what EPLB's rules give.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "core/placement_common.h"
#include "core/slot_layout.h"

namespace moe_ep::core {

struct ReplicaCounts {
  std::vector<int> count;        // expert -> replicas (>= 1)
  std::vector<int> extra_order;  // the expert of every extra replica, in order of creation
};

// `slots` >= number of experts; no expert gets more than `max_count` replicas.
ReplicaCounts replica_counts(const std::vector<double>& load, int64_t slots, int max_count);

// The greedy packing described above; capacity[g] = slots GPU g takes (sum = slot total).
// Without `doubles`, a slot passes over the GPUs that hold its expert already.
SlotLayout pack_heaviest_first(const std::vector<double>& load, const ReplicaCounts& counts,
                               const std::vector<int>& capacity, bool doubles);

// Lowers the largest group load by swapping one item of the heaviest group with one item of
// another group, the swap with the lowest resulting maximum first, until no swap lowers the
// maximum by more than min_gain (relative). Every group is a candidate: they are visited
// lightest first, and the scan stops at the first that cannot end both groups below the
// best maximum found (a swap leaves the larger of the two at or above their mean).
// Group sizes are kept.
template <typename CanSwap>
void swap_to_balance(std::vector<std::vector<int>>& members, std::vector<double>& group_load,
                     const std::vector<double>& item_load, CanSwap can_swap, int max_iterations,
                     double min_gain = 0.0) {
  const int num_groups = static_cast<int>(members.size());
  if (num_groups < 2) return;
  auto lighter = [&](int a, int b) {
    return group_load[a] < group_load[b] || (group_load[a] == group_load[b] && a < b);
  };
  std::vector<int> by_load(num_groups);  // ascending, kept sorted as loads change
  std::iota(by_load.begin(), by_load.end(), 0);
  std::sort(by_load.begin(), by_load.end(), lighter);
  // Moves two groups whose loads changed back into order (both out first: lower_bound needs
  // the rest sorted).
  auto resort = [&](int a, int b) {
    by_load.erase(std::find(by_load.begin(), by_load.end(), a));
    by_load.erase(std::find(by_load.begin(), by_load.end(), b));
    for (int group : {a, b}) {
      by_load.insert(std::lower_bound(by_load.begin(), by_load.end(), group, lighter), group);
    }
  };
  for (int iteration = 0; iteration < max_iterations; ++iteration) {
    const int heavy = by_load.back();
    const double top = group_load[heavy];
    double best = top - std::max(improvement_epsilon(top), min_gain * top);
    int best_light = -1, best_x = -1, best_y = -1;
    for (int light : by_load) {
      if (group_load[light] >= 2 * best - top) break;
      for (int x = 0; x < static_cast<int>(members[heavy].size()); ++x) {
        for (int y = 0; y < static_cast<int>(members[light].size()); ++y) {
          const double shift = item_load[members[heavy][x]] - item_load[members[light][y]];
          if (shift <= 0) continue;
          const double worst = std::max(top - shift, group_load[light] + shift);
          if (worst < best && can_swap(members[heavy][x], heavy, members[light][y], light)) {
            best = worst;
            best_light = light;
            best_x = x;
            best_y = y;
          }
        }
      }
    }
    if (best_light < 0) return;
    const double shift = item_load[members[heavy][best_x]] - item_load[members[best_light][best_y]];
    std::swap(members[heavy][best_x], members[best_light][best_y]);
    group_load[heavy] -= shift;
    group_load[best_light] += shift;
    resort(heavy, best_light);
  }
}

// Slot swaps between GPUs of `layout` (swap_to_balance) that make no new double.
void swap_slots_to_balance(SlotLayout& layout);

// Swaps a replica of every doubled expert with a slot of another GPU, where that leaves no
// GPU above the current maximum and makes no new double.
void separate_replicas(SlotLayout& layout);

// The two packings above, each improved; the planner's GPU packing.
SlotLayout balanced_packing(const std::vector<double>& load, int64_t slots,
                            const std::vector<int>& capacity);

}  // namespace moe_ep::core
