// Expert-parallel dispatch (csrc/ops/dispatch.cpp, dispatch_capacity.cpp): the C++ entries that
// moe_forward and the capacity mode share.
#pragma once

#include <ATen/ATen.h>

#include <optional>
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
// dispatch_dtype float8_e4m3fn: the FP8 dispatch (x_recv float8_e4m3fn, the scales in the
// last columns of meta_recv; docs/dispatch.md).
std::vector<DispatchStarted> dispatch_start_chunks(
    const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& expert_rank, const at::Tensor& expert_local, int64_t num_local_experts,
    int64_t num_chunks, std::string_view group_name, ArgProblem problem = {},
    std::optional<at::ScalarType> dispatch_dtype = std::nullopt);

// The metadata columns that carry the FP8 dispatch's scales (the last of a metadata row):
// ceil(H / 128) when x_recv is float8_e4m3fn, else 0.
int64_t scale_columns(const at::Tensor& x_recv);

// The dtype of the grouped rows: `dtype`, which FP8 rows need (the layer's), else x_recv's.
at::ScalarType grouped_dtype(const at::Tensor& x_recv, std::optional<at::ScalarType> dtype);

// Checks what a finish op receives from its start op: x_recv [R, H] (float, or FP8), meta_recv
// [R, 2W + status_columns (+ FP8 scale columns)] int32 on x_recv's device, W >= 1,
// num_local_experts >= 1.
void check_received(const at::Tensor& x_recv, const at::Tensor& meta_recv,
                    int64_t num_local_experts, int64_t status_columns);

// The received rows grouped by local expert, stable in arrival order, read from the local ids
// in the first `width` columns of meta_recv: (x_sorted [out_rows, H] of `dtype`, FP8 rows
// dequantized on the way; expert_offsets int64 [L + 1] on the device, recv_row_of int32
// [R, W], recv_weights float32 [R, W]). Rows of x_sorted past expert_offsets[L] are not
// written (a fixed-size buffer's unused tail).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_received(
    const at::Tensor& x_recv, const at::Tensor& meta_recv, int64_t width, int64_t num_local_experts,
    int64_t out_rows, at::ScalarType dtype);

// Waits (under the deadline) for a chunk's rows and their metadata; `operation` names what
// failed in the error.
void wait_received(const at::Tensor& x_recv, const at::Tensor& meta_recv,
                   std::string_view operation);

// Groups a chunk's received rows, once waited for (wait_received), as `dtype` (None: x_recv's;
// FP8 rows need the layer dtype they are dequantized to). With one local expert and one choice
// per row the received rows are already grouped and, unless FP8, x_sorted is x_recv itself:
// for callers inside moe_ep; the dispatch_finish op copies them, since an op's outputs are new.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_dispatch_rows(
    const at::Tensor& x_recv, const at::Tensor& meta_recv, const at::Tensor& recv_entries,
    int64_t num_local_experts, std::optional<at::ScalarType> dtype);

}  // namespace moe_ep::ops
