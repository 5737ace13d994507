// Expected token copies every node receives per step, under the traffic model of
// placement.h: from co-activation samples, node-deduplicated (a sample hits node m with
// probability 1 - prod over its experts of (1 - share of the expert's replicas on m)); with
// no samples, every (token, expert) pair is its own copy (the node's load). Kept up to date
// as replicas move between nodes, and able to say what a move would do before it is made.
#pragma once

#include <vector>

#include "core/slot_layout.h"
#include "core/topology.h"

namespace moe_ep::core {

class NodeHits {
 public:
  // `layout` on real GPUs; count[e] = replicas of expert e; samples: rows of top_k expert
  // ids, each standing for sum(load) / (rows * top_k) tokens.
  NodeHits(const SlotLayout& layout, const std::vector<int>& count, const std::vector<double>& load,
           const ClusterSpec& cluster, const std::vector<int>& samples, int top_k);

  const std::vector<double>& hits() const { return hit_; }
  int busiest() const;
  // The copies `node` would receive if expert x had dx more replicas there and expert y dy
  // more (x or y may be -1: no change). The replica totals stay as they are.
  double after(int node, int x, int dx, int y, int dy);
  // One replica of x moved from node a to node b and one of y (or none: -1) from b to a;
  // hit_a and hit_b are the nodes' new copies (from after()).
  void apply_swap(int x, int a, int y, int b, double hit_a, double hit_b);

 private:
  double share(int expert, int node) const {
    return static_cast<double>(replicas_[static_cast<size_t>(expert) * num_nodes_ + node]) /
           count_[expert];
  }

  int num_nodes_;
  const std::vector<int>& count_;
  const std::vector<double>& load_;
  const std::vector<int>& samples_;
  int top_k_;
  double tokens_per_sample_ = 0.0;
  std::vector<int> replicas_;  // expert x node -> replicas there
  std::vector<std::vector<int>> samples_of_expert_;
  std::vector<double> hit_;
  std::vector<int> stamp_;  // sample -> last after() call that visited it
  int current_stamp_ = 0;
};

}  // namespace moe_ep::core
