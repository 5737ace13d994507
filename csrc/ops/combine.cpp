// Expert-parallel combine: each received row's entries are reduced with their routing weights
// on the rank that computed them, the reduced rows travel back (the reverse all-to-all of the
// dispatch), and the source adds the partial rows of each token in its original order.
//
//   rank b: y [entries, H] -> one row per received row ──all-to-all──▶ rank a: sum per token
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <numeric>

#include "ops/checks.h"
#include "ops/collectives.h"
#include "ops/deadline.h"

namespace moe_ep::ops {
namespace {

// The unpermute op (CPU or CUDA kernel) on indices that moe_ep produced: no range check.
at::Tensor unpermute_trusted(const at::Tensor& rows, const at::Tensor& row_of,
                             const at::Tensor& weights) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moe_ep::unpermute", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(rows, row_of, weights, /*check_rows=*/false);
}

std::vector<int64_t> counts_on_host(const at::Tensor& counts, std::string_view name,
                                    int64_t world) {
  check_dim(counts, 1, name);
  check_dtype(counts, at::kLong, name);
  TORCH_CHECK(counts.size(0) == world && !counts.is_cuda(), "moe_ep: argument '", name,
              "' must be a CPU tensor with one count per rank (", world, ")");
  const at::Tensor values = counts.contiguous();
  return {values.data_ptr<int64_t>(), values.data_ptr<int64_t>() + world};
}

at::Tensor combine_start_impl(const at::Tensor& y, const at::Tensor& recv_row_of,
                              const at::Tensor& recv_weights, const at::Tensor& recv_counts,
                              const at::Tensor& send_counts, std::string_view group_name) {
  const Group group = resolve_group(group_name);
  const int64_t world = group->getSize();
  check_dim(y, 2, "y");
  check_float_dtype(y, "y");
  check_dim(recv_row_of, 2, "recv_row_of");
  check_dtype(recv_row_of, at::kInt, "recv_row_of");
  check_dtype(recv_weights, at::kFloat, "recv_weights");
  TORCH_CHECK(recv_weights.sizes() == recv_row_of.sizes(), "moe_ep: argument 'recv_weights' ",
              "must have the shape of 'recv_row_of' ", recv_row_of.sizes(), ", got ",
              recv_weights.sizes());
  check_same_device(recv_row_of, y, "recv_row_of", "y");
  check_same_device(recv_weights, y, "recv_weights", "y");
  // The counts of a dispatch are on the host already: the return trip reads nothing.
  std::vector<int64_t> send_back = counts_on_host(recv_counts, "recv_counts", world);
  std::vector<int64_t> receive_back = counts_on_host(send_counts, "send_counts", world);
  TORCH_CHECK(
      std::accumulate(send_back.begin(), send_back.end(), int64_t{0}) == recv_row_of.size(0),
      "moe_ep: argument 'recv_counts' must sum to the received rows (", recv_row_of.size(0),
      " rows of 'recv_row_of')");
  const c10::DeviceGuard device_guard(y.device());
  return start_all_to_all_rows(group, unpermute_trusted(y, recv_row_of, recv_weights),
                               std::move(send_back), std::move(receive_back));
}

at::Tensor combine_finish_impl(const at::Tensor& returned, const at::Tensor& token_slot) {
  // Waited first, so that a bad argument does not leave the transfer registered.
  wait_collective(returned, "combine_finish: the rows coming back");
  check_dim(returned, 2, "returned");
  check_float_dtype(returned, "returned");
  check_dim(token_slot, 2, "token_slot");
  check_dtype(token_slot, at::kInt, "token_slot");
  const c10::DeviceGuard device_guard(returned.device());
  return unpermute_trusted(returned, token_slot,
                           at::ones(token_slot.sizes(), token_slot.options().dtype(at::kFloat)));
}

at::Tensor combine_impl(const at::Tensor& y, const at::Tensor& recv_row_of,
                        const at::Tensor& recv_weights, const at::Tensor& recv_counts,
                        const at::Tensor& send_counts, const at::Tensor& token_slot,
                        std::string_view group_name) {
  return combine_finish_impl(
      combine_start_impl(y, recv_row_of, recv_weights, recv_counts, send_counts, group_name),
      token_slot);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CPU, m) {
  m.impl("combine", &combine_impl);
  m.impl("combine_start", &combine_start_impl);
  m.impl("combine_finish", &combine_finish_impl);
}

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) {
  m.impl("combine", &combine_impl);
  m.impl("combine_start", &combine_start_impl);
  m.impl("combine_finish", &combine_finish_impl);
}

}  // namespace moe_ep::ops
