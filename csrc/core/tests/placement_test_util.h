// Helpers shared by the placement planner's tests.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/placement.h"

namespace moe_ep::core::testing {

constexpr double kExpertBytes = 3.0 * 7168 * 2048 * 2;  // gated BF16 expert

inline ClusterSpec make_cluster(int nodes, int gpus_per_node, double memory = 80e9) {
  ClusterSpec cluster;
  cluster.num_nodes = nodes;
  cluster.gpus_per_node = gpus_per_node;
  cluster.gpu_memory_bytes = memory;
  return cluster;
}

// 1000 / rank^skew, ranks spread over the experts by a stride (and a per-layer shift).
inline std::vector<double> zipf(int experts, double skew, int shift) {
  std::vector<double> load(experts);
  for (int e = 0; e < experts; ++e) {
    load[(e * 7 + shift) % experts] = 1000.0 / std::pow(e + 1.0, skew);
  }
  return load;
}

inline std::vector<LayerStats> zipf_stats(int layers, int experts, double skew) {
  std::vector<LayerStats> stats(layers);
  for (int l = 0; l < layers; ++l) stats[l].expert_load = zipf(experts, skew, l);
  return stats;
}

// Lognormal loads (sigma) from a seeded generator.
inline std::vector<double> lognormal(int experts, double sigma, unsigned seed) {
  std::mt19937 rng(seed);
  std::lognormal_distribution<double> draw(0.0, sigma);
  std::vector<double> load(experts);
  for (double& x : load) x = 100.0 * draw(rng);
  return load;
}

// `layers` MoE layers after one dense layer.
inline PlacementModel small_model(int layers, int experts, int top_k = 2) {
  PlacementModel model;
  model.num_layers = layers + 1;
  model.dense_layers = {0};
  model.experts_per_layer = experts;
  model.top_k = top_k;
  model.bytes_per_expert = kExpertBytes;
  model.dense_layer_bytes = 1e9;
  return model;
}

// The slot maps agree; with !doubles no GPU holds two replicas of one expert.
inline void expect_consistent(const LayerPlacement& layer, int num_gpus, int experts,
                              bool doubles = false) {
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
    if (!doubles) {
      EXPECT_EQ(gpus.size(), layer.log2phy[e].size()) << "two replicas of one expert on a GPU";
    }
    total += layer.replica_count[e];
  }
  EXPECT_EQ(total, static_cast<int>(layer.phy2log.size()));
  for (size_t s = 0; s < layer.gpus.size(); ++s) {
    EXPECT_GE(layer.gpus[s], 0);
    EXPECT_LT(layer.gpus[s], num_gpus);
    if (s > 0) EXPECT_LE(layer.gpus[s - 1], layer.gpus[s]) << "slots are ordered by GPU";
  }
}

// Load of every GPU, an expert's load split evenly over its replicas (computed here, not
// by the planner).
inline std::vector<double> gpu_loads(const LayerPlacement& layer, const std::vector<double>& load,
                                     int num_gpus) {
  std::vector<double> out(num_gpus, 0.0);
  for (size_t s = 0; s < layer.phy2log.size(); ++s) {
    const int e = layer.phy2log[s];
    out[layer.gpus[s]] += load[e] / layer.replica_count[e];
  }
  return out;
}

// Expected token copies each node receives from the samples (rows of top_k ids), every row
// one token, a replica picked uniformly: computed directly, as a reference.
inline std::vector<double> sampled_node_hits(const LayerPlacement& layer,
                                             const std::vector<int>& samples, int top_k,
                                             const ClusterSpec& cluster) {
  std::vector<double> hit(cluster.num_nodes, 0.0);
  for (size_t row = 0; row < samples.size(); row += top_k) {
    for (int node = 0; node < cluster.num_nodes; ++node) {
      double miss = 1.0;
      for (int i = 0; i < top_k; ++i) {
        const int e = samples[row + i];
        int there = 0;
        for (int slot : layer.log2phy[e]) there += cluster.node_of(layer.gpus[slot]) == node;
        miss *= 1.0 - static_cast<double>(there) / layer.replica_count[e];
      }
      hit[node] += 1.0 - miss;
    }
  }
  return hit;
}

// Token rows from `topics` topics of experts/topics experts each (a random partition of the
// experts): every row takes top_k distinct experts of its topic, except that with
// probability `stray` an expert comes from anywhere.
inline std::vector<int> topic_samples(int experts, int topics, int top_k, int rows, double stray,
                                      unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<int> order(experts);
  for (int e = 0; e < experts; ++e) order[e] = e;
  std::shuffle(order.begin(), order.end(), rng);
  const int per_topic = experts / topics;
  std::vector<int> samples;
  for (int r = 0; r < rows; ++r) {
    const int topic = static_cast<int>(rng() % topics);
    std::set<int> chosen;
    while (static_cast<int>(chosen.size()) < top_k) {
      const bool wander = std::uniform_real_distribution<double>(0, 1)(rng) < stray;
      chosen.insert(wander ? static_cast<int>(rng() % experts)
                           : order[topic * per_topic + static_cast<int>(rng() % per_topic)]);
    }
    samples.insert(samples.end(), chosen.begin(), chosen.end());
  }
  return samples;
}

// Re-planning: stats whose previous placement is `before` (layers 1..n of a plan).
inline std::vector<LayerStats> replan_stats(const Placement& before,
                                            std::vector<LayerStats> stats) {
  for (size_t i = 0; i < stats.size(); ++i) {
    stats[i].previous_gpus = before.layers[i + 1].gpus;
    stats[i].previous_phy2log = before.layers[i + 1].phy2log;
  }
  return stats;
}

// (GPU, expert) pairs of `after` that `before` lacks, counted with multiplicity.
inline int count_moves(const LayerPlacement& before, const LayerPlacement& after) {
  std::map<std::pair<int, int>, int> old;
  for (size_t s = 0; s < before.gpus.size(); ++s) ++old[{before.gpus[s], before.phy2log[s]}];
  int moves = 0;
  for (size_t s = 0; s < after.gpus.size(); ++s) {
    auto it = old.find({after.gpus[s], after.phy2log[s]});
    if (it == old.end() || it->second == 0) {
      ++moves;
    } else {
      --it->second;
    }
  }
  return moves;
}

inline void expect_error(const PlacementModel& model, const ClusterSpec& cluster,
                         const std::vector<LayerStats>& stats, const PlanOptions& options,
                         const std::string& field) {
  try {
    plan_placement(model, cluster, stats, options);
    FAIL() << "expected an error naming " << field;
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find(field), std::string::npos) << error.what();
  }
}

}  // namespace moe_ep::core::testing
