// Deployment model of the cost model (perf.h), against hand-computed cases.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "core/perf.h"
#include "core/tests/perf_test_support.h"

namespace moe_ep::core {
namespace {

ModelSpec seeds_model() { return ModelSpec{}; }  // the defaults are the seeds' model

ModelSpec deepseek_v3() {
  ModelSpec m;
  m.q_lora_rank = 1536;
  m.kv_lora_rank = 512;
  m.rope_head_dim = 64;
  m.num_experts = 256;
  m.top_k = 8;
  m.num_expert_groups = 8;
  m.topk_groups = 4;
  m.num_shared_experts = 1;
  return m;
}

StrategySpec expert_parallel(int gpus, int micro_batches) {
  StrategySpec s;
  s.dp = gpus;
  s.ep = gpus;
  s.micro_batches = micro_batches;
  s.all_to_all.nvlink_fixed_s = 20e-6;
  s.all_to_all.network_fixed_s = 40e-6;
  s.collectives.nvlink_fixed_s = 10e-6;
  s.collectives.network_fixed_s = 20e-6;
  return s;
}

WorkloadSpec prefill(double batch, double sequence_length) {
  WorkloadSpec w;
  w.phase = Phase::kPrefill;
  w.batch = batch;
  w.sequence_length = sequence_length;
  return w;
}

double stage(const Prediction& p, const std::string& name) {
  for (const auto& [key, value] : p.breakdown)
    if (key == name) return value;
  ADD_FAILURE() << "no stage " << name;
  return 0.0;
}

double compute_part(const Prediction& p) {
  return stage(p, "attention") + stage(p, "gating") + stage(p, "dense_ffn") + stage(p, "experts") +
         stage(p, "tp_collectives");
}

TEST(PerfFormulas, AttentionParamsMha) {
  // Q, K, V, O: 4 x 7168 x (128 x 128).
  EXPECT_DOUBLE_EQ(attention_params_per_layer(seeds_model()), 4.0 * 7168 * 16384);
}

TEST(PerfFormulas, AttentionParamsMla) {
  const double q = 7168.0 * 1536 + 1536.0 * 128 * 192;
  const double kv = 7168.0 * 576 + 512.0 * 128 * 256;
  const double o = 16384.0 * 7168;
  EXPECT_DOUBLE_EQ(attention_params_per_layer(deepseek_v3()), q + kv + o);
  EXPECT_DOUBLE_EQ(attention_params_per_layer(deepseek_v3()), 187105280.0);
}

TEST(PerfFormulas, KvCacheBytes) {
  EXPECT_DOUBLE_EQ(kv_cache_bytes_per_token_per_layer(seeds_model()), 2.0 * 128 * 128 * 2);
  EXPECT_DOUBLE_EQ(kv_cache_bytes_per_token_per_layer(deepseek_v3()), 576.0 * 2);
  ModelSpec gqa = seeds_model();
  gqa.num_kv_heads = 8;
  EXPECT_DOUBLE_EQ(kv_cache_bytes_per_token_per_layer(gqa), 2.0 * 8 * 128 * 2);
}

TEST(PerfFormulas, GatedExpertIsThreeMatrices) {
  // FACTS.md: 3 x 7168 x 2048 x 2 bytes = 88 MB in BF16.
  EXPECT_DOUBLE_EQ(expert_params(seeds_model()) * 2.0, 88080384.0);
}

TEST(PerfFormulas, OutputTokensOfSpeculativeDecoding) {
  WorkloadSpec w;
  w.batch = 10;
  w.draft_tokens = 3;
  w.acceptance_rate = 0.5;
  EXPECT_DOUBLE_EQ(w.tokens_per_step(), 40.0);
  EXPECT_DOUBLE_EQ(w.output_tokens_per_step(), 10.0 * (1 + 0.5 + 0.25 + 0.125));
  w.phase = Phase::kPrefill;
  w.draft_tokens = 0;
  w.sequence_length = 100;
  EXPECT_DOUBLE_EQ(w.output_tokens_per_step(), 1000.0);
}

TEST(PerfPredict, SingleGpuDenseDecodeIsWeightReadBound) {
  // One dense layer, one GPU, one token, a one-token context, the ideal GPU: every GEMM reads
  // its weights once at 3.35 TB/s, the attention kernel its tiny KV cache and query, the
  // elementwise kernels their few vectors.
  ModelSpec m = seeds_model();
  m.num_layers = 1;
  m.num_dense_layers = 1;
  m.vocab_size = 0;
  WorkloadSpec w;
  const Prediction p = predict(m, h100_like_nodes(1), StrategySpec{}, w);
  const double bw = 3.35e12;
  auto gemm_bytes = [](double n, double k) { return (n * k + k) * 2 + n * 2; };
  const double qkv = gemm_bytes(3 * 16384, 7168), out = gemm_bytes(7168, 16384);
  const double core = 65536 + 128.0 * 256 * 2;   // one K/V entry and one query/output
  const double add_norm = 7168.0 * (3 * 2 + 2);  // residual and output in, residual and input out
  const double out_quant = 16384.0 * (2 + 2);    // attention output in, projection input out
  const double ffn = gemm_bytes(2 * 18432, 7168) + gemm_bytes(7168, 18432);
  const double silu = 18432.0 * (2 * 2 + 2);  // gate and up in, product out
  const double attention = qkv + out + core + add_norm + out_quant;
  const double dense = ffn + silu + add_norm;
  EXPECT_NEAR(stage(p, "attention"), attention / bw, 1e-12);
  EXPECT_NEAR(stage(p, "dense_ffn"), dense / bw, 1e-12);
  EXPECT_NEAR(p.step_time_s, (attention + dense) / bw, 1e-12);
  EXPECT_DOUBLE_EQ(p.tokens_per_s, 1.0 / p.step_time_s);
  EXPECT_EQ(p.bottleneck, "attention");  // 940 MB of attention vs 793 MB of FFN weights
  EXPECT_DOUBLE_EQ(p.weight_bytes_per_gpu, (4.0 * 7168 * 16384 + 3.0 * 7168 * 18432) * 2);
}

TEST(PerfPredict, BreakdownSumsToStepTimeAndBubbleFollowsMicroBatches) {
  StrategySpec s;
  s.tp = 8;
  s.pp = 2;
  s.micro_batches = 4;
  const Prediction p = predict(seeds_model(), h100_like_nodes(2), s, prefill(8, 1024));
  double sum = 0;
  for (const auto& entry : p.breakdown) sum += entry.second;
  EXPECT_NEAR(sum, p.step_time_s, 1e-9 * p.step_time_s);
  // (m + pp - 1) / m stage times, of which (pp - 1) / m are the bubble.
  EXPECT_NEAR(stage(p, "pipeline_bubble"), p.step_time_s / 5.0, 1e-9 * p.step_time_s);
  EXPECT_EQ(p.num_gpus, 16);
  EXPECT_GT(stage(p, "tp_collectives"), 0.0);
  EXPECT_EQ(stage(p, "dispatch"), 0.0);
}

TEST(PerfPredict, OverlapChargesTheSmsCommunicationHolds) {
  // All layers MoE and alike, no LM head: the serial run gives each layer's compute W and
  // communication C; overlapped, a layer takes max(C, W + (sms / SMs) C).
  ModelSpec m = deepseek_v3();
  m.num_dense_layers = 0;
  m.vocab_size = 0;
  const WorkloadSpec w = prefill(64, 4096);
  StrategySpec s = expert_parallel(32, 2);
  const Prediction serial = predict(m, h100_like_nodes(4), s, w);
  const double compute = compute_part(serial) / m.num_layers;
  const double comm = (stage(serial, "dispatch") + stage(serial, "combine")) / m.num_layers;
  EXPECT_NEAR(serial.step_time_s, m.num_layers * (compute + comm), 1e-9 * serial.step_time_s);
  s.overlap = true;
  for (const int sms : {0, 33}) {
    s.all_to_all.sms = sms;
    const Prediction overlapped = predict(m, h100_like_nodes(4), s, w);
    const double layer = std::max(comm, compute + sms / 132.0 * comm);
    EXPECT_NEAR(overlapped.step_time_s, m.num_layers * layer, 1e-9 * serial.step_time_s) << sms;
    EXPECT_NEAR(stage(overlapped, "overlap_hidden"), overlapped.step_time_s - serial.step_time_s,
                1e-9 * serial.step_time_s);
  }
}

TEST(PerfPredict, SpeculativeDecodingAddsOneMoeLayerPerDraft) {
  // Drafts go through every layer like tokens, plus the MTP module (one MoE layer per draft):
  // the expert work of batch B with one draft is that of batch 2B, times (MoE layers + 1) / MoE
  // layers.
  const ModelSpec m = deepseek_v3();
  StrategySpec s = expert_parallel(16, 1);
  WorkloadSpec drafts;
  drafts.batch = 512;
  drafts.sequence_length = 2048;
  drafts.draft_tokens = 1;
  drafts.acceptance_rate = 0.8;
  WorkloadSpec doubled = drafts;
  doubled.batch = 1024;
  doubled.draft_tokens = 0;
  const Prediction a = predict(m, h100_like_nodes(2), s, drafts);
  const Prediction b = predict(m, h100_like_nodes(2), s, doubled);
  EXPECT_NEAR(stage(a, "experts"), stage(b, "experts") * 59.0 / 58.0, 1e-12);
  EXPECT_NEAR(a.tokens_per_s, 512 * 1.8 / a.step_time_s, 1e-6);
  EXPECT_NEAR(a.latency_s, a.step_time_s / 1.8, 1e-15);
}

TEST(PerfPredict, AttentionImbalanceStretchesAttention) {
  StrategySpec s = expert_parallel(16, 1);
  WorkloadSpec w;
  w.batch = 256;
  w.sequence_length = 4096;
  const Prediction even = predict(deepseek_v3(), h100_like_nodes(2), s, w);
  s.attention_imbalance = 1.25;
  const Prediction skew = predict(deepseek_v3(), h100_like_nodes(2), s, w);
  EXPECT_NEAR(stage(skew, "attention"), 1.25 * stage(even, "attention"), 1e-15);
  EXPECT_DOUBLE_EQ(stage(skew, "experts"), stage(even, "experts"));
}

TEST(PerfPredict, DisaggregatedPrefillWaitsForTheKvCacheOnlyWhenItIsSlower) {
  // A GPU far faster than its network: shipping the KV cache outlasts the compute.
  HardwareSpec hw = h100_like_nodes(1);
  hw.gpu.peak_flops = 1e18;
  hw.gpu.memory_bandwidth = 1e16;
  hw.cluster.inter_node.bandwidth_bytes_per_s = 1e9;
  ModelSpec m = deepseek_v3();
  StrategySpec s;
  s.collectives.network_fixed_s = 5e-6;
  WorkloadSpec w = prefill(2, 1000);
  const Prediction local = predict(m, hw, s, w);
  w.disaggregated = true;
  const Prediction shipped = predict(m, hw, s, w);
  const double kv_s = 5e-6 + 2000.0 * 61 * 1152 / (1e9 * 0.9);
  EXPECT_NEAR(shipped.step_time_s, kv_s, 1e-12);
  EXPECT_NEAR(stage(shipped, "kv_transfer"), kv_s - local.step_time_s, 1e-12);
  hw.cluster.inter_node.bandwidth_bytes_per_s = 1e15;  // now the compute is slower
  EXPECT_EQ(stage(predict(m, hw, s, w), "kv_transfer"), 0.0);
}

TEST(PerfPredict, ReplicaSlotsHoldMoreWeights) {
  StrategySpec s = expert_parallel(32, 1);
  WorkloadSpec w;
  w.batch = 32 * 64;
  w.sequence_length = 1024;
  const Prediction base = predict(deepseek_v3(), h100_like_nodes(4), s, w);
  s.redundant_experts = 32;  // 288 slots: 9 per GPU instead of 8
  const Prediction replicas = predict(deepseek_v3(), h100_like_nodes(4), s, w);
  const double expert_bytes = 3.0 * 7168 * 2048 * 2;
  EXPECT_NEAR(replicas.weight_bytes_per_gpu - base.weight_bytes_per_gpu, 58 * expert_bytes, 1.0);
}

TEST(PerfPredict, MemoryCountsKvCacheAndFlagsOverflow) {
  StrategySpec s;
  s.tp = 8;
  WorkloadSpec w;
  w.batch = 1;
  w.sequence_length = 4096;
  const Prediction small = predict(seeds_model(), h100_like_nodes(1), s, w);
  // KV: 61 layers x 4096 tokens x 64 KiB, split over 8 TP ranks.
  EXPECT_DOUBLE_EQ(small.kv_cache_bytes_per_gpu, 61.0 * 4096 * 65536 / 8);
  EXPECT_TRUE(small.fits_in_memory);  // ~390 GB of BF16 weights over 8 x 80 GB
  EXPECT_GT(small.weight_bytes_per_gpu, 48e9);
  HardwareSpec small_gpus = h100_like_nodes(1);
  small_gpus.cluster.gpu_memory_bytes = 40e9;
  EXPECT_FALSE(predict(seeds_model(), small_gpus, s, w).fits_in_memory);
}

TEST(PerfMonotonic, MoreBandwidthIsNeverSlower) {
  for (const int nodes : {2, 4, 32}) {
    StrategySpec s = expert_parallel(nodes * 8, 2);
    s.all_to_all.sms = 20;
    for (const bool overlap : {false, true}) {
      s.overlap = overlap;
      for (const Phase phase : {Phase::kPrefill, Phase::kDecode}) {
        WorkloadSpec w;
        w.phase = phase;
        w.batch = 64.0 * s.dp;
        w.sequence_length = phase == Phase::kPrefill ? 512 : 2048;
        double previous = 1e30;
        for (const double scale : {0.25, 0.5, 1.0, 2.0, 4.0}) {
          HardwareSpec hw = h100_like_nodes(nodes);
          hw.cluster.gpu_memory_bytes = 1e15;
          hw.cluster.inter_node.bandwidth_bytes_per_s *= scale;
          hw.cluster.intra_node.bandwidth_bytes_per_s *= scale;
          hw.gpu.memory_bandwidth *= scale;
          const double t = predict(deepseek_v3(), hw, s, w).step_time_s;
          EXPECT_LE(t, previous * (1 + 1e-12)) << nodes << " nodes, scale " << scale;
          previous = t;
        }
      }
    }
  }
}

TEST(PerfValidation, RejectsBadFieldsByName) {
  const HardwareSpec hw = h100_like_nodes(2);
  const WorkloadSpec w;
  auto expect_message = [](const ModelSpec& m, const StrategySpec& s, const WorkloadSpec& wl,
                           const HardwareSpec& h, const std::string& field) {
    expect_error_naming([&] { predict(m, h, s, wl); }, field);
  };
  ModelSpec m = seeds_model();
  m.top_k = 65;
  expect_message(m, {}, w, hw, "model.top_k");
  m = deepseek_v3();
  m.num_expert_groups = 7;
  expect_message(m, {}, w, hw, "model.num_expert_groups");
  StrategySpec s;
  s.ep = 3;
  expect_message(seeds_model(), s, w, hw, "strategy.ep");
  s = {};
  s.dp = 32;
  expect_message(seeds_model(), s, w, hw, "strategy.tp * pp * dp");
  s = {};
  s.overlap = true;
  expect_message(seeds_model(), s, w, hw, "strategy.micro_batches");
  s = {};
  s.attention_imbalance = 0.5;
  expect_message(seeds_model(), s, w, hw, "strategy.attention_imbalance");
  s = {};
  s.all_to_all.sms = 132;
  expect_message(seeds_model(), s, w, hw, "strategy.all_to_all.sms");
  s = {};
  s.collectives.network_fixed_s = -1;
  expect_message(seeds_model(), s, w, hw, "transport.network_fixed_s");
  WorkloadSpec bad;
  bad.batch = 0;
  expect_message(seeds_model(), {}, bad, hw, "workload.batch");
  bad = {};
  bad.acceptance_rate = 2;
  expect_message(seeds_model(), {}, bad, hw, "workload.acceptance_rate");
  bad = {};
  bad.phase = Phase::kPrefill;
  bad.draft_tokens = 1;
  expect_message(seeds_model(), {}, bad, hw, "workload.draft_tokens");
  HardwareSpec no_nic = hw;
  no_nic.cluster.inter_node.bandwidth_bytes_per_s = 0;
  expect_message(seeds_model(), {}, w, no_nic, "cluster.inter_node.bandwidth_bytes_per_s");
  HardwareSpec bad_gpu = hw;
  bad_gpu.gpu.memory_efficiency = 1.5;
  expect_message(seeds_model(), {}, w, bad_gpu, "gpu.memory_efficiency");
}

}  // namespace
}  // namespace moe_ep::core
