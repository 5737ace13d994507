#include "core/replan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <tuple>

#include "core/placement.h"
#include "core/tests/placement_test_util.h"

namespace moe_ep::core {
namespace {

using namespace testing;

TEST(Replan, MovesStayWithinTheBudgetAndKeepTheInvariants) {
  // Several slots per GPU (64 experts, 8 GPUs) and one slot per GPU (64 experts, 96 GPUs).
  for (const ClusterSpec& cluster : {make_cluster(1, 8), make_cluster(12, 8)}) {
    const PlacementModel model = small_model(2, 64);
    const Placement before = plan_placement(model, cluster, zipf_stats(2, 64, 1.2), {});
    auto shifted = zipf_stats(2, 64, 1.2);
    for (auto& layer : shifted)
      std::rotate(layer.expert_load.begin(), layer.expert_load.begin() + 5,
                  layer.expert_load.end());
    const Placement fresh = plan_placement(model, cluster, shifted, {});
    const auto stats = replan_stats(before, shifted);
    double kept_max = 0;
    for (int budget : {0, 2, 4, 8, 16, 64, -1}) {
      PlanOptions options;
      options.max_moves = budget;
      const Placement after = plan_placement(model, cluster, stats, options);
      EXPECT_EQ(after.gpu_memory_used, fresh.gpu_memory_used) << "same slots per GPU";
      double max_load = 0;
      for (int l = 1; l <= 2; ++l) {
        const LayerPlacement& layer = after.layers[l];
        expect_consistent(layer, cluster.num_gpus(), 64);
        EXPECT_EQ(layer.moves, count_moves(before.layers[l], layer));
        if (budget >= 0) EXPECT_LE(layer.moves, budget);
        if (cluster.num_gpus() >= 64) {
          EXPECT_EQ(std::set<int>(layer.gpus.begin(), layer.gpus.end()).size(), layer.gpus.size());
        }
        max_load = std::max(max_load, layer.metrics.max_gpu_load);
      }
      if (budget == 0) kept_max = max_load;
      EXPECT_LE(max_load, kept_max * (1 + 1e-12)) << budget;
      if (budget == -1) {
        for (int l = 1; l <= 2; ++l) {
          EXPECT_LE(after.layers[l].metrics.max_gpu_load,
                    fresh.layers[l].metrics.max_gpu_load * 1.02);
          EXPECT_LT(after.layers[l].moves, count_moves(before.layers[l], fresh.layers[l]));
        }
      }
    }
  }
}

TEST(Replan, NoMovesWhenThePreviousPlacementIsAlreadyOptimal) {
  for (const ClusterSpec& cluster : {make_cluster(1, 8), make_cluster(12, 8)}) {
    const PlacementModel model = small_model(2, 64);
    const auto stats = zipf_stats(2, 64, 1.0);
    const Placement before = plan_placement(model, cluster, stats, {});
    const Placement after = plan_placement(model, cluster, replan_stats(before, stats), {});
    for (int l = 1; l <= 2; ++l) {
      EXPECT_EQ(after.layers[l].moves, 0);
      EXPECT_EQ(after.layers[l].gpus, before.layers[l].gpus);
      EXPECT_EQ(after.layers[l].phy2log, before.layers[l].phy2log);
    }
  }
}

TEST(Replan, MoreSlotsForceOneMoveEach) {
  // From 64 experts without replicas (8 per GPU, contiguous) to 72 slots: the 8 new slots
  // are copies whatever the budget, and they go to the hottest experts.
  const PlacementModel model = small_model(1, 64);
  const ClusterSpec cluster = make_cluster(1, 8);
  auto stats = zipf_stats(1, 64, 1.5);
  for (int e = 0; e < 64; ++e) {
    stats[0].previous_gpus.push_back(e / 8);
    stats[0].previous_phy2log.push_back(e);
  }
  PlanOptions none;
  none.max_moves = 0;
  const LayerPlacement forced = plan_placement(model, cluster, stats, none).layers[1];
  expect_consistent(forced, 8, 64);
  EXPECT_EQ(forced.moves, 8);
  EXPECT_EQ(forced.phy2log.size(), 72u);
  const LayerPlacement free = plan_placement(model, cluster, stats, {}).layers[1];
  expect_consistent(free, 8, 64);
  EXPECT_GT(free.moves, 8);
  EXPECT_LT(free.metrics.max_gpu_load, forced.metrics.max_gpu_load);
  const LayerPlacement fresh = plan_placement(model, cluster, zipf_stats(1, 64, 1.5), {}).layers[1];
  EXPECT_LE(free.metrics.max_gpu_load, fresh.metrics.max_gpu_load * 1.02);
}

TEST(Replan, Deterministic) {
  const PlacementModel model = small_model(2, 64);
  const ClusterSpec cluster = make_cluster(2, 8);
  const Placement before = plan_placement(model, cluster, zipf_stats(2, 64, 0.8), {});
  const auto stats = replan_stats(before, zipf_stats(2, 64, 1.4));
  PlanOptions options;
  options.max_moves = 10;
  const Placement a = plan_placement(model, cluster, stats, options);
  const Placement b = plan_placement(model, cluster, stats, options);
  for (int l = 1; l <= 2; ++l) {
    EXPECT_EQ(a.layers[l].gpus, b.layers[l].gpus);
    EXPECT_EQ(a.layers[l].phy2log, b.layers[l].phy2log);
    EXPECT_EQ(a.layers[l].moves, b.layers[l].moves);
  }
}

// The busiest node's expected copies (from the samples, else its load) and the GPU maximum
// of a re-planned layer, computed here from the slot maps.
std::pair<double, double> gpu_and_link(const LayerPlacement& layer, const LayerStats& stats,
                                       const ClusterSpec& cluster, int top_k) {
  const auto gpu = gpu_loads(layer, stats.expert_load, cluster.num_gpus());
  std::vector<double> node(cluster.num_nodes, 0.0);
  if (stats.coactivation.empty()) {
    for (int g = 0; g < cluster.num_gpus(); ++g) node[cluster.node_of(g)] += gpu[g];
  } else {
    node = sampled_node_hits(layer, stats.coactivation, top_k, cluster);
  }
  return {*std::max_element(gpu.begin(), gpu.end()), *std::max_element(node.begin(), node.end())};
}

TEST(Replan, ALargerBudgetNeverGivesAWorsePlan) {
  // Several slots per GPU on 4 nodes, loads drifted, with and without samples: the GPU
  // maximum never rises with the budget, and at an equal GPU maximum neither does the link.
  const ClusterSpec cluster = make_cluster(4, 4);
  const PlacementModel model = small_model(1, 64, 4);
  const Placement before = plan_placement(model, cluster, zipf_stats(1, 64, 1.0), {});
  for (bool samples : {false, true}) {
    std::vector<LayerStats> stats(1);
    stats[0].expert_load = lognormal(64, 1.0, 7);
    if (samples) stats[0].coactivation = topic_samples(64, 8, 4, 2000, 0.2, 3);
    stats = replan_stats(before, stats);
    std::pair<double, double> last{1e300, 1e300};
    for (int budget : {0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, -1}) {
      PlanOptions options;
      options.max_moves = budget;
      const LayerPlacement layer = plan_placement(model, cluster, stats, options).layers[1];
      expect_consistent(layer, cluster.num_gpus(), 64);
      EXPECT_EQ(layer.moves, count_moves(before.layers[1], layer));
      if (budget >= 0) EXPECT_LE(layer.moves, budget);
      const auto now = gpu_and_link(layer, stats[0], cluster, model.top_k);
      const double tolerance = 1e-9 * last.first;
      EXPECT_LE(now.first, last.first + tolerance) << "budget " << budget;
      if (std::abs(now.first - last.first) <= tolerance) {
        EXPECT_LE(now.second, last.second * (1 + 1e-12)) << "budget " << budget;
      }
      last = now;
    }
  }
}

TEST(Replan, TheNodeStepLowersTheLinkLoad) {
  // The previous placement is balanced per GPU but not per node (planned without the node
  // step: the packing puts the heaviest slots on the first GPUs); re-planning on the same
  // loads keeps the GPU maximum and lowers the busiest node's load.
  const ClusterSpec cluster = make_cluster(4, 8);
  const PlacementModel model = small_model(1, 64);
  const auto stats = zipf_stats(1, 64, 1.2);
  PlanOptions blind;
  blind.topology_aware = false;
  const Placement before = plan_placement(model, cluster, stats, blind);
  const LayerPlacement after =
      plan_placement(model, cluster, replan_stats(before, stats), {}).layers[1];
  expect_consistent(after, 32, 64, /*doubles=*/true);
  const auto old_figures = gpu_and_link(before.layers[1], stats[0], cluster, 2);
  const auto new_figures = gpu_and_link(after, stats[0], cluster, 2);
  EXPECT_LE(new_figures.first, old_figures.first * (1 + 1e-12));
  EXPECT_LT(new_figures.second, 0.95 * old_figures.second);
  EXPECT_GT(after.moves, 0);
  // Without topology awareness the re-plan keeps the nodes as they were.
  const LayerPlacement kept =
      plan_placement(model, cluster, replan_stats(before, stats), blind).layers[1];
  EXPECT_EQ(kept.moves, 0);
}

TEST(Replan, FromAPreviousPlacementWithTwoReplicasOnAGpu) {
  // GPU 0 holds expert 0 twice; the re-plan keeps the slot count and the invariants.
  const PlacementModel model = small_model(1, 6);
  const ClusterSpec cluster = make_cluster(1, 4);
  std::vector<LayerStats> stats(1);
  stats[0].expert_load = {5, 1, 1, 1, 1, 1};
  stats[0].previous_gpus = {0, 0, 1, 1, 2, 2, 3, 3};
  stats[0].previous_phy2log = {0, 0, 1, 2, 3, 4, 5, 1};
  PlanOptions options;
  options.redundant_experts = 2;
  const LayerPlacement layer = plan_placement(model, cluster, stats, options).layers[1];
  expect_consistent(layer, 4, 6, /*doubles=*/true);
  EXPECT_EQ(layer.phy2log.size(), 8u);
  LayerPlacement before;
  before.gpus = stats[0].previous_gpus;
  before.phy2log = stats[0].previous_phy2log;
  EXPECT_EQ(layer.moves, count_moves(before, layer));
  // Expert 0 carries half the load: it ends with more than the two replicas it had.
  EXPECT_GT(layer.replica_count[0], 2);
}

TEST(Replan, BadPreviousPlacementsNameTheField) {
  const PlacementModel model = small_model(1, 4);
  const ClusterSpec cluster = make_cluster(1, 4);
  auto with = [](std::vector<int> gpus, std::vector<int> experts) {
    std::vector<LayerStats> stats(1);
    stats[0].previous_gpus = std::move(gpus);
    stats[0].previous_phy2log = std::move(experts);
    return stats;
  };
  expect_error(model, cluster, with({0, 1, 2}, {0, 1, 2, 3}), {}, "stats[0].previous_gpus");
  expect_error(model, cluster, with({0, 1, 2, 4}, {0, 1, 2, 3}), {}, "stats[0].previous_gpus");
  expect_error(model, cluster, with({0, 1, 2, 3}, {0, 1, 2, 4}), {}, "stats[0].previous_phy2log");
  // A previous placement may lack an expert (its GPU failed): not an error, it gets a slot
  // (test_fault_domains.cpp).
  PlanOptions greedy;
  greedy.policy = Policy::kGreedy;
  expect_error(model, cluster, with({0, 1, 2, 3}, {0, 1, 2, 3}), greedy, "stats[0].previous_gpus");
  PlanOptions negative;
  negative.max_moves = -2;
  expect_error(model, cluster, {}, negative, "max_moves");
}

}  // namespace
}  // namespace moe_ep::core
