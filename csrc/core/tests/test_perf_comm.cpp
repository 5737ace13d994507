// Communication terms of the cost model (perf_comm.h), against hand-computed cases and, for
// the routing probabilities, a Monte Carlo simulation of the routing itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/perf_comm.h"
#include "core/tests/perf_test_support.h"

namespace moe_ep::core {
namespace {

TransportSpec transport() {
  TransportSpec t;
  t.nvlink_fixed_s = 20e-6;
  t.network_fixed_s = 40e-6;
  t.per_peer_s = 0.5e-6;
  t.sms = 24;
  return t;
}

double miss(double pool, double block, int k) {  // hand formula, written out per case below
  double p = 1.0;
  for (int i = 0; i < k; ++i) p *= (pool - block - i) / (pool - i);
  return p;
}

// Fraction of simulated tokens whose routing hits experts [0, block): groups picked uniformly
// without replacement, then top_k experts uniformly among the picked groups' experts. Partial
// Fisher-Yates shuffles draw uniform distinct picks from whatever order the arrays are left in.
double simulated_hit(const RoutingSpec& r, int block, int samples) {
  std::mt19937 rng(1234);
  const int group_size = r.num_experts / r.num_groups;
  std::vector<int> groups(r.num_groups), pool(r.topk_groups * group_size);
  std::iota(groups.begin(), groups.end(), 0);
  std::iota(pool.begin(), pool.end(), 0);
  auto draw = [&rng](std::vector<int>& items, int count) {
    for (int i = 0; i < count; ++i) {
      std::uniform_int_distribution<int> pick(i, static_cast<int>(items.size()) - 1);
      std::swap(items[i], items[pick(rng)]);
    }
  };
  int hits = 0;
  for (int s = 0; s < samples; ++s) {
    draw(groups, r.topk_groups);
    draw(pool, r.top_k);
    bool hit = false;
    for (int i = 0; i < r.top_k; ++i) {
      const int expert = groups[pool[i] / group_size] * group_size + pool[i] % group_size;
      hit = hit || expert < block;
    }
    hits += hit;
  }
  return static_cast<double>(hits) / samples;
}

TEST(PerfRouting, UnrestrictedBlockHit) {
  const RoutingSpec r{64, 2, 1, 1};
  EXPECT_DOUBLE_EQ(probability_block_hit(r, 1), 2.0 / 64);
  EXPECT_NEAR(probability_block_hit(r, 32), 1.0 - (32.0 / 64) * (31.0 / 63), 1e-15);
  EXPECT_DOUBLE_EQ(probability_block_hit(r, 64), 1.0);
  EXPECT_DOUBLE_EQ(probability_block_hit({8, 5, 1, 1}, 4), 1.0);  // 5 picks cannot miss 4 of 8
}

TEST(PerfRouting, GroupLimitedBlockHitByHand) {
  const RoutingSpec v3{256, 8, 8, 4};  // DeepSeek-V3: 8 groups of 32, 4 picked, 128 in the pool
  // Inside one group: the group is picked (4 of 8), then the 8 picks must touch the block.
  EXPECT_NEAR(probability_block_hit(v3, 8), 0.5 * (1 - miss(128, 8, 8)), 1e-15);
  EXPECT_NEAR(probability_block_hit(v3, 32), 0.5 * (1 - miss(128, 32, 8)), 1e-15);
  // Two whole groups: one of them picked with probability 2 C(6,3) / C(8,4) = 40/70, both 15/70.
  const double two = 40.0 / 70 * (1 - miss(128, 32, 8)) + 15.0 / 70 * (1 - miss(128, 64, 8));
  EXPECT_NEAR(probability_block_hit(v3, 64), two, 1e-15);
  // 1.5 groups: halfway between one and two groups.
  EXPECT_NEAR(probability_block_hit(v3, 48), 0.5 * (probability_block_hit(v3, 32) + two), 1e-15);
}

TEST(PerfRouting, BlockHitMatchesSimulatedRouting) {
  const int samples = 100000;  // standard error of a probability below 0.0016
  for (const RoutingSpec& r : {RoutingSpec{256, 8, 8, 4}, RoutingSpec{256, 8, 4, 2},
                               RoutingSpec{64, 2, 1, 1}, RoutingSpec{128, 6, 8, 3}}) {
    for (const int block : {1, 4, 16, 32, 64, 128}) {
      if (block > r.num_experts) continue;
      if (block > r.num_experts / r.num_groups && block % (r.num_experts / r.num_groups)) continue;
      EXPECT_NEAR(probability_block_hit(r, block), simulated_hit(r, block, samples), 0.006)
          << r.num_experts << " experts, " << r.num_groups << " groups, block " << block;
    }
  }
}

TEST(PerfAllToAll, OneCopyPerExpertGoesStraightToItsRank) {
  const HardwareSpec hw = h100_like_nodes(2);
  const AllToAllCost c =
      all_to_all_cost(128, 7168, {256, 8, 1, 1}, 16, Dedup::kExpert, 1.0, hw, transport());
  EXPECT_DOUBLE_EQ(c.inter_node_bytes, 128.0 * 7168 * 8 * 8 / 16);
  EXPECT_DOUBLE_EQ(c.intra_node_bytes, 128.0 * 7168 * 8 * 7 / 16);
  EXPECT_EQ(c.peers, 15);
  const double inter_s = c.inter_node_bytes / (50e9 * 0.9);
  const double intra_s = c.intra_node_bytes / (450e9 * 0.8);
  EXPECT_NEAR(c.time_s, 40e-6 + 15 * 0.5e-6 + std::max(inter_s, intra_s), 1e-15);
}

TEST(PerfAllToAll, OneCopyPerRank) {
  const HardwareSpec hw = h100_like_nodes(2);
  const RoutingSpec r{64, 2, 1, 1};
  const AllToAllCost c = all_to_all_cost(1000, 14336, r, 16, Dedup::kRank, 1.0, hw, transport());
  const double p_rank = 1.0 - (60.0 / 64) * (59.0 / 63);  // 4 experts per rank
  EXPECT_NEAR(c.inter_node_bytes, 1000.0 * 14336 * 8 * p_rank, 1e-6);
  EXPECT_NEAR(c.intra_node_bytes, 1000.0 * 14336 * 7 * p_rank, 1e-6);
  EXPECT_EQ(c.peers, 15);
}

TEST(PerfAllToAll, OneCopyPerNodeThenForwardedOverNvlink) {
  const HardwareSpec hw = h100_like_nodes(2);
  const RoutingSpec r{64, 2, 1, 1};
  const AllToAllCost c = all_to_all_cost(1000, 14336, r, 16, Dedup::kNode, 1.0, hw, transport());
  const double p_rank = 1.0 - (60.0 / 64) * (59.0 / 63);
  const double p_node = 1.0 - (32.0 / 64) * (31.0 / 63);  // 32 experts per node
  EXPECT_NEAR(c.inter_node_bytes, 1000.0 * 14336 * 1 * p_node, 1e-6);
  EXPECT_NEAR(c.intra_node_bytes, 1000.0 * 14336 * 2 * 7 * p_rank, 1e-6);
  EXPECT_EQ(c.peers, 1 + 7);
  const double inter_s = c.inter_node_bytes / 45e9, intra_s = c.intra_node_bytes / 360e9;
  EXPECT_NEAR(c.time_s, 40e-6 + 8 * 0.5e-6 + std::max(inter_s, intra_s), 1e-15);
}

TEST(PerfAllToAll, OneNodeUsesOnlyNvlinkAndItsFixedCost) {
  const HardwareSpec hw = h100_like_nodes(1);
  const AllToAllCost c =
      all_to_all_cost(100, 100, {8, 1, 1, 1}, 8, Dedup::kRank, 1.0, hw, transport());
  EXPECT_EQ(c.inter_node_bytes, 0.0);
  EXPECT_DOUBLE_EQ(c.intra_node_bytes, 100.0 * 100 * 7 * (1.0 / 8));
  EXPECT_NEAR(c.time_s, 20e-6 + 7 * 0.5e-6 + c.intra_node_bytes / 360e9, 1e-15);
}

TEST(PerfAllToAll, LinkImbalanceScalesOnlyTheBytes) {
  const HardwareSpec hw = h100_like_nodes(2);
  const RoutingSpec r{256, 8, 1, 1};
  const AllToAllCost even =
      all_to_all_cost(4096, 7168, r, 16, Dedup::kExpert, 1.0, hw, transport());
  const AllToAllCost skew =
      all_to_all_cost(4096, 7168, r, 16, Dedup::kExpert, 1.5, hw, transport());
  const double fixed = 40e-6 + 15 * 0.5e-6;
  EXPECT_NEAR(skew.time_s - fixed, 1.5 * (even.time_s - fixed), 1e-15);
  EXPECT_DOUBLE_EQ(skew.inter_node_bytes, even.inter_node_bytes);
}

TEST(PerfAllToAll, OneRankSendsNothing) {
  const AllToAllCost c = all_to_all_cost(128, 7168, {256, 8, 1, 1}, 1, Dedup::kExpert, 1.0,
                                         h100_like_nodes(1), transport());
  EXPECT_EQ(c.time_s, 0.0);
  EXPECT_EQ(c.peers, 0);
}

TEST(PerfCollectives, RingAllReduceAndAllGather) {
  const HardwareSpec hw = h100_like_nodes(2);
  // All-reduce over 8 GPUs of a node: 2 x 7/8 of the buffer in 2 x 7 peer steps.
  EXPECT_NEAR(ring_collective_time(1e6, 8, 2, true, hw, transport()),
              20e-6 + 14 * 0.5e-6 + 2 * 1e6 * 7 / 8 / 360e9, 1e-15);
  // All-gather over 16 GPUs across nodes: the network rate and fixed cost.
  EXPECT_NEAR(ring_collective_time(1e6, 16, 1, false, hw, transport()),
              40e-6 + 15 * 0.5e-6 + 1e6 * 15 / 16 / 45e9, 1e-15);
  EXPECT_EQ(ring_collective_time(1e6, 1, 2, true, hw, transport()), 0.0);
  EXPECT_NEAR(p2p_time(1e6, false, hw, transport()), 40e-6 + 0.5e-6 + 1e6 / 45e9, 1e-15);
  EXPECT_EQ(p2p_time(0, false, hw, transport()), 0.0);
}

TEST(PerfOverlap, CommunicationKernelsSlowTheComputeTheyOverlap) {
  // No SMs held: the ideal max(compute, comm).
  EXPECT_DOUBLE_EQ(overlapped_time(3.0, 2.0, 0.0), 3.0);
  EXPECT_DOUBLE_EQ(overlapped_time(1.0, 2.0, 0.0), 2.0);
  // A quarter of the SMs held for the 2 s of communication: compute loses 0.5 s.
  EXPECT_DOUBLE_EQ(overlapped_time(3.0, 2.0, 0.25), 3.5);
  // Compute fits in the 75 % of the SMs left during communication: communication bound.
  EXPECT_DOUBLE_EQ(overlapped_time(1.5, 2.0, 0.25), 2.0);
  EXPECT_DOUBLE_EQ(overlapped_time(1.6, 2.0, 0.25), 2.1);
}

TEST(PerfCommValidation, BadFieldsAreNamed) {
  auto validating = [](auto spec) { return [spec] { spec.validate(); }; };
  expect_error_naming(validating(RoutingSpec{256, 8, 7, 4}), "routing.num_groups");
  expect_error_naming(validating(RoutingSpec{256, 8, 8, 9}), "routing.topk_groups");
  expect_error_naming(validating(RoutingSpec{256, 40, 8, 1}), "routing.top_k");
  TransportSpec t;
  t.per_peer_s = -1;
  expect_error_naming(validating(t), "transport.per_peer_s");
  HardwareSpec hw = h100_like_nodes(2);
  hw.inter_node_efficiency = 1.2;
  expect_error_naming(validating(hw), "hardware.inter_node_efficiency");
}

}  // namespace
}  // namespace moe_ep::core
