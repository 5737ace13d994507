#include "core/group_placement.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <tuple>
#include <utility>

#include "core/balanced_packing.h"
#include "core/placement_common.h"

namespace moe_ep::core {
namespace {

struct NodePlan {
  std::vector<int> experts;  // local expert -> expert
  SlotLayout layout;         // local experts on the node's GPUs (local numbers)
};

class GroupsOnNodes {
 public:
  GroupsOnNodes(const std::vector<double>& load, const std::vector<int>& expert_group,
                int num_groups, const std::vector<int>& capacity, const ClusterSpec& cluster,
                const std::vector<int>& samples, int top_k)
      : load_(load),
        capacity_(capacity),
        cluster_(cluster),
        members_(num_groups),
        group_load_(num_groups, 0.0) {
    for (int e = 0; e < static_cast<int>(load.size()); ++e) {
      members_[expert_group[e]].push_back(e);
      group_load_[expert_group[e]] += load[e];
    }
    if (samples.empty()) return;
    // Per sample the distinct groups it touches; every sample stands for the same tokens.
    const int num_samples = static_cast<int>(samples.size() / top_k);
    sample_start_.push_back(0);
    for (int s = 0; s < num_samples; ++s) {
      const size_t first = sample_groups_.size();
      for (int i = 0; i < top_k; ++i) {
        const int g = expert_group[samples[static_cast<size_t>(s) * top_k + i]];
        if (std::find(sample_groups_.begin() + first, sample_groups_.end(), g) ==
            sample_groups_.end()) {
          sample_groups_.push_back(g);
        }
      }
      sample_start_.push_back(static_cast<int>(sample_groups_.size()));
    }
    tokens_per_sample_ =
        std::accumulate(load.begin(), load.end(), 0.0) / (static_cast<double>(num_samples) * top_k);
  }

  // EPLB's packing of groups to nodes (step 1); every node's groups in the order they came.
  std::vector<std::vector<int>> initial_groups() const {
    const int num_groups = static_cast<int>(members_.size()), num_nodes = cluster_.num_nodes;
    const size_t per_node = num_groups / num_nodes;
    std::vector<int> order(num_groups);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return group_load_[a] > group_load_[b]; });
    std::vector<std::vector<int>> groups(num_nodes);
    std::vector<double> node_load(num_nodes, 0.0);
    for (int g : order) {
      int target = -1;
      for (int n = 0; n < num_nodes; ++n) {
        if (groups[n].size() < per_node && (target < 0 || node_load[n] < node_load[target])) {
          target = n;
        }
      }
      groups[target].push_back(g);
      node_load[target] += group_load_[g];
    }
    return groups;
  }

  // Step 2 for one node; nothing when its experts do not fit its slots.
  std::optional<NodePlan> plan_node(int node, const std::vector<int>& groups) const {
    NodePlan plan;
    for (int g : groups)
      plan.experts.insert(plan.experts.end(), members_[g].begin(), members_[g].end());
    const auto first = capacity_.begin() + static_cast<size_t>(node) * cluster_.gpus_per_node;
    const std::vector<int> capacity(first, first + cluster_.gpus_per_node);
    const int64_t slots = std::accumulate(capacity.begin(), capacity.end(), int64_t{0});
    const int64_t experts = static_cast<int64_t>(plan.experts.size());
    if (experts == 0 || experts > slots) return std::nullopt;
    std::vector<double> load(plan.experts.size());
    for (size_t i = 0; i < plan.experts.size(); ++i) load[i] = load_[plan.experts[i]];
    plan.layout = balanced_packing(load, slots, capacity);
    return plan;
  }

  bool has_samples() const { return !sample_start_.empty(); }

  // Sampled token copies a node holding `groups` receives (step 3).
  double copies(const std::vector<int>& groups) const {
    int touched = 0;
    for (size_t s = 0; s + 1 < sample_start_.size(); ++s) {
      for (int i = sample_start_[s]; i < sample_start_[s + 1]; ++i) {
        if (std::find(groups.begin(), groups.end(), sample_groups_[i]) != groups.end()) {
          ++touched;
          break;
        }
      }
    }
    return tokens_per_sample_ * touched;
  }

 private:
  const std::vector<double>& load_;
  const std::vector<int>& capacity_;
  const ClusterSpec& cluster_;
  std::vector<std::vector<int>> members_;  // group -> its experts, ascending
  std::vector<double> group_load_;
  std::vector<int> sample_groups_, sample_start_;
  double tokens_per_sample_ = 0.0;
};

}  // namespace

std::optional<SlotLayout> place_groups_on_nodes(const std::vector<double>& load,
                                                const std::vector<int>& expert_group,
                                                int num_groups, const std::vector<int>& capacity,
                                                const ClusterSpec& cluster,
                                                const std::vector<int>& samples, int top_k) {
  const int num_nodes = cluster.num_nodes;
  const GroupsOnNodes model(load, expert_group, num_groups, capacity, cluster, samples, top_k);
  std::vector<std::vector<int>> groups = model.initial_groups();
  std::vector<NodePlan> plans;
  std::vector<double> copies(num_nodes);
  for (int n = 0; n < num_nodes; ++n) {
    auto plan = model.plan_node(n, groups[n]);
    if (!plan) return std::nullopt;
    plans.push_back(std::move(*plan));
    if (model.has_samples()) copies[n] = model.copies(groups[n]);
  }
  auto gpu_max = [&] {
    double most = 0.0;
    for (const auto& plan : plans) most = std::max(most, plan.layout.max_gpu_load());
    return most;
  };

  // Step 3. Candidates: (the larger of the two nodes' copies after, light node, i, j).
  std::vector<std::tuple<double, int, int, int, double, double>> candidates;
  for (int iteration = 0; model.has_samples() && iteration < 4 * num_groups; ++iteration) {
    const int heavy =
        static_cast<int>(std::max_element(copies.begin(), copies.end()) - copies.begin());
    const double top = copies[heavy];
    candidates.clear();
    for (int light = 0; light < num_nodes; ++light) {
      if (light == heavy) continue;
      for (size_t i = 0; i < groups[heavy].size(); ++i) {
        for (size_t j = 0; j < groups[light].size(); ++j) {
          std::vector<int> a = groups[heavy], b = groups[light];
          std::swap(a[i], b[j]);
          const double after_a = model.copies(a), after_b = model.copies(b);
          const double worst = std::max(after_a, after_b);
          if (worst < top - improvement_epsilon(top)) {
            candidates.emplace_back(worst, light, static_cast<int>(i), static_cast<int>(j), after_a,
                                    after_b);
          }
        }
      }
    }
    std::sort(candidates.begin(), candidates.end());
    const double limit = gpu_max();
    bool swapped = false;
    for (const auto& [worst, light, i, j, after_a, after_b] : candidates) {
      std::vector<int> a = groups[heavy], b = groups[light];
      std::swap(a[i], b[j]);
      auto plan_a = model.plan_node(heavy, a), plan_b = model.plan_node(light, b);
      if (!plan_a || !plan_b || plan_a->layout.max_gpu_load() > limit ||
          plan_b->layout.max_gpu_load() > limit) {
        continue;
      }
      groups[heavy] = std::move(a);
      groups[light] = std::move(b);
      plans[heavy] = std::move(*plan_a);
      plans[light] = std::move(*plan_b);
      copies[heavy] = after_a;
      copies[light] = after_b;
      swapped = true;
      break;
    }
    if (!swapped) break;
  }

  SlotLayout layout(cluster.num_gpus());
  for (int n = 0; n < num_nodes; ++n) {
    const SlotLayout& local = plans[n].layout;
    for (int i = 0; i < local.num_gpus(); ++i) {
      for (int slot : local.slots_of_gpu[i]) {
        layout.add(plans[n].experts[local.slot_expert[slot]], local.slot_load[slot],
                   n * cluster.gpus_per_node + i);
      }
    }
  }
  return layout;
}

}  // namespace moe_ep::core
