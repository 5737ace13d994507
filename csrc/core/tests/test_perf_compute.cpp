// Compute terms of the cost model (perf_compute.h), against hand-computed cases.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "core/perf_compute.h"
#include "core/tests/perf_test_support.h"

namespace moe_ep::core {
namespace {

GpuSpec shaped_gpu() {
  GpuSpec gpu;
  gpu.peak_flops = 1e15;
  gpu.fp8_speedup = 2.0;
  gpu.memory_bandwidth = 2e12;
  gpu.gemm_peak_efficiency = 0.8;
  gpu.gemm_half_rows = 100;
  gpu.gemm_half_depth = 300;
  gpu.memory_efficiency = 0.5;
  gpu.kernel_fixed_s = 3e-6;
  gpu.attention_compute_efficiency = 0.6;
  gpu.attention_memory_efficiency = 0.9;
  return gpu;
}

TEST(PerfCompute, GemmEfficiencyIsPeakTimesRowAndDepthSaturation) {
  const GpuSpec gpu = shaped_gpu();
  EXPECT_DOUBLE_EQ(gemm_efficiency(100, 300, gpu), 0.8 * 0.5 * 0.5);
  EXPECT_DOUBLE_EQ(gemm_efficiency(900, 2700, gpu), 0.8 * 0.9 * 0.9);
  EXPECT_DOUBLE_EQ(gemm_efficiency(1, 1, GpuSpec{}), 1.0);  // the ideal default
}

GpuSpec fast_memory_gpu() {
  GpuSpec gpu = shaped_gpu();
  gpu.memory_bandwidth = 20e12;
  return gpu;
}

TEST(PerfCompute, ComputeBoundGroupedGemm) {
  const GpuSpec gpu = fast_memory_gpu();
  // 4 groups of [900 x 2700] x [2700 x 4096] in BF16: 2 * 900 * 4096 * 2700 * 4 FLOPs at
  // 1 PFLOP/s x 0.648; memory: weights and inputs at 2 B, outputs at 2 B, at 10 TB/s.
  const KernelCost c = gemm_cost(900, 4096, 2700, 4, 2, 2, gpu);
  const double flops = 2.0 * 900 * 4096 * 2700 * 4;
  const double bytes = 4.0 * (4096.0 * 2700 + 900.0 * 2700) * 2 + 4.0 * 900 * 4096 * 2;
  EXPECT_DOUBLE_EQ(c.flops, flops);
  EXPECT_DOUBLE_EQ(c.bytes, bytes);
  ASSERT_GT(flops / (1e15 * 0.648), bytes / 10e12);
  EXPECT_NEAR(c.time_s, flops / (1e15 * 0.648) + 3e-6, 1e-15);
}

TEST(PerfCompute, Fp8GemmRunsAtTheFp8Rate) {
  const GpuSpec gpu = fast_memory_gpu();
  const double bf16 = gemm_cost(900, 4096, 2700, 4, 2, 2, gpu).time_s - 3e-6;
  const double fp8 = gemm_cost(900, 4096, 2700, 4, 1, 2, gpu).time_s - 3e-6;
  EXPECT_NEAR(fp8, bf16 / 2.0, 1e-15);
}

TEST(PerfCompute, FewRowsAreBoundByReadingTheWeights) {
  const GpuSpec gpu = shaped_gpu();
  // One row: 2 * 7168 * 2048 FLOPs at 1 PFLOP/s x 0.8 x (1/101) x (7168/7468) is ~3.7 us;
  // the 2048 x 7168 BF16 weights (29.4 MB) at 2 TB/s x 0.5 take ~29 us.
  const KernelCost c = gemm_cost(1, 2048, 7168, 1, 2, 2, gpu);
  const double bytes = (2048.0 * 7168 + 7168) * 2 + 2048.0 * 2;
  EXPECT_DOUBLE_EQ(c.bytes, bytes);
  EXPECT_NEAR(c.time_s, bytes / 1e12 + 3e-6, 1e-15);
}

TEST(PerfCompute, NoRowsOrNoGroupsIsNoKernel) {
  const GpuSpec gpu = shaped_gpu();
  EXPECT_EQ(gemm_cost(0, 4096, 7168, 4, 2, 2, gpu).time_s, 0.0);
  EXPECT_EQ(gemm_cost(128, 4096, 7168, 0, 2, 2, gpu).time_s, 0.0);
}

TEST(PerfCompute, AttentionIsTheSlowerOfItsComputeAndMemory) {
  const GpuSpec gpu = shaped_gpu();
  // 6e11 FLOPs at 1 PFLOP/s x 0.6 = 1 ms; 1.8e9 bytes at 2 TB/s x 0.9 = 1 ms.
  EXPECT_NEAR(attention_cost(6e11, 0, gpu).time_s, 1e-3 + 3e-6, 1e-15);
  EXPECT_NEAR(attention_cost(0, 1.8e9, gpu).time_s, 1e-3 + 3e-6, 1e-15);
  EXPECT_NEAR(attention_cost(1.2e12, 1.8e9, gpu).time_s, 2e-3 + 3e-6, 1e-15);
  EXPECT_EQ(attention_cost(0, 0, gpu).time_s, 0.0);
}

TEST(PerfCompute, ElementwiseKernelsStreamTheirBytesAndPayTheFixedCostEach) {
  const GpuSpec gpu = shaped_gpu();
  EXPECT_NEAR(elementwise_cost(2e9, 3, gpu).time_s, 2e9 / 1e12 + 3 * 3e-6, 1e-15);
  EXPECT_EQ(elementwise_cost(0, 3, gpu).time_s, 0.0);
}

TEST(PerfCompute, BadGpuFieldsAreNamed) {
  GpuSpec gpu;
  gpu.gemm_peak_efficiency = 1.5;
  expect_error_naming([gpu] { gpu.validate(); }, "gpu.gemm_peak_efficiency");
  gpu = {};
  gpu.gemm_half_rows = -1;
  expect_error_naming([gpu] { gpu.validate(); }, "gpu.gemm_half_rows");
  gpu = {};
  gpu.num_sms = 0;
  expect_error_naming([gpu] { gpu.validate(); }, "gpu.num_sms");
  gpu = {};
  gpu.kernel_fixed_s = -1e-6;
  expect_error_naming([gpu] { gpu.validate(); }, "gpu.kernel_fixed_s");
  gpu = {};
  gpu.attention_memory_efficiency = 0;
  expect_error_naming([gpu] { gpu.validate(); }, "gpu.attention_memory_efficiency");
}

}  // namespace
}  // namespace moe_ep::core
