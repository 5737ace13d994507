// Fixed-capacity expert-parallel dispatch (latency, decode, CUDA graphs): every rank sends
// `capacity` rows to every rank, so every shape depends only on (T, k, world, capacity) and
// nothing is read on the host in a step.
//
//   rank a: blocks of capacity rows, one per rank; metadata (-1 where no row), status in the
//           first metadata row of each block  ──all-to-all (equal splits)──▶  rank b
//   rank b: entries with a local id grouped by expert at the front of a fixed-size buffer;
//           expert_offsets (on the device) say how many: the experts compute those only.
//
// A (token, rank) pair over a block's capacity is not sent; the pairs left out, summed over the
// group, are in the status, identical on every rank, which the caller checks after the step
// (moe_ep.dispatcher.check_status): never dropped silently. The configuration is agreed once
// per (group, configuration) before the first transfer (agree_once).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "core/dispatch_layout.h"
#include "ops/collectives.h"
#include "ops/deadline.h"
#include "ops/dispatch.h"
#include "ops/layout_kernels.h"

namespace moe_ep::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_capacity_start_impl(
    const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& expert_rank, const at::Tensor& expert_local, int64_t num_local_experts,
    int64_t capacity, std::string_view group_name, std::optional<at::ScalarType> dispatch_dtype) {
  const Group group = resolve_group(group_name);
  const int64_t world = group->getSize(), top_k = topk_ids.dim() == 2 ? topk_ids.size(1) : 0;
  ArgProblem problem;
  validate_dispatch_args(problem, x, topk_ids, topk_weights, expert_rank, expert_local,
                         num_local_experts, world);
  validate(problem, Arg::kCapacity, [&] {
    TORCH_CHECK(capacity >= 1, "moe_ep: argument 'capacity' must be >= 1, got ", capacity);
  });
  const bool fp8 = validate_dispatch_dtype(problem, x, dispatch_dtype);
  const DispatchConfig config = dispatch_config(Mode::kCapacity, x, topk_ids, expert_rank,
                                                num_local_experts, capacity, 1, fp8);
  agree_once(group, group_name, config, problem);
  const c10::DeviceGuard device_guard(x.device());
  const CommScope scope(x.device());
  const int64_t width = std::min(top_k, num_local_experts), rows = world * capacity;
  const int64_t status_column = 2 * width;
  // The FP8 dispatch: x's rows as e4m3fn, their scales after the status columns.
  const int64_t scales = fp8 ? core::fp8_scale_blocks(x.size(1)) : 0;
  at::Tensor meta_send = at::full({rows, status_column + core::kStatusSize + scales}, -1,
                                  topk_ids.options().dtype(at::kInt));
  at::Tensor x_send =
      at::empty({rows, x.size(1)}, x.options().dtype(fp8 ? at::kFloat8_e4m3fn : x.scalar_type()));
  at::Tensor token_slot = at::empty(topk_ids.sizes(), meta_send.options());
  const at::Tensor ws = dispatch_workspace(1, world, x.options());
  const SendLayout layout = lay_out_send(
      topk_ids,
      {expert_rank.contiguous(), expert_local.contiguous(), world, num_local_experts, width}, ws, 0,
      at::empty({world + 1}, ws.options()));
  write_status(meta_send, status_column, capacity, layout.rank_offsets, ws, world, config.hash());
  pack_send(x, topk_weights, layout, capacity, width, x_send, meta_send, token_slot);
  at::Tensor meta_recv = start_all_to_all_rows(group, meta_send, {}, {});
  at::Tensor x_recv = start_all_to_all_rows(group, x_send, {}, {});
  for (const at::Tensor& t : {x_recv, meta_recv, token_slot}) scope.hand_over(t);
  return {x_recv, meta_recv, token_slot};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dispatch_capacity_finish_impl(const at::Tensor& x_recv, const at::Tensor& meta_recv,
                              int64_t num_local_experts, int64_t capacity,
                              std::optional<at::ScalarType> dtype) {
  // Waited first, so that a bad argument does not leave the transfers registered.
  wait_received(x_recv, meta_recv, "dispatch_capacity_finish: the rows and their routing metadata");
  check_received(x_recv, meta_recv, num_local_experts, core::kStatusSize);
  TORCH_CHECK(capacity >= 1 && x_recv.size(0) % capacity == 0, "moe_ep: argument 'capacity' ",
              "must be the capacity of the dispatch (it divides the ", x_recv.size(0),
              " received rows), got ", capacity);
  const c10::DeviceGuard device_guard(x_recv.device());
  const at::ScalarType out_dtype = grouped_dtype(x_recv, dtype);
  const int64_t rows = x_recv.size(0), stride = meta_recv.size(1);
  const int64_t width = (stride - core::kStatusSize - scale_columns(x_recv)) / 2;
  auto [x_sorted, expert_offsets, recv_row_of, recv_weights] =
      group_received(x_recv, meta_recv, width, num_local_experts, rows * width, out_dtype);
  const at::Tensor status = meta_recv.view({rows / capacity, capacity, stride})
                                .select(1, 0)
                                .narrow(1, 2 * width, core::kStatusSize)
                                .clone();
  return {x_sorted, expert_offsets, recv_row_of, recv_weights, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dispatch_capacity_impl(const at::Tensor& x, const at::Tensor& topk_ids,
                       const at::Tensor& topk_weights, const at::Tensor& expert_rank,
                       const at::Tensor& expert_local, int64_t num_local_experts, int64_t capacity,
                       std::string_view group_name, std::optional<at::ScalarType> dispatch_dtype) {
  const auto [x_recv, meta_recv, token_slot] =
      dispatch_capacity_start_impl(x, topk_ids, topk_weights, expert_rank, expert_local,
                                   num_local_experts, capacity, group_name, dispatch_dtype);
  auto [x_sorted, expert_offsets, recv_row_of, recv_weights, status] =
      dispatch_capacity_finish_impl(x_recv, meta_recv, num_local_experts, capacity,
                                    x.scalar_type());
  return {x_sorted, expert_offsets, recv_row_of, recv_weights, token_slot, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CPU, m) {
  m.impl("dispatch_capacity", &dispatch_capacity_impl);
  m.impl("dispatch_capacity_start", &dispatch_capacity_start_impl);
  m.impl("dispatch_capacity_finish", &dispatch_capacity_finish_impl);
}

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) {
  m.impl("dispatch_capacity", &dispatch_capacity_impl);
  m.impl("dispatch_capacity_start", &dispatch_capacity_start_impl);
  m.impl("dispatch_capacity_finish", &dispatch_capacity_finish_impl);
}

}  // namespace moe_ep::ops
