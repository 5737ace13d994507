// Fault domains: a plan in which no single GPU (or node) holds every copy of an expert, where
// the slots allow, so that expert parallelism survives the loss of one domain with every
// expert still on a survivor (moe_ep.elastic copies it from there instead of reading a
// host-side copy of the weights).
//
// A domain is a GPU (kGpu) or a node (kNode, gpus_per_node consecutive GPUs). An expert is
// protected when its slots lie in at least two domains; that takes 2E slots for E experts, so
// with fewer slots the most loaded experts are protected first. The pass keeps every GPU's
// slot count and never puts two copies of an expert on one GPU:
//   1. copies: while an expert has one slot and another has three or more, a slot of the
//      expert losing least load per replica becomes a slot of the most loaded single-slot
//      expert, on a GPU outside that expert's domain (a weight copy);
//   2. spare copies (beyond two) go where EPLB's rule sends them: from the expert losing
//      least load per replica to the one with the most, while that lowers the latter;
//   3. domains: an expert with several slots all in one domain trades one of them for a slot
//      of another domain whose expert stays protected, the trade with the lowest resulting
//      GPU maximum;
//   4. balance: slot swaps between the heaviest GPU and another while they lower its load,
//      each keeping both experts protected.
// Protection comes first: the GPU maximum may end above the unprotected plan's.
#pragma once

#include <utility>
#include <vector>

namespace moe_ep::core {

enum class FaultDomain { kNone, kGpu, kNode };

// GPUs per domain: 1 for kGpu, gpus_per_node for kNode, 0 (no domains) for kNone.
int gpus_per_domain(FaultDomain domain, int gpus_per_node);

// The pass above on one layer's (GPU, expert) pairs, one per slot; load[e] is expert e's load.
void protect_against_domain_loss(std::vector<std::pair<int, int>>& gpu_expert,
                                 const std::vector<double>& load, int num_gpus,
                                 int gpus_per_domain);

// Experts whose every slot lies in one domain (lost with it), ascending.
std::vector<int> unprotected_experts(const std::vector<std::pair<int, int>>& gpu_expert,
                                     int num_experts, int gpus_per_domain);

}  // namespace moe_ep::core
