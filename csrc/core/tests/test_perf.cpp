#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "core/perf.h"

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
  m.num_shared_experts = 1;
  return m;
}

HardwareSpec h100_nodes(int nodes) {
  HardwareSpec hw;
  hw.cluster.num_nodes = nodes;
  hw.cluster.gpus_per_node = 8;
  hw.cluster.intra_node = {450e9, 3e-6};
  hw.cluster.inter_node = {50e9, 5e-6};
  hw.cluster.gpu_memory_bytes = 64e9;
  return hw;
}

double stage(const Prediction& p, const std::string& name) {
  for (const auto& [key, value] : p.breakdown)
    if (key == name) return value;
  ADD_FAILURE() << "no stage " << name;
  return 0.0;
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

TEST(PerfFormulas, KernelCostIsTheSlowerOfComputeAndMemory) {
  const GpuSpec gpu;  // 400 TFLOP/s x 0.6, 1.8 TB/s x 0.8
  EXPECT_DOUBLE_EQ(kernel_cost(240e12, 0.0, gpu).time_s, 1.0);
  EXPECT_DOUBLE_EQ(kernel_cost(0.0, 1.44e12, gpu).time_s, 1.0);
  EXPECT_DOUBLE_EQ(kernel_cost(480e12, 1.44e12, gpu).time_s, 2.0);
  EXPECT_DOUBLE_EQ(kernel_cost(240e12, 2.88e12, gpu).time_s, 2.0);
}

TEST(PerfFormulas, ProbabilityGroupHit) {
  EXPECT_DOUBLE_EQ(probability_group_hit(64, 1, 2), 2.0 / 64);
  EXPECT_NEAR(probability_group_hit(64, 32, 2), 1.0 - (32.0 / 64) * (31.0 / 63), 1e-15);
  EXPECT_DOUBLE_EQ(probability_group_hit(64, 64, 2), 1.0);
  EXPECT_DOUBLE_EQ(probability_group_hit(8, 4, 5), 1.0);  // 5 picks cannot all miss 4 of 8
}

TEST(PerfFormulas, AllToAllWithDeduplication) {
  const HardwareSpec hw = h100_nodes(2);
  const double tokens = 1000, bytes = 14336;  // BF16 7168
  const AllToAllCost c = all_to_all_cost(tokens, bytes, 64, 2, 16, true, 1.0, hw);
  const double p_rank = 1.0 - (60.0 / 64) * (59.0 / 63);  // 4 experts per rank
  const double p_node = 1.0 - (32.0 / 64) * (31.0 / 63);  // 32 experts per node
  EXPECT_NEAR(c.inter_node_bytes, tokens * bytes * 1 * p_node, 1e-6);
  EXPECT_NEAR(c.intra_node_bytes, tokens * bytes * 2 * 7 * p_rank, 1e-6);
  const double inter_s = c.inter_node_bytes / (50e9 * 0.8);
  const double intra_s = c.intra_node_bytes / (450e9 * 0.8);
  EXPECT_NEAR(c.time_s, std::max(inter_s, intra_s) + 5e-6, 1e-12);
}

TEST(PerfFormulas, AllToAllPerExpertCopiesAndImbalance) {
  const HardwareSpec hw = h100_nodes(2);
  const AllToAllCost c = all_to_all_cost(128, 7168, 256, 8, 16, false, 1.5, hw);
  EXPECT_DOUBLE_EQ(c.inter_node_bytes, 128.0 * 7168 * 8 * 8 / 16);
  EXPECT_DOUBLE_EQ(c.intra_node_bytes, 128.0 * 7168 * 8 * 7 / 16);
  EXPECT_NEAR(c.time_s, c.inter_node_bytes * 1.5 / 40e9 + 5e-6, 1e-12);
  EXPECT_EQ(all_to_all_cost(128, 7168, 256, 8, 1, false, 1.0, hw).time_s, 0.0);
}

TEST(PerfFormulas, SingleNodeAllToAllUsesOnlyNvlink) {
  const HardwareSpec hw = h100_nodes(1);
  const AllToAllCost c = all_to_all_cost(100, 100, 8, 1, 8, true, 1.0, hw);
  EXPECT_EQ(c.inter_node_bytes, 0.0);
  EXPECT_DOUBLE_EQ(c.intra_node_bytes, 100.0 * 100 * 7 * (1.0 / 8));
  EXPECT_NEAR(c.time_s, c.intra_node_bytes / 360e9 + 3e-6, 1e-15);
}

TEST(PerfPredict, SingleGpuDenseDecodeIsWeightReadBound) {
  // One dense layer, one GPU, one token: attention, FFN and LM head read their weights once.
  ModelSpec m = seeds_model();
  m.num_layers = 1;
  m.num_dense_layers = 1;
  m.vocab_size = 0;
  HardwareSpec hw = h100_nodes(1);
  WorkloadSpec w;
  w.batch = 1;
  w.sequence_length = 1;
  const Prediction p = predict(m, hw, StrategySpec{}, w);
  const double rate = 1.8e12 * 0.8;
  const double attn_bytes = 4.0 * 7168 * 16384 * 2 + 65536 + 2.0 * 7168 * 2;
  const double ffn_bytes = 3.0 * 7168 * 18432 * 2 + 2.0 * 7168 * 2;
  EXPECT_NEAR(stage(p, "attention"), attn_bytes / rate, 1e-12);
  EXPECT_NEAR(stage(p, "dense_ffn"), ffn_bytes / rate, 1e-12);
  EXPECT_NEAR(p.step_time_s, (attn_bytes + ffn_bytes) / rate, 1e-12);
  EXPECT_DOUBLE_EQ(p.tokens_per_s, 1.0 / p.step_time_s);
  EXPECT_EQ(p.bottleneck, "attention");  // 940 MB of attention vs 793 MB of FFN weights
  EXPECT_DOUBLE_EQ(p.weight_bytes_per_gpu, (4.0 * 7168 * 16384 + 3.0 * 7168 * 18432) * 2);
}

TEST(PerfPredict, BreakdownSumsToStepTimeAndBubbleFollowsMicroBatches) {
  const HardwareSpec hw = h100_nodes(2);
  StrategySpec s;
  s.tp = 8;
  s.pp = 2;
  s.micro_batches = 4;
  WorkloadSpec w;
  w.phase = Phase::kPrefill;
  w.batch = 8;
  w.sequence_length = 1024;
  const Prediction p = predict(seeds_model(), hw, s, w);
  double sum = 0;
  for (const auto& entry : p.breakdown) sum += entry.second;
  EXPECT_NEAR(sum, p.step_time_s, 1e-9 * p.step_time_s);
  // (m + pp - 1) stage times, of which pp - 1 are the bubble.
  EXPECT_NEAR(stage(p, "pipeline_bubble"), p.step_time_s / 5.0, 1e-9 * p.step_time_s);
  EXPECT_EQ(p.num_gpus, 16);
  EXPECT_GT(stage(p, "tp_collectives"), 0.0);
  EXPECT_EQ(stage(p, "dispatch"), 0.0);
}

TEST(PerfPredict, OverlapTakesTheMaxOfComputeAndCommunication) {
  const HardwareSpec hw = h100_nodes(2);
  StrategySpec s;
  s.dp = 16;
  s.ep = 16;
  s.micro_batches = 2;
  WorkloadSpec w;
  w.batch = 2048;
  w.sequence_length = 1024;
  const Prediction serial = predict(seeds_model(), hw, s, w);
  s.overlap = true;
  const Prediction overlapped = predict(seeds_model(), hw, s, w);
  EXPECT_LT(overlapped.step_time_s, serial.step_time_s);
  EXPECT_NEAR(serial.step_time_s + stage(overlapped, "overlap_hidden"), overlapped.step_time_s,
              1e-9 * serial.step_time_s);
  const double comm = stage(serial, "dispatch") + stage(serial, "combine");
  EXPECT_GE(overlapped.step_time_s, serial.step_time_s - comm - 1e-12);
}

TEST(PerfPredict, MemoryCountsKvCacheAndFlagsOverflow) {
  const HardwareSpec hw = h100_nodes(1);
  StrategySpec s;
  s.tp = 8;
  WorkloadSpec w;
  w.batch = 1;
  w.sequence_length = 4096;
  const Prediction small = predict(seeds_model(), hw, s, w);
  // KV: 61 layers x 4096 tokens x 64 KiB, split over 8 TP ranks.
  EXPECT_DOUBLE_EQ(small.kv_cache_bytes_per_gpu, 61.0 * 4096 * 65536 / 8);
  EXPECT_TRUE(small.fits_in_memory);  // ~390 GB of BF16 weights over 8 x 64 GB
  EXPECT_GT(small.weight_bytes_per_gpu, 48e9);
  HardwareSpec small_gpus = h100_nodes(1);
  small_gpus.cluster.gpu_memory_bytes = 40e9;
  EXPECT_FALSE(predict(seeds_model(), small_gpus, s, w).fits_in_memory);
}

TEST(PerfMonotonic, MoreBandwidthIsNeverSlower) {
  for (const int nodes : {2, 4, 32}) {
    StrategySpec s;
    s.dp = nodes * 8;
    s.ep = nodes * 8;
    s.micro_batches = 2;
    for (const bool overlap : {false, true}) {
      s.overlap = overlap;
      for (const Phase phase : {Phase::kPrefill, Phase::kDecode}) {
        WorkloadSpec w;
        w.phase = phase;
        w.batch = 64.0 * s.dp;
        w.sequence_length = phase == Phase::kPrefill ? 512 : 2048;
        double previous = 1e30;
        for (const double scale : {0.25, 0.5, 1.0, 2.0, 4.0}) {
          HardwareSpec hw = h100_nodes(nodes);
          hw.cluster.gpu_memory_bytes = 1e15;
          hw.cluster.inter_node.bandwidth_bytes_per_s *= scale;
          hw.cluster.intra_node.bandwidth_bytes_per_s *= scale;
          hw.gpu.memory_bandwidth *= scale;
          const double t = predict(seeds_model(), hw, s, w).step_time_s;
          EXPECT_LE(t, previous * (1 + 1e-12)) << nodes << " nodes, scale " << scale;
          previous = t;
        }
      }
    }
  }
}

TEST(PerfMonotonic, MoreGpusAtFixedWorkNeverFewerFlopsUnlessCommunicationBound) {
  WorkloadSpec w;
  w.phase = Phase::kPrefill;
  w.batch = 256;
  w.sequence_length = 2048;
  double previous = 0.0;
  for (const int gpus : {16, 32, 64, 128, 256}) {
    HardwareSpec hw = h100_nodes(gpus / 8);
    hw.cluster.gpu_memory_bytes = 1e15;
    StrategySpec s;
    s.dp = gpus;
    s.ep = gpus;
    s.micro_batches = 2;
    s.overlap = true;
    const Prediction p = predict(seeds_model(), hw, s, w);
    const bool comm_bound = p.bottleneck == "dispatch" || p.bottleneck == "combine";
    if (!comm_bound) EXPECT_GE(p.tokens_per_s, previous) << gpus << " GPUs";
    previous = p.tokens_per_s;
  }
}

TEST(PerfValidation, RejectsBadFieldsByName) {
  const HardwareSpec hw = h100_nodes(2);
  const WorkloadSpec w;
  auto expect_message = [&](const ModelSpec& m, const StrategySpec& s, const WorkloadSpec& wl,
                            const HardwareSpec& h, const std::string& field) {
    try {
      predict(m, h, s, wl);
      ADD_FAILURE() << "expected an error naming " << field;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  ModelSpec m = seeds_model();
  m.top_k = 65;
  expect_message(m, {}, w, hw, "model.top_k");
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
  s.expert_imbalance = 0.5;
  expect_message(seeds_model(), s, w, hw, "strategy.expert_imbalance");
  WorkloadSpec bad;
  bad.batch = 0;
  expect_message(seeds_model(), {}, bad, hw, "workload.batch");
  HardwareSpec no_nic = hw;
  no_nic.cluster.inter_node.bandwidth_bytes_per_s = 0;
  expect_message(seeds_model(), {}, w, no_nic, "cluster.inter_node.bandwidth_bytes_per_s");
  HardwareSpec no_memory = hw;
  no_memory.cluster.gpu_memory_bytes = 0;
  expect_message(seeds_model(), {}, w, no_memory, "cluster.gpu_memory_bytes");
  HardwareSpec bad_gpu = hw;
  bad_gpu.gpu.mfu = 1.5;
  expect_message(seeds_model(), {}, w, bad_gpu, "gpu.mfu");
}

}  // namespace
}  // namespace moe_ep::core
