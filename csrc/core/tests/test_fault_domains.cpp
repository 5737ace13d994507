#include "core/fault_domains.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <utility>
#include <vector>

#include "core/placement.h"
#include "core/tests/placement_test_util.h"

namespace moe_ep::core {
namespace {

using namespace testing;

std::vector<std::pair<int, int>> pairs_of(const LayerPlacement& layer) {
  std::vector<std::pair<int, int>> pairs;
  for (size_t s = 0; s < layer.gpus.size(); ++s)
    pairs.emplace_back(layer.gpus[s], layer.phy2log[s]);
  return pairs;
}

// Experts left with no copy when `domain` (GPUs [domain * per, (domain + 1) * per)) fails:
// counted directly from the slots, as a reference.
int lost_with(const LayerPlacement& layer, int experts, int domain, int per) {
  std::vector<int> left(experts, 0);
  for (size_t s = 0; s < layer.gpus.size(); ++s) {
    if (layer.gpus[s] / per != domain) ++left[layer.phy2log[s]];
  }
  return static_cast<int>(std::count(left.begin(), left.end(), 0));
}

std::vector<int> slots_per_gpu(const LayerPlacement& layer, int gpus) {
  std::vector<int> count(gpus, 0);
  for (int g : layer.gpus) ++count[g];
  return count;
}

TEST(FaultDomains, AnyOneGpuOrNodeCanFailWhenTheSlotsAllow) {
  for (const auto& [domain, nodes, per_node] :
       {std::tuple{FaultDomain::kGpu, 1, 8}, std::tuple{FaultDomain::kNode, 4, 2},
        std::tuple{FaultDomain::kGpu, 2, 4}}) {
    const ClusterSpec cluster = make_cluster(nodes, per_node, 0);
    const int experts = 16, gpus = cluster.num_gpus();
    const int per = domain == FaultDomain::kGpu ? 1 : per_node;
    for (double skew : {0.0, 1.2, 2.5}) {
      PlanOptions options;
      options.redundant_experts = experts;  // 2E slots: every expert can have two homes
      options.fault_domain = domain;
      const auto stats = zipf_stats(1, experts, skew);
      const Placement plan = plan_placement(small_model(1, experts), cluster, stats, options);
      const LayerPlacement& layer = plan.layers[1];
      expect_consistent(layer, gpus, experts);
      EXPECT_EQ(slots_per_gpu(layer, gpus), std::vector<int>(gpus, 4));
      EXPECT_TRUE(unprotected_experts(pairs_of(layer), experts, per).empty()) << skew;
      for (int d = 0; d < gpus / per; ++d) EXPECT_EQ(lost_with(layer, experts, d, per), 0);
    }
  }
}

TEST(FaultDomains, FewerSlotsProtectAsManyExpertsAsTheyCanHottestFirst) {
  const ClusterSpec cluster = make_cluster(1, 8, 0);
  const int experts = 16;
  PlanOptions options;
  options.redundant_experts = 4;  // 20 slots: four experts can have a second home
  options.fault_domain = FaultDomain::kGpu;
  const auto stats = zipf_stats(1, experts, 1.0);
  const LayerPlacement layer =
      plan_placement(small_model(1, experts), cluster, stats, options).layers[1];
  expect_consistent(layer, 8, experts);
  const auto unprotected = unprotected_experts(pairs_of(layer), experts, 1);
  EXPECT_EQ(unprotected.size(), 12u);
  // The four protected experts are the four most loaded.
  std::vector<int> order(experts);
  for (int e = 0; e < experts; ++e) order[e] = e;
  const auto& load = stats[0].expert_load;
  std::sort(order.begin(), order.end(), [&](int a, int b) { return load[a] > load[b]; });
  for (int i = 0; i < 4; ++i) {
    EXPECT_FALSE(std::binary_search(unprotected.begin(), unprotected.end(), order[i])) << i;
  }
}

TEST(FaultDomains, TheProtectedPlanStaysNearTheBalancedOneWithSpareSlots) {
  // With 3E slots protection leaves a copy per expert to spare; with exactly 2E every expert
  // has two copies and the hottest one's half load sets the maximum: the bound computed here.
  const ClusterSpec cluster = make_cluster(1, 8, 0);
  const int experts = 32;
  const auto stats = zipf_stats(1, experts, 1.0);
  const auto model = small_model(1, experts);
  for (int slots : {3 * experts, 2 * experts}) {
    PlanOptions plain;
    plain.redundant_experts = slots - experts;
    PlanOptions protect = plain;
    protect.fault_domain = FaultDomain::kGpu;
    const double balanced =
        plan_placement(model, cluster, stats, plain).layers[1].metrics.max_gpu_load;
    const double protected_max =
        plan_placement(model, cluster, stats, protect).layers[1].metrics.max_gpu_load;
    if (slots == 3 * experts) {
      EXPECT_LE(protected_max, balanced * 1.05);
      continue;
    }
    std::vector<double> halves;
    for (double load : stats[0].expert_load) halves.push_back(load / 2);
    std::sort(halves.begin(), halves.end());
    // The GPU holding the hottest half holds 7 other halves, at least the 7 smallest.
    double bound = halves.back();
    for (int i = 0; i < 7; ++i) bound += halves[i];
    EXPECT_GE(protected_max, bound * (1 - 1e-12));
    EXPECT_LE(protected_max, bound * 1.05);
  }
}

TEST(FaultDomains, ExpertsConfinedToOneNodeAreSpread) {
  // Two nodes of two GPUs: expert 0 on both GPUs of node 0, expert 1 on both of node 1.
  std::vector<std::pair<int, int>> pairs = {{0, 0}, {1, 0}, {2, 1}, {3, 1}};
  EXPECT_EQ(unprotected_experts(pairs, 2, 2), (std::vector<int>{0, 1}));
  protect_against_domain_loss(pairs, {1.0, 1.0}, 4, 2);
  EXPECT_TRUE(unprotected_experts(pairs, 2, 2).empty());
  std::vector<int> per_gpu(4, 0);
  for (const auto& [gpu, expert] : pairs) ++per_gpu[gpu];
  EXPECT_EQ(per_gpu, std::vector<int>(4, 1));
  // One domain only: nothing can help, nothing changes.
  std::vector<std::pair<int, int>> single = {{0, 0}, {1, 0}};
  protect_against_domain_loss(single, {1.0}, 2, 2);
  EXPECT_EQ(single, (std::vector<std::pair<int, int>>{{0, 0}, {1, 0}}));
}

TEST(FaultDomains, ReplanAfterALostGpuRestoresEveryExpertAndItsProtection) {
  const int experts = 12, gpus = 6;
  const auto stats = zipf_stats(1, experts, 1.0);
  PlanOptions options;
  options.redundant_experts = experts;
  options.fault_domain = FaultDomain::kGpu;
  const auto model = small_model(1, experts);
  const LayerPlacement before =
      plan_placement(model, make_cluster(1, gpus, 0), stats, options).layers[1];
  for (int failed = 0; failed < gpus; ++failed) {
    // The survivors keep their slots, renumbered 0 .. gpus - 2.
    auto survivors = stats;
    for (size_t s = 0; s < before.gpus.size(); ++s) {
      const int g = before.gpus[s];
      if (g == failed) continue;
      survivors[0].previous_gpus.push_back(g < failed ? g : g - 1);
      survivors[0].previous_phy2log.push_back(before.phy2log[s]);
    }
    PlanOptions replan = options;  // the same 2E slots, on five GPUs, forced moves only
    replan.max_moves = 0;
    const LayerPlacement after =
        plan_placement(model, make_cluster(1, gpus - 1, 0), survivors, replan).layers[1];
    expect_consistent(after, gpus - 1, experts);
    EXPECT_TRUE(unprotected_experts(pairs_of(after), experts, 1).empty()) << failed;
    // The lost GPU's four slots are re-made elsewhere; restoring the protection copies a
    // few more.
    EXPECT_GE(after.moves, 4) << failed;
    EXPECT_LE(after.moves, 12) << failed;
  }
}

TEST(FaultDomains, AnExpertWhoseEveryCopyWasLostGetsASlot) {
  const int experts = 8;
  auto stats = zipf_stats(1, experts, 0.5);
  // Expert 5's only slot was on the failed GPU: the previous placement lacks it.
  for (int e = 0; e < experts; ++e) {
    if (e == 5) continue;
    stats[0].previous_gpus.push_back(e % 3);
    stats[0].previous_phy2log.push_back(e);
  }
  PlanOptions options;
  options.redundant_experts = 1;
  const LayerPlacement layer =
      plan_placement(small_model(1, experts), make_cluster(1, 3, 0), stats, options).layers[1];
  expect_consistent(layer, 3, experts);
  EXPECT_EQ(layer.replica_count[5], 1);
  EXPECT_GE(layer.moves, 1);
}

TEST(FaultDomains, GpusPerDomain) {
  EXPECT_EQ(gpus_per_domain(FaultDomain::kNone, 8), 0);
  EXPECT_EQ(gpus_per_domain(FaultDomain::kGpu, 8), 1);
  EXPECT_EQ(gpus_per_domain(FaultDomain::kNode, 8), 8);
}

}  // namespace
}  // namespace moe_ep::core
