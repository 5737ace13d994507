#include "core/node_hits.h"

#include <algorithm>
#include <numeric>

namespace moe_ep::core {

NodeHits::NodeHits(const SlotLayout& layout, const std::vector<int>& count,
                   const std::vector<double>& load, const ClusterSpec& cluster,
                   const std::vector<int>& samples, int top_k)
    : num_nodes_(cluster.num_nodes),
      count_(count),
      load_(load),
      samples_(samples),
      top_k_(top_k),
      replicas_(count.size() * cluster.num_nodes, 0),
      hit_(cluster.num_nodes, 0.0) {
  const int num_experts = static_cast<int>(count.size());
  std::vector<std::vector<int>> nodes_of_expert(num_experts);
  for (int s = 0; s < layout.num_slots(); ++s) {
    const int e = layout.slot_expert[s], node = cluster.node_of(layout.slot_gpu[s]);
    if (replicas_[static_cast<size_t>(e) * num_nodes_ + node]++ == 0) {
      nodes_of_expert[e].push_back(node);
    }
  }
  if (samples.empty()) {
    for (int s = 0; s < layout.num_slots(); ++s) {
      hit_[cluster.node_of(layout.slot_gpu[s])] += layout.slot_load[s];
    }
    return;
  }
  const int num_samples = static_cast<int>(samples.size() / top_k);
  tokens_per_sample_ =
      std::accumulate(load.begin(), load.end(), 0.0) / (static_cast<double>(num_samples) * top_k);
  samples_of_expert_.assign(num_experts, {});
  stamp_.assign(num_samples, 0);
  std::vector<double> miss(num_nodes_, 1.0);  // per node, reset after every sample
  std::vector<int> touched;
  for (int s = 0; s < num_samples; ++s) {
    touched.clear();
    for (int i = 0; i < top_k; ++i) {
      const int e = samples[static_cast<size_t>(s) * top_k + i];
      samples_of_expert_[e].push_back(s);
      for (int node : nodes_of_expert[e]) {
        if (miss[node] == 1.0) touched.push_back(node);
        miss[node] *= 1.0 - share(e, node);
      }
    }
    for (int node : touched) {
      hit_[node] += tokens_per_sample_ * (1.0 - miss[node]);
      miss[node] = 1.0;
    }
  }
}

int NodeHits::busiest() const {
  return static_cast<int>(std::max_element(hit_.begin(), hit_.end()) - hit_.begin());
}

double NodeHits::after(int node, int x, int dx, int y, int dy) {
  if (samples_.empty()) {
    double hit = hit_[node];
    if (x >= 0) hit += dx * load_[x] / count_[x];
    if (y >= 0) hit += dy * load_[y] / count_[y];
    return hit;
  }
  ++current_stamp_;
  double hit = hit_[node];
  for (const int changed : {x, y}) {
    if (changed < 0) continue;
    for (int s : samples_of_expert_[changed]) {
      if (stamp_[s] == current_stamp_) continue;
      stamp_[s] = current_stamp_;
      double miss = 1.0, miss_after = 1.0;
      for (int i = 0; i < top_k_; ++i) {
        const int e = samples_[static_cast<size_t>(s) * top_k_ + i];
        const double before = share(e, node);
        const int delta = (e == x ? dx : 0) + (e == y ? dy : 0);
        miss *= 1.0 - before;
        miss_after *= 1.0 - (before + static_cast<double>(delta) / count_[e]);
      }
      hit += tokens_per_sample_ * (miss - miss_after);
    }
  }
  return hit;
}

void NodeHits::apply_swap(int x, int a, int y, int b, double hit_a, double hit_b) {
  --replicas_[static_cast<size_t>(x) * num_nodes_ + a];
  ++replicas_[static_cast<size_t>(x) * num_nodes_ + b];
  if (y >= 0) {
    --replicas_[static_cast<size_t>(y) * num_nodes_ + b];
    ++replicas_[static_cast<size_t>(y) * num_nodes_ + a];
  }
  hit_[a] = hit_a;
  hit_[b] = hit_b;
}

}  // namespace moe_ep::core
