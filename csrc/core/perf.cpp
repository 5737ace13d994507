#include "core/perf.h"

#include <algorithm>
#include <cmath>

#include "core/perf_require.h"

namespace moe_ep::core {
namespace {

bool is_mla(const ModelSpec& model) { return model.kv_lora_rank > 0; }

// Layers [first, first + count) of pipeline stage `stage`, split as evenly as possible.
std::pair<int, int> stage_layers(int num_layers, int pp, int stage) {
  const int base = num_layers / pp;
  const int extra = num_layers % pp;
  const int first = stage * base + std::min(stage, extra);
  return {first, base + (stage < extra ? 1 : 0)};
}

// One layer's costs for one micro-batch on one GPU.
struct LayerCosts {
  double attention = 0, gating = 0, ffn = 0, experts = 0, shared = 0, tp = 0;
  double dispatch = 0, combine = 0;
  double compute() const { return attention + gating + ffn + experts + shared + tp; }
  double comm() const { return dispatch + combine; }
};

// Per-step accumulators of one pipeline stage (all micro-batches), on one GPU.
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
  perf_require(num_layers >= 1, "model.num_layers must be >= 1");
  perf_require(num_dense_layers >= 0 && num_dense_layers <= num_layers,
               "model.num_dense_layers must be in [0, num_layers]");
  perf_require(hidden >= 1, "model.hidden must be >= 1");
  perf_require(num_heads >= 1, "model.num_heads must be >= 1");
  perf_require(head_dim >= 1, "model.head_dim must be >= 1");
  perf_require(num_kv_heads >= 0 && num_kv_heads <= num_heads,
               "model.num_kv_heads must be in [0, num_heads]");
  perf_require(q_lora_rank >= 0, "model.q_lora_rank must be >= 0");
  perf_require(kv_lora_rank >= 0, "model.kv_lora_rank must be >= 0");
  perf_require(rope_head_dim >= 0, "model.rope_head_dim must be >= 0");
  perf_require(dense_ffn_hidden >= 1, "model.dense_ffn_hidden must be >= 1");
  perf_require(expert_ffn_hidden >= 1, "model.expert_ffn_hidden must be >= 1");
  perf_require(num_experts >= 1, "model.num_experts must be >= 1");
  perf_require(top_k >= 1 && top_k <= num_experts, "model.top_k must be in [1, num_experts]");
  perf_require(num_expert_groups >= 1 && num_experts % num_expert_groups == 0,
               "model.num_expert_groups must be >= 1 and divide model.num_experts");
  perf_require(topk_groups >= 1 && topk_groups <= num_expert_groups,
               "model.topk_groups must be in [1, num_expert_groups]");
  perf_require(top_k <= topk_groups * (num_experts / num_expert_groups),
               "model.top_k must be <= the experts of model.topk_groups groups");
  perf_require(num_shared_experts >= 0, "model.num_shared_experts must be >= 0");
  perf_require(vocab_size >= 0, "model.vocab_size must be >= 0");
  perf_require(weight_bytes > 0, "model.weight_bytes must be > 0");
  perf_require(activation_bytes > 0, "model.activation_bytes must be > 0");
}

void StrategySpec::validate(const ModelSpec& model, const HardwareSpec& hw) const {
  perf_require(tp >= 1, "strategy.tp must be >= 1");
  perf_require(pp >= 1, "strategy.pp must be >= 1");
  perf_require(ep >= 1, "strategy.ep must be >= 1");
  perf_require(dp >= 1, "strategy.dp must be >= 1");
  perf_require(micro_batches >= 1, "strategy.micro_batches must be >= 1");
  perf_require(!overlap || micro_batches >= 2,
               "strategy.micro_batches must be >= 2 when strategy.overlap is on");
  perf_require(tp <= model.num_heads, "strategy.tp must be <= model.num_heads");
  perf_require(pp <= model.num_layers, "strategy.pp must be <= model.num_layers");
  perf_require((tp * dp) % ep == 0, "strategy.ep must divide strategy.tp * strategy.dp");
  perf_require(static_cast<long long>(tp) * pp * dp <= hw.cluster.num_gpus(),
               "strategy.tp * pp * dp must be <= cluster GPUs (num_nodes * gpus_per_node)");
  perf_require(redundant_experts >= 0, "strategy.redundant_experts must be >= 0");
  perf_require(expert_imbalance >= 1.0, "strategy.expert_imbalance must be >= 1 (max / mean)");
  perf_require(link_imbalance >= 1.0, "strategy.link_imbalance must be >= 1 (max / mean)");
  perf_require(attention_imbalance >= 1.0,
               "strategy.attention_imbalance must be >= 1 (max / mean)");
  perf_require(dispatch_bytes >= 0, "strategy.dispatch_bytes must be >= 0");
  perf_require(combine_bytes >= 0, "strategy.combine_bytes must be >= 0");
  all_to_all.validate();
  collectives.validate();
  perf_require(all_to_all.sms < hw.gpu.num_sms,
               "strategy.all_to_all.sms must be < gpu.num_sms (compute needs an SM)");
}

double WorkloadSpec::output_tokens_per_step() const {
  if (phase == Phase::kPrefill) return batch * sequence_length;
  double per_sequence = 1.0, survive = 1.0;
  for (int i = 0; i < draft_tokens; ++i) {
    survive *= acceptance_rate;
    per_sequence += survive;
  }
  return batch * per_sequence;
}

void WorkloadSpec::validate() const {
  perf_require(batch > 0, "workload.batch must be > 0");
  perf_require(sequence_length >= 1, "workload.sequence_length must be >= 1");
  perf_require(draft_tokens >= 0, "workload.draft_tokens must be >= 0");
  perf_require(phase == Phase::kDecode || draft_tokens == 0,
               "workload.draft_tokens must be 0 for prefill");
  perf_require(acceptance_rate >= 0 && acceptance_rate <= 1,
               "workload.acceptance_rate must be in [0, 1]");
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

Prediction predict(const ModelSpec& model, const HardwareSpec& hw, const StrategySpec& s,
                   const WorkloadSpec& w) {
  model.validate();
  hw.validate();
  s.validate(model, hw);
  w.validate();

  const GpuSpec& gpu = hw.gpu;
  const double h = model.hidden, heads = model.num_heads, d = model.head_dim;
  const double act = model.activation_bytes, wb = model.weight_bytes;
  const double experts = model.num_experts, k = model.top_k;
  const double m = s.micro_batches, ctx = w.sequence_length;
  const bool prefill = w.phase == Phase::kPrefill;
  const int gpus_per_node = hw.cluster.gpus_per_node;
  const double expert_tp = static_cast<double>(s.tp * s.dp) / s.ep;
  const double heads_tp = heads / s.tp;

  // One micro-batch: tokens per attention (DP) group, sequences per group, tokens per GPU.
  const double tokens_mb = w.tokens_per_step() / m;
  const double group_tokens = tokens_mb / s.dp;
  const double group_seqs = w.batch / m / s.dp;
  const double gpu_tokens = group_tokens / s.tp;

  // GEMMs run in the weight dtype (FP8 models quantise their activations) and write activations.
  auto gemm = [&](double rows, double cols, double depth, double groups = 1.0) {
    return gemm_cost(rows, cols, depth, groups, wb, act, gpu).time_s;
  };
  // Memory-bound kernels between the GEMMs, by the bytes they must move: a fused residual add and
  // RMSNorm reads the residual and the new output and writes the residual and the quantised
  // GEMM input; a SiLU-and-mul reads gate and up and writes the quantised product.
  auto elementwise = [&](double bytes, int kernels) {
    return elementwise_cost(bytes, kernels, gpu).time_s;
  };
  const double add_norm = group_tokens * h * (3.0 * act + wb);
  auto ffn = [&](double rows, double ffn_hidden, double shards) {  // gated: gate+up, then down
    return gemm(rows, 2.0 * ffn_hidden / shards, h) + gemm(rows, h, ffn_hidden / shards) +
           elementwise(rows * ffn_hidden / shards * (2.0 * act + wb), 1);
  };

  // Attention projections: per-head projections are split over TP, low-rank ones replicated.
  double projections = 0.0;
  if (is_mla(model)) {
    const double q_head = d + model.rope_head_dim;
    projections +=
        gemm(group_tokens, model.q_lora_rank + model.kv_lora_rank + model.rope_head_dim, h);
    projections +=
        gemm(group_tokens, heads_tp * q_head, model.q_lora_rank > 0 ? model.q_lora_rank : h);
    projections += gemm(group_tokens, heads_tp * 2.0 * d, model.kv_lora_rank);
  } else {
    const double kv_heads = model.num_kv_heads > 0 ? model.num_kv_heads : heads;
    projections += gemm(group_tokens, (heads_tp + 2.0 * std::max(1.0, kv_heads / s.tp)) * d, h);
  }
  projections += gemm(group_tokens, h, heads_tp * d);  // output projection

  // Core attention (BF16): scores over the context, causal half for prefill. MLA decode attends
  // in the compressed latent space; its latent cache is not sharded by TP.
  double score_dim = d, value_dim = d;
  if (is_mla(model)) {
    score_dim = prefill ? d + model.rope_head_dim : model.kv_lora_rank + model.rope_head_dim;
    value_dim = prefill ? d : model.kv_lora_rank;
  }
  const double kv_heads = model.num_kv_heads > 0 ? model.num_kv_heads : heads;
  const double kv_shard = is_mla(model) ? 1.0 : std::min<double>(s.tp, kv_heads);
  const double kv_layer = kv_cache_bytes_per_token_per_layer(model);
  const double score_flops = prefill
                                 ? group_seqs * heads_tp * ctx * ctx * (score_dim + value_dim)
                                 : group_tokens * 2.0 * heads_tp * ctx * (score_dim + value_dim);
  const double kv_traffic = (prefill ? group_tokens : group_seqs * ctx) * kv_layer / kv_shard;
  const double query_traffic = group_tokens * heads_tp * (score_dim + value_dim) * act;
  const double core_attention = attention_cost(score_flops, kv_traffic + query_traffic, gpu).time_s;
  // The pre-attention add + norm, and the attention output quantised for its projection.
  const double attention_elementwise =
      elementwise(add_norm + group_tokens * heads_tp * d * (act + wb), 2);

  LayerCosts dense_layer, moe_layer;
  dense_layer.attention = moe_layer.attention =
      (projections + core_attention + attention_elementwise) * s.attention_imbalance;
  // The pre-FFN add + norm: with the dense FFN, or with the router of a MoE layer.
  dense_layer.ffn = ffn(group_tokens, model.dense_ffn_hidden, s.tp) + elementwise(add_norm, 1);
  moe_layer.gating =
      gemm_cost(gpu_tokens, experts, h, 1.0, act, act, gpu).time_s + elementwise(add_norm, 1);
  const double shared_hidden =
      static_cast<double>(model.num_shared_experts) * model.expert_ffn_hidden;
  moe_layer.shared = shared_hidden > 0 ? ffn(group_tokens, shared_hidden, s.tp) : 0.0;

  // Routed experts: the busiest GPU's rows over its slots that get any (a (token, expert) pair
  // lands on one of `slots` slots; replicas split their expert's load).
  const double slots = std::max<double>(experts + s.redundant_experts, s.ep);
  const double local_slots = slots / s.ep;
  const double rows = tokens_mb * k / s.ep * s.expert_imbalance;
  const double active = local_slots * (1.0 - std::pow(1.0 - 1.0 / slots, tokens_mb * k));
  moe_layer.experts =
      gemm(rows / active, 2.0 * model.expert_ffn_hidden / expert_tp, h, active) +
      gemm(rows / active, h, model.expert_ffn_hidden / expert_tp, active) +
      // SiLU-and-mul of every row, and one pass that gathers the rows into
      // expert order and weights them back into their tokens.
      elementwise(rows * (model.expert_ffn_hidden / expert_tp * (2.0 * act + wb) + h * (wb + act)),
                  2);

  const RoutingSpec routing = model.routing();
  const double dispatch_elem = s.dispatch_bytes > 0 ? s.dispatch_bytes : act;
  const double combine_elem = s.combine_bytes > 0 ? s.combine_bytes : act;
  const AllToAllCost dispatch = all_to_all_cost(gpu_tokens, h * dispatch_elem * expert_tp, routing,
                                                s.ep, s.dedup, s.link_imbalance, hw, s.all_to_all);
  const AllToAllCost combine = all_to_all_cost(gpu_tokens, h * combine_elem * expert_tp, routing,
                                               s.ep, s.dedup, s.link_imbalance, hw, s.all_to_all);
  moe_layer.dispatch = dispatch.time_s;
  moe_layer.combine = combine.time_s;

  // TP collectives: an all-reduce after attention and after a TP-sharded FFN; with EP the
  // expert outputs come back per GPU and are all-gathered across the TP group.
  const bool tp_in_node = s.tp <= gpus_per_node;
  const double tp_buffer = group_tokens * h * act;
  auto ring = [&](int phases) {
    return ring_collective_time(tp_buffer, s.tp, phases, tp_in_node, hw, s.collectives);
  };
  const double ring_bytes = tp_buffer * (s.tp - 1) / s.tp;  // sent per pass
  dense_layer.tp = 2.0 * ring(2);
  moe_layer.tp = ring(2) + ring(s.ep > 1 ? 1 : 2);
  const double dense_tp_bytes = 4.0 * ring_bytes,
               moe_tp_bytes = (s.ep > 1 ? 3.0 : 4.0) * ring_bytes;

  // Pipeline: each GPU forwards its share of the micro-batch's hidden states to the next stage.
  const bool p2p_in_node = s.tp * s.dp < gpus_per_node;
  const double p2p_bytes = s.pp > 1 ? gpu_tokens * h * act : 0.0;
  const double p2p_s = p2p_time(p2p_bytes, p2p_in_node, hw, s.collectives);

  // The LM head scores every decoded token, but only the last prompt token of a prefill.
  const double head_tokens = prefill ? group_seqs : group_tokens;
  const double lm_head = model.vocab_size > 0 ? gemm(head_tokens, model.vocab_size / s.tp, h) : 0.0;

  // Speculative decoding: the MTP module (one MoE layer per draft token) runs on the last stage.
  const int mtp_layers = w.draft_tokens;
  const double sm_fraction = static_cast<double>(s.all_to_all.sms) / gpu.num_sms;
  const double seqs_per_group = w.batch / s.dp;  // all micro-batches hold KV cache at once
  const double inflight = s.overlap ? 2.0 : 1.0;
  StageTimes worst, fullest;
  double worst_total = -1.0, fullest_memory = -1.0;
  for (int stage = 0; stage < s.pp; ++stage) {
    const auto [first, count] = stage_layers(model.num_layers, s.pp, stage);
    const int extra = stage == s.pp - 1 ? mtp_layers : 0;
    StageTimes t;
    bool has_moe = false;
    for (int layer = first; layer < first + count + extra; ++layer) {
      const bool moe = layer >= model.num_dense_layers;
      const bool resident = layer < first + count;  // MTP layers reuse a resident MoE layer
      has_moe = has_moe || moe;
      const LayerCosts& c = moe ? moe_layer : dense_layer;
      const double compute = m * c.compute(), comm = m * c.comm();
      const double layer_time =
          s.overlap ? overlapped_time(compute, comm, sm_fraction) : compute + comm;
      t.attention += m * c.attention;
      t.gating += m * c.gating;
      t.dense_ffn += m * (c.ffn + c.shared);
      t.experts += m * c.experts;
      t.dispatch += m * c.dispatch;
      t.combine += m * c.combine;
      t.tp_collectives += m * c.tp;
      t.overlap_hidden += compute + comm - layer_time;
      const double tp_bytes = m * (moe ? moe_tp_bytes : dense_tp_bytes);
      (tp_in_node ? t.intra_bytes : t.inter_bytes) += tp_bytes;
      if (moe) {
        t.intra_bytes += m * (dispatch.intra_node_bytes + combine.intra_node_bytes);
        t.inter_bytes += m * (dispatch.inter_node_bytes + combine.inter_node_bytes);
      }
      if (!resident) continue;
      t.weight_bytes += attention_params_per_layer(model) * wb / s.tp;
      t.weight_bytes += moe ? local_slots * expert_params(model) * wb / expert_tp +
                                  3.0 * h * shared_hidden * wb / s.tp + experts * h * act
                            : 3.0 * h * model.dense_ffn_hidden * wb / s.tp;
      t.kv_bytes += seqs_per_group * ctx * kv_layer / kv_shard;
    }
    if (stage == s.pp - 1) t.dense_ffn += m * lm_head;
    // Token embedding on the first stage, LM head on the last (both when pp == 1).
    const double vocab_weights = static_cast<double>(model.vocab_size) * h * wb / s.tp;
    t.weight_bytes +=
        (stage == 0 ? vocab_weights : 0.0) + (stage == s.pp - 1 ? vocab_weights : 0.0);
    if (stage < s.pp - 1) {
      t.pipeline_p2p = m * p2p_s;
      (p2p_in_node ? t.intra_bytes : t.inter_bytes) += m * p2p_bytes;
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

  // The pipeline: m micro-batches through pp stages take (m + pp - 1) / m of a stage's work.
  const double bubble = (s.pp - 1) * worst_total / m;
  double step = worst_total + bubble;
  // Disaggregated prefill ships each GPU's share of the new KV cache over the network, in the
  // background: it costs time only where it outlasts the step.
  double kv_exposed = 0.0;
  if (prefill && w.disaggregated) {
    const double layers_per_stage = static_cast<double>(model.num_layers) / s.pp;
    const double kv_bytes = w.tokens_per_step() / (s.dp * s.tp) * layers_per_stage * kv_layer;
    kv_exposed = std::max(0.0, p2p_time(kv_bytes, false, hw, s.collectives) - step);
    step += kv_exposed;
  }

  Prediction p;
  p.num_gpus = s.tp * s.pp * s.dp;
  p.step_time_s = step;
  const double output_tokens = w.output_tokens_per_step();
  p.latency_s = prefill ? step : step * w.batch / output_tokens;
  p.tokens_per_s = output_tokens / step;
  p.tokens_per_s_per_gpu = p.tokens_per_s / p.num_gpus;
  p.breakdown = {{"attention", worst.attention},
                 {"gating", worst.gating},
                 {"dense_ffn", worst.dense_ffn},
                 {"dispatch", worst.dispatch},
                 {"experts", worst.experts},
                 {"combine", worst.combine},
                 {"tp_collectives", worst.tp_collectives},
                 {"pipeline_p2p", worst.pipeline_p2p},
                 {"pipeline_bubble", bubble},
                 {"kv_transfer", kv_exposed},
                 {"overlap_hidden", -worst.overlap_hidden}};
  p.bottleneck =
      std::max_element(p.breakdown.begin(), p.breakdown.end(), [](const auto& a, const auto& b) {
        return a.second < b.second;
      })->first;
  p.intra_node_bytes_per_gpu = worst.intra_bytes;
  p.inter_node_bytes_per_gpu = worst.inter_bytes;
  p.busiest_link_bytes =
      std::max(p.intra_node_bytes_per_gpu, p.inter_node_bytes_per_gpu) * s.link_imbalance;
  p.weight_bytes_per_gpu = fullest.weight_bytes;
  p.kv_cache_bytes_per_gpu = fullest.kv_bytes;
  p.memory_bytes_per_gpu = fullest_memory;
  p.fits_in_memory = p.memory_bytes_per_gpu <= hw.cluster.gpu_memory_bytes;
  return p;
}

}  // namespace moe_ep::core
