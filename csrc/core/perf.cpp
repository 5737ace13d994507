#include "core/perf.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace moe_ep::core {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

bool is_mla(const ModelSpec& model) { return model.kv_lora_rank > 0; }

// Bytes of one ring collective step count: all-reduce sends 2 (n - 1) / n of the buffer, an
// all-gather (n - 1) / n, each in (n - 1) latency-bound steps per phase.
double ring_time(double buffer_bytes, int ranks, int phases, const LinkSpec& link,
                 double efficiency, double* bytes_sent) {
  if (ranks <= 1) return 0.0;
  const double sent = phases * buffer_bytes * (ranks - 1) / ranks;
  *bytes_sent += sent;
  return sent / (link.bandwidth_bytes_per_s * efficiency) + phases * (ranks - 1) * link.latency_s;
}

// Layers [first, first + count) of pipeline stage `stage`, split as evenly as possible.
std::pair<int, int> stage_layers(int num_layers, int pp, int stage) {
  const int base = num_layers / pp;
  const int extra = num_layers % pp;
  const int first = stage * base + std::min(stage, extra);
  return {first, base + (stage < extra ? 1 : 0)};
}

// Per-stage accumulators, one micro-batch, one GPU of the stage.
struct StageTimes {
  double attention = 0, gating = 0, dense_ffn = 0, dispatch = 0, experts = 0, combine = 0;
  double tp_collectives = 0, pipeline_p2p = 0, overlap_hidden = 0;
  double intra_bytes = 0, inter_bytes = 0;
  double weight_bytes = 0, kv_bytes = 0, activation_bytes = 0;

  double total() const {
    return attention + gating + dense_ffn + dispatch + experts + combine + tp_collectives +
           pipeline_p2p - overlap_hidden;
  }
};

}  // namespace

void ModelSpec::validate() const {
  require(num_layers >= 1, "model.num_layers must be >= 1");
  require(num_dense_layers >= 0 && num_dense_layers <= num_layers,
          "model.num_dense_layers must be in [0, num_layers]");
  require(hidden >= 1, "model.hidden must be >= 1");
  require(num_heads >= 1, "model.num_heads must be >= 1");
  require(head_dim >= 1, "model.head_dim must be >= 1");
  require(num_kv_heads >= 0 && num_kv_heads <= num_heads,
          "model.num_kv_heads must be in [0, num_heads]");
  require(q_lora_rank >= 0, "model.q_lora_rank must be >= 0");
  require(kv_lora_rank >= 0, "model.kv_lora_rank must be >= 0");
  require(rope_head_dim >= 0, "model.rope_head_dim must be >= 0");
  require(dense_ffn_hidden >= 1, "model.dense_ffn_hidden must be >= 1");
  require(expert_ffn_hidden >= 1, "model.expert_ffn_hidden must be >= 1");
  require(num_experts >= 1, "model.num_experts must be >= 1");
  require(top_k >= 1 && top_k <= num_experts, "model.top_k must be in [1, num_experts]");
  require(num_shared_experts >= 0, "model.num_shared_experts must be >= 0");
  require(vocab_size >= 0, "model.vocab_size must be >= 0");
  require(weight_bytes > 0, "model.weight_bytes must be > 0");
  require(activation_bytes > 0, "model.activation_bytes must be > 0");
}

void GpuSpec::validate() const {
  require(peak_flops > 0, "gpu.peak_flops must be > 0");
  require(mfu > 0 && mfu <= 1, "gpu.mfu must be in (0, 1]");
  require(memory_bandwidth > 0, "gpu.memory_bandwidth must be > 0");
  require(memory_efficiency > 0 && memory_efficiency <= 1,
          "gpu.memory_efficiency must be in (0, 1]");
}

void HardwareSpec::validate() const {
  gpu.validate();
  cluster.validate();
  require(cluster.gpu_memory_bytes > 0, "cluster.gpu_memory_bytes must be > 0");
  require(cluster.intra_node.bandwidth_bytes_per_s > 0,
          "cluster.intra_node.bandwidth_bytes_per_s must be > 0");
  require(cluster.inter_node.bandwidth_bytes_per_s > 0,
          "cluster.inter_node.bandwidth_bytes_per_s must be > 0");
  require(cluster.intra_node.latency_s >= 0, "cluster.intra_node.latency_s must be >= 0");
  require(cluster.inter_node.latency_s >= 0, "cluster.inter_node.latency_s must be >= 0");
  require(intra_node_efficiency > 0 && intra_node_efficiency <= 1,
          "hardware.intra_node_efficiency must be in (0, 1]");
  require(inter_node_efficiency > 0 && inter_node_efficiency <= 1,
          "hardware.inter_node_efficiency must be in (0, 1]");
}

void StrategySpec::validate(const ModelSpec& model, const HardwareSpec& hw) const {
  require(tp >= 1, "strategy.tp must be >= 1");
  require(pp >= 1, "strategy.pp must be >= 1");
  require(ep >= 1, "strategy.ep must be >= 1");
  require(dp >= 1, "strategy.dp must be >= 1");
  require(micro_batches >= 1, "strategy.micro_batches must be >= 1");
  require(!overlap || micro_batches >= 2,
          "strategy.micro_batches must be >= 2 when strategy.overlap is on");
  require(tp <= model.num_heads, "strategy.tp must be <= model.num_heads");
  require(pp <= model.num_layers, "strategy.pp must be <= model.num_layers");
  require((tp * dp) % ep == 0, "strategy.ep must divide strategy.tp * strategy.dp");
  require(static_cast<long long>(tp) * pp * dp <= hw.cluster.num_gpus(),
          "strategy.tp * pp * dp must be <= cluster GPUs (num_nodes * gpus_per_node)");
  require(expert_imbalance >= 1.0, "strategy.expert_imbalance must be >= 1 (max / mean)");
  require(link_imbalance >= 1.0, "strategy.link_imbalance must be >= 1 (max / mean)");
  require(dispatch_bytes >= 0, "strategy.dispatch_bytes must be >= 0");
  require(combine_bytes >= 0, "strategy.combine_bytes must be >= 0");
}

void WorkloadSpec::validate() const {
  require(batch > 0, "workload.batch must be > 0");
  require(sequence_length >= 1, "workload.sequence_length must be >= 1");
}

double attention_params_per_layer(const ModelSpec& m) {
  const double h = m.hidden, heads = m.num_heads, d = m.head_dim;
  const double output = heads * d * h;
  if (is_mla(m)) {
    const double q_head = d + m.rope_head_dim;
    const double query =
        m.q_lora_rank > 0 ? h * m.q_lora_rank + m.q_lora_rank * heads * q_head : h * heads * q_head;
    const double kv_down = h * (m.kv_lora_rank + m.rope_head_dim);
    const double kv_up = m.kv_lora_rank * heads * (d + d);  // keys (no rope part) and values
    return query + kv_down + kv_up + output;
  }
  const double kv_heads = m.num_kv_heads > 0 ? m.num_kv_heads : heads;
  return h * heads * d + 2.0 * h * kv_heads * d + output;
}

double kv_cache_bytes_per_token_per_layer(const ModelSpec& m) {
  if (is_mla(m)) return (m.kv_lora_rank + m.rope_head_dim) * m.activation_bytes;
  const double kv_heads = m.num_kv_heads > 0 ? m.num_kv_heads : m.num_heads;
  return 2.0 * kv_heads * m.head_dim * m.activation_bytes;
}

double expert_params(const ModelSpec& m) {
  return 3.0 * m.hidden * m.expert_ffn_hidden;  // gate, up and down projections
}

KernelCost kernel_cost(double flops, double bytes, const GpuSpec& gpu) {
  const double compute_s = flops / (gpu.peak_flops * gpu.mfu);
  const double memory_s = bytes / (gpu.memory_bandwidth * gpu.memory_efficiency);
  return {flops, bytes, std::max(compute_s, memory_s)};
}

double probability_group_hit(double num_experts, double group_experts, int top_k) {
  if (group_experts >= num_experts) return 1.0;
  double miss = 1.0;
  for (int i = 0; i < top_k; ++i) {
    miss *= std::max(0.0, (num_experts - group_experts - i) / (num_experts - i));
  }
  return 1.0 - miss;
}

AllToAllCost all_to_all_cost(double tokens_per_gpu, double bytes_per_token, int num_experts,
                             int top_k, int ep, bool dedup_tokens, double link_imbalance,
                             const HardwareSpec& hw) {
  AllToAllCost cost;
  if (ep <= 1 || tokens_per_gpu <= 0) return cost;
  const int gpus_per_node = hw.cluster.gpus_per_node;
  const int ranks_per_node = std::min(ep, gpus_per_node);
  const int nodes = (ep + gpus_per_node - 1) / gpus_per_node;
  const double experts = num_experts;
  double intra_copies = 0.0, inter_copies = 0.0;
  if (dedup_tokens) {
    // One copy per destination node over the network, then one per destination rank over
    // NVLink, except where the landing GPU is itself a destination.
    const double p_rank = probability_group_hit(experts, experts / ep, top_k);
    const double p_node = probability_group_hit(experts, experts / nodes, top_k);
    inter_copies = (nodes - 1) * p_node;
    intra_copies = nodes * (ranks_per_node - 1) * p_rank;
  } else {
    // One copy per (token, expert), sent straight to the expert's rank.
    inter_copies = top_k * static_cast<double>(ep - ranks_per_node) / ep;
    intra_copies = top_k * static_cast<double>(ranks_per_node - 1) / ep;
  }
  cost.intra_node_bytes = tokens_per_gpu * bytes_per_token * intra_copies;
  cost.inter_node_bytes = tokens_per_gpu * bytes_per_token * inter_copies;
  const LinkSpec& intra = hw.cluster.intra_node;
  const LinkSpec& inter = hw.cluster.inter_node;
  const double intra_s = cost.intra_node_bytes * link_imbalance /
                         (intra.bandwidth_bytes_per_s * hw.intra_node_efficiency);
  const double inter_s = cost.inter_node_bytes * link_imbalance /
                         (inter.bandwidth_bytes_per_s * hw.inter_node_efficiency);
  cost.time_s = std::max(intra_s, inter_s) + (nodes > 1 ? inter.latency_s : intra.latency_s);
  return cost;
}

Prediction predict(const ModelSpec& model, const HardwareSpec& hw, const StrategySpec& s,
                   const WorkloadSpec& w) {
  model.validate();
  hw.validate();
  s.validate(model, hw);
  w.validate();

  const GpuSpec& gpu = hw.gpu;
  const double h = model.hidden, heads = model.num_heads, act = model.activation_bytes;
  const double wb = model.weight_bytes, experts = model.num_experts, k = model.top_k;
  const double m = s.micro_batches, ctx = w.sequence_length;
  const bool prefill = w.phase == Phase::kPrefill;
  const int stage_gpus = s.tp * s.dp;
  const double expert_tp = static_cast<double>(stage_gpus) / s.ep;

  // One micro-batch: tokens per attention (DP) group, sequences per group, tokens per GPU.
  const double tokens_mb = w.tokens_per_step() / m;
  const double group_tokens = tokens_mb / s.dp;
  const double group_seqs = w.batch / m / s.dp;
  const double gpu_tokens = group_tokens / s.tp;

  // Attention: projections, then scores over the context (causal half for prefill). MLA decode
  // attends in the compressed latent space; its latent cache is not sharded by TP.
  double score_dim = model.head_dim, value_dim = model.head_dim;
  if (is_mla(model)) {
    score_dim =
        prefill ? model.head_dim + model.rope_head_dim : model.kv_lora_rank + model.rope_head_dim;
    value_dim = prefill ? model.head_dim : model.kv_lora_rank;
  }
  const double kv_heads = model.num_kv_heads > 0 ? model.num_kv_heads : heads;
  const double kv_shard = is_mla(model) ? 1.0 : std::min<double>(s.tp, kv_heads);
  const double kv_layer = kv_cache_bytes_per_token_per_layer(model);
  const double attn_params = attention_params_per_layer(model);
  const double score_flops = prefill ? group_seqs * heads * ctx * ctx * (score_dim + value_dim)
                                     : group_tokens * 2.0 * heads * ctx * (score_dim + value_dim);
  const double kv_traffic = prefill ? group_tokens * kv_layer : group_seqs * ctx * kv_layer;
  const KernelCost attention = kernel_cost(
      (group_tokens * 2.0 * attn_params + score_flops) / s.tp,
      attn_params * wb / s.tp + kv_traffic / kv_shard + 2.0 * group_tokens * h * act, gpu);

  const KernelCost gating =
      kernel_cost(2.0 * gpu_tokens * h * experts, experts * h * wb + gpu_tokens * h * act, gpu);
  auto dense_cost = [&](double ffn_hidden) {
    return kernel_cost(6.0 * group_tokens * h * ffn_hidden / s.tp,
                       3.0 * h * ffn_hidden * wb / s.tp + 2.0 * group_tokens * h * act, gpu);
  };
  const KernelCost dense_layer = dense_cost(model.dense_ffn_hidden);
  const double shared_hidden =
      static_cast<double>(model.num_shared_experts) * model.expert_ffn_hidden;
  const KernelCost shared = shared_hidden > 0 ? dense_cost(shared_hidden) : KernelCost{};

  // Routed experts: the busiest GPU's rows, and the weights of its local experts that get any.
  const double local_experts = std::max(1.0, experts / s.ep);
  const double replicas = std::max(1.0, s.ep / experts);
  const double p_active = 1.0 - std::pow(1.0 - k / experts, tokens_mb / replicas);
  const double rows = tokens_mb * k / s.ep * s.expert_imbalance;
  const KernelCost routed =
      kernel_cost(rows * 2.0 * expert_params(model) / expert_tp,
                  local_experts * p_active * expert_params(model) * wb / expert_tp +
                      rows * (2.0 * h + 3.0 * model.expert_ffn_hidden / expert_tp) * act,
                  gpu);

  const double dispatch_elem = s.dispatch_bytes > 0 ? s.dispatch_bytes : act;
  const double combine_elem = s.combine_bytes > 0 ? s.combine_bytes : act;
  const AllToAllCost dispatch =
      all_to_all_cost(gpu_tokens, h * dispatch_elem * expert_tp, model.num_experts, model.top_k,
                      s.ep, s.dedup_tokens, s.link_imbalance, hw);
  const AllToAllCost combine =
      all_to_all_cost(gpu_tokens, h * combine_elem * expert_tp, model.num_experts, model.top_k,
                      s.ep, s.dedup_tokens, s.link_imbalance, hw);

  // TP collectives: an all-reduce after attention and after a TP-sharded FFN; with EP the
  // expert outputs come back per GPU and are all-gathered across the TP group.
  const bool tp_in_node = s.tp <= hw.cluster.gpus_per_node;
  const LinkSpec& tp_link = tp_in_node ? hw.cluster.intra_node : hw.cluster.inter_node;
  const double tp_eff = tp_in_node ? hw.intra_node_efficiency : hw.inter_node_efficiency;
  const double tp_buffer = group_tokens * h * act;
  double tp_bytes_attn = 0, tp_bytes_ffn_dense = 0, tp_bytes_ffn_moe = 0;
  const double tp_attn_s = ring_time(tp_buffer, s.tp, 2, tp_link, tp_eff, &tp_bytes_attn);
  const double tp_dense_s = ring_time(tp_buffer, s.tp, 2, tp_link, tp_eff, &tp_bytes_ffn_dense);
  const double tp_moe_s =
      ring_time(tp_buffer, s.tp, s.ep > 1 ? 1 : 2, tp_link, tp_eff, &tp_bytes_ffn_moe);

  // Pipeline: each GPU forwards its share of the micro-batch's hidden states to the next stage.
  const bool p2p_inter = stage_gpus >= hw.cluster.gpus_per_node;
  const LinkSpec& p2p_link = p2p_inter ? hw.cluster.inter_node : hw.cluster.intra_node;
  const double p2p_eff = p2p_inter ? hw.inter_node_efficiency : hw.intra_node_efficiency;
  const double p2p_bytes = s.pp > 1 ? gpu_tokens * h * act : 0.0;
  const double p2p_s =
      s.pp > 1 ? p2p_bytes / (p2p_link.bandwidth_bytes_per_s * p2p_eff) + p2p_link.latency_s : 0.0;

  // The LM head scores every decoded token, but only the last prompt token of a prefill.
  const double head_tokens = prefill ? group_seqs : group_tokens;
  const KernelCost lm_head =
      kernel_cost(2.0 * head_tokens * h * model.vocab_size / s.tp,
                  static_cast<double>(model.vocab_size) * h * wb / s.tp, gpu);

  const double seqs_per_group = w.batch / s.dp;  // all micro-batches hold KV cache at once
  const double inflight = s.overlap ? 2.0 : 1.0;
  StageTimes worst, fullest;
  double worst_total = -1.0, fullest_memory = -1.0;
  for (int stage = 0; stage < s.pp; ++stage) {
    const auto [first, count] = stage_layers(model.num_layers, s.pp, stage);
    StageTimes t;
    bool has_moe = false;
    for (int layer = first; layer < first + count; ++layer) {
      const bool moe = layer >= model.num_dense_layers;
      has_moe = has_moe || moe;
      const double ffn_s = moe ? shared.time_s + routed.time_s : dense_layer.time_s;
      const double compute = attention.time_s + (moe ? gating.time_s : 0.0) + ffn_s + tp_attn_s +
                             (moe ? tp_moe_s : tp_dense_s);
      const double comm = moe ? dispatch.time_s + combine.time_s : 0.0;
      t.attention += attention.time_s;
      t.tp_collectives += tp_attn_s + (moe ? tp_moe_s : tp_dense_s);
      if (moe) {
        t.gating += gating.time_s;
        t.dense_ffn += shared.time_s;
        t.experts += routed.time_s;
        t.dispatch += dispatch.time_s;
        t.combine += combine.time_s;
        t.intra_bytes += dispatch.intra_node_bytes + combine.intra_node_bytes;
        t.inter_bytes += dispatch.inter_node_bytes + combine.inter_node_bytes;
      } else {
        t.dense_ffn += dense_layer.time_s;
      }
      if (s.overlap) t.overlap_hidden += compute + comm - std::max(compute, comm);
      const double tp_bytes = tp_bytes_attn + (moe ? tp_bytes_ffn_moe : tp_bytes_ffn_dense);
      (tp_in_node ? t.intra_bytes : t.inter_bytes) += tp_bytes;

      t.weight_bytes += attn_params * wb / s.tp;
      t.weight_bytes += moe ? local_experts * expert_params(model) * wb / expert_tp +
                                  3.0 * h * shared_hidden * wb / s.tp + experts * h * wb
                            : 3.0 * h * model.dense_ffn_hidden * wb / s.tp;
      t.kv_bytes += seqs_per_group * ctx * kv_layer / kv_shard;
    }
    if (stage == s.pp - 1) t.dense_ffn += lm_head.time_s;
    if (stage == 0 || stage == s.pp - 1) {
      // Token embedding on the first stage, LM head on the last (both when pp == 1).
      t.weight_bytes += (stage == 0 ? 1.0 : 0.0) * model.vocab_size * h * wb / s.tp +
                        (stage == s.pp - 1 ? 1.0 : 0.0) * model.vocab_size * h * wb / s.tp;
    }
    if (stage < s.pp - 1) {
      t.pipeline_p2p = p2p_s;
      (p2p_inter ? t.inter_bytes : t.intra_bytes) += p2p_bytes;
    }
    // Live activations: the micro-batches in flight, hidden states plus the expert rows.
    t.activation_bytes =
        inflight *
        (4.0 * group_tokens * h +
         (has_moe ? rows * (2.0 * h + 2.0 * model.expert_ffn_hidden / expert_tp) : 0.0)) *
        act;
    if (t.total() > worst_total) {
      worst_total = t.total();
      worst = t;
    }
    const double memory = t.weight_bytes + t.kv_bytes + t.activation_bytes;
    if (memory > fullest_memory) {
      fullest_memory = memory;
      fullest = t;
    }
  }

  Prediction p;
  p.num_gpus = s.tp * s.pp * s.dp;
  p.step_time_s = (m + s.pp - 1) * worst_total;
  p.latency_s = p.step_time_s;
  p.tokens_per_s = w.tokens_per_step() / p.step_time_s;
  p.tokens_per_s_per_gpu = p.tokens_per_s / p.num_gpus;
  p.breakdown = {{"attention", m * worst.attention},
                 {"gating", m * worst.gating},
                 {"dense_ffn", m * worst.dense_ffn},
                 {"dispatch", m * worst.dispatch},
                 {"experts", m * worst.experts},
                 {"combine", m * worst.combine},
                 {"tp_collectives", m * worst.tp_collectives},
                 {"pipeline_p2p", m * worst.pipeline_p2p},
                 {"pipeline_bubble", (s.pp - 1) * worst_total},
                 {"overlap_hidden", -m * worst.overlap_hidden}};
  p.bottleneck =
      std::max_element(p.breakdown.begin(), p.breakdown.end(), [](const auto& a, const auto& b) {
        return a.second < b.second;
      })->first;
  p.intra_node_bytes_per_gpu = m * worst.intra_bytes;
  p.inter_node_bytes_per_gpu = m * worst.inter_bytes;
  p.busiest_link_bytes =
      std::max(p.intra_node_bytes_per_gpu, p.inter_node_bytes_per_gpu) * s.link_imbalance;
  p.weight_bytes_per_gpu = fullest.weight_bytes;
  p.kv_cache_bytes_per_gpu = fullest.kv_bytes;
  p.memory_bytes_per_gpu = fullest_memory;
  p.fits_in_memory = p.memory_bytes_per_gpu <= hw.cluster.gpu_memory_bytes;
  return p;
}

}  // namespace moe_ep::core
