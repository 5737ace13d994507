#include "core/placement.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <queue>
#include <set>
#include <stdexcept>
#include <tuple>
#include <utility>

namespace moe_ep::core {
namespace {

[[noreturn]] void fail(const std::string& field, const std::string& why) {
  throw std::invalid_argument(field + ": " + why);
}

std::string gigabytes(double bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.3f GB", bytes / 1e9);
  return text;
}

// Relative tolerance for "strictly better" so that rounding never makes a search cycle.
double improvement_epsilon(double scale) { return 1e-12 * std::max(1.0, std::abs(scale)); }

// Per-GPU slot counts of one layer with `slots` slots: slots / G each, and one more on
// slots % G GPUs starting at `offset` (the offset rotates across layers to balance memory).
std::vector<int> layer_capacity(int64_t slots, int num_gpus, int64_t offset) {
  std::vector<int> capacity(num_gpus, static_cast<int>(slots / num_gpus));
  const int64_t extra = slots % num_gpus;
  for (int64_t i = 0; i < extra; ++i) ++capacity[(offset + i) % num_gpus];
  return capacity;
}

// Largest per-GPU slot total over all MoE layers: the rotation hands the extra slots out
// cyclically, so no GPU gets more than ceil(layers * extra / G) of them.
int64_t max_slots_per_gpu(int64_t moe_layers, int64_t slots, int64_t num_gpus) {
  const int64_t extra_total = moe_layers * (slots % num_gpus);
  return moe_layers * (slots / num_gpus) + (extra_total + num_gpus - 1) / num_gpus;
}

std::vector<double> resolve_loads(const LayerStats& stats, int num_experts) {
  if (!stats.expert_load.empty()) return stats.expert_load;
  if (stats.coactivation.empty()) return std::vector<double>(num_experts, 1.0);
  std::vector<double> load(num_experts, 0.0);
  for (int expert : stats.coactivation) load[expert] += 1.0;
  return load;
}

// Replica counts that minimise the largest load per replica: each extra replica goes to the
// expert whose load per replica is highest (ties: lowest expert id).
std::vector<int> replica_counts(const std::vector<double>& load, int64_t slots, int max_count) {
  const int num_experts = static_cast<int>(load.size());
  std::vector<int> count(num_experts, 1);
  std::priority_queue<std::pair<double, int>> heap;  // (load per replica, -expert)
  for (int e = 0; e < num_experts; ++e) {
    if (max_count > 1) heap.emplace(load[e], -e);
  }
  for (int64_t extra = slots - num_experts; extra > 0; --extra) {
    if (heap.empty()) fail("redundant_experts", "more replicas than GPUs to hold them");
    const int e = -heap.top().second;
    heap.pop();
    if (++count[e] < max_count) heap.emplace(load[e] / count[e], -e);
  }
  return count;
}

struct Packing {
  std::vector<int> slot_expert;                // slot -> expert
  std::vector<double> slot_load;               // slot -> load per replica
  std::vector<std::vector<int>> slots_of_gpu;  // GPU -> its slots
  std::vector<double> gpu_load;

  bool holds(int gpu, int expert) const {
    for (int slot : slots_of_gpu[gpu]) {
      if (slot_expert[slot] == expert) return true;
    }
    return false;
  }
};

// Heaviest slot first into the lightest GPU that has room and no replica of the same expert.
Packing pack_heaviest_first(const std::vector<double>& load, const std::vector<int>& count,
                            const std::vector<int>& capacity) {
  Packing packing;
  const int num_gpus = static_cast<int>(capacity.size());
  for (int e = 0; e < static_cast<int>(load.size()); ++e) {
    for (int r = 0; r < count[e]; ++r) {
      packing.slot_expert.push_back(e);
      packing.slot_load.push_back(load[e] / count[e]);
    }
  }
  std::vector<int> order(packing.slot_expert.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return packing.slot_load[a] > packing.slot_load[b]; });
  packing.slots_of_gpu.assign(num_gpus, {});
  packing.gpu_load.assign(num_gpus, 0.0);
  std::vector<int> room = capacity;
  std::set<std::pair<double, int>> open;  // (load, gpu) of GPUs with room
  for (int g = 0; g < num_gpus; ++g) {
    if (room[g] > 0) open.emplace(0.0, g);
  }
  auto put = [&](int slot, int gpu) {
    open.erase({packing.gpu_load[gpu], gpu});
    packing.gpu_load[gpu] += packing.slot_load[slot];
    packing.slots_of_gpu[gpu].push_back(slot);
    if (--room[gpu] > 0) open.emplace(packing.gpu_load[gpu], gpu);
  };
  for (int slot : order) {
    const int expert = packing.slot_expert[slot];
    int target = -1;
    for (const auto& [gpu_load, gpu] : open) {
      if (!packing.holds(gpu, expert)) {
        target = gpu;
        break;
      }
    }
    if (target < 0) {
      // Every GPU with room already holds this expert: move a slot of another expert from a
      // full GPU into the room, and take its place.
      for (int full = 0; full < num_gpus && target < 0; ++full) {
        if (room[full] > 0 || capacity[full] == 0 || packing.holds(full, expert)) continue;
        for (int moved : packing.slots_of_gpu[full]) {
          int spare = -1;
          for (const auto& [gpu_load, gpu] : open) {
            if (!packing.holds(gpu, packing.slot_expert[moved])) {
              spare = gpu;
              break;
            }
          }
          if (spare < 0) continue;
          auto& slots = packing.slots_of_gpu[full];
          slots.erase(std::find(slots.begin(), slots.end(), moved));
          packing.gpu_load[full] -= packing.slot_load[moved];
          ++room[full];
          put(moved, spare);
          target = full;
          break;
        }
      }
      if (target < 0) throw std::logic_error("placement: no GPU can take another replica");
    }
    put(slot, target);
  }
  return packing;
}

// Lowers the largest group load by swapping one item of the heaviest group with one item of
// one of the lightest groups, best swap first, until no swap helps. Group sizes are kept.
template <typename CanSwap>
void swap_to_balance(std::vector<std::vector<int>>& members, std::vector<double>& group_load,
                     const std::vector<double>& item_load, CanSwap can_swap, int max_iterations) {
  constexpr int kLightGroups = 8;
  const int num_groups = static_cast<int>(members.size());
  if (num_groups < 2) return;
  std::vector<int> by_load(num_groups);
  for (int iteration = 0; iteration < max_iterations; ++iteration) {
    const int heavy = static_cast<int>(std::max_element(group_load.begin(), group_load.end()) -
                                       group_load.begin());
    std::iota(by_load.begin(), by_load.end(), 0);
    const int light_count = std::min(kLightGroups, num_groups);
    std::partial_sort(
        by_load.begin(), by_load.begin() + light_count, by_load.end(), [&](int a, int b) {
          return group_load[a] < group_load[b] || (group_load[a] == group_load[b] && a < b);
        });
    const double top = group_load[heavy];
    double best = top - improvement_epsilon(top);
    int best_light = -1, best_x = -1, best_y = -1;
    for (int l = 0; l < light_count; ++l) {
      const int light = by_load[l];
      if (light == heavy) continue;
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
  }
}

// Node share of every expert's replicas: (node, replicas there) pairs.
using ReplicaNodes = std::vector<std::vector<std::pair<int, int>>>;

double node_share(const ReplicaNodes& nodes, const std::vector<int>& count, int expert, int node) {
  for (const auto& [n, replicas] : nodes[expert]) {
    if (n == node) return static_cast<double>(replicas) / count[expert];
  }
  return 0.0;
}

// Expected copies every node receives, deduplicated per (token, node), from the samples.
std::vector<double> sample_hits(const std::vector<int>& samples, int top_k,
                                const ReplicaNodes& nodes, const std::vector<int>& count,
                                double tokens_per_sample, int num_nodes) {
  std::vector<double> hit(num_nodes, 0.0);
  std::vector<double> miss(num_nodes, 1.0);  // per node, reset after every sample
  std::vector<int> touched;
  for (size_t start = 0; start < samples.size(); start += top_k) {
    touched.clear();
    for (int i = 0; i < top_k; ++i) {
      const int e = samples[start + i];
      for (const auto& [n, replicas] : nodes[e]) {
        if (miss[n] == 1.0) touched.push_back(n);
        miss[n] *= 1.0 - static_cast<double>(replicas) / count[e];
      }
    }
    for (int n : touched) {
      hit[n] += tokens_per_sample * (1.0 - miss[n]);
      miss[n] = 1.0;
    }
  }
  return hit;
}

ReplicaNodes replica_nodes(const std::vector<int>& phy2log, const std::vector<int>& slot_gpu,
                           int num_experts, const ClusterSpec& cluster) {
  ReplicaNodes nodes(num_experts);
  for (size_t s = 0; s < phy2log.size(); ++s) {
    auto& list = nodes[phy2log[s]];
    const int node = cluster.node_of(slot_gpu[s]);
    auto it = std::find_if(list.begin(), list.end(), [&](auto& p) { return p.first == node; });
    if (it == list.end()) {
      list.emplace_back(node, 1);
    } else {
      ++it->second;
    }
  }
  return nodes;
}

double tokens_per_sample(const LayerStats& stats, const std::vector<double>& load, int top_k) {
  const double samples = static_cast<double>(stats.coactivation.size() / top_k);
  return std::accumulate(load.begin(), load.end(), 0.0) / (samples * top_k);
}

// Moves whole GPU contents ("bins") between nodes: bins only trade places with bins of the
// same slot count, so every GPU keeps its memory and the per-GPU loads stay as they are.
class NodeAssignment {
 public:
  NodeAssignment(const Packing& packing, const std::vector<int>& capacity,
                 const ClusterSpec& cluster)
      : packing_(packing), capacity_(capacity), cluster_(cluster) {}

  // Heaviest bin first onto the least loaded node with a free GPU of the bin's slot count,
  // then swaps that lower the busiest node's load.
  void balance_load() {
    const int num_nodes = cluster_.num_nodes, num_gpus = cluster_.num_gpus();
    std::vector<std::vector<int>> free_gpus(num_nodes);  // per node: slot counts of free GPUs
    for (int g = 0; g < num_gpus; ++g) free_gpus[cluster_.node_of(g)].push_back(capacity_[g]);
    std::vector<int> order(num_gpus);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return packing_.gpu_load[a] > packing_.gpu_load[b]; });
    bins_of_node_.assign(num_nodes, {});
    node_load_.assign(num_nodes, 0.0);
    std::set<std::pair<double, int>> nodes_by_load;
    for (int n = 0; n < num_nodes; ++n) nodes_by_load.emplace(0.0, n);
    for (int bin : order) {
      for (auto it = nodes_by_load.begin(); it != nodes_by_load.end(); ++it) {
        const int node = it->second;
        auto& free = free_gpus[node];
        auto slot_count = std::find(free.begin(), free.end(), capacity_[bin]);
        if (slot_count == free.end()) continue;
        free.erase(slot_count);
        nodes_by_load.erase(it);
        bins_of_node_[node].push_back(bin);
        node_load_[node] += packing_.gpu_load[bin];
        if (!free.empty()) nodes_by_load.emplace(node_load_[node], node);
        break;
      }
    }
    swap_to_balance(
        bins_of_node_, node_load_, packing_.gpu_load,
        [&](int x, int, int y, int) { return capacity_[x] == capacity_[y]; }, 4 * num_nodes);
  }

  // With co-activation samples: swaps bins between the node that receives the most copies
  // and the nodes that receive the fewest while that lowers the busiest node's copies.
  void reduce_copies(const std::vector<int>& samples, int top_k, const std::vector<int>& count,
                     double sample_tokens) {
    constexpr int kLightNodes = 4;
    constexpr double kMinGain = 1e-3;
    const int num_nodes = cluster_.num_nodes;
    const int num_experts = static_cast<int>(count.size());
    samples_of_expert_.assign(num_experts, {});
    const int num_samples = static_cast<int>(samples.size() / top_k);
    for (int s = 0; s < num_samples; ++s) {
      for (int i = 0; i < top_k; ++i) samples_of_expert_[samples[s * top_k + i]].push_back(s);
    }
    std::vector<int> phy2log, slot_gpu;
    for (int node = 0; node < num_nodes; ++node) {
      for (int bin : bins_of_node_[node]) {
        for (int slot : packing_.slots_of_gpu[bin]) {
          phy2log.push_back(packing_.slot_expert[slot]);
          slot_gpu.push_back(node * cluster_.gpus_per_node);  // any GPU of the node
        }
      }
    }
    nodes_ = replica_nodes(phy2log, slot_gpu, num_experts, cluster_);
    hit_ = sample_hits(samples, top_k, nodes_, count, sample_tokens, num_nodes);
    stamp_.assign(num_samples, -1);
    seen_.assign(num_samples, -1);
    moved_x_.assign(num_experts, 0);
    moved_y_.assign(num_experts, 0);

    std::vector<int> by_hit(num_nodes);
    for (int iteration = 0; iteration < 2 * num_nodes; ++iteration) {
      const int heavy = static_cast<int>(std::max_element(hit_.begin(), hit_.end()) - hit_.begin());
      std::iota(by_hit.begin(), by_hit.end(), 0);
      const int light_count = std::min(kLightNodes, num_nodes);
      std::partial_sort(
          by_hit.begin(), by_hit.begin() + light_count, by_hit.end(),
          [&](int a, int b) { return hit_[a] < hit_[b] || (hit_[a] == hit_[b] && a < b); });
      // A swap must save the busiest node at least kMinGain of its copies: smaller gains are
      // below what a few thousand samples resolve, and chasing them costs most of the time
      // at full scale (hundreds of nodes, each swap a sliver of one node's copies).
      double best =
          hit_[heavy] - std::max(improvement_epsilon(hit_[heavy]), kMinGain * hit_[heavy]);
      int best_light = -1, best_x = -1, best_y = -1;
      double best_heavy_hit = 0, best_light_hit = 0;
      fill_shares(heavy, count, share_a_);
      const auto& heavy_bins = bins_of_node_[heavy];
      // A swap changes a node's copies by the sum of its two one-way moves' changes plus a
      // term over the samples that hold experts of both bins. That term is never negative
      // (miss = rest * X * Y with X rising and Y falling: the swap's change exceeds the sum
      // by rest * (X' - X) * (Y - Y') >= 0), so the sum bounds each pair from below. The
      // one-way moves are evaluated once per light node, the pairs in the order of their
      // bound, and only while it can beat the best swap so far: exact, and far cheaper.
      std::vector<std::pair<double, double>> x_alone(heavy_bins.size()), y_alone;
      std::vector<std::tuple<double, int, int>> pairs;  // (bound, x, y)
      for (int l = 0; l < light_count; ++l) {
        const int light = by_hit[l];
        if (light == heavy) continue;
        fill_shares(light, count, share_b_);
        const auto& light_bins = bins_of_node_[light];
        // Bins holding the same experts (replicas of a hot expert) move alike: once each.
        for (size_t x = 0; x < heavy_bins.size(); ++x) {
          const size_t twin = first_twin(heavy_bins, x);
          x_alone[x] = twin < x ? x_alone[twin]
                                : hits_after_swap(heavy_bins[x], heavy, -1, light, samples, top_k,
                                                  count, sample_tokens);
        }
        y_alone.resize(light_bins.size());
        for (size_t y = 0; y < light_bins.size(); ++y) {
          const size_t twin = first_twin(light_bins, y);
          y_alone[y] = twin < y ? y_alone[twin]
                                : hits_after_swap(-1, heavy, light_bins[y], light, samples, top_k,
                                                  count, sample_tokens);
        }
        pairs.clear();
        for (int x = 0; x < static_cast<int>(heavy_bins.size()); ++x) {
          for (int y = 0; y < static_cast<int>(light_bins.size()); ++y) {
            if (capacity_[heavy_bins[x]] != capacity_[light_bins[y]]) continue;
            // An expert in both bins breaks the X * Y split: no bound, always evaluated.
            const double bound =
                share_expert(heavy_bins[x], light_bins[y])
                    ? -std::numeric_limits<double>::infinity()
                    : std::max(x_alone[x].first + y_alone[y].first - hit_[heavy],
                               x_alone[x].second + y_alone[y].second - hit_[light]);
            if (bound < best) pairs.emplace_back(bound, x, y);
          }
        }
        std::sort(pairs.begin(), pairs.end());
        for (const auto& [bound, x, y] : pairs) {
          if (bound >= best) break;
          mark_bin(heavy_bins[x]);
          const auto [shared_heavy, shared_light] =
              shared_change(light_bins[y], samples, top_k, count, sample_tokens);
          for (int slot : packing_.slots_of_gpu[heavy_bins[x]]) {
            moved_x_[packing_.slot_expert[slot]] = 0;
          }
          const double heavy_hit = x_alone[x].first + y_alone[y].first - hit_[heavy] + shared_heavy;
          const double light_hit =
              x_alone[x].second + y_alone[y].second - hit_[light] + shared_light;
          if (std::max(heavy_hit, light_hit) < best) {
            best = std::max(heavy_hit, light_hit);
            best_light = light;
            best_x = x;
            best_y = y;
            best_heavy_hit = heavy_hit;
            best_light_hit = light_hit;
          }
        }
      }
      if (best_light < 0) return;
      const int x_bin = bins_of_node_[heavy][best_x], y_bin = bins_of_node_[best_light][best_y];
      move_bin(x_bin, heavy, best_light);
      move_bin(y_bin, best_light, heavy);
      std::swap(bins_of_node_[heavy][best_x], bins_of_node_[best_light][best_y]);
      node_load_[heavy] += packing_.gpu_load[y_bin] - packing_.gpu_load[x_bin];
      node_load_[best_light] += packing_.gpu_load[x_bin] - packing_.gpu_load[y_bin];
      hit_[heavy] = best_heavy_hit;
      hit_[best_light] = best_light_hit;
    }
  }

  // GPU of every bin: the node's GPUs in index order, taken by its bins of matching slot count.
  std::vector<int> gpu_of_bin() const {
    std::vector<int> gpu(capacity_.size(), -1);
    for (int node = 0; node < cluster_.num_nodes; ++node) {
      std::vector<int> bins = bins_of_node_[node];
      std::sort(bins.begin(), bins.end());
      std::vector<bool> taken(bins.size(), false);
      for (int i = 0; i < cluster_.gpus_per_node; ++i) {
        const int g = node * cluster_.gpus_per_node + i;
        for (size_t b = 0; b < bins.size(); ++b) {
          if (!taken[b] && capacity_[bins[b]] == capacity_[g]) {
            taken[b] = true;
            gpu[bins[b]] = g;
            break;
          }
        }
      }
    }
    return gpu;
  }

 private:
  void move_bin(int bin, int from, int to) {
    for (int slot : packing_.slots_of_gpu[bin]) {
      auto& list = nodes_[packing_.slot_expert[slot]];
      auto it = std::find_if(list.begin(), list.end(), [&](auto& p) { return p.first == from; });
      if (--it->second == 0) list.erase(it);
      it = std::find_if(list.begin(), list.end(), [&](auto& p) { return p.first == to; });
      if (it == list.end()) {
        list.emplace_back(to, 1);
      } else {
        ++it->second;
      }
    }
  }

  // The first of `bins` that holds the same experts as bins[i] (i itself when none does).
  size_t first_twin(const std::vector<int>& bins, size_t i) const {
    auto experts = [&](int bin) {
      std::vector<int> list;
      for (int slot : packing_.slots_of_gpu[bin]) list.push_back(packing_.slot_expert[slot]);
      std::sort(list.begin(), list.end());
      return list;
    };
    const std::vector<int> mine = experts(bins[i]);
    for (size_t j = 0; j < i; ++j) {
      if (packing_.slots_of_gpu[bins[j]].size() == mine.size() && experts(bins[j]) == mine) {
        return j;
      }
    }
    return i;
  }

  bool share_expert(int x, int y) const {
    for (int a : packing_.slots_of_gpu[x]) {
      for (int b : packing_.slots_of_gpu[y]) {
        if (packing_.slot_expert[a] == packing_.slot_expert[b]) return true;
      }
    }
    return false;
  }

  // Marks the samples of bin x's experts (stamp_ == x_mark_) and counts its experts in
  // moved_x_ for shared_change.
  void mark_bin(int x) {
    x_mark_ = ++current_stamp_;
    for (int slot : packing_.slots_of_gpu[x]) {
      const int e = packing_.slot_expert[slot];
      ++moved_x_[e];
      for (int s : samples_of_expert_[e]) stamp_[s] = x_mark_;
    }
  }

  // The part of swapping bin x (marked, on the node of share_a_) with bin y (on the node of
  // share_b_) that the two one-way moves miss: over the samples holding experts of both,
  // the swap's change minus the changes of x alone and y alone, for both nodes.
  std::pair<double, double> shared_change(int y, const std::vector<int>& samples, int top_k,
                                          const std::vector<int>& count, double sample_tokens) {
    for (int slot : packing_.slots_of_gpu[y]) ++moved_y_[packing_.slot_expert[slot]];
    ++pair_stamp_;
    double change_a = 0, change_b = 0;
    for (int slot : packing_.slots_of_gpu[y]) {
      for (int s : samples_of_expert_[packing_.slot_expert[slot]]) {
        if (stamp_[s] != x_mark_ || seen_[s] == pair_stamp_) continue;
        seen_[s] = pair_stamp_;
        double a0 = 1, ax = 1, ay = 1, axy = 1, b0 = 1, bx = 1, by = 1, bxy = 1;
        double rest_a = 1, rest_b = 1;  // the factors of the experts neither bin moves
        for (int i = 0; i < top_k; ++i) {
          const int e = samples[s * top_k + i];
          const double sa = share_a_[e], sb = share_b_[e];
          if (moved_x_[e] == 0 && moved_y_[e] == 0) {
            rest_a *= 1 - sa;
            rest_b *= 1 - sb;
            continue;
          }
          const double mx = static_cast<double>(moved_x_[e]) / count[e];
          const double my = static_cast<double>(moved_y_[e]) / count[e];
          a0 *= 1 - sa;
          ax *= 1 - (sa - mx);
          ay *= 1 - (sa + my);
          axy *= 1 - (sa - mx + my);
          b0 *= 1 - sb;
          bx *= 1 - (sb + mx);
          by *= 1 - (sb - my);
          bxy *= 1 - (sb + mx - my);
        }
        // hit = tokens * (1 - miss): (a0 - axy) - (a0 - ax) - (a0 - ay).
        change_a += sample_tokens * rest_a * (ax + ay - axy - a0);
        change_b += sample_tokens * rest_b * (bx + by - bxy - b0);
      }
    }
    for (int slot : packing_.slots_of_gpu[y]) moved_y_[packing_.slot_expert[slot]] = 0;
    return {change_a, change_b};
  }

  // share[e] = share of expert e's replicas on `node`, for every expert.
  void fill_shares(int node, const std::vector<int>& count, std::vector<double>& share) const {
    share.resize(count.size());
    for (size_t e = 0; e < count.size(); ++e) {
      share[e] = node_share(nodes_, count, static_cast<int>(e), node);
    }
  }

  // Copies nodes a and b would receive if bin x (on a) and bin y (on b) traded places (-1:
  // no bin, a one-way move); share_a_ and share_b_ must hold the current shares on a and b.
  std::pair<double, double> hits_after_swap(int x, int a, int y, int b,
                                            const std::vector<int>& samples, int top_k,
                                            const std::vector<int>& count, double sample_tokens) {
    moved_to_b_.resize(count.size(), 0);  // replicas of each expert going from a to b
    const std::vector<int> none;
    const auto& x_slots = x >= 0 ? packing_.slots_of_gpu[x] : none;
    const auto& y_slots = y >= 0 ? packing_.slots_of_gpu[y] : none;
    for (int slot : x_slots) ++moved_to_b_[packing_.slot_expert[slot]];
    for (int slot : y_slots) --moved_to_b_[packing_.slot_expert[slot]];
    double hit_a = hit_[a], hit_b = hit_[b];
    ++current_stamp_;
    for (const auto* slots : {&x_slots, &y_slots}) {
      for (int slot : *slots) {
        for (int s : samples_of_expert_[packing_.slot_expert[slot]]) {
          if (stamp_[s] == current_stamp_) continue;
          stamp_[s] = current_stamp_;
          double miss_a = 1, miss_b = 1, miss_a_after = 1, miss_b_after = 1;
          for (int i = 0; i < top_k; ++i) {
            const int e = samples[s * top_k + i];
            const double moved = static_cast<double>(moved_to_b_[e]) / count[e];
            miss_a *= 1 - share_a_[e];
            miss_b *= 1 - share_b_[e];
            miss_a_after *= 1 - (share_a_[e] - moved);
            miss_b_after *= 1 - (share_b_[e] + moved);
          }
          hit_a += sample_tokens * (miss_a - miss_a_after);
          hit_b += sample_tokens * (miss_b - miss_b_after);
        }
      }
    }
    for (const auto* slots : {&x_slots, &y_slots}) {
      for (int slot : *slots) moved_to_b_[packing_.slot_expert[slot]] = 0;
    }
    return {hit_a, hit_b};
  }

  const Packing& packing_;
  const std::vector<int>& capacity_;
  const ClusterSpec& cluster_;
  std::vector<std::vector<int>> bins_of_node_;
  std::vector<double> node_load_;
  ReplicaNodes nodes_;
  std::vector<double> hit_;
  std::vector<std::vector<int>> samples_of_expert_;
  std::vector<int> stamp_;
  int current_stamp_ = 0;
  std::vector<double> share_a_, share_b_;
  std::vector<int> moved_to_b_;
  std::vector<int> moved_x_, moved_y_;  // experts of the two bins of shared_change
  std::vector<int> seen_;               // sample -> pair_stamp_ of its last shared_change
  int x_mark_ = 0, pair_stamp_ = 0;
};

// Re-planning from a previous placement (see the header): keeps slots where they are and
// changes as few as possible. Works on (GPU, expert) pairs; a move is a pair the previous
// placement lacked.
class Replan {
 public:
  Replan(const LayerStats& stats, const std::vector<double>& load, const std::vector<int>& capacity,
         int max_count)
      : load_(load),
        capacity_(capacity),
        num_experts_(static_cast<int>(load.size())),
        num_gpus_(static_cast<int>(capacity.size())),
        max_count_(max_count),
        count_(num_experts_, 0),
        experts_of_gpu_(num_gpus_),
        gpus_of_expert_(num_experts_),
        gpu_load_(num_gpus_, 0.0),
        previous_(static_cast<size_t>(num_gpus_) * num_experts_, 0) {
    for (size_t s = 0; s < stats.previous_gpus.size(); ++s) {
      const int g = stats.previous_gpus[s], e = stats.previous_phy2log[s];
      previous_[index(g, e)] = 1;
      experts_of_gpu_[g].push_back(e);
      gpus_of_expert_[e].push_back(g);
      ++count_[e];
    }
    for (int g = 0; g < num_gpus_; ++g) refresh_gpu(g);
  }

  // Step 1: drops replicas beyond `slots`, sheds the slots of GPUs over capacity and fills
  // every GPU's room. Returns the moves this forced.
  int take_previous(int64_t slots) {
    while (total_slots() > slots) {  // free: fewest load lost per replica first
      int expert = -1;
      for (int e = 0; e < num_experts_; ++e) {
        if (count_[e] > 1 &&
            (expert < 0 || load_[e] / (count_[e] - 1) < load_[expert] / (count_[expert] - 1))) {
          expert = e;
        }
      }
      remove(heaviest_holder(expert, -1, true), expert);
    }
    for (int g = 0; g < num_gpus_; ++g) {
      while (static_cast<int>(experts_of_gpu_[g].size()) > capacity_[g]) {
        const auto& held = experts_of_gpu_[g];
        remove(g, *std::max_element(held.begin(), held.end(), [&](int a, int b) {
                 return per_replica(a) < per_replica(b) ||
                        (per_replica(a) == per_replica(b) && a > b);
               }));
      }
    }
    while (total_slots() < slots) {
      int expert = static_cast<int>(std::find(count_.begin(), count_.end(), 0) - count_.begin());
      if (expert == num_experts_) {  // every expert has a slot: the most loaded per replica
        expert = -1;
        for (int e = 0; e < num_experts_; ++e) {
          if (count_[e] < max_count_ && (expert < 0 || per_replica(e) > per_replica(expert))) {
            expert = e;
          }
        }
      }
      if (expert < 0) throw std::logic_error("placement: no expert can take another replica");
      add_to_lightest(expert);
    }
    return moves_;
  }

  // Step 2: optional moves while they lower the maximum, at most `budget` (-1: no limit).
  void improve(int budget, int forced) {
    const int limit = budget < 0 ? std::numeric_limits<int>::max() : forced + budget;
    transfer_replicas(limit);
    swap_slots(limit);
  }

  int moves() const { return moves_; }
  const std::vector<int>& count() const { return count_; }
  const std::vector<std::vector<int>>& experts_of_gpu() const { return experts_of_gpu_; }

 private:
  size_t index(int g, int e) const { return static_cast<size_t>(g) * num_experts_ + e; }
  double per_replica(int e) const { return count_[e] ? load_[e] / count_[e] : load_[e]; }
  int64_t total_slots() const { return std::accumulate(count_.begin(), count_.end(), int64_t{0}); }
  bool holds(int g, int e) const {
    const auto& held = experts_of_gpu_[g];
    return std::find(held.begin(), held.end(), e) != held.end();
  }
  // The move-count change of placing (+1) or removing (-1) expert e on GPU g.
  int cost(int g, int e) const { return previous_[index(g, e)] ? 0 : 1; }

  void refresh_gpu(int g) {
    double sum = 0.0;
    for (int e : experts_of_gpu_[g]) sum += per_replica(e);
    gpu_load_[g] = sum;
  }
  void refresh_expert(int e) {
    for (int g : gpus_of_expert_[e]) refresh_gpu(g);
  }
  void add(int g, int e) {
    experts_of_gpu_[g].push_back(e);
    gpus_of_expert_[e].push_back(g);
    ++count_[e];
    moves_ += cost(g, e);
    refresh_expert(e);
  }
  void remove(int g, int e) {
    auto& held = experts_of_gpu_[g];
    held.erase(std::find(held.begin(), held.end(), e));
    auto& hosts = gpus_of_expert_[e];
    hosts.erase(std::find(hosts.begin(), hosts.end(), g));
    --count_[e];
    moves_ -= cost(g, e);
    refresh_gpu(g);
    refresh_expert(e);
  }
  bool has_room(int g) const { return static_cast<int>(experts_of_gpu_[g].size()) < capacity_[g]; }

  // The holder of e with the highest load (over capacity first when asked), not holding
  // `avoid`; ties to the lower GPU. -1 when none.
  int heaviest_holder(int e, int avoid, bool over_capacity_first) const {
    int best = -1;
    auto key = [&](int g) {
      const bool over =
          over_capacity_first && static_cast<int>(experts_of_gpu_[g].size()) > capacity_[g];
      return std::make_pair(over, gpu_load_[g]);
    };
    for (int g : gpus_of_expert_[e]) {
      if (avoid >= 0 && holds(g, avoid)) continue;
      if (best < 0 || key(g) > key(best) || (key(g) == key(best) && g < best)) best = g;
    }
    return best;
  }

  // A new slot of e on the lightest GPU with room that lacks e; when every GPU with room
  // holds e, a slot of a full GPU moves into the room first and e takes its place.
  void add_to_lightest(int e) {
    int target = -1;
    for (int g = 0; g < num_gpus_; ++g) {
      if (has_room(g) && !holds(g, e) && (target < 0 || gpu_load_[g] < gpu_load_[target])) {
        target = g;
      }
    }
    if (target >= 0) return add(target, e);
    for (int room = 0; room < num_gpus_; ++room) {
      if (!has_room(room)) continue;
      for (int full = 0; full < num_gpus_; ++full) {
        if (has_room(full) || capacity_[full] == 0 || holds(full, e)) continue;
        for (int moved : experts_of_gpu_[full]) {
          if (holds(room, moved)) continue;
          remove(full, moved);
          add(room, moved);
          return add(full, e);
        }
      }
    }
    throw std::logic_error("placement: no GPU can take another replica");
  }

  // A replica of B (the least load per replica after losing one) becomes one of A (the
  // most load per replica) on the same GPU, while B's new load per replica stays below A's
  // current one: the largest load per replica never rises and the sorted loads per replica
  // fall, so this ends at the counts of a fresh plan unless the budget runs out first.
  void transfer_replicas(int limit) {
    std::vector<char> skipped(num_experts_);
    for (;;) {
      int a = -1;
      for (int e = 0; e < num_experts_; ++e) {
        if (count_[e] < max_count_ && (a < 0 || per_replica(e) > per_replica(a))) a = e;
      }
      if (a < 0) return;
      const double top = per_replica(a);
      // The donor losing least, skipping donors whose GPUs all hold a already.
      std::fill(skipped.begin(), skipped.end(), 0);
      int b = -1, gpu = -1;
      for (;;) {
        b = -1;
        for (int e = 0; e < num_experts_; ++e) {
          if (e == a || count_[e] < 2 || skipped[e]) continue;
          if (b < 0 || load_[e] / (count_[e] - 1) < load_[b] / (count_[b] - 1)) b = e;
        }
        if (b < 0 || !(load_[b] / (count_[b] - 1) < top - improvement_epsilon(top))) return;
        gpu = cheapest_lightest_holder(b, a);
        if (gpu >= 0) break;
        skipped[b] = 1;
      }
      if (moves_ + cost(gpu, a) - cost(gpu, b) > limit) return;
      remove(gpu, b);
      add(gpu, a);
    }
  }

  // The holder of b that lacks a where placing a costs fewest moves, then the lightest (it
  // trades b's slot for a heavier one of a); -1 when every holder of b holds a.
  int cheapest_lightest_holder(int b, int a) const {
    int gpu = -1;
    for (int g : gpus_of_expert_[b]) {
      if (holds(g, a)) continue;
      const int c = cost(g, a) - cost(g, b);
      const int best = gpu < 0 ? 0 : cost(gpu, a) - cost(gpu, b);
      if (gpu < 0 || c < best ||
          (c == best &&
           (gpu_load_[g] < gpu_load_[gpu] || (gpu_load_[g] == gpu_load_[gpu] && g < gpu)))) {
        gpu = g;
      }
    }
    return gpu;
  }

  // Swaps a slot of the heaviest GPU with one of another GPU while that lowers the heaviest
  // GPU's load: the lowest resulting maximum first, ties to the fewest moves.
  void swap_slots(int limit) {
    for (int iteration = 0; iteration < 4 * num_gpus_; ++iteration) {
      const int heavy = static_cast<int>(std::max_element(gpu_load_.begin(), gpu_load_.end()) -
                                         gpu_load_.begin());
      const double top = gpu_load_[heavy];
      double best = top - improvement_epsilon(top);
      int best_cost = 0, best_light = -1, best_x = -1, best_y = -1;
      for (int light = 0; light < num_gpus_; ++light) {
        if (light == heavy) continue;
        for (int x : experts_of_gpu_[heavy]) {
          if (holds(light, x)) continue;
          for (int y : experts_of_gpu_[light]) {
            const double shift = per_replica(x) - per_replica(y);
            if (shift <= 0 || holds(heavy, y)) continue;
            const double worst = std::max(top - shift, gpu_load_[light] + shift);
            const int c = cost(light, x) + cost(heavy, y) - cost(heavy, x) - cost(light, y);
            if (moves_ + c > limit) continue;
            if (worst < best || (worst == best && best_light >= 0 && c < best_cost)) {
              best = worst;
              best_cost = c;
              best_light = light;
              best_x = x;
              best_y = y;
            }
          }
        }
      }
      if (best_light < 0) return;
      remove(heavy, best_x);
      remove(best_light, best_y);
      add(heavy, best_y);
      add(best_light, best_x);
    }
  }

  const std::vector<double>& load_;
  const std::vector<int>& capacity_;
  int num_experts_, num_gpus_, max_count_;
  std::vector<int> count_;
  std::vector<std::vector<int>> experts_of_gpu_;
  std::vector<std::vector<int>> gpus_of_expert_;
  std::vector<double> gpu_load_;
  std::vector<char> previous_;  // G x E: the pair was in the previous placement
  int moves_ = 0;
};

// Slots ordered by GPU, then expert, from one (GPU, expert) pair per slot.
LayerPlacement finish(LayerPlacement placement, std::vector<std::pair<int, int>> gpu_expert) {
  std::sort(gpu_expert.begin(), gpu_expert.end());
  for (size_t s = 0; s < gpu_expert.size(); ++s) {
    placement.gpus.push_back(gpu_expert[s].first);
    placement.phy2log.push_back(gpu_expert[s].second);
    placement.log2phy[gpu_expert[s].second].push_back(static_cast<int>(s));
  }
  return placement;
}

LayerPlacement plan_moe_layer(int layer, const LayerStats& stats, const PlacementModel& model,
                              const ClusterSpec& cluster, const PlanOptions& options, int64_t slots,
                              const std::vector<int>& capacity) {
  const int num_gpus = cluster.num_gpus();
  const std::vector<double> load = resolve_loads(stats, model.experts_per_layer);
  const int gpus_with_room = static_cast<int>(
      std::count_if(capacity.begin(), capacity.end(), [](int c) { return c > 0; }));
  LayerPlacement placement;
  placement.layer = layer;
  placement.log2phy.assign(model.experts_per_layer, {});
  std::vector<std::pair<int, int>> gpu_expert;  // one per slot, sorted into slot order
  if (!stats.previous_gpus.empty()) {
    Replan replan(stats, load, capacity, gpus_with_room);
    replan.improve(options.max_moves, replan.take_previous(slots));
    placement.moves = replan.moves();
    placement.replica_count = replan.count();
    for (int g = 0; g < num_gpus; ++g) {
      for (int e : replan.experts_of_gpu()[g]) gpu_expert.emplace_back(g, e);
    }
    return finish(std::move(placement), std::move(gpu_expert));
  }
  const std::vector<int> count = replica_counts(load, slots, gpus_with_room);
  Packing packing = pack_heaviest_first(load, count, capacity);

  std::vector<int> gpu_of_bin(num_gpus);
  std::iota(gpu_of_bin.begin(), gpu_of_bin.end(), 0);
  if (options.policy == Policy::kBalanced) {
    const int most_slots = *std::max_element(capacity.begin(), capacity.end());
    if (most_slots > 1) {
      swap_to_balance(
          packing.slots_of_gpu, packing.gpu_load, packing.slot_load,
          [&](int x, int gx, int y, int gy) {
            const int ex = packing.slot_expert[x], ey = packing.slot_expert[y];
            return ex == ey || (!packing.holds(gy, ex) && !packing.holds(gx, ey));
          },
          4 * num_gpus);
    }
    if (options.topology_aware && cluster.num_nodes > 1) {
      NodeAssignment nodes(packing, capacity, cluster);
      nodes.balance_load();
      if (!stats.coactivation.empty()) {
        nodes.reduce_copies(stats.coactivation, model.top_k, count,
                            tokens_per_sample(stats, load, model.top_k));
      }
      gpu_of_bin = nodes.gpu_of_bin();
    }
  }

  for (int bin = 0; bin < num_gpus; ++bin) {
    for (int slot : packing.slots_of_gpu[bin]) {
      gpu_expert.emplace_back(gpu_of_bin[bin], packing.slot_expert[slot]);
    }
  }
  placement.replica_count = count;
  return finish(std::move(placement), std::move(gpu_expert));
}

// A previous placement must be one the planner could have made: every expert on some GPU,
// no GPU with two slots of one expert.
void validate_previous(const LayerStats& stats, const std::string& name, int num_experts,
                       int num_gpus) {
  const auto& gpus = stats.previous_gpus;
  const auto& experts = stats.previous_phy2log;
  if (gpus.size() != experts.size()) {
    fail(name + ".previous_gpus", "expected one GPU per previous slot (" +
                                      std::to_string(experts.size()) + "), got " +
                                      std::to_string(gpus.size()));
  }
  std::set<std::pair<int, int>> pairs;
  std::vector<bool> placed(num_experts, false);
  for (size_t s = 0; s < gpus.size(); ++s) {
    if (gpus[s] < 0 || gpus[s] >= num_gpus) {
      fail(name + ".previous_gpus", "GPU " + std::to_string(gpus[s]) + " out of range");
    }
    if (experts[s] < 0 || experts[s] >= num_experts) {
      fail(name + ".previous_phy2log", "expert id " + std::to_string(experts[s]) + " out of range");
    }
    if (!pairs.emplace(gpus[s], experts[s]).second) {
      fail(name + ".previous_gpus", "GPU " + std::to_string(gpus[s]) + " holds expert " +
                                        std::to_string(experts[s]) + " twice");
    }
    placed[experts[s]] = true;
  }
  const auto missing = std::find(placed.begin(), placed.end(), false);
  if (!gpus.empty() && missing != placed.end()) {
    fail(name + ".previous_phy2log",
         "expert " + std::to_string(missing - placed.begin()) + " has no slot");
  }
}

void validate_stats(const std::vector<LayerStats>& stats, const PlacementModel& model,
                    size_t num_moe_layers, int num_gpus, Policy policy) {
  if (!stats.empty() && stats.size() != num_moe_layers) {
    fail("stats", "expected one entry per MoE layer (" + std::to_string(num_moe_layers) +
                      "), got " + std::to_string(stats.size()));
  }
  for (size_t i = 0; i < stats.size(); ++i) {
    const std::string name = "stats[" + std::to_string(i) + "]";
    const auto& load = stats[i].expert_load;
    if (!load.empty() && static_cast<int>(load.size()) != model.experts_per_layer) {
      fail(name + ".expert_load", "expected " + std::to_string(model.experts_per_layer) +
                                      " values, got " + std::to_string(load.size()));
    }
    for (double value : load) {
      if (!std::isfinite(value) || value < 0) {
        fail(name + ".expert_load", "values must be finite and >= 0");
      }
    }
    const auto& samples = stats[i].coactivation;
    if (samples.size() % model.top_k != 0) {
      fail(name + ".coactivation",
           "length must be a multiple of top_k (" + std::to_string(model.top_k) + ")");
    }
    for (int expert : samples) {
      if (expert < 0 || expert >= model.experts_per_layer) {
        fail(name + ".coactivation", "expert id " + std::to_string(expert) + " out of range");
      }
    }
    validate_previous(stats[i], name, model.experts_per_layer, num_gpus);
    if (!stats[i].previous_gpus.empty() && policy != Policy::kBalanced) {
      fail(name + ".previous_gpus", "only the balanced policy re-plans from a previous placement");
    }
  }
}

// Slots per MoE layer: E + redundant_experts, or with -1 the most that fit in memory, up to
// one per GPU (E <= G) or floor(E / G) + 1 per GPU (E > G: one spare slot per GPU for
// replicas, the ratio of DeepSeek-V3's 256 + 32 redundant experts on 32 GPUs).
int64_t choose_slots(const PlacementModel& model, const ClusterSpec& cluster,
                     const PlanOptions& options, int64_t moe_layers, double expert_budget) {
  const int64_t experts = model.experts_per_layer, num_gpus = cluster.num_gpus();
  const int64_t most = experts <= num_gpus ? num_gpus : (experts / num_gpus + 1) * num_gpus;
  auto fits = [&](int64_t slots) {
    return max_slots_per_gpu(moe_layers, slots, num_gpus) * model.bytes_per_expert <= expert_budget;
  };
  auto need = [&](int64_t slots) {
    return gigabytes(max_slots_per_gpu(moe_layers, slots, num_gpus) * model.bytes_per_expert);
  };
  if (options.redundant_experts >= 0) {
    const int64_t slots = experts + options.redundant_experts;
    if (experts <= num_gpus && slots > num_gpus) {
      fail("redundant_experts", std::to_string(experts) + " experts + " +
                                    std::to_string(options.redundant_experts) +
                                    " replicas exceed the " + std::to_string(num_gpus) +
                                    " GPUs (at most one slot of a layer per GPU when E <= G)");
    }
    if (slots > experts * num_gpus) {
      fail("redundant_experts", "more replicas than GPUs to hold them");
    }
    if (!fits(slots)) {
      fail("redundant_experts", std::to_string(slots) + " slots per layer need " + need(slots) +
                                    " of experts per GPU, more than the budget of " +
                                    gigabytes(expert_budget));
    }
    return slots;
  }
  if (!fits(experts)) {
    fail("cluster.gpu_memory_bytes",
         "the experts need " + need(experts) + " per GPU, more than the budget of " +
             gigabytes(expert_budget) + " (memory minus reserve and dense layers)");
  }
  int64_t low = experts, high = most;  // fits(low) holds; find the largest that fits
  while (low < high) {
    const int64_t mid = (low + high + 1) / 2;
    if (fits(mid)) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  return low;
}

}  // namespace

double gated_ffn_bytes(int64_t hidden, int64_t ffn_hidden, int64_t dtype_bytes) {
  if (hidden < 1 || ffn_hidden < 1 || dtype_bytes < 1) {
    fail("gated_ffn_bytes", "hidden, ffn_hidden and dtype_bytes must be >= 1");
  }
  return 3.0 * static_cast<double>(hidden) * static_cast<double>(ffn_hidden) *
         static_cast<double>(dtype_bytes);
}

std::vector<int> PlacementModel::moe_layers() const {
  std::vector<int> layers;
  for (int l = 0; l < num_layers; ++l) {
    if (std::find(dense_layers.begin(), dense_layers.end(), l) == dense_layers.end()) {
      layers.push_back(l);
    }
  }
  return layers;
}

void PlacementModel::validate() const {
  if (num_layers < 1) fail("model.num_layers", "must be >= 1");
  std::vector<int> sorted = dense_layers;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i] < 0 || sorted[i] >= num_layers) {
      fail("model.dense_layers", "layer " + std::to_string(sorted[i]) + " out of range");
    }
    if (i > 0 && sorted[i] == sorted[i - 1]) {
      fail("model.dense_layers", "layer " + std::to_string(sorted[i]) + " listed twice");
    }
  }
  if (experts_per_layer < 1) fail("model.experts_per_layer", "must be >= 1");
  if (top_k < 1 || top_k > experts_per_layer) {
    fail("model.top_k", "must be in [1, experts_per_layer]");
  }
  if (!(bytes_per_expert > 0) || !std::isfinite(bytes_per_expert)) {
    fail("model.bytes_per_expert", "must be > 0");
  }
  if (!(dense_layer_bytes >= 0) || !std::isfinite(dense_layer_bytes)) {
    fail("model.dense_layer_bytes", "must be >= 0");
  }
}

LayerMetrics evaluate_layer(const LayerPlacement& layer, const ClusterSpec& cluster,
                            const LayerStats& stats, int top_k) {
  const int num_experts = static_cast<int>(layer.replica_count.size());
  const int num_gpus = cluster.num_gpus(), num_nodes = cluster.num_nodes;
  const std::vector<double> load = resolve_loads(stats, num_experts);
  std::vector<double> gpu_load(num_gpus, 0.0);
  std::vector<bool> hosts(num_gpus, false);
  for (size_t s = 0; s < layer.phy2log.size(); ++s) {
    const int e = layer.phy2log[s];
    gpu_load[layer.gpus[s]] += load[e] / layer.replica_count[e];
    hosts[layer.gpus[s]] = true;
  }
  LayerMetrics metrics;
  const int hosting = static_cast<int>(std::count(hosts.begin(), hosts.end(), true));
  metrics.max_gpu_load = *std::max_element(gpu_load.begin(), gpu_load.end());
  metrics.mean_gpu_load =
      hosting ? std::accumulate(gpu_load.begin(), gpu_load.end(), 0.0) / hosting : 0.0;
  metrics.max_nvlink_load = metrics.max_gpu_load * (1.0 - 1.0 / num_gpus);
  if (num_nodes < 2) return metrics;

  std::vector<double> hit(num_nodes, 0.0);
  if (stats.coactivation.empty()) {
    for (int g = 0; g < num_gpus; ++g) hit[cluster.node_of(g)] += gpu_load[g];
  } else {
    const ReplicaNodes nodes = replica_nodes(layer.phy2log, layer.gpus, num_experts, cluster);
    hit = sample_hits(stats.coactivation, top_k, nodes, layer.replica_count,
                      tokens_per_sample(stats, load, top_k), num_nodes);
  }
  const double total = std::accumulate(hit.begin(), hit.end(), 0.0);
  for (int n = 0; n < num_nodes; ++n) {
    const double in = hit[n] * (num_nodes - 1) / num_nodes;
    const double out = (total - hit[n]) / num_nodes;
    metrics.max_link_load =
        std::max(metrics.max_link_load, std::max(in, out) / cluster.gpus_per_node);
  }
  return metrics;
}

Placement plan_placement(const PlacementModel& model, const ClusterSpec& cluster,
                         const std::vector<LayerStats>& stats, const PlanOptions& options) {
  cluster.validate();
  model.validate();
  if (!(options.memory_reserve_bytes >= 0)) fail("memory_reserve_bytes", "must be >= 0");
  if (options.redundant_experts < -1) fail("redundant_experts", "must be >= 0, or -1 (auto)");
  const std::vector<int> moe_layers = model.moe_layers();
  if (options.max_moves < -1) fail("max_moves", "must be >= 0, or -1 (no limit)");
  validate_stats(stats, model, moe_layers.size(), cluster.num_gpus(), options.policy);

  const int num_gpus = cluster.num_gpus();
  const bool limited = cluster.gpu_memory_bytes > 0;
  const double budget = limited ? cluster.gpu_memory_bytes - options.memory_reserve_bytes
                                : std::numeric_limits<double>::infinity();
  if (model.bytes_per_expert > budget) {
    fail("model.bytes_per_expert", gigabytes(model.bytes_per_expert) +
                                       " does not fit the per-GPU budget of " + gigabytes(budget) +
                                       " (gpu_memory_bytes - memory_reserve_bytes)");
  }
  const bool sequential = options.policy == Policy::kSequential;
  if (sequential && options.redundant_experts > 0) {
    fail("redundant_experts", "the sequential layout has no replicas");
  }

  Placement plan;
  plan.gpu_memory_used.assign(num_gpus, 0.0);
  plan.layers.resize(model.num_layers);
  const double dense_per_gpu =
      sequential ? 0.0 : model.dense_layers.size() * model.dense_layer_bytes;
  const int64_t slots =
      sequential ? model.experts_per_layer
                 : choose_slots(model, cluster, options, static_cast<int64_t>(moe_layers.size()),
                                budget - dense_per_gpu);
  static const LayerStats kNoStats;
  int64_t offset = 0;  // first GPU of the rotating extra slots (or of the sequential count)
  for (size_t i = 0; i < moe_layers.size(); ++i) {
    const LayerStats& layer_stats = stats.empty() ? kNoStats : stats[i];
    LayerPlacement& layer = plan.layers[moe_layers[i]];
    if (sequential) {
      layer.layer = moe_layers[i];
      layer.replica_count.assign(model.experts_per_layer, 1);
      for (int e = 0; e < model.experts_per_layer; ++e) {
        layer.phy2log.push_back(e);
        layer.log2phy.push_back({e});
        layer.gpus.push_back(static_cast<int>((offset + e) % num_gpus));
      }
      offset += model.experts_per_layer;
    } else {
      layer = plan_moe_layer(moe_layers[i], layer_stats, model, cluster, options, slots,
                             layer_capacity(slots, num_gpus, offset));
      offset = (offset + slots % num_gpus) % num_gpus;
    }
    layer.metrics = evaluate_layer(layer, cluster, layer_stats, model.top_k);
    for (int gpu : layer.gpus) plan.gpu_memory_used[gpu] += model.bytes_per_expert;
  }
  for (int dense : model.dense_layers) {
    LayerPlacement& layer = plan.layers[dense];
    layer.layer = dense;
    layer.dense = true;
    if (sequential) {
      layer.gpus = {static_cast<int>(offset++ % num_gpus)};
    } else {
      layer.gpus.resize(num_gpus);
      std::iota(layer.gpus.begin(), layer.gpus.end(), 0);
    }
    for (int gpu : layer.gpus) plan.gpu_memory_used[gpu] += model.dense_layer_bytes;
  }
  const double most_used =
      *std::max_element(plan.gpu_memory_used.begin(), plan.gpu_memory_used.end());
  if (most_used > budget) {
    fail("cluster.gpu_memory_bytes", "the layout needs " + gigabytes(most_used) +
                                         " on one GPU, more than the budget of " +
                                         gigabytes(budget));
  }
  return plan;
}

}  // namespace moe_ep::core
