// permute / unpermute: argument validation shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>

namespace moe_ep::ops {

// Validates moe_ep::permute's arguments; returns topk_ids as contiguous int32 (int64 ids are
// accepted and narrowed, since torch.topk produces them).
at::Tensor checked_permute_ids(const at::Tensor& hidden, const at::Tensor& topk_ids,
                               int64_t num_experts);

// Validates moe_ep::unpermute's arguments, and with check_rows the row values too.
void check_unpermute_args(const at::Tensor& expert_out, const at::Tensor& row_of,
                          const at::Tensor& topk_weights, bool check_rows);

}  // namespace moe_ep::ops
