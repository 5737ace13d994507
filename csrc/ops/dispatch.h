// Expert-parallel dispatch (csrc/ops/dispatch.cpp): the C++ entry that moe_forward uses.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <tuple>
#include <vector>

namespace moe_ep::ops {

// What the dispatch_start op returns: (x_recv, meta_recv, recv_counts, send_counts,
// token_slot, recv_entries); dispatch_finish and combine_start take it from there.
using DispatchStarted =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Starts the exact-size dispatch of x split into num_chunks chunks of tokens (tensor_split)
// with one header exchange for all of them, so every chunk's rows travel while the caller
// computes; dispatch_start is the one-chunk case.
std::vector<DispatchStarted> dispatch_start_chunks(const at::Tensor& x, const at::Tensor& topk_ids,
                                                   const at::Tensor& topk_weights,
                                                   const at::Tensor& expert_rank,
                                                   const at::Tensor& expert_local,
                                                   int64_t num_local_experts, int64_t num_chunks,
                                                   std::string_view group_name);

}  // namespace moe_ep::ops
