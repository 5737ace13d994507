#include "core/perf_comm.h"

#include <algorithm>
#include <cmath>

#include "core/perf_require.h"

namespace moe_ep::core {
namespace {

// P(none of k distinct picks from `pool` items lands in a given set of `block` of them).
double probability_miss(double pool, double block, int k) {
  double miss = 1.0;
  for (int i = 0; i < k; ++i) miss *= std::max(0.0, (pool - block - i) / (pool - i));
  return miss;
}

double choose(int n, int r) {
  if (r < 0 || r > n) return 0.0;
  double result = 1.0;
  for (int i = 1; i <= r; ++i) result = result * (n - r + i) / i;
  return result;
}

// P(hit) of a block made of `whole` complete groups under group-limited routing: j of its groups
// are among the picked ones with hypergeometric probability, then the top-k must land in them.
double whole_groups_hit(const RoutingSpec& routing, int whole) {
  const int groups = routing.num_groups, picked = routing.topk_groups;
  const double group_size = static_cast<double>(routing.num_experts) / groups;
  const double pool = picked * group_size;
  double hit = 0.0;
  for (int j = 1; j <= std::min(whole, picked); ++j) {
    const double p_j =
        choose(whole, j) * choose(groups - whole, picked - j) / choose(groups, picked);
    hit += p_j * (1.0 - probability_miss(pool, j * group_size, routing.top_k));
  }
  return hit;
}

const LinkSpec& link(const HardwareSpec& hw, bool within_node) {
  return within_node ? hw.cluster.intra_node : hw.cluster.inter_node;
}

double link_rate(const HardwareSpec& hw, bool within_node) {
  return link(hw, within_node).bandwidth_bytes_per_s *
         (within_node ? hw.intra_node_efficiency : hw.inter_node_efficiency);
}

double fixed_time(const TransportSpec& transport, bool within_node) {
  return within_node ? transport.nvlink_fixed_s : transport.network_fixed_s;
}

}  // namespace

void HardwareSpec::validate() const {
  gpu.validate();
  cluster.validate();
  perf_require(cluster.gpu_memory_bytes > 0, "cluster.gpu_memory_bytes must be > 0");
  perf_require(cluster.intra_node.bandwidth_bytes_per_s > 0,
               "cluster.intra_node.bandwidth_bytes_per_s must be > 0");
  perf_require(cluster.inter_node.bandwidth_bytes_per_s > 0,
               "cluster.inter_node.bandwidth_bytes_per_s must be > 0");
  perf_require(intra_node_efficiency > 0 && intra_node_efficiency <= 1,
               "hardware.intra_node_efficiency must be in (0, 1]");
  perf_require(inter_node_efficiency > 0 && inter_node_efficiency <= 1,
               "hardware.inter_node_efficiency must be in (0, 1]");
}

void TransportSpec::validate() const {
  perf_require(nvlink_fixed_s >= 0, "transport.nvlink_fixed_s must be >= 0");
  perf_require(network_fixed_s >= 0, "transport.network_fixed_s must be >= 0");
  perf_require(per_peer_s >= 0, "transport.per_peer_s must be >= 0");
  perf_require(sms >= 0, "transport.sms must be >= 0");
}

void RoutingSpec::validate() const {
  perf_require(num_experts >= 1, "routing.num_experts must be >= 1");
  perf_require(num_groups >= 1 && num_experts % num_groups == 0,
               "routing.num_groups must be >= 1 and divide routing.num_experts");
  perf_require(topk_groups >= 1 && topk_groups <= num_groups,
               "routing.topk_groups must be in [1, num_groups]");
  perf_require(top_k >= 1 && top_k <= topk_groups * (num_experts / num_groups),
               "routing.top_k must be in [1, experts in the picked groups]");
}

double probability_block_hit(const RoutingSpec& routing, double block) {
  const double experts = routing.num_experts;
  if (block >= experts) return 1.0;
  if (block <= 0) return 0.0;
  if (!routing.group_limited()) return 1.0 - probability_miss(experts, block, routing.top_k);
  const double group_size = experts / routing.num_groups;
  const double pool = routing.topk_groups * group_size;
  if (block <= group_size) {
    const double p_group = static_cast<double>(routing.topk_groups) / routing.num_groups;
    return p_group * (1.0 - probability_miss(pool, block, routing.top_k));
  }
  const double whole = block / group_size;
  const int lower = static_cast<int>(std::floor(whole));
  const double upper_share = whole - lower;
  const double hit_lower = whole_groups_hit(routing, lower);
  return upper_share > 0
             ? hit_lower + upper_share * (whole_groups_hit(routing, lower + 1) - hit_lower)
             : hit_lower;
}

AllToAllCost all_to_all_cost(double tokens_per_gpu, double bytes_per_token,
                             const RoutingSpec& routing, int ep, Dedup dedup, double link_imbalance,
                             const HardwareSpec& hw, const TransportSpec& transport) {
  AllToAllCost cost;
  if (ep <= 1) return cost;
  const int ranks_per_node = std::min(ep, hw.cluster.gpus_per_node);
  const int nodes = (ep + hw.cluster.gpus_per_node - 1) / hw.cluster.gpus_per_node;
  const double experts = routing.num_experts;
  double intra_copies = 0.0, inter_copies = 0.0;
  switch (dedup) {
    case Dedup::kExpert:
      inter_copies = routing.top_k * static_cast<double>(ep - ranks_per_node) / ep;
      intra_copies = routing.top_k * static_cast<double>(ranks_per_node - 1) / ep;
      cost.peers = ep - 1;
      break;
    case Dedup::kRank: {
      const double p_rank = probability_block_hit(routing, experts / ep);
      inter_copies = (ep - ranks_per_node) * p_rank;
      intra_copies = (ranks_per_node - 1) * p_rank;
      cost.peers = ep - 1;
      break;
    }
    case Dedup::kNode: {
      // One copy to every other node hit; on every node (own or remote) the GPU the copy lands
      // on forwards it to the node's other ranks that were hit.
      const double p_rank = probability_block_hit(routing, experts / ep);
      const double p_node = probability_block_hit(routing, experts / nodes);
      inter_copies = (nodes - 1) * p_node;
      intra_copies = nodes * (ranks_per_node - 1) * p_rank;
      cost.peers = (nodes - 1) + (ranks_per_node - 1);
      break;
    }
  }
  cost.intra_node_bytes = tokens_per_gpu * bytes_per_token * intra_copies;
  cost.inter_node_bytes = tokens_per_gpu * bytes_per_token * inter_copies;
  const double intra_s = cost.intra_node_bytes * link_imbalance / link_rate(hw, true);
  const double inter_s = cost.inter_node_bytes * link_imbalance / link_rate(hw, false);
  cost.time_s = fixed_time(transport, nodes == 1) + cost.peers * transport.per_peer_s +
                std::max(intra_s, inter_s);
  return cost;
}

double ring_collective_time(double buffer_bytes, int ranks, int phases, bool within_node,
                            const HardwareSpec& hw, const TransportSpec& transport) {
  if (ranks <= 1) return 0.0;
  const double sent = phases * buffer_bytes * (ranks - 1) / ranks;
  return fixed_time(transport, within_node) + phases * (ranks - 1) * transport.per_peer_s +
         sent / link_rate(hw, within_node);
}

double p2p_time(double bytes, bool within_node, const HardwareSpec& hw,
                const TransportSpec& transport) {
  if (bytes <= 0) return 0.0;
  return fixed_time(transport, within_node) + transport.per_peer_s +
         bytes / link_rate(hw, within_node);
}

double overlapped_time(double compute_s, double comm_s, double sm_fraction) {
  return std::max(comm_s, compute_s + sm_fraction * comm_s);
}

}  // namespace moe_ep::core
