#include "core/placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <string>

namespace moe_ep::core {
namespace {

constexpr double kExpertBytes = 3.0 * 7168 * 2048 * 2;  // gated BF16 expert

PlacementModel seeds_model() {
  PlacementModel model;
  model.bytes_per_expert = gated_ffn_bytes(7168, 2048, 2);
  model.dense_layer_bytes = gated_ffn_bytes(7168, 2048, 2);
  return model;
}

ClusterSpec make_cluster(int nodes, int gpus_per_node, double memory = 80e9) {
  ClusterSpec cluster;
  cluster.num_nodes = nodes;
  cluster.gpus_per_node = gpus_per_node;
  cluster.gpu_memory_bytes = memory;
  return cluster;
}

std::vector<double> zipf(int experts, double skew, int shift) {
  std::vector<double> load(experts);
  for (int e = 0; e < experts; ++e) {
    load[(e * 7 + shift) % experts] = 1000.0 / std::pow(e + 1.0, skew);
  }
  return load;
}

std::vector<LayerStats> zipf_stats(int layers, int experts, double skew) {
  std::vector<LayerStats> stats(layers);
  for (int l = 0; l < layers; ++l) stats[l].expert_load = zipf(experts, skew, l);
  return stats;
}

PlacementModel small_model(int layers, int experts, int top_k = 2) {
  PlacementModel model;
  model.num_layers = layers + 1;
  model.dense_layers = {0};
  model.experts_per_layer = experts;
  model.top_k = top_k;
  model.bytes_per_expert = kExpertBytes;
  model.dense_layer_bytes = 1e9;
  return model;
}

void expect_consistent(const LayerPlacement& layer, int num_gpus, int experts) {
  ASSERT_EQ(layer.phy2log.size(), layer.gpus.size());
  ASSERT_EQ(static_cast<int>(layer.log2phy.size()), experts);
  int total = 0;
  for (int e = 0; e < experts; ++e) {
    EXPECT_GE(layer.replica_count[e], 1) << "expert " << e;
    EXPECT_EQ(static_cast<int>(layer.log2phy[e].size()), layer.replica_count[e]);
    std::set<int> gpus;
    for (int slot : layer.log2phy[e]) {
      EXPECT_EQ(layer.phy2log[slot], e);
      gpus.insert(layer.gpus[slot]);
    }
    EXPECT_EQ(gpus.size(), layer.log2phy[e].size()) << "two replicas of one expert on a GPU";
    total += layer.replica_count[e];
  }
  EXPECT_EQ(total, static_cast<int>(layer.phy2log.size()));
  for (size_t s = 0; s < layer.gpus.size(); ++s) {
    EXPECT_GE(layer.gpus[s], 0);
    EXPECT_LT(layer.gpus[s], num_gpus);
    if (s > 0) EXPECT_LE(layer.gpus[s - 1], layer.gpus[s]) << "slots are ordered by GPU";
  }
}

TEST(Placement, GatedFfnBytes) {
  EXPECT_DOUBLE_EQ(gated_ffn_bytes(7168, 2048, 2), 88080384.0);
  EXPECT_THROW(gated_ffn_bytes(0, 2048, 2), std::invalid_argument);
}

TEST(Placement, SeedsLayoutIsReproducedExactly) {
  PlanOptions options;
  options.policy = Policy::kSequential;
  const Placement plan = plan_placement(seeds_model(), make_cluster(488, 8, 64e9), {}, options);
  ASSERT_EQ(plan.layers.size(), 61u);
  for (int l = 3; l <= 60; ++l) {
    const auto& layer = plan.layers[l];
    EXPECT_FALSE(layer.dense);
    ASSERT_EQ(layer.gpus.size(), 64u);
    for (int e = 0; e < 64; ++e) {
      EXPECT_EQ(layer.gpus[e], (l - 3) * 64 + e);
      EXPECT_EQ(layer.phy2log[e], e);
    }
  }
  for (int d = 0; d < 3; ++d) {
    EXPECT_TRUE(plan.layers[d].dense);
    EXPECT_EQ(plan.layers[d].gpus, std::vector<int>{3712 + d});
  }
  EXPECT_EQ(plan.layers[60].gpus[63] / 8, 463);
  const int used =
      static_cast<int>(std::count_if(plan.gpu_memory_used.begin(), plan.gpu_memory_used.end(),
                                     [](double bytes) { return bytes > 0; }));
  EXPECT_EQ(used, 3715);
  EXPECT_EQ(3904 - used, 189);
  EXPECT_DOUBLE_EQ(plan.gpu_memory_used[0], kExpertBytes);
}

TEST(Placement, SeedsLayoutOnFewerGpus) {
  PlanOptions options;
  options.policy = Policy::kSequential;
  for (int gpus : {16, 64, 512}) {
    const Placement plan =
        plan_placement(seeds_model(), make_cluster(gpus / 8, 8, 64e9), {}, options);
    for (int l = 3; l <= 60; ++l) {
      for (int e = 0; e < 64; ++e) {
        EXPECT_EQ(plan.layers[l].gpus[e], ((l - 3) * 64 + e) % gpus);
      }
    }
    // Every GPU hosts floor or ceil of 3712 / G experts.
    for (int g = 3; g < gpus; ++g) {
      const double experts = plan.gpu_memory_used[g] / kExpertBytes;
      EXPECT_GE(experts, 3712 / gpus) << g;
      EXPECT_LE(experts, (3712 + gpus - 1) / gpus) << g;
    }
    EXPECT_EQ(plan.layers[0].gpus, std::vector<int>{3712 % gpus});
  }
}

TEST(Placement, OneExpertOfALayerPerGpuWithReplicasOfTheHottest) {
  const PlacementModel model = small_model(4, 64);
  const ClusterSpec cluster = make_cluster(12, 8);  // 96 GPUs: 32 spares per layer
  const auto stats = zipf_stats(4, 64, 1.2);
  const Placement plan = plan_placement(model, cluster, stats, {});
  for (int l = 1; l <= 4; ++l) {
    const auto& layer = plan.layers[l];
    expect_consistent(layer, 96, 64);
    EXPECT_EQ(layer.phy2log.size(), 96u);
    EXPECT_EQ(std::set<int>(layer.gpus.begin(), layer.gpus.end()).size(), 96u);
    // The hottest expert holds the most replicas.
    const auto& load = stats[l - 1].expert_load;
    const int hottest = static_cast<int>(std::max_element(load.begin(), load.end()) - load.begin());
    EXPECT_EQ(layer.replica_count[hottest],
              *std::max_element(layer.replica_count.begin(), layer.replica_count.end()));
  }
  EXPECT_TRUE(plan.layers[0].dense);
  EXPECT_EQ(plan.layers[0].gpus.size(), 96u);
}

TEST(Placement, ManyExpertsPerGpuBalanceLoadAndMemory) {
  const PlacementModel model = small_model(3, 256, 8);
  const ClusterSpec cluster = make_cluster(2, 8);  // 16 GPUs, 16 + 1 slots per GPU per layer
  const Placement plan = plan_placement(model, cluster, zipf_stats(3, 256, 1.0), {});
  for (int l = 1; l <= 3; ++l) {
    expect_consistent(plan.layers[l], 16, 256);
    EXPECT_LT(plan.layers[l].metrics.max_gpu_load / plan.layers[l].metrics.mean_gpu_load, 1.05);
  }
  for (double bytes : plan.gpu_memory_used) {
    EXPECT_DOUBLE_EQ(bytes, 3 * 17 * kExpertBytes + 1e9);
  }
}

TEST(Placement, MemoryBudgetLimitsReplicasAndRotatesExtraSlots) {
  const PlacementModel model = small_model(6, 64);
  // 24 GPUs, 6 layers of 64 experts: 16 slots per GPU without replicas, 18 with three per
  // layer; the budget holds 17, so only part of the spare slots can take replicas.
  ClusterSpec cluster = make_cluster(3, 8, 17 * kExpertBytes + 1e9 + 1e6);
  const Placement plan = plan_placement(model, cluster, zipf_stats(6, 64, 1.0), {});
  for (int l = 1; l <= 6; ++l) expect_consistent(plan.layers[l], 24, 64);
  const double budget = cluster.gpu_memory_bytes;
  for (double bytes : plan.gpu_memory_used) EXPECT_LE(bytes, budget);
  const size_t slots = plan.layers[1].phy2log.size();
  EXPECT_GT(slots, 64u);  // some replicas fit
  EXPECT_LT(slots, 72u);  // but not a full third slot on every GPU
}

TEST(Placement, BalancingLowersMaxOverMeanOnSkewedLoads) {
  const PlacementModel model = small_model(4, 64);
  const ClusterSpec cluster = make_cluster(16, 8);
  const auto stats = zipf_stats(4, 64, 1.0);
  PlanOptions no_replicas;
  no_replicas.redundant_experts = 0;
  const Placement plain = plan_placement(model, cluster, stats, no_replicas);
  const Placement balanced = plan_placement(model, cluster, stats, {});
  for (int l = 1; l <= 4; ++l) {
    const auto& a = plain.layers[l].metrics;
    const auto& b = balanced.layers[l].metrics;
    EXPECT_LT(b.max_gpu_load / b.mean_gpu_load, 0.5 * a.max_gpu_load / a.mean_gpu_load);
  }
}

TEST(Placement, NoWorseThanGreedyAndLowerLinkLoad) {
  PlanOptions greedy;
  greedy.policy = Policy::kGreedy;
  for (double skew : {0.5, 1.0, 1.5}) {
    for (auto [nodes, experts] : {std::pair{32, 256}, std::pair{4, 256}, std::pair{16, 64}}) {
      const PlacementModel model = small_model(2, experts, 8);
      const ClusterSpec cluster = make_cluster(nodes, 8);
      const auto stats = zipf_stats(2, experts, skew);
      const Placement ours = plan_placement(model, cluster, stats, {});
      const Placement base = plan_placement(model, cluster, stats, greedy);
      for (int l = 1; l <= 2; ++l) {
        const auto& a = ours.layers[l].metrics;
        const auto& b = base.layers[l].metrics;
        EXPECT_LE(a.max_gpu_load, b.max_gpu_load * (1 + 1e-12));
        EXPECT_LT(a.max_link_load, b.max_link_load) << "skew " << skew << " nodes " << nodes;
      }
    }
  }
}

TEST(Placement, CoactivationSamplesPutPartnersOnOneNode) {
  // Experts p and p + 16 are always chosen together; loads are uniform.
  const PlacementModel model = small_model(1, 32, 2);
  const ClusterSpec cluster = make_cluster(4, 8);  // 32 GPUs, one expert each
  std::vector<LayerStats> stats(1);
  for (int t = 0; t < 3200; ++t) {
    const int pair = (t * 5) % 16;
    stats[0].coactivation.push_back(pair);
    stats[0].coactivation.push_back(pair + 16);
  }
  PlanOptions blind;
  blind.topology_aware = false;
  const Placement ours = plan_placement(model, cluster, stats, {});
  const Placement base = plan_placement(model, cluster, stats, blind);
  EXPECT_LT(ours.layers[1].metrics.max_link_load, base.layers[1].metrics.max_link_load);
  EXPECT_DOUBLE_EQ(ours.layers[1].metrics.max_gpu_load, base.layers[1].metrics.max_gpu_load);
}

TEST(Placement, Deterministic) {
  const PlacementModel model = small_model(3, 64, 4);
  const ClusterSpec cluster = make_cluster(6, 8);
  auto stats = zipf_stats(3, 64, 0.8);
  for (int t = 0; t < 400; ++t) {
    for (int i = 0; i < 4; ++i) stats[1].coactivation.push_back((t * 13 + i * 17) % 64);
  }
  const Placement a = plan_placement(model, cluster, stats, {});
  const Placement b = plan_placement(model, cluster, stats, {});
  for (int l = 0; l < 4; ++l) {
    EXPECT_EQ(a.layers[l].phy2log, b.layers[l].phy2log);
    EXPECT_EQ(a.layers[l].gpus, b.layers[l].gpus);
  }
  EXPECT_EQ(a.gpu_memory_used, b.gpu_memory_used);
}

// Re-planning: stats whose previous placement is `before` (layers 1..n of a plan).
std::vector<LayerStats> replan_stats(const Placement& before, std::vector<LayerStats> stats) {
  for (size_t i = 0; i < stats.size(); ++i) {
    stats[i].previous_gpus = before.layers[i + 1].gpus;
    stats[i].previous_phy2log = before.layers[i + 1].phy2log;
  }
  return stats;
}

// (GPU, expert) pairs of `after` that `before` lacks.
int count_moves(const LayerPlacement& before, const LayerPlacement& after) {
  std::set<std::pair<int, int>> old;
  for (size_t s = 0; s < before.gpus.size(); ++s) old.emplace(before.gpus[s], before.phy2log[s]);
  int moves = 0;
  for (size_t s = 0; s < after.gpus.size(); ++s) {
    moves += old.count({after.gpus[s], after.phy2log[s]}) ? 0 : 1;
  }
  return moves;
}

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
      // Greedy: a larger budget is not always better, but moving beats keeping the placement.
      if (budget == 0) kept_max = max_load;
      EXPECT_LT(max_load, kept_max * (1 + 1e-12)) << budget;
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

void expect_error(const PlacementModel& model, const ClusterSpec& cluster,
                  const std::vector<LayerStats>& stats, const PlanOptions& options,
                  const std::string& field) {
  try {
    plan_placement(model, cluster, stats, options);
    FAIL() << "expected an error naming " << field;
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find(field), std::string::npos) << error.what();
  }
}

TEST(Placement, BadConfigurationsNameTheField) {
  const PlacementModel model = small_model(2, 64);
  const ClusterSpec cluster = make_cluster(10, 8);
  PlanOptions too_many;
  too_many.redundant_experts = 17;  // 81 slots on 80 GPUs
  expect_error(model, cluster, {}, too_many, "redundant_experts");

  ClusterSpec tiny = make_cluster(10, 8, 50e6);
  expect_error(model, tiny, {}, {}, "model.bytes_per_expert");

  ClusterSpec small = make_cluster(1, 8, 2e9);  // 16 experts + 1 GB dense per GPU do not fit
  expect_error(model, small, {}, {}, "cluster.gpu_memory_bytes");

  PlanOptions reserve;
  reserve.memory_reserve_bytes = 79.99e9;
  expect_error(model, cluster, {}, reserve, "model.bytes_per_expert");

  expect_error(model, cluster, zipf_stats(1, 64, 1.0), {}, "stats");
  auto bad_load = zipf_stats(2, 64, 1.0);
  bad_load[1].expert_load[3] = -1;
  expect_error(model, cluster, bad_load, {}, "stats[1].expert_load");
  std::vector<LayerStats> bad_samples(2);
  bad_samples[0].coactivation = {1, 64};
  expect_error(model, cluster, bad_samples, {}, "stats[0].coactivation");

  PlacementModel bad_dense = model;
  bad_dense.dense_layers = {7};
  expect_error(bad_dense, cluster, {}, {}, "model.dense_layers");
  PlacementModel bad_top_k = model;
  bad_top_k.top_k = 0;
  expect_error(bad_top_k, cluster, {}, {}, "model.top_k");
  ClusterSpec no_nodes = cluster;
  no_nodes.num_nodes = 0;
  expect_error(model, no_nodes, {}, {}, "num_nodes");
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
  expect_error(model, cluster, with({0, 0, 2, 3}, {1, 1, 2, 3}), {}, "stats[0].previous_gpus");
  expect_error(model, cluster, with({0, 1, 2, 3}, {0, 1, 2, 2}), {}, "stats[0].previous_phy2log");
  PlanOptions greedy;
  greedy.policy = Policy::kGreedy;
  expect_error(model, cluster, with({0, 1, 2, 3}, {0, 1, 2, 3}), greedy, "stats[0].previous_gpus");
  PlanOptions negative;
  negative.max_moves = -2;
  expect_error(model, cluster, {}, negative, "max_moves");
}

}  // namespace
}  // namespace moe_ep::core
