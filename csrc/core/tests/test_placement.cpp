#include "core/placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <string>

#include "core/tests/placement_test_util.h"

namespace moe_ep::core {
namespace {

using namespace testing;

PlacementModel seeds_model() {
  PlacementModel model;
  model.bytes_per_expert = gated_ffn_bytes(7168, 2048, 2);
  model.dense_layer_bytes = gated_ffn_bytes(7168, 2048, 2);
  return model;
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

TEST(Placement, BadConfigurationsNameTheField) {
  const PlacementModel model = small_model(2, 64);
  const ClusterSpec cluster = make_cluster(10, 8);
  PlanOptions too_many;
  too_many.redundant_experts = 100000;  // 2 x 100064 / 80 slots per GPU do not fit 80 GB
  expect_error(model, cluster, {}, too_many, "redundant_experts");
  PlanOptions negative;
  negative.redundant_experts = -2;
  expect_error(model, cluster, {}, negative, "redundant_experts");

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

  PlacementModel groups = model;
  groups.n_group = 5;  // does not divide 64 experts
  expect_error(groups, cluster, {}, {}, "model.n_group");
  groups.n_group = 8;
  groups.topk_group = 9;
  expect_error(groups, cluster, {}, {}, "model.topk_group");
  groups.topk_group = 4;
  groups.expert_group.assign(63, 0);
  expect_error(groups, cluster, {}, {}, "model.expert_group");
  groups.expert_group.assign(64, 0);  // groups 1..7 empty
  expect_error(groups, cluster, {}, {}, "model.expert_group");
  groups.expert_group[5] = 8;
  expect_error(groups, cluster, {}, {}, "model.expert_group");
}

}  // namespace
}  // namespace moe_ep::core
