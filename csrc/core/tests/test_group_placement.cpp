#include "core/group_placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <vector>

#include "core/placement.h"
#include "core/tests/placement_test_util.h"

namespace moe_ep::core {
namespace {

using namespace testing;

// DeepSeek-V3's routing shape: 256 experts in 8 groups of 32 consecutive ids, top-8 from 4.
PlacementModel grouped_model(int layers) {
  PlacementModel model = small_model(layers, 256, 8);
  model.n_group = 8;
  model.topk_group = 4;
  return model;
}

// Rows of top_k experts from topk_group random groups, experts drawn by load within them.
std::vector<int> group_limited_samples(const std::vector<double>& load, int groups, int topk_group,
                                       int top_k, int rows, unsigned seed) {
  std::mt19937 rng(seed);
  const int per_group = static_cast<int>(load.size()) / groups;
  std::vector<int> samples;
  for (int r = 0; r < rows; ++r) {
    std::vector<int> order(groups);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<double> weight;
    std::vector<int> candidates;
    for (int i = 0; i < topk_group; ++i) {
      for (int e = order[i] * per_group; e < (order[i] + 1) * per_group; ++e) {
        candidates.push_back(e);
        weight.push_back(load[e]);
      }
    }
    std::set<int> chosen;
    while (static_cast<int>(chosen.size()) < top_k) {
      std::discrete_distribution<int> pick(weight.begin(), weight.end());
      const int i = pick(rng);
      chosen.insert(candidates[i]);
      weight[i] = 0;
    }
    samples.insert(samples.end(), chosen.begin(), chosen.end());
  }
  return samples;
}

// Node loads when group g goes where EPLB's packing of groups puts it: heaviest group first
// onto the least loaded node that has room (written here from EPLB's description).
std::vector<double> eplb_group_node_loads(const std::vector<double>& load, int groups, int nodes) {
  const int per_group = static_cast<int>(load.size()) / groups;
  std::vector<double> group_load(groups, 0.0);
  for (size_t e = 0; e < load.size(); ++e) group_load[e / per_group] += load[e];
  std::vector<int> order(groups);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return group_load[a] > group_load[b]; });
  std::vector<double> node_load(nodes, 0.0);
  std::vector<int> taken(nodes, 0);
  for (int g : order) {
    int best = -1;
    for (int n = 0; n < nodes; ++n) {
      if (taken[n] < groups / nodes && (best < 0 || node_load[n] < node_load[best])) best = n;
    }
    node_load[best] += group_load[g];
    ++taken[best];
  }
  return node_load;
}

TEST(GroupPlacement, EveryGroupWithItsReplicasOnOneNode) {
  const PlacementModel model = grouped_model(2);
  for (int nodes : {2, 4, 8}) {
    const ClusterSpec cluster = make_cluster(nodes, 8);
    PlanOptions options;
    options.redundant_experts = 32;
    std::vector<LayerStats> stats(2);
    stats[0].expert_load = lognormal(256, 1.0, nodes);
    stats[1].expert_load = zipf(256, 1.0, nodes);
    const Placement plan = plan_placement(model, cluster, stats, options);
    for (int l = 1; l <= 2; ++l) {
      const LayerPlacement& layer = plan.layers[l];
      expect_consistent(layer, cluster.num_gpus(), 256, /*doubles=*/true);
      std::vector<std::set<int>> nodes_of_group(8);
      for (size_t s = 0; s < layer.gpus.size(); ++s) {
        nodes_of_group[layer.phy2log[s] / 32].insert(cluster.node_of(layer.gpus[s]));
      }
      std::vector<int> groups_on_node(nodes, 0);
      for (const auto& set : nodes_of_group) {
        ASSERT_EQ(set.size(), 1u) << "a group spans nodes";
        ++groups_on_node[*set.begin()];
      }
      for (int count : groups_on_node) EXPECT_EQ(count, 8 / nodes);
      // The busiest node carries no more than under EPLB's packing of groups.
      const auto& load = stats[l - 1].expert_load;
      const auto gpu = gpu_loads(layer, load, cluster.num_gpus());
      std::vector<double> node(nodes, 0.0);
      for (int g = 0; g < cluster.num_gpus(); ++g) node[cluster.node_of(g)] += gpu[g];
      const auto eplb = eplb_group_node_loads(load, 8, nodes);
      EXPECT_LE(*std::max_element(node.begin(), node.end()),
                *std::max_element(eplb.begin(), eplb.end()) * (1 + 1e-12));
    }
  }
}

TEST(GroupPlacement, SamplesChooseTheGroupsToPair) {
  // Four nodes, two groups each: with group-limited samples, the busiest node receives no
  // more copies than with EPLB's pairing of groups (whole groups either way, so a node's
  // copies are the sampled tokens that touch one of its groups).
  const PlacementModel model = grouped_model(1);
  const ClusterSpec cluster = make_cluster(4, 8);
  for (unsigned seed = 0; seed < 4; ++seed) {
    std::vector<LayerStats> stats(1);
    stats[0].expert_load = lognormal(256, 1.2, 40 + seed);
    stats[0].coactivation = group_limited_samples(stats[0].expert_load, 8, 4, 8, 1500, seed);
    const LayerPlacement with = plan_placement(model, cluster, stats, {}).layers[1];
    stats[0].coactivation.clear();
    const LayerPlacement without = plan_placement(model, cluster, stats, {}).layers[1];
    const auto samples = group_limited_samples(stats[0].expert_load, 8, 4, 8, 1500, seed);
    const auto hits_with = sampled_node_hits(with, samples, 8, cluster);
    const auto hits_without = sampled_node_hits(without, samples, 8, cluster);
    EXPECT_LE(*std::max_element(hits_with.begin(), hits_with.end()),
              *std::max_element(hits_without.begin(), hits_without.end()) * (1 + 1e-9));
    const auto gpu_with = gpu_loads(with, stats[0].expert_load, 32);
    const auto gpu_without = gpu_loads(without, stats[0].expert_load, 32);
    EXPECT_LE(*std::max_element(gpu_with.begin(), gpu_with.end()),
              *std::max_element(gpu_without.begin(), gpu_without.end()) * (1 + 1e-9));
  }
}

TEST(GroupPlacement, GroupsSplitWhereTheNodesDoNotDivideThem) {
  // 16 nodes for 8 groups, or routing that may use every group: the group-free layout.
  PlacementModel model = grouped_model(1);
  const auto stats = zipf_stats(1, 256, 1.0);
  const Placement many = plan_placement(model, make_cluster(16, 8), stats, {});
  model.n_group = 1;
  model.topk_group = 0;
  const Placement plain = plan_placement(model, make_cluster(16, 8), stats, {});
  EXPECT_EQ(many.layers[1].gpus, plain.layers[1].gpus);
  EXPECT_EQ(many.layers[1].phy2log, plain.layers[1].phy2log);

  PlacementModel unlimited = grouped_model(1);
  unlimited.topk_group = 8;
  model.n_group = 1;
  const ClusterSpec four = make_cluster(4, 8);
  EXPECT_EQ(plan_placement(unlimited, four, stats, {}).layers[1].phy2log,
            plan_placement(model, four, stats, {}).layers[1].phy2log);
}

TEST(GroupPlacement, AGeneralExpertToGroupMap) {
  // Groups of uneven size, given as a map: still whole on nodes.
  PlacementModel model = small_model(1, 24, 4);
  model.n_group = 4;
  model.expert_group = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3};
  const ClusterSpec cluster = make_cluster(2, 4);
  std::vector<LayerStats> stats(1);
  stats[0].expert_load = lognormal(24, 0.8, 9);
  PlanOptions options;
  options.redundant_experts = 8;
  const LayerPlacement layer = plan_placement(model, cluster, stats, options).layers[1];
  expect_consistent(layer, 8, 24, /*doubles=*/true);
  std::vector<std::set<int>> nodes_of_group(4);
  for (size_t s = 0; s < layer.gpus.size(); ++s) {
    nodes_of_group[model.expert_group[layer.phy2log[s]]].insert(cluster.node_of(layer.gpus[s]));
  }
  for (const auto& set : nodes_of_group) EXPECT_EQ(set.size(), 1u);
}

}  // namespace
}  // namespace moe_ep::core
