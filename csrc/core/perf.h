// Analytical cost model of MoE inference under TP x PP x EP x DP (docs/perf_model.md).
// Every stage is priced as max(FLOPs / calibrated FLOP rate, bytes / calibrated bandwidth);
// all-to-all stages are priced from the bytes on the busiest link.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "core/topology.h"

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
  int num_shared_experts = 0;
  int vocab_size = 129280;
  double weight_bytes = 2.0;      // bytes per weight element (BF16: 2, FP8: 1)
  double activation_bytes = 2.0;  // bytes per activation / KV cache element

  void validate() const;
};

struct GpuSpec {
  double peak_flops = 400e12;        // dense matmul FLOP/s at the model's weight dtype
  double mfu = 0.6;                  // fraction of peak_flops that kernels reach
  double memory_bandwidth = 1.8e12;  // HBM bytes/s
  double memory_efficiency = 0.8;    // fraction of memory_bandwidth that kernels reach

  void validate() const;
};

// The GPU, the cluster (topology.h; its gpu_memory_bytes is the capacity), plus the fraction of
// each link's bandwidth an all-to-all reaches.
struct HardwareSpec {
  GpuSpec gpu;
  ClusterSpec cluster;
  double intra_node_efficiency = 0.8;
  double inter_node_efficiency = 0.8;

  void validate() const;
};

// GPUs = tp * pp * dp. Attention runs TP within a group and DP across groups; the MoE layers of a
// pipeline stage spread their experts over ep of the stage's tp * dp GPUs, each expert sharded
// (tp * dp / ep) ways. EP groups and TP groups take consecutive GPUs.
struct StrategySpec {
  int tp = 1;
  int pp = 1;
  int ep = 1;
  int dp = 1;
  int micro_batches = 1;
  bool overlap = false;           // a micro-batch's all-to-all hidden behind another's compute
  bool dedup_tokens = true;       // one copy per (token, destination node/rank), not per expert
  double expert_imbalance = 1.0;  // busiest GPU's expert rows / mean (the placement's max/mean)
  double link_imbalance = 1.0;    // busiest link's bytes / mean (the placement's max link load)
  double dispatch_bytes = 0.0;    // bytes per hidden element sent by dispatch; 0: activation_bytes
  double combine_bytes = 0.0;     // same for combine

  void validate(const ModelSpec& model, const HardwareSpec& hw) const;
};

enum class Phase { kPrefill, kDecode };

struct WorkloadSpec {
  Phase phase = Phase::kDecode;
  double batch = 1;            // sequences per step, whole deployment
  double sequence_length = 1;  // prefill: prompt tokens; decode: context (KV cache) length

  double tokens_per_step() const {
    return phase == Phase::kPrefill ? batch * sequence_length : batch;
  }
  void validate() const;
};

// Cost of one operation on one GPU: the slower of its compute and its memory traffic.
struct KernelCost {
  double flops = 0.0;
  double bytes = 0.0;
  double time_s = 0.0;
};

// One all-to-all (dispatch or combine) as seen by the busiest GPU.
struct AllToAllCost {
  double intra_node_bytes = 0.0;  // bytes one GPU sends over NVLink (before link imbalance)
  double inter_node_bytes = 0.0;  // bytes one GPU sends over its NIC (before link imbalance)
  double time_s = 0.0;
};

struct Prediction {
  double step_time_s = 0.0;  // one step of the whole batch through the pipeline
  double latency_s = 0.0;    // decode: time per output token; prefill: time to first token
  double tokens_per_s = 0.0;
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

// Building blocks, exposed for tests and for validation against published kernel figures.
double attention_params_per_layer(const ModelSpec& model);
double kv_cache_bytes_per_token_per_layer(const ModelSpec& model);
double expert_params(const ModelSpec& model);
KernelCost kernel_cost(double flops, double bytes, const GpuSpec& gpu);

// P(a token's top-k, drawn uniformly among num_experts, hits a given group of group_experts).
double probability_group_hit(double num_experts, double group_experts, int top_k);

// One dispatch-like all-to-all of tokens_per_gpu tokens of bytes_per_token from every GPU of an
// EP group of ep ranks (consecutive GPUs), each token to its top_k of num_experts experts.
AllToAllCost all_to_all_cost(double tokens_per_gpu, double bytes_per_token, int num_experts,
                             int top_k, int ep, bool dedup_tokens, double link_imbalance,
                             const HardwareSpec& hw);

Prediction predict(const ModelSpec& model, const HardwareSpec& hw, const StrategySpec& strategy,
                   const WorkloadSpec& workload);

}  // namespace moe_ep::core
