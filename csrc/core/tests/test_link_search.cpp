#include "core/link_search.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "core/node_hits.h"
#include "core/placement.h"
#include "core/tests/placement_test_util.h"

namespace moe_ep::core {
namespace {

using namespace testing;

TEST(NodeHits, MatchTheDirectCountAndPredictMoves) {
  // 3 nodes x 2 GPUs, 12 experts with replicas; samples of 3 experts.
  const ClusterSpec cluster = make_cluster(3, 2);
  const std::vector<double> load = lognormal(12, 0.7, 1);
  const std::vector<int> samples = topic_samples(12, 3, 3, 400, 0.3, 2);
  SlotLayout layout(6);
  std::vector<int> count(12, 0);
  std::mt19937 rng(4);
  for (int slot = 0; slot < 18; ++slot) {
    const int e = slot < 12 ? slot : static_cast<int>(rng() % 12);
    ++count[e];
    layout.add(e, 0.0, slot % 6);
  }
  for (int s = 0; s < layout.num_slots(); ++s) {
    layout.slot_load[s] = load[layout.slot_expert[s]] / count[layout.slot_expert[s]];
  }
  auto as_placement = [&](const SlotLayout& l) {
    LayerPlacement p;
    p.replica_count = count;
    p.log2phy.assign(12, {});
    for (int s = 0; s < l.num_slots(); ++s) {
      p.phy2log.push_back(l.slot_expert[s]);
      p.gpus.push_back(l.slot_gpu[s]);
      p.log2phy[l.slot_expert[s]].push_back(s);
    }
    return p;
  };
  NodeHits hits(layout, count, load, cluster, samples, 3);
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  const double tokens_per_row = total / static_cast<double>(samples.size());
  auto direct = sampled_node_hits(as_placement(layout), samples, 3, cluster);
  for (int n = 0; n < 3; ++n) EXPECT_NEAR(hits.hits()[n], direct[n] * tokens_per_row, 1e-9 * total);
  // Swap a slot of node 0 with one of node 2 and compare the prediction with a recount.
  const int x = layout.slots_of_gpu[0][0], y = layout.slots_of_gpu[5][0];
  const int ex = layout.slot_expert[x], ey = layout.slot_expert[y];
  const double predicted_a = hits.after(0, ex, -1, ey, 1);
  const double predicted_b = hits.after(2, ex, 1, ey, -1);
  layout.exchange(x, y);
  direct = sampled_node_hits(as_placement(layout), samples, 3, cluster);
  EXPECT_NEAR(predicted_a, direct[0] * tokens_per_row, 1e-9 * total);
  EXPECT_NEAR(predicted_b, direct[2] * tokens_per_row, 1e-9 * total);
  hits.apply_swap(ex, 0, ey, 2, predicted_a, predicted_b);
  EXPECT_NEAR(hits.after(1, ex, 0, -1, 0), direct[1] * tokens_per_row, 1e-9 * total);
}

TEST(LinkSearch, TopicsGatherOnNodes) {
  // Tokens choose within 4 topics of 16 experts (10% strays); loads equal. With the samples
  // the busiest node receives clearly fewer copies than without, and no GPU carries more.
  const PlacementModel model = small_model(1, 64, 4);
  for (const ClusterSpec& cluster : {make_cluster(4, 4), make_cluster(4, 16)}) {
    std::vector<LayerStats> stats(1);
    stats[0].coactivation = topic_samples(64, 4, 4, 3000, 0.1, 11);
    PlanOptions options;
    options.redundant_experts = 0;
    const LayerPlacement with = plan_placement(model, cluster, stats, options).layers[1];
    const std::vector<int> samples = stats[0].coactivation;
    stats[0].expert_load.assign(64, 0.0);
    for (int e : samples) stats[0].expert_load[e] += 1.0;
    stats[0].coactivation.clear();
    const LayerPlacement without = plan_placement(model, cluster, stats, options).layers[1];
    const auto hits_with = sampled_node_hits(with, samples, 4, cluster);
    const auto hits_without = sampled_node_hits(without, samples, 4, cluster);
    EXPECT_LT(*std::max_element(hits_with.begin(), hits_with.end()),
              0.8 * *std::max_element(hits_without.begin(), hits_without.end()))
        << cluster.num_gpus() << " GPUs";
    const auto gpu_with = gpu_loads(with, stats[0].expert_load, cluster.num_gpus());
    const auto gpu_without = gpu_loads(without, stats[0].expert_load, cluster.num_gpus());
    EXPECT_LE(*std::max_element(gpu_with.begin(), gpu_with.end()),
              *std::max_element(gpu_without.begin(), gpu_without.end()) * (1 + 1e-12));
  }
}

}  // namespace
}  // namespace moe_ep::core
