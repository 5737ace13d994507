// Expert-parallel dispatch (csrc/ops/dispatch.cpp, dispatch_capacity.cpp): the C++ entries that
// moe_forward and the capacity mode share.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <tuple>
#include <vector>

#include "ops/dispatch_config.h"

namespace moe_ep::ops {

// One started chunk of an exact-size dispatch: (x_recv, meta_recv, recv_counts, send_counts,
// token_slot, recv_entries); the counts and the entry count are CPU tensors.
using DispatchStarted =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Starts the exact-size dispatch of x split into num_chunks chunks of tokens (tensor_split)
// with one header exchange and one host read for all of them, so every chunk's rows travel
// while the caller computes. `problem` carries a malformed argument the caller found in its
// own arguments (moe_forward's weights): it travels in the header, and every rank raises.
std::vector<DispatchStarted> dispatch_start_chunks(
    const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& expert_rank, const at::Tensor& expert_local, int64_t num_local_experts,
    int64_t num_chunks, std::string_view group_name, ArgProblem problem = {});

// Checks what a finish op receives from its start op: x_recv [R, H] (float), meta_recv
// [R, 2W + status_columns] int32 on x_recv's device, W >= 1, num_local_experts >= 1.
void check_received(const at::Tensor& x_recv, const at::Tensor& meta_recv,
                    int64_t num_local_experts, int64_t status_columns);

// The received rows grouped by local expert, stable in arrival order, read from the local ids
// in the first `width` columns of meta_recv: (x_sorted [out_rows, H], expert_offsets int64
// [L + 1] on the device, recv_row_of int32 [R, W], recv_weights float32 [R, W]). Rows of
// x_sorted past expert_offsets[L] are not written (a fixed-size buffer's unused tail).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_received(
    const at::Tensor& x_recv, const at::Tensor& meta_recv, int64_t width, int64_t num_local_experts,
    int64_t out_rows);

}  // namespace moe_ep::ops
