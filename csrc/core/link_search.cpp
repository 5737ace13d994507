#include "core/link_search.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "core/placement_common.h"

namespace moe_ep::core {
namespace {

// The slots of one node grouped by expert: (expert, its slots there).
std::vector<std::pair<int, std::vector<int>>> experts_on_node(const SlotLayout& layout,
                                                              const ClusterSpec& cluster,
                                                              int node) {
  std::vector<std::pair<int, std::vector<int>>> experts;
  for (int i = 0; i < cluster.gpus_per_node; ++i) {
    for (int slot : layout.slots_of_gpu[node * cluster.gpus_per_node + i]) {
      const int e = layout.slot_expert[slot];
      auto it = std::find_if(experts.begin(), experts.end(), [&](auto& p) { return p.first == e; });
      if (it == experts.end()) {
        experts.push_back({e, {slot}});
      } else {
        it->second.push_back(slot);
      }
    }
  }
  return experts;
}

// The pair of slots (one of `xs`, one of `ys`) whose exchange keeps both GPUs within the cap
// and free of duplicates, the one with the lower larger GPU load; {-1, -1} when none.
std::pair<int, int> feasible_slots(const SlotLayout& layout, const std::vector<int>& xs,
                                   const std::vector<int>& ys, double cap) {
  std::pair<int, int> best{-1, -1};
  double best_peak = std::numeric_limits<double>::infinity();
  for (int x : xs) {
    for (int y : ys) {
      const int gx = layout.slot_gpu[x], gy = layout.slot_gpu[y];
      const double shift = layout.slot_load[x] - layout.slot_load[y];
      const double peak = std::max(layout.gpu_load[gx] - shift, layout.gpu_load[gy] + shift);
      if (peak > cap || peak >= best_peak) continue;
      if (layout.holds(gy, layout.slot_expert[x]) || layout.holds(gx, layout.slot_expert[y])) {
        continue;
      }
      best = {x, y};
      best_peak = peak;
    }
  }
  return best;
}

}  // namespace

void gather_coactivated(SlotLayout& layout, const std::vector<int>& count,
                        const ClusterSpec& cluster, const std::vector<int>& samples, int top_k,
                        const LinkSearchOptions& options) {
  const int num_experts = static_cast<int>(count.size()), num_nodes = cluster.num_nodes;
  const double cap = options.gpu_cap + improvement_epsilon(options.gpu_cap);
  // together[e][f]: samples holding both; pull[e][m]: e's partners on node m, by share.
  std::vector<double> together(static_cast<size_t>(num_experts) * num_experts, 0.0);
  for (size_t row = 0; row < samples.size(); row += top_k) {
    for (int i = 0; i < top_k; ++i) {
      for (int j = 0; j < top_k; ++j) {
        if (i != j)
          together[samples[row + i] * static_cast<size_t>(num_experts) + samples[row + j]] += 1;
      }
    }
  }
  std::vector<double> pull(static_cast<size_t>(num_experts) * num_nodes, 0.0);
  auto shift_pull = [&](int f, int node, double sign) {
    for (int e = 0; e < num_experts; ++e) {
      const double w = together[e * static_cast<size_t>(num_experts) + f];
      if (w != 0) pull[e * static_cast<size_t>(num_nodes) + node] += sign * w / count[f];
    }
  };
  for (int s = 0; s < layout.num_slots(); ++s) {
    shift_pull(layout.slot_expert[s], cluster.node_of(layout.slot_gpu[s]), 1.0);
  }
  auto pull_of = [&](int e, int node) { return pull[e * static_cast<size_t>(num_nodes) + node]; };
  for (int swaps = 0; swaps < options.max_swaps; ++swaps) {
    double best_gain = 1e-9;
    int best_x = -1, best_y = -1;
    for (int x = 0; x < layout.num_slots(); ++x) {
      const int ex = layout.slot_expert[x], gx = layout.slot_gpu[x], a = cluster.node_of(gx);
      for (int y = x + 1; y < layout.num_slots(); ++y) {
        const int ey = layout.slot_expert[y], gy = layout.slot_gpu[y], b = cluster.node_of(gy);
        if (a == b || ex == ey) continue;
        // x leaves a for b, y leaves b for a; their own pair moves past each other.
        const double gain =
            (pull_of(ex, b) - pull_of(ex, a)) / count[ex] +
            (pull_of(ey, a) - pull_of(ey, b)) / count[ey] -
            2 * together[ex * static_cast<size_t>(num_experts) + ey] / (count[ex] * count[ey]);
        if (gain <= best_gain) continue;
        const double shift = layout.slot_load[x] - layout.slot_load[y];
        if (layout.gpu_load[gx] - shift > cap || layout.gpu_load[gy] + shift > cap) continue;
        if (layout.holds(gy, ex) || layout.holds(gx, ey)) continue;
        best_gain = gain;
        best_x = x;
        best_y = y;
      }
    }
    if (best_x < 0) return;
    const int a = cluster.node_of(layout.slot_gpu[best_x]);
    const int b = cluster.node_of(layout.slot_gpu[best_y]);
    shift_pull(layout.slot_expert[best_x], a, -1.0);
    shift_pull(layout.slot_expert[best_x], b, 1.0);
    shift_pull(layout.slot_expert[best_y], b, -1.0);
    shift_pull(layout.slot_expert[best_y], a, 1.0);
    layout.exchange(best_x, best_y);
  }
}

int lower_busiest_node(SlotLayout& layout, NodeHits& hits, const ClusterSpec& cluster,
                       const LinkSearchOptions& options,
                       const std::function<void(int, int)>& on_swap) {
  const int num_nodes = cluster.num_nodes;
  if (num_nodes < 2) return 0;
  const double cap = options.gpu_cap + improvement_epsilon(options.gpu_cap);
  std::vector<int> by_hit(num_nodes);
  int swaps = 0;
  for (; swaps < options.max_swaps; ++swaps) {
    const int heavy = hits.busiest();
    const double top = hits.hits()[heavy];
    double best = top - std::max(improvement_epsilon(top), options.min_gain * top);
    int best_x = -1, best_y = -1, best_light = -1;
    double best_heavy_hit = 0, best_light_hit = 0;

    std::iota(by_hit.begin(), by_hit.end(), 0);
    const int light_count = std::min(options.light_nodes + 1, num_nodes);
    const auto& hit = hits.hits();
    std::partial_sort(by_hit.begin(), by_hit.begin() + light_count, by_hit.end(),
                      [&](int a, int b) { return hit[a] < hit[b] || (hit[a] == hit[b] && a < b); });
    const auto heavy_experts = experts_on_node(layout, cluster, heavy);
    std::vector<double> x_leaves(heavy_experts.size());  // heavy's copies once x left
    for (size_t i = 0; i < heavy_experts.size(); ++i) {
      x_leaves[i] = hits.after(heavy, heavy_experts[i].first, -1, -1, 0);
    }
    // A swap changes a node's copies by the sum of its two one-way moves' changes plus a
    // term over the samples that hold both experts. That term is never negative (miss =
    // rest * X * Y with X rising and Y falling: the swap's change exceeds the sum by
    // rest * (X' - X) * (Y - Y') >= 0), so the sum bounds each pair from below. The pairs
    // are evaluated in the order of their bound, and only while it can beat the best swap.
    std::vector<std::tuple<double, int, int>> pairs;  // (bound, heavy expert, light expert)
    for (int l = 0; l < light_count; ++l) {
      const int light = by_hit[l];
      if (light == heavy) continue;
      const double light_top = hit[light];
      const auto light_experts = experts_on_node(layout, cluster, light);
      std::vector<double> x_arrives(heavy_experts.size());
      for (size_t i = 0; i < heavy_experts.size(); ++i) {
        x_arrives[i] = hits.after(light, heavy_experts[i].first, 1, -1, 0);
      }
      std::vector<double> y_leaves(light_experts.size()), y_arrives(light_experts.size());
      for (size_t j = 0; j < light_experts.size(); ++j) {
        y_leaves[j] = hits.after(light, light_experts[j].first, -1, -1, 0);
        y_arrives[j] = hits.after(heavy, light_experts[j].first, 1, -1, 0);
      }
      pairs.clear();
      for (size_t i = 0; i < heavy_experts.size(); ++i) {
        for (size_t j = 0; j < light_experts.size(); ++j) {
          if (heavy_experts[i].first == light_experts[j].first) continue;
          const double bound =
              std::max(x_leaves[i] + y_arrives[j] - top, x_arrives[i] + y_leaves[j] - light_top);
          if (bound < best) pairs.emplace_back(bound, static_cast<int>(i), static_cast<int>(j));
        }
      }
      std::sort(pairs.begin(), pairs.end());
      for (const auto& [bound, i, j] : pairs) {
        if (bound >= best) break;
        const auto [x, y] =
            feasible_slots(layout, heavy_experts[i].second, light_experts[j].second, cap);
        if (x < 0) continue;
        const int ex = heavy_experts[i].first, ey = light_experts[j].first;
        const double heavy_hit = hits.after(heavy, ex, -1, ey, 1);
        const double light_hit = hits.after(light, ex, 1, ey, -1);
        if (std::max(heavy_hit, light_hit) < best) {
          best = std::max(heavy_hit, light_hit);
          best_x = x;
          best_y = y;
          best_light = light;
          best_heavy_hit = heavy_hit;
          best_light_hit = light_hit;
        }
      }
    }
    if (best_light < 0) break;
    hits.apply_swap(layout.slot_expert[best_x], heavy, layout.slot_expert[best_y], best_light,
                    best_heavy_hit, best_light_hit);
    layout.exchange(best_x, best_y);
    if (on_swap) on_swap(best_x, best_y);
  }
  return swaps;
}

}  // namespace moe_ep::core
