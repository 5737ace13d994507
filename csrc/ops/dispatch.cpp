// Expert-parallel dispatch and combine over a torch.distributed process group.
//
// Token batching: a token goes once to each destination rank that hosts at least one of its
// k experts, carrying the receiver-local expert ids and weights of the choices there (up to
// `slot_width` = min(k, local experts per rank) of them). The receiver groups the received
// (row, local expert) entries by expert for expert_ffn, reduces each row's entries with its
// weights before sending it back, and the source adds the partial rows of its destinations.
//
// The process group is resolved in C++ from its name (PyTorch's functional-collective idiom):
// CUDA tensors travel over the group's CUDA backend (NCCL), CPU tensors over Gloo, and a CUDA
// tensor on a group without a CUDA backend is staged through pinned host memory.
//
// The layout arithmetic is written with device-generic ATen ops, so the same code serves CPU
// and CUDA tensors.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <algorithm>
#include <numeric>
#include <string>

#include "ops/checks.h"
#include "ops/dispatch.h"

namespace moe_ep::ops {
namespace {

struct Layout {
  at::Tensor send_counts;     // int64 [world]: rows sent to each rank
  at::Tensor entry_counts;    // int64 [world]: (token, choice) pairs sent to each rank
  at::Tensor send_token;      // int64 [S]: source token of each sent row, by rank then token
  at::Tensor send_local_ids;  // int32 [S, slot_width]: receiver-local expert ids, -1 padded
  at::Tensor send_choice;     // int64 [S, slot_width]: the choice j behind each slot, -1 padded
  at::Tensor token_slot;      // int32 [T, k]: sent row of a token's first choice per rank, else -1
};

void check_expert_map(const at::Tensor& expert_rank, const at::Tensor& expert_local,
                      const at::Tensor& topk_ids) {
  check_dim(expert_rank, 1, "expert_rank");
  check_dtype(expert_rank, at::kInt, "expert_rank");
  TORCH_CHECK(expert_rank.size(0) >= 1, "moe_ep: argument 'expert_rank' must map at least one ",
              "expert");
  check_dim(expert_local, 1, "expert_local");
  check_dtype(expert_local, at::kInt, "expert_local");
  check_size(expert_local, 0, expert_rank.size(0), "expert_local");
  check_same_device(expert_rank, topk_ids, "expert_rank", "topk_ids");
  check_same_device(expert_local, topk_ids, "expert_local", "topk_ids");
}

std::vector<int64_t> host_values(const at::Tensor& t) {
  const at::Tensor host = t.to(at::kCPU, at::kLong).contiguous();
  return {host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel()};
}

// Where each (token, choice) pair goes, computed on the device without reading anything back.
// `summary` gathers what the host needs in one int64 vector: rows per rank [world], pairs per
// rank [world], then one word of Error bits. Out-of-range ids and map entries are clamped so
// that every index stays in bounds; the bits report them.
struct Routing {
  at::Tensor dest;      // int64 [T, k]: destination rank of each choice
  at::Tensor local;     // int32 [T, k]: receiver-local expert id of each choice
  at::Tensor position;  // int64 [T, k]: index among the token's earlier choices on that rank
  at::Tensor goes_to;   // int64 [world, T]: 1 where the token has a choice on the rank
  at::Tensor summary;   // int64 [2 * world + 1]
};

// Misuse that a rank finds in its own arguments; it travels in the header so that every rank
// raises, not only the one that found it.
enum Error : int64_t { kIdOutOfRange = 1, kTooManyChoices = 2, kBadRank = 4, kBadLocal = 8 };

// Raises for the Error bits found in the arguments of `source`: "" for this call's own, or
// peer_source(p) for those of rank p.
void check_errors(int64_t errors, const std::string& source, int64_t world_size,
                  int64_t num_experts) {
  TORCH_CHECK(!(errors & kBadRank), "moe_ep: ", source, "argument 'expert_rank' (the expert ",
              "map) holds a rank outside [0, ", world_size, ")");
  TORCH_CHECK(!(errors & kBadLocal), "moe_ep: ", source, "argument 'expert_local' (the expert ",
              "map) holds a local expert id outside [0, num_local_experts)");
  TORCH_CHECK(!(errors & kIdOutOfRange), "moe_ep: ", source, "argument 'topk_ids' holds an ",
              "expert id outside [0, ", num_experts, ")");
  TORCH_CHECK(!(errors & kTooManyChoices), "moe_ep: ", source, "argument 'topk_ids' gives a ",
              "token more choices on one rank than 'num_local_experts' allows");
}

std::string peer_source(int64_t peer) { return "dispatch: rank " + std::to_string(peer) + "'s "; }

Routing route_choices(const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                      const at::Tensor& expert_local, int64_t world_size,
                      int64_t num_local_experts) {
  const int64_t num_tokens = topk_ids.size(0), top_k = topk_ids.size(1);
  const int64_t slot_width = std::min(top_k, num_local_experts);
  const int64_t num_experts = expert_rank.size(0);
  const auto long_options = topk_ids.options().dtype(at::kLong);
  const at::Tensor ids_long = topk_ids.to(at::kLong);
  const at::Tensor bad_ids = (ids_long < 0) | (ids_long >= num_experts);
  const at::Tensor ids = ids_long.masked_fill(bad_ids, 0).reshape({-1});
  Routing r;
  r.dest = expert_rank.index_select(0, ids)
               .to(at::kLong)
               .clamp(0, world_size - 1)
               .view({num_tokens, top_k});
  r.local =
      expert_local.index_select(0, ids).clamp(0, num_local_experts - 1).view({num_tokens, top_k});
  const at::Tensor earlier = at::ones({top_k, top_k}, long_options.dtype(at::kBool)).tril(-1);
  r.position = ((r.dest.unsqueeze(2) == r.dest.unsqueeze(1)) & earlier).sum(2);
  // (Expanded, not repeat_interleave: no device-to-host read inside a captured CUDA graph.)
  const at::Tensor token_index =
      at::arange(num_tokens, long_options).unsqueeze(1).expand({num_tokens, top_k}).reshape({-1});
  r.goes_to = at::zeros({world_size, num_tokens}, long_options);
  r.goes_to.index_put_({r.dest.reshape({-1}), token_index}, at::ones({1}, long_options));
  const at::Tensor pairs =
      at::zeros({world_size}, long_options)
          .index_add_(0, r.dest.reshape({-1}), at::ones({num_tokens * top_k}, long_options));
  const at::Tensor bad_rank = (expert_rank < 0).any() | (expert_rank >= world_size).any();
  const at::Tensor bad_local = (expert_local < 0).any() | (expert_local >= num_local_experts).any();
  const at::Tensor errors = bad_ids.any().to(at::kLong) * kIdOutOfRange +
                            (r.position >= slot_width).any().to(at::kLong) * kTooManyChoices +
                            bad_rank.to(at::kLong) * kBadRank + bad_local.to(at::kLong) * kBadLocal;
  r.summary = at::cat({r.goes_to.sum(1), pairs, errors.reshape({1})});
  return r;
}

// The rest of the layout, once the number of sent rows is known on the host.
Layout finish_layout(const Routing& r, int64_t rows, int64_t slot_width) {
  const int64_t world_size = r.goes_to.size(0), num_tokens = r.goes_to.size(1);
  const int64_t top_k = r.dest.size(1);
  const auto long_options = r.dest.options();
  const at::Tensor goes = r.goes_to.reshape({-1});
  const at::Tensor row_index = goes.cumsum(0) - 1;  // row of each (rank, token) pair if sent
  Layout layout;
  // Copies: the outputs of dispatch_layout may not share storage.
  layout.send_counts = r.summary.narrow(0, 0, world_size).clone();
  layout.entry_counts = r.summary.narrow(0, world_size, world_size).clone();
  // Pairs that are not sent all write to a spare last row, dropped afterwards.
  layout.send_token = at::empty({rows + 1}, long_options);
  layout.send_token.index_put_({at::where(goes > 0, row_index, rows)},
                               at::arange(world_size * num_tokens, long_options)
                                   .remainder(std::max<int64_t>(num_tokens, 1)));
  layout.send_token = layout.send_token.narrow(0, 0, rows);
  const at::Tensor token_index =
      at::arange(num_tokens, long_options).unsqueeze(1).expand_as(r.dest);
  const at::Tensor row_of_choice =
      row_index.index_select(0, (r.dest * num_tokens + token_index).reshape({-1}));
  const at::Tensor position = r.position.reshape({-1});
  layout.send_local_ids = at::full({rows, slot_width}, -1, r.local.options());
  layout.send_local_ids.index_put_({row_of_choice, position}, r.local.reshape({-1}));
  layout.send_choice = at::full({rows, slot_width}, -1, long_options);
  layout.send_choice.index_put_({row_of_choice, position},
                                at::arange(top_k, long_options).repeat({num_tokens}));
  layout.token_slot =
      at::where(r.position == 0, row_of_choice.view({num_tokens, top_k}), -1).to(at::kInt);
  return layout;
}

// Whether the group has a backend for tensors of this device type.
bool group_carries(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::DeviceType type) {
  const auto devices = group->getDeviceTypes();
  return std::any_of(devices.begin(), devices.end(),
                     [&](const c10::Device& d) { return d.type() == type; });
}

// Starts an all-to-all of the rows of `input`: variable row splits per rank, or equal splits
// when both lists are empty. The returned tensor is ready after c10d::wait_tensor: its work is
// registered on it (the functional-collective idiom), so the caller computes meanwhile. A
// transfer staged through host memory completes before returning.
at::Tensor start_all_to_all_rows(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                 const at::Tensor& input, std::vector<int64_t> send_rows,
                                 std::vector<int64_t> recv_rows) {
  std::vector<int64_t> shape = input.sizes().vec();
  if (!recv_rows.empty()) {
    shape[0] = 0;
    for (const int64_t n : recv_rows) shape[0] += n;
  }
  at::Tensor send = input.contiguous();
  // A CUDA tensor on a CPU-only group (several processes sharing one GPU) is staged.
  const bool stage = !group_carries(group, input.device().type());
  TORCH_CHECK(!stage || (input.is_cuda() && group_carries(group, c10::DeviceType::CPU)),
              "moe_ep: the process group (backend ", group->getBackendName(), ") cannot carry ",
              input.device().type(), " tensors");
  if (stage) {
    at::Tensor host =
        at::empty(send.sizes(), send.options().device(at::kCPU).pinned_memory(input.is_cuda()));
    send = host.copy_(send);
  }
  at::Tensor recv = at::empty(shape, send.options());
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  // alltoall_base: the name that every torch >= 2.4 has (newer ones alias it).
  auto work = group->alltoall_base(recv, send, recv_rows, send_rows);
#pragma GCC diagnostic pop
  if (stage) {
    work->wait();
    return recv.to(input.device());
  }
  c10d::register_work(recv, work);
  return recv;
}

at::Tensor all_to_all_rows(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                           const at::Tensor& input, std::vector<int64_t> send_rows,
                           std::vector<int64_t> recv_rows) {
  return c10d::wait_tensor(
      start_all_to_all_rows(group, input, std::move(send_rows), std::move(recv_rows)));
}

// Per-peer header of the first exchange: what every rank must agree on, the misuse a rank
// found in its own arguments (Error bits), then the rows and (token, choice) pairs it sends
// to that peer in each chunk. A mismatch or misuse raises on every rank instead of leaving
// some waiting forever.
enum Header : int64_t { kHidden, kExperts, kDtype, kErrors, kChunkCounts };

// summaries: one routing summary per chunk, read on the host (route_choices). Returns the
// received headers, [world][kChunkCounts + 2 * chunks], after checking them.
std::vector<int64_t> exchange_headers(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                      const std::vector<const int64_t*>& summaries, int64_t hidden,
                                      int64_t num_experts, at::ScalarType dtype,
                                      const at::Device& device) {
  const int64_t world = group->getSize(), chunks = static_cast<int64_t>(summaries.size());
  const int64_t header_size = kChunkCounts + 2 * chunks;
  int64_t errors = 0;
  for (const int64_t* summary : summaries) errors |= summary[2 * world];
  at::Tensor header = at::empty({world, header_size}, at::kLong);
  int64_t* h = header.data_ptr<int64_t>();
  for (int64_t peer = 0; peer < world; ++peer) {
    int64_t* row = h + peer * header_size;
    row[kHidden] = hidden;
    row[kExperts] = num_experts;
    row[kDtype] = static_cast<int64_t>(dtype);
    row[kErrors] = errors;
    for (int64_t c = 0; c < chunks; ++c) {
      row[kChunkCounts + 2 * c] = summaries[c][peer];
      row[kChunkCounts + 2 * c + 1] = summaries[c][world + peer];
    }
  }
  const std::vector<int64_t> ones(world, 1);
  const at::Tensor received = all_to_all_rows(group, header.to(device), ones, ones);
  const std::vector<int64_t> values = host_values(received);
  for (int64_t peer = 0; peer < world; ++peer) {
    const int64_t* row = values.data() + peer * header_size;
    check_errors(row[kErrors], peer_source(peer), world, row[kExperts]);
    TORCH_CHECK(row[kHidden] == hidden, "moe_ep: dispatch: ranks disagree on the hidden size ",
                "(argument 'x'): rank ", peer, " has ", row[kHidden], ", rank ", group->getRank(),
                " has ", hidden);
    TORCH_CHECK(row[kExperts] == num_experts, "moe_ep: dispatch: ranks disagree on the number ",
                "of experts (argument 'expert_rank'): rank ", peer, " has ", row[kExperts],
                ", rank ", group->getRank(), " has ", num_experts);
    TORCH_CHECK(row[kDtype] == static_cast<int64_t>(dtype), "moe_ep: dispatch: ranks disagree ",
                "on the dtype of argument 'x'");
  }
  return values;
}

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& group_name) {
  TORCH_CHECK(c10d::is_process_group_registered(group_name),
              "moe_ep: argument 'group_name': ", "no process group is registered as \"", group_name,
              "\"");
  return c10d::resolve_process_group(group_name);
}

// The unpermute op (CPU or CUDA kernel) on indices that moe_ep produced: no range check.
at::Tensor unpermute_trusted(const at::Tensor& rows, const at::Tensor& row_of,
                             const at::Tensor& weights) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moe_ep::unpermute", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(rows, row_of, weights, /*check_rows=*/false);
}

void check_dispatch_args(const at::Tensor& x, const at::Tensor& topk_ids,
                         const at::Tensor& topk_weights, const at::Tensor& expert_rank,
                         const at::Tensor& expert_local, int64_t num_local_experts) {
  check_dim(x, 2, "x");
  check_float_dtype(x, "x");
  check_dim(topk_ids, 2, "topk_ids");
  check_index_dtype(topk_ids, "topk_ids");
  check_size(topk_ids, 0, x.size(0), "topk_ids");
  check_dim(topk_weights, 2, "topk_weights");
  check_float_dtype(topk_weights, "topk_weights");
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), "moe_ep: argument 'topk_weights' must ",
              "have the shape of 'topk_ids' ", topk_ids.sizes(), ", got ", topk_weights.sizes());
  check_same_device(topk_ids, x, "topk_ids", "x");
  check_same_device(topk_weights, x, "topk_weights", "x");
  check_expert_map(expert_rank, expert_local, topk_ids);
  TORCH_CHECK(num_local_experts >= 1, "moe_ep: argument 'num_local_experts' must be >= 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dispatch_layout_impl(const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                     const at::Tensor& expert_local, int64_t world_size,
                     int64_t num_local_experts) {
  check_dim(topk_ids, 2, "topk_ids");
  check_index_dtype(topk_ids, "topk_ids");
  check_expert_map(expert_rank, expert_local, topk_ids);
  TORCH_CHECK(world_size >= 1, "moe_ep: argument 'world_size' must be >= 1, got ", world_size);
  TORCH_CHECK(num_local_experts >= 1, "moe_ep: argument 'num_local_experts' must be >= 1");
  const int64_t slot_width = std::min(topk_ids.size(1), num_local_experts);
  const Routing routing =
      route_choices(topk_ids, expert_rank, expert_local, world_size, num_local_experts);
  // The row counts and the misuse bits in one device-to-host read.
  const std::vector<int64_t> summary = host_values(routing.summary);
  check_errors(summary[2 * world_size], "", world_size, expert_rank.size(0));
  const Layout l = finish_layout(
      routing, std::accumulate(summary.begin(), summary.begin() + world_size, int64_t{0}),
      slot_width);
  return {l.send_counts,    l.entry_counts, l.send_token,
          l.send_local_ids, l.send_choice,  l.token_slot};
}

}  // namespace

std::vector<DispatchStarted> dispatch_start_chunks(const at::Tensor& x, const at::Tensor& topk_ids,
                                                   const at::Tensor& topk_weights,
                                                   const at::Tensor& expert_rank,
                                                   const at::Tensor& expert_local,
                                                   int64_t num_local_experts, int64_t num_chunks,
                                                   std::string_view group_name) {
  check_dispatch_args(x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts);
  TORCH_CHECK(num_chunks >= 1, "moe_ep: argument 'num_chunks' must be >= 1, got ", num_chunks);
  const auto group = resolve_group(std::string(group_name));
  const int64_t world = group->getSize();
  const int64_t slot_width = std::min(topk_ids.size(1), num_local_experts);
  const auto x_chunks = x.tensor_split(num_chunks);
  const auto id_chunks = topk_ids.tensor_split(num_chunks);
  const auto weight_chunks = topk_weights.tensor_split(num_chunks);

  // Every chunk's routing and row counts: one device-to-host read.
  std::vector<Routing> routings;
  std::vector<at::Tensor> to_read;
  for (int64_t c = 0; c < num_chunks; ++c) {
    routings.push_back(
        route_choices(id_chunks[c], expert_rank, expert_local, world, num_local_experts));
    to_read.push_back(routings.back().summary);
  }
  const std::vector<int64_t> local_values = host_values(at::cat(to_read));
  std::vector<const int64_t*> summaries;
  for (int64_t c = 0; c < num_chunks; ++c)
    summaries.push_back(local_values.data() + c * (2 * world + 1));

  // One header exchange for all chunks: then every chunk's rows can travel at once.
  const std::vector<int64_t> header = exchange_headers(
      group, summaries, x.size(1), expert_rank.size(0), x.scalar_type(), x.device());
  const int64_t header_size = kChunkCounts + 2 * num_chunks;
  std::vector<DispatchStarted> started;
  for (int64_t c = 0; c < num_chunks; ++c) {
    const std::vector<int64_t> send_rows(summaries[c], summaries[c] + world);
    std::vector<int64_t> recv_rows(world);
    int64_t recv_entries = 0;
    for (int64_t peer = 0; peer < world; ++peer) {
      recv_rows[peer] = header[peer * header_size + kChunkCounts + 2 * c];
      recv_entries += header[peer * header_size + kChunkCounts + 2 * c + 1];
    }
    const Layout layout = finish_layout(
        routings[c], std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0}), slot_width);
    // Hidden rows, and the routing metadata (local ids + weights as int32 bits) in one message.
    const at::Tensor x_send = x_chunks[c].index_select(0, layout.send_token);
    const at::Tensor weights_send = weight_chunks[c]
                                        .to(at::kFloat)
                                        .index_select(0, layout.send_token)
                                        .gather(1, layout.send_choice.clamp_min(0))
                                        .masked_fill(layout.send_choice < 0, 0.0f);
    const at::Tensor meta_send = at::cat({layout.send_local_ids, weights_send.view(at::kInt)}, 1);
    started.emplace_back(start_all_to_all_rows(group, x_send, send_rows, recv_rows),
                         start_all_to_all_rows(group, meta_send, send_rows, recv_rows),
                         at::tensor(recv_rows, at::kLong), at::tensor(send_rows, at::kLong),
                         layout.token_slot, at::tensor({recv_entries}, at::kLong));
  }
  return started;
}

namespace {

DispatchStarted dispatch_start_impl(const at::Tensor& x, const at::Tensor& topk_ids,
                                    const at::Tensor& topk_weights, const at::Tensor& expert_rank,
                                    const at::Tensor& expert_local, int64_t num_local_experts,
                                    std::string_view group_name) {
  return dispatch_start_chunks(x, topk_ids, topk_weights, expert_rank, expert_local,
                               num_local_experts, 1, group_name)
      .front();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_finish_impl(
    const at::Tensor& x_recv, const at::Tensor& meta_recv, const at::Tensor& recv_entries,
    int64_t num_local_experts) {
  c10d::wait_tensor(x_recv);
  c10d::wait_tensor(meta_recv);
  const int64_t slot_width = meta_recv.size(1) / 2;
  const int64_t entry_count = recv_entries.item<int64_t>();  // a CPU tensor: no device read
  const at::Tensor recv_local = meta_recv.narrow(1, 0, slot_width);
  const at::Tensor recv_weights =
      meta_recv.narrow(1, slot_width, slot_width).contiguous().view(at::kFloat);

  // Group the received (row, slot) entries by local expert, stable in arrival order.
  const at::Tensor flat = recv_local.reshape({-1}).to(at::kLong);
  const at::Tensor valid = flat >= 0;
  const at::Tensor key = at::where(valid, flat, num_local_experts);
  const at::Tensor entries =
      std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false))
          .narrow(0, 0, entry_count);
  const at::Tensor x_sorted = x_recv.index_select(0, at::floor_divide(entries, slot_width));
  const auto long_options = flat.options();
  // Entries per expert; the last bucket counts the padding slots.
  const at::Tensor counts =
      at::zeros({num_local_experts + 1}, long_options).index_add_(0, key, at::ones_like(key));
  at::Tensor expert_offsets = at::zeros({num_local_experts + 1}, long_options);
  expert_offsets.narrow(0, 1, num_local_experts)
      .copy_(counts.narrow(0, 0, num_local_experts).cumsum(0));
  at::Tensor recv_row_of = at::full({flat.size(0)}, -1, long_options);
  recv_row_of.index_put_({entries}, at::arange(entry_count, long_options));
  return {x_sorted, expert_offsets, recv_row_of.view({-1, slot_width}).to(at::kInt), recv_weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dispatch_impl(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
              const at::Tensor& expert_rank, const at::Tensor& expert_local,
              int64_t num_local_experts, std::string_view group_name) {
  const auto [x_recv, meta_recv, recv_counts, send_counts, token_slot, recv_entries] =
      dispatch_start_impl(x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts,
                          group_name);
  const auto [x_sorted, expert_offsets, recv_row_of, recv_weights] =
      dispatch_finish_impl(x_recv, meta_recv, recv_entries, num_local_experts);
  return {x_sorted,    expert_offsets, recv_row_of, recv_weights,
          recv_counts, send_counts,    token_slot};
}

// Fixed-capacity dispatch (decode): every rank sends `capacity` rows to every rank, so all
// shapes are known in advance and no count travels to the host. A (token, rank) pair beyond a
// destination's capacity is not sent; the number of such pairs, summed over the group, is
// returned in `status` (never dropped silently). The receiver places its entries in per-expert
// blocks of M = world * capacity rows (an expert receives at most one entry per received row).
//
// status: int32 [world, kStatusSize], one row per source rank: its overflow, hidden size,
// number of experts and the misuse found in its arguments (Error bits). On CPU tensors it is
// checked here; on CUDA it stays on the device for the caller to check when it chooses (a CUDA
// graph replay cannot read it).
enum Status : int64_t { kOverflow, kStatusHidden, kStatusExperts, kStatusErrors, kStatusSize };

void check_status(const at::Tensor& status, int64_t hidden, int64_t num_experts, int64_t rank) {
  const at::Tensor host = status.to(at::kCPU, at::kLong).contiguous();
  const int64_t* v = host.data_ptr<int64_t>();
  for (int64_t peer = 0; peer < host.size(0); ++peer, v += kStatusSize) {
    check_errors(v[kStatusErrors], peer_source(peer), host.size(0), v[kStatusExperts]);
    TORCH_CHECK(v[kStatusHidden] == hidden, "moe_ep: dispatch: ranks disagree on the hidden ",
                "size (argument 'x'): rank ", peer, " has ", v[kStatusHidden], ", rank ", rank,
                " has ", hidden);
    TORCH_CHECK(v[kStatusExperts] == num_experts, "moe_ep: dispatch: ranks disagree on the ",
                "number of experts (argument 'expert_rank'): rank ", peer, " has ",
                v[kStatusExperts], ", rank ", rank, " has ", num_experts);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_capacity_start_impl(
    const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& expert_rank, const at::Tensor& expert_local, int64_t num_local_experts,
    int64_t capacity, std::string_view group_name) {
  check_dispatch_args(x, topk_ids, topk_weights, expert_rank, expert_local, num_local_experts);
  TORCH_CHECK(capacity >= 1, "moe_ep: argument 'capacity' must be >= 1, got ", capacity);
  const auto group = resolve_group(std::string(group_name));
  const int64_t world = group->getSize(), hidden = x.size(1);
  const int64_t num_tokens = topk_ids.size(0), top_k = topk_ids.size(1);
  const int64_t num_experts = expert_rank.size(0);
  const int64_t width = std::min(top_k, num_local_experts);
  const int64_t rows = world * capacity, trash = rows;  // one spare row absorbs what is not sent
  const auto long_options = topk_ids.options().dtype(at::kLong);

  // Misuse (ids outside the map, too many choices on one rank, a bad map) is clamped into
  // bounds by route_choices and reported to every rank through status.
  const Routing r = route_choices(topk_ids, expert_rank, expert_local, world, num_local_experts);
  const at::Tensor token_index =
      at::arange(num_tokens, long_options).unsqueeze(1).expand_as(r.dest);
  const at::Tensor slot_in_dest = r.goes_to.cumsum(1) - 1;
  const at::Tensor fits = (r.goes_to > 0) & (slot_in_dest < capacity);
  const at::Tensor overflow = ((r.goes_to > 0) & ~fits).sum();
  const at::Tensor row_for_pair = at::where(
      fits, at::arange(world, long_options).unsqueeze(1) * capacity + slot_in_dest, trash);
  const at::Tensor row_of_choice =
      row_for_pair.reshape({-1})
          .index_select(0, (r.dest * num_tokens + token_index).reshape({-1}))
          .view({num_tokens, top_k});
  const at::Tensor first = r.position == 0;

  // Send buffers: one row per (rank, slot); k writes of T rows instead of world * T.
  at::Tensor x_send = at::zeros({rows + 1, hidden}, x.options());
  for (int64_t j = 0; j < top_k; ++j) {
    x_send.index_put_({at::where(first.select(1, j), row_of_choice.select(1, j), trash)}, x);
  }
  const int64_t meta_width = 2 * width + kStatusSize;
  at::Tensor meta_send = at::zeros({rows + 1, meta_width}, topk_ids.options().dtype(at::kInt));
  meta_send.narrow(1, 0, width).fill_(-1);
  const at::Tensor choice_rows = row_of_choice.reshape({-1});
  const at::Tensor choice_slots = r.position.clamp_max(width - 1).reshape({-1});
  meta_send.index_put_({choice_rows, choice_slots}, r.local.reshape({-1}));
  meta_send.index_put_({choice_rows, choice_slots + width},
                       topk_weights.to(at::kFloat).reshape({-1}).view(at::kInt));
  const at::Tensor status_send =
      at::stack({overflow, at::scalar_tensor(hidden, long_options),
                 at::scalar_tensor(num_experts, long_options), r.summary[2 * world]})
          .to(at::kInt);
  meta_send.narrow(0, 0, rows)
      .view({world, capacity, meta_width})
      .select(1, 0)
      .narrow(1, 2 * width, kStatusSize)
      .copy_(status_send.unsqueeze(0).expand({world, kStatusSize}));

  // Metadata first: if the ranks disagree on shapes, CPU callers learn it before the rows move.
  const at::Tensor meta_recv = all_to_all_rows(group, meta_send.narrow(0, 0, rows), {}, {});
  const at::Tensor status = meta_recv.view({world, capacity, meta_width})
                                .select(1, 0)
                                .narrow(1, 2 * width, kStatusSize)
                                .clone();  // its own storage, not a view into the metadata
  if (!x.is_cuda()) check_status(status, hidden, num_experts, group->getRank());
  return {start_all_to_all_rows(group, x_send.narrow(0, 0, rows), {}, {}), meta_recv,
          at::where(first & (row_of_choice < trash), row_of_choice, -1).to(at::kInt), status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_capacity_finish_impl(
    const at::Tensor& x_recv, const at::Tensor& meta_recv, int64_t num_local_experts) {
  c10d::wait_tensor(x_recv);
  const int64_t rows = x_recv.size(0), hidden = x_recv.size(1);
  const int64_t width = (meta_recv.size(1) - kStatusSize) / 2;
  const auto long_options = meta_recv.options().dtype(at::kLong);
  // Place each received (row, slot) entry in its expert's block, in arrival order.
  const int64_t block = rows;  // M: an expert receives at most one entry per received row
  const at::Tensor recv_local = meta_recv.narrow(1, 0, width).reshape({-1}).to(at::kLong);
  const at::Tensor valid = recv_local >= 0;
  const at::Tensor one_hot =
      (recv_local.unsqueeze(1) == at::arange(num_local_experts, long_options)).to(at::kLong);
  const at::Tensor rank_in_expert =
      (one_hot.cumsum(0) - 1).gather(1, recv_local.clamp_min(0).unsqueeze(1)).squeeze(1);
  const int64_t expert_trash = num_local_experts * block;
  const at::Tensor entry_row = at::where(valid, recv_local * block + rank_in_expert, expert_trash);
  at::Tensor x_by_expert = at::zeros({expert_trash + 1, hidden}, x_recv.options());
  const at::Tensor entry_rows = entry_row.view({rows, width});
  for (int64_t s = 0; s < width; ++s) x_by_expert.index_put_({entry_rows.select(1, s)}, x_recv);
  const at::Tensor recv_weights = meta_recv.narrow(1, width, width).contiguous().view(at::kFloat);
  return {x_by_expert.narrow(0, 0, expert_trash), one_hot.sum(0),
          at::where(valid, entry_row, -1).view({rows, width}).to(at::kInt), recv_weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dispatch_capacity_impl(const at::Tensor& x, const at::Tensor& topk_ids,
                       const at::Tensor& topk_weights, const at::Tensor& expert_rank,
                       const at::Tensor& expert_local, int64_t num_local_experts, int64_t capacity,
                       std::string_view group_name) {
  const auto [x_recv, meta_recv, token_slot, status] =
      dispatch_capacity_start_impl(x, topk_ids, topk_weights, expert_rank, expert_local,
                                   num_local_experts, capacity, group_name);
  const auto [x_by_expert, expert_counts, recv_row_of, recv_weights] =
      dispatch_capacity_finish_impl(x_recv, meta_recv, num_local_experts);
  return {x_by_expert, expert_counts, recv_row_of, recv_weights, token_slot, status};
}

at::Tensor combine_start_impl(const at::Tensor& y, const at::Tensor& recv_row_of,
                              const at::Tensor& recv_weights, const at::Tensor& recv_counts,
                              const at::Tensor& send_counts, std::string_view group_name) {
  check_dim(recv_counts, 1, "recv_counts");
  check_dim(send_counts, 1, "send_counts");
  const auto group = resolve_group(std::string(group_name));
  TORCH_CHECK(recv_counts.size(0) == group->getSize() && send_counts.size(0) == group->getSize(),
              "moe_ep: arguments 'recv_counts' and 'send_counts' must have one entry per rank (",
              group->getSize(), ")");
  // Each received row leaves as one reduced row: its entries' weighted sum.
  const at::Tensor partial = unpermute_trusted(y, recv_row_of, recv_weights);
  return start_all_to_all_rows(group, partial, host_values(recv_counts), host_values(send_counts));
}

at::Tensor combine_finish_impl(const at::Tensor& returned, const at::Tensor& token_slot) {
  check_dim(token_slot, 2, "token_slot");
  check_dtype(token_slot, at::kInt, "token_slot");
  c10d::wait_tensor(returned);
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

// The same device-generic implementations serve CPU and CUDA tensors.
void register_impls(torch::Library& m) {
  m.impl("dispatch_layout", &dispatch_layout_impl);
  m.impl("dispatch", &dispatch_impl);
  m.impl("dispatch_start", &dispatch_start_impl);
  m.impl("dispatch_finish", &dispatch_finish_impl);
  m.impl("dispatch_capacity", &dispatch_capacity_impl);
  m.impl("dispatch_capacity_start", &dispatch_capacity_start_impl);
  m.impl("dispatch_capacity_finish", &dispatch_capacity_finish_impl);
  m.impl("combine", &combine_impl);
  m.impl("combine_start", &combine_start_impl);
  m.impl("combine_finish", &combine_finish_impl);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CPU, m) { register_impls(m); }

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) { register_impls(m); }

}  // namespace moe_ep::ops
