// route: argument validation shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "core/routing.h"

namespace moe_ep::ops {

// Validates the arguments of moe_ep::route and returns the per-token configuration.
core::RouteConfig route_config(const at::Tensor& logits, int64_t top_k, std::string_view score_func,
                               const std::optional<at::Tensor>& bias, int64_t n_group,
                               int64_t topk_group, bool renormalize, double scaling,
                               std::string_view group_score);

}  // namespace moe_ep::ops
