// The search that lowers the inter-node link load: slot swaps between the node that
// receives the most token copies (NodeHits) and the nodes that receive the fewest, under a
// cap on every GPU's load, so that it never undoes the balance the packing reached. With
// co-activation samples it gathers experts that tokens choose together on one node.
#pragma once

#include <functional>

#include "core/node_hits.h"
#include "core/slot_layout.h"
#include "core/topology.h"

namespace moe_ep::core {

struct LinkSearchOptions {
  double gpu_cap = 0.0;  // no swap leaves a GPU above this load
  int light_nodes = 8;   // partner nodes tried per swap: the ones with the fewest copies
  // A swap must save the busiest node at least this share of its copies: smaller gains are
  // below what a few thousand samples resolve, and chasing them costs most of the time at
  // full scale (hundreds of nodes, each swap a sliver of one node's copies).
  double min_gain = 1e-3;
  int max_swaps = 0;
};

// Slot swaps between nodes that raise the co-activation kept inside nodes: the number of
// sampled (token, pair of its experts) on one node, each replica counting its share. Unlike
// the busiest node's copies, which move only once nearly all of a token's experts share a
// node, this rises with every partner gathered, so it can lead a layout from scattered
// topics to gathered ones. The best swap (largest gain) first, within the GPU cap and
// without doubles, while one gains; at most options.max_swaps.
void gather_coactivated(SlotLayout& layout, const std::vector<int>& count,
                        const ClusterSpec& cluster, const std::vector<int>& samples, int top_k,
                        const LinkSearchOptions& options);

// Swaps slots while a swap lowers the busiest node's copies (the swap whose two nodes end
// lowest first); no GPU ever holds two replicas of one expert. on_swap(x, y) follows every
// swap of slots x and y. Returns the number of swaps.
int lower_busiest_node(SlotLayout& layout, NodeHits& hits, const ClusterSpec& cluster,
                       const LinkSearchOptions& options,
                       const std::function<void(int, int)>& on_swap = nullptr);

}  // namespace moe_ep::core
