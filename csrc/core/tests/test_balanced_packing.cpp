#include "core/balanced_packing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "core/tests/placement_test_util.h"

namespace moe_ep::core {
namespace {

using namespace testing;

// The smallest possible largest load per replica with `slots` replicas, by bisection on the
// threshold t (an expert needs ceil(load / t) replicas): an independent reference for the
// greedy counts.
double best_largest_per_replica(const std::vector<double>& load, int64_t slots) {
  double low = 0, high = *std::max_element(load.begin(), load.end());
  for (int i = 0; i < 200; ++i) {
    const double t = (low + high) / 2;
    int64_t need = 0;
    for (double x : load) need += std::max<int64_t>(1, static_cast<int64_t>(std::ceil(x / t)));
    (need <= slots ? high : low) = t;
  }
  return high;
}

TEST(ReplicaCounts, MinimiseTheLargestLoadPerReplica) {
  for (unsigned seed = 0; seed < 50; ++seed) {
    const int experts = 8 + static_cast<int>(seed % 5) * 12;
    const auto load = lognormal(experts, 0.3 + 0.05 * seed, seed);
    const int64_t slots = experts + 3 * seed;
    const ReplicaCounts counts = replica_counts(load, slots, std::numeric_limits<int>::max());
    EXPECT_EQ(std::accumulate(counts.count.begin(), counts.count.end(), int64_t{0}), slots);
    EXPECT_EQ(static_cast<int64_t>(counts.extra_order.size()), slots - experts);
    double largest = 0;
    for (int e = 0; e < experts; ++e) largest = std::max(largest, load[e] / counts.count[e]);
    EXPECT_NEAR(largest, best_largest_per_replica(load, slots), 1e-9 * largest) << seed;
  }
}

TEST(ReplicaCounts, TiesGoToTheLowestExpertAndTheCapHolds) {
  const ReplicaCounts counts = replica_counts({3, 5, 5, 1}, 7, 2);
  EXPECT_EQ(counts.extra_order, (std::vector<int>{1, 2, 0}));  // 5, 5 (lowest id first), 3
  EXPECT_EQ(counts.count, (std::vector<int>{2, 2, 2, 1}));
}

// The largest GPU load after any single swap between the heaviest GPU and another, that
// keeps every GPU free of a second replica of one expert (brute force).
double best_single_swap(const SlotLayout& layout) {
  const int heavy = static_cast<int>(
      std::max_element(layout.gpu_load.begin(), layout.gpu_load.end()) - layout.gpu_load.begin());
  double best = layout.max_gpu_load();
  for (int light = 0; light < layout.num_gpus(); ++light) {
    if (light == heavy) continue;
    for (int x : layout.slots_of_gpu[heavy]) {
      for (int y : layout.slots_of_gpu[light]) {
        if (layout.holds(light, layout.slot_expert[x]) ||
            layout.holds(heavy, layout.slot_expert[y])) {
          continue;
        }
        std::vector<double> after = layout.gpu_load;
        after[heavy] += layout.slot_load[y] - layout.slot_load[x];
        after[light] += layout.slot_load[x] - layout.slot_load[y];
        best = std::min(best, *std::max_element(after.begin(), after.end()));
      }
    }
  }
  return best;
}

TEST(BalancedPacking, NoSwapWithAnyGpuLowersTheMaximum) {
  // The swap search tries every GPU, not only the lightest few: after it, no single swap of
  // the heaviest GPU with any GPU lowers the maximum (checked by brute force). Lognormal
  // loads of 64 experts on 16 GPUs without replicas are the case where a window of the 8
  // lightest GPUs missed swaps with GPUs ranked 9 to 14.
  for (unsigned seed = 0; seed < 40; ++seed) {
    const int gpus = seed % 2 ? 16 : 12;
    const auto load = lognormal(64, 1.0 + 0.02 * seed, 100 + seed);
    const std::vector<int> capacity(gpus, (64 + gpus - 1) / gpus + (seed % 3 == 0 ? 1 : 0));
    const int64_t slots = std::accumulate(capacity.begin(), capacity.end(), int64_t{0});
    const SlotLayout layout = balanced_packing(load, slots, capacity);
    const SlotLayout greedy = pack_heaviest_first(
        load, replica_counts(load, slots, std::numeric_limits<int>::max()), capacity, true);
    EXPECT_LE(layout.max_gpu_load(), greedy.max_gpu_load() * (1 + 1e-12)) << seed;
    EXPECT_GE(best_single_swap(layout), layout.max_gpu_load() * (1 - 1e-9)) << seed;
    for (int g = 0; g < gpus; ++g)
      EXPECT_EQ(static_cast<int>(layout.slots_of_gpu[g].size()), capacity[g]);
  }
}

// Slots that share their GPU with another replica of their expert.
int count_doubles(const SlotLayout& layout) {
  int doubles = 0;
  for (const auto& slots : layout.slots_of_gpu) {
    for (size_t i = 0; i < slots.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        doubles += layout.slot_expert[slots[i]] == layout.slot_expert[slots[j]];
      }
    }
  }
  return doubles;
}

TEST(BalancedPacking, TwoReplicasShareAGpuOnlyWhenThatBalancesBest) {
  // Loads 2, 1.5, 0.5 in two GPUs of two slots: expert 0 gets the extra replica, and
  // {0, 0} {1, 2} (2.0) beats every layout without a double (2.5 or more).
  const SlotLayout doubled = balanced_packing({2.0, 1.5, 0.5}, 4, {2, 2});
  EXPECT_DOUBLE_EQ(doubled.max_gpu_load(), 2.0);
  EXPECT_EQ(count_doubles(doubled), 1);
  // Zipf loads of 64 experts in 8 GPUs of 9 slots: EPLB's packing doubles an expert on a
  // GPU, the planner finds a layout as good without.
  const auto load = zipf(64, 1.2, 0);
  const std::vector<int> capacity(8, 9);
  const SlotLayout eplb = pack_heaviest_first(
      load, replica_counts(load, 72, std::numeric_limits<int>::max()), capacity, true);
  const SlotLayout planned = balanced_packing(load, 72, capacity);
  EXPECT_GT(count_doubles(eplb), 0);
  EXPECT_EQ(count_doubles(planned), 0);
  EXPECT_LE(planned.max_gpu_load(), eplb.max_gpu_load());
}

TEST(BalancedPacking, OneSlotPerGpuIsEplbsLayout) {
  // With one slot per GPU every GPU's load is one replica's: the counts decide everything.
  const auto load = lognormal(32, 1.2, 5);
  const SlotLayout layout = balanced_packing(load, 48, std::vector<int>(48, 1));
  const ReplicaCounts counts = replica_counts(load, 48, std::numeric_limits<int>::max());
  double largest = 0;
  for (int e = 0; e < 32; ++e) largest = std::max(largest, load[e] / counts.count[e]);
  EXPECT_DOUBLE_EQ(layout.max_gpu_load(), largest);
}

}  // namespace
}  // namespace moe_ep::core
