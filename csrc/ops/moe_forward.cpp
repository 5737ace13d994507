// moe_forward: one expert-parallel MoE layer (exact-size dispatch) as a single op, split into
// chunks that overlap: one header exchange starts the dispatches of all chunks, then each
// chunk's experts run while later chunks' rows arrive and earlier chunks' results travel back.
//
// Starting every dispatch before any expert matters twice. On CUDA, c10d orders a NCCL
// collective after the work already queued on the current stream, so a dispatch issued after
// an expert GEMM would wait for it; and the counts of all chunks reach the host in one read
// instead of one per chunk (the header is the layer's one host read). The experts and the
// combines go through the dispatcher, so CPU/Gloo and CUDA/NCCL take the same path; the
// dispatch's finish is called directly (with one local expert it hands over the received rows
// without the op's copy). moe_ep.pipeline has the same schedule in Python for what an op
// cannot take: a caller's hook, fixed-capacity fallback, layer streams.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <vector>

#include "ops/checks.h"
#include "ops/dispatch.h"

namespace moe_ep::ops {
namespace {

struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, std::string_view, bool)>
      expert_ffn;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, std::string_view)>
      combine_start;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)> combine_finish;
};

const Ops& ops() {
  static const Ops handles = [] {
    auto& d = c10::Dispatcher::singleton();
    auto find = [&](const char* name) { return d.findSchemaOrThrow(name, ""); };
    return Ops{
        find("moe_ep::expert_ffn")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, std::string_view, bool)>(),
        find("moe_ep::combine_start")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, std::string_view)>(),
        find("moe_ep::combine_finish").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>(),
    };
  }();
  return handles;
}

at::Tensor moe_forward_impl(const at::Tensor& x, const at::Tensor& topk_ids,
                            const at::Tensor& topk_weights, const at::Tensor& expert_rank,
                            const at::Tensor& expert_local, int64_t num_local_experts,
                            const at::Tensor& w13, const at::Tensor& w2,
                            std::string_view activation, int64_t num_chunks,
                            std::string_view group_name,
                            const std::optional<at::Tensor>& slot_counts,
                            std::optional<at::ScalarType> dispatch_dtype) {
  // The weights and the counts are checked before the dispatch's header exchange and travel in
  // it: a bad argument on one rank raises on every rank.
  ArgProblem problem;
  validate(problem, Arg::kW13, [&] {
    check_dim(w13, 3, "w13");
    // (a num_local_experts below 1 is the dispatch's to report)
    TORCH_CHECK(num_local_experts < 1 || w13.size(0) <= num_local_experts,
                "moe_ep: argument 'w13' holds ", w13.size(0),
                " experts, more than num_local_experts=", num_local_experts);
  });
  // An input that does not fit the weights is the caller's mistake: name x, on every rank.
  validate(problem, Arg::kX, [&] {
    check_dim(x, 2, "x");  // as the dispatch would say it
    check_float_dtype(x, "x");
    check_fits_weights(x, w13);
  });
  if (slot_counts) {
    validate(problem, Arg::kSlotCounts, [&] {
      check_dim(*slot_counts, 1, "slot_counts");
      check_dtype(*slot_counts, at::kLong, "slot_counts");
      check_size(*slot_counts, 0, w13.size(0), "slot_counts");
      check_same_device(*slot_counts, x, "slot_counts", "x");
    });
  }
  const Ops& op = ops();
  const std::vector<DispatchStarted> started =
      dispatch_start_chunks(x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts,
                            num_chunks, group_name, std::move(problem), dispatch_dtype);
  std::vector<at::Tensor> returning;
  returning.reserve(num_chunks);
  for (const auto& [x_recv, meta_recv, recv_counts, send_counts, token_slot, entries] : started) {
    wait_received(x_recv, meta_recv, "moe_forward: the rows and their routing metadata");
    const auto [x_sorted, offsets, recv_row_of, recv_weights] =
        finish_dispatch_rows(x_recv, meta_recv, entries, num_local_experts, x.scalar_type());
    // A rank with fewer experts than the widest one ignores the empty trailing groups.
    const at::Tensor own_offsets = offsets.narrow(0, 0, w13.size(0) + 1);
    if (slot_counts) slot_counts->add_(own_offsets.diff());
    const at::Tensor y = op.expert_ffn.call(x_sorted, own_offsets, w13, w2, activation,
                                            /*check_offsets=*/false);
    returning.push_back(
        op.combine_start.call(y, recv_row_of, recv_weights, recv_counts, send_counts, group_name));
  }
  std::vector<at::Tensor> outputs;
  outputs.reserve(num_chunks);
  for (int64_t c = 0; c < num_chunks; ++c) {
    outputs.push_back(op.combine_finish.call(returning[c], std::get<4>(started[c])));
  }
  return at::cat(outputs);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CPU, m) { m.impl("moe_forward", &moe_forward_impl); }

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) { m.impl("moe_forward", &moe_forward_impl); }

}  // namespace moe_ep::ops
