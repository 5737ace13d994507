#include "core/placement.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>

#include "core/balanced_packing.h"
#include "core/group_placement.h"
#include "core/link_search.h"
#include "core/node_assignment.h"
#include "core/node_hits.h"
#include "core/placement_common.h"
#include "core/replan.h"
#include "core/slot_layout.h"

namespace moe_ep::core {
namespace {

std::string gigabytes(double bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.3f GB", bytes / 1e9);
  return text;
}

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

std::vector<int> replicas_in(const SlotLayout& layout, int num_experts) {
  std::vector<int> count(num_experts, 0);
  for (int e : layout.slot_expert) ++count[e];
  return count;
}

// The link search of a fresh plan (link_search.h) under the layout's own GPU maximum: from
// the layout as it is, and from the layout with co-activated experts gathered first; the
// one whose busiest node ends with fewer copies. Returns those copies.
double lower_link_load(SlotLayout& layout, const std::vector<double>& load,
                       const ClusterSpec& cluster, const std::vector<int>& samples, int top_k) {
  const std::vector<int> count = replicas_in(layout, static_cast<int>(load.size()));
  LinkSearchOptions options;
  options.gpu_cap = layout.max_gpu_load();
  options.max_swaps = std::max(2 * cluster.num_nodes, layout.num_slots());
  auto search = [&](SlotLayout& candidate) {
    NodeHits hits(candidate, count, load, cluster, samples, top_k);
    lower_busiest_node(candidate, hits, cluster, options);
    return hits.hits()[hits.busiest()];
  };
  SlotLayout gathered = layout;
  const double direct = search(layout);
  // Gathering compares every pair of slots per swap: only where that stays cheap.
  constexpr int kMostSlotsToGather = 512;
  if (layout.num_slots() > kMostSlotsToGather) return direct;
  gather_coactivated(gathered, count, cluster, samples, top_k, options);
  const double via_gathering = search(gathered);
  if (via_gathering >= direct) return direct;
  layout = std::move(gathered);
  return via_gathering;
}

// A fresh plan of one MoE layer (see the policies in placement.h), on real GPUs.
SlotLayout plan_fresh(const std::vector<double>& load, const LayerStats& stats,
                      const PlacementModel& model, const ClusterSpec& cluster,
                      const PlanOptions& options, int64_t slots, const std::vector<int>& capacity) {
  if (options.policy == Policy::kGreedy) {
    const int no_limit = std::numeric_limits<int>::max();
    return pack_heaviest_first(load, replica_counts(load, slots, no_limit), capacity, true);
  }
  SlotLayout spread = balanced_packing(load, slots, capacity);
  const int num_nodes = cluster.num_nodes;
  std::optional<SlotLayout> grouped;
  if (model.routing_limited_to_groups() && model.n_group % num_nodes == 0 &&
      (options.topology_aware || num_nodes == 1)) {
    grouped = place_groups_on_nodes(load, model.group_of_expert(), model.n_group, capacity, cluster,
                                    stats.coactivation, model.top_k);
  }
  if (num_nodes == 1) {
    // The same packing with EPLB's expert order for groups (heaviest group first), which
    // breaks ties differently: the lower maximum of the two.
    const bool regroup = grouped && grouped->max_gpu_load() < spread.max_gpu_load();
    return regroup ? std::move(*grouped) : std::move(spread);
  }
  if (!options.topology_aware) return spread;
  spread.relabel(assign_bins_to_nodes(spread, capacity, cluster));
  if (stats.coactivation.empty()) return grouped ? std::move(*grouped) : std::move(spread);
  const double spread_link =
      lower_link_load(spread, load, cluster, stats.coactivation, model.top_k);
  if (!grouped) return spread;
  const double grouped_link =
      lower_link_load(*grouped, load, cluster, stats.coactivation, model.top_k);
  // The samples tell what the groups buy: the group-free plan when it is no worse in both.
  const bool spread_no_worse =
      spread.max_gpu_load() <= grouped->max_gpu_load() && spread_link <= grouped_link;
  return spread_no_worse ? std::move(spread) : std::move(*grouped);
}

// The (GPU, expert) pairs that a previous placement lacked, with multiplicity (0 without one).
int count_moves(const std::vector<std::pair<int, int>>& gpu_expert, const LayerStats& stats) {
  if (stats.previous_gpus.empty()) return 0;
  std::map<std::pair<int, int>, int> before;
  for (size_t s = 0; s < stats.previous_gpus.size(); ++s) {
    ++before[{stats.previous_gpus[s], stats.previous_phy2log[s]}];
  }
  int moves = 0;
  for (const auto& pair : gpu_expert) {
    int& left = before[pair];
    if (left > 0) {
      --left;
    } else {
      ++moves;
    }
  }
  return moves;
}

// Slots ordered by GPU, then expert, from one (GPU, expert) pair per slot.
LayerPlacement finish(LayerPlacement placement, std::vector<std::pair<int, int>> gpu_expert) {
  std::sort(gpu_expert.begin(), gpu_expert.end());
  placement.replica_count.assign(placement.log2phy.size(), 0);
  for (size_t s = 0; s < gpu_expert.size(); ++s) {
    placement.gpus.push_back(gpu_expert[s].first);
    placement.phy2log.push_back(gpu_expert[s].second);
    placement.log2phy[gpu_expert[s].second].push_back(static_cast<int>(s));
    ++placement.replica_count[gpu_expert[s].second];
  }
  return placement;
}

LayerPlacement plan_moe_layer(int layer, const LayerStats& stats, const PlacementModel& model,
                              const ClusterSpec& cluster, const PlanOptions& options, int64_t slots,
                              const std::vector<int>& capacity) {
  const std::vector<double> load = resolve_loads(stats, model.experts_per_layer);
  LayerPlacement placement;
  placement.layer = layer;
  placement.log2phy.assign(model.experts_per_layer, {});
  std::vector<std::pair<int, int>> gpu_expert;
  if (!stats.previous_gpus.empty()) {
    gpu_expert = replan_layer(stats, load, capacity, options.max_moves, cluster,
                              options.topology_aware, model.top_k)
                     .gpu_expert;
  } else {
    const SlotLayout layout = plan_fresh(load, stats, model, cluster, options, slots, capacity);
    for (int s = 0; s < layout.num_slots(); ++s) {
      gpu_expert.emplace_back(layout.slot_gpu[s], layout.slot_expert[s]);
    }
  }
  protect_against_domain_loss(gpu_expert, load, cluster.num_gpus(),
                              gpus_per_domain(options.fault_domain, cluster.gpus_per_node));
  placement.moves = count_moves(gpu_expert, stats);
  return finish(std::move(placement), std::move(gpu_expert));
}

// A previous placement's slots: GPUs and experts in range. It may lack experts (lost with a
// failed GPU): the re-plan gives them slots.
void validate_previous(const LayerStats& stats, const std::string& name, int num_experts,
                       int num_gpus) {
  const auto& gpus = stats.previous_gpus;
  const auto& experts = stats.previous_phy2log;
  if (gpus.size() != experts.size()) {
    fail(name + ".previous_gpus", "expected one GPU per previous slot (" +
                                      std::to_string(experts.size()) + "), got " +
                                      std::to_string(gpus.size()));
  }
  for (size_t s = 0; s < gpus.size(); ++s) {
    if (gpus[s] < 0 || gpus[s] >= num_gpus) {
      fail(name + ".previous_gpus", "GPU " + std::to_string(gpus[s]) + " out of range");
    }
    if (experts[s] < 0 || experts[s] >= num_experts) {
      fail(name + ".previous_phy2log", "expert id " + std::to_string(experts[s]) + " out of range");
    }
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

// Slots per MoE layer: E + redundant_experts, or with -1 the most that fit in memory, up to one per
// GPU (E <= G) or floor(E / G) + 1 per GPU (E > G: one spare slot per GPU for replicas, the ratio
// of DeepSeek-V3's 256 + 32 redundant experts on 32 GPUs).
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

// Runs work(0) .. work(count - 1) on the machine's cores (the layers of a plan are
// independent); rethrows the first exception in index order.
void in_parallel(size_t count, const std::function<void(size_t)>& work) {
  const size_t workers = std::max<size_t>(
      1, std::min<size_t>(count, std::max(1u, std::thread::hardware_concurrency())));
  std::vector<std::exception_ptr> errors(count);
  auto run = [&](size_t first) {
    for (size_t i = first; i < count; i += workers) {
      try {
        work(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> threads;
  for (size_t w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& thread : threads) thread.join();
  for (const auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
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
  if (n_group < 1 || n_group > experts_per_layer) {
    fail("model.n_group", "must be in [1, experts_per_layer]");
  }
  if (topk_group < 0 || topk_group > n_group) {
    fail("model.topk_group", "must be in [0, n_group] (0: unknown)");
  }
  if (expert_group.empty()) {
    if (experts_per_layer % n_group != 0) {
      fail("model.n_group", std::to_string(n_group) + " groups do not divide " +
                                std::to_string(experts_per_layer) +
                                " experts; give expert_group instead");
    }
    return;
  }
  if (static_cast<int>(expert_group.size()) != experts_per_layer) {
    fail("model.expert_group", "expected one group per expert (" +
                                   std::to_string(experts_per_layer) + "), got " +
                                   std::to_string(expert_group.size()));
  }
  std::vector<bool> used(n_group, false);
  for (int g : expert_group) {
    if (g < 0 || g >= n_group) {
      fail("model.expert_group", "group " + std::to_string(g) + " out of [0, n_group)");
    }
    used[g] = true;
  }
  if (std::find(used.begin(), used.end(), false) != used.end()) {
    fail("model.expert_group", "every group in [0, n_group) needs an expert");
  }
}

std::vector<int> PlacementModel::group_of_expert() const {
  if (!expert_group.empty()) return expert_group;
  std::vector<int> group(experts_per_layer);
  for (int e = 0; e < experts_per_layer; ++e) group[e] = e / (experts_per_layer / n_group);
  return group;
}

LayerMetrics evaluate_layer(const LayerPlacement& layer, const ClusterSpec& cluster,
                            const LayerStats& stats, int top_k) {
  const int num_experts = static_cast<int>(layer.replica_count.size());
  const int num_gpus = cluster.num_gpus(), num_nodes = cluster.num_nodes;
  const std::vector<double> load = resolve_loads(stats, num_experts);
  SlotLayout layout(num_gpus);
  for (size_t s = 0; s < layer.phy2log.size(); ++s) {
    const int e = layer.phy2log[s];
    layout.add(e, load[e] / layer.replica_count[e], layer.gpus[s]);
  }
  LayerMetrics metrics;
  const auto hosting = std::count_if(layout.slots_of_gpu.begin(), layout.slots_of_gpu.end(),
                                     [](const auto& slots) { return !slots.empty(); });
  metrics.max_gpu_load = layout.max_gpu_load();
  metrics.mean_gpu_load =
      hosting ? std::accumulate(layout.gpu_load.begin(), layout.gpu_load.end(), 0.0) / hosting
              : 0.0;
  metrics.max_nvlink_load = metrics.max_gpu_load * (1.0 - 1.0 / num_gpus);
  if (num_nodes < 2) return metrics;

  const std::vector<double> hit =
      NodeHits(layout, layer.replica_count, load, cluster, stats.coactivation, top_k).hits();
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
  std::vector<int64_t> first_extra(moe_layers.size());
  for (size_t i = 0; i < moe_layers.size(); ++i) {
    first_extra[i] = offset;
    offset = sequential ? offset + model.experts_per_layer : (offset + slots % num_gpus) % num_gpus;
  }
  auto plan_layer = [&](size_t i) {
    const LayerStats& layer_stats = stats.empty() ? kNoStats : stats[i];
    LayerPlacement& layer = plan.layers[moe_layers[i]];
    if (sequential) {
      layer.layer = moe_layers[i];
      layer.replica_count.assign(model.experts_per_layer, 1);
      for (int e = 0; e < model.experts_per_layer; ++e) {
        layer.phy2log.push_back(e);
        layer.log2phy.push_back({e});
        layer.gpus.push_back(static_cast<int>((first_extra[i] + e) % num_gpus));
      }
    } else {
      layer = plan_moe_layer(moe_layers[i], layer_stats, model, cluster, options, slots,
                             layer_capacity(slots, num_gpus, first_extra[i]));
    }
    layer.metrics = evaluate_layer(layer, cluster, layer_stats, model.top_k);
  };
  in_parallel(moe_layers.size(), plan_layer);
  for (int l : moe_layers) {
    for (int gpu : plan.layers[l].gpus) plan.gpu_memory_used[gpu] += model.bytes_per_expert;
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
