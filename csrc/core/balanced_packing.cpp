#include "core/balanced_packing.h"

#include <limits>
#include <optional>
#include <queue>
#include <set>
#include <stdexcept>
#include <utility>

namespace moe_ep::core {

ReplicaCounts replica_counts(const std::vector<double>& load, int64_t slots, int max_count) {
  const int num_experts = static_cast<int>(load.size());
  ReplicaCounts result;
  result.count.assign(num_experts, 1);
  std::priority_queue<std::pair<double, int>> heap;  // (load per replica, -expert)
  for (int e = 0; e < num_experts; ++e) {
    if (max_count > 1) heap.emplace(load[e], -e);
  }
  for (int64_t extra = slots - num_experts; extra > 0; --extra) {
    if (heap.empty()) fail("redundant_experts", "more replicas than GPUs to hold them");
    const int e = -heap.top().second;
    heap.pop();
    result.extra_order.push_back(e);
    if (++result.count[e] < max_count) heap.emplace(load[e] / result.count[e], -e);
  }
  return result;
}

SlotLayout pack_heaviest_first(const std::vector<double>& load, const ReplicaCounts& counts,
                               const std::vector<int>& capacity, bool doubles) {
  const int num_gpus = static_cast<int>(capacity.size());
  const int num_experts = static_cast<int>(load.size());
  // Physical order: every expert's first replica, then the extras as they were created.
  std::vector<int> slot_expert(num_experts);
  std::iota(slot_expert.begin(), slot_expert.end(), 0);
  slot_expert.insert(slot_expert.end(), counts.extra_order.begin(), counts.extra_order.end());
  auto per_replica = [&](int slot) {
    return load[slot_expert[slot]] / counts.count[slot_expert[slot]];
  };
  SlotLayout layout(num_gpus);
  if (*std::max_element(capacity.begin(), capacity.end()) == 1) {
    // One slot per GPU: every order gives the same loads; EPLB puts slot p on GPU p.
    int slot = 0;
    for (int g = 0; g < num_gpus; ++g) {
      if (capacity[g] == 0) continue;
      layout.add(slot_expert[slot], per_replica(slot), g);
      ++slot;
    }
    return layout;
  }
  std::vector<int> order(slot_expert.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return per_replica(a) > per_replica(b); });

  std::vector<int> room = capacity;
  std::set<std::pair<double, int>> open;  // (load, gpu) of GPUs with room
  for (int g = 0; g < num_gpus; ++g) {
    if (room[g] > 0) open.emplace(0.0, g);
  }
  auto put = [&](int expert, int gpu) {
    open.erase({layout.gpu_load[gpu], gpu});
    layout.add(expert, load[expert] / counts.count[expert], gpu);
    if (--room[gpu] > 0) open.emplace(layout.gpu_load[gpu], gpu);
  };
  auto lightest_without = [&](int expert) {
    for (const auto& [gpu_load, gpu] : open) {
      if (doubles || !layout.holds(gpu, expert)) return gpu;
    }
    return -1;
  };
  for (int slot : order) {
    const int expert = slot_expert[slot];
    int target = lightest_without(expert);
    if (target < 0) {
      // Every GPU with room already holds this expert: a slot of another expert moves from a
      // full GPU into the room, and this one takes its place.
      for (int full = 0; full < num_gpus && target < 0; ++full) {
        if (room[full] > 0 || capacity[full] == 0 || layout.holds(full, expert)) continue;
        for (int moved : layout.slots_of_gpu[full]) {
          const int spare = lightest_without(layout.slot_expert[moved]);
          if (spare < 0) continue;
          open.erase({layout.gpu_load[spare], spare});
          layout.move(moved, spare);
          if (--room[spare] > 0) open.emplace(layout.gpu_load[spare], spare);
          ++room[full];
          target = full;
          break;
        }
      }
      if (target < 0) throw std::logic_error("placement: no GPU can take another replica");
      open.emplace(layout.gpu_load[target], target);
    }
    put(expert, target);
  }
  return layout;
}

void swap_slots_to_balance(SlotLayout& layout) {
  swap_to_balance(
      layout.slots_of_gpu, layout.gpu_load, layout.slot_load,
      [&](int x, int gx, int y, int gy) {
        const int ex = layout.slot_expert[x], ey = layout.slot_expert[y];
        return ex == ey || (!layout.holds(gy, ex) && !layout.holds(gx, ey));
      },
      4 * layout.num_gpus());
  layout.sync_slot_gpus();
}

void separate_replicas(SlotLayout& layout) {
  const double cap = layout.max_gpu_load();
  for (int g = 0; g < layout.num_gpus(); ++g) {
    for (size_t i = 0; i < layout.slots_of_gpu[g].size(); ++i) {
      const int x = layout.slots_of_gpu[g][i], ex = layout.slot_expert[x];
      const auto& held = layout.slots_of_gpu[g];
      if (std::none_of(held.begin(), held.begin() + i,
                       [&](int s) { return layout.slot_expert[s] == ex; })) {
        continue;
      }
      int best = -1;
      double best_peak = cap + improvement_epsilon(cap);
      for (int h = 0; h < layout.num_gpus(); ++h) {
        if (h == g || layout.holds(h, ex)) continue;
        for (int y : layout.slots_of_gpu[h]) {
          if (layout.holds(g, layout.slot_expert[y])) continue;
          const double shift = layout.slot_load[x] - layout.slot_load[y];
          const double peak = std::max(layout.gpu_load[g] - shift, layout.gpu_load[h] + shift);
          if (peak <= best_peak) {
            best = y;
            best_peak = peak;
          }
        }
      }
      if (best >= 0) layout.exchange(x, best);
    }
  }
}

SlotLayout balanced_packing(const std::vector<double>& load, int64_t slots,
                            const std::vector<int>& capacity) {
  const int64_t num_experts = static_cast<int64_t>(load.size());
  const int gpus_with_room = static_cast<int>(
      std::count_if(capacity.begin(), capacity.end(), [](int c) { return c > 0; }));
  const bool several = *std::max_element(capacity.begin(), capacity.end()) > 1;
  std::optional<SlotLayout> spread;
  if (slots <= num_experts * gpus_with_room) {
    spread =
        pack_heaviest_first(load, replica_counts(load, slots, gpus_with_room), capacity, false);
    // One slot per GPU: the same counts and packing as EPLB's, nothing to swap.
    if (!several) return std::move(*spread);
    swap_slots_to_balance(*spread);
  }
  SlotLayout eplb = pack_heaviest_first(
      load, replica_counts(load, slots, std::numeric_limits<int>::max()), capacity, true);
  if (spread && spread->max_gpu_load() <= eplb.max_gpu_load()) return std::move(*spread);
  swap_slots_to_balance(eplb);
  separate_replicas(eplb);
  swap_slots_to_balance(eplb);  // the separation may have left a swap that lowers the maximum
  if (spread && spread->max_gpu_load() <= eplb.max_gpu_load()) return std::move(*spread);
  return eplb;
}

}  // namespace moe_ep::core
