// Deployment model of MoE inference under TP x PP x EP x DP (docs/perf_model.md): one step of
// a batch through every layer, priced with the compute terms (perf_compute.h) and the
// communication terms (perf_comm.h).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "core/perf_comm.h"
#include "core/perf_compute.h"

namespace moe_ep::core {

struct ModelSpec {
  int num_layers = 61;
  int num_dense_layers = 3;  // the first layers, with a dense FFN instead of experts
  int hidden = 7168;
  int num_heads = 128;
  int head_dim = 128;
  int num_kv_heads = 0;   // 0: as many as num_heads (MHA); fewer: GQA
  int q_lora_rank = 0;    // MLA query compression; 0: a full query projection
  int kv_lora_rank = 0;   // > 0 selects MLA: the KV cache holds kv_lora_rank + rope_head_dim
  int rope_head_dim = 0;  // MLA decoupled rotary part of each query/key head
  int dense_ffn_hidden = 18432;
  int expert_ffn_hidden = 2048;
  int num_experts = 64;  // routed experts per MoE layer
  int top_k = 2;
  int num_expert_groups = 1;  // group-limited routing (RoutingSpec): groups, and how many picked
  int topk_groups = 1;
  int num_shared_experts = 0;
  int vocab_size = 129280;
  double weight_bytes = 2.0;      // bytes per weight element (BF16: 2, FP8: 1; GEMMs run at it)
  double activation_bytes = 2.0;  // bytes per activation / KV cache element

  RoutingSpec routing() const { return {num_experts, top_k, num_expert_groups, topk_groups}; }
  void validate() const;
};

// GPUs = tp * pp * dp. Attention runs TP within a group and DP across groups; the MoE layers of a
// pipeline stage spread their expert slots over ep of the stage's tp * dp GPUs, each expert
// sharded (tp * dp / ep) ways. EP groups and TP groups take consecutive GPUs.
struct StrategySpec {
  int tp = 1;
  int pp = 1;
  int ep = 1;
  int dp = 1;
  int micro_batches = 1;
  bool overlap = false;              // micro-batches' all-to-all on a second stream under compute
  Dedup dedup = Dedup::kRank;        // how dispatch copies tokens (perf_comm.h)
  int redundant_experts = 0;         // replica slots beyond num_experts per layer (EPLB-style)
  double expert_imbalance = 1.0;     // busiest GPU's expert rows / mean (the placement's)
  double link_imbalance = 1.0;       // busiest link's bytes / mean (the placement's)
  double attention_imbalance = 1.0;  // busiest attention (DP) group's attention time / mean
  double dispatch_bytes = 0.0;  // bytes per hidden element sent by dispatch; 0: activation_bytes
  double combine_bytes = 0.0;   // same for combine
  TransportSpec all_to_all;     // dispatch and combine
  TransportSpec collectives;    // TP all-reduce / all-gather, pipeline and KV-cache transfers

  void validate(const ModelSpec& model, const HardwareSpec& hw) const;
};

enum class Phase { kPrefill, kDecode };

struct WorkloadSpec {
  Phase phase = Phase::kDecode;
  double batch = 1;            // sequences per step, whole deployment
  double sequence_length = 1;  // prefill: prompt tokens; decode: context (KV cache) length
  int draft_tokens = 0;        // decode: speculative (MTP) tokens verified per sequence and step
  double acceptance_rate = 0;  // decode: probability that each draft token is accepted
  bool disaggregated = false;  // prefill: the KV cache leaves for decode nodes over the network

  // Tokens that go through the layers per step (decode: each sequence's token and its drafts).
  double tokens_per_step() const {
    return phase == Phase::kPrefill ? batch * sequence_length : batch * (1.0 + draft_tokens);
  }
  // Tokens delivered per step: prefill, the prompt tokens; decode, per sequence 1 + a + a^2 ...
  // (draft i survives when it and every draft before it are accepted).
  double output_tokens_per_step() const;
  void validate() const;
};

struct Prediction {
  double step_time_s = 0.0;   // one step of the whole batch through the pipeline
  double latency_s = 0.0;     // prefill: the step (time to first token); decode: per output token
  double tokens_per_s = 0.0;  // output_tokens_per_step / step_time_s
  double tokens_per_s_per_gpu = 0.0;
  int num_gpus = 0;
  // Seconds per step of the slowest pipeline stage, by stage name; sums to step_time_s.
  std::vector<std::pair<std::string, double>> breakdown;
  std::string bottleneck;                 // the largest entry of breakdown
  double intra_node_bytes_per_gpu = 0.0;  // per step, all layers of the slowest stage
  double inter_node_bytes_per_gpu = 0.0;
  double busiest_link_bytes = 0.0;    // per step, with link_imbalance
  double memory_bytes_per_gpu = 0.0;  // the fullest stage: weights + KV cache + activations
  double weight_bytes_per_gpu = 0.0;
  double kv_cache_bytes_per_gpu = 0.0;
  bool fits_in_memory = false;
};

// Building blocks, exposed for tests.
double attention_params_per_layer(const ModelSpec& model);
double kv_cache_bytes_per_token_per_layer(const ModelSpec& model);
double expert_params(const ModelSpec& model);

Prediction predict(const ModelSpec& model, const HardwareSpec& hw, const StrategySpec& strategy,
                   const WorkloadSpec& workload);

}  // namespace moe_ep::core
