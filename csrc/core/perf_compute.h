// Compute terms of the cost model (docs/perf_model.md): how long one GEMM, grouped GEMM or
// attention kernel takes on one GPU, from datasheet peak rates times efficiencies that depend
// on the kernel's shape. The efficiencies are measurements (moe_ep/data/perf_calibration.json,
// or the package's own benchmarks through `python -m moe_ep.perf --calibrate`); the defaults
// here are the ideal roofline (efficiency 1, no fixed cost).
#pragma once

namespace moe_ep::core {

struct GpuSpec {
  double peak_flops = 989e12;         // dense BF16 tensor-core FLOP/s (datasheet)
  double fp8_speedup = 2.0;           // dense FP8 / dense BF16 rate (datasheet)
  double memory_bandwidth = 3.35e12;  // HBM bytes/s (datasheet)
  int num_sms = 132;

  // GEMM efficiency = gemm_peak_efficiency * M / (M + gemm_half_rows) * K / (K + gemm_half_depth)
  // for M rows (rows per expert in a grouped GEMM) and reduction depth K: few rows leave the
  // MMA tiles and the weight pipeline half used, a short K leaves the per-tile prologue and
  // epilogue unamortised.
  double gemm_peak_efficiency = 1.0;
  double gemm_half_rows = 0.0;
  double gemm_half_depth = 0.0;
  double memory_efficiency = 1.0;  // fraction of memory_bandwidth a streaming kernel reaches
  double kernel_fixed_s = 0.0;     // per kernel: pipeline fill, last-wave tail
  double attention_compute_efficiency = 1.0;  // core attention, of the BF16 peak
  double attention_memory_efficiency = 1.0;   // core attention, of memory_bandwidth

  void validate() const;
};

// Cost of one kernel on one GPU: the slower of its compute and its memory traffic, plus the
// kernel's fixed cost.
struct KernelCost {
  double flops = 0.0;
  double bytes = 0.0;
  double time_s = 0.0;
};

// Fraction of the GEMM peak reached with `rows` rows and reduction depth `depth`.
double gemm_efficiency(double rows, double depth, const GpuSpec& gpu);

// `groups` GEMMs of [rows x depth] x [depth x cols], in one (grouped) kernel. Inputs and weights
// are `input_bytes` per element (1: FP8, which runs at the FP8 rate), outputs `output_bytes`.
// No rows or no groups: no kernel, zero cost.
KernelCost gemm_cost(double rows, double cols, double depth, double groups, double input_bytes,
                     double output_bytes, const GpuSpec& gpu);

// Core attention (scores and weighted values, BF16): flops against the attention compute
// efficiency, bytes (KV cache, queries, outputs) against the attention memory efficiency.
KernelCost attention_cost(double flops, double bytes, const GpuSpec& gpu);

// `kernels` memory-bound kernels (norms, activations, quantisation, row gathers) moving `bytes`
// in all: streamed at the memory efficiency, each kernel paying the fixed cost.
KernelCost elementwise_cost(double bytes, int kernels, const GpuSpec& gpu);

}  // namespace moe_ep::core
