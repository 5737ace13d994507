#include "core/perf_compute.h"

#include <algorithm>

#include "core/perf_require.h"

namespace moe_ep::core {

void GpuSpec::validate() const {
  perf_require(peak_flops > 0, "gpu.peak_flops must be > 0");
  perf_require(fp8_speedup > 0, "gpu.fp8_speedup must be > 0");
  perf_require(memory_bandwidth > 0, "gpu.memory_bandwidth must be > 0");
  perf_require(num_sms >= 1, "gpu.num_sms must be >= 1");
  perf_require(gemm_peak_efficiency > 0 && gemm_peak_efficiency <= 1,
               "gpu.gemm_peak_efficiency must be in (0, 1]");
  perf_require(gemm_half_rows >= 0, "gpu.gemm_half_rows must be >= 0");
  perf_require(gemm_half_depth >= 0, "gpu.gemm_half_depth must be >= 0");
  perf_require(memory_efficiency > 0 && memory_efficiency <= 1,
               "gpu.memory_efficiency must be in (0, 1]");
  perf_require(kernel_fixed_s >= 0, "gpu.kernel_fixed_s must be >= 0");
  perf_require(attention_compute_efficiency > 0 && attention_compute_efficiency <= 1,
               "gpu.attention_compute_efficiency must be in (0, 1]");
  perf_require(attention_memory_efficiency > 0 && attention_memory_efficiency <= 1,
               "gpu.attention_memory_efficiency must be in (0, 1]");
}

double gemm_efficiency(double rows, double depth, const GpuSpec& gpu) {
  return gpu.gemm_peak_efficiency * rows / (rows + gpu.gemm_half_rows) * depth /
         (depth + gpu.gemm_half_depth);
}

KernelCost gemm_cost(double rows, double cols, double depth, double groups, double input_bytes,
                     double output_bytes, const GpuSpec& gpu) {
  if (rows <= 0 || groups <= 0) return {};
  KernelCost cost;
  cost.flops = 2.0 * rows * cols * depth * groups;
  cost.bytes =
      groups * (cols * depth + rows * depth) * input_bytes + groups * rows * cols * output_bytes;
  const double rate = gpu.peak_flops * (input_bytes <= 1.0 ? gpu.fp8_speedup : 1.0) *
                      gemm_efficiency(rows, depth, gpu);
  cost.time_s =
      std::max(cost.flops / rate, cost.bytes / (gpu.memory_bandwidth * gpu.memory_efficiency)) +
      gpu.kernel_fixed_s;
  return cost;
}

KernelCost attention_cost(double flops, double bytes, const GpuSpec& gpu) {
  if (flops <= 0 && bytes <= 0) return {};
  const double compute_s = flops / (gpu.peak_flops * gpu.attention_compute_efficiency);
  const double memory_s = bytes / (gpu.memory_bandwidth * gpu.attention_memory_efficiency);
  return {flops, bytes, std::max(compute_s, memory_s) + gpu.kernel_fixed_s};
}

KernelCost elementwise_cost(double bytes, int kernels, const GpuSpec& gpu) {
  if (bytes <= 0 || kernels <= 0) return {};
  return {0.0, bytes,
          bytes / (gpu.memory_bandwidth * gpu.memory_efficiency) + kernels * gpu.kernel_fixed_s};
}

}  // namespace moe_ep::core
