// expert_ffn: argument validation shared by the CPU and CUDA implementations.
//
// Contract: rows [offsets[e], offsets[e+1]) of x belong to expert e; rows [offsets[E], N) are
// not computed (fixed-size buffers with unused trailing rows), and the output's rows there
// are unspecified. The offsets may live on the CPU or on x's device.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <vector>

#include "core/activation.h"

namespace moe_ep::ops {

using core::Activation;

// Validates shapes, dtypes and devices of moe_ep::expert_ffn; returns the activation.
Activation check_expert_ffn_args(const at::Tensor& x, const at::Tensor& expert_offsets,
                                 const at::Tensor& w13, const at::Tensor& w2,
                                 std::string_view activation);

// The offsets' values on the host, validated (0 first, non-decreasing, at most x's row count
// last): read directly from a CPU tensor, else in one counted device-to-host read.
std::vector<int64_t> checked_host_offsets(const at::Tensor& expert_offsets, int64_t num_rows);

}  // namespace moe_ep::ops
