// expert_ffn: argument validation shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <vector>

#include "core/activation.h"

namespace moe_ep::ops {

using core::Activation;

// Validates shapes, dtypes and devices of moe_ep::expert_ffn; returns the activation.
Activation check_expert_ffn_args(const at::Tensor& x, const at::Tensor& expert_offsets,
                                 const at::Tensor& w13, const at::Tensor& w2,
                                 std::string_view activation);

// Validates the offsets' values (0 first, non-decreasing, x's row count last) once they are
// on the host, and returns them.
std::vector<int64_t> checked_offsets(const at::Tensor& host_offsets, int64_t num_rows);

}  // namespace moe_ep::ops
