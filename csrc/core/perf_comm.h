// Communication terms of the cost model (docs/perf_model.md): every collective costs a fixed
// term (launch and synchronisation, different inside a node and across nodes), a term per peer
// it exchanges with, and its bytes on the busiest link over that link's effective bandwidth;
// overlapped with compute, it also takes the SMs its kernels hold.
#pragma once

#include "core/perf_compute.h"
#include "core/topology.h"

namespace moe_ep::core {

// The GPU, the cluster (topology.h; its gpu_memory_bytes is the capacity; its links' latency_s
// is the planner's and is not used here: TransportSpec holds the fixed costs), and the fraction
// of each link's nominal bandwidth that bulk transfers reach.
struct HardwareSpec {
  GpuSpec gpu;
  ClusterSpec cluster;
  double intra_node_efficiency = 1.0;
  double inter_node_efficiency = 1.0;

  void validate() const;
};

// One implementation of the collectives (GPU-initiated kernels such as DeepEP, or NCCL's host
// API): its fixed costs, its cost per peer, and the SMs its kernels hold while they run.
struct TransportSpec {
  double nvlink_fixed_s = 0.0;   // a collective whose ranks share one node
  double network_fixed_s = 0.0;  // a collective that spans nodes
  double per_peer_s = 0.0;       // per peer rank exchanged with (signalling, per-peer setup)
  int sms = 0;                   // SMs held while running (0: the copy engines / NIC do it)

  void validate() const;
};

// Top-k routing over num_experts experts, optionally group-limited: the token first picks
// topk_groups of num_groups equal groups of consecutive experts, then its top_k experts among
// those groups (DeepSeek-V3: 8 groups, 4 picked). Modelled as uniform: every choice equally
// likely.
struct RoutingSpec {
  int num_experts = 64;
  int top_k = 2;
  int num_groups = 1;
  int topk_groups = 1;

  bool group_limited() const { return topk_groups < num_groups; }
  void validate() const;
};

// Probability that a token's top-k hits at least one expert of an aligned block of `block`
// consecutive experts (a rank's or a node's experts under contiguous placement). A block larger
// than a group but not a whole number of groups is interpolated between its neighbours.
double probability_block_hit(const RoutingSpec& routing, double block);

// How dispatch copies tokens: one copy per (token, expert) sent straight to the expert's rank
// (DeepEP's low-latency kernels); one per (token, destination rank) (moe_ep's dispatch); or one
// per destination node over the network, forwarded over NVLink inside the node (DeepEP's normal
// kernels).
enum class Dedup { kExpert, kRank, kNode };

// One dispatch-like all-to-all, as seen by one GPU (the busiest, with link_imbalance).
struct AllToAllCost {
  double intra_node_bytes = 0.0;  // bytes one GPU sends over NVLink (before link imbalance)
  double inter_node_bytes = 0.0;  // bytes one GPU sends over its NIC (before link imbalance)
  int peers = 0;                  // ranks one GPU exchanges with
  double time_s = 0.0;
};

// tokens_per_gpu tokens of bytes_per_token from every GPU of an EP group of `ep` consecutive
// ranks. ep <= 1: nothing to send, zero cost.
AllToAllCost all_to_all_cost(double tokens_per_gpu, double bytes_per_token,
                             const RoutingSpec& routing, int ep, Dedup dedup, double link_imbalance,
                             const HardwareSpec& hw, const TransportSpec& transport);

// A ring collective over `ranks` GPUs of `phases` passes (all-reduce: 2, all-gather: 1), each
// sending (ranks - 1) / ranks of buffer_bytes in ranks - 1 steps with a peer each.
double ring_collective_time(double buffer_bytes, int ranks, int phases, bool within_node,
                            const HardwareSpec& hw, const TransportSpec& transport);

// One point-to-point transfer (pipeline stages, KV cache to a decode node).
double p2p_time(double bytes, bool within_node, const HardwareSpec& hw,
                const TransportSpec& transport);

// Compute and communication of the same step overlapped on separate streams: the
// communication kernels hold sm_fraction of the SMs while they run, so compute proceeds at
// (1 - sm_fraction) speed meanwhile: max(comm, compute + sm_fraction * comm).
double overlapped_time(double compute_s, double comm_s, double sm_fraction);

}  // namespace moe_ep::core
