// Expert placement planner: which GPU hosts which (replica of an) expert of every MoE layer.
//
// Terms
//   E      experts per MoE layer (logical experts), G GPUs in the cluster, N nodes.
//   slot   a physical expert: one copy of one logical expert's weights on one GPU.
//   load   expected (token, expert) pairs per step. An expert's load is split evenly over
//          its replicas (the dispatcher picks a replica uniformly), so a GPU's load is the
//          sum over its slots of load[e] / replica_count[e].
//
// Token-source and traffic model (used for every "link load" below)
//   * The tokens of every layer originate uniformly on all G GPUs (attention runs data
//     parallel on every GPU of the EP group).
//   * Dispatch is node-deduplicated, as in DeepEP's internode mode: a token sends one copy
//     over the network to every remote node that hosts at least one of its chosen experts,
//     and the receiving node forwards it over NVLink to the GPUs that need it.
//   * hit[m] = expected token copies that node m must receive (from anywhere). With
//     co-activation samples, a sample S (the experts one token chose) hits node m with
//     probability 1 - prod_{e in S} (1 - f_e(m)), f_e(m) = share of e's replicas on m,
//     each sample standing for load_total / (samples * top_k) tokens. Without samples, every
//     (token, expert) pair is counted as its own copy (no dedup: an upper bound), so
//     hit[m] = the node's load.
//   * Inter-node link load of node m, per NIC (one NIC per GPU):
//       in[m]  = hit[m] * (N - 1) / N / gpus_per_node        (copies from other nodes)
//       out[m] = (sum_n hit[n] - hit[m]) / N / gpus_per_node (copies node m sends away)
//     link[m] = max(in[m], out[m]); the combine step sends the same amounts back.
//   * NVLink load of a GPU = its load * (1 - 1/G): every pair it processes that did not
//     originate on itself crosses its NVLink port once (directly from a node peer, or
//     forwarded after the network). It follows the GPU load, so balancing GPUs balances it.
//
// Policies
//   kBalanced   replica counts and a first packing by EPLB's published rules (highest load
//               per replica gets the next replica; slots heaviest-first into the lightest
//               GPU), and one that never puts two replicas of an expert on a GPU, each
//               improved by slot swaps between the heaviest GPU and any other; the lower
//               maximum wins (balanced_packing.h). The GPU maximum is never above what
//               EPLB's rules give on the same loads. With topology_aware, a node step:
//               * routing limited to groups (model.n_group > 1, topk_group below it)
//                 and a group count that the node count divides: whole groups on nodes
//                 (group_placement.h), EPLB's hierarchical layout improved;
//               * otherwise the GPUs' contents are permuted across nodes to balance node
//                 load (node_assignment.h), keeping the per-GPU balance exactly;
//               * with co-activation samples: slot swaps between nodes that lower the
//                 busiest node's copies, no GPU rising above the GPU maximum, from the
//                 layout as it is and (up to 512 slots a layer) from one where experts
//                 chosen together were gathered first, the better of the two
//                 (link_search.h); where groups are kept on nodes, the group-free plan
//                 replaces the grouped one when it is no worse in both maxima.
//               Searches are local: lower, not optimal. Layers are planned in parallel.
//   kGreedy     EPLB's global policy as published: its replica counts and packing (two
//               replicas of an expert may share a GPU), no swaps, no node step.
//   kSequential the seeds' layout: expert slots numbered layer by layer
//               (slot s = moe_ordinal * E + e) and placed on GPU s mod G, the dense layers
//               continuing the count after the last expert; no replicas. On 488 x 8 GPUs
//               with 61 layers (0-2 dense) and 64 experts it is exactly the seeds' map.
//
// Re-planning (kBalanced, a layer's LayerStats with previous_gpus / previous_phy2log): the
// GPU of every slot matters now (moving a slot means copying expert weights), so the plan
// starts from the previous slots and changes as few as it can (replan.h):
//   1. forced changes: replicas no longer needed are dropped (free), a GPU whose capacity
//      shrank sheds slots, and GPUs with room are filled, each new slot on the lightest GPU
//      with room that lacks the expert, the most loaded expert per replica first;
//   2. optional changes: a replica of the expert with the least load per replica (after the
//      change) becomes one of the expert with the most, while that lowers the largest load
//      per replica; slot swaps between the heaviest GPU and any other while each lowers the
//      heaviest GPU's load (the best first, then the cheapest); with topology_aware, the
//      node step: slot swaps between nodes that lower the busiest node's copies (from the
//      samples, or its load) without raising the GPU maximum.
//   3. of all the states step 2 passed through, the one whose optional moves fit max_moves
//      with the lowest GPU maximum, then the lowest link load, then the fewest moves. The
//      search never looks at the budget, so a larger budget never gives a worse plan.
// A move is a (GPU, expert) pair the previous placement lacked: one expert's weights to
// copy. A previous placement may lack experts (their GPUs failed, moe_ep.elastic): each gets
// a slot as a forced change.
//
// Fault domains (PlanOptions.fault_domain, any policy): no GPU (or node) holds every copy of
// an expert where the slots allow, after the plan above (fault_domains.h).
//
// Memory: a GPU holds bytes_per_expert for each slot it hosts (summed over layers) and
// dense_layer_bytes for each dense layer it runs (kBalanced / kGreedy: every GPU runs every
// dense layer; kSequential: one GPU per dense layer). The budget is
// gpu_memory_bytes - memory_reserve_bytes (the reserve holds attention weights, KV cache and
// activations); gpu_memory_bytes == 0 means no limit. When E is not a multiple of G the
// GPUs that take the extra slot rotate from layer to layer, so memory stays balanced.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/fault_domains.h"
#include "core/topology.h"

namespace moe_ep::core {

// Weight bytes of one gated FFN expert (three hidden x ffn_hidden matrices: gate, up, down).
double gated_ffn_bytes(int64_t hidden, int64_t ffn_hidden, int64_t dtype_bytes);

struct PlacementModel {
  int num_layers = 61;
  std::vector<int> dense_layers = {0, 1, 2};  // layer indices without experts
  int experts_per_layer = 64;
  int top_k = 2;
  double bytes_per_expert = 0.0;
  double dense_layer_bytes = 0.0;  // FFN weights of one dense layer
  // Group-limited routing (DeepSeek-V3: 8 groups, a token's experts from 4 of them). Expert
  // e is in group expert_group[e], or with expert_group empty in group e / (E / n_group)
  // (E a multiple of n_group). topk_group: the groups a token may use (0: unknown, taken
  // as limited). n_group == 1: no groups.
  int n_group = 1;
  int topk_group = 0;
  std::vector<int> expert_group;

  std::vector<int> moe_layers() const;       // the other layer indices, ascending
  std::vector<int> group_of_expert() const;  // the group of every expert
  bool routing_limited_to_groups() const {
    return n_group > 1 && (topk_group == 0 || topk_group < n_group);
  }
  void validate() const;
};

// Optional statistics of one MoE layer.
struct LayerStats {
  std::vector<double> expert_load;  // size E (or empty: derived from samples, else uniform)
  std::vector<int> coactivation;    // samples x top_k expert ids, row-major (may be empty)
  // Optional previous placement of the layer (re-planning, see above): the GPU and the
  // logical expert of every previous slot; both empty or of equal length.
  std::vector<int> previous_gpus;
  std::vector<int> previous_phy2log;
};

enum class Policy { kBalanced, kGreedy, kSequential };

struct PlanOptions {
  Policy policy = Policy::kBalanced;
  // Replicas per MoE layer beyond E (two of an expert may share a GPU); -1: as many as memory
  // allows, up to one slot per GPU (E <= G) or floor(E / G) + 1 slots per GPU (E > G).
  int redundant_experts = -1;
  double memory_reserve_bytes = 0.0;
  bool topology_aware = true;  // kBalanced only
  // Re-planning: optional moves per layer beyond the forced ones; -1: no limit.
  int max_moves = -1;
  // Replicas spread so that losing one GPU (kGpu) or node (kNode) loses no expert.
  FaultDomain fault_domain = FaultDomain::kNone;
};

struct LayerMetrics {
  double max_gpu_load = 0.0;
  double mean_gpu_load = 0.0;  // over the GPUs that host a slot of the layer
  double max_link_load = 0.0;  // inter-node, tokens per NIC per step (see header comment)
  double max_nvlink_load = 0.0;
};

struct LayerPlacement {
  int layer = 0;
  bool dense = false;
  // MoE layers: slots ordered by GPU, then expert.
  std::vector<int> phy2log;               // slot -> logical expert
  std::vector<std::vector<int>> log2phy;  // logical expert -> its slots, ascending
  std::vector<int> replica_count;         // logical expert -> number of slots
  // MoE layers: the GPU of every slot; dense layers: the GPUs that hold the layer.
  std::vector<int> gpus;
  // Re-planned layers: (GPU, expert) pairs the previous placement lacked (weight copies).
  int moves = 0;
  LayerMetrics metrics;
};

struct Placement {
  std::vector<LayerPlacement> layers;   // all num_layers, in layer order
  std::vector<double> gpu_memory_used;  // bytes per GPU
};

// Plans every layer. stats is empty or holds one entry per MoE layer (ascending layer order).
// Throws std::invalid_argument naming the offending field.
Placement plan_placement(const PlacementModel& model, const ClusterSpec& cluster,
                         const std::vector<LayerStats>& stats, const PlanOptions& options);

// Metrics of one MoE layer placement under the traffic model above.
LayerMetrics evaluate_layer(const LayerPlacement& layer, const ClusterSpec& cluster,
                            const LayerStats& stats, int top_k);

}  // namespace moe_ep::core
