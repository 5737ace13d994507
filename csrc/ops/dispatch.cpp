// Exact-size expert-parallel dispatch (throughput, prefill) over a torch.distributed group.
//
// Token batching: a token goes once to each rank that hosts at least one of its k experts,
// carrying the receiver-local expert ids and weights of its choices there (W = min(k, local
// experts) metadata slots). The receiver groups the (row, slot) entries by local expert for
// expert_ffn; combine (combine.cpp) reduces each row's entries before sending it back.
//
//   rank a: route, sort by rank, header ──all-to-all──▶ every rank reads every header (1 read)
//   rank a: pack rows of chunk c        ──all-to-all──▶ rank b: group by local expert, experts
//
// The layout runs in the layout kernels (layout_kernels.h) on x's device; on CUDA the sender's
// work runs on the communication stream (CommScope), so the one host read waits for the header,
// not for expert GEMMs queued before the call.
#include "ops/dispatch.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <numeric>

#include "core/dispatch_layout.h"
#include "ops/checks.h"
#include "ops/collectives.h"
#include "ops/deadline.h"
#include "ops/host_reads.h"
#include "ops/layout_kernels.h"

namespace moe_ep::ops {
namespace {

MapTensors map_tensors(const at::Tensor& expert_rank, const at::Tensor& expert_local, int64_t world,
                       int64_t num_local_experts, int64_t top_k) {
  return {expert_rank.contiguous(), expert_local.contiguous(), world, num_local_experts,
          std::min(top_k, num_local_experts)};
}

// The routing weights, metadata columns width..2 width, as float32 [rows, width]: always a
// copy (the narrowed view of 0 or 1 rows would count as contiguous and alias meta_recv).
at::Tensor received_weights(const at::Tensor& meta_recv, int64_t width) {
  return meta_recv.narrow(1, width, width).clone(at::MemoryFormat::Contiguous).view(at::kFloat);
}

// Raises on every rank alike for what the exchanged headers ([world][kHeaderSize]) show:
// malformed arguments and misuse first, then a configuration or expert map that differs.
void check_headers(const int64_t* received, const Group& group, const DispatchConfig& config,
                   const ArgProblem& problem) {
  const int64_t world = group->getSize();
  auto field = [&](int64_t peer, int f) { return received[peer * core::kHeaderSize + f]; };
  for (int64_t peer = 0; peer < world; ++peer) {
    raise_for_errors(field(peer, core::kHeaderErrors), peer, group, config.fields[kConfigSlots],
                     problem);
  }
  for (int64_t peer = 1; peer < world; ++peer) {
    if (field(peer, core::kHeaderConfig) != field(0, core::kHeaderConfig)) {
      raise_config_mismatch(group, config);
    }
  }
  for (int64_t peer = 1; peer < world; ++peer) {
    TORCH_CHECK(field(peer, core::kHeaderMap) == field(0, core::kHeaderMap),
                "moe_ep: dispatch: ranks disagree on the expert map (arguments 'expert_rank' ",
                "and 'expert_local', the placement): rank 0's differs from rank ", peer, "'s");
  }
}

}  // namespace

std::vector<DispatchStarted> dispatch_start_chunks(const at::Tensor& x, const at::Tensor& topk_ids,
                                                   const at::Tensor& topk_weights,
                                                   const at::Tensor& expert_rank,
                                                   const at::Tensor& expert_local,
                                                   int64_t num_local_experts, int64_t num_chunks,
                                                   std::string_view group_name, ArgProblem problem,
                                                   std::optional<at::ScalarType> dispatch_dtype) {
  const Group group = resolve_group(group_name);
  const int64_t world = group->getSize();
  validate_dispatch_args(problem, x, topk_ids, topk_weights, expert_rank, expert_local,
                         num_local_experts, world);
  validate(problem, Arg::kNumChunks, [&] {
    TORCH_CHECK(num_chunks >= 1 && num_chunks <= core::kMaxChunks, "moe_ep: argument ",
                "'num_chunks' must be in [1, ", core::kMaxChunks, "], got ", num_chunks);
  });
  const bool fp8 = validate_dispatch_dtype(problem, x, dispatch_dtype);
  const DispatchConfig config = dispatch_config(Mode::kExact, x, topk_ids, expert_rank,
                                                num_local_experts, 0, num_chunks, fp8);
  // A rank with a malformed argument still sends its header (of zero counts), on a device its
  // group carries, so that every rank learns of the problem and raises.
  const c10::Device device = problem ? collective_device(group, expert_rank.device()) : x.device();
  const c10::DeviceGuard device_guard(device);
  const CommScope scope(device);

  std::vector<SendLayout> layouts;
  std::vector<at::Tensor> x_chunks, weight_chunks;
  at::Tensor header;
  if (!problem) {
    const MapTensors map =
        map_tensors(expert_rank, expert_local, world, num_local_experts, topk_ids.size(1));
    const at::Tensor ws = dispatch_workspace(num_chunks, world, x.options());
    const at::Tensor rank_offsets = at::empty({num_chunks, world + 1}, ws.options());
    const auto id_chunks = topk_ids.tensor_split(num_chunks);
    x_chunks = x.tensor_split(num_chunks);
    weight_chunks = topk_weights.tensor_split(num_chunks);
    for (int64_t c = 0; c < num_chunks; ++c) {
      layouts.push_back(lay_out_send(id_chunks[c], map, ws, c, rank_offsets[c]));
    }
    header = write_header(rank_offsets, ws, world, config.hash());
  } else {
    header = at::zeros({world, core::kHeaderSize}, at::kLong);
    header.select(1, core::kHeaderErrors).fill_(problem.error_bits());
    header = header.to(device);
  }
  // The one host read: every peer's header, and this rank's own (its send counts).
  const at::Tensor received =
      all_to_all_rows("dispatch (exact size): the header exchange", group, header);
  const std::vector<int64_t> headers = read_to_host(at::cat({header, received}));
  const int64_t* sent = headers.data();
  const int64_t* got = headers.data() + world * core::kHeaderSize;
  check_headers(got, group, config, problem);

  const int64_t width = std::min(topk_ids.size(1), num_local_experts);
  // The FP8 dispatch: x's rows as e4m3fn, their scales after the metadata.
  const at::ScalarType wire_dtype = fp8 ? at::kFloat8_e4m3fn : x.scalar_type();
  const int64_t scales = fp8 ? core::fp8_scale_blocks(x.size(1)) : 0;
  std::vector<DispatchStarted> started;
  for (int64_t c = 0; c < num_chunks; ++c) {
    std::vector<int64_t> send_rows(world), recv_rows(world);
    int64_t recv_entries = 0;
    for (int64_t peer = 0; peer < world; ++peer) {
      const int64_t rows = core::kHeaderCounts + 2 * c;
      send_rows[peer] = sent[peer * core::kHeaderSize + rows];
      recv_rows[peer] = got[peer * core::kHeaderSize + rows];
      recv_entries += got[peer * core::kHeaderSize + rows + 1];
    }
    const int64_t rows = std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
    at::Tensor x_send = at::empty({rows, x.size(1)}, x.options().dtype(wire_dtype));
    at::Tensor meta_send =
        at::empty({rows, 2 * width + scales}, topk_ids.options().dtype(at::kInt));
    at::Tensor token_slot = at::empty({x_chunks[c].size(0), topk_ids.size(1)}, meta_send.options());
    pack_send(x_chunks[c], weight_chunks[c], layouts[c], 0, width, x_send, meta_send, token_slot);
    at::Tensor x_recv = start_all_to_all_rows(group, x_send, send_rows, recv_rows);
    at::Tensor meta_recv = start_all_to_all_rows(group, meta_send, send_rows, recv_rows);
    for (const at::Tensor& t : {x_recv, meta_recv, token_slot}) scope.hand_over(t);
    started.emplace_back(std::move(x_recv), std::move(meta_recv), at::tensor(recv_rows, at::kLong),
                         at::tensor(send_rows, at::kLong), std::move(token_slot),
                         at::tensor({recv_entries}, at::kLong));
  }
  return started;
}

int64_t scale_columns(const at::Tensor& x_recv) {
  return x_recv.scalar_type() == at::kFloat8_e4m3fn ? core::fp8_scale_blocks(x_recv.size(1)) : 0;
}

at::ScalarType grouped_dtype(const at::Tensor& x_recv, std::optional<at::ScalarType> dtype) {
  if (x_recv.scalar_type() != at::kFloat8_e4m3fn) {
    TORCH_CHECK(!dtype || *dtype == x_recv.scalar_type(), "moe_ep: argument 'dtype' must be None ",
                "or the dtype of 'x_recv' (", x_recv.scalar_type(), "), got ", *dtype);
    return x_recv.scalar_type();
  }
  TORCH_CHECK(dtype && (*dtype == at::kFloat || *dtype == at::kHalf || *dtype == at::kBFloat16),
              "moe_ep: argument 'dtype' must name the layer's dtype (float32, float16 or ",
              "bfloat16) that FP8 rows are dequantized to");
  return *dtype;
}

void check_received(const at::Tensor& x_recv, const at::Tensor& meta_recv,
                    int64_t num_local_experts, int64_t status_columns) {
  check_dim(x_recv, 2, "x_recv");
  if (x_recv.scalar_type() != at::kFloat8_e4m3fn) check_float_dtype(x_recv, "x_recv");
  check_dim(meta_recv, 2, "meta_recv");
  check_dtype(meta_recv, at::kInt, "meta_recv");
  check_size(meta_recv, 0, x_recv.size(0), "meta_recv");
  check_same_device(meta_recv, x_recv, "meta_recv", "x_recv");
  const int64_t scales = scale_columns(x_recv);
  const int64_t metadata = meta_recv.size(1) - status_columns - scales;
  TORCH_CHECK(metadata >= 2 && metadata % 2 == 0, "moe_ep: argument 'meta_recv' must have 2W",
              status_columns ? " + 4" : "", scales ? " + the FP8 scale" : "",
              " columns (W >= 1), got shape ", meta_recv.sizes());
  TORCH_CHECK(num_local_experts >= 1, "moe_ep: argument 'num_local_experts' must be >= 1, got ",
              num_local_experts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_received(
    const at::Tensor& x_recv, const at::Tensor& meta_recv, int64_t width, int64_t num_local_experts,
    int64_t out_rows, at::ScalarType dtype) {
  const Grouping g = group_by_key(meta_recv, width, num_local_experts, /*count_skipped=*/false);
  // A wrong entry count must not write past the buffer; on the CPU the count is at hand.
  TORCH_CHECK(meta_recv.is_cuda() || g.offsets.data_ptr<int64_t>()[num_local_experts] <= out_rows,
              "moe_ep: argument 'recv_entries' (", out_rows, ") is below the entries that ",
              "arrived (", g.offsets.data_ptr<int64_t>()[num_local_experts],
              "): pass the one dispatch_start returned");
  const int64_t scales = scale_columns(x_recv);
  at::Tensor x_sorted = scales == 0
                            ? scatter_rows(x_recv, g.position, out_rows)
                            : scatter_dequantized_rows(x_recv, meta_recv.narrow(1, -scales, scales),
                                                       g.position, out_rows, dtype);
  return {std::move(x_sorted), g.offsets, g.position, received_weights(meta_recv, width)};
}

void wait_received(const at::Tensor& x_recv, const at::Tensor& meta_recv,
                   std::string_view operation) {
  wait_collective(x_recv, operation);
  wait_collective(meta_recv, operation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_dispatch_rows(
    const at::Tensor& x_recv, const at::Tensor& meta_recv, const at::Tensor& recv_entries,
    int64_t num_local_experts, std::optional<at::ScalarType> dtype) {
  const c10::DeviceGuard device_guard(x_recv.device());
  const at::ScalarType out_dtype = grouped_dtype(x_recv, dtype);
  const int64_t scales = scale_columns(x_recv);
  const int64_t width = (meta_recv.size(1) - scales) / 2, rows = x_recv.size(0);
  if (num_local_experts == 1 && width == 1) {
    // One local expert (the seeds' one expert per GPU): every row is one entry, already in
    // arrival order, so the received rows are the grouped rows (FP8 rows dequantized).
    const auto long_options = meta_recv.options().dtype(at::kLong);
    at::Tensor row_of = at::arange(rows, meta_recv.options()).view({rows, 1});
    at::Tensor x_sorted =
        scales == 0 ? x_recv
                    : scatter_dequantized_rows(x_recv, meta_recv.narrow(1, -scales, scales), row_of,
                                               rows, out_dtype);
    return {std::move(x_sorted), at::arange(2, long_options) * rows, std::move(row_of),
            received_weights(meta_recv, 1)};
  }
  // The entry count travelled in the header: a CPU tensor, no device read.
  return group_received(x_recv, meta_recv, width, num_local_experts, recv_entries.item<int64_t>(),
                        out_dtype);
}

namespace {

std::vector<at::Tensor> dispatch_start_impl(
    const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& expert_rank, const at::Tensor& expert_local, int64_t num_local_experts,
    int64_t num_chunks, std::string_view group_name, std::optional<at::ScalarType> dispatch_dtype) {
  std::vector<at::Tensor> flat;
  for (auto& chunk :
       dispatch_start_chunks(x, topk_ids, topk_weights, expert_rank, expert_local,
                             num_local_experts, num_chunks, group_name, {}, dispatch_dtype)) {
    std::apply([&](auto&... t) { (flat.push_back(std::move(t)), ...); }, chunk);
  }
  return flat;
}

// The op: its outputs are new tensors (the schema declares no alias), so the one-expert
// shortcut's rows are copied here; moe_forward and dispatch take them without the copy.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_finish_impl(
    const at::Tensor& x_recv, const at::Tensor& meta_recv, const at::Tensor& recv_entries,
    int64_t num_local_experts, std::optional<at::ScalarType> dtype) {
  // Waited first, so that a bad argument does not leave the transfers registered.
  wait_received(x_recv, meta_recv, "dispatch_finish: the rows and their routing metadata");
  check_received(x_recv, meta_recv, num_local_experts, 0);
  TORCH_CHECK(recv_entries.dim() == 1 && recv_entries.numel() == 1 &&
                  recv_entries.scalar_type() == at::kLong && recv_entries.is_cpu(),
              "moe_ep: argument 'recv_entries' must be the CPU int64 [1] tensor that ",
              "dispatch_start returned, got ", recv_entries.scalar_type(), " ",
              recv_entries.sizes(), " on ", recv_entries.device());
  TORCH_CHECK(recv_entries.item<int64_t>() >= 0, "moe_ep: argument 'recv_entries' must be >= 0");
  auto finished = finish_dispatch_rows(x_recv, meta_recv, recv_entries, num_local_experts, dtype);
  at::Tensor& x_sorted = std::get<0>(finished);
  if (x_sorted.is_alias_of(x_recv)) x_sorted = x_sorted.clone();
  return finished;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dispatch_impl(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
              const at::Tensor& expert_rank, const at::Tensor& expert_local,
              int64_t num_local_experts, std::string_view group_name,
              std::optional<at::ScalarType> dispatch_dtype) {
  auto [x_recv, meta_recv, recv_counts, send_counts, token_slot, recv_entries] =
      dispatch_start_chunks(x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts,
                            1, group_name, {}, dispatch_dtype)
          .front();
  wait_received(x_recv, meta_recv, "dispatch: the rows and their routing metadata");
  auto [x_sorted, expert_offsets, recv_row_of, recv_weights] =
      finish_dispatch_rows(x_recv, meta_recv, recv_entries, num_local_experts, x.scalar_type());
  return {x_sorted,    expert_offsets, recv_row_of, recv_weights,
          recv_counts, send_counts,    token_slot};
}

// The send plan alone (no communication), for inspection: it reads the row count on the host
// and raises here for misuse. The pack kernel writes it: the "rows" packed are the token
// numbers, and the "weights" the choice numbers, so the metadata names each row's choices.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dispatch_layout_impl(const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                     const at::Tensor& expert_local, int64_t world_size,
                     int64_t num_local_experts) {
  check_dim(topk_ids, 2, "topk_ids");
  check_index_dtype(topk_ids, "topk_ids");
  TORCH_CHECK(world_size >= 1, "moe_ep: argument 'world_size' must be >= 1, got ", world_size);
  ArgProblem problem;
  const at::Tensor tokens = at::arange(topk_ids.size(0), topk_ids.options().dtype(at::kLong));
  validate_dispatch_args(problem, tokens.unsqueeze(1).to(at::kFloat), topk_ids,
                         topk_ids.to(at::kFloat), expert_rank, expert_local, num_local_experts,
                         world_size);
  TORCH_CHECK(!problem, problem.message);
  const c10::DeviceGuard device_guard(topk_ids.device());
  const int64_t top_k = topk_ids.size(1), width = std::min(top_k, num_local_experts);
  const MapTensors map =
      map_tensors(expert_rank, expert_local, world_size, num_local_experts, top_k);
  const at::Tensor ws = dispatch_workspace(1, world_size, tokens.options());
  const SendLayout layout =
      lay_out_send(topk_ids, map, ws, 0, at::empty({world_size + 1}, ws.options()));
  const std::vector<int64_t> counts = read_to_host(at::cat({ws, layout.rank_offsets}));
  TORCH_CHECK(counts[0] == 0, "moe_ep: ", describe_errors(counts[0], expert_rank.size(0)));
  const int64_t rows = counts.back();
  at::Tensor send_token = at::empty({rows, 1}, tokens.options());
  at::Tensor meta = at::empty({rows, 2 * width}, topk_ids.options().dtype(at::kInt));
  at::Tensor token_slot = at::empty(topk_ids.sizes(), meta.options());
  const at::Tensor choice_numbers =
      at::arange(top_k, tokens.options().dtype(at::kFloat)).expand(topk_ids.sizes());
  pack_send(tokens.unsqueeze(1), choice_numbers, layout, 0, width, send_token, meta, token_slot);
  const at::Tensor local_ids = meta.narrow(1, 0, width);
  const at::Tensor send_choice = at::where(
      local_ids >= 0, meta.narrow(1, width, width).contiguous().view(at::kFloat).to(at::kLong), -1);
  const at::Tensor rank_offsets = layout.rank_offsets;
  return {rank_offsets.narrow(0, 1, world_size) - rank_offsets.narrow(0, 0, world_size),
          ws.narrow(0, 2, world_size).clone(),
          send_token.view({rows}),
          local_ids.contiguous(),
          send_choice,
          token_slot};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CPU, m) {
  m.impl("dispatch_layout", &dispatch_layout_impl);
  m.impl("dispatch", &dispatch_impl);
  m.impl("dispatch_start", &dispatch_start_impl);
  m.impl("dispatch_finish", &dispatch_finish_impl);
}

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) {
  m.impl("dispatch_layout", &dispatch_layout_impl);
  m.impl("dispatch", &dispatch_impl);
  m.impl("dispatch_start", &dispatch_start_impl);
  m.impl("dispatch_finish", &dispatch_finish_impl);
}

}  // namespace moe_ep::ops
